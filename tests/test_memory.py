"""Peak memory, measured in child processes (torch's allocator is invisible to tracemalloc).

The generated `forward` frees each intermediate after its last use, as the fx module does: on a
chain of convolutions with large activations its peak stays within 1.2x of the fx module's on
the same batch (before, it kept every activation until it returned). `measure_forward` is also
what `scripts/bench_convert.py --memory` runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from conftest import ROOT
from exchange import chunking, codegen, keras_adapter
from kerasmodels import random_torch_state

GENERATED_PEAK_RATIO = 1.2   # the generated module's added peak against the fx module's
# glibc serves blocks of 1 MiB and more by mmap and unmaps them when freed, so the RSS follows the
# live tensors. (By default its threshold rises with each large block freed, up to 32 MiB: below
# that, freed activations stay in the heap and the peak of one run varies by several of them.)
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}

# Runs in a fresh interpreter: builds one module (the fx module, or the generated code loading the
# same weights), makes the batch, then runs `forward` once; prints the resident memory it added
# (the peak RSS, /proc's VmHWM, minus the RSS just before the forward pass) and the output's sum.
FORWARD_CHILD = r"""
import json, sys
import numpy as np, torch
torch.set_num_threads(1)
from exchange.graph import Graph
from exchange import torch_adapter
graph_path, weights_path, code_path, rows = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
graph = Graph.from_json(open(graph_path).read())
state = {key: torch.from_numpy(value) for key, value in np.load(weights_path).items()}
if code_path == "-":
    model = torch_adapter.model_from_tensors(graph, {key: value.numpy() for key, value in state.items()})
else:
    import importlib.util
    spec = importlib.util.spec_from_file_location("generated", code_path)
    generated = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generated)
    model = getattr(generated, torch_adapter.class_name(graph.name))()
    model.load_state_dict(state, strict=True)
model.eval()
generator = torch.Generator().manual_seed(0)
inputs = [torch.rand((rows, spec.shape[-1], *spec.shape[:-1]) if len(spec.shape) > 1 else (rows, *spec.shape),
                     generator=generator) for spec in graph.inputs]
def rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
before = rss_kib("VmRSS")
with torch.no_grad():
    output = model(*inputs)
peak = rss_kib("VmHWM")   # not ru_maxrss: Linux carries that over from the parent across exec
print(json.dumps({"added_mib": (peak - before) / 1024, "before_mib": before / 1024,
                  "checksum": float(output.double().sum())}))
"""


def conv_chain(size: int = 256, channels: int = 32, layers: int = 6) -> keras.Model:
    """Convolutions whose every activation is `size * size * channels` values per row."""
    inputs = keras.Input((size, size, 3), name="image")
    x = inputs
    for index in range(layers):
        x = keras.layers.Conv2D(channels, 3, padding="same", activation="relu", name=f"conv_{index}")(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D(name="pool")(x), name="conv_chain")


def write_model(folder: Path, model: keras.Model, seed: int = 0) -> tuple[Path, Path, Path]:
    """The graph (JSON), a random state_dict (`.npz`) and the generated code of `model`."""
    graph = keras_adapter.architecture_of(model)
    graph_path, weights_path, code_path = folder / "graph.json", folder / "state.npz", folder / "generated.py"
    graph_path.write_text(graph.to_json())
    np.savez(weights_path, **random_torch_state(graph, seed))
    code_path.write_text(codegen.generate(graph, "generated.safetensors", "model.keras"))
    return graph_path, weights_path, code_path


def measure_forward(graph_path: Path, weights_path: Path, code_path: Path | None, rows: int) -> dict:
    """Run FORWARD_CHILD on the fx module (`code_path` None) or the generated code."""
    return measure_forwards([(graph_path, weights_path, code_path)], rows)[0]


def measure_forwards(models: list[tuple[Path, Path, Path | None]], rows: int) -> list[dict]:
    """FORWARD_CHILD for each (graph, weights, code or None), the children side by side: each
    measures its own peak, so running together costs the wall time of one."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **STEADY_MALLOC}
    children = [subprocess.Popen([sys.executable, "-c", FORWARD_CHILD, str(graph_path), str(weights_path),
                                  "-" if code_path is None else str(code_path), str(rows)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
                for graph_path, weights_path, code_path in models]
    results = []
    for child in children:
        stdout, stderr = child.communicate(timeout=300)
        assert child.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


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


def branches(size: int = 8, channels: int = 2, count: int = 3) -> keras.Model:
    """`count` convolutions of the same input, added: all their outputs are alive at the Add."""
    inputs = keras.Input((size, size, 8), name="image")
    x = keras.layers.Add(name="add")([keras.layers.Conv2D(channels, 3, padding="same", name=f"branch_{index}")(inputs)
                                      for index in range(count)])
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D(name="pool")(x), name="branches")


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
    assert str(err.value) == (f"{tmp_path / 'm.keras'}: --verify refused: one sample holds 1,024 values at once "
                              "(at 'add'), 0.0 MiB at 8 bytes a value, more than the 0 MiB --verify gives one "
                              "chunk of rows")
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
    print(f"--verify child: {result.child_peak_mib:.0f} MiB peak, {added:.0f} MiB above its imports, "
          f"on {result.inputs}")
    assert result.child_imports_mib > 0
    assert added <= (chunking.VERIFY_MEMORY + WEIGHT_COPIES * weight_bytes(graph)) / (1 << 20)
