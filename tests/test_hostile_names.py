"""Names from a file are data: no name runs code in generated PyTorch source, and no name changes
what a model computes (Python reads identifiers through NFKC, so `ﬁx` would be `fix`).

Each hostile name is put in one place of a format-2 `.safetensors` (the model name, an input, a
layer, the input file's own name, the output's name), converted to `.py` by the real entry point,
and the generated module is imported and run in a fresh process with a marker file that any
injected code would create. Its outputs must be the numpy forward pass of the file's own weights.
Names that the graph refuses (line breaks, NUL, lone surrogates) are in the corpus
(`tests/hostile.py`); here are the names that are valid but odd.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support import ROOT

from exchange import fileformat, reference
from exchange.graph import Graph

OUTPUT_TOLERANCE = 1e-6  # float32 rounding between numpy and torch on three small Dense layers

# Each would have broken out of a docstring, a string literal or a comment, or become another name.
# MARKER is the relative path `pwned`: the conversion and the import run in the test's folder.
PAYLOADS = {
    "docstring close": 'm"""; import pathlib; pathlib.Path("pwned").touch(); """',
    "single quotes": "m'''; import pathlib; pathlib.Path('pwned').touch(); '''",
    "string escape": "m\\N{x}\\",
    "comment": "m # import pathlib",
    "ligature (NFKC fi)": "\ufb01x",
    "fullwidth forward": "\uff46orward",
    "not an identifier": "a\u00bd",
    "reserved": "load_state_dict",
}


def _seed_graph(model="mlp", input_name="x", layer="dense_1") -> Graph:
    description = {
        "name": model,
        "inputs": [{"name": input_name, "shape": [6], "dtype": "float32"}],
        "nodes": [
            {
                "name": name,
                "kind": "dense",
                "inputs": [source],
                "dtype": "float32",
                "config": {"units": units, "activation": activation, "use_bias": True},
            }
            for name, source, units, activation in (
                ("dense_0", input_name, 5, "tanh"),
                (layer, "dense_0", 4, "tanh"),
                ("dense_2", layer, 3, "softmax"),
            )
        ],
        "outputs": ["dense_2"],
    }
    return Graph.from_dict(description)


def _random_tensors(graph: Graph, seed: int = 0) -> dict:
    generator = np.random.default_rng(seed)
    return {key: generator.standard_normal(shape).astype(dtype) for key, (shape, dtype) in graph.tensor_specs.items()}


RUN_GENERATED = """
import importlib.util, json, sys
import numpy as np
code, weights, inputs, outputs, class_name = sys.argv[1:]
spec = importlib.util.spec_from_file_location("generated", code)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
model = getattr(module, class_name)()
model.load_state_dict(module.load(weights), strict=True)
model.eval()
import torch
with torch.no_grad():
    np.save(outputs, model(torch.from_numpy(np.load(inputs))).numpy())
"""


def _convert_and_run(graph: Graph, tensors: dict, folder: Path, source_name: str, output_name: str) -> np.ndarray:
    from exchange.torch_adapter import class_name

    source = folder / source_name
    fileformat.save(source, graph, tensors, "torch")
    output = folder / output_name
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/convert.py"), str(source), str(output)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=folder,
    )
    assert result.returncode == 0, result.stderr
    inputs = np.random.default_rng(1).standard_normal((7, 6)).astype(np.float32)
    np.save(folder / "inputs.npy", inputs)
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            RUN_GENERATED,
            str(output),
            str(output.with_suffix(".safetensors")),
            str(folder / "inputs.npy"),
            str(folder / "outputs.npy"),
            class_name(graph.name),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=folder,
    )
    assert run.returncode == 0, run.stderr
    expected = reference.forward(graph, tensors, [inputs])[0]
    actual = np.load(folder / "outputs.npy")
    assert np.max(np.abs(actual - expected)) <= OUTPUT_TOLERANCE
    return actual


# Each payload costs a conversion and a run of the generated code (~5 s): four run by default, the
# rest with -m slow (one escaping rule, `codegen.quoted`, serves them all).
SLOW_PAYLOADS = {"string escape", "comment", "fullwidth forward", "not an identifier"}


@pytest.mark.parametrize(
    "payload", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_PAYLOADS else name for name in PAYLOADS]
)
def test_hostile_name_neither_runs_nor_changes_the_model(tmp_path, payload):
    """The payload is the model's name, the input's, a layer's (and, plus `2`, another's), and
    the input and output files' names, all at once."""
    name = PAYLOADS[payload]
    graph = _seed_graph(model=name, input_name=name, layer=name + "2")
    _convert_and_run(graph, _random_tensors(graph), tmp_path, name + ".safetensors", name + "_out.py")
    assert not (tmp_path / "pwned").exists(), "code from a name ran"


def test_ligature_layer_is_its_own_layer(tmp_path):
    """`fix(ﬁx(x))`: the two layers keep their own weights (torch names `fix` and `layer_x`)."""
    description = json.loads(_seed_graph().to_json())
    description["nodes"][1]["name"], description["nodes"][2]["name"] = "\ufb01x", "fix"
    description["nodes"][2]["inputs"] = ["\ufb01x"]
    for node in description["nodes"]:
        node["config"]["units"] = 4  # square: the naive reading loads without complaint
    description["outputs"] = ["fix"]
    graph = Graph.from_dict(description)
    assert graph.torch_names == {"dense_0": "dense_0", "\ufb01x": "layer_x", "fix": "fix"}
    tensors = _random_tensors(graph)
    from exchange import torch_adapter

    inputs = np.random.default_rng(1).standard_normal((7, 6)).astype(np.float32)
    expected = reference.forward(graph, tensors, [inputs])[0]
    # The naive reading computes fix(fix(x)): far from the file's model.
    naive = dict(tensors, **{"layer_x.weight": tensors["fix.weight"], "layer_x.bias": tensors["fix.bias"]})
    assert np.max(np.abs(reference.forward(graph, naive, [inputs])[0] - expected)) > 1e-2
    module_outputs = torch_adapter.predict(torch_adapter.model_from_tensors(graph, tensors), [inputs])[0]
    assert np.max(np.abs(module_outputs - expected)) <= OUTPUT_TOLERANCE
    _convert_and_run(graph, tensors, tmp_path, "model.safetensors", "out.py")


def test_names_that_meet_as_identifiers_are_refused():
    from exchange.errors import ExchangeError

    description = json.loads(_seed_graph(layer="a-b").to_json())
    description["nodes"][0]["name"] = "a b"
    description["nodes"][1]["inputs"] = ["a b"]
    with pytest.raises(ExchangeError, match=r"layers 'a b' and 'a-b' both become torch name 'a_b'; rename one"):
        Graph.from_dict(description)
