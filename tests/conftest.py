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


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting one costs ~3 s and ~0.7 GB)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
