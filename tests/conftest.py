"""Shared fixtures. Ray-based tests share one local Ray cluster per session (see ray_cluster)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A developer's exported MLflow server is ralflow's default store: keep the tests (and the CLIs
# they start) on the stores they name or their own working directory.
os.environ.pop("MLFLOW_TRACKING_URI", None)
RALFLOW = str(Path(sys.executable).with_name("ralflow"))


def run_cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600, module: str | None = None
):
    """Run ``ralflow ARGS`` (or ``python -m MODULE ARGS``) in a fresh process; return the result."""
    cmd = [sys.executable, "-m", module, *args] if module else [RALFLOW, *args]
    # The session's RAY_ADDRESS names the test cluster for its own processes; a CLI joins it only
    # when a test passes --address, otherwise it starts its own Ray like a user's would.
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | (env or {})
    return subprocess.run(cmd, cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def default_sigint() -> None:
    """preexec_fn for children a test interrupts with SIGINT: a runner started in the background
    (CI scripts, `cmd &`) passes on SIGINT ignored, and the child would never see it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def ray_address():
    """One local Ray cluster for the whole test session; subprocesses join it with --address."""
    import ray

    from components.runtime import start_local_ray

    address = start_local_ray(num_cpus=2, logging_level="ERROR", log_to_driver=False)
    yield address
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A tiny prepared synthetic CXR-LT dataset shared by the training/tuning/prediction tests."""
    from components.data.prepare import PrepareOptions, prepare_dataset
    from components.data.synth import SynthOptions, write_synthetic_cxr_lt

    root = tmp_path_factory.mktemp("tiny")
    write_synthetic_cxr_lt(
        root / "src", SynthOptions(num_images=480, image_size=64, seed=10, val_fraction=0.3), progress=None
    )
    prepare_dataset(
        PrepareOptions("cxr-lt-2023", str(root / "src"), image_size=40, rows_per_shard=128),
        root / "data",
        log=lambda *_: None,
    )
    return root / "data"
