"""Models with large activations and the child process that measures one forward pass's peak
memory (torch's allocator is invisible to tracemalloc): used by tests/test_memory.py and
`scripts/bench_convert.py --memory`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
from kerasmodels import random_torch_state
from support import ROOT

from exchange import codegen, keras_adapter

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
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                FORWARD_CHILD,
                str(graph_path),
                str(weights_path),
                "-" if code_path is None else str(code_path),
                str(rows),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
        )
        for graph_path, weights_path, code_path in models
    ]
    results = []
    for child in children:
        stdout, stderr = child.communicate(timeout=300)
        assert child.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def branches(size: int = 8, channels: int = 2, count: int = 3) -> keras.Model:
    """`count` convolutions of the same input, added: all their outputs are alive at the Add."""
    inputs = keras.Input((size, size, 8), name="image")
    x = keras.layers.Add(name="add")(
        [keras.layers.Conv2D(channels, 3, padding="same", name=f"branch_{index}")(inputs) for index in range(count)]
    )
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D(name="pool")(x), name="branches")
