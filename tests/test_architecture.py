"""The walls of docs/architecture.md, read from every module's imports; the core install without the demo extra."""

from __future__ import annotations

import ast
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tests.conftest import REPO, module_env, tiny_run

PACKAGE = "fastchat_plora"
TOOLS = {"analyze", "export"}


def package_imports(path: Path) -> set[str]:
    """The modules of the package (and `bench`) that a file imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == PACKAGE and len(parts) > 1:
                found.add(parts[1])
            elif parts[0] == "bench":
                found.add("bench")
    return found


def imports_of(module: str) -> set[str]:
    return package_imports(REPO / PACKAGE / f"{module}.py")


@pytest.mark.parametrize("module", ["plora", "rundir", "data", "models"])
def test_the_foundation_imports_nothing_of_the_package(module):
    assert imports_of(module) == set()


def test_data_sources_read_into_the_formatting_rooms_types_only():
    assert imports_of("sources") == {"data"}


def test_the_maths_and_its_access_know_only_each_other():
    assert imports_of("distributed") == {"plora"}
    assert imports_of("lora_dropout") == {"plora"}


@pytest.mark.parametrize("module", ["train_plora", "callback", "trainer", "args", "adapters", "checkpoint"])
def test_the_entry_point_and_the_glue_never_import_the_tools(module):
    assert not imports_of(module) & (TOOLS | {"bench"})


def test_the_config_module_finds_no_checkpoints_and_reads_no_deepspeed_files():
    assert not imports_of("args") & {"rundir", "checkpoint", "distributed"}


def test_the_callbacks_hold_no_trainer_and_the_trainer_no_unload_decisions():
    assert "trainer" not in imports_of("callback") and "callback" not in imports_of("trainer")


@pytest.mark.parametrize("folder", ["eval", "data_prep"])
def test_eval_and_data_prep_read_files_not_training_code(folder):
    for path in sorted((REPO / folder).rglob("*.py")):
        assert package_imports(path) == set(), path.relative_to(REPO)


def test_the_bench_uses_the_library_not_the_entry_point():
    for path in sorted((REPO / "bench").glob("*.py")):
        assert "train_plora" not in package_imports(path), path.name


DEMO_ONLY = ("gguf", "cmeel-mimalloc")


def test_the_core_install_needs_neither_the_gguf_reader_nor_mimalloc():
    requires = metadata.requires("fastchat-plora")  # what pip installs, from the installed package's metadata
    demo = [r for r in requires if r.startswith(DEMO_ONLY)]
    assert len(demo) == 2 and all('extra == "demo"' in r for r in demo), requires


BLOCKED = """
import sys
from importlib.abc import MetaPathFinder

class Blocked(MetaPathFinder):  # as if the demo extra were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("gguf", "cmeel_mimalloc", "mimalloc", "bench"):
            raise ModuleNotFoundError(name)

sys.meta_path.insert(0, Blocked())
from fastchat_plora.train_plora import cli
sys.exit(cli(sys.argv[1:]))
"""


def test_the_trainer_trains_without_the_demo_extra(tiny_model_dir, conversations_file, tmp_path):
    flags = tiny_run(tiny_model_dir, conversations_file, tmp_path / "run", unload_every_steps=1, max_steps=2)
    proc = subprocess.run([sys.executable, "-c", BLOCKED, *flags], cwd=REPO, env=module_env(), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "model.safetensors").is_file()
