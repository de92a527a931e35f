"""Whether this user can log to Weights & Biases, from the environment and ~/.netrc alone.

Apart from `tracking.py` because the launch scripts ask it before every job (their REPORT_TO default),
and that module's transformers import would add seconds to each start; this one imports the stdlib only.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
from pathlib import Path
from urllib.parse import urlsplit


def wandb_server():
    """The W&B server's URL, split: WANDB_BASE_URL, default api.wandb.ai."""
    return urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")


def has_api_key() -> bool:
    """A W&B API key: WANDB_API_KEY, or the entry for the server that `wandb login` writes into ~/.netrc
    (or the file NETRC names)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        return path.is_file() and netrc.netrc(path).authenticators(wandb_server().hostname) is not None
    except (netrc.NetrcParseError, OSError):
        return False


def default_report_to() -> str:
    """What the launch scripts log to unless told (REPORT_TO): wandb where the wandb package and a key are
    here, else nothing (a run never asks for a login)."""
    return "wandb" if has_api_key() and importlib.util.find_spec("wandb") is not None else ""


if __name__ == "__main__":  # the launch scripts' REPORT_TO default
    print(default_report_to())
