"""Every config in configs/ parses, validates, and says what it reproduces and how to run it."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastchat_plora.args import parse_args, validate

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_validates(path, tmp_path):
    # --use_cpu: the GPU configs ask for bf16, which TrainingArguments refuses on a CPU-only machine.
    flags = ["--data_path", "x.jsonl", "--output_dir", str(tmp_path / "out"), "--use_cpu", "True"]
    args = parse_args(["--config", str(path), *flags])
    validate(*args)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_header_names_its_command(path):
    header = path.read_text().split("\n\n")[0]
    assert header.startswith("#") and ("python -m" in header or "torchrun" in header or "bash " in header)
