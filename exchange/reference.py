"""A numpy forward pass over file tensors: a model's outputs with no framework installed.

`convert --verify` uses it in place of a framework that is not installed, so a comparison still
runs (and says which). Only layer kinds with a `numpy_forward` can run here (Dense stacks and
element-wise layers); for others it says which layer needs a framework.
"""

from __future__ import annotations

import numpy as np

from exchange.graph import Graph
from exchange.kinds import kind_of


def forward(graph: Graph, file_tensors: dict[str, np.ndarray], inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Each node in turn, in float32 like both frameworks; inputs and outputs in Keras layout."""
    values = {spec.name: np.asarray(array, dtype=np.float32) for spec, array in zip(graph.inputs, inputs)}
    for node in graph.nodes:
        prefix = graph.torch_names[node.name] + "."
        tensors = {key[len(prefix) :]: value for key, value in file_tensors.items() if key.startswith(prefix)}
        output = kind_of(node.kind).numpy_forward(graph.context(node), tensors, [values[name] for name in node.inputs])
        values[node.name] = np.asarray(output, dtype=np.float32)
    return [values[name] for name in graph.outputs]
