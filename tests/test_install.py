"""The version floors of pyproject.toml install together and run: tests/floors.sh in a fresh venv."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.conftest import REPO


def pins(text: str) -> dict[str, str]:
    """The ``name==version`` lines of ``text``, names normalised as pip lists them (lm-eval -> lm_eval)."""
    found = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", text, flags=re.M)
    return {name.lower().replace("-", "_"): version for name, version in found}


@pytest.mark.slow
def test_the_floors_install_together_load_every_config_and_pass_the_core_cpu_tests(tmp_path):
    """About five minutes: pip resolves from the package index, then the config check and 100 tests."""
    run = subprocess.run(
        ["bash", "tests/floors.sh", str(tmp_path / "venv")], cwd=REPO, capture_output=True, text=True, timeout=1800
    )
    log = "\n".join(line for line in (run.stdout + run.stderr).splitlines() if "is ignored" not in line)
    assert run.returncode == 0, log[-4000:]
    installed = pins(log)  # floors.sh lists what the floors resolved to
    for name, version in pins((REPO / "constraints" / "floors.txt").read_text()).items():
        assert installed.get(name) == version, f"{name}: floors.txt pins {version}, the venv has {installed.get(name)}"
    shipped = len(list((REPO / "configs").glob("*/*.yaml")))
    assert f"{shipped} config(s) valid" in log
