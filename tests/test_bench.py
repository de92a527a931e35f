"""The benchmark runs every mode and prints the ratios; mimalloc is found, preloaded into child
processes, and a bad allocator name is a clear error."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.allocator import MIMALLOC_ENV, mimalloc_library, preload_env
from tests.conftest import run_module

SHOW_MALLOC = "print('libmimalloc' in open('/proc/self/maps').read())"
needs_mimalloc = pytest.mark.skipif(mimalloc_library() is None, reason="cmeel-mimalloc is not installed")


def test_bench_runs_on_random_tokens_and_prints_the_ratios(tiny_model_dir):
    proc = run_module("bench.speed", "--model_name_or_path", str(tiny_model_dir), "--random_tokens", "24",
                      "--steps", "4", "--batch_size", "2", "--repeats", "1", "--modes", "baseline,lora,plora,full",
                      "--unload_every_steps", "2", "--unload_repeats", "1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "random tokens x 24" in proc.stdout
    for line in ("lora/baseline tokens_per_s", "plora/lora peak_rss_mib", "lora/full peak_rss_mib", "one unload"):
        assert line in proc.stdout


@needs_mimalloc
def test_bench_runs_every_mode_on_mimalloc_when_asked(tiny_model_dir):
    proc = run_module("bench.speed", "--model_name_or_path", str(tiny_model_dir), "--random_tokens", "16",
                      "--steps", "2", "--batch_size", "2", "--repeats", "1", "--modes", "lora",
                      "--allocator", "mimalloc")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "malloc mimalloc," in proc.stdout  # read from the run's own memory map


def test_bench_needs_exactly_one_data_source():
    proc = run_module("bench.speed")
    assert proc.returncode == 2 and "exactly one of --data_path and --random_tokens" in proc.stderr


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
    proc = run_module("bench.allocator")
    if mimalloc_library() is None:
        assert proc.returncode == 1 and "pip install -e '.[demo]'" in proc.stderr
    else:
        assert proc.returncode == 0 and proc.stdout.strip() == mimalloc_library()


@pytest.mark.slow
def test_memory_estimate_agrees_with_the_measured_cpu_peak():
    """PLoRA r 8 on a tiny LLaMA, fp32 on the CPU, 8 x 512 random tokens, an unload inside the measured steps."""
    from bench.memory import Run, estimate, load_config, measure

    run = Run(config=load_config("tiny-llama"), finetune_mode="plora", lora_r=8, batch=8, length=512, gpus=1,
              weights_dtype="fp32", compute="fp32", device="cpu")  # fmt: skip
    measured, estimated = measure(run), sum(estimate(run, "single").values())
    assert abs(estimated / measured - 1) < 0.2, (estimated, measured)


def test_the_activation_table_is_what_calibration_measures():
    from bench.memory import ACTIVATIONS, calibrate

    assert calibrate("fp32", "fp32", "adapters") == pytest.approx(ACTIVATIONS[("fp32", "fp32", "adapters")])


def test_memory_table_for_7b_has_every_strategy_and_the_batch_that_fits(capsys):
    from bench.memory import main

    assert main(["--model", "llama-7b", "--finetune_mode", "plora", "--lora_r", "8", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "| part (GiB per GPU) | ddp | zero2 | zero3 |" in out and "| largest batch on 80 GiB |" in out
    for part in ("weights", "trainable + AdamW", "compensation", "activations", "head + loss", "workspace"):
        assert f"| {part} |" in out
    ddp = float(out.split("| weights | ")[1].split(" |")[0])
    assert ddp == pytest.approx(6.74e9 * 2 / 2**30, rel=0.01)  # LLaMA-7B's 6.74B weights in bf16


def test_memory_refuses_a_bad_value_in_one_line(capsys):
    from bench.memory import main

    assert main(["--model", "llama-7b", "--gpus", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: gpus=0: must be positive"
