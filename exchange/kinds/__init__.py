"""The registry of layer kinds: one module per family, each kind registered by a decorator.

A kind owns everything about its layers that differs between the frameworks: reading its Keras
config (Keras 2 and Keras 3 spellings), shape inference, its weight ports, its torch form and its
Keras form (and, for a few, a numpy forward). Nothing outside this package branches on a layer
kind: the graph, the file format, the adapters and the CLI ask the kind.

    @register
    class Dense(LayerKind):
        kind, keras_classes, Config = "dense", ("Dense",), DenseConfig
        ...

Registering a kind or a Keras class name twice is an error; an unknown kind or Keras class is an
error naming it.

Conventions that differ (every layer):
- Masks. Keras carries a mask beside a tensor, made by an Embedding with `mask_zero=True`
  (`ids != 0`) or by Masking, and passes it through the layers with `supports_masking` (a kind's
  `passes_mask`; a merge keeps it only when every input carries the same one) to the layers that
  read it (recurrent layers, GlobalAveragePooling1D, attention); any other layer drops it, as in
  Keras. torch has no masks: the graph follows them (`Graph.masks`) and the torch side computes
  each one as a bool tensor (`builder.masks`) for the layers that read it.
- A mask given as a tensor (`layer(x, mask)` or `mask=m`, of a bool, int or float input) is the
  node's last input (`config.mask_input`), kept where it is not 0 unless the kind says otherwise
  (Softmax). Only the kinds that set `mask_position` read one; any other layer given one is refused.
- Integer inputs. Keras's layers treat integer and bool inputs each their own way, so such a
  tensor is read only where a kind says so (`reads_integers`: token ids, lookups and encodings,
  attention or step masks, and the kinds that `casts_integers`, which Keras computes in the layer's
  float dtype); elsewhere it is refused (`exchange.verify.check_integer_inputs`).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import math
import os
import sys
import typing
from collections.abc import Callable, Container
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, overload

if TYPE_CHECKING:  # the graph imports this registry; only the type checker needs these names
    from exchange.graph import Node, NodeContext, Shape
    from exchange.ports import AnyPort

from exchange.errors import ExchangeError, UnsupportedLayerError

KINDS: dict[str, LayerKind] = {}
# The value of a keyword argument of a call that is a tensor, in `KerasOptions.call_kwargs`.
TENSOR = "<tensor>"
# The metadata of a config field written to an exchange file only when it differs from its
# default (`mask_input`): files of models without it stay as they were.
OMIT_DEFAULT = {"omit_default": True}
KERAS_CLASSES: dict[str, LayerKind] = {}
# Keras classes refused for a reason worth saying (`refuse_keras_class`), by class name.
REFUSED_CLASSES: dict[str, str] = {}

# Keras config keys that say nothing about what the layer computes at inference.
IGNORED_SUFFIXES = ("_initializer", "_regularizer", "_constraint")
IGNORED_OPTIONS = {
    "name",
    "trainable",
    "dtype",
    "batch_input_shape",
    "batch_shape",
    "input_shape",
    "activity_regularizer",
    "input_dim",
    "autocast",
    "build_config",
}

# Caps on the sizes a layer config may declare, whichever source it comes from (a Keras config or
# a format-2 graph). Every real model is far below them (all of keras.applications passes); past
# them the frameworks crash natively or allocate without bound.
# A window (kernel or pool, dilated: (k - 1) * dilation + 1) along one axis, and a stride or dilation:
# real windows span at most a few hundred cells (AlexNet's 11, DeepLab's rate-24 3x3 = 49, WaveNet's
# kernel 2 at dilation 512 = 513); TensorFlow segfaults building a `same` pooling of 10**9.
MAX_WINDOW = 1 << 13
# Explicit padding or cropping on one side: keras.applications pads at most 3 cells (ResNet's
# ZeroPadding2D); torch's F.pad and Keras allocate the padded tensor, so 10**9 cannot run.
MAX_PADDING = MAX_WINDOW
# Units, filters, embedding width, key/value dims, depth multipliers, groups: the widest real layers
# are vocabulary projections (Gemma's 262,144 outputs).
MAX_FEATURES = 1 << 20
# An Embedding's vocabulary: real ones are at most a few million (hashed features, 256k word pieces).
MAX_VOCABULARY = 1 << 24
# Attention heads: real models have at most 128.
MAX_HEADS = 1 << 12
# RepeatVector's count: a decoder's sequence length, at most a few thousand steps in real models.
MAX_REPEATS = 1 << 20
# An axis, batch included, either sign: no tensor of the graph has more than graph.MAX_RANK axes.
MAX_AXIS = 9


@dataclasses.dataclass(frozen=True)
class NoConfig:
    """The config of a kind that has no options."""


# A value of the torch graph being built (a `torch.fx.Node`): kinds pass it on, never look inside.
# Any, because its type is torch's, which this framework-neutral module does not import.
TorchValue = Any


class TorchBuilder(Protocol):
    """What a kind's `torch_forward` writes with (`exchange.torch_adapter.TorchGraphBuilder`). Each
    call adds one statement to the module's `forward`, and so one line of generated code."""

    masks: dict[str, TorchValue]  # Keras masks already computed, by name (see `torch_mask`)
    # Whether the module is built to continue training (`training_state.training_module`, generated
    # code with `train_step`): the layers that act only in Keras training then act in `train()`.
    training: bool
    root: Any  # the torch module being built (SpectralNormalization adds a holder module to it)
    graph: Any  # its torch.fx graph

    @property
    def nn(self) -> ModuleType:
        """torch.nn: the standard modules."""

    @property
    def F(self) -> ModuleType:
        """torch.nn.functional."""

    @property
    def torch(self) -> ModuleType: ...

    @property
    def helpers(self) -> ModuleType:
        """exchange.torch_modules: small modules for what torch.nn has not."""

    def dtype(self, context: NodeContext) -> Any:
        """The torch dtype of the node's weights."""

    def module(self, context: NodeContext, module: Any, *args: Any) -> TorchValue:
        """Register `module` under the node's torch name (its state_dict prefix) and call it."""

    def submodule(self, path: str, module: Any, *args: Any) -> TorchValue:
        """Register `module` at a dotted path below a registered one and call it."""

    def call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> TorchValue:
        """Call a torch function (`torch.*` or `F.*`)."""

    def method(self, value: TorchValue, name: str, *args: Any) -> TorchValue:
        """Call a tensor method (`value.narrow(...)`)."""


class LayerKind:
    """Base class of a layer kind: subclasses set the class attributes and override the hooks
    that apply (see docs/adding-a-layer-kind.md).

    Every kind sets `kind` (its name in exchange files), `keras_classes` (the Keras class names it
    reads) and `Config` (a frozen dataclass, every value explicit), and writes `from_keras`,
    `ports` (if it has weights), `torch_forward` and `keras_layer`. The other attributes describe
    how the graph treats the layer; their defaults fit most layers.

    Training hooks (`exchange.training_state`; defaults: nothing special):
    - `output_activation`: the activation the Keras call ends with (a softmax's logits follow it);
    - `passes_input_in_training`: Keras returns the input tensor itself in training;
    - `logits_not_reproduced`: why a cross-entropy on this output layer is refused;
    - `dense_lookup_gradient`: Keras's gradient is one row per lookup, torch's dense;
    - `training_not_reproduced`: why training this layer in generated code is refused.
    - `acts_in_training`: what the Keras layer does only in training and its torch module does not
      (named in a note); a kind whose layer acts only in training and is reproduced builds its
      module in `torch_forward` when `builder.training` (Dropout: `nn.Dropout`), else the identity.
    """

    kind: str = ""
    keras_classes: tuple[str, ...] = ()
    Config: type = NoConfig
    keeps_element_order = False  # element-wise: a permuted flat order passes through
    variable_aliases: dict[str, tuple[str, ...]] = {}  # Keras variable name -> other names formats give it
    reads_permuted_flat = False  # absorbs a channels-first flatten order into its weights (Dense)
    may_flatten_channels_first = False  # its torch form may flatten channels-first (Flatten)
    takes_list = False  # Keras calls the layer on a list of tensors (merges)
    passes_mask = False  # Keras's `supports_masking`: a mask passes through unchanged
    moves_values = False  # its output holds its input's values, moved (Reshape, Permute, a crop)
    selects_output = False  # an `output` node: picks output `config.index` of its input
    autocasts = True  # a Keras layer casts float inputs to its dtype; keras.ops calls do not
    # Keras computes integer and bool inputs in the layer's float dtype (Dense, LSTM, Rescaling,
    # the image augmentations: measured, `model.predict` gives float32); the torch side casts them.
    # Layers that only move values about (UpSampling, Cropping, Dropout) keep Keras's integers at
    # run time under a float32 symbolic dtype, and LayerNormalization takes its moments in
    # integers (an int8 row comes out one-hot): they read none.
    casts_integers = False
    keeps_input_dtypes = False  # a Keras layer that takes its inputs as given (Hashing): no cast
    # Its Keras dtype may name an integer type (Hashing's "int64": its output's), which the kind
    # reads itself (`integer_output`); the node's dtype is then float32.
    takes_integer_dtype = False
    # The position of `mask` in the Keras call (`call(inputs, mask=None)`: 1), for the kinds that
    # read a mask given as a tensor; such a mask is the node's last input (`mask_name`).
    mask_position: int | None = None
    tensor_kwargs: tuple[str, ...] = ()  # keywords of the call that may be tensors: extra node inputs

    def reads_integers(self, node: Node, position: int) -> bool:
        """Whether the node's input `position` may be an integer tensor. Keras's layers treat
        integer inputs each their own way, so only these are accepted: a mask given as a tensor
        (`config.mask_input`, the last input, kept where `!= 0`); token ids and attention masks
        where their kinds say so; any input of a kind that `casts_integers`."""
        return self.casts_integers or self.is_mask_input(node, position)

    def is_mask_input(self, node: Node, position: int) -> bool:
        """Whether input `position` is a mask given as a tensor (`config.mask_input`: the last)."""
        return bool(getattr(node.config, "mask_input", False)) and position == len(node.inputs) - 1

    def integer_output(self, config: Any) -> str | None:
        """The integer dtype of the layer's output where it is not the node's float dtype (a
        lookup's ids: "int64"); None otherwise. Only kinds that `reads_integers` may read it."""
        return None

    def merged_when_saved(self, config: Any) -> tuple[str, ...]:
        """Keras variables a Keras 3 file leaves out: Keras merges them into another when saving
        (a LoRA adapter into the kernel) and zeroes them on load, so such a file is read with
        zeros for them."""
        return ()

    def keras3_saved_extras(self, config: Any) -> tuple[tuple[str, tuple[Any, ...]], ...]:
        """Entries a Keras 3 file keeps beside the layer's variables, which the config also makes
        (IntegerLookup's tf_idf `idf_weights`, written by its `save_own_variables`): (name, the
        values the config gives). The reader checks them against these (float32) and skips them."""
        return ()

    def may_keep_channels_first(self, config: Any) -> bool:
        """Whether this node's torch form may flatten in channels-first order for a Dense to
        absorb (`may_flatten_channels_first`, unless its config says otherwise)."""
        return self.may_flatten_channels_first

    def keras3_file_variables(self, config: Any, stored: list[Any]) -> list[Any]:
        """The variables a Keras 3 file stores for this layer (read from `keras3_subgroups` in
        order, unnamed) in the layer's variable order; by default as they are. A wrapper that
        tracks its layer's kernel as its own (SpectralNormalization) stores it twice."""
        return stored

    def output_count(self, config: Any) -> int:
        """How many tensors the layer returns (an LSTM with return_state: 3)."""
        return 1

    def output_shapes(self, config: Any, input_shapes: tuple[Shape, ...]) -> list[Shape]:
        """The shape of each output, for layers with several; by default `output_shape`'s."""
        return [self.output_shape(config, input_shapes)]

    def keras3_subgroups(self, config: Any) -> tuple[str, ...]:
        """Where a Keras 3 file keeps this layer's variables, below the layer's group: "" for
        `<group>/vars`, "cell" for an LSTM's `<group>/cell/vars`; their `vars` are read in order."""
        return ("",)

    def output_mask(self, node: Node, input_masks: tuple[str | None, ...]) -> str | None:
        """The mask on this node's output, from its inputs' masks, as Keras's `compute_mask` does:
        a layer without `supports_masking` drops it; one with it passes input 0's on; a merge keeps
        a mask that every input carries. A mask is named by the token ids whose `!= 0` it is, or
        by the layer that made it from its input (`mask_source`)."""
        if not self.passes_mask:
            return None
        if not self.takes_list:
            return input_masks[0]
        present = [mask for mask in input_masks if mask is not None]
        if len(present) < len(input_masks):
            return None
        if len(set(present)) > 1:
            raise UnsupportedLayerError(
                f"layer {node.name!r} ({self.kind}) merges tensors with different masks "
                f"({', '.join(sorted(set(present)))}); not supported"
            )
        return present[0]

    def mask_source(self, node: Node) -> tuple[str, float] | None:
        """For a layer that makes a mask from its input (Masking): (that input, the value), the
        mask being `any(input != value)` over the features, as Keras's config records it. The
        layer names the mask `<name>:mask` in `output_mask` and puts it in `builder.masks`."""
        return None

    def output_masks(self, node: Node, input_masks: tuple[str | None, ...]) -> list[str | None]:
        """The mask of each output, for layers with several; by default `output_mask`'s for all."""
        return [self.output_mask(node, input_masks)] * self.output_count(node.config)

    # -- reading ----------------------------------------------------------------------------

    def from_keras(self, options: KerasOptions) -> Any:
        """The typed config from a Keras layer config; `options.take` every key that matters."""
        return self.Config()

    def config_from_dict(self, values: Any, node_name: str) -> Any:
        """The typed config from the JSON in an exchange file, every field type-checked."""
        if not isinstance(values, dict):
            raise ExchangeError(f"layer {node_name!r}: config must be an object")
        fields = {field.name: field for field in dataclasses.fields(self.Config)}
        check_known_keys(values, fields, f"layer {node_name!r} ({self.kind})")
        hints = typing.get_type_hints(self.Config)
        converted: dict[str, Any] = {}
        for name, field in fields.items():
            if name in values:
                converted[name] = coerce(values[name], hints[name], f"layer {node_name!r} option {name!r}")
            elif field.default is dataclasses.MISSING:
                raise ExchangeError(f"layer {node_name!r} ({self.kind}): option {name!r} is missing")
        return self.build_config(node_name, **converted)

    def build_config(self, node_name: str, **values: Any) -> Any:
        """`Config(**values)`, its checks (`__post_init__`) naming the layer when they refuse it."""
        try:
            return self.Config(**values)
        except ExchangeError as err:
            where = f"layer {node_name!r}"
            raise type(err)(str(err) if str(err).startswith(where) else f"{where} ({self.kind}): {err}") from None

    def keeps_order(self, config: Any) -> bool:
        """Whether this node passes a permuted flat order through (element-wise with no per-
        element constants); `keeps_element_order` unless a config says otherwise."""
        return self.keeps_element_order

    # -- shapes and weights -----------------------------------------------------------------

    def output_shape(self, config: Any, input_shapes: tuple[Shape, ...]) -> Shape:
        """Output shape (Keras layout, no batch axis). Default: the input's (element-wise)."""
        return input_shapes[0]

    def ports(self, context: NodeContext) -> list[AnyPort]:
        """The layer's weights, declared once: each port joins Keras variables (named, with their
        Keras shapes) to torch tensors (`exchange.ports`). Ports are listed in the Keras layer's
        variable order (the order `layer.weights` and the files keep)."""
        return []

    def keras_variables(self, context: NodeContext) -> list[tuple[str, tuple[int, ...]]]:
        """(name, Keras shape) of each Keras variable, in the layer's variable order: read off
        `ports`. A kind whose ports join variables out of that order (MultiHeadAttention packs
        the three kernels, then the three biases) reorders them here."""
        from exchange.ports import TorchOnly

        return [
            (name, shape)
            for port in self.ports(context)
            if not isinstance(port, TorchOnly)
            for name, shape in port.keras_shapes.items()
        ]

    # -- building -------------------------------------------------------------------------

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> Any:
        """Add this node's computation to the torch graph `builder`; return its output value."""
        raise NotImplementedError

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        """The Keras layer for this node, every option explicit (`**context.keras_identity`
        gives its name and dtype)."""
        raise NotImplementedError

    def keras_call(self, keras_layer: Any, arguments: list[Any], context: NodeContext) -> Any:
        """Call the Keras layer on its input tensors (a list for merges)."""
        return keras_layer(arguments if self.takes_list else arguments[0])

    def numpy_forward(self, context: NodeContext, tensors: dict[str, Any], inputs: list[Any]) -> Any:
        """Optional: this node in numpy on the file's tensors (keys without the node prefix)."""
        raise UnsupportedLayerError(
            f"no numpy forward for layer kind {self.kind!r}; install torch or keras to run this model"
        )

    # -- training (exchange.training_state) -------------------------------------------------

    def output_activation(self, config: Any) -> str | None:
        """The activation the Keras layer's call ends with (Dense and the convolutions end with
        `self.activation(x)`), else None. Keras's softmax and sigmoid attach their input to their
        output (`_keras_logits`), and a cross-entropy loss takes it from there
        (`training_state.logits_activation`)."""
        return None

    def passes_input_in_training(self, config: Any) -> bool:
        """Whether the Keras layer returns its input tensor itself in training (Identity, a linear
        Activation, a Dropout of rate 0), so the tensor keeps what Keras attached to it."""
        return False

    def logits_not_reproduced(self, config: Any) -> str | None:
        """Why a cross-entropy loss on this output layer is not reproduced, where Keras may take
        it from logits the torch side cannot give (the refusal names the layer, then this); or
        None."""
        return None

    def dense_lookup_gradient(self, config: Any) -> bool:
        """Whether Keras's gradient of this layer is one row per lookup (`tf.IndexedSlices`) where
        the torch module's is dense (a ReversibleEmbedding, a LoRA Embedding): an optimizer that
        squares the rows one by one is then refused (`training_state.check_lookups`)."""
        return False

    def acts_in_training(self, config: Any) -> str | None:
        """What the Keras layer does in training that its torch module does not, even when built
        for training (`TorchBuilder.training`: a dropout's or a noise's module acts in `train()`):
        a random augmentation; None where nothing. A conversion that carries a
        training state names these layers in a note."""
        return None

    def training_not_reproduced(self, config: Any) -> str | None:
        """Why generated code's `train_step` does not compute what Keras's training does for this
        layer (the refusal names the layer, then this); or None."""
        return None


KindClass = TypeVar("KindClass", bound=LayerKind)


def register(cls: type[KindClass]) -> type[KindClass]:
    kind = cls()
    if not kind.kind or kind.kind in KINDS:
        raise ExchangeError(f"layer kind {kind.kind!r} is empty or registered twice")
    taken = [name for name in kind.keras_classes if name in KERAS_CLASSES]
    if taken:
        raise ExchangeError(f"Keras class(es) {', '.join(taken)} registered twice")
    KINDS[kind.kind] = kind
    KERAS_CLASSES.update({class_name: kind for class_name in kind.keras_classes})
    return cls


def refuse_keras_class(class_name: str, why: str) -> None:
    """Say why a Keras class has no kind (`torch has no string tensors`): its refusal names it."""
    if class_name in KERAS_CLASSES or class_name in REFUSED_CLASSES:
        raise ExchangeError(f"Keras class {class_name} registered twice")
    REFUSED_CLASSES[class_name] = why


def refusal_for_keras_class(class_name: str) -> str | None:
    return REFUSED_CLASSES.get(class_name)


def kind_of(name: str) -> LayerKind:
    if name not in KINDS:
        load_installed_kinds()
    if name not in KINDS:
        raise UnsupportedLayerError(
            f"unsupported layer kind {_short(name)} (known: {', '.join(sorted(KINDS))}; "
            f"a kind of your own is registered with --kinds FILE, see {KINDS_DOC})"
        )
    return KINDS[name]


def kind_for_keras_class(class_name: str) -> LayerKind | None:
    """The kind of a Keras class: a built-in's class name, or a registered class's
    `package>Name` (Keras 3 records it as `registered_name`, Keras 2 as the class name)."""
    if class_name not in KERAS_CLASSES:
        load_installed_kinds()
    return KERAS_CLASSES.get(class_name)


# ---------------------------------------------------------------------------------------------
# Kinds of the user's own: from a Python file named on the command line, or installed packages

KINDS_DOC = "docs/adding-a-layer-kind.md"
ENTRY_POINT_GROUP = "keras_torch_exchange.kinds"  # a package's modules that register kinds when imported
KIND_FILES: list[str] = []  # files `load_kinds_file` ran, in order (the --verify child runs them too)
_installed_kinds_loaded = False


def load_kinds_file(path: str | os.PathLike[str]) -> None:
    """Run a Python file of the user's that registers kinds (`@register`) for their own Keras
    layer classes (`convert.py --kinds my_layers.py`). Its code is the user's, named by the user:
    a model file never names code to run. Each file runs once."""
    path = Path(path).resolve()
    if str(path) in KIND_FILES:
        return
    if not path.is_file() or path.suffix != ".py":
        raise ExchangeError(f"{path}: --kinds takes a Python file (.py) that registers layer kinds")
    spec = importlib.util.spec_from_file_location(f"exchange_user_kinds_{len(KIND_FILES)}", path)
    if spec is None or spec.loader is None:  # not met for a .py file: Python gives it a source loader
        raise ExchangeError(f"{path}: --kinds takes a Python file (.py) that registers layer kinds")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look classes up by module
    try:
        spec.loader.exec_module(module)
    except ExchangeError:
        raise
    except Exception as err:
        raise ExchangeError(f"{path}: loading its layer kinds failed ({type(err).__name__}: {err})") from err
    KIND_FILES.append(str(path))


def load_installed_kinds() -> None:
    """Import, once, the modules installed packages declare in the entry point group
    `keras_torch_exchange.kinds`; each registers its kinds when imported. Called on the first
    kind or Keras class not found, so a converter without plugins imports nothing more."""
    global _installed_kinds_loaded
    if _installed_kinds_loaded:
        return
    _installed_kinds_loaded = True
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry_point.load()
        except Exception as err:
            raise ExchangeError(
                f"installed layer kinds {entry_point.value!r} (entry point {entry_point.name!r}) "
                f"failed to load ({type(err).__name__}: {err})"
            ) from err


def config_to_dict(config: Any) -> dict[str, Any]:
    return {
        field.name: _jsonable(getattr(config, field.name))
        for field in dataclasses.fields(config)
        if not (field.metadata.get("omit_default") and getattr(config, field.name) == field.default)
    }


def mask_name(context: NodeContext) -> str | None:
    """The mask a node reads: its last input when the call gave one (`config.mask_input`, the
    mask is `that tensor != 0`), else the mask its input carries (`Graph.masks`)."""
    if getattr(context.config, "mask_input", False):
        return context.node.inputs[-1]
    return context.input_masks[0]


def torch_mask(builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue | None:
    """The bool (N, T) torch mask a node reads (see `mask_name`), or None. A mask given as a
    tensor (bool, int or float) keeps the steps where it is not 0, as Keras's casts to bool do."""
    name = mask_name(context)
    if name is not None and name not in builder.masks:
        builder.masks[name] = builder.call(builder.torch.ne, inputs[-1], 0)
    return None if name is None else builder.masks[name]


def check_step_mask(config: Any, input_shapes: tuple[Shape, ...]) -> tuple[Shape, ...]:
    """The input shapes without a mask input, after checking that it is (T,) for a (T, F) input."""
    if not getattr(config, "mask_input", False):
        return input_shapes
    if len(input_shapes) < 2 or len(input_shapes[-1]) != 1 or not _sizes_agree(input_shapes[-1][0], input_shapes[0][0]):
        raise ExchangeError(
            f"mask of shape (batch, {input_shapes[-1]}) does not match input of shape "
            f"(batch, {input_shapes[0]}): expected (batch, {input_shapes[0][:1]})"
        )
    return input_shapes[:-1]


def _sizes_agree(first: int | None, second: int | None) -> bool:
    return first is None or second is None or first == second


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return config_to_dict(value)
    if isinstance(value, tuple):
        return [_jsonable(item) for item in value]
    return value


def coerce(value: Any, hint: Any, what: str) -> Any:
    """`value` from JSON as type `hint` (int, float, bool, str, None, tuples of them, unions)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for option in args:
            try:
                return coerce(value, option, what)
            except ExchangeError:
                continue
        raise ExchangeError(f"{what}: {_short(value)} is not a {hint}")
    if hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 1 << 62:
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):  # a nested config, already read by its kind
            return value
    elif origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(item, args[0], what) for item in value)
        if len(value) == len(args):
            return tuple(coerce(item, arg, what) for item, arg in zip(value, args))
    raise ExchangeError(f"{what}: {_short(value)} is not a {getattr(hint, '__name__', hint)}")


def check_known_keys(values: dict[Any, Any], known: Container[Any], where: str) -> None:
    """Refuse keys of a config object that are not among `known`, each echoed with `repr` (a key
    holding a newline stays on the message's one line)."""
    unknown = sorted(key for key in values if key not in known)
    if unknown:
        raise ExchangeError(f"{where}: unknown option(s) {', '.join(map(_short, unknown))}")


def check_int(value: object, what: str, maximum: int, minimum: int = 1) -> int:
    """`value` as an int in [minimum, maximum], or an error naming `what` and both bounds."""
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        raise ExchangeError(f"{what} must be an integer from {minimum} to {maximum:,}, got {_short(value)}")
    return value


def check_ints(
    values: object, what: str, maximum: int, minimum: int = 1, count: tuple[int, ...] = ()
) -> tuple[int, ...]:
    """A tuple of ints each in [minimum, maximum]; `count`, when given, the lengths allowed."""
    if not isinstance(values, tuple) or (count and len(values) not in count):
        raise ExchangeError(f"{what} must be {' or '.join(map(str, count)) or 'some'} integers, got {_short(values)}")
    for value in values:
        check_int(value, what, maximum, minimum)
    return values


def check_choice(value: Any, allowed: tuple[Any, ...], what: str) -> Any:
    """`value` is one of `allowed` (an enum-like option: a padding, a merge mode)."""
    if value not in allowed or isinstance(value, bool):
        raise ExchangeError(f"{what} {_short(value)} is not one of {', '.join(map(repr, allowed))}")
    return value


def known(size: int | None, what: str) -> int:
    """A size that weights are built from (a kernel's input features). Shape inference refuses
    unknown ones before a kind builds weights; None here is an error naming `what`."""
    if size is None:
        raise ExchangeError(f"{what} must be a known size, found None")
    return size


def known_shape(shape: Shape, what: str) -> tuple[int, ...]:
    """`shape` with every size known (see `known`)."""
    return tuple(known(size, what) for size in shape)


def check_axis(axis: object, rank: int) -> int:
    """A Keras axis (batch included, may be negative) of an input of `rank` axes after the batch:
    one of its feature axes, as a positive axis in 1..rank."""
    axis = check_int(axis, "axis", MAX_AXIS, -MAX_AXIS)
    positive = axis + rank + 1 if axis < 0 else axis
    if not 1 <= positive <= rank:
        raise ExchangeError(f"axis {axis} is not a feature axis of a rank-{rank + 1} input (batch included)")
    return positive


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class KerasOptions:
    """A Keras layer's config, read option by option so that nothing is silently ignored.

    `take` reads an option (with its Keras 2 spelling as a fallback); `finish` refuses any option
    that was neither taken nor is known not to matter at inference.
    """

    def __init__(
        self,
        class_name: str,
        layer_name: str,
        config: dict[str, Any],
        keras2: bool = False,
        call_args: list[Any] | None = None,
        call_kwargs: dict[str, Any] | None = None,
        mask_given: bool = False,
        mask_input: bool = False,
    ) -> None:
        self.class_name, self.layer_name, self.config = class_name, layer_name, config
        self.keras2 = keras2  # read from a Keras 2 file: some defaults and meanings differ
        self.call_args = call_args or []  # positional arguments of the call: None for a tensor
        # keyword arguments of the call (but `mask`): a constant's value, or TENSOR for a tensor, which
        # is a node input after the positional ones, in this dict's order (`LayerKind.tensor_kwargs`)
        self.call_kwargs = call_kwargs or {}
        self.mask_given = mask_given  # the call passes `mask=` explicitly (Keras 3 records it)
        # ... and that mask is a tensor of the model (an input, a layer's output), not the
        # Embedding's `ids != 0`: the node's last input. A kind reading it calls `take_mask_input`.
        self.mask_input = mask_input
        self.mask_taken = False
        self.taken: set[str] = set()

    def where(self) -> str:
        return f"layer {self.layer_name!r} ({self.class_name})"

    def take(self, key: str, default: Any = dataclasses.MISSING, *, keras2: str | None = None) -> Any:
        for spelling in (key, keras2):
            if spelling is not None and spelling in self.config:
                self.taken.add(spelling)
                return self.config[spelling]
        if default is dataclasses.MISSING:
            raise UnsupportedLayerError(f"{self.where()}: option {key!r} is missing")
        return default

    @overload
    def wrapped_layer(
        self, key: str, accepts: Callable[[LayerKind], bool], what: str, required: Literal[True] = True
    ) -> tuple[LayerKind, Any, str]: ...
    @overload
    def wrapped_layer(
        self, key: str, accepts: Callable[[LayerKind], bool], what: str, required: bool
    ) -> tuple[LayerKind, Any, str] | None: ...

    def wrapped_layer(
        self, key: str, accepts: Callable[[LayerKind], bool], what: str, required: bool = True
    ) -> tuple[LayerKind, Any, str] | None:
        """(kind, config, Keras name) of the layer a wrapper holds in option `key`
        (TimeDistributed's and Bidirectional's `layer`), read with the wrapper's name in errors;
        `accepts(kind)` says which kinds the wrapper takes, `what` names them. None when the
        option is absent and not `required`."""
        layer_config = self.take(key) if required else self.take(key, None)
        if layer_config is None and not required:
            return None
        if not isinstance(layer_config, dict) or not isinstance(layer_config.get("config"), dict):
            raise self.unsupported(key, layer_config, "expected a layer config")
        class_name = layer_config.get("class_name")
        kind = kind_for_keras_class(class_name) if isinstance(class_name, str) else None
        if not isinstance(class_name, str) or kind is None or not accepts(kind):
            raise self.unsupported(key, class_name, what)
        name = str(layer_config["config"].get("name", key))
        inner = KerasOptions(class_name, f"{self.layer_name}/{name}", layer_config["config"], keras2=self.keras2)
        config = kind.from_keras(inner)
        inner.finish()
        return kind, config, name

    # One reader per type of option: a kind never converts a raw value itself (`bool("no")` is True).

    def flag(self, key: str, default: bool) -> bool:
        """A true/false option: anything but a JSON boolean is refused (`"no"` is not false)."""
        value = self.take(key, default)
        if not isinstance(value, bool):
            raise self.unsupported(key, value, "must be true or false")
        return value

    def integer(self, key: str, default: Any = dataclasses.MISSING, *, keras2: str | None = None) -> int:
        """A whole-number option (`units`, `groups`); `3.0` is refused, as is `true`."""
        value = self.take(key, default, keras2=keras2)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.unsupported(key, value, "must be an integer")
        return value

    def number(self, key: str, default: Any = dataclasses.MISSING, *, keras2: str | None = None) -> float:
        """A finite real option (`epsilon`, `momentum`, a rate), as a float."""
        value = self.take(key, default, keras2=keras2)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise self.unsupported(key, value, "must be a finite number")
        return float(value)

    def sizes(
        self, key: str, count: int, default: Any = dataclasses.MISSING, *, keras2: str | None = None
    ) -> tuple[int, ...]:
        """A per-axis size option (`kernel_size`: `3` or `[3, 5]`) as `count` ints."""
        return ints(self.take(key, default, keras2=keras2), count, f"{self.where()} option {key!r}")

    def activation(self, key: str = "activation") -> str:
        """An activation option, as the exchange's name for it (`exchange.kinds.activations`)."""
        from exchange.kinds.activations import read_activation

        return read_activation(self, key)

    def expect(self, key: str, *allowed: Any) -> None:
        """The option, when present, must be one of `allowed` (what this exchange supports)."""
        value = self.take(key, allowed[0])
        if value not in allowed:
            raise self.unsupported(key, value)

    def unsupported(self, key: str, value: Any, why: str = "") -> UnsupportedLayerError:
        return UnsupportedLayerError(
            f"{self.where()}: unsupported option {key}={_short(value)}" + (f" ({why})" if why else "")
        )

    def take_mask_input(self) -> bool:
        """Whether the call gives a mask tensor (the node's last input); the kind reads it."""
        self.mask_taken = True
        return self.mask_input

    def finish(self) -> None:
        if self.mask_input and not self.mask_taken:
            raise UnsupportedLayerError(
                f"{self.where()}: argument 'mask' given as a tensor is not supported for this layer"
            )
        unknown = sorted(
            key
            for key in self.config
            if key not in self.taken and key not in IGNORED_OPTIONS and not key.endswith(IGNORED_SUFFIXES)
        )
        if unknown:
            raise UnsupportedLayerError(f"{self.where()}: unknown option(s) {', '.join(map(_short, unknown))}")


def ints(value: object, count: int, what: str) -> tuple[int, ...]:
    """A Keras size option (`3` or `[3, 5]`) as `count` ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * count
    if (
        isinstance(value, (list, tuple))
        and len(value) == count
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return tuple(value)
    raise UnsupportedLayerError(f"{what}: expected {count} integers, found {_short(value)}")


# The families. Importing them fills the registry.
from exchange.kinds import (
    activations,
    arithmetic,
    attention,
    conv_lstm,
    convolution,
    dense,
    histogram,
    merging,
    normalization,
    operations,
    pooling,
    preprocessing,
    recurrent,
    reshaping,
    signal,
    training_only,
    wrappers,
)
