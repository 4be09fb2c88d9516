"""Shared fixtures: the real six-class CIFAR-100 folder and a synthetic one."""

import os
from pathlib import Path

import pytest

from branching.data import make_synthetic

REPO_ROOT = Path(__file__).resolve().parents[1]
ORIGINAL_CLASSES = ["sunflower", "poppy", "tulip", "crab", "aquarium_fish", "shark"]


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """Real CIFAR-100 files of six classes; fail in CI if missing, skip elsewhere."""
    path = Path(os.environ.get("BRANCHING_REAL_DATA") or REPO_ROOT / ".." / "shared" / "data" / "cifar100-6")
    if not all((path / name).is_file() for name in ("train", "test", "meta")):
        message = f"real CIFAR-100 data not found in {path} (set BRANCHING_REAL_DATA)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path.resolve()


@pytest.fixture(scope="session")
def synthetic_c10(tmp_path_factory) -> Path:
    """Synthetic data in the official format for the original study's six classes."""
    return make_synthetic(tmp_path_factory.mktemp("synthetic") / "cifar-100-python", ORIGINAL_CLASSES)
