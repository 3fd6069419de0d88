"""Preprocessing layers that compute a fixed function of their input: Resizing and CenterCrop; and
the layers that cannot be, refused with their reason (StringLookup, TextVectorization, Hashing,
HashedCrossing: strings or string hashes).

Conventions that differ:
- Keras resizes with TensorFlow's `tf.image.resize` (half-pixel centres); the torch side with
  `F.interpolate` on channels-first images, which matches it mode by mode as follows (each
  measured against TensorFlow 2.21, within float32 rounding):
  - `bilinear`: `F.interpolate(mode="bilinear", align_corners=False)`, with or without antialias.
  - `nearest`: `mode="nearest-exact"` (torch's `nearest` rounds source positions differently).
  - `bicubic` with antialias: `mode="bicubic", antialias=True` (both Keys' cubic with a = -0.5,
    weights renormalised at the borders). Without antialias TensorFlow's bicubic uses a = -0.5 from
    a 1024-entry table and torch's a = -0.75: refused.
  - `area`: `mode="area"` (adaptive average pooling) where each axis changes by a whole factor
    (TensorFlow ignores antialias there); other ratios weigh partial cells differently: refused.
  - `lanczos3`, `lanczos5`: torch has no Lanczos resampling: refused.
- `crop_to_aspect_ratio` / `pad_to_aspect_ratio`: Keras crops (or pads with `fill_value`) to the
  target's aspect ratio before resizing; the sizes are fixed by the input shape, so the torch side
  narrows (or `F.pad`s) by the same amounts, computed here as Keras does (float32 for Resizing,
  Python floats for CenterCrop's `smart_resize`).
- `data_format="channels_first"`: the Keras image is (channels, height, width), which the torch
  side holds as (width, channels, height) like any rank-4 tensor; it permutes it to Keras's
  (channels, height, width), already torch's image layout, resizes, and permutes back.
- CategoryEncoding and Discretization encode ids of any rank in Keras's order (batch, d1, ..., dk):
  the torch side moves its channels-first ids back to that order, encodes, and moves the depth
  axis first. `one_hot` appends the depth axis (replacing a last axis of size 1); `multi_hot` and
  `count` reduce axis 1, the first after the batch, as TensorFlow's `multi_hot` does (not the
  last axis).
- CenterCrop crops the centre where the input is at least the target size on both axes; otherwise
  Keras crops to the target's aspect ratio and resizes bilinearly (`smart_resize`), and so does
  the torch side.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from exchange.errors import ExchangeError, UnsupportedLayerError
from exchange.kinds import (MAX_FEATURES, OMIT_DEFAULT, TENSOR, LayerKind, check_choice, check_int, coerce,
                            refuse_keras_class, register)
from exchange.kinds.layout import to_keras_order, to_torch_order

STRING_REASON = "torch has no string tensors"
# Keras classes that work on strings, or hash through them: refused, each with its reason.
for _class_name, _why in (
        ("StringLookup", f"it maps strings to ids and {STRING_REASON}"),
        ("TextVectorization", f"it splits and looks up strings and {STRING_REASON}"),
        ("Hashing", "Keras hashes the string form of each value (FarmHash Fingerprint64, SipHash with a salt); "
                    f"{STRING_REASON} and no such hash"),
        ("HashedCrossing", "Keras hashes the string form of each feature cross (FarmHash Fingerprint64); "
                           f"{STRING_REASON} and no such hash")):
    refuse_keras_class(_class_name, _why)

INTERPOLATIONS = ("bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5")
# TensorFlow's method -> torch's F.interpolate mode, for the modes that match (see the docstring).
TORCH_MODES = {"bilinear": "bilinear", "nearest": "nearest-exact", "bicubic": "bicubic", "area": "area"}
# Image sides: the largest real preprocessing resizes to a few thousand pixels.
MAX_SIDE = MAX_FEATURES


DATA_FORMATS = ("channels_last", "channels_first")


def _image(shape: tuple, what: str, data_format: str) -> tuple:
    """(height, width, channels) of a Keras image in `data_format`."""
    sides = shape[:2] if data_format == "channels_last" else shape[1:]
    if len(shape) != 3 or None in sides:
        raise UnsupportedLayerError(f"{what} needs a {data_format} image of fixed height and width, found "
                                    f"(batch, {shape})")
    return (*sides, shape[2] if data_format == "channels_last" else shape[0])


def _image_shape(height: int, width: int, channels, data_format: str) -> tuple:
    return (height, width, channels) if data_format == "channels_last" else (channels, height, width)


def _read_data_format(options) -> str:
    value = options.take("data_format", None)
    if value is None:
        return "channels_last"
    if value not in DATA_FORMATS:
        raise options.unsupported("data_format", value)
    return value


def torch_image(builder, value, data_format: str, back: bool = False):
    """A channels_first Keras image as torch's (N, C, H, W) (or back): the permutation between
    the exchange's torch layout and Keras's."""
    if data_format == "channels_last":
        return value
    return builder.call(builder.torch.permute, value, to_torch_order(3) if back else to_keras_order(3))


def _whole_factor(before: int, after: int) -> bool:
    return before % after == 0 or after % before == 0


@dataclass(frozen=True)
class Crop:
    """Rows [top, top + height) and columns [left, left + width) of the input."""

    top: int
    left: int
    height: int
    width: int


def aspect_crop(height: int, width: int, target_height: int, target_width: int, float32: bool) -> Crop:
    """Keras's crop to the target's aspect ratio (`crop_to_aspect_ratio`, `smart_resize`): each
    side at most the input's and at least 1, centred, rounded toward zero; in float32 where Keras
    computes in TensorFlow float32 (Resizing), else in Python floats (smart_resize)."""
    real = np.float32 if float32 else float
    crop_height = max(min(height, int(real(width * target_height) / real(target_width))), 1)
    crop_width = max(min(width, int(real(height * target_width) / real(target_height))), 1)
    return Crop(int(real(height - crop_height) / real(2)), int(real(width - crop_width) / real(2)),
                crop_height, crop_width)


def aspect_padding(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int]:
    """Keras's `pad_to_aspect_ratio` (TensorFlow backend): (rows, columns) of `fill_value` added on
    each side, float32 arithmetic rounded toward zero, the same amount before and after."""
    pad_height = max(height, int(np.float32(width * target_height) / np.float32(target_width)))
    pad_width = max(width, int(np.float32(height * target_width) / np.float32(target_height)))
    return int(np.float32(pad_height - height) / np.float32(2)), int(np.float32(pad_width - width) / np.float32(2))


def torch_resize(builder, value, crop: Crop | None, padding: tuple[int, int], fill_value: float,
                 size: tuple[int, int], interpolation: str, antialias: bool):
    """Crop (narrow) or pad, then resize, on a channels-first image."""
    if crop is not None:
        value = builder.method(value, "narrow", 2, crop.top, crop.height)
        value = builder.method(value, "narrow", 3, crop.left, crop.width)
    rows, columns = padding
    if rows or columns:
        value = builder.call(builder.F.pad, value, (columns, columns, rows, rows), value=fill_value)
    mode = TORCH_MODES[interpolation]
    keywords = {"size": size, "mode": mode}
    if mode in ("bilinear", "bicubic"):
        keywords.update(align_corners=False, antialias=antialias)
    return builder.call(builder.F.interpolate, value, **keywords)


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
        if self.interpolation.startswith("lanczos"):
            raise ExchangeError(f"Resizing interpolation {self.interpolation!r} is not supported (torch has no "
                                "Lanczos resampling)")
        if self.interpolation == "bicubic" and not self.antialias:
            raise ExchangeError("Resizing interpolation 'bicubic' without antialias is not supported (TensorFlow's "
                                "cubic uses a = -0.5, torch's a = -0.75)")


@register
class Resizing(LayerKind):
    kind, keras_classes, Config = "resizing", ("Resizing",), ResizingConfig

    def from_keras(self, options):
        options.expect("fill_mode", "constant")
        interpolation = options.take("interpolation", "bilinear")
        if interpolation not in INTERPOLATIONS:
            raise options.unsupported("interpolation", interpolation)
        return ResizingConfig(options.integer("height"), options.integer("width"), interpolation,
                              options.flag("crop_to_aspect_ratio", False), options.flag("pad_to_aspect_ratio", False),
                              options.number("fill_value", 0.0), options.flag("antialias", False),
                              _read_data_format(options))

    def _plan(self, config, input_shape) -> tuple[Crop | None, tuple[int, int]]:
        height, width, _ = _image(input_shape, "Resizing", config.data_format)
        crop, padding = None, (0, 0)
        if config.crop_to_aspect_ratio:
            crop = aspect_crop(height, width, config.height, config.width, float32=True)
            height, width = crop.height, crop.width
        elif config.pad_to_aspect_ratio:
            padding = aspect_padding(height, width, config.height, config.width)
            height, width = height + 2 * padding[0], width + 2 * padding[1]
        if config.interpolation == "area" and not (_whole_factor(height, config.height)
                                                   and _whole_factor(width, config.width)):
            raise UnsupportedLayerError(f"Resizing interpolation 'area' from {height}x{width} to {config.height}x"
                                f"{config.width} is not supported (only whole factors per axis match torch's)")
        return crop, padding

    def output_shape(self, config, input_shapes):
        self._plan(config, input_shapes[0])
        channels = _image(input_shapes[0], "Resizing", config.data_format)[2]
        return _image_shape(config.height, config.width, channels, config.data_format)

    def torch_forward(self, builder, context, inputs):
        config = context.config
        crop, padding = self._plan(config, context.input_shape)
        value = torch_image(builder, inputs[0], config.data_format)
        value = torch_resize(builder, value, crop, padding, config.fill_value, (config.height, config.width),
                             config.interpolation, config.antialias)
        return torch_image(builder, value, config.data_format, back=True)

    def keras_layer(self, keras, context):
        config = context.config
        return keras.layers.Resizing(config.height, config.width, interpolation=config.interpolation,
                                     crop_to_aspect_ratio=config.crop_to_aspect_ratio,
                                     pad_to_aspect_ratio=config.pad_to_aspect_ratio, fill_mode="constant",
                                     fill_value=config.fill_value, antialias=config.antialias,
                                     data_format=config.data_format, **context.keras_identity)


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

    def from_keras(self, options):
        return CenterCropConfig(options.integer("height"), options.integer("width"), _read_data_format(options))

    def output_shape(self, config, input_shapes):
        channels = _image(input_shapes[0], "CenterCrop", config.data_format)[2]
        return _image_shape(config.height, config.width, channels, config.data_format)

    def torch_forward(self, builder, context, inputs):
        config = context.config
        height, width, _ = _image(context.input_shape, "CenterCrop", config.data_format)
        value = torch_image(builder, inputs[0], config.data_format)
        if height >= config.height and width >= config.width:
            value = builder.method(value, "narrow", 2, (height - config.height) // 2, config.height)
            value = builder.method(value, "narrow", 3, (width - config.width) // 2, config.width)
        else:
            crop = aspect_crop(height, width, config.height, config.width, float32=False)
            value = torch_resize(builder, value, crop, (0, 0), 0.0, (config.height, config.width), "bilinear", False)
        return torch_image(builder, value, config.data_format, back=True)

    def keras_layer(self, keras, context):
        config = context.config
        return keras.layers.CenterCrop(config.height, config.width, data_format=config.data_format,
                                       **context.keras_identity)


# -- integer lookups and encodings ------------------------------------------------------------

ENCODINGS = ("one_hot", "multi_hot", "count")
# A vocabulary or a list of bin boundaries: real ones hold at most a few million values.
MAX_VALUES = 1 << 22
INTEGER_DTYPES = ("int32", "int64")


def _encoded_shape(input_shape: tuple, depth: int, output_mode: str, what: str) -> tuple:
    """Keras's encoded output shape for ids (batch, d1, ..., dk): `one_hot` appends a depth axis
    (replacing a last axis of size 1 where the ids have one after the batch); `multi_hot` and
    `count` encode along axis 1 and drop it, (batch, d2, ..., dk, depth). Ids of shape (batch,)
    would be counted over the whole batch, an output without a batch axis: refused."""
    if output_mode == "one_hot":
        return (input_shape[:-1] if input_shape and input_shape[-1] == 1 else input_shape) + (depth,)
    if not input_shape:
        raise UnsupportedLayerError(f"{what} output_mode {output_mode!r} on ids of shape (batch,) counts over the "
                                    f"whole batch (Keras's output ({depth},) has no batch axis); not supported")
    return tuple(input_shape[1:]) + (depth,)


def _keras_order(builder, value, input_shape: tuple):
    """Ids (or weights) from torch's channels-first layout back to Keras's (batch, d1, ..., dk)."""
    return builder.call(builder.torch.movedim, value, 1, -1) if len(input_shape) >= 2 else value


def _channels_first(builder, value, output_shape: tuple):
    """An encoded (batch, ..., depth) output in torch's layout, (batch, depth, ...)."""
    return builder.call(builder.torch.movedim, value, -1, 1) if len(output_shape) >= 2 else value


@dataclass(frozen=True)
class CategoryEncodingConfig:
    num_tokens: int
    output_mode: str = "multi_hot"
    count_weights: bool = field(default=False, metadata=OMIT_DEFAULT)   # weights given: a second input

    def __post_init__(self) -> None:
        check_int(self.num_tokens, "CategoryEncoding num_tokens", MAX_VALUES)
        check_choice(self.output_mode, ENCODINGS, "CategoryEncoding output_mode")
        if not isinstance(self.count_weights, bool) or self.count_weights and self.output_mode != "count":
            raise ExchangeError(f"CategoryEncoding count_weights={self.count_weights!r} needs output_mode 'count' "
                                "(Keras raises otherwise)")


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

    def reads_integers(self, node, position):
        return position == 0

    def from_keras(self, options):
        options.expect("sparse", False)
        mode = options.take("output_mode", "multi_hot")
        mode = "multi_hot" if mode == "binary" else mode
        if mode not in ENCODINGS:
            raise options.unsupported("output_mode", mode)
        tensors = sum(argument is None for argument in options.call_args) + sum(
            value is TENSOR for value in options.call_kwargs.values())
        unknown = sorted(key for key in options.call_kwargs if key != "count_weights")
        if unknown or tensors > 2 or options.call_kwargs.get("count_weights", TENSOR) is not TENSOR:
            raise UnsupportedLayerError(f"{options.where()}: only a count_weights tensor may be passed with the ids")
        weighted = tensors == 2
        if weighted and mode != "count":
            raise options.unsupported("output_mode", mode, "count_weights need output_mode 'count'")
        return CategoryEncodingConfig(options.integer("num_tokens"), mode, weighted)

    def output_shape(self, config, input_shapes):
        ids = input_shapes[0]
        if config.count_weights and (len(input_shapes) != 2 or input_shapes[1] != ids):
            raise ExchangeError(f"CategoryEncoding count_weights of shape (batch, {input_shapes[1:]}) do not match "
                                f"ids of shape (batch, {ids})")
        shape = _encoded_shape(ids, config.num_tokens, config.output_mode, "CategoryEncoding")
        declared = tuple(ids[:-1]) + (config.num_tokens,)
        if config.output_mode != "one_hot" and len(ids) >= 2 and (shape != declared or None in ids):
            raise UnsupportedLayerError(f"CategoryEncoding output_mode {config.output_mode!r} on ids of shape "
                                        f"(batch, {ids}): Keras declares (batch, {declared}) but computes "
                                        f"(batch, {shape}); not supported")
        return shape

    def torch_forward(self, builder, context, inputs):
        config, ids_shape = context.config, context.input_shapes[0]
        module = builder.helpers.KerasCategoryEncoding(config.num_tokens, config.output_mode,
                                                       output_dtype=builder.dtype(context))
        arguments = [_keras_order(builder, value, ids_shape) for value in inputs]
        return _channels_first(builder, builder.module(context, module, *arguments), context.output_shape)

    def keras_layer(self, keras, context):
        config = context.config
        return keras.layers.CategoryEncoding(config.num_tokens, output_mode=config.output_mode,
                                             **context.keras_identity)

    def keras_call(self, keras_layer, arguments, context):
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

    def keeps_order(self, config) -> bool:
        return config.output_mode == "int"   # element-wise then

    def integer_output(self, config):
        return "int32" if config.output_mode == "int" else None

    def from_keras(self, options):
        options.expect("sparse", False)
        options.take("num_bins", None)   # how adapt() chose the boundaries
        options.take("epsilon", None)
        boundaries = options.take("bin_boundaries", None)
        if boundaries is None:
            raise options.unsupported("bin_boundaries", boundaries, "not adapted: no boundaries to compute with")
        if not isinstance(boundaries, list) or not all(
                isinstance(value, (int, float)) and not isinstance(value, bool) for value in boundaries):
            raise options.unsupported("bin_boundaries", boundaries, "must be a list of numbers")
        mode = options.take("output_mode", "int")
        if mode not in ("int",) + ENCODINGS:
            raise options.unsupported("output_mode", mode)
        return DiscretizationConfig(tuple(float(np.float32(value)) for value in boundaries), mode)

    def output_shape(self, config, input_shapes):
        if config.output_mode == "int":
            return input_shapes[0]
        return _encoded_shape(input_shapes[0], len(config.bin_boundaries) + 1, config.output_mode, "Discretization")

    def torch_forward(self, builder, context, inputs):
        config = context.config
        module = builder.helpers.KerasDiscretization(list(config.bin_boundaries), config.output_mode,
                                                     output_dtype=builder.dtype(context))
        if config.output_mode == "int":   # element-wise: in any layout
            return builder.module(context, module, inputs[0])
        value = builder.module(context, module, _keras_order(builder, inputs[0], context.input_shapes[0]))
        return _channels_first(builder, value, context.output_shape)

    def keras_layer(self, keras, context):
        config = context.config
        return keras.layers.Discretization(bin_boundaries=list(config.bin_boundaries), output_mode=config.output_mode,
                                           **context.keras_identity)


@dataclass(frozen=True)
class IntegerLookupConfig:
    vocabulary: tuple[int, ...]
    mask_token: int | None = None
    num_oov_indices: int = 1
    vocabulary_dtype: str = "int64"
    invert: bool = field(default=False, metadata=OMIT_DEFAULT)   # indices -> values
    oov_token: int = field(default=-1, metadata=OMIT_DEFAULT)    # what an inverted unknown index gives

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


@register
class IntegerLookup(LayerKind):
    """Integer values -> int64 indices into [mask] + [OOV indices] + vocabulary
    (`KerasIntegerLookup`), or with `invert` indices -> values. Only output_mode "int" with a
    vocabulary in the config."""

    kind, keras_classes, Config = "integer_lookup", ("IntegerLookup",), IntegerLookupConfig
    keeps_element_order = True

    def reads_integers(self, node, position):
        return position == 0

    def integer_output(self, config):
        return "int64"

    def from_keras(self, options):
        options.expect("output_mode", "int")
        options.expect("sparse", False)
        options.expect("idf_weights", None)
        options.take("max_tokens", None)          # caps adapt()'s vocabulary; the vocabulary is given
        options.take("pad_to_max_tokens", False)  # pads encoded outputs only
        options.take("vocabulary_size", None)     # derived from the vocabulary
        vocabulary = options.take("vocabulary", None)
        if not isinstance(vocabulary, list) or not vocabulary or not all(
                isinstance(value, int) and not isinstance(value, bool) for value in vocabulary):
            raise options.unsupported("vocabulary", vocabulary, "a list of integers in the config is needed (an "
                                      "adapted or file vocabulary is not in the config)")
        mask_token = options.take("mask_token", None)
        if mask_token is not None and (not isinstance(mask_token, int) or isinstance(mask_token, bool)):
            raise options.unsupported("mask_token", mask_token, "must be an integer")
        invert = options.flag("invert", False)
        oov_token = options.integer("oov_token", -1)
        num_oov_indices = options.integer("num_oov_indices", 1)
        if num_oov_indices < (0 if invert else 1):
            raise options.unsupported("num_oov_indices", num_oov_indices, "Keras raises on an unknown value then, "
                                      "which a torch module cannot")
        if num_oov_indices > 1 and not invert:
            options.expect("oov_method", "floormod")
            options.take("salt", None)   # hashes for oov_method="farmhash" only
        else:
            options.take("oov_method", None)
            options.take("salt", None)
        dtype = options.take("vocabulary_dtype", "int64")
        if dtype not in INTEGER_DTYPES:
            raise options.unsupported("vocabulary_dtype", dtype)
        return IntegerLookupConfig(tuple(vocabulary), mask_token, num_oov_indices, dtype, invert, oov_token)

    def torch_forward(self, builder, context, inputs):
        config = context.config
        module = builder.helpers.KerasIntegerLookup(list(config.vocabulary), config.mask_token, config.num_oov_indices,
                                                    invert=config.invert, oov_token=config.oov_token)
        return builder.module(context, module, inputs[0])

    def keras_layer(self, keras, context):
        config = context.config
        return keras.layers.IntegerLookup(vocabulary=list(config.vocabulary), mask_token=config.mask_token,
                                          num_oov_indices=config.num_oov_indices, output_mode="int",
                                          invert=config.invert, oov_token=config.oov_token,
                                          vocabulary_dtype=config.vocabulary_dtype, **context.keras_identity)
