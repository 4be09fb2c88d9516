"""Shared fixtures: the real six-class CIFAR-100 folder, synthetic ones, and a small trained tree.

The session-scoped ones are built once for the whole run and shared between test files, so the tests
that use them only read them: nothing may write into these folders or change these models.
"""

import os
from pathlib import Path

import pytest
import torch
from reference import ORIGINAL_CLASSES, REPO_ROOT, SMALL_TREE, SMALL_TREE_CLASSES, SMALL_TREE_N_TEST, SMALL_TREE_N_TRAIN
from synthetic import make_synthetic

from branching.config.parse import parse_config
from branching.config.recipes import get_recipe
from branching.data.tree_data import load_tree_data
from branching.studies.probe import train_sources


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


# ---- the small two-level tree of reference.SMALL_TREE ----------------------------------------------

@pytest.fixture(scope="session")
def small_data_dir(tmp_path_factory) -> Path:
    """Synthetic data of the small tree's four classes (SMALL_TREE_N_TRAIN and _N_TEST images a class)."""
    return make_synthetic(tmp_path_factory.mktemp("small") / "c100", SMALL_TREE_CLASSES,
                          n_train=SMALL_TREE_N_TRAIN, n_test=SMALL_TREE_N_TEST)


@pytest.fixture(scope="session")
def small_tree_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("small-config") / "tree.toml"
    path.write_text(SMALL_TREE)
    return path


@pytest.fixture(scope="session")
def small_config():
    return parse_config(SMALL_TREE)


@pytest.fixture(scope="session")
def small_data(small_config, small_data_dir):
    return load_tree_data(small_config, small_data_dir)


@pytest.fixture(scope="session")
def small_trained(small_config, small_data) -> dict:
    """The small tree's parent and mammals (the branch water reads), one epoch each, seed 0; both frozen."""
    return train_sources(small_config, small_data, get_recipe("default", 1), seed=0, progress=False)


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: a torch thread pool only contends with other work on shared CPUs."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def private_cache(tmp_path, monkeypatch) -> Path:
    """An encodings and image cache of the test's own ($BRANCHING_CACHE), empty at its start."""
    monkeypatch.setenv("BRANCHING_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
