"""W&B: offline without a key, the PLoRA keys and config in the run, evaluation metrics in the same run.

The test reads the offline run files (`run-<id>.wandb`: W&B's record log, LevelDB's log format
around protobuf records) the way `wandb sync` would, so it checks what would reach the dashboard.
"""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path

import pytest

pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

from eval import run_eval  # noqa: E402
from fastchat_plora import tracking  # noqa: E402
from fastchat_plora.train_plora import cli  # noqa: E402
from tests.conftest import tiny_run, write_conversations  # noqa: E402

BLOCK = 32768  # LevelDB log blocks; records are split across them


def records(path: Path) -> list:
    data, pos, parts, out = path.read_bytes(), 7, b"", []  # 7: the file's W&B header
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer or padding
            pos += left
            continue
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            out.append(record)
            parts = b""
    return out


def run_contents(wandb_dir: Path, run_id: str) -> tuple[set, set, list]:
    history, config, names = set(), set(), []
    for path in sorted(wandb_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")):
        for record in records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                history |= {item.key or "/".join(item.nested_key) for item in record.history.item}
            elif kind == "config":
                config |= {item.key or "/".join(item.nested_key) for item in record.config.update}
            elif kind == "run":
                names.append((record.run.display_name, record.run.run_group, tuple(record.run.tags)))
    return history, config, names


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_RUN_GROUP",
                "WANDB_TAGS"):  # fmt: skip
        monkeypatch.setenv(var, "")  # recorded, so what prepare_wandb sets is undone after the test
        monkeypatch.delenv(var)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    (tmp_path / "wb").mkdir()
    return tmp_path / "wb"


def test_training_and_evaluation_land_in_one_offline_run(offline_wandb, tiny_model_dir, tmp_path, monkeypatch):
    config = tmp_path / "my_plora_run.yaml"
    config.write_text("finetune_mode: plora\nunload_every_steps: 2\nmax_steps: 4\nlogging_steps: 1\n")
    data = write_conversations(tmp_path / "c.jsonl")
    out = tmp_path / "run"
    flags = tiny_run(tiny_model_dir, data, out, report_to="wandb", save_strategy="no")
    code = cli(["--config", str(config), *flags])
    assert code == 0
    info = json.loads((out / "wandb_run.json").read_text())
    assert info["offline"] and info["project"] == "fastchat-plora"

    history, config_keys, names = run_contents(offline_wandb, info["id"])
    for key in ("train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second",
                "train/plora_stage", "plora/update_norm", "plora/unload_stage", "plora/update_norm/q_proj",
                "plora/update_norm/down_proj", "plora/final_merge"):  # fmt: skip
        assert key in history, key
    assert {"unload_every_steps", "unload_momentum", "lora_r", "trainable_parameters"} <= config_keys
    assert names[0] == ("my_plora_run-seed42", "my_plora_run", ("plora", "r2"))  # name, group (the config), tags

    data_dir = tmp_path / "evaldata"
    (data_dir / "gsm8k").mkdir(parents=True)
    (data_dir / "gsm8k" / "test.jsonl").write_text(json.dumps({"question": "2+3?", "answer": "5\n#### 5"}) + "\n")
    flags = ["--model_path", str(out), "--tasks", "gsm8k_loss", "--data_dir", str(data_dir),
             "--output_dir", str(tmp_path / "eval")]  # fmt: skip
    assert run_eval.main(flags) == 0
    history, _, _ = run_contents(offline_wandb, info["id"])
    assert {"eval/step", "eval/gsm8k/heldout_loss/loss"} <= history


def test_wandb_asked_for_but_not_installed_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"report_to=wandb needs the wandb package"):
        tracking.prepare_wandb(["wandb"])
    assert tracking.prepare_wandb(["none"]) is None


def test_no_key_means_offline_and_a_key_means_online(offline_wandb, monkeypatch):
    assert tracking.prepare_wandb(["wandb"]) is not None and tracking.os.environ["WANDB_MODE"] == "offline"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(tracking, "wandb_reachable", lambda: True)
    assert tracking.prepare_wandb(["wandb"]) is not None and "WANDB_MODE" not in tracking.os.environ


def test_a_key_without_a_route_to_the_server_means_offline(offline_wandb, monkeypatch, caplog):
    with socket.socket() as closed:  # a port nothing listens on: the connection is refused at once
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert not tracking.wandb_reachable()
    with caplog.at_level("WARNING", logger="fastchat_plora.tracking"):
        assert tracking.prepare_wandb(["wandb"]) is not None
    assert tracking.os.environ["WANDB_MODE"] == "offline"
    assert "an API key but no connection to the W&B server, logging offline" in caplog.text


def test_a_resumed_run_logs_to_the_same_wandb_run(offline_wandb, tiny_model_dir, tmp_path):
    data = write_conversations(tmp_path / "c.jsonl")
    out = tmp_path / "run"
    flags = tiny_run(tiny_model_dir, data, out, report_to="wandb", unload_every_steps=2, save_steps=2, seed=7)
    assert cli([*flags, "--max_steps", "2"]) == 0  # stops at step 2, as a preempted job would have
    first = json.loads((out / "wandb_run.json").read_text())["id"]
    assert cli([*flags, "--max_steps", "4", "--resume_from_checkpoint", "latest"]) == 0
    assert json.loads((out / "wandb_run.json").read_text())["id"] == first
    runs = {p.name.rsplit("-", 1)[1] for p in offline_wandb.glob("wandb/offline-run-*")}
    assert runs == {first}  # both parts went to one W&B run
    history, _, _ = run_contents(offline_wandb, first)
    assert "plora/update_norm" in history
    for var in ("WANDB_RUN_ID", "WANDB_RESUME", "WANDB_RUN_GROUP", "WANDB_TAGS"):
        assert var not in tracking.os.environ  # the training run's identity does not leak into the process


def test_held_out_loss_and_the_samples_table_reach_the_offline_run(offline_wandb, tiny_model_dir, tmp_path):
    data = write_conversations(tmp_path / "c.jsonl")
    out = tmp_path / "run"
    flags = tiny_run(tiny_model_dir, data, out, report_to="wandb", unload_every_steps=2, max_steps=4,
                     save_strategy="no", eval_holdout=4, sample_prompts=2, sample_max_new_tokens=3)  # fmt: skip
    assert cli(flags) == 0
    run_id = json.loads((out / "wandb_run.json").read_text())["id"]
    history, _, _ = run_contents(offline_wandb, run_id)
    assert {"eval/loss", "eval/before_unload_loss", "plora/samples/_type"} <= history  # a table: nested keys
    (files,) = offline_wandb.glob(f"wandb/offline-run-*-{run_id}/files")
    tables = sorted(files.glob("media/table/plora/samples_*.table.json"), key=lambda p: p.stat().st_mtime)
    last = json.loads(tables[-1].read_text())
    assert last["columns"] == ["step", "stage", "prompt", "output"]
    assert [row[0] for row in last["data"]] == [0, 0, 2, 2, 4, 4]  # before training, the unload, the end
    assert [row[2:] for row in last["data"]] == [
        [s["prompt"], s["output"]] for s in map(json.loads, (out / "samples.jsonl").read_text().splitlines())
    ]
