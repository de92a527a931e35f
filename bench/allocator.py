"""mimalloc for training on the CPU, where glibc's malloc holds on to memory training has freed.

On the CPU every activation is a malloc'd block. glibc serves blocks below a threshold from its
heap and raises that threshold (up to 32 MiB) each time a larger mmap'd block is freed, so after a
few steps most activations live in the heap, interleaved with the small tensors LoRA makes (each
adapted layer's rank-r output): freed activations leave holes that cannot go back to the system.
mimalloc keeps blocks of different sizes in separate pages. With it the embedded model's LoRA
step peaks well under full fine-tuning's; with glibc it does not (docs/performance.md).
GPU memory is the CUDA caching allocator's business and is not affected.

A process chooses its allocator when it starts, so this is used through ``LD_PRELOAD``:

    LD_PRELOAD=$(python -m bench.allocator) python -m fastchat_plora.train_plora ...

``eval "$(python -m bench.allocator --exports)"`` sets that and mimalloc's settings for a
shell (what `launch/` does with ``PLORA_ALLOCATOR=mimalloc``); the bench takes ``--allocator``.
mimalloc comes from PyPI as ``cmeel-mimalloc``, in the ``demo`` extra (`pip install -e '.[demo]'`),
which the quickstart installs.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from importlib import metadata

# Freed pages are kept for reuse instead of being returned after 10 ms (mimalloc's default):
# returning and faulting them in again cost a LoRA step 9% and a full one 18% in the bench (one run each).
MIMALLOC_ENV = {"MIMALLOC_PURGE_DELAY": "-1"}


def mimalloc_library() -> str | None:
    """Path of the installed libmimalloc.so, or None where cmeel-mimalloc is not installed."""
    try:
        files = metadata.files("cmeel-mimalloc") or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name.startswith("libmimalloc.so"):
            return str(file.locate())
    return None


def preload_env(allocator: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` (default: this process's) that starts children on ``allocator``."""
    env = dict(os.environ if env is None else env)
    if allocator == "system":
        return env
    if allocator != "mimalloc":
        raise ValueError(f"allocator={allocator!r}: expected system or mimalloc")
    library = mimalloc_library()
    if library is None:
        raise ValueError("allocator=mimalloc: cmeel-mimalloc is not installed (pip install -e '.[demo]')")
    env["LD_PRELOAD"] = ":".join(filter(None, [library, env.get("LD_PRELOAD")]))
    return {**env, **MIMALLOC_ENV}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print the path of libmimalloc.so, for LD_PRELOAD.")
    parser.add_argument("--exports", action="store_true", help="print shell export lines instead (for eval)")
    args = parser.parse_args(argv)
    try:
        env = preload_env("mimalloc", {"LD_PRELOAD": os.environ.get("LD_PRELOAD", "")})
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if args.exports:
        for key, value in env.items():
            print(f"export {key}={shlex.quote(value)}")
    else:
        print(mimalloc_library())


if __name__ == "__main__":
    main()
