"""The exact export: every stage's merged factors stacked into one PEFT LoRA adapter of rank sum r_t."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fastchat_plora import export
from fastchat_plora.rundir import RunDir
from tests.conftest import TINY_RUN_RANK as R


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_base_plus_exported_adapter_computes_the_trained_model(tiny_plora_run, tiny_model_dir, tmp_path):
    assert export.main(["--run_dir", str(tiny_plora_run), "--output_dir", str(tmp_path / "adapter")]) == 0
    report = json.loads((tmp_path / "adapter" / "export_report.json").read_text())
    assert report["stages"] == 3 and report["rank"] == 3 * R

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    served = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    trained = AutoModelForCausalLM.from_pretrained(tiny_plora_run, dtype=torch.float32).eval()
    untouched = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.arange(3, 40).unsqueeze(0)
    assert not torch.allclose(logits(untouched, ids), logits(trained, ids), atol=1e-3)  # training moved it
    torch.testing.assert_close(logits(served, ids), logits(trained, ids), atol=2e-5, rtol=1e-5)


def test_every_layers_stacked_update_equals_its_weight_change(tiny_plora_run, tiny_model_dir, tmp_path):
    export.main(["--run_dir", str(tiny_plora_run), "--output_dir", str(tmp_path / "adapter")])
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(tiny_plora_run / "model.safetensors"))
    layers = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in tensors if "lora_A" in k}
    assert len(layers) == 2 * 7  # two layers x seven linear modules
    for layer in layers:
        b = tensors[f"base_model.model.{layer}.lora_B.weight"].double()
        a = tensors[f"base_model.model.{layer}.lora_A.weight"].double()
        change = after[f"{layer}.weight"].double() - before[f"{layer}.weight"].double()
        torch.testing.assert_close(b @ a, change, atol=1e-6, rtol=0)


def test_compression_reports_the_svd_error(tiny_plora_run, tmp_path):
    assert export.main(["--run_dir", str(tiny_plora_run), "--output_dir", str(tmp_path / "c"), "--max_rank", "2"]) == 0
    report = json.loads((tmp_path / "c" / "export_report.json").read_text())
    assert report["rank"] == 2 and report["full_rank"] == 3 * R

    layer = "model.layers.0.self_attn.q_proj"
    b, a = export.stack(export.load_stages(RunDir(tiny_plora_run)))[layer]
    sigma = torch.linalg.svdvals(b.double() @ a.double())
    expected = (sigma[2:].pow(2).sum() / sigma.pow(2).sum()).sqrt().item()
    assert report["compression"]["relative_error_by_layer"][layer] == pytest.approx(expected, rel=1e-6)

    tensors = load_file(str(tmp_path / "c" / "adapter_model.safetensors"))
    b2 = tensors[f"base_model.model.{layer}.lora_B.weight"].double()
    a2 = tensors[f"base_model.model.{layer}.lora_A.weight"].double()
    residual = torch.linalg.matrix_norm(b.double() @ a.double() - b2 @ a2) / sigma.pow(2).sum().sqrt()
    assert residual.item() == pytest.approx(expected, rel=1e-5)


def test_compress_keeps_an_update_already_within_the_rank():
    gen = torch.Generator().manual_seed(0)
    b, a = torch.randn(12, 3, generator=gen), torch.randn(3, 10, generator=gen)
    b2, a2, result = export.compress(b, a, 5)
    assert b2.shape == (12, 3) and result.relative_error == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(b2 @ a2, b @ a, atol=1e-5, rtol=1e-5)


def test_runs_that_cannot_be_exported_name_the_reason(tmp_path, capsys, tiny_plora_run):
    assert export.main(["--run_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "a")]) == 2
    assert "no finished run" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "summary.json").write_text(json.dumps({"finetune_mode": "full"}))
    assert export.main(["--run_dir", str(tmp_path / "full"), "--output_dir", str(tmp_path / "a")]) == 2
    assert "full fine-tuning" in capsys.readouterr().err
    assert export.main(["--run_dir", str(tiny_plora_run), "--output_dir", str(tmp_path / "a"), "--max_rank", "0"]) == 2
    assert "max_rank=0" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


class FakeHub:
    """huggingface_hub.HfApi's two calls the push makes, recorded; no network."""

    calls: list = []

    def __init__(self, fail: bool = False):
        self.fail = fail

    def create_repo(self, repo_id, repo_type, private, exist_ok):
        FakeHub.calls.append(("create_repo", repo_id, private))

    def upload_folder(self, repo_id, folder_path, commit_message):
        if self.fail:
            raise OSError("401 Unauthorized")
        files = sorted(p.name for p in Path(folder_path).iterdir())
        FakeHub.calls.append(("upload_folder", repo_id, files, commit_message))


@pytest.mark.parametrize("fail", [False, True])
def test_push_to_hub_uploads_the_adapter_folder(tiny_plora_run, tmp_path, capsys, monkeypatch, fail):
    import huggingface_hub

    FakeHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: FakeHub(fail))
    out = tmp_path / "adapter"
    code = export.main(["--run_dir", str(tiny_plora_run), "--output_dir", str(out), "--push_to_hub", "me/plora-tiny",
                        "--private", "--base_model", "org/tiny"])  # fmt: skip
    assert (out / "adapter_model.safetensors").is_file()  # kept whether or not the upload worked
    if fail:
        assert code == 1 and "push to me/plora-tiny failed (OSError: 401 Unauthorized)" in capsys.readouterr().err
        return
    assert code == 0
    [create, upload] = FakeHub.calls
    assert create == ("create_repo", "me/plora-tiny", True)
    assert upload[1] == "me/plora-tiny"
    assert upload[2] == ["adapter_config.json", "adapter_model.safetensors", "export_report.json"]
    assert f"rank {3 * R}" in upload[3] and "base org/tiny" in upload[3]


@pytest.mark.parametrize("repo", ["plora-tiny", "me/bad name", "a/b/c"])
def test_a_bad_hub_repo_id_is_refused_before_anything_is_written(tiny_plora_run, tmp_path, capsys, repo):
    out = tmp_path / "adapter"
    assert export.main(["--run_dir", str(tiny_plora_run), "--output_dir", str(out), "--push_to_hub", repo]) == 2
    assert f"push_to_hub={repo!r}" in capsys.readouterr().err
    assert not out.exists()
