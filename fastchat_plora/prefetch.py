"""Put a hub model into HF_HOME's cache, for nodes without internet (OFFLINE=1 in the launch scripts).

    HF_HOME=/shared/hf python -m fastchat_plora.prefetch huggyllama/llama-7b [--revision REV]

Run it once on a machine with internet and the same HF_HOME as the jobs (a shared filesystem). Only
what loading needs comes down: the config, the tokenizer and the weights as safetensors where the
repository has them (else its PyTorch .bin files), not its other formats.
"""

from __future__ import annotations

import argparse
import sys

WANTED = ["*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja"]  # config, tokenizer, generation config


def weight_patterns(files: list[str]) -> list[str]:
    """safetensors where the repository has them, else PyTorch .bin: never both."""
    if any(name.endswith(".safetensors") for name in files):
        return ["*.safetensors"]
    return ["*.bin"]


def prefetch(model: str, revision: str | None = None) -> str:
    """Download `model`'s loading files into the hub cache; return the snapshot folder."""
    from huggingface_hub import list_repo_files, snapshot_download

    files = list_repo_files(model, revision=revision)
    return snapshot_download(model, revision=revision, allow_patterns=WANTED + weight_patterns(files))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("model", help="a hub model id, e.g. huggyllama/llama-7b")
    parser.add_argument("--revision", default=None, help="a branch, tag or commit (default: main)")
    args = parser.parse_args(argv)
    try:
        path = prefetch(args.model, args.revision)
    except Exception as e:  # the hub's errors (unknown repo, gated, no network) as one line
        print(f"error: model {args.model}: {type(e).__name__}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"{args.model} is in the cache: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
