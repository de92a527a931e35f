"""Mixed precision wherever the model runs, and the attention kernel chosen for the dtype it computes in."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from fastchat_plora import models
from fastchat_plora.args import ConfigError, parse_args, validate
from fastchat_plora.train_plora import cli, load_base
from tests import dtype_probe
from tests.conftest import REPO, module_env, tiny_run, write_conversations


@pytest.fixture
def flash_attention_everywhere(monkeypatch):
    """flash-attn installed on an H100 (capability 9.0), as far as the availability checks can tell."""
    monkeypatch.setattr(models, "flash_attention_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))


def test_auto_takes_flash_attention_only_for_half_precision_compute(flash_attention_everywhere, monkeypatch):
    assert models.resolve_attention("auto", torch.float32) == "sdpa"  # flash-attn takes fp16/bf16 inputs only
    assert models.resolve_attention("auto", torch.bfloat16) == "flash_attention_2"
    assert models.resolve_attention("auto", torch.float16) == "flash_attention_2"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))  # Turing: no flash-attn 2
    assert models.resolve_attention("auto", torch.bfloat16) == "sdpa"
    assert models.resolve_attention("flex_attention", torch.float32) == "flex_attention"  # as asked


def test_compute_dtype_is_the_weights_or_autocasts():
    assert models.compute_dtype("float32") == torch.float32
    assert models.compute_dtype("float32", bf16=True) == torch.bfloat16
    assert models.compute_dtype("float32", fp16=True) == torch.float16
    assert models.compute_dtype("bfloat16") == torch.bfloat16


def test_fp32_model_where_flash_attention_is_installed_loads_with_sdpa(
    flash_attention_everywhere, tiny_model_dir, tmp_path
):
    args = parse_args(tiny_run(tiny_model_dir, tmp_path / "c.jsonl", tmp_path / "out"))
    _, _, model = load_base(args[0], args[1], args[4])  # fp32 weights, no --bf16: auto must not pick flash-attn
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", ["flash_attention_3", "flex_attention", "kernels-community/flash-attn2", "eager"])
def test_attention_names_transformers_takes_pass_validation(name, tmp_path):
    flags = ["--data_path", "x.jsonl", "--output_dir", str(tmp_path), "--model_dtype", "bfloat16"]
    validate(*parse_args([*flags, "--attn_implementation", name]))


def test_flash_attention_on_fp32_compute_is_refused_before_anything_loads(tmp_path):
    flags = ["--data_path", "x.jsonl", "--output_dir", str(tmp_path), "--attn_implementation", "flash_attention_3"]
    with pytest.raises(ConfigError, match="would compute in fp32"):
        validate(*parse_args(flags))


def test_an_attention_transformers_does_not_know_is_refused_by_name(tmp_path):
    args = parse_args(["--data_path", "x.jsonl", "--output_dir", str(tmp_path), "--attn_implementation", "flash"])
    with pytest.raises(ConfigError, match="attn_implementation='flash'"):
        validate(*args)


MIXED = {"bf16": True, "use_cpu": True, "eval_holdout": 4, "eval_steps": 2, "sample_prompts": 1,
         "sample_max_new_tokens": 3, "unload_every_steps": 2, "max_steps": 4, "save_strategy": "no",
         "lora_dropout": 0}  # fmt: skip


def test_fp32_weights_with_bf16_compute_in_bf16_in_loss_evaluation_and_samples(tiny_model_dir, tmp_path, monkeypatch):
    seen = defaultdict(set)
    dtype_probe.install(monkeypatch.setattr, seen)
    data = write_conversations(tmp_path / "c.jsonl")
    assert cli(tiny_run(tiny_model_dir, data, tmp_path / "out", **MIXED)) == 0
    assert dict(seen) == {"loss": {"bfloat16"}, "evaluation": {"bfloat16"}, "samples": {"bfloat16"}}


@pytest.mark.slow
def test_fp32_weights_with_bf16_compute_in_bf16_under_ddp(tiny_model_dir, tmp_path):
    data = write_conversations(tmp_path / "c.jsonl")
    torchrun = Path(sys.executable).parent / "torchrun"
    args = tiny_run(tiny_model_dir, data, tmp_path / "out", per_device_train_batch_size=1, **MIXED)
    command = [str(torchrun), "--nproc_per_node", "2", "--master_port", "29631",
               str(REPO / "tests" / "dtype_probe.py"), str(tmp_path / "dtypes"), *args]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, env=module_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"dtypes.rank{rank}.json").read_text())
        assert seen == {"loss": ["bfloat16"], "evaluation": ["bfloat16"], "samples": ["bfloat16"]}, rank


def saved_bytes_and_grads(cast_input: bool) -> tuple[int, torch.Tensor, list[torch.Tensor]]:
    """(bytes of distinct tensors saved for backward, logits, adapter gradients) of one bf16-autocast step of a
    bf16 LLaMA with fp32 adapters, with or without PEFT's cast of the layer input to the adapters' dtype."""
    from fastchat_plora.adapters import add_adapters, compute_in_input_dtype
    from fastchat_plora.plora import stage_generator
    from tests.conftest import ALL_LINEAR, tiny_llama

    model = add_adapters(tiny_llama().to(torch.bfloat16), r=4, alpha=8, targets=ALL_LINEAR,
                         generator=stage_generator(0, 0))  # fmt: skip
    with torch.no_grad():  # B = 0 would make the adapter a no-op
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    if not cast_input:
        compute_in_input_dtype(model)
    storages: dict[int, int] = {}

    def keep(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.arange(1, 65).reshape(2, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        logits = model(input_ids=ids).logits
    logits.float().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    return sum(storages.values()), logits, grads


def test_without_pefts_input_cast_the_adapters_compute_the_same_and_keep_no_copy_of_their_input():
    with_cast, logits_cast, grads_cast = saved_bytes_and_grads(cast_input=True)
    without, logits, grads = saved_bytes_and_grads(cast_input=False)
    assert torch.equal(logits, logits_cast)  # bf16 -> fp32 -> bf16 is exact: the same matmuls
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_cast))
    assert with_cast - without >= 2 * 3 * (2 * 32 * 64) * 2  # per layer, q, k, v's copies of their input (bf16)
