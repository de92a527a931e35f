"""What a cluster user runs before the queue: launch/submit.sh, the preflight behind every launch script,
and every launch example of the docs, each dry-run under the node and GPU counts it names."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, module_env, run_module

DOCS = [REPO / "README.md", REPO / "launch" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
DOCS.append(REPO / "results" / "README.md")
# an optional run of VAR=value words, then a launch script or an sbatch of slurm.sbatch, up to the end of the span
EXAMPLE = re.compile(
    r"((?:[A-Z_]+=(?:\"[^\"]*\"|\S+)\s+)*(?:bash launch/[\w.]+|sbatch [^`\n]*?launch/slurm\.sbatch)[^`\n#|]*)"
)
NOT_DRY_RUN = {"launch/quickstart.sh"}  # the demo trains for real: tests/test_train_plora.py runs its config


def documented_examples() -> list[tuple[str, str]]:
    """(file, command) for every concrete launch command in the docs: no `...`, no PLACEHOLDER arguments."""
    found = []
    for path in DOCS:
        text = path.read_text().replace("\\\n", " ")
        for match in EXAMPLE.finditer(text):
            command = " ".join(match.group(1).split())
            words = shlex.split(command)
            script = next((w for w in words if w.startswith("launch/")), "")
            if "..." in command or script in NOT_DRY_RUN or any(re.fullmatch(r"\[?[A-Z]{3,}\W*", w) for w in words):
                continue
            if script == "launch/reproduce.sh" and words[-1] == script:  # prose naming the script
                continue
            found.append((str(path.relative_to(REPO)), command))
    return found


def fake_sbatch(tmp_path: Path) -> tuple[str, Path]:
    """A PATH whose `sbatch` records its arguments (one call a line) instead of queueing."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "sbatch_calls"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$*" >> {calls}\necho "Submitted batch job 1"\n')
    (bin_dir / "sbatch").chmod(0o755)
    return f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}", calls


def launch(script: str, *args: str, path: str | None = None, **env: str) -> subprocess.CompletedProcess:
    path = path or f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"
    full_env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "PATH": path, **env}
    return subprocess.run(["bash", script, *args], cwd=REPO, env=full_env, capture_output=True, text=True)


def cached_model(hf_home: Path, repo_id: str) -> None:
    """A hub cache entry for `repo_id` in the layout huggingface_hub writes (refs/main -> a snapshot)."""
    folder = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (folder / "snapshots" / "abc").mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("abc")
    (folder / "snapshots" / "abc" / "config.json").write_text("{}")


def test_submit_checks_then_queues_with_the_options_given(shipped_data, tmp_path):
    path, calls = fake_sbatch(tmp_path)
    proc = launch("launch/submit.sh", "--nodes", "2", "--gpus-per-node", "6", "--time", "1:00:00", "--", "--seed", "3",
                  path=path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "per-device batch 2 x accumulation 1 = 24" in proc.stdout
    assert calls.read_text().split("\n")[0] == "--nodes 2 --gpus-per-node 6 --time 1:00:00 launch/slurm.sbatch --seed 3"


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--nodes", "2", "--gpus-per-node", "8"], {}, "GLOBAL_BATCH=24 does not split over 16 processes"),
        (["--nodes", "1", "--", "--data_path", "nowhere.jsonl"], {}, "data file nowhere.jsonl: no such file"),
        ([], {"OFFLINE": "1"}, "model huggyllama/llama-7b is not in the hub cache"),
        ([], {"CONFIG": "configs/paper/table9.yaml"}, "config not found: configs/paper/table9.yaml"),
        (["--nodes", "1-2"], {}, "--nodes 1-2: expected one node count"),
    ],
)
def test_submit_refuses_before_anything_is_queued(shipped_data, tmp_path, args, env, message):
    path, calls = fake_sbatch(tmp_path)
    proc = launch("launch/submit.sh", *args, path=path, HF_HOME=str(tmp_path / "hf"), **env)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert not calls.exists()  # nothing queued


def test_an_offline_node_finds_a_model_already_in_hf_home(shipped_data, tmp_path):
    path, calls = fake_sbatch(tmp_path)
    cached_model(tmp_path / "hf", "huggyllama/llama-7b")
    proc = launch("launch/submit.sh", path=path, HF_HOME=str(tmp_path / "hf"), OFFLINE="1")
    assert proc.returncode == 0, proc.stderr
    assert calls.read_text().strip() == "launch/slurm.sbatch"


def test_the_data_file_is_checked_in_dry_run_too(tmp_path):
    proc = launch("launch/node.sh", "--data_path", str(tmp_path / "missing.jsonl"), DRY_RUN="1")
    assert proc.returncode == 2 and "missing.jsonl: no such file" in proc.stderr and "+ " not in proc.stdout


def test_the_docs_have_launch_examples_of_every_kind():
    scripts = {shlex.split(c)[-1] if "sbatch" in c else c for _, c in documented_examples()}
    for kind in ("launch/node.sh", "launch/submit.sh", "launch/reproduce.sh", "launch/slurm.sbatch"):
        assert any(kind in command for command in scripts), kind


@pytest.mark.parametrize("where, command", documented_examples())
def test_every_documented_launch_example_dry_runs(shipped_data, tmp_path, where, command):
    """Run as written, with DRY_RUN=1; an `sbatch` example runs slurm.sbatch as SLURM would start it."""
    words = shlex.split(command)
    env = {}
    while "=" in words[0] and words[0].split("=")[0].isupper():
        key, value = words.pop(0).split("=", 1)
        env[key] = value.replace("$PWD", str(REPO))
    if "ENV_SETUP" in env:  # the user's own environment hook: an empty one here
        (tmp_path / "cluster_env.sh").write_text("")
        env["ENV_SETUP"] = str(tmp_path / "cluster_env.sh")
    if words[0] == "sbatch":  # SLURM starts the script on the first node with the counts asked for
        options = words[1 : words.index("launch/slurm.sbatch")]
        value = {option: options[i + 1] for i, option in enumerate(options[:-1])}
        env |= {"SLURM_NNODES": value.get("--nodes", "1"), "SLURM_GPUS_ON_NODE": value.get("--gpus-per-node", "8")}
        words = ["bash", *words[words.index("launch/slurm.sbatch") :]]
    assert words[0] == "bash", command
    path, calls = fake_sbatch(tmp_path)
    runs = tmp_path / "runs"
    proc = launch(words[1], *words[2:], path=path, DRY_RUN="1", RUNS_DIR=str(runs), RESULTS_DIR=str(runs), **env)
    assert proc.returncode == 0, f"{where}: {command}\n{proc.stderr[-2000:]}"
    assert any(line.startswith("+ ") for line in proc.stdout.splitlines())
    assert not calls.exists() and not runs.exists()  # a dry run queues and writes nothing


def test_prefetch_asks_only_for_what_loading_needs(monkeypatch, capsys):
    import huggingface_hub

    from fastchat_plora import prefetch

    asked = {}
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, revision=None: ["a.safetensors", "b.bin"])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: asked.update(kw) or "/cache/x")
    assert prefetch.main(["huggyllama/llama-7b"]) == 0
    assert "*.safetensors" in asked["allow_patterns"] and "*.bin" not in asked["allow_patterns"]
    assert "*.json" in asked["allow_patterns"]  # config, tokenizer
    assert "huggyllama/llama-7b is in the cache: /cache/x" in capsys.readouterr().out


def test_prefetch_offline_is_one_line():
    proc = run_module("fastchat_plora.prefetch", "huggyllama/llama-7b", env=module_env(HF_HUB_OFFLINE="1"))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "huggyllama/llama-7b" in errors[0], proc.stderr
