"""Preprocessing layers that compute a fixed function of their input: Resizing, CenterCrop and
AutoContrast, the integer lookups, encodings and hashes (IntegerLookup, CategoryEncoding,
Discretization, Hashing, HashedCrossing), Pipeline; and the layers that cannot be, refused with
their reason (StringLookup, TextVectorization, and Hashing of strings: torch has no string tensors).

Conventions that differ:
- Keras resizes with TensorFlow's `tf.image.resize` (v2: half-pixel centres, a kernel per method,
  float32 weights; see `KerasResize` for each method's). torch's `F.interpolate` differs from it in
  several methods (bicubic's a = -0.75, no Lanczos, area only by whole factors), so the torch side
  is `KerasResize`, which computes TensorFlow's taps and weights for each axis from the sizes at
  call time and applies them rows then columns: every interpolation, with or without antialias,
  any ratio, and images of unknown height and width (`Input((None, None, 3))`).
- `crop_to_aspect_ratio` / `pad_to_aspect_ratio`: Keras crops (or pads with `fill_value`) to the
  target's aspect ratio before resizing, the amounts computed in float32 and rounded toward zero;
  `KerasResize` computes them the same way (`float32_quotient`), at call time.
- `data_format="channels_first"`: the Keras image is (channels, height, width), which the torch
  side holds as (width, channels, height) like any rank-4 tensor; it permutes it to Keras's
  (channels, height, width), already torch's image layout, resizes, and permutes back. A rank-3
  Keras input (batch, a, b) is one unbatched image to Keras: channels_first, (channels = batch,
  height = a, width = b), resized per sample the same way; channels_last it would be (height =
  batch, ...), which resizes across the batch: refused.
- CategoryEncoding and Discretization encode ids of any rank in Keras's order (batch, d1, ..., dk):
  the torch side moves its channels-first ids back to that order, encodes, and moves the depth
  axis first. `one_hot` appends the depth axis (replacing a last axis of size 1); `multi_hot` and
  `count` reduce axis 1, the first after the batch, as TensorFlow's `multi_hot` does (not the
  last axis).
- CenterCrop crops the centre where the input is at least the target size on both axes; otherwise
  Keras crops to the target's aspect ratio (in Python floats, `smart_resize`) and resizes
  bilinearly, and so does the torch side (`KerasResize(center_crop=True)`, deciding at call time
  where the sizes are unknown). Keras traced with unknown sizes always crops, even an image
  smaller than the target (a shape Keras did not declare); the torch side follows Keras's eager
  (known-size) behaviour.
- AutoContrast (active at inference) takes each image's minimum and maximum over Keras's axes 1
  and 2 whatever its data_format (height and width channels-last; channels and height
  channels-first, as Keras 3.15 does): those are torch's axes 2 and 3 in both layouts. A flat
  image divides by zero; Keras keeps the input where the result is NaN, and so does the torch side.
- Hashing hashes the decimal string of each integer (`tf.as_string`; floats are cast to int64
  first: toward zero, NaN, infinities and out-of-range values to int64's minimum, as TensorFlow's
  cast does on x86): FarmHash Fingerprint64, or with a `salt` SipHash-2-4 keyed by the two salt
  words, the unsigned 64-bit hash mod num_bins. torch has neither strings nor uint64, so the torch
  side (`torch_modules.hash_integers`) builds the digits with integer division and computes both
  hashes on int64 words (wrapping `+` and `*`, unsigned shifts and modulo written out), bit for
  bit TensorFlow's (checked on thousands of values, 0, int64's extremes, every digit count).
  `mask_value` is compared before the cast (floats in their own type) and gets bin 0, the other
  values num_bins - 1 bins from 1. Keras does not cast a Hashing layer's float inputs to its dtype.
- HashedCrossing (TensorFlow's `sparse.cross_hashed`) hashes the int64 values themselves, not
  their strings: FingerprintCat64 folded over the features from the key 0xDECAFCAFFE.
- IntegerLookup with several OOV indices and `oov_method="farmhash"` hashes an unknown value's
  decimal string as Hashing does. Its encoded outputs (one_hot, multi_hot, count) are int64, as
  Keras's are; the mask token takes no column there (it counts nowhere) and tf_idf multiplies the
  float32 counts by the idf weights, the special indices weighted by their mean (float64, then
  float32) unless the vocabulary lists them. A vocabulary that starts with the special tokens
  (mask, OOV) is read without them, as Keras reads it.
- Encoded outputs (one_hot, multi_hot, count, tf_idf) of longer inputs than (batch, steps) are
  refused where Keras's own output disagrees with its output shape (it reduces axis 1, or keeps
  the axes one_hot's shape drops); IntegerLookup's one_hot takes any shape (one column per value).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from exchange.errors import ExchangeError, UnsupportedLayerError
from exchange.kinds import (
    MAX_FEATURES,
    OMIT_DEFAULT,
    TENSOR,
    KerasOptions,
    LayerKind,
    TorchBuilder,
    TorchValue,
    _short,
    check_choice,
    check_int,
    check_known_keys,
    coerce,
    kind_for_keras_class,
    kind_of,
    refuse_keras_class,
    register,
)
from exchange.kinds.axis_order import to_keras_order, to_torch_order

if TYPE_CHECKING:
    from exchange.graph import Node, NodeContext, Shape
    from exchange.ports import AnyPort

STRING_REASON = "torch has no string tensors"
# Keras classes that work on strings, or hash through them: refused, each with its reason.
for _class_name, _why in (
    ("StringLookup", f"it maps strings to ids and {STRING_REASON}"),
    ("TextVectorization", f"it splits and looks up strings and {STRING_REASON}"),
):
    refuse_keras_class(_class_name, _why)

INTERPOLATIONS = ("bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5")
# Image sides: the largest real preprocessing resizes to a few thousand pixels.
MAX_SIDE = MAX_FEATURES


DATA_FORMATS = ("channels_last", "channels_first")


def _image_shape(input_shape: Shape, height: int, width: int, what: str, data_format: str) -> Shape:
    """The Keras shape (no batch axis) of the input image resized to height x width: a
    (height, width, channels) or (channels, height, width) image, or a channels_first
    (batch, height, width) one (Keras's unbatched (channels, height, width))."""
    if len(input_shape) == 2 and data_format == "channels_first":
        return (height, width)
    if len(input_shape) != 3:
        why = " (Keras takes a rank-3 channels_last input for one image whose height is the batch axis)"
        raise UnsupportedLayerError(
            f"{what} takes a {data_format} image, found (batch, {input_shape})" + (why if len(input_shape) == 2 else "")
        )
    if data_format == "channels_last":
        return (height, width, input_shape[2])
    return (input_shape[0], height, width)


def _read_data_format(options: KerasOptions) -> str:
    value = options.take("data_format", None)
    if value is None:
        return "channels_last"
    if value not in DATA_FORMATS:
        raise options.unsupported("data_format", value)
    return cast(str, value)


def torch_image(
    builder: TorchBuilder, value: TorchValue, data_format: str, rank: int, back: bool = False
) -> TorchValue:
    """A channels_first Keras image of `rank` axes after the batch, as torch's (N, C, H, W) or
    (N, H, W) (or back): the permutation between the exchange's torch layout and Keras's."""
    if data_format == "channels_last":
        return value
    return builder.call(builder.torch.permute, value, to_torch_order(rank) if back else to_keras_order(rank))


@dataclass(frozen=True)
class ResizingConfig:
    height: int
    width: int
    interpolation: str = "bilinear"
    crop_to_aspect_ratio: bool = False
    pad_to_aspect_ratio: bool = False
    fill_value: float = 0.0
    antialias: bool = False
    data_format: str = field(default="channels_last", metadata=OMIT_DEFAULT)

    def __post_init__(self) -> None:
        check_choice(self.data_format, DATA_FORMATS, "Resizing data_format")
        check_int(self.height, "Resizing height", MAX_SIDE)
        check_int(self.width, "Resizing width", MAX_SIDE)
        check_choice(self.interpolation, INTERPOLATIONS, "Resizing interpolation")
        if self.crop_to_aspect_ratio and self.pad_to_aspect_ratio:
            raise ExchangeError("Resizing takes crop_to_aspect_ratio or pad_to_aspect_ratio, not both")


@register
class Resizing(LayerKind):
    kind, keras_classes, Config = "resizing", ("Resizing",), ResizingConfig

    def from_keras(self, options: KerasOptions) -> ResizingConfig:
        options.expect("fill_mode", "constant")
        interpolation = options.take("interpolation", "bilinear")
        if interpolation not in INTERPOLATIONS:
            raise options.unsupported("interpolation", interpolation)
        return ResizingConfig(
            options.integer("height"),
            options.integer("width"),
            interpolation,
            options.flag("crop_to_aspect_ratio", False),
            options.flag("pad_to_aspect_ratio", False),
            options.number("fill_value", 0.0),
            options.flag("antialias", False),
            _read_data_format(options),
        )

    def output_shape(self, config: ResizingConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        return _image_shape(input_shapes[0], config.height, config.width, "Resizing", config.data_format)

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config, rank = context.config, len(context.input_shape)
        module = builder.helpers.KerasResize(
            (config.height, config.width),
            interpolation=config.interpolation,
            antialias=config.antialias,
            crop_to_aspect_ratio=config.crop_to_aspect_ratio,
            pad_to_aspect_ratio=config.pad_to_aspect_ratio,
            fill_value=config.fill_value,
        )
        value = builder.module(context, module, torch_image(builder, inputs[0], config.data_format, rank))
        return torch_image(builder, value, config.data_format, rank, back=True)

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        return keras.layers.Resizing(
            config.height,
            config.width,
            interpolation=config.interpolation,
            crop_to_aspect_ratio=config.crop_to_aspect_ratio,
            pad_to_aspect_ratio=config.pad_to_aspect_ratio,
            fill_mode="constant",
            fill_value=config.fill_value,
            antialias=config.antialias,
            data_format=config.data_format,
            **context.keras_identity,
        )


@dataclass(frozen=True)
class CenterCropConfig:
    height: int
    width: int
    data_format: str = field(default="channels_last", metadata=OMIT_DEFAULT)

    def __post_init__(self) -> None:
        check_choice(self.data_format, DATA_FORMATS, "CenterCrop data_format")
        check_int(self.height, "CenterCrop height", MAX_SIDE)
        check_int(self.width, "CenterCrop width", MAX_SIDE)


@register
class CenterCrop(LayerKind):
    kind, keras_classes, Config = "center_crop", ("CenterCrop",), CenterCropConfig

    def from_keras(self, options: KerasOptions) -> CenterCropConfig:
        return CenterCropConfig(options.integer("height"), options.integer("width"), _read_data_format(options))

    def output_shape(self, config: CenterCropConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        return _image_shape(input_shapes[0], config.height, config.width, "CenterCrop", config.data_format)

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config, rank = context.config, len(context.input_shape)
        value = torch_image(builder, inputs[0], config.data_format, rank)
        height, width = (
            context.input_shape[-2:] if config.data_format == "channels_first" or rank == 2 else context.input_shape[:2]
        )
        if height is not None and width is not None and height >= config.height and width >= config.width:
            value = builder.method(value, "narrow", rank - 1, (height - config.height) // 2, config.height)
            value = builder.method(value, "narrow", rank, (width - config.width) // 2, config.width)
        else:  # smaller, or unknown until called: KerasResize decides
            module = builder.helpers.KerasResize((config.height, config.width), center_crop=True)
            value = builder.module(context, module, value)
        return torch_image(builder, value, config.data_format, rank, back=True)

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        return keras.layers.CenterCrop(
            config.height, config.width, data_format=config.data_format, **context.keras_identity
        )


@dataclass(frozen=True)
class AutoContrastConfig:
    value_range: tuple[int | float, int | float] = (0, 255)
    data_format: str = "channels_last"

    def __post_init__(self) -> None:
        check_choice(self.data_format, DATA_FORMATS, "AutoContrast data_format")
        if not isinstance(self.value_range, tuple) or len(self.value_range) != 2:
            raise ExchangeError(f"AutoContrast value_range must be 2 numbers, got {self.value_range!r}")
        for value in self.value_range:
            coerce(value, int | float, "AutoContrast value_range")
        if not self.value_range[0] < self.value_range[1]:
            raise ExchangeError(
                f"AutoContrast value_range must be (low, high) with low < high, got {self.value_range!r}"
            )


@register
class AutoContrast(LayerKind):
    """Deterministic, so it acts at inference too (`helpers.KerasAutoContrast`)."""

    kind, keras_classes, Config = "auto_contrast", ("AutoContrast",), AutoContrastConfig

    def from_keras(self, options: KerasOptions) -> AutoContrastConfig:
        options.expect("bounding_box_format", None)  # boxes only travel in dict inputs
        value_range = options.take("value_range", [0, 255])
        if (
            not isinstance(value_range, (list, tuple))
            or len(value_range) != 2
            or not all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in value_range)
        ):
            raise options.unsupported("value_range", value_range, "must be 2 numbers")
        low, high = sorted(value_range)  # as Keras's constructor does
        if not low < high:
            raise options.unsupported("value_range", value_range, "an empty range divides by zero")
        return AutoContrastConfig((low, high), _read_data_format(options))

    def output_shape(self, config: AutoContrastConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        shape = input_shapes[0]
        if len(shape) != 3:
            raise UnsupportedLayerError(
                f"AutoContrast needs a batch of images (rank 4, batch included), found (batch, {shape})"
            )
        return shape

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        return builder.module(context, builder.helpers.KerasAutoContrast(context.config.value_range), inputs[0])

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        return keras.layers.AutoContrast(
            value_range=config.value_range, data_format=config.data_format, **context.keras_identity
        )


# -- integer lookups and encodings ------------------------------------------------------------

ENCODINGS = ("one_hot", "multi_hot", "count")
# A vocabulary or a list of bin boundaries: real ones hold at most a few million values.
MAX_VALUES = 1 << 22
INTEGER_DTYPES = ("int32", "int64")


def _encoded_shape(input_shape: Shape, depth: int, output_mode: str, what: str) -> Shape:
    """Keras's encoded output shape for ids (batch, d1, ..., dk): `one_hot` appends a depth axis
    (replacing a last axis of size 1 where the ids have one after the batch); `multi_hot` and
    `count` encode along axis 1 and drop it, (batch, d2, ..., dk, depth). Ids of shape (batch,)
    would be counted over the whole batch, an output without a batch axis: refused."""
    if output_mode == "one_hot":
        return (input_shape[:-1] if input_shape and input_shape[-1] == 1 else input_shape) + (depth,)
    if not input_shape:
        raise UnsupportedLayerError(
            f"{what} output_mode {output_mode!r} on ids of shape (batch,) counts over the "
            f"whole batch (Keras's output ({depth},) has no batch axis); not supported"
        )
    return tuple(input_shape[1:]) + (depth,)


def _encode_in_keras_order(
    builder: TorchBuilder, context: NodeContext, module: Any, inputs: list[TorchValue]
) -> TorchValue:
    """Call an encoding `module` on Keras-ordered values: the inputs permuted from the torch
    layout, the encoded output permuted back (one_hot of (batch, d1, ..., dk) adds an axis)."""
    rank, output_rank = len(context.input_shape), len(context.output_shape)
    if rank >= 2:
        inputs = [builder.call(builder.torch.permute, value, to_keras_order(rank)) for value in inputs]
    value = builder.module(context, module, *inputs)
    if output_rank >= 2:
        value = builder.call(builder.torch.permute, value, to_torch_order(output_rank))
    return value


@dataclass(frozen=True)
class CategoryEncodingConfig:
    num_tokens: int
    output_mode: str = "multi_hot"
    count_weights: bool = field(default=False, metadata=OMIT_DEFAULT)  # weights given: a second input

    def __post_init__(self) -> None:
        check_int(self.num_tokens, "CategoryEncoding num_tokens", MAX_VALUES)
        check_choice(self.output_mode, ENCODINGS, "CategoryEncoding output_mode")
        if not isinstance(self.count_weights, bool) or (self.count_weights and self.output_mode != "count"):
            raise ExchangeError(
                f"CategoryEncoding count_weights={self.count_weights!r} needs output_mode 'count' "
                "(Keras raises otherwise)"
            )


@register
class CategoryEncoding(LayerKind):
    """Integer ids -> one-hot, multi-hot or count vectors (`KerasCategoryEncoding`), in the layer's
    float dtype; `count` with `count_weights` (a tensor of the ids' shape, cast to that dtype, the
    node's second input) sums the weights instead of ones. Ids outside [0, num_tokens) count
    nowhere in either framework (TensorFlow raises on a negative id in multi_hot and count mode;
    torch gives zeros there). Keras's declared shape for multi_hot and count on ids
    (batch, d1, ..., dk), k >= 2, is (batch, d1, ..., dk-1, depth) while it computes
    (batch, d2, ..., dk, depth): such ids are refused unless the two agree."""

    kind, keras_classes, Config = "category_encoding", ("CategoryEncoding",), CategoryEncodingConfig
    tensor_kwargs = ("count_weights",)

    def reads_integers(self, node: Node, position: int) -> bool:
        return position == 0

    def from_keras(self, options: KerasOptions) -> CategoryEncodingConfig:
        options.expect("sparse", False)
        mode = options.take("output_mode", "multi_hot")
        mode = "multi_hot" if mode == "binary" else mode
        if mode not in ENCODINGS:
            raise options.unsupported("output_mode", mode)
        tensors = sum(argument is None for argument in options.call_args) + sum(
            value is TENSOR for value in options.call_kwargs.values()
        )
        unknown = sorted(key for key in options.call_kwargs if key != "count_weights")
        if unknown or tensors > 2 or options.call_kwargs.get("count_weights", TENSOR) is not TENSOR:
            raise UnsupportedLayerError(f"{options.where()}: only a count_weights tensor may be passed with the ids")
        weighted = tensors == 2
        if weighted and mode != "count":
            raise options.unsupported("output_mode", mode, "count_weights need output_mode 'count'")
        return CategoryEncodingConfig(options.integer("num_tokens"), mode, weighted)

    def output_shape(self, config: CategoryEncodingConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        ids = input_shapes[0]
        if config.count_weights and (len(input_shapes) != 2 or input_shapes[1] != ids):
            raise ExchangeError(
                f"CategoryEncoding count_weights of shape (batch, {input_shapes[1:]}) do not match "
                f"ids of shape (batch, {ids})"
            )
        shape = _encoded_shape(ids, config.num_tokens, config.output_mode, "CategoryEncoding")
        declared = tuple(ids[:-1]) + (config.num_tokens,)
        if config.output_mode != "one_hot" and len(ids) >= 2 and (shape != declared or None in ids):
            raise UnsupportedLayerError(
                f"CategoryEncoding output_mode {config.output_mode!r} on ids of shape "
                f"(batch, {ids}): Keras declares (batch, {declared}) but computes "
                f"(batch, {shape}); not supported"
            )
        return shape

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config = context.config
        module = builder.helpers.KerasCategoryEncoding(
            config.num_tokens, config.output_mode, output_dtype=builder.dtype(context)
        )
        return _encode_in_keras_order(builder, context, module, inputs)

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        return keras.layers.CategoryEncoding(
            config.num_tokens, output_mode=config.output_mode, **context.keras_identity
        )

    def keras_call(self, keras_layer: Any, arguments: list[Any], context: NodeContext) -> Any:
        if context.config.count_weights:
            return keras_layer(arguments[0], count_weights=arguments[1])
        return keras_layer(arguments[0])


@dataclass(frozen=True)
class DiscretizationConfig:
    bin_boundaries: tuple[float, ...]
    output_mode: str = "int"

    def __post_init__(self) -> None:
        if not isinstance(self.bin_boundaries, tuple) or len(self.bin_boundaries) > MAX_VALUES:
            raise ExchangeError(f"Discretization takes at most {MAX_VALUES:,} bin boundaries")
        for value in self.bin_boundaries:
            coerce(value, float, "Discretization bin boundary")
        if list(self.bin_boundaries) != sorted(self.bin_boundaries):
            raise ExchangeError("Discretization bin boundaries must be sorted")
        check_choice(self.output_mode, ("int",) + ENCODINGS, "Discretization output_mode")


@register
class Discretization(LayerKind):
    """Values -> the index of their bin (int32, `torch.bucketize(right=True)`, Keras's `digitize`),
    or those indices encoded as CategoryEncoding does. Keras compares float32 values with float32
    boundaries; so does the torch side."""

    kind, keras_classes, Config = "discretization", ("Discretization",), DiscretizationConfig

    def keeps_order(self, config: DiscretizationConfig) -> bool:
        return config.output_mode == "int"  # element-wise then

    def integer_output(self, config: DiscretizationConfig) -> str | None:
        return "int32" if config.output_mode == "int" else None

    def from_keras(self, options: KerasOptions) -> DiscretizationConfig:
        options.expect("sparse", False)
        options.take("num_bins", None)  # how adapt() chose the boundaries
        options.take("epsilon", None)
        boundaries = options.take("bin_boundaries", None)
        if boundaries is None:
            raise options.unsupported("bin_boundaries", boundaries, "not adapted: no boundaries to compute with")
        if not isinstance(boundaries, list) or not all(
            isinstance(value, (int, float)) and not isinstance(value, bool) for value in boundaries
        ):
            raise options.unsupported("bin_boundaries", boundaries, "must be a list of numbers")
        mode = options.take("output_mode", "int")
        if mode not in ("int",) + ENCODINGS:
            raise options.unsupported("output_mode", mode)
        return DiscretizationConfig(tuple(float(np.float32(value)) for value in boundaries), mode)

    def output_shape(self, config: DiscretizationConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        if config.output_mode == "int":
            return input_shapes[0]
        return _encoded_shape(input_shapes[0], len(config.bin_boundaries) + 1, config.output_mode, "Discretization")

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config = context.config
        module = builder.helpers.KerasDiscretization(
            list(config.bin_boundaries), config.output_mode, output_dtype=builder.dtype(context)
        )
        if config.output_mode == "int":  # element-wise: in any layout
            return builder.module(context, module, inputs[0])
        return _encode_in_keras_order(builder, context, module, inputs)

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        return keras.layers.Discretization(
            bin_boundaries=list(config.bin_boundaries), output_mode=config.output_mode, **context.keras_identity
        )


LOOKUP_MODES = ("int",) + ENCODINGS + ("tf_idf",)


@dataclass(frozen=True)
class IntegerLookupConfig:
    vocabulary: tuple[int, ...]
    mask_token: int | None = None
    num_oov_indices: int = 1
    vocabulary_dtype: str = "int64"
    invert: bool = field(default=False, metadata=OMIT_DEFAULT)  # indices -> values
    oov_token: int = field(default=-1, metadata=OMIT_DEFAULT)  # what an inverted unknown index gives
    output_mode: str = field(default="int", metadata=OMIT_DEFAULT)
    oov_method: str = field(default="floormod", metadata=OMIT_DEFAULT)  # how several OOV indices are chosen
    salt: tuple[int, int] | None = field(default=None, metadata=OMIT_DEFAULT)  # farmhash: SipHash's key
    max_tokens: int | None = field(default=None, metadata=OMIT_DEFAULT)  # the encoded width, padded
    idf_weights: tuple[float, ...] | None = field(default=None, metadata=OMIT_DEFAULT)  # tf_idf: one per value

    def __post_init__(self) -> None:
        if not isinstance(self.vocabulary, tuple) or not 1 <= len(self.vocabulary) <= MAX_VALUES:
            raise ExchangeError(f"IntegerLookup needs a vocabulary of 1 to {MAX_VALUES:,} values")
        for value in self.vocabulary + ((self.mask_token,) if self.mask_token is not None else ()):
            check_int(value, "IntegerLookup vocabulary value or mask_token", (1 << 63) - 1, -(1 << 63))
        if len(set(self.vocabulary)) != len(self.vocabulary) or self.mask_token in self.vocabulary:
            raise ExchangeError("IntegerLookup vocabulary values must be distinct and differ from mask_token")
        check_int(self.num_oov_indices, "IntegerLookup num_oov_indices", MAX_VALUES, minimum=0 if self.invert else 1)
        check_int(self.oov_token, "IntegerLookup oov_token", (1 << 63) - 1, -(1 << 63))
        check_choice(self.vocabulary_dtype, INTEGER_DTYPES, "IntegerLookup vocabulary_dtype")
        check_choice(self.output_mode, ("int",) if self.invert else LOOKUP_MODES, "IntegerLookup output_mode")
        check_choice(self.oov_method, ("floormod", "farmhash"), "IntegerLookup oov_method")
        _check_salt(self.salt, "IntegerLookup")
        if self.max_tokens is not None:
            check_int(
                self.max_tokens, "IntegerLookup max_tokens", MAX_VALUES, minimum=self.token_start + len(self.vocabulary)
            )
        if (self.idf_weights is not None) != (self.output_mode == "tf_idf"):
            raise ExchangeError("IntegerLookup takes idf_weights with output_mode 'tf_idf' only, and needs them there")
        if self.idf_weights is not None:
            if not isinstance(self.idf_weights, tuple) or len(self.idf_weights) != len(self.vocabulary):
                raise ExchangeError("IntegerLookup needs one idf weight per vocabulary value")
            for weight in self.idf_weights:
                coerce(weight, float, "IntegerLookup idf weight")

    @property
    def oov_start(self) -> int:
        """Keras's first OOV index: after the mask's, which only output_mode "int" has."""
        return 1 if self.mask_token is not None and self.output_mode == "int" else 0

    @property
    def token_start(self) -> int:
        return self.oov_start + self.num_oov_indices

    @property
    def depth(self) -> int:
        """The encoded width: max_tokens where the output is padded to it, else every index."""
        return self.max_tokens if self.max_tokens is not None else self.token_start + len(self.vocabulary)

    def padded_idf_weights(self) -> list[float]:
        """Keras's idf weight per column: the special indices weighted by the mean (in float64),
        the columns past the vocabulary (padding) by 0."""
        if self.idf_weights is None:
            raise ExchangeError("IntegerLookup: only tf_idf has idf weights")
        front = [float(np.average(self.idf_weights))] * self.token_start
        return front + list(self.idf_weights) + [0.0] * (self.depth - self.token_start - len(self.vocabulary))


@register
class IntegerLookup(LayerKind):
    """Integer values -> int64 indices into [mask] + [OOV indices] + vocabulary
    (`KerasIntegerLookup`), or with `invert` indices -> values; or those indices encoded (one_hot,
    multi_hot, count: int64; tf_idf: float32). The vocabulary must be in the config."""

    kind, keras_classes, Config = "integer_lookup", ("IntegerLookup",), IntegerLookupConfig

    def keeps_order(self, config: IntegerLookupConfig) -> bool:
        return config.output_mode == "int"  # element-wise then

    def reads_integers(self, node: Node, position: int) -> bool:
        return position == 0

    def integer_output(self, config: IntegerLookupConfig) -> str | None:
        return None if config.output_mode == "tf_idf" else "int64"

    def from_keras(self, options: KerasOptions) -> IntegerLookupConfig:
        options.expect("sparse", False)
        mode = options.take("output_mode", "int")
        if mode not in LOOKUP_MODES:
            raise options.unsupported("output_mode", mode)
        options.take("vocabulary_size", None)  # derived from the vocabulary
        vocabulary = options.take("vocabulary", None)
        if (
            not isinstance(vocabulary, list)
            or not vocabulary
            or not all(isinstance(value, int) and not isinstance(value, bool) for value in vocabulary)
        ):
            raise options.unsupported(
                "vocabulary",
                vocabulary,
                "a list of integers in the config is needed (an adapted or file vocabulary is not in the config)",
            )
        mask_token = options.take("mask_token", None)
        if mask_token is not None and (not isinstance(mask_token, int) or isinstance(mask_token, bool)):
            raise options.unsupported("mask_token", mask_token, "must be an integer")
        invert = options.flag("invert", False)
        if invert and mode != "int":
            raise options.unsupported("output_mode", mode, "Keras inverts to values, output_mode 'int' only")
        oov_token = options.integer("oov_token", -1)
        num_oov_indices = options.integer("num_oov_indices", 1)
        if num_oov_indices < (0 if invert else 1):
            raise options.unsupported(
                "num_oov_indices", num_oov_indices, "Keras raises on an unknown value then, which a torch module cannot"
            )
        oov_method, salt = "floormod", None
        if num_oov_indices > 1 and not invert:
            oov_method = options.take("oov_method", "floormod")
            if oov_method not in ("floormod", "farmhash"):
                raise options.unsupported("oov_method", oov_method)
            salt = _read_salt(options) if oov_method == "farmhash" else options.take("salt", None)
            if oov_method == "floormod" and salt is not None:
                raise options.unsupported("salt", salt, "Keras takes a salt with oov_method 'farmhash' only")
        else:
            options.take("oov_method", None)  # no OOV hashing with at most one OOV index
            options.take("salt", None)
        dtype = options.take("vocabulary_dtype", "int64")
        if dtype not in INTEGER_DTYPES:
            raise options.unsupported("vocabulary_dtype", dtype)
        max_tokens = options.take("max_tokens", None)  # caps adapt()'s vocabulary; pads encoded outputs
        padded = options.flag("pad_to_max_tokens", False) and mode != "int"
        if padded and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)):
            raise options.unsupported("max_tokens", max_tokens, "pad_to_max_tokens needs an integer max_tokens")
        idf_weights = options.take("idf_weights", None)
        if mode == "tf_idf" and (
            not isinstance(idf_weights, list)
            or not all(isinstance(weight, (int, float)) and not isinstance(weight, bool) for weight in idf_weights)
        ):
            raise options.unsupported("idf_weights", idf_weights, "output_mode 'tf_idf' needs a list of numbers")
        if mode != "tf_idf" and idf_weights is not None:
            raise options.unsupported("idf_weights", idf_weights, "only with output_mode 'tf_idf'")
        # Keras reads a vocabulary that starts with the special tokens without them.
        token_start = (1 if mask_token is not None and mode == "int" else 0) + num_oov_indices
        special = [mask_token] * (token_start - num_oov_indices) + [oov_token] * num_oov_indices
        if token_start and vocabulary[:token_start] == special:
            if mode == "tf_idf":
                raise options.unsupported(
                    "vocabulary",
                    vocabulary[:token_start],
                    "a tf_idf vocabulary that lists "
                    "its special tokens (their idf weights would be lost) is not supported",
                )
            vocabulary = vocabulary[token_start:]
        return IntegerLookupConfig(
            tuple(vocabulary),
            mask_token,
            num_oov_indices,
            dtype,
            invert,
            oov_token,
            mode,
            oov_method,
            salt,
            max_tokens if padded else None,
            None if idf_weights is None else tuple(float(weight) for weight in idf_weights),
        )

    def output_shape(self, config: IntegerLookupConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        shape = input_shapes[0]
        if config.output_mode == "int":
            return shape
        if config.output_mode == "one_hot" and len(shape) >= 1:
            return (shape[:-1] if shape[-1] == 1 else shape) + (config.depth,)
        if len(shape) != 1:
            raise UnsupportedLayerError(
                f"IntegerLookup output_mode {config.output_mode!r} takes values of shape "
                f"(batch, steps); found (batch, {shape}) (Keras's output for it is not its "
                "declared output shape)"
            )
        return (config.depth,)

    def keras3_saved_extras(self, config: IntegerLookupConfig) -> tuple[tuple[str, tuple[Any, ...]], ...]:
        return () if config.idf_weights is None else (("idf_weights", tuple(config.padded_idf_weights())),)

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config = context.config
        module = builder.helpers.KerasIntegerLookup(
            list(config.vocabulary),
            config.mask_token,
            config.num_oov_indices,
            invert=config.invert,
            oov_token=config.oov_token,
            output_mode=config.output_mode,
            oov_method=config.oov_method,
            salt=config.salt,
            depth=None if config.output_mode == "int" else config.depth,
            idf_weights=config.padded_idf_weights() if config.idf_weights is not None else None,
        )
        if config.output_mode == "int":
            return builder.module(context, module, inputs[0])
        return _encode_in_keras_order(builder, context, module, inputs)

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        return keras.layers.IntegerLookup(
            vocabulary=list(config.vocabulary),
            mask_token=config.mask_token,
            num_oov_indices=config.num_oov_indices,
            output_mode=config.output_mode,
            invert=config.invert,
            oov_token=config.oov_token,
            vocabulary_dtype=config.vocabulary_dtype,
            oov_method=config.oov_method,
            salt=None if config.salt is None else list(config.salt),
            max_tokens=config.max_tokens,
            pad_to_max_tokens=config.max_tokens is not None,
            idf_weights=None if config.idf_weights is None else list(config.idf_weights),
            **context.keras_identity,
        )


# -- hashing --------------------------------------------------------------------------------

# A hash's bin count: the unsigned modulo (`torch_modules.unsigned_remainder`) needs it below 2**62,
# and so does an exchange file's JSON. An encoded output has one column per bin: MAX_VALUES.
MAX_BINS = (1 << 62) - 1
# A salt word or a mask value: as far as an exchange file's JSON holds integers.
MAX_INTEGER = (1 << 62) - 1


def _integer_dtype(options: KerasOptions, mode: str) -> str | None:
    """The output's integer dtype: the layer's dtype policy where it names int32 or int64 (Keras's
    int output_mode needs one), else None (the node's float dtype)."""
    value = options.take("dtype", None)
    name = (value.get("config") or {}).get("name") if isinstance(value, dict) else value
    if name in INTEGER_DTYPES:
        return cast(str, name)
    if mode == "int":
        raise options.unsupported("dtype", name, "output_mode 'int' needs an integer dtype, int32 or int64")
    return None


def _read_salt(options: KerasOptions) -> tuple[int, int] | None:
    """Keras's salt: None, one integer (both key words) or two."""
    salt = options.take("salt", None)
    if isinstance(salt, int) and not isinstance(salt, bool):
        salt = [salt, salt]
    if salt is None:
        return None
    if (
        not isinstance(salt, list)
        or len(salt) != 2
        or not all(isinstance(word, int) and not isinstance(word, bool) and abs(word) <= MAX_INTEGER for word in salt)
    ):
        raise options.unsupported("salt", salt, f"must be one or two integers of magnitude at most {MAX_INTEGER:,}")
    return tuple(salt)


def _check_salt(salt: tuple[int, int] | None, what: str) -> None:
    if salt is not None:
        if not isinstance(salt, tuple) or len(salt) != 2:
            raise ExchangeError(f"{what} salt must be two integers")
        for word in salt:
            check_int(word, f"{what} salt", MAX_INTEGER, -MAX_INTEGER)


def _check_bins(num_bins: int, output_mode: str, what: str) -> None:
    check_int(num_bins, f"{what} num_bins", MAX_BINS if output_mode == "int" else MAX_VALUES)


@dataclass(frozen=True)
class HashingConfig:
    num_bins: int
    mask_value: int | None = None
    salt: tuple[int, int] | None = None  # SipHash's key words; None: FarmHash
    output_mode: str = "int"
    integer_dtype: str | None = "int64"  # the output's integer dtype; None: the node's float dtype

    def __post_init__(self) -> None:
        check_choice(self.output_mode, ("int",) + ENCODINGS, "Hashing output_mode")
        _check_bins(self.num_bins, self.output_mode, "Hashing")
        if self.mask_value is not None:
            check_int(self.mask_value, "Hashing mask_value", MAX_INTEGER, -MAX_INTEGER)
        _check_salt(self.salt, "Hashing")
        if self.integer_dtype is not None or self.output_mode == "int":
            check_choice(self.integer_dtype, INTEGER_DTYPES, "Hashing integer dtype")


def _hashed_encoding_shape(input_shape: Shape, depth: int, output_mode: str, what: str) -> Shape:
    """Hashing's encoded shape: ids (batch, steps), or for one_hot also (batch, steps, 1) (the 1
    squeezed); Keras's output for other shapes is not the shape it declares."""
    if output_mode == "one_hot" and len(input_shape) == 2 and input_shape[1] == 1:
        return (input_shape[0], depth)
    if len(input_shape) != 1:
        raise UnsupportedLayerError(
            f"{what} output_mode {output_mode!r} takes values of shape (batch, steps)"
            f"{' or (batch, steps, 1)' if output_mode == 'one_hot' else ''}; found (batch, "
            f"{input_shape}) (Keras's output for it is not its declared output shape)"
        )
    return _encoded_shape(input_shape, depth, output_mode, what)


@register
class Hashing(LayerKind):
    """Integers or floats -> hash bins (`KerasHashing`, see the module docstring), as integers or
    encoded as CategoryEncoding does. Strings, which Keras also hashes, are refused with the
    input (torch has no string tensors)."""

    kind, keras_classes, Config = "hashing", ("Hashing",), HashingConfig
    keeps_input_dtypes = True  # Keras hashes the inputs as given (`_convert_input_args = False`)
    takes_integer_dtype = True

    def reads_integers(self, node: Node, position: int) -> bool:
        return position == 0

    def integer_output(self, config: HashingConfig) -> str | None:
        return config.integer_dtype

    def keeps_order(self, config: HashingConfig) -> bool:
        return config.output_mode == "int"  # element-wise then

    def from_keras(self, options: KerasOptions) -> HashingConfig:
        options.expect("sparse", False)
        mode = options.take("output_mode", "int")
        if mode not in ("int",) + ENCODINGS:
            raise options.unsupported("output_mode", mode)
        mask_value = options.take("mask_value", None)
        if mask_value is not None and (
            not isinstance(mask_value, int) or isinstance(mask_value, bool) or abs(mask_value) > MAX_INTEGER
        ):
            raise options.unsupported(
                "mask_value",
                mask_value,
                f"only integer mask values are supported (a string one masks strings, and {STRING_REASON})",
            )
        return HashingConfig(
            options.integer("num_bins"), mask_value, _read_salt(options), mode, _integer_dtype(options, mode)
        )

    def output_shape(self, config: HashingConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        if config.output_mode == "int":
            return input_shapes[0]
        return _hashed_encoding_shape(input_shapes[0], config.num_bins, config.output_mode, "Hashing")

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config = context.config
        output_dtype = (
            builder.dtype(context) if config.integer_dtype is None else getattr(builder.torch, config.integer_dtype)
        )
        module = builder.helpers.KerasHashing(
            config.num_bins, config.mask_value, config.salt, config.output_mode, output_dtype=output_dtype
        )
        if config.output_mode == "int":
            return builder.module(context, module, inputs[0])
        return _encode_in_keras_order(builder, context, module, inputs)

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        identity = {**context.keras_identity, "dtype": config.integer_dtype or context.node.dtype}
        return keras.layers.Hashing(
            config.num_bins,
            mask_value=config.mask_value,
            salt=None if config.salt is None else list(config.salt),
            output_mode=config.output_mode,
            sparse=False,
            **identity,
        )


@dataclass(frozen=True)
class HashedCrossingConfig:
    num_bins: int
    output_mode: str = "int"
    integer_dtype: str | None = "int64"  # the output's integer dtype; None: the node's float dtype

    def __post_init__(self) -> None:
        check_choice(self.output_mode, ("int", "one_hot"), "HashedCrossing output_mode")
        _check_bins(self.num_bins, self.output_mode, "HashedCrossing")
        if self.integer_dtype is not None or self.output_mode == "int":
            check_choice(self.integer_dtype, INTEGER_DTYPES, "HashedCrossing integer dtype")


@register
class HashedCrossing(LayerKind):
    """Two integer features, each (batch,) or (batch, 1), -> the bin of their cross
    (`KerasHashedCrossing`: TensorFlow's FingerprintCat64 of the int64 values), or one-hot."""

    kind, keras_classes, Config = "hashed_crossing", ("HashedCrossing",), HashedCrossingConfig
    takes_list = True
    takes_integer_dtype = True

    def reads_integers(self, node: Node, position: int) -> bool:
        return True

    def integer_output(self, config: HashedCrossingConfig) -> str | None:
        return config.integer_dtype

    def from_keras(self, options: KerasOptions) -> HashedCrossingConfig:
        options.expect("sparse", False)
        mode = options.take("output_mode", "int")
        if mode not in ("int", "one_hot"):
            raise options.unsupported("output_mode", mode)
        return HashedCrossingConfig(options.integer("num_bins"), mode, _integer_dtype(options, mode))

    def output_shape(self, config: HashedCrossingConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        shape = input_shapes[0]
        if len(input_shapes) != 2 or shape not in ((), (1,)) or any(other != shape for other in input_shapes):
            raise ExchangeError(
                f"HashedCrossing takes two features of one shape, (batch,) or (batch, 1) (Keras's "
                "output shape takes two); "
                f"found {[('batch',) + tuple(other) for other in input_shapes]}"
            )
        return shape if config.output_mode == "int" else (config.num_bins,)

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config = context.config
        output_dtype = (
            builder.dtype(context) if config.integer_dtype is None else getattr(builder.torch, config.integer_dtype)
        )
        module = builder.helpers.KerasHashedCrossing(config.num_bins, config.output_mode, output_dtype=output_dtype)
        return builder.module(context, module, *inputs)

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        identity = {**context.keras_identity, "dtype": config.integer_dtype or context.node.dtype}
        return keras.layers.HashedCrossing(config.num_bins, output_mode=config.output_mode, sparse=False, **identity)


# -- Pipeline ---------------------------------------------------------------------------------

PIPELINE_TAKES = "a layer without weights, with one input and one output"
# Layers in one Pipeline: real ones chain a handful of augmentations.
MAX_PIPELINE_LAYERS = 1 << 8


@dataclass(frozen=True)
class PipelineStep:
    """One layer of a Pipeline: its kind, its config and its own Keras name."""

    layer: str
    config: object
    layer_name: str

    def __post_init__(self) -> None:
        kind = kind_of(self.layer)  # raises for an unknown kind
        if not _pipeline_takes(kind):
            raise ExchangeError(f"Pipeline cannot hold a {kind.kind!r} layer: {PIPELINE_TAKES}")
        if not isinstance(self.config, kind.Config):
            raise ExchangeError(
                f"Pipeline: the config of layer {_short(self.layer_name)} is not a {kind.kind!r} config"
            )
        if (
            not isinstance(self.layer_name, str)
            or not 0 < len(self.layer_name) <= 1000
            or "/" in self.layer_name
            or not self.layer_name.isprintable()
        ):
            raise ExchangeError(
                f"Pipeline layer_name {_short(self.layer_name)} is not a Keras layer name "
                "(1 to 1000 printable characters, no '/')"
            )


@dataclass(frozen=True)
class PipelineConfig:
    layers: tuple[PipelineStep, ...]

    def __post_init__(self) -> None:
        if (
            not isinstance(self.layers, tuple)
            or not 1 <= len(self.layers) <= MAX_PIPELINE_LAYERS
            or not all(isinstance(step, PipelineStep) for step in self.layers)
        ):
            raise ExchangeError(f"Pipeline holds 1 to {MAX_PIPELINE_LAYERS} layers")


def _pipeline_takes(kind: LayerKind) -> bool:
    """Whether a Pipeline may hold a layer of this kind: one float tensor in, one out."""
    return (
        not kind.takes_list
        and not kind.selects_output
        and kind.kind != Pipeline.kind
        and type(kind).output_count is LayerKind.output_count
        and type(kind).reads_integers is LayerKind.reads_integers
        and not kind.tensor_kwargs
    )


@register
class Pipeline(LayerKind):
    """keras.layers.Pipeline: its layers applied in order, each converted by its own kind (only
    layers without weights: Keras keeps a Pipeline's variables under paths of its own). Each
    layer's torch modules go below the Pipeline's name (`pipeline.step0`)."""

    kind, keras_classes, Config = "pipeline", ("Pipeline",), PipelineConfig

    def from_keras(self, options: KerasOptions) -> PipelineConfig:
        layers = options.take("layers")
        if not isinstance(layers, list) or not 1 <= len(layers) <= MAX_PIPELINE_LAYERS:
            raise options.unsupported("layers", layers, f"expected a list of 1 to {MAX_PIPELINE_LAYERS} layers")
        steps: list[PipelineStep] = []
        for index, layer_config in enumerate(layers):
            if not isinstance(layer_config, dict) or not isinstance(layer_config.get("config"), dict):
                raise options.unsupported("layers", layer_config, "expected a layer config")
            class_name = layer_config.get("class_name")
            kind = kind_for_keras_class(class_name) if isinstance(class_name, str) else None
            if kind is None or not _pipeline_takes(kind):
                raise options.unsupported("layers", class_name, PIPELINE_TAKES)
            name = layer_config["config"].get("name", f"layer_{index}")
            dtype = layer_config["config"].get("dtype")
            policy = (dtype.get("config") or {}).get("name") if isinstance(dtype, dict) else dtype
            if policy not in (None, "float32"):  # the Pipeline itself has no dtype: float32
                raise options.unsupported("layers", f"{name} with dtype {policy}", "only float32 layers")
            inner = KerasOptions(
                cast(str, class_name),  # a str: it named a kind
                f"{options.layer_name}/{name}",
                layer_config["config"],
                keras2=options.keras2,
            )
            config = kind.from_keras(inner)
            inner.finish()
            steps.append(PipelineStep(kind.kind, config, str(name)))
        return PipelineConfig(tuple(steps))

    def config_from_dict(self, values: Any, node_name: str) -> Any:
        where = f"layer {node_name!r} ({self.kind})"
        if not isinstance(values, dict):
            raise ExchangeError(f"layer {node_name!r}: config must be an object")
        check_known_keys(values, ("layers",), where)
        layers = values.get("layers")
        if not isinstance(layers, list) or not 1 <= len(layers) <= MAX_PIPELINE_LAYERS:
            raise ExchangeError(f"{where}: layers must be a list of 1 to {MAX_PIPELINE_LAYERS} layers")
        steps: list[PipelineStep] = []
        for step in layers:
            if not isinstance(step, dict) or not isinstance(step.get("layer"), str):
                raise ExchangeError(f"{where}: each layer must name its kind")
            check_known_keys(step, ("layer", "config", "layer_name"), where)
            kind = kind_of(step["layer"])
            if not _pipeline_takes(kind):
                raise ExchangeError(f"{where}: cannot hold a {kind.kind!r} layer: {PIPELINE_TAKES}")
            config = kind.config_from_dict(step.get("config", {}), node_name)
            try:
                layer_name: Any = step.get("layer_name")  # checked by PipelineStep
                steps.append(PipelineStep(kind.kind, config, layer_name))
            except ExchangeError as err:
                raise ExchangeError(f"{where}: {err}") from None
        return self.build_config(node_name, layers=tuple(steps))

    def output_shape(self, config: PipelineConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        shape = input_shapes[0]
        for step in config.layers:
            shape = tuple(kind_of(step.layer).output_shape(step.config, (shape,)))
        return shape

    def steps(self, context: NodeContext) -> list[tuple[LayerKind, NodeContext]]:
        """Each layer's kind and context: its input the previous one's output, its torch modules
        below the Pipeline's name."""
        shape = context.input_shape
        steps: list[tuple[LayerKind, NodeContext]] = []
        for index, step in enumerate(context.config.layers):
            kind = kind_of(step.layer)
            output_shape = tuple(kind.output_shape(step.config, (shape,)))
            node = replace(context.node, kind=kind.kind, config=step.config, name=step.layer_name)
            steps.append(
                (
                    kind,
                    replace(
                        context,
                        node=node,
                        torch_name=f"{context.torch_name}.step{index}",
                        input_shapes=(shape,),
                        output_shape=output_shape,
                        flat_source=None,
                        channels_first_flatten=False,
                        input_masks=(None,),
                    ),
                )
            )
            shape = output_shape
        return steps

    def ports(self, context: NodeContext) -> list[AnyPort]:
        for kind, step_context in self.steps(context):
            if kind.ports(step_context):
                raise UnsupportedLayerError(
                    f"layer {context.node.name!r} (Pipeline): layer "
                    f"{_short(step_context.node.name)} ({kind.kind}) has weights, which a "
                    "Pipeline keeps under paths of its own: not supported"
                )
        return []

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        builder.root.add_module(context.torch_name, builder.nn.ModuleDict())  # dropped by fx if left empty
        value = inputs[0]
        for kind, step_context in self.steps(context):
            value = kind.torch_forward(builder, step_context, [value])
        return value

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        layers = [kind.keras_layer(keras, step_context) for kind, step_context in self.steps(context)]
        return keras.layers.Pipeline(layers, name=context.node.name)
