"""A real SLURM on this machine for the launch tests: start it, submit launch/slurm.sbatch, watch jobs.

`tests/slurm/start.sh` brings up munged, slurmctld and one slurmd (or two, as nodes n1 and n2, with
`slurm-2nodes.conf`) with every file under a temporary directory; `stop.sh` stops them by pid.
Without SLURM installed the tests are skipped, except in CI (`CI` set), where `.ci/run` installs it
and a missing SLURM is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import REPO

HERE = Path(__file__).resolve().parent / "slurm"
DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch")


def require_slurm() -> None:
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"SLURM is not installed ({', '.join(missing)} missing); .ci/run installs it")
        install = "apt-get install -y slurmctld slurmd slurm-client munge"
        pytest.skip(f"SLURM is not installed ({', '.join(missing)}): {install}")
    if os.geteuid() != 0:
        pytest.skip("the single-host SLURM runs its daemons as root")


@contextmanager
def cluster(directory: Path, conf: str = "slurm.conf") -> Iterator[dict[str, str]]:
    """A running SLURM; yields the environment that reaches it."""
    require_slurm()
    env = {**os.environ, "PATH": f"/usr/sbin:{os.environ['PATH']}"}
    started = subprocess.run(["bash", str(HERE / "start.sh"), str(directory), str(HERE / conf)], env=env,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    try:
        assert started.returncode == 0, started.stderr + started.stdout
        env["SLURM_CONF"] = str(directory / "slurm.conf")
        yield env
    finally:
        subprocess.run(["bash", str(HERE / "stop.sh"), str(directory)], env=env, capture_output=True, timeout=60)


class Jobs:
    """Submit launch/slurm.sbatch from a work directory and follow its jobs."""

    def __init__(self, env: dict[str, str], workdir: Path):
        self.env, self.workdir = env, workdir
        (workdir / "logs").mkdir(parents=True, exist_ok=True)
        setup = workdir / "env_setup.sh"  # what a user's ENV_SETUP does: activate the environment
        setup.write_text(f"source {REPO / '.venv' / 'bin' / 'activate'}\nexport PYTHONPATH={REPO}\n")
        self.setup = setup

    def submit(self, *sbatch_flags: str, train_flags: tuple[str, ...] = (), **knobs: str) -> int:
        env = {**self.env, "REPO": str(REPO), "ENV_SETUP": str(self.setup), "PYTHON": "python", **knobs}
        command = ["sbatch", "--parsable", *sbatch_flags, str(REPO / "launch" / "slurm.sbatch"), *train_flags]
        done = subprocess.run(command, cwd=self.workdir, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return int(done.stdout.strip().split(";")[0])

    def preempt(self, job: int) -> None:
        """SIGTERM to the batch script, as SLURM's early warning (--signal=B:TERM@300) delivers it."""
        done = subprocess.run(["scancel", "--signal=TERM", "--batch", str(job)], env=self.env, capture_output=True,
                              text=True, timeout=30)  # fmt: skip
        assert done.returncode == 0, done.stderr

    def show(self, job: int) -> dict[str, str]:
        out = subprocess.run(["scontrol", "show", "job", str(job), "-o"], env=self.env, capture_output=True,
                             text=True, timeout=30).stdout  # fmt: skip
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def log(self, job: int) -> Path:
        return self.workdir / "logs" / f"plora-{job}.out"

    def wait_for_line(self, job: int, text: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log(job).is_file() and text in self.log(job).read_text(errors="replace"):
                return
            state = self.show(job).get("JobState")
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
                pytest.fail(f"job {job} ended ({state}) before printing {text!r}:\n{self.tail(job)}")
            time.sleep(0.2)
        pytest.fail(f"job {job} did not print {text!r} within {timeout} s:\n{self.tail(job)}")

    def wait_until_done(self, job: int, timeout: float = 600) -> str:
        """Poll (sbatch --wait polls at 2, 10, 42 s...) until the job has ended; its final state.

        A requeued job starts again once its old credential has expired (cred_expire=10 s here,
        about 12 s in all). Forcing it sooner (`scontrol update StartTime=now`) gets it killed as
        "non-startable: Job credential revoked".
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.show(job)
            state = info.get("JobState")
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return state
            time.sleep(0.2)
        pytest.fail(f"job {job} did not end within {timeout} s:\n{self.tail(job)}")

    def tail(self, job: int) -> str:
        return self.log(job).read_text(errors="replace")[-3000:] if self.log(job).is_file() else "(no log)"


def write_config(path: Path, model_dir: Path, data: Path, **settings) -> Path:
    """A tiny PLoRA run as a config file, the way a user hands one to the launch scripts."""
    values = {"model_name_or_path": str(model_dir), "data_path": str(data), "finetune_mode": "plora", "lora_r": 2,
              "unload_every_steps": 4, "unload_momentum": 0.1, "learning_rate": 1.0e-2, "model_max_length": 64,
              "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True, "use_cpu": True, "report_to": "none",
              **settings}  # fmt: skip
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in values.items()))  # JSON is YAML
    return path
