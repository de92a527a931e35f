"""What a job needs before it queues: the launch scripts run this on the login node (and DRY_RUN runs it).

    python -m fastchat_plora.preflight CONFIG [CONFIG ...] [-- TRAINING FLAGS]

For each config, with the flags the job will add: every key and value valid (as `fastchat_plora.args`
checks them), every local data file there, and, on nodes without internet (HF_HUB_OFFLINE=1), the model
already in HF_HOME's cache. Each failure is one line naming the bad value and the fix; exit 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fastchat_plora.args import ConfigError, check_configs
from fastchat_plora.sources import HUB_PREFIX, Source

MIX_COMMAND = "python -m data_prep.build_mix --output_dir data/mix"


def check_data(data_args) -> None:
    """Every local file of data_path, eval_data_path and sample_prompts_file exists (hub: sources are fetched)."""
    entries = [*(data_args.data_path or []), *(data_args.eval_data_path or [])]
    locations = [Source.parse(entry).location for entry in entries]
    if data_args.sample_prompts_file:
        locations.append(data_args.sample_prompts_file)
    for location in locations:
        if not location.startswith(HUB_PREFIX) and not Path(location).exists():
            hint = f"; the paper's mix: {MIX_COMMAND}" if location.endswith("mix.jsonl") else ""
            raise ConfigError(f"data file {location}: no such file (relative to {os.getcwd()}){hint}")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_model(model_args) -> None:
    """Offline, a hub model must be in HF_HOME's cache already (a local path or the embedded model always is)."""
    name = model_args.model_name_or_path
    if not offline() or name is None or name.endswith(".gguf") or Path(name).expanduser().exists():
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise ConfigError(
            f"model {name} is not in the hub cache {constants.HF_HUB_CACHE} and this node is offline: "
            f"fetch it from a node with internet, with the same HF_HOME: python -m fastchat_plora.prefetch {name}"
        )


def preflight(configs: list[str], flags: list[str]) -> None:
    """Check each config as its job would run it, with `flags` after it; raise ConfigError."""
    for model_args, data_args, *_ in check_configs(configs, flags):
        check_data(data_args)
        check_model(model_args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    configs, flags = argv[:split], argv[split + 1 :]
    if not configs:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    try:
        preflight(configs, flags)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(configs)} config(s) ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
