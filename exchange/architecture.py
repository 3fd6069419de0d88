"""The framework-neutral description of a model: what both frameworks build from.

An `Architecture` is plain data (JSON-able) stored in every exchange file's metadata, so either
framework can rebuild the model from the file alone. Today it describes a stack of Dense layers;
other layer kinds are added as further `Layer` classes with their own `kind`.

Example:
    >>> arch = Architecture(input_dim=784, layers=(DenseLayer(50, "tanh"), DenseLayer(10, "softmax")))
    >>> arch.parameter_count()
    39760
    >>> Architecture.from_json(arch.to_json()) == arch
    True
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from math import prod

from exchange.errors import ExchangeError, UnsupportedLayerError

# Activations every framework adapter knows how to build. Names are Keras's.
ACTIVATIONS = ("linear", "relu", "tanh", "sigmoid", "softmax")


@dataclass(frozen=True)
class DenseLayer:
    """A fully connected layer: y = activation(x @ kernel + bias)."""

    units: int
    activation: str = "linear"
    use_bias: bool = True
    kind: str = field(default="dense", init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.units, int) or isinstance(self.units, bool) or self.units < 1:
            raise ExchangeError(f"Dense units must be a positive integer, got {self.units!r}")
        if self.activation not in ACTIVATIONS:
            raise UnsupportedLayerError(
                f"unsupported activation {self.activation!r}; supported: {', '.join(ACTIVATIONS)}"
            )

    def tensor_shapes(self, input_dim: int) -> dict[str, tuple[int, ...]]:
        """Shapes of this layer's tensors in the file (PyTorch layout: weight is (out, in))."""
        shapes = {"weight": (self.units, input_dim)}
        if self.use_bias:
            shapes["bias"] = (self.units,)
        return shapes

    def output_dim(self, input_dim: int) -> int:
        return self.units

    def to_dict(self) -> dict:
        return {"kind": self.kind, "units": self.units, "activation": self.activation,
                "use_bias": self.use_bias}


# Layer classes by the `kind` written in the file.
LAYER_KINDS = {"dense": DenseLayer}


@dataclass(frozen=True)
class Architecture:
    """A sequential stack of layers fed by a flat input of `input_dim` features."""

    input_dim: int
    layers: tuple[DenseLayer, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.input_dim, int) or self.input_dim < 1:
            raise ExchangeError(f"input_dim must be a positive integer, got {self.input_dim!r}")
        if not self.layers:
            raise ExchangeError("an architecture needs at least one layer")
        object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def output_dim(self) -> int:
        return self.layer_input_dims()[-1]

    def layer_input_dims(self) -> list[int]:
        """Input width of each layer, followed by the model's output width."""
        dims = [self.input_dim]
        for layer in self.layers:
            dims.append(layer.output_dim(dims[-1]))
        return dims

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the file must hold, keyed as in PyTorch (`layers.0.weight`, …)."""
        shapes = {}
        for index, (layer, input_dim) in enumerate(zip(self.layers, self.layer_input_dims())):
            for name, shape in layer.tensor_shapes(input_dim).items():
                shapes[f"layers.{index}.{name}"] = shape
        return shapes

    def layer_parameter_counts(self) -> list[int]:
        return [sum(prod(shape) for shape in layer.tensor_shapes(input_dim).values())
                for layer, input_dim in zip(self.layers, self.layer_input_dims())]

    def parameter_count(self) -> int:
        return sum(self.layer_parameter_counts())

    def to_dict(self) -> dict:
        return {"input_dim": self.input_dim, "layers": [layer.to_dict() for layer in self.layers]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, description: dict) -> "Architecture":
        try:
            layers = []
            for layer in description["layers"]:
                if not isinstance(layer, dict):
                    raise ExchangeError(f"malformed architecture description: layer {layer!r} "
                                        "is not an object")
                fields = dict(layer)
                kind = fields.pop("kind")
                if kind not in LAYER_KINDS:
                    raise UnsupportedLayerError(f"unsupported layer kind {kind!r} in architecture")
                layers.append(LAYER_KINDS[kind](**fields))
            return cls(input_dim=description["input_dim"], layers=tuple(layers))
        except (KeyError, TypeError, ValueError) as err:
            raise ExchangeError(f"malformed architecture description: {err!r}") from None

    @classmethod
    def from_json(cls, text: str) -> "Architecture":
        try:
            description = json.loads(text)
        except json.JSONDecodeError as err:
            raise ExchangeError(f"architecture is not valid JSON: {err}") from None
        if not isinstance(description, dict):
            raise ExchangeError("architecture JSON must be an object")
        return cls.from_dict(description)

    def differences(self, other: "Architecture") -> list[str]:
        """Human-readable differences between two architectures (empty when equal)."""
        found = []
        if self.input_dim != other.input_dim:
            found.append(f"input_dim {self.input_dim} != {other.input_dim}")
        if len(self.layers) != len(other.layers):
            found.append(f"{len(self.layers)} layers != {len(other.layers)} layers")
        for index, (mine, theirs) in enumerate(zip(self.layers, other.layers)):
            if mine != theirs:
                found.append(f"layer {index}: {mine.to_dict()} != {theirs.to_dict()}")
        return found


def dense_stack(input_dim: int, sizes_and_activations: list[tuple[int, str]]) -> Architecture:
    """Shorthand: `dense_stack(784, [(50, "tanh"), (10, "softmax")])`."""
    return Architecture(input_dim, tuple(DenseLayer(units, act) for units, act in sizes_and_activations))
