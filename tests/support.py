"""Framework-free test helpers: the repository root and random weights in file layout."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from exchange.graph import Graph

ROOT = Path(__file__).resolve().parent.parent


def random_file_tensors(architecture: Graph, seed: int = 1):
    """Random weights in file layout, big enough that activations leave their linear range."""
    import numpy as np

    generator = np.random.default_rng(seed)
    return {
        key: (generator.standard_normal(shape) * 0.2).astype(np.float32)
        for key, shape in architecture.tensor_shapes().items()
    }
