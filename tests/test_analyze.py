"""The rank analysis of W_T - W_0: numerical and effective rank per layer, and the spectra figure."""

from __future__ import annotations

import json

import pytest
import torch

from eval import figures
from fastchat_plora import analyze
from tests.conftest import TINY_RUN_RANK


def test_effective_rank_of_known_spectra():
    assert analyze.effective_rank(torch.ones(5, dtype=torch.float64)) == pytest.approx(5.0)
    assert analyze.effective_rank(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)) == pytest.approx(1.0)
    skewed = analyze.effective_rank(torch.tensor([10.0, 1.0, 1.0], dtype=torch.float64))
    assert 1.0 < skewed < 3.0


def test_three_stages_give_rank_three_r_in_every_layer(tiny_plora_run, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "rank"
    assert analyze.main(["--model_path", str(tiny_plora_run), "--base_model", str(tiny_model_dir),
                         "--output_dir", str(out)]) == 0  # fmt: skip
    result = json.loads((out / "rank.json").read_text())
    layers = result["layers"]
    assert len(layers) == 2 * 7
    assert {layer["numerical_rank"] for layer in layers} == {3 * TINY_RUN_RANK}
    assert all(0 < layer["effective_rank"] <= 3 * TINY_RUN_RANK for layer in layers)
    assert result["by_type"]["q_proj"]["layers"] == 2
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in printed and f"q_proj: numerical rank {3 * TINY_RUN_RANK}" in printed

    png = tmp_path / "figs" / "spectra.png"
    assert figures.main(["spectra", "--ranks", str(out / "rank.json"), "--output", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_base_defaults_to_the_runs_own(tiny_plora_run, tmp_path):
    # run_args.json names the tiny model directory the run started from
    assert analyze.main(["--model_path", str(tiny_plora_run), "--layer_types", "q_proj"]) == 0


def test_models_that_cannot_be_compared_name_the_problem(tmp_path, tiny_model_dir, capsys):
    assert analyze.main(["--model_path", str(tiny_model_dir)]) == 2
    assert "run_args.json" in capsys.readouterr().err
    assert analyze.main(["--model_path", str(tiny_model_dir), "--base_model", str(tmp_path)]) == 2
    assert "no .safetensors" in capsys.readouterr().err
    same = ["--model_path", str(tiny_model_dir), "--base_model", str(tiny_model_dir)]
    code = analyze.main([*same, "--layer_types", "w9"])
    assert code == 2 and "w9" in capsys.readouterr().err
