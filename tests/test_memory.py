"""Memory known before the run starts: the Kahan buffers exist from step 0, and an unload adds none."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

from fastchat_plora.callback import PLoRACallback
from fastchat_plora.train_plora import cli
from tests.conftest import tiny_run, write_conversations


def allocations(fn) -> tuple[int, int]:
    """(bytes still held after ``fn``, highest bytes held while it ran), from the CPU allocator's own events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    held = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return held, peak


@pytest.fixture(scope="module")
def deeper_bf16_model(tmp_path_factory, tokenizer):
    """A tiny LLaMA of 16 layers in bf16: the buffers (one per adapted weight) outweigh one merge's transients
    and the adapter-sized copies an unload keeps while it runs, as they do at LLaMA-7B."""
    path = tmp_path_factory.mktemp("tiny_llama_16_layers")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=16,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_kahan_buffers_exist_from_step_0_and_an_unload_keeps_no_new_memory(deeper_bf16_model, tmp_path, monkeypatch):
    seen = []
    unload = PLoRACallback._unload

    def measured(self, state, model, optimizer, final):
        buffers = sum(b.numel() * b.element_size() for b in (self.weights.compensation or {}).values())
        held, peak = allocations(lambda: unload(self, state, model, optimizer, final))
        seen.append((state.global_step, buffers, held, peak))

    monkeypatch.setattr(PLoRACallback, "_unload", measured)
    data = write_conversations(tmp_path / "c.jsonl")
    flags = {"model_dtype": "bfloat16", "bf16": True, "use_cpu": True, "unload_every_steps": 2, "max_steps": 3,
             "per_device_train_batch_size": 2, "save_strategy": "no", "lora_dropout": 0, "lora_r": 1}  # fmt: skip
    assert cli(tiny_run(deeper_bf16_model, data, tmp_path / "out", **flags)) == 0

    elements = 16 * (2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 256)  # q, o; k, v (2 of 4 heads); gate, up, down
    (step, buffers, held, peak), *_ = seen
    assert step == 2 and buffers == 2 * elements  # all of them, bf16, before the first unload
    assert held < 0.1 * buffers  # the unload keeps only the (adapter-sized) merged factors
    assert peak < 0.5 * buffers  # and its transients are one block's products
