"""`convert IN OUT --verify`: run Keras and PyTorch on the same inputs, each on its own file.

Two comparisons, side by side:
- float32, the models as converted, within `atol + rtol * output scale` (FLOAT32_ATOL 1e-5,
  FLOAT32_RTOL 1e-4, `--tolerance`/`--rtol`): TensorFlow and torch sum in different orders, so
  float32 results differ by a few units of 1.2e-7 per layer, relative to the values; through a
  deep net that grows (measured: 5.7e-7 of the output scale on a 12-layer Conv+BN stack, 6e-7 on
  InceptionV3), and 1e-4 leaves a hundredfold margin. A wrong convention differs by 1e-3..1e-1.
- float64: both models rebuilt in float64 (Keras from its config with every float dtype policy
  "float64" and the same weights, or the exchange's rebuild with float64 layers; torch built
  from the float64 graph, or the generated module `.double()`), on the same inputs: rounding
  shrinks to ~1e-16 (measured 4e-16 of the scale on the same stack) and a conversion error stays
  where it was. Keras keeps some constants in float32 even then (a Rescaling(1/255) is 2.3e-10
  off, a BatchNormalization epsilon likewise): FLOAT64_ATOL 1e-9 + FLOAT64_RTOL 1e-6 of the scale,
  a thousandfold from both.
The verdict comes from float64 wherever both sides build and run in float64, else from float32,
and the result says which; when it fails, the layers are compared in the verdict's dtype and the
first one beyond the tolerance (its own scale's) is named.

The frameworks run in a child process (`python -m exchange.verify FOLDER`), a fresh
interpreter that reads the request from FOLDER (`request.json`, the inputs as `.npy` files) and
writes `result.json` there. TensorFlow and torch can crash (SIGSEGV, SIGABRT), exhaust memory or
loop on a hostile graph, and no exception handler catches or bounds that; the child runs under
an address-space cap (CHILD_ADDRESS_SPACE more than it holds after importing the frameworks, plus
WEIGHT_COPIES times the weights) and a wall-clock limit (VERIFY_SECONDS, `--verify-timeout`), so
a crash, an out-of-memory or a hang ends in one error line naming the input and exit 2. The
parent (`verify`) keeps no framework state: it draws the inputs, spawns the child, waits, reads
the result, and kills the child when it is interrupted.

The Keras reference: a Keras 3 file opened by Keras itself; a Keras 2 file by tf-keras when it is
installed, else the exchange's Keras 3 rebuild of its graph (Keras 2's hard_sigmoid written in
keras.ops, `kinds.activations.KERAS_FORMULAS`), never Keras 3's reading of a Keras 2 file.

What is read again, and why. The conversion opens its input once (its kind decided once, by
content, in `cli.convert`) and hands what it read down: the graph, and the facts its reader
learnt (`cli.OpenedInput`: the kind, whether Keras 3 opens the file itself, the Keras 2 file
holding its config), which `request.json` carries to the child by name. The child is a separate
interpreter on purpose (a crash, an out-of-memory or a hang of a framework must not take the
conversion with it), so it cannot share the parent's open file; it opens each of the two files
once, and re-reading them is what verification means: the input as the reference (a Keras file
through Keras itself, or tf-keras, or the exchange's reader for the rebuild of a file no Keras
here reads as written; a `.pt` or `.safetensors` through its reader) and the converted output as
written (the `.safetensors` or `.pt`, the generated `.py` with its weights, a `.keras` through
Keras). Nothing decides a kind again or opens a file to ask what it is (the `--arch` of a
weights-only file and a subclassed model's `--custom-objects` excepted); tests/test_file_kinds.py
counts the opens.

Example:
    >>> result = verify(Path("model.keras"), Path("model.safetensors"), graph, None)
    >>> result.passed, result.verdict.dtype
    (True, 'float64')
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from exchange import chunking, filekinds, keras_config, subclassed, untrusted
from exchange.errors import ExchangeError, ExchangeFileError, first_line
from exchange.graph import INTEGER_DTYPES, Graph, InputSpec
from exchange.kinds import KIND_FILES, kind_of, load_kinds_file

if TYPE_CHECKING:
    from exchange.cli import OpenedInput

VERIFY_BATCH = 1000  # rows of the fixed random batch (without --verify-inputs)
# Tolerances, `atol + rtol * output scale` (the largest |value| of the Keras outputs); see above.
FLOAT32_ATOL, FLOAT32_RTOL = 1e-5, 1e-4
FLOAT64_ATOL, FLOAT64_RTOL = 1e-9, 1e-6
# An axis of unknown length (`Input((None, 4))`) gets this many steps, doubled while the model
# cannot take it (a stack of poolings), up to FREE_AXIS_LONGEST; `--input-shape` chooses.
FREE_AXIS_LENGTH = 32
FREE_AXIS_LONGEST = 4096
# Rows * the model's largest activation per sample (the product of its shape, over every input
# and layer output) stays under this: 64 MB per activation in float32, 128 MB in float64, and
# each framework holds a few at once. A model whose single sample exceeds it is refused.
VERIFY_ACTIVATION_ELEMENTS = 16_000_000
# The child's wall-clock limit, imports included (about 8 s on 2 cores): the CNN zoo verifies in
# under 30 s there; a graph that makes a framework loop (a pool of 10**9) is stopped here.
VERIFY_SECONDS = 600
# Address space the child may map beyond what it holds after importing TensorFlow and torch
# (1.6 GiB): thread stacks, the frameworks' workspaces and a few activations of the size above.
CHILD_ADDRESS_SPACE = 4 << 30
WEIGHT_COPIES = 4  # the file's memory map, a read copy, Keras's variables, torch's tensors
# Layer-by-layer comparison (after the outputs differ, or for --report): on the rows whose
# outputs differ most, in chunks of layers holding at most this many values per framework.
DIVERGENCE_ROWS = 16
DIVERGENCE_ELEMENTS = 16_000_000
SIMULATE_FAULT = "EXCHANGE_VERIFY_TEST_FAULT"  # tests only: "abort" (a native crash) or "hang" in the child
REQUEST, RESULT = "request.json", "result.json"
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


# ---------------------------------------------------------------------------------------------
# The result


@dataclass
class Comparison:
    """One comparison of the outputs: what ran on each side, in which dtype, and how far apart."""

    dtype: str  # "float32" (the models as converted) or "float64" (both rebuilt)
    keras: str  # what ran on each side ("Keras on model.keras")
    torch: str
    max_abs_diff: float
    output_scale: float  # the largest |value| of the Keras outputs
    atol: float
    rtol: float
    argmax_agreement: float  # of the first output, over the rows

    @property
    def tolerance(self) -> float:
        return self.atol + self.rtol * self.output_scale

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance


@dataclass
class LayerDifference:
    """One layer's outputs compared (in the verdict's dtype, on the rows that differ most)."""

    layer: str
    kind: str
    max_abs_diff: float
    scale: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance


@dataclass
class InputUsed:
    """One input of the batch: its shape (batch first), dtype and what its values are."""

    name: str
    shape: list
    dtype: str
    values: str


@dataclass
class VerifyResult:
    inputs: str  # the batch in words ("a fixed random batch of 1,000 inputs")
    inputs_used: list[InputUsed]
    float32: Comparison
    float64: Comparison | None  # None where a side cannot be built in float64 ...
    float64_missing: str | None = None  # ... and why
    layers: list[LayerDifference] = field(default_factory=list)  # per-layer maxima, when compared
    notes: list[str] = field(default_factory=list)  # what the user should know about the reference
    child_peak_mib: float = 0.0  # the --verify child's peak RSS ...
    child_imports_mib: float = 0.0  # ... and its RSS once TensorFlow and torch are imported

    @property
    def verdict(self) -> Comparison:
        """The comparison that decides: float64 where both sides ran in it."""
        return self.float64 if self.float64 is not None else self.float32

    @property
    def passed(self) -> bool:
        return self.verdict.passed

    @property
    def compared(self) -> str:
        return f"{self.float32.keras} vs {self.float32.torch}"

    @property
    def first_divergence(self) -> LayerDifference | None:
        return next((layer for layer in self.layers if not layer.passed), None)

    def to_dict(self) -> dict:
        """The machine-readable form (`--report`)."""
        return {
            "passed": self.passed,
            "verdict": self.verdict.dtype,
            "compared": self.compared,
            "inputs": self.inputs,
            "inputs_used": [dataclasses.asdict(item) for item in self.inputs_used],
            "float32": _comparison_dict(self.float32),
            "float64": None if self.float64 is None else _comparison_dict(self.float64),
            "float64_missing": self.float64_missing,
            "layers": [dataclasses.asdict(layer) | {"passed": layer.passed} for layer in self.layers],
            "first_divergence": None if self.first_divergence is None else self.first_divergence.layer,
            "notes": self.notes,
            "child_peak_mib": self.child_peak_mib,
        }

    @classmethod
    def from_dict(cls, data: dict) -> VerifyResult:
        """From the child's `to_dict` (a file this process's own child wrote)."""

        def comparison(item):
            return (
                None
                if item is None
                else Comparison(**{key: item[key] for key in (f.name for f in dataclasses.fields(Comparison))})
            )

        return cls(
            data["inputs"],
            [InputUsed(**item) for item in data["inputs_used"]],
            comparison(data["float32"]),
            comparison(data["float64"]),
            data["float64_missing"],
            [
                LayerDifference(**{key: item[key] for key in (f.name for f in dataclasses.fields(LayerDifference))})
                for item in data["layers"]
            ],
            list(data["notes"]),
            data["child_peak_mib"],
        )


def _comparison_dict(comparison: Comparison) -> dict:
    return dataclasses.asdict(comparison) | {"tolerance": comparison.tolerance, "passed": comparison.passed}


def describe(result: VerifyResult) -> str:
    """The one line `--verify` prints: both comparisons, and which one gave the verdict."""

    def part(comparison: Comparison | None, missing: str | None) -> str:
        if comparison is None:
            return f"float64 not run ({missing})"
        return f"{comparison.dtype} max abs diff {comparison.max_abs_diff:.3e} (tolerance {comparison.tolerance:.1e})"

    verdict = result.verdict
    return (
        f"{result.compared}, on {result.inputs}: {part(result.float32, None)}, "
        f"{part(result.float64, result.float64_missing)}; outputs up to {result.float32.output_scale:.3g}, "
        f"argmax agreement {result.float32.argmax_agreement:.2%}; "
        f"verdict from {verdict.dtype}: {'match' if verdict.passed else 'MISMATCH'}"
    )


def failure(result: VerifyResult) -> str:
    """Why the verdict failed, naming the first divergent layer when one was found."""
    verdict = result.verdict
    layer = result.first_divergence
    return (
        f"outputs differ beyond the {verdict.dtype} tolerance ({verdict.max_abs_diff:.3e} > "
        f"{verdict.tolerance:.1e})"
        + (
            f"; first divergent layer {layer.layer!r} ({layer.kind}): {verdict.dtype} "
            f"max abs diff {layer.max_abs_diff:.3e} (tolerance {layer.tolerance:.1e})"
            if layer is not None
            else "; no single layer exceeds its tolerance"
            if result.layers
            else ""
        )
    )


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """`--input-shape NAME=D1,D2,...`: an input's shape without the batch axis."""
    name, separator, sizes = text.rpartition("=")
    try:
        shape = tuple(int(size) for size in sizes.split(","))
    except ValueError:
        shape = ()
    if not separator or not name or not shape or any(size < 1 or size > (1 << 31) for size in shape):
        raise ExchangeError(
            f"--input-shape {text!r}: expected NAME=D1,D2,... (the input's name and its "
            "positive sizes without the batch axis)"
        )
    return name, shape


def write_report(path: Path, result: VerifyResult, shown: Callable[[str], str] = str) -> None:
    """`--report FILE.json`: the result as JSON, written atomically (a temporary then a rename);
    `shown` puts the user's output names in place of the temporaries' in it."""
    from exchange import fileformat

    try:
        with fileformat.atomic_output(path) as temporary:
            Path(temporary).write_text(shown(json.dumps(result.to_dict(), indent=1)) + "\n")
    except OSError as err:
        raise ExchangeFileError(f"{path}: could not write the report ({err.strerror or err})") from None


# ---------------------------------------------------------------------------------------------
# Checks before anything is built


def check_integer_inputs(graph: Graph) -> None:
    """Integer inputs are token ids (read by an Embedding), attention masks (read by a
    MultiHeadAttention as its `attention_mask`), or values that a layer computes in its float dtype
    (Dense, LSTM, Rescaling: the kinds that `casts_integers`). Keras's other layers treat integer
    inputs each its own way (MaxPooling1D computes in int64 under a float32 symbolic dtype, Conv1D
    and Softmax raise), so the exchange refuses them rather than guess."""
    integer_inputs = {spec.name: spec.dtype for spec in graph.inputs if spec.dtype in INTEGER_DTYPES + ("bool",)}
    integer_inputs.update(
        {node.name: dtype for node in graph.nodes if (dtype := kind_of(node.kind).integer_output(node.config))}
    )  # a lookup's ids
    for node in graph.nodes:
        for position, name in enumerate(node.inputs):
            if name in integer_inputs and not kind_of(node.kind).reads_integers(node, position):
                raise ExchangeError(
                    f"layer {node.name!r} ({node.kind}) reads the integer input {name!r} "
                    f"({integer_inputs[name]}); only Embedding layers, lookups and encodings, attention "
                    "or step masks, and layers that Keras computes in float (Dense, recurrent, "
                    "normalization, Rescaling, image augmentations) take integers or bools"
                )


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # an import hook that blocks it says so by raising
        return False


def largest_activation(graph: Graph) -> tuple[int, str]:
    """The most values one sample makes anywhere in the model, and where (an input or a layer)."""
    return max(
        ((math.prod(size or 0 for size in shape), name) for name, shape in graph.shapes.items()),
        key=lambda item: item[0],
    )


def sized_graph(graph: Graph, input_shapes: dict[str, tuple[int, ...]] | None = None) -> Graph:
    """The graph with every input axis of unknown length given one: `input_shapes` (name -> shape
    without the batch, from `--input-shape`) where given, else FREE_AXIS_LENGTH, doubled while
    some layer's output would be empty (poolings of a short axis), up to FREE_AXIS_LONGEST."""
    input_shapes = dict(input_shapes or {})
    unknown = sorted(set(input_shapes) - {spec.name for spec in graph.inputs})
    if unknown:
        raise ExchangeError(
            f"--input-shape names {', '.join(map(repr, unknown))}, not an input of the model "
            f"(inputs: {', '.join(repr(spec.name) for spec in graph.inputs)})"
        )
    for spec in graph.inputs:
        given = input_shapes.get(spec.name)
        if given is not None and (
            len(given) != len(spec.shape)
            or any(known is not None and known != size for known, size in zip(spec.shape, given))
        ):
            raise ExchangeError(
                f"--input-shape {spec.name}={','.join(map(str, given))} does not fit the input's "
                f"shape {_shape_text(spec.shape)}"
            )
    if all(size is not None for spec in graph.inputs for size in spec.shape):
        return graph
    length, problem = FREE_AXIS_LENGTH, ""
    while length <= FREE_AXIS_LONGEST:
        specs = tuple(
            dataclasses.replace(
                spec,
                shape=tuple(
                    input_shapes.get(spec.name) or tuple(length if size is None else size for size in spec.shape)
                ),
            )
            for spec in graph.inputs
        )
        try:
            candidate = dataclasses.replace(graph, inputs=specs)
            empty = [name for name, shape in candidate.shapes.items() if any(size == 0 for size in shape)]
            if not empty:
                return candidate
            problem = f"layer {empty[0]!r} has an empty output"
        except ExchangeError as err:
            problem = first_line(err)
        if all(spec.name in input_shapes for spec in graph.inputs):
            break
        length *= 2
    raise ExchangeError(
        f"--verify found no length for the model's axes of unknown length up to "
        f"{FREE_AXIS_LONGEST} ({problem}); choose one with --input-shape NAME=D1,D2,..."
    )


def _shape_text(shape) -> str:
    return "(" + ", ".join("None" if size is None else str(size) for size in shape) + ")"


@dataclass
class VerificationInputs:
    """The batch in words, and each input's shape, dtype and values (for --report)."""

    description: str
    inputs: list[InputUsed]


@dataclass(frozen=True)
class InputsFile:
    """`--verify-inputs FILE.npz`: the user's own batch, its arrays by name as the guarded reader
    gave them (`read_inputs_file`); matched to the model's inputs by `verification_inputs`."""

    path: Path
    arrays: dict[str, np.ndarray]


def read_inputs_file(path: Path) -> InputsFile:
    """A `.npz` of the model's inputs, read as any hostile file (`untrusted.load_npz`: bounded
    size, `allow_pickle=False`, every declared shape checked against its bytes)."""
    return InputsFile(path, untrusted.load_npz(path))


def verification_inputs(
    graph: Graph, given: InputsFile | None = None, input_shapes: dict[str, tuple[int, ...]] | None = None
) -> tuple[list[np.ndarray], VerificationInputs]:
    """The batch `--verify` runs: the arrays of `given` (`--verify-inputs`) when there are some,
    else a fixed random batch for each input, each in its own dtype; as many rows as
    VERIFY_ACTIVATION_ELEMENTS allows for the model's largest activation (axes of unknown length
    sized by `sized_graph`, or by the given arrays).

    What the random values exercise: floats in [0, 1); token ids over the whole vocabulary of the
    Embedding (or lookup, encoding) that reads them, every id where the batch has room; masks
    (bool inputs, and inputs given to a layer as its `mask=` or attention mask) hold both values,
    a float mask 0, 0.3 and 1 (Keras keeps `!= 0` steps, Softmax `> 0.5` positions); other
    integers 0..255 (uint8 0..255, int8 -128..127); steps equal to a reading Masking's value."""
    if given is not None:
        if input_shapes:
            raise ExchangeError("--input-shape and --verify-inputs: the file's arrays give the shapes; pass one")
        arrays = _given_arrays(graph, given)
        sized = sized_graph(graph, {spec.name: tuple(array.shape[1:]) for spec, array in zip(graph.inputs, arrays)})
    else:
        sized = sized_graph(graph, input_shapes)
    largest, where = largest_activation(sized)
    fitting = VERIFY_ACTIVATION_ELEMENTS // max(largest, 1)
    if fitting < 1:
        raise ExchangeError(
            f"--verify refused: {where!r} makes {largest:,} values per sample, more than the "
            f"{VERIFY_ACTIVATION_ELEMENTS:,} --verify holds at once"
        )
    if given is not None:
        total = len(arrays[0])
        rows = min(total, fitting)
        return [array[:rows] for array in arrays], VerificationInputs(
            f"{rows:,} inputs from {given.path}" + (f" (the first of its {total:,})" if rows < total else ""),
            [
                InputUsed(spec.name, [rows, *array.shape[1:]], str(array.dtype), f"from {given.path}")
                for spec, array in zip(graph.inputs, arrays)
            ],
        )
    rows = min(VERIFY_BATCH, fitting)
    generator = np.random.default_rng(0)
    batch, used = [], []
    for spec in sized.inputs:
        array, values = _draw(sized, spec, rows, generator)
        batch.append(array)
        used.append(InputUsed(spec.name, list(array.shape), spec.dtype, values))
    # A Masking reading an input masks the steps equal to its mask_value: about 30% of them are.
    for tensor, value in sized.mask_sources.values():
        for array, spec, item in zip(batch, sized.inputs, used):
            if spec.name == tensor and len(spec.shape) == 2:
                array[generator.random((rows, *_sizes(spec.shape)[:1])) < 0.3] = value
                item.values += f", about 30% of the steps equal to the Masking value {value:g}"
    return batch, VerificationInputs(f"a fixed random batch of {rows:,} inputs", used)


def _given_arrays(graph: Graph, given: InputsFile) -> list[np.ndarray]:
    """The file's arrays in the model's input order: keyed by the inputs' names (or one array for
    a one-input model), each of its input's dtype and shape (any length on an unknown axis), all
    with the same number of rows, floats finite. Each refusal is one line naming the file."""
    path, arrays, specs = given.path, given.arrays, graph.inputs
    names = [spec.name for spec in specs]
    if set(arrays) == set(names):
        ordered = [arrays[name] for name in names]
    elif len(specs) == 1 and len(arrays) == 1:
        ordered = list(arrays.values())
    else:
        raise ExchangeFileError(
            f"{path}: holds {', '.join(repr(key[:80]) for key in sorted(arrays)[:8]) or 'no arrays'}; expected one "
            f"array per input of the model, keyed by its name ({', '.join(map(repr, names))})"
            + (", or a single array" if len(specs) == 1 else "")
        )
    for spec, array in zip(specs, ordered):
        shape = _shape_text(spec.shape)
        if array.dtype.name != spec.dtype:
            raise ExchangeFileError(f"{path}: {spec.name!r} is {array.dtype}, the input takes {spec.dtype}")
        if array.ndim != len(spec.shape) + 1 or any(
            known is not None and known != size for known, size in zip(spec.shape, array.shape[1:])
        ):
            raise ExchangeFileError(
                f"{path}: {spec.name!r} has shape {array.shape}, the input takes (rows, {shape[1:]}"
                if spec.shape
                else f"{path}: {spec.name!r} has shape {array.shape}, the input takes (rows,)"
            )
        if any(size < 1 for size in array.shape):
            raise ExchangeFileError(f"{path}: {spec.name!r} has shape {array.shape}: an empty axis")
        if len(array) != len(ordered[0]):
            raise ExchangeFileError(
                f"{path}: {spec.name!r} has {len(array):,} rows, {specs[0].name!r} {len(ordered[0]):,}"
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ExchangeFileError(f"{path}: {spec.name!r} holds values that are not finite (NaN or infinity)")
    return ordered


def _draw(graph: Graph, spec: InputSpec, rows: int, generator: np.random.Generator) -> tuple[np.ndarray, str]:
    """One input's random values and what they are."""
    shape = (rows, *_sizes(spec.shape))
    if spec.dtype == "bool":
        array = generator.random(shape) < 0.7
        _both_values(array, True, False)
        return array, "bool, about 70% True"
    if spec.name in _mask_inputs(graph):
        if spec.dtype in FLOAT_DTYPES:
            return generator.choice(np.array([0.0, 0.3, 1.0], spec.dtype), shape), "a mask: 0, 0.3 and 1"
        array = (generator.random(shape) < 0.7).astype(spec.dtype)
        _both_values(array, 1, 0)
        return array, "a mask: 0 and 1, about 70% 1"
    if spec.dtype in INTEGER_DTYPES:
        vocabulary = _vocabulary(graph, spec.name)
        if vocabulary is not None:
            return _cover(generator, vocabulary, shape, spec.dtype), f"token ids covering 0..{vocabulary - 1}"
        low, high = (-128, 128) if spec.dtype == "int8" else (0, 256)
        return generator.integers(low, high, shape).astype(spec.dtype), f"integers {low}..{high - 1}"
    return generator.random(shape, dtype=np.float32).astype(spec.dtype), "uniform in [0, 1)"


def _sizes(shape: tuple[int | None, ...]) -> tuple[int, ...]:
    """A sized graph's shape (`sized_graph`: every axis has a length) as plain sizes."""
    sizes = tuple(size for size in shape if size is not None)
    if len(sizes) != len(shape):
        raise ExchangeError(f"an input of shape {_shape_text(shape)} was not given a length on every axis")
    return sizes


def _both_values(array: np.ndarray, first, second) -> None:
    """A mask that holds both values, however few its entries are (two or more)."""
    flat = array.reshape(-1)
    if flat.size >= 2:
        flat[0], flat[-1] = first, second


def _cover(generator: np.random.Generator, vocabulary: int, shape: tuple, dtype: str) -> np.ndarray:
    """Token ids below `vocabulary`: every one of them where the batch has room (else the first,
    the last and a random choice of the rest), the others random, at shuffled places."""
    flat = generator.integers(0, vocabulary, math.prod(shape))
    room = min(flat.size, vocabulary)
    if room:
        chosen = (
            np.arange(vocabulary)
            if room == vocabulary
            else np.concatenate(
                [[0, vocabulary - 1], generator.choice(np.arange(1, vocabulary - 1), room - 2, replace=False)]
                if room >= 2
                else [[vocabulary - 1]]
            )
        )
        flat[generator.permutation(flat.size)[:room]] = chosen[:room]
    return flat.reshape(shape).astype(dtype)


# How far downstream an integer input is followed to the layer that gives its vocabulary.
VOCABULARY_SEARCH_DEPTH = 8


def _vocabulary(graph: Graph, input_name: str) -> int | None:
    """How many token ids an integer input may take: the smallest vocabulary (an Embedding's
    `input_dim`, a CategoryEncoding's `num_tokens`) among the layers reading it, followed through
    at most VOCABULARY_SEARCH_DEPTH layers that pass ids along (a Reshape); None if none."""
    vocabularies, frontier, seen = [], [input_name], {input_name}
    for _ in range(VOCABULARY_SEARCH_DEPTH):
        following = []
        for name in frontier:
            for node in graph.consumers.get(name, []):
                size = next(
                    (
                        getattr(node.config, key)
                        for key in ("input_dim", "num_tokens")
                        if isinstance(getattr(node.config, key, None), int)
                    ),
                    None,
                )
                if size is not None:
                    vocabularies.append(size)
                elif node.name not in seen and _passes_ids(graph, node):
                    seen.add(node.name)
                    following.append(node.name)
        frontier = following
    return min(vocabularies, default=None)


def _passes_ids(graph: Graph, node) -> bool:
    """A layer whose output holds its input's values, moved (Reshape, Permute, Flatten, a crop)."""
    return kind_of(node.kind).moves_values


def _mask_inputs(graph: Graph) -> set[str]:
    """Inputs that a layer reads as its `mask=` or its attention mask."""
    masks = set()
    for node in graph.nodes:
        roles = getattr(node.config, "call_inputs", ()) or ()
        for position, name in enumerate(node.inputs):
            if kind_of(node.kind).is_mask_input(node, position) or (
                position < len(roles) and roles[position] == "attention_mask"
            ):
                masks.add(name)
    return masks


def weight_bytes(graph: Graph) -> int:
    return sum(
        math.prod(shape) * np.dtype(dtype if dtype != "bfloat16" else "float16").itemsize
        for shape, dtype in graph.tensor_specs.values()
    )


# ---------------------------------------------------------------------------------------------
# The parent: write the request, run the child, read its result


def verify(
    in_path: Path,
    out_path: Path,
    graph: Graph,
    given: InputsFile | None = None,
    tolerance: float = FLOAT32_ATOL,
    arch_path: Path | None = None,
    code_weights: Path | None = None,
    seconds: float = VERIFY_SECONDS,
    by_name: bool = False,
    rtol: float = FLOAT32_RTOL,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    every_layer: bool = False,
    in_process: bool = False,
    opened: OpenedInput | None = None,
) -> VerifyResult:
    """Run the two frameworks on the same inputs, each on the weights of its own file, in a child
    process, in float32 (within `tolerance + rtol * output scale`) and, where both sides can be
    built in float64, in float64 (FLOAT64_ATOL, FLOAT64_RTOL), which gives the verdict.

    Keras runs on the Keras file (IN or OUT) opened by Keras itself when it can (a Keras 2 file by
    tf-keras, or else the exchange's rebuild), else on the tensors. PyTorch runs on the `.pt` or
    `.safetensors` side, or imports a `.py` output and loads `code_weights` (its weights file,
    when it is not beside it yet). A framework that is not installed is replaced by a numpy
    forward pass over the same file's tensors, and the result says so. When the verdict fails
    (or for `every_layer`, --report), the layers are compared one by one in the verdict's dtype.
    A crash, an out-of-memory or a hang of the child is an ExchangeError naming `in_path`.
    `opened`, the input as the conversion read it (`cli.open_weights`), tells the child the
    input's kind and which Keras reference it takes without opening the input to ask; without
    it the input's header is read here once. `given` (`--verify-inputs`) is the batch to run,
    else one is drawn. `in_process` (tests only) runs the frameworks in this process instead, without the child's
    bounds, so that tests share one import of TensorFlow.
    """
    try:
        check_integer_inputs(graph)
        if _installed("keras"):
            keras_config.check_depth(graph)
        inputs, drawn = verification_inputs(graph, given, input_shapes)
        sized = sized_graph(graph, {spec.name: tuple(array.shape[1:]) for spec, array in zip(graph.inputs, inputs)})
        chunking.chunk_rows(sized, inputs)  # refuses, before the child starts, a row larger than a chunk
    except ExchangeFileError:
        raise
    except ExchangeError as err:
        raise ExchangeFileError(f"{in_path}: {err}") from None
    if opened is None:  # a caller that did not read the input itself (the API, tests)
        from exchange import cli

        with ExitStack() as stack:
            opened = cli.open_weights(in_path, stack, arch_path or graph, by_name=by_name)
    folder = Path(tempfile.mkdtemp(dir=out_path.parent, prefix=".verify.", suffix=".tmp"))
    try:
        names = []
        for index, array in enumerate(inputs):
            names.append(f"input_{index}.npy")
            np.save(folder / names[-1], array, allow_pickle=False)
        request: dict[str, Any] = {
            "in": str(in_path),
            "out": str(out_path),
            "arch": None if arch_path is None else str(arch_path),
            "code_weights": None if code_weights is None else str(code_weights),
            "graph": graph.to_json(),
            "inputs": names,
            "drawn": dataclasses.asdict(drawn),
            "float32": [tolerance, rtol],
            "float64": [FLOAT64_ATOL, FLOAT64_RTOL],
            "every_layer": every_layer,
            "kinds": list(KIND_FILES),
            "by_name": by_name,
            "in_kind": opened.kind.name,  # the facts of the input as read once, so the child
            "keras3_loadable": opened.keras3_loadable,  # opens only the Keras reference and the output
            "keras2_config": None if opened.keras2_config is None else str(opened.keras2_config),
            "subclassed": subclassed.state(),
            "address_space": CHILD_ADDRESS_SPACE + WEIGHT_COPIES * weight_bytes(graph),
        }
        (folder / REQUEST).write_text(json.dumps(request))
        if in_process:
            return VerifyResult.from_dict(_run(folder, json.loads((folder / REQUEST).read_text())))
        status, peak_kib = _run_child(folder, in_path, seconds)
        answer = _read_result(folder / RESULT)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        raise ExchangeFileError(
            f"{in_path}: --verify stopped: Keras or PyTorch crashed running this model "
            f"({name}; it may use {request['address_space'] / (1 << 30):.1f} GiB more than "
            "the frameworks themselves)"
        )
    if answer is None or os.WEXITSTATUS(status) != 0:
        raise ExchangeFileError(
            f"{in_path}: --verify stopped: its process exited with status {os.WEXITSTATUS(status)} without a result"
        )
    if "error" in answer:
        raise ExchangeError(answer["error"])
    result = VerifyResult.from_dict(answer["result"])
    # The child's own peak (wait4's ru_maxrss starts at the parent's, which Linux carries across exec).
    result.child_peak_mib = answer.get("peak_rss_mib", peak_kib / 1024)
    result.child_imports_mib = answer.get("imports_rss_mib", 0.0)
    return result


def _run_child(folder: Path, in_path: Path, seconds: float) -> tuple[int, int]:
    """Spawn `python -m exchange.verify FOLDER` and wait for it: (wait status, peak RSS in
    KiB). Past `seconds`, or when this process is interrupted (SIGTERM, SIGINT), it is killed."""
    package_root = str(Path(__file__).resolve().parent.parent)
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [package_root] + [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
        ),
    }
    # A session of its own: a terminal's Ctrl-C reaches this process only, which stops the child.
    child = subprocess.Popen(
        [sys.executable, "-m", "exchange.verify", str(folder)],
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + seconds
    pause = 0.001
    try:
        while True:
            finished, status, usage = os.wait4(child.pid, os.WNOHANG)
            if finished:
                child.returncode = status  # reaped here; Popen must not wait for it again
                return status, usage.ru_maxrss
            if time.monotonic() > deadline:
                raise ExchangeFileError(
                    f"{in_path}: --verify stopped: Keras and PyTorch did not finish in "
                    f"{seconds:g} s (see --verify-timeout)"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
    except BaseException:  # noqa: B036 (a timeout or an interrupt: the child goes too)
        os.kill(child.pid, signal.SIGKILL)
        os.wait4(child.pid, 0)
        child.returncode = -signal.SIGKILL
        raise


def _read_result(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# The child: frameworks


def child_main(folder: Path) -> None:
    """Read the request, import the frameworks, cap the address space, run, write the result.
    Never returns: exits 0 with a result (or a one-line error) in `result.json`."""
    _die_with_parent()
    fault = os.environ.get(SIMULATE_FAULT)
    if fault == "abort":
        os.abort()
    elif fault == "hang":
        time.sleep(3600)
    request = json.loads((folder / REQUEST).read_text())
    warnings.simplefilter("ignore")
    for module in ("exchange.keras_adapter", "exchange.torch_adapter"):
        try:
            __import__(module)
        except ImportError:
            pass  # replaced by the numpy reference
    imported, imported_rss = _status_kib("VmSize"), _status_kib("VmRSS")
    _cap_address_space(request["address_space"])
    answer: dict[str, Any]
    try:
        for kinds_file in request["kinds"]:  # the user's own kinds, as the parent loaded them
            load_kinds_file(kinds_file)
        subclassed.use_custom_objects(**request["subclassed"])  # a subclassed model is traced again
        answer = {"result": _run(folder, request)}
    except ExchangeError as err:  # named after the input, unless it names a file itself
        message = str(err)
        answer = {
            "error": message if request["in"] in message or request["out"] in message else f"{request['in']}: {message}"
        }
    except MemoryError:
        answer = {
            "error": f"{request['in']}: --verify stopped: running this model needs more memory than the "
            f"{request['address_space'] / (1 << 30):.1f} GiB --verify allows"
        }
    except Exception as err:  # noqa: BLE001 (every framework error is one line in the parent)
        answer = {
            "error": f"{request['in']}: --verify could not run the model ({type(err).__name__}: {first_line(err)})"
        }
    answer["address_space_added_mib"] = (_status_kib("VmPeak") - imported) / 1024  # for measurements
    answer["peak_rss_mib"], answer["imports_rss_mib"] = _status_kib("VmHWM") / 1024, imported_rss / 1024
    (folder / RESULT).write_text(json.dumps(answer))
    os._exit(0)  # not TensorFlow's slow teardown


def _die_with_parent() -> None:
    """SIGKILL this process when the parent dies (Linux), so that a killed `convert` leaves no
    framework running."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _status_kib(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cap_address_space(allowance: int) -> None:
    size = _status_kib("VmSize") * 1024
    if not size:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = size + allowance if hard == resource.RLIM_INFINITY else min(size + allowance, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


@contextmanager
def _framework(what: str, in_path: str):
    """A framework's exception (anything but ours) as one line naming the input."""
    try:
        yield
    except (ExchangeError, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 (TensorFlow and torch raise many types)
        raise ExchangeError(f"{in_path}: --verify: {what} failed ({type(err).__name__}: {first_line(err)})") from None


@dataclass
class Side:
    """One framework's side of a comparison: what it is, how to run it, how to read its layers'
    outputs (None for the numpy reference), and how to build its float64 twin (None, with the
    reason in `float64_missing`, where it cannot be)."""

    name: str
    run: Callable[[list], list]
    layers: Callable[[list, list], dict] | None = None
    float64: Callable[[], Side] | None = None
    float64_missing: str | None = None


def _run(folder: Path, request: dict) -> dict:
    from exchange import cli, fileformat

    in_path, out_path = Path(request["in"]), Path(request["out"])
    arch_path = None if request["arch"] is None else Path(request["arch"])
    graph = Graph.from_json(request["graph"])
    inputs = [np.load(folder / name, allow_pickle=False) for name in request["inputs"]]
    sized = sized_graph(graph, {spec.name: tuple(array.shape[1:]) for spec, array in zip(graph.inputs, inputs)})

    kinds = {in_path: filekinds.kind_named(request["in_kind"]), out_path: filekinds.output_kind(out_path)}
    keras3_loadable = {in_path: request["keras3_loadable"], out_path: kinds[out_path] is filekinds.KERAS}
    keras2_config = None if request["keras2_config"] is None else Path(request["keras2_config"])

    def read_tensors(path: Path) -> dict[str, np.ndarray]:
        with ExitStack() as stack:
            opened = cli.open_weights(
                path,
                stack,
                (arch_path if path == in_path else None) or graph,
                by_name=request["by_name"],
                kind=kinds[path],
            )
            return fileformat.materialize(opened.tensors)

    keras_path = next((p for p in (in_path, out_path) if kinds[p] in (filekinds.KERAS, filekinds.HDF5)), None)
    torch_path = next((p for p in (out_path, in_path) if kinds[p] in (filekinds.TORCH, filekinds.SAFETENSORS)), None)
    notes: list[str] = []
    with _framework("Keras", str(in_path)):
        keras_path = keras_path or in_path
        keras_side = _keras_side(
            keras_path,
            kinds[keras_path],
            keras3_loadable[keras_path],
            keras2_config if keras_path == in_path else None,
            arch_path if keras_path == in_path else None,
            graph,
            read_tensors,
            request["by_name"],
            notes,
        )
        keras_outputs = _in_chunks(keras_side, sized, inputs)
    with _framework("PyTorch", str(in_path)):
        if kinds[out_path] is filekinds.CODE:
            code_weights = Path(request["code_weights"]) if request["code_weights"] else cli.code_weights_path(out_path)
            torch_side = _generated_code_side(out_path, code_weights, graph)
        else:
            torch_side = _torch_side(torch_path or out_path, graph, read_tensors)
        torch_outputs = _in_chunks(torch_side, sized, inputs)
    float32 = _compare("float32", keras_side, torch_side, keras_outputs, torch_outputs, *request["float32"])
    verdict_sides, verdict_inputs = (keras_side, torch_side), inputs
    differences = _differences(keras_outputs, torch_outputs)
    float64, missing = None, keras_side.float64_missing or torch_side.float64_missing
    keras_float64, torch_float64 = keras_side.float64, torch_side.float64
    if missing is None and keras_float64 is not None and torch_float64 is not None:
        inputs64 = [array.astype(np.float64) if array.dtype.name in FLOAT_DTYPES else array for array in inputs]
        try:
            keras64 = keras_float64()
            keras64_outputs = _in_chunks(keras64, sized, inputs64)
            torch64 = torch_float64()
            torch64_outputs = _in_chunks(torch64, sized, inputs64)
        except MemoryError:
            raise
        except Exception as err:  # noqa: BLE001 (a layer without a float64 kernel: float32 decides)
            missing = f"{type(err).__name__}: {first_line(err)}"
        else:
            float64 = _compare("float64", keras64, torch64, keras64_outputs, torch64_outputs, *request["float64"])
            verdict_sides, verdict_inputs = (keras64, torch64), inputs64
            differences = _differences(keras64_outputs, torch64_outputs)
    verdict = float64 or float32
    layers = []
    if (not verdict.passed or request["every_layer"]) and all(side.layers for side in verdict_sides):
        with _framework("the layer-by-layer comparison", str(in_path)):
            layers = layer_differences(
                sized,
                *verdict_sides,
                verdict_inputs,
                verdict.atol,
                verdict.rtol,
                _worst_rows(differences, min(DIVERGENCE_ROWS, chunking.chunk_rows(sized, inputs))),
                request["every_layer"],
            )
    drawn = request["drawn"]
    return VerifyResult(
        drawn["description"], [InputUsed(**item) for item in drawn["inputs"]], float32, float64, missing, layers, notes
    ).to_dict()


def _in_chunks(side: Side, graph: Graph, inputs: list) -> list[np.ndarray]:
    """The side run on chunks of rows (`exchange.chunking`): bounded memory on any model."""
    return chunking.predict_in_chunks(lambda run, arrays: run(arrays), side.run, graph, inputs)


def _differences(keras_outputs: list, torch_outputs: list) -> list[np.ndarray]:
    return [np.abs(k.astype(np.float64) - t.astype(np.float64)) for k, t in zip(keras_outputs, torch_outputs)]


def _compare(
    dtype: str, keras_side: Side, torch_side: Side, keras_outputs: list, torch_outputs: list, atol: float, rtol: float
) -> Comparison:
    differences = _differences(keras_outputs, torch_outputs)
    first, second = keras_outputs[0], torch_outputs[0]
    return Comparison(
        dtype,
        keras_side.name,
        torch_side.name,
        max(float(np.max(d)) if d.size else 0.0 for d in differences),
        max(float(np.max(np.abs(k))) if k.size else 0.0 for k in keras_outputs),
        atol,
        rtol,
        float((first.reshape(len(first), -1).argmax(-1) == second.reshape(len(second), -1).argmax(-1)).mean())
        if first.size
        else 1.0,
    )


def _worst_rows(differences: list[np.ndarray], count: int = DIVERGENCE_ROWS) -> np.ndarray:
    """The `count` rows whose outputs differ most, in order."""
    per_row = np.max([d.reshape(len(d), -1).max(-1) if d.size else np.zeros(len(d)) for d in differences], axis=0)
    return np.sort(np.argsort(-per_row, kind="stable")[:count])


def layer_differences(
    graph: Graph,
    keras_side: Side,
    torch_side: Side,
    inputs: list,
    atol: float,
    rtol: float,
    rows: np.ndarray | None = None,
    every_layer: bool = False,
) -> list[LayerDifference]:
    """Each layer's Keras and torch outputs compared, in graph order, up to the first beyond
    `atol + rtol * its own scale` (every layer with `every_layer`). `graph` gives every axis a
    length (`sized_graph`).

    Compared on `rows` of the inputs (default: all), in chunks of consecutive layers that hold
    at most DIVERGENCE_ELEMENTS values: each chunk runs both models once, recording only its
    layers."""
    keras_layers, torch_layers = keras_side.layers, torch_side.layers
    if keras_layers is None or torch_layers is None:  # the numpy reference, generated code: no layers
        return []
    subset = inputs if rows is None else [array[rows] for array in inputs]
    count = len(subset[0])
    reordered = graph.torch_order_differs  # torch holds these flattened in (C, H, W) order
    comparable = [node for node in graph.nodes if node.name not in reordered]
    compared: list[LayerDifference] = []
    chunk, held = [], 0
    for index, node in enumerate(comparable):
        chunk.append(node)
        held += count * math.prod(size or 0 for size in graph.shapes[node.name])
        following = comparable[index + 1] if index + 1 < len(comparable) else None
        if (
            following is not None
            and held + count * math.prod(size or 0 for size in graph.shapes[following.name]) <= DIVERGENCE_ELEMENTS
        ):
            continue
        names = [item.name for item in chunk]
        keras_values = keras_layers(subset, names)
        torch_values = torch_layers(subset, names)
        for item in chunk:
            if item.name in keras_values and item.name in torch_values:
                keras_value = keras_values[item.name].astype(np.float64)
                difference = float(
                    np.max(np.abs(keras_value - torch_values[item.name].astype(np.float64)), initial=0.0)
                )
                scale = float(np.max(np.abs(keras_value), initial=0.0))
                compared.append(LayerDifference(item.name, item.kind, difference, scale, atol + rtol * scale))
                if not compared[-1].passed and not every_layer:
                    return compared
        del keras_values, torch_values
        chunk, held = [], 0
    return compared


# ---------------------------------------------------------------------------------------------
# The child: the two sides


def float64_graph(graph: Graph) -> Graph:
    """The graph with every floating-point input and layer in float64 (integers stay)."""
    return dataclasses.replace(
        graph,
        inputs=tuple(
            dataclasses.replace(spec, dtype="float64") if spec.dtype in FLOAT_DTYPES else spec for spec in graph.inputs
        ),
        nodes=tuple(
            dataclasses.replace(node, dtype="float64") if node.dtype in FLOAT_DTYPES else node for node in graph.nodes
        ),
    )


def _float64_tensors(graph64: Graph, tensors: dict) -> dict[str, np.ndarray]:
    return {key: np.asarray(value).astype(graph64.tensor_specs[key][1]) for key, value in tensors.items()}


def _float64_config(config):
    """A Keras config (Keras 3's or tf-keras's) with every floating-point dtype and dtype policy
    "float64": the same model in float64, where Keras builds it from the config."""
    if isinstance(config, list):
        return [_float64_config(item) for item in config]
    if not isinstance(config, dict):
        return config
    rewritten = {}
    for key, value in config.items():
        if key == "dtype" and isinstance(value, str) and (value in FLOAT_DTYPES or value.startswith("mixed_")):
            rewritten[key] = "float64"
        elif (
            key == "dtype"
            and isinstance(value, dict)
            and isinstance(value.get("config"), dict)
            and value.get("class_name") in ("DTypePolicy", "FloatDTypePolicy", "Policy")
        ):
            rewritten[key] = {**value, "config": {**value["config"], "name": "float64"}}
        else:
            rewritten[key] = _float64_config(value)
    return rewritten


def _float64_weights(weights: list) -> list:
    return [weight.astype(np.float64) if weight.dtype.name in FLOAT_DTYPES else weight for weight in weights]


def _numpy_side(what: str, path: Path, graph: Graph, tensors: dict) -> Side:
    from exchange import reference

    return Side(
        f"numpy reference on {path} ({what} not installed)",
        lambda inputs: reference.forward(graph, tensors, inputs),
        float64_missing=f"{what} is not installed",
    )


def _keras_side(
    path: Path,
    kind: filekinds.FileKind,
    keras3_loadable: bool,
    keras2_config: Path | None,
    arch_path: Path | None,
    graph: Graph,
    read_tensors,
    by_name: bool,
    notes: list[str],
) -> Side:
    """Keras on `path`: Keras 3 opens a Keras 3 file itself (`keras3_loadable`); a Keras 2 file
    (its config in `keras2_config`) is opened by tf-keras when installed, else rebuilt by the
    exchange (never read by Keras 3, whose hard_sigmoid differs); other files are the exchange's
    rebuild on their tensors. What the file is was learnt when the conversion read it."""
    try:
        from exchange import keras_adapter
    except ImportError:
        return _numpy_side("Keras", path, graph, read_tensors(path))
    class_name = subclassed.model_class(path, arch_path, kind)
    if class_name:  # the user's own model runs; its traced form serves the layer-by-layer comparison
        model, traced = subclassed.open_both(path, arch_path, kind)
        return Side(
            f"Keras on {path} (your {class_name})",
            lambda inputs: keras_adapter.predict(model, inputs),
            _keras3_layers(traced, graph),
            lambda: _keras3_float64(path, traced, graph),
        )
    if keras2_config is not None:
        if _installed("tf_keras"):
            try:
                return _tf_keras_side(path, keras2_config, by_name)
            except (ImportError, ValueError, OSError, KeyError, TypeError, AttributeError) as err:
                notes.append(
                    f"tf-keras could not open {path} ({type(err).__name__}: {first_line(err)}); "
                    "compared with the exchange's Keras 3 rebuild instead"
                )
        else:
            notes.append(
                f"{path} is a Keras 2 file and tf-keras is not installed: compared with the exchange's "
                "Keras 3 rebuild of it, not with Keras 3's own reading (pip install tf-keras to compare "
                "with Keras 2 itself)"
            )
        return _rebuild_side(f"the exchange's Keras 3 rebuild of {path}", graph, read_tensors(path), notes)
    note = ""
    if keras3_loadable:
        try:
            model = keras_adapter.load_keras_file(path, graph, kind)
            return Side(
                f"Keras on {path}",
                lambda inputs: keras_adapter.predict(model, inputs),
                _keras3_layers(model, graph),
                lambda: _keras3_float64(path, model, graph),
            )
        except ExchangeFileError as err:  # e.g. a file Keras 3 cannot deserialize
            note = f" (Keras 3 cannot open the file itself: {str(err).split(': ', 1)[-1]})"
    return _rebuild_side(f"Keras on the tensors of {path}{note}", graph, read_tensors(path), notes)


def _rebuild_side(name: str, graph: Graph, tensors: dict, notes: list[str]) -> Side:
    """The exchange's own Keras 3 model of the graph, Keras 2's activations (which Keras 3 has no
    name for) written in keras.ops (`KERAS_FORMULAS`); an activation without one is refused."""
    from exchange import keras_adapter
    from exchange.kinds.activations import KERAS_FORMULAS, keras_formulas

    with keras_formulas() as used:
        model = keras_adapter.model_from_tensors(graph, tensors)
    if used:
        notes.append(
            "Keras 3 has no "
            + ", ".join(f"{name!r}" for name in sorted(used))
            + ": the rebuild computes "
            + ", ".join(f"{name} as {KERAS_FORMULAS[name][0]}" for name in sorted(used))
            + " in keras.ops"
        )

    def float64() -> Side:
        graph64 = float64_graph(graph)
        with keras_formulas():
            twin = keras_adapter.model_from_tensors(graph64, _float64_tensors(graph64, tensors))
        return Side(
            f"{name}, in float64", lambda inputs: keras_adapter.predict(twin, inputs), _keras3_layers(twin, graph64)
        )

    return Side(name, lambda inputs: keras_adapter.predict(model, inputs), _keras3_layers(model, graph), float64)


def _keras3_layers(model, graph: Graph):
    from exchange import keras_adapter

    return lambda inputs, names: keras_adapter.intermediate_outputs(model, graph, inputs, names)


def _keras3_float64(path: Path, model, graph: Graph) -> Side:
    """The Keras model rebuilt from its own config with every float dtype policy "float64", and
    its weights."""
    import keras

    from exchange import keras_adapter

    with keras_adapter.recursion_room():
        twin = keras.saving.deserialize_keras_object(
            _float64_config(keras.saving.serialize_keras_object(model)), safe_mode=True
        )
    twin.set_weights(_float64_weights(model.get_weights()))
    return Side(
        f"Keras on {path}, rebuilt from its config in float64",
        lambda inputs: keras_adapter.predict(twin, inputs),
        _keras3_layers(twin, float64_graph(graph)),
    )


def _tf_keras_side(path: Path, config_path: Path, by_name: bool) -> Side:
    """Keras 2 itself (tf-keras) on a Keras 2 file. Its config was read and checked by the
    exchange first, so it holds only layers the exchange supports (no Lambda code)."""
    import tf_keras

    from exchange import keras_adapter, keras_files

    if config_path == path:
        model = tf_keras.models.load_model(str(path), compile=False)
    else:
        model = tf_keras.models.model_from_json(json.dumps(keras_files.read_keras_config(config_path)))
        model.load_weights(str(path), by_name=by_name)

    def float64() -> Side:
        twin = tf_keras.models.model_from_json(json.dumps(_float64_config(json.loads(model.to_json()))))
        twin.set_weights(_float64_weights(model.get_weights()))
        return Side(
            f"tf-keras on {path}, in float64",
            lambda inputs: keras_adapter.predict(twin, inputs),
            lambda inputs, names: _tf_keras_layers(twin, inputs, names),
        )

    return Side(
        f"tf-keras (Keras 2) on {path}",
        lambda inputs: keras_adapter.predict(model, inputs),
        lambda inputs, names: _tf_keras_layers(model, inputs, names),
        float64,
    )


def _tf_keras_layers(model, inputs: list, names: list[str]) -> dict[str, np.ndarray]:
    """The outputs of a tf-keras model's top-level layers by name (a shared layer has no one output)."""
    import tf_keras

    outputs = {}
    for name in names:
        try:
            layer = model.get_layer(name)
        except ValueError:
            continue
        if len(layer._inbound_nodes) == 1 and not isinstance(layer.output, (list, tuple)):
            outputs[name] = layer.output
    if not outputs:
        return {}
    probe = tf_keras.Model(model.inputs, list(outputs.values()))
    values = probe.predict(inputs[0] if len(inputs) == 1 else inputs, batch_size=256, verbose=0)
    values = values if isinstance(values, (list, tuple)) else [values]
    return {name: np.asarray(value) for name, value in zip(outputs, values)}


def _torch_side(path: Path, graph: Graph, read_tensors) -> Side:
    tensors = read_tensors(path)
    try:
        from exchange import torch_adapter
    except ImportError:
        return _numpy_side("PyTorch", path, graph, tensors)
    model = torch_adapter.model_from_tensors(graph, tensors)

    def float64() -> Side:
        graph64 = float64_graph(graph)
        twin = torch_adapter.model_from_tensors(graph64, _float64_tensors(graph64, tensors))
        return Side(
            f"PyTorch on {path}, built in float64",
            lambda inputs: torch_adapter.predict(twin, inputs),
            lambda inputs, names: torch_adapter.intermediate_outputs(twin, inputs, names),
        )

    return Side(
        f"PyTorch on {path}",
        lambda inputs: torch_adapter.predict(model, inputs),
        lambda inputs, names: torch_adapter.intermediate_outputs(model, inputs, names),
        float64,
    )


def _generated_code_side(code_path: Path, weights_path: Path, graph: Graph) -> Side:
    """Import the generated module from its file and load its weights file; its float64 twin is
    the same module `.double()`, where its code casts to no float dtype of its own."""
    from exchange import torch_adapter
    from exchange.torch_adapter import class_name

    sys.dont_write_bytecode = True  # no __pycache__ left beside the user's output
    try:
        spec = importlib.util.spec_from_file_location(f"generated_{code_path.stem}", code_path)
        if spec is None or spec.loader is None:
            raise ImportError(f"no module spec for {code_path}")
        generated = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(generated)
        model = getattr(generated, class_name(graph.name))()
        model.load_state_dict(generated.load(str(weights_path)), strict=True)
        model.exchange_graph = graph
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 (anything the generated code raises is a bug of the generator)
        raise ExchangeError(
            f"{code_path}: the generated code does not run ({type(err).__name__}: {first_line(err)}); please report it"
        ) from None

    def run(inputs: list) -> list:
        try:
            return torch_adapter.predict(model, inputs)
        except MemoryError:
            raise
        except Exception as err:  # noqa: BLE001
            raise ExchangeError(
                f"{code_path}: the generated code does not run ({type(err).__name__}: "
                f"{first_line(err)}); please report it"
            ) from None

    def float64() -> Side:
        model.double()
        model.exchange_graph = float64_graph(graph)
        return Side(f"the generated PyTorch code {code_path}, .double()", run)

    casts = _float_casts(graph)
    return Side(
        f"the generated PyTorch code {code_path}",
        run,
        None,
        None if casts else float64,
        f"the generated code casts to {casts}" if casts else None,
    )


def _float_casts(graph: Graph) -> str:
    """The floating-point dtypes the torch module casts values to (`x.to(torch.float16)`), which a
    `.double()` would not change; empty when there are none."""
    import torch

    from exchange import torch_adapter

    module = torch_adapter.build_module(graph)
    dtypes = {
        str(argument).replace("torch.", "")
        for node in module.graph.nodes
        if node.op == "call_method" and node.target == "to"
        for argument in node.args[1:]
        if isinstance(argument, torch.dtype) and argument.is_floating_point
    }
    return ", ".join(sorted(dtypes))


if __name__ == "__main__":  # run as `python -m`: use the package's copy of this module, as cli does
    from exchange.verify import child_main as package_child_main

    package_child_main(Path(sys.argv[1]))
