"""mimalloc is found, preloaded into child processes, and a bad allocator name is a clear error."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fastchat_plora.allocator import MIMALLOC_ENV, mimalloc_library, preload_env

SHOW_MALLOC = "print('libmimalloc' in open('/proc/self/maps').read())"
needs_mimalloc = pytest.mark.skipif(mimalloc_library() is None, reason="cmeel-mimalloc is not installed")


@needs_mimalloc
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and /proc are Linux's")
def test_children_start_on_mimalloc_only_when_asked():
    for allocator, expected in (("mimalloc", "True"), ("system", "False")):
        env = preload_env(allocator, {"PATH": "/usr/bin:/bin"})
        out = subprocess.run([sys.executable, "-c", SHOW_MALLOC], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected, allocator
    assert preload_env("mimalloc", {})["MIMALLOC_PURGE_DELAY"] == MIMALLOC_ENV["MIMALLOC_PURGE_DELAY"]


@needs_mimalloc
def test_an_existing_preload_is_kept():
    env = preload_env("mimalloc", {"LD_PRELOAD": "/opt/other.so"})
    assert env["LD_PRELOAD"] == f"{mimalloc_library()}:/opt/other.so"


def test_unknown_allocator_is_named():
    with pytest.raises(ValueError, match="allocator='tcmalloc'"):
        preload_env("tcmalloc")


def test_cli_prints_the_library_or_says_what_to_install():
    proc = subprocess.run([sys.executable, "-m", "fastchat_plora.allocator"], capture_output=True, text=True)
    if mimalloc_library() is None:
        assert proc.returncode == 1 and "pip install cmeel-mimalloc" in proc.stderr
    else:
        assert proc.returncode == 0 and proc.stdout.strip() == mimalloc_library()
