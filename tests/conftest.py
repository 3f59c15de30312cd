"""Shared fixtures: where the repo and the face fixtures are, and one local Ray per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FACES = REPO.parent / "shared" / "fixtures" / "faces"
DEMO = REPO / "data" / "demo"

os.environ.setdefault("RAY_ACCEPT_CLUSTER_RESOURCE_WARNING", "1")


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    if not (FACES / "dev").is_dir():
        pytest.skip(f"face fixtures not found at {FACES} (the shared/ folder must sit beside the repo)")
    return FACES


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    return DEMO


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on shared cores: more threads only fight over them (modules opt in)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting one costs ~3 s and ~0.7 GB)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def run_demo(out: Path, port: int, *args: str):
    """``python -m examples.demo`` as ``make demo`` runs it, into ``out``."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "examples.demo", "--output", str(out), "--port", str(port), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="session")
def demo_port() -> int:
    from devtools.rehearsal.servers import free_port

    return free_port()  # every build of the session fetches from the same address, so final URLs match


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory, demo_port):
    """The demo corpus, built once per session (test_demo checks it, test_evaluate evaluates on
    its held-out identities): (output folder, stdout, stderr)."""
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = run_demo(out, demo_port, "--quiet")
    return out, proc.stdout, proc.stderr


# A whole tiny training run on synthetic shards (identities 3 and 6 held out), shared by
# test_trainer_train (outputs, resume, inference) and test_evaluate (a checkpoint to evaluate).
TINY_RUN = [
    "--config", "tiny",
    "--threads", "1",
    "--max-steps", "7",
    "--set", "data.num_workers=2",
    "--set", "data.batches_per_epoch=4",  # the run crosses epochs; the interruption falls mid-epoch
    "--set", "train.checkpoint_every=4",
    "--set", "train.validate_every=100",
    "--set", "train.val_identities=2",
    "--set", "train.val_inference_steps=2",
    "--set", "train.warmup_steps=2",
    "--set", "data.holdout_fraction=0.1",  # identities 3 and 6 of the fixture
]


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    from devtools.shards import synthetic_samples, write_shards

    folder = tmp_path_factory.mktemp("shards")
    write_shards(folder, synthetic_samples(8, 6, seed=5), identities_per_shard=2)
    return folder


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_shards):
    """(run folder, summary) of TINY_RUN on ``tiny_shards``, trained on one thread."""
    import torch

    from trainer.train import main

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on shared cores: more threads only fight over them
    try:
        out = tmp_path_factory.mktemp("full")
        summary = main([*TINY_RUN, "--shards", str(tiny_shards), "--output", str(out)])
    finally:
        torch.set_num_threads(before)
    return out, summary
