"""Shared fixtures: a tiny random LLaMA (2 layers, hidden 64) with the embedded model's real tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from fastchat_plora.models import load_tokenizer, resolve_model_path

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(vocab_size: int = 256, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_lora(r: int = 4, targets=ALL_LINEAR, seed: int = 0, randomize_b: bool = True, dropout: float = 0.0):
    """A tiny LLaMA with LoRA adapters; B drawn at random so the adapter is not a no-op."""
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=list(targets))
    model = get_peft_model(tiny_llama(seed=seed), config)
    if randomize_b:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


@pytest.fixture(scope="session")
def embedded_path() -> str:
    """The embedded SmolLM2 as a plain HF directory (converted from its GGUF once, then cached)."""
    return resolve_model_path(None)


@pytest.fixture(scope="session")
def tokenizer(embedded_path):
    return load_tokenizer(embedded_path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random LLaMA saved with the real tokenizer, for CLI runs that take seconds."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_conversations(path: Path, n: int = 32) -> Path:
    records = [
        {
            "id": f"c{i}",
            "conversations": [
                {"from": "human", "value": f"What is {i} plus {i + 1}?"},
                {"from": "gpt", "value": f"{i} plus {i + 1} is {2 * i + 1}."},
            ],
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def conversations_file(tmp_path) -> Path:
    return write_conversations(tmp_path / "conversations.jsonl")


TINY_RUN_RANK = 2


@pytest.fixture(scope="session")
def tiny_plora_run(tiny_model_dir, tmp_path_factory) -> Path:
    """Three stages of PLoRA (r = 2, momentum 0.3) on the tiny model: unloads at steps 2 and 4, then the final merge."""
    from fastchat_plora.train_plora import cli

    tmp = tmp_path_factory.mktemp("tiny_plora_run")
    data = write_conversations(tmp / "c.jsonl")
    out = tmp / "run"
    code = cli(["--model_name_or_path", str(tiny_model_dir), "--data_path", str(data), "--output_dir", str(out),
                "--lora_r", str(TINY_RUN_RANK), "--unload_every_steps", "2", "--max_steps", "6",
                "--unload_momentum", "0.3", "--learning_rate", "1e-2", "--model_max_length", "64",
                "--save_strategy", "no", "--disable_tqdm", "True"])  # fmt: skip
    assert code == 0
    return out
