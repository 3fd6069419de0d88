"""Shared fixtures: real MNIST (through $MNIST_DIR) and architectures to parametrize over."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from support import ROOT  # tests/ is on sys.path: pytest puts a conftest's folder there

sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from exchange.graph import Graph, dense_chain
from frameworks.recipe import SEED_ARCHITECTURE

# Architectures every exchange test runs over: the seed's, and a Dense stack with other sizes,
# other activations and a layer without bias (its own key set).
OTHER_ARCHITECTURE = dense_chain("other", 784, [(64, "relu"), (32, "sigmoid", False), (32, "linear"), (10, "softmax")])
ARCHITECTURES = {"seed": SEED_ARCHITECTURE, "other": OTHER_ARCHITECTURE}


@pytest.fixture(scope="session")
def mnist():
    """Real MNIST from $MNIST_DIR; skipped when absent unless MNIST_REQUIRED=1 (CI) fails it."""
    from frameworks.mnist import load_folder

    folder = os.environ.get("MNIST_DIR")
    if not folder or not Path(folder).is_dir():
        message = f"MNIST not found: set MNIST_DIR to the folder of IDX files (got {folder!r})"
        if os.environ.get("MNIST_REQUIRED") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return load_folder(folder)


@pytest.fixture(params=sorted(ARCHITECTURES), ids=sorted(ARCHITECTURES))
def architecture(request) -> Graph:
    return ARCHITECTURES[request.param]
