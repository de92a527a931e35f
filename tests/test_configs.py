"""Every config in configs/ parses, validates, and says what it reproduces and how to run it."""

from __future__ import annotations

import pytest

from fastchat_plora.args import ConfigError, load_config, parse_args, validate
from tests.conftest import REPO, run_module

ALL_YAML = sorted((REPO / "configs").rglob("*.yaml"))
SHARED = [p for p in ALL_YAML if p.name.startswith("_")]  # included by others, not runs of their own
CONFIGS = [p for p in ALL_YAML if p not in SHARED]
EXPERIMENTS = ("table1", "table2", "table3", "figure2", "figure3", "figure4")


def test_there_are_configs():
    assert CONFIGS and SHARED


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses_and_validates(path, tmp_path):
    # --use_cpu: the GPU configs ask for bf16, which TrainingArguments refuses on a CPU-only machine.
    flags = ["--data_path", "x.jsonl", "--output_dir", str(tmp_path / "out"), "--use_cpu", "True"]
    args = parse_args(["--config", str(path), *flags])
    validate(*args)


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_header_names_its_command(path):
    header = path.read_text().split("\n\n")[0]
    assert header.startswith("#") and ("python -m" in header or "torchrun" in header or "bash " in header)


@pytest.mark.parametrize("scale", ["small", "paper"])
def test_every_experiment_has_configs_at_both_scales(scale):
    for experiment in EXPERIMENTS:
        assert list((REPO / "configs" / scale).glob(f"{experiment}_*.yaml")), f"{scale}/{experiment}"


def test_small_configs_mirror_the_paper_ones():
    def runs(scale):  # table 2's sample counts differ by scale; the structure must not
        paper = [p for p in CONFIGS if p.parent.name == scale and p.stem.startswith(EXPERIMENTS)]
        return {p.name.rsplit("_qv_", 1)[0] for p in paper}

    assert runs("small") == runs("paper")


def runs_of(scale: str, experiment: str) -> dict[str, dict]:
    return {p.stem: load_config(p) for p in CONFIGS if p.parent.name == scale and p.stem.startswith(experiment)}


def test_paper_configs_hold_the_papers_settings(tmp_path):
    config = load_config(REPO / "configs" / "paper" / "table1_plora_r8.yaml")
    assert config["learning_rate"] == 1e-4 and config["adam_beta2"] == 0.99
    assert config["lr_scheduler_type"] == "constant" and config["unload_every_samples"] == 4800
    assert config["per_device_train_batch_size"] * 8 == 24
    assert config["lora_target_modules"].split(",") == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    ]  # fmt: skip
    for name, run in runs_of("paper", "").items():
        assert run["conv_template"] == "vicuna_v1.1", name  # LLaMA-7B has no chat template: FastChat's format
        assert run["train_sampling_strategy"] == "random", name  # batches drawn as FastChat draws them


@pytest.mark.parametrize("scale", ["small", "paper"])
def test_every_config_names_its_init_and_momentum_rule(scale):
    for name, run in runs_of(scale, "").items():
        assert run["lora_init"] == "kaiming_gaussian", name  # the variance of PEFT's default, as the paper's framework
        if run.get("unload_momentum", 0) > 0 and name.startswith(EXPERIMENTS):  # the paper's experiments
            assert run["momentum_mode"] == "paper", name  # the paper's literal rule


@pytest.mark.parametrize("scale", ["small", "paper"])
def test_table3_is_the_papers_seven_columns(scale):
    columns = {(c["finetune_mode"], c["lora_r"], c["lora_target_modules"].count(",") + 1, c["learning_rate"])
               for c in runs_of(scale, "table3").values()}  # fmt: skip
    assert columns == {("lora", 1, 2, 2e-5), ("lora", 1, 2, 1e-4), ("lora", 1, 2, 5e-4), ("lora", 8, 2, 1e-4),
                       ("lora", 1, 7, 1e-4), ("plora", 8, 7, 1e-4), ("plora", 8, 7, 5e-4)}  # fmt: skip


@pytest.mark.parametrize("scale", ["small", "paper"])
def test_the_figures_have_lora_and_plora_at_both_ranks_and_figure2_a_lora_curve(scale):
    for figure in ("figure3", "figure4"):
        runs = {(c["finetune_mode"], c["lora_r"]) for c in runs_of(scale, figure).values()}
        assert runs == {("lora", 1), ("lora", 8), ("plora", 1), ("plora", 8)}, figure
    figure2 = runs_of(scale, "figure2").values()
    assert {c["unload_momentum"] for c in figure2 if c["finetune_mode"] == "plora"} == {0, 0.1, 0.3}
    assert [c["finetune_mode"] for c in figure2].count("lora") == 1


def test_include_reads_shared_settings_and_lets_the_file_override(tmp_path):
    (tmp_path / "base.yaml").write_text("lora_r: 4\nlearning_rate: 1.0e-4\n")
    (tmp_path / "run.yaml").write_text("include: base.yaml\nlora_r: 8\n")
    assert load_config(tmp_path / "run.yaml") == {"lora_r": 8, "learning_rate": 1e-4}


def test_include_cycle_and_missing_include_are_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("include: b.yaml\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("include: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config(tmp_path / "c.yaml")


def test_config_check_command_names_the_bad_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("include: " + str(REPO / "configs" / "small" / "_common.yaml") + "\nlora_rank: 8\n")
    proc = run_module("fastchat_plora.args", str(bad))
    assert proc.returncode == 2 and "lora_rank" in proc.stderr


def test_a_mapping_value_reaches_the_training_arguments(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("lr_scheduler_type: cosine_with_min_lr\nlr_scheduler_kwargs: {min_lr: 1.0e-6}\n")
    args = parse_args(["--config", str(config), "--output_dir", str(tmp_path / "out"), "--learning_rate", "2e-4"])
    training = args[4]
    assert training.lr_scheduler_kwargs == {"min_lr": 1e-6} and training.learning_rate == 2e-4


@pytest.mark.parametrize(
    "line,message", [("lora_r: 8.5", "lora_r=8.5"), ("max_steps: true", "max_steps=True"), ("bf16: 3", "bf16=3")]
)
def test_a_value_of_the_wrong_type_names_the_key(tmp_path, line, message):
    config = tmp_path / "c.yaml"
    config.write_text(line + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config(config)


@pytest.mark.parametrize("where", ["config", "flag"])
def test_a_deepspeed_config_without_deepspeed_installed_is_one_line(where, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find_spec(name, *a)
    )
    zero3 = str(REPO / "configs" / "ds" / "zero3.json")
    config = tmp_path / "c.yaml"
    config.write_text(f"deepspeed: {zero3}\n" if where == "config" else "lora_r: 2\n")
    flags = ["--deepspeed", zero3] if where == "flag" else []
    with pytest.raises(ConfigError, match=r"deepspeed=.*zero3.json needs the deepspeed package: pip install"):
        parse_args(["--config", str(config), "--output_dir", str(tmp_path / "out"), *flags])


@pytest.mark.parametrize(
    "in_config, flags, expected",
    [
        (None, ["--deepspeed", "ZERO2"], "ZERO2"),  # the flag reaches TrainingArguments
        ("ZERO3", ["--deepspeed", "ZERO2"], "ZERO2"),  # and overrides the config
        ("ZERO3", ["--deepspeed", ""], ""),  # an empty flag turns the config's DeepSpeed off
        ("ZERO3", [], "ZERO3"),
    ],
)
def test_deepspeed_from_config_and_flag(tmp_path, in_config, flags, expected):
    pytest.importorskip("deepspeed")
    paths = {name: str(REPO / "configs" / "ds" / f"{name.lower()}.json") for name in ("ZERO2", "ZERO3")}
    config = tmp_path / "c.yaml"
    config.write_text(f"deepspeed: {paths[in_config]}\n" if in_config else "lora_r: 2\n")
    flags = [paths.get(f, f) for f in flags]
    args = parse_args(["--config", str(config), "--output_dir", str(tmp_path / "out"), "--use_cpu", "True", *flags])
    assert args[-1].deepspeed == paths.get(expected, expected)


def test_a_missing_deepspeed_config_is_one_line(tmp_path):
    pytest.importorskip("deepspeed")
    with pytest.raises(ConfigError, match=r"^deepspeed=missing.json: no such config file$"):
        parse_args(["--output_dir", str(tmp_path / "out"), "--deepspeed", "missing.json"])
