"""Peak memory, measured in child processes (torch's allocator is invisible to tracemalloc).

The generated `forward` frees each intermediate after its last use, as the fx module does: on a
chain of convolutions with large activations its peak stays within 1.2x of the fx module's on
the same batch (before, it kept every activation until it returned). The models and the
measuring child are in tests/memory_models.py (also what `scripts/bench_convert.py --memory` runs).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from kerasmodels import random_torch_state
from memory_models import branches, conv_chain, measure_forwards, write_model

from exchange import chunking, keras_adapter

GENERATED_PEAK_RATIO = 1.2  # the generated module's added peak against the fx module's


def test_generated_forward_frees_intermediates_as_the_fx_module_does(tmp_path):
    """6 convolutions + ReLU at 128x128x32, 4 rows: 8 MiB per activation, 12 of them. Measured:
    the fx module adds 31.8 MiB, the generated code 31.9 MiB (before: 105 MiB, every activation
    kept until `forward` returned)."""
    keras.utils.set_random_seed(0)
    paths = write_model(tmp_path, conv_chain(size=128))
    fx, generated = measure_forwards([(*paths[:2], None), paths], rows=4)
    print(f"added peak RSS: fx module {fx['added_mib']:.1f} MiB, generated code {generated['added_mib']:.1f} MiB")
    assert generated["checksum"] == fx["checksum"]
    assert generated["added_mib"] <= GENERATED_PEAK_RATIO * fx["added_mib"]


def test_live_values_per_row_follow_the_last_reader():
    """A chain holds a layer's input and output; parallel branches all stay alive until the Add."""
    chain = keras_adapter.architecture_of(conv_chain(size=10, channels=4, layers=3))
    # the input (10*10*3) is held throughout; a layer's input and output (10*10*4) are alive together
    assert chunking.live_values_per_row(chain) == (300 + 2 * 400, "conv_1")
    graph = keras_adapter.architecture_of(branches(size=8, channels=2, count=3))
    assert chunking.live_values_per_row(graph) == (512 + 4 * 128, "add")


def test_predict_in_chunks_computes_the_same_outputs(monkeypatch):
    """Rows in chunks of 3 (a small CHUNK_BYTES), the last one shorter: the outputs of one pass."""
    from exchange import torch_adapter

    keras.utils.set_random_seed(1)
    graph = keras_adapter.architecture_of(branches(size=8, channels=2, count=3))
    model = torch_adapter.model_from_tensors(graph, random_torch_state(graph, 3))
    inputs = [np.random.default_rng(0).random((10, 8, 8, 8), dtype=np.float32)]
    whole = torch_adapter.predict(model, inputs)
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 3 * chunking.BYTES_PER_VALUE * 1024)
    assert chunking.chunk_rows(graph, inputs) == 3
    calls = []

    def predict(model, arrays):
        calls.append(len(arrays[0]))
        return torch_adapter.predict(model, arrays)

    chunked = chunking.predict_in_chunks(predict, model, graph, inputs)
    assert calls == [3, 3, 3, 1]
    assert chunked[0].shape == whole[0].shape and np.max(np.abs(chunked[0] - whole[0])) <= 1e-6


def test_a_row_larger_than_a_chunk_is_refused_in_one_line(monkeypatch, tmp_path):
    from exchange.errors import ExchangeFileError
    from exchange.verify import verify

    graph = keras_adapter.architecture_of(branches(size=8, channels=2, count=3))
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 1 << 10)
    with pytest.raises(ExchangeFileError) as err:
        verify(tmp_path / "m.keras", tmp_path / "m.safetensors", graph, None, 1e-5)
    assert str(err.value) == (
        f"{tmp_path / 'm.keras'}: --verify refused: one sample holds 1,024 values at once "
        "(at 'add'), 0.0 MiB at 8 bytes a value, more than the 0 MiB --verify gives one "
        "chunk of rows"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_verify_peak_is_bounded_on_large_activations(tmp_path):
    """12 parallel convolutions of a 96x96 input, read as generated code (which held every tensor
    before): the --verify child's peak RSS stays within VERIFY_MEMORY of its imports and weights.
    Measured: 108 rows in chunks of 16, 1,073 MiB with the imports' 716 (3,112 MiB before)."""
    from exchange import cli
    from exchange.verify import WEIGHT_COPIES, weight_bytes

    keras.utils.set_random_seed(0)
    keras_path = tmp_path / "branches.keras"
    branches(size=96, channels=16, count=12).save(keras_path)
    graph = cli.convert(keras_path, tmp_path / "branches.py")
    result = cli.verify(keras_path, tmp_path / "branches.py", graph, None, 1e-4)
    added = result.child_peak_mib - result.child_imports_mib
    print(
        f"--verify child: {result.child_peak_mib:.0f} MiB peak, {added:.0f} MiB above its imports, on {result.inputs}"
    )
    assert result.child_imports_mib > 0
    assert added <= (chunking.VERIFY_MEMORY + WEIGHT_COPIES * weight_bytes(graph)) / (1 << 20)
