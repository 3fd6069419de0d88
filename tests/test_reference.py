"""The numpy forward pass that stands in for a missing framework in `convert --verify`."""

import numpy as np
from support import random_file_tensors

from exchange import reference, torch_adapter
from frameworks import torch_mlp

# numpy and PyTorch both compute in float32; only summation order differs.
OUTPUT_TOLERANCE = 1e-6


def test_numpy_reference_matches_torch(architecture):
    tensors = random_file_tensors(architecture, seed=4)
    model = torch_mlp.TorchMLP(architecture)
    torch_adapter.set_tensors(model, tensors)
    inputs = np.random.default_rng(1).random((256, 784), dtype=np.float32)
    expected = torch_mlp.predict(model, inputs)
    (actual,) = reference.forward(architecture, tensors, [inputs])
    assert actual.dtype == np.float32
    assert np.max(np.abs(actual - expected)) <= OUTPUT_TOLERANCE
    assert np.ptp(actual) > 0.1, "outputs must vary for the comparison to mean anything"
