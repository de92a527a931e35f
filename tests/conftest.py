"""Shared fixtures: a tiny random LLaMA (2 layers, hidden 64) with the embedded model's real tokenizer,
the flags of a tiny training run, and one way to start the project's modules in a subprocess."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from fastchat_plora.models import load_tokenizer, resolve_model_path

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
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


@pytest.fixture(scope="session")
def shipped_data():
    """The data files the shipped configs name (the launch scripts check them), written small where this
    checkout has none, and removed after."""
    made = []
    for relative in ("data/mix/mix.jsonl", "data/gsm8k_train.jsonl"):
        path = REPO / relative
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            made.append(write_conversations(path, 8))
    yield
    for path in made:
        path.unlink()


@pytest.fixture
def conversations_file(tmp_path) -> Path:
    return write_conversations(tmp_path / "conversations.jsonl")


def tiny_run(model_dir: Path, data: Path, out: Path, **flags) -> list[str]:
    """The command-line flags of a training run of seconds; keyword flags add to or override the defaults."""
    defaults = {"model_name_or_path": model_dir, "data_path": data, "output_dir": out, "model_max_length": 64,
                "lora_r": 2, "disable_tqdm": True}  # fmt: skip
    return [part for key, value in {**defaults, **flags}.items() for part in (f"--{key}", str(value))]


def module_env(**extra: str) -> dict[str, str]:
    """The environment of a command the tests launch; a crash in it prints every thread's Python stack."""
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONFAULTHANDLER": "1", **extra}


def start_module(module: str, *args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    """``python -m module args`` from the repository root, as a user runs it, without waiting."""
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True, **popen}
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env or module_env(), **popen)


def run_module(module: str, *args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m module args`` to its end (at most ``timeout`` seconds); stdout and stderr kept apart."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env or module_env(),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


TINY_RUN_RANK = 2


@pytest.fixture(scope="session")
def tiny_plora_run(tiny_model_dir, tmp_path_factory) -> Path:
    """Three stages of PLoRA (r = 2, momentum 0.3) on the tiny model: unloads at steps 2 and 4, then the final merge."""
    from fastchat_plora.train_plora import cli

    tmp = tmp_path_factory.mktemp("tiny_plora_run")
    data = write_conversations(tmp / "c.jsonl")
    out = tmp / "run"
    code = cli(tiny_run(tiny_model_dir, data, out, lora_r=TINY_RUN_RANK, unload_every_steps=2, max_steps=6,
                        unload_momentum=0.3, learning_rate=1e-2, save_strategy="no"))  # fmt: skip
    assert code == 0
    return out


@pytest.fixture(scope="session")
def tiny_model_dir_without_template(tmp_path_factory, tokenizer) -> Path:
    """A tiny random LLaMA whose tokenizer has no chat template, as LLaMA-7B's has none."""
    path = tmp_path_factory.mktemp("tiny_llama_no_template")
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(path)
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    bare.save_pretrained(path)
    for leftover in path.glob("chat_template.*"):  # what the embedded model's tokenizer files carried
        leftover.unlink()
    return path


def relative_update_difference(run: Path, reference: Path, base: Path) -> float:
    """max over weights of |W_run - W_ref| / |W_ref - W_0|: how far two runs' updates are apart."""
    ours, theirs, w0 = (load_file(str(p / "model.safetensors")) for p in (run, reference, base))
    worst = 0.0
    for name, weight in theirs.items():
        update = (weight.double() - w0[name].double()).norm()
        if update > 0:
            worst = max(worst, ((ours[name].double() - weight.double()).norm() / update).item())
    return worst
