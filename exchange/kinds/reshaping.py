"""Layers that move or pass data: Flatten, Reshape, Permute, RepeatVector, ZeroPadding2D,
Cropping2D, Dropout and SpatialDropout (no-ops at inference), and Embedding (token ids to vectors).

Conventions that differ:
- Flatten: Keras flattens an image in (H, W, C) order; `torch.flatten` on a channels-first tensor
  gives (C, H, W) order. When everything after the Flatten is a Dense (through activations and
  dropout), torch flattens its own way and the Dense permutes its weight rows instead (see
  `Graph.channels_first_flattens`); elsewhere the torch side moves the channels last first.
- Reshape works on Keras's channels-last element order, so the torch side moves the channels last
  before and back to the front after.
- Padding and cropping amounts are (top, bottom), (left, right) in Keras, (left, right, top, bottom)
  for `F.pad` / `nn.ZeroPad2d`.
- An Embedding with a LoRA adapter is `LoRAEmbedding` (see `exchange.kinds.dense` for LoRA's
  conventions; its tables keep Keras's layout).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

from exchange.errors import ExchangeError, UnsupportedLayerError
from exchange.kinds import (MAX_AXIS, MAX_FEATURES, MAX_PADDING, MAX_REPEATS, MAX_VOCABULARY, OMIT_DEFAULT, LayerKind,
                            check_int, check_ints, register)
from exchange.ports import Port


@register
class Flatten(LayerKind):
    kind, keras_classes = "flatten", ("Flatten",)
    may_flatten_channels_first = True

    def from_keras(self, options):
        options.expect("data_format", "channels_last", None)
        return self.Config()

    def output_shape(self, config, input_shapes):
        shape = input_shapes[0]
        return (None if None in shape else prod(shape),)

    def torch_forward(self, builder, context, inputs):
        value = inputs[0]
        if not context.input_shape:   # Keras flattens (N,) to (N, 1)
            return builder.method(value, "unsqueeze", 1)
        if len(context.input_shape) < 2:
            return value
        if not context.channels_first_flatten:
            value = builder.call(builder.torch.movedim, value, 1, -1)
        return builder.call(builder.torch.flatten, value, 1)

    def keras_layer(self, keras, context):
        return keras.layers.Flatten(**context.keras_identity)

    def numpy_forward(self, context, tensors, inputs):
        if len(context.input_shape) > 1:
            raise UnsupportedLayerError(f"no numpy forward for a Flatten of an image ({context.node.name!r})")
        return inputs[0].reshape(len(inputs[0]), -1)   # (N,) -> (N, 1), as Keras


@dataclass(frozen=True)
class ReshapeConfig:
    target_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        target = self.target_shape
        if len(target) >= MAX_AXIS or target.count(-1) > 1 or any(
                not isinstance(size, int) or isinstance(size, bool) or size < -1 or size == 0 for size in target):
            raise ExchangeError(f"invalid Reshape target shape {list(target)}: up to {MAX_AXIS - 1} sizes, "
                                "each positive or one -1")


@register
class Reshape(LayerKind):
    kind, keras_classes, Config = "reshape", ("Reshape",), ReshapeConfig

    def from_keras(self, options):
        target = options.take("target_shape")
        if not isinstance(target, (list, tuple)) or not all(isinstance(s, int) and not isinstance(s, bool)
                                                            for s in target):
            raise options.unsupported("target_shape", target)
        return ReshapeConfig(tuple(target))

    def output_shape(self, config, input_shapes):
        shape, target = input_shapes[0], list(config.target_shape)
        if None in shape:
            raise ExchangeError("Reshape needs a fixed input size")
        size = prod(shape)
        if -1 in target:
            known = prod(s for s in target if s != -1)
            if size % known:
                raise ExchangeError(f"cannot reshape {shape} to {config.target_shape}")
            target[target.index(-1)] = size // known
        if prod(target) != size:
            raise ExchangeError(f"cannot reshape {shape} to {config.target_shape}")
        return tuple(target)

    def torch_forward(self, builder, context, inputs):
        value = inputs[0]
        if len(context.input_shape) > 1:
            value = builder.call(builder.torch.movedim, value, 1, -1)
        value = builder.call(builder.torch.reshape, value, (-1,) + tuple(context.output_shape))
        if len(context.output_shape) > 1:
            value = builder.call(builder.torch.movedim, value, -1, 1)
        return value

    def keras_layer(self, keras, context):
        return keras.layers.Reshape(context.config.target_shape, **context.keras_identity)


def _pairs(options, key: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """Keras's 2-D padding/cropping spellings: 1, (1, 2) or ((1, 0), (2, 1))."""
    value = options.take(key, 1)
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    try:
        pairs = tuple((item, item) if isinstance(item, int) else tuple(item) for item in value)
        if len(pairs) == 2 and all(len(p) == 2 and all(isinstance(a, int) and a >= 0 for a in p) for p in pairs):
            return pairs
    except TypeError:
        pass
    raise options.unsupported(key, value)


@dataclass(frozen=True)
class Padding2DConfig:
    amounts: tuple[tuple[int, int], tuple[int, int]]   # ((top, bottom), (left, right))

    def __post_init__(self) -> None:
        for pair in self.amounts:
            check_ints(pair, "padding or cropping amounts", MAX_PADDING, minimum=0, count=(2,))


@register
class ZeroPadding2D(LayerKind):
    kind, keras_classes, Config = "zero_padding2d", ("ZeroPadding2D",), Padding2DConfig

    def from_keras(self, options):
        options.expect("data_format", "channels_last", None)
        return Padding2DConfig(_pairs(options, "padding"))

    def output_shape(self, config, input_shapes):
        (top, bottom), (left, right) = config.amounts
        height, width, channels = _image(input_shapes[0])
        return (None if height is None else height + top + bottom,
                None if width is None else width + left + right, channels)

    def torch_forward(self, builder, context, inputs):
        (top, bottom), (left, right) = context.config.amounts
        return builder.module(context, builder.nn.ZeroPad2d((left, right, top, bottom)), inputs[0])

    def keras_layer(self, keras, context):
        return keras.layers.ZeroPadding2D(context.config.amounts, data_format="channels_last",
                                          **context.keras_identity)


@register
class Cropping2D(LayerKind):
    kind, keras_classes, Config = "cropping2d", ("Cropping2D",), Padding2DConfig

    def from_keras(self, options):
        options.expect("data_format", "channels_last", None)
        return Padding2DConfig(_pairs(options, "cropping"))

    def output_shape(self, config, input_shapes):
        (top, bottom), (left, right) = config.amounts
        height, width, channels = _image(input_shapes[0])
        if height is None or width is None:
            raise ExchangeError("Cropping2D needs a fixed input size")
        if height <= top + bottom or width <= left + right:
            raise ExchangeError(f"cropping {config.amounts} leaves nothing of {height}x{width}")
        return (height - top - bottom, width - left - right, channels)

    def torch_forward(self, builder, context, inputs):
        (top, _), (left, _) = context.config.amounts
        height, width, _ = context.output_shape
        value = builder.method(inputs[0], "narrow", 2, top, height)
        return builder.method(value, "narrow", 3, left, width)

    def keras_layer(self, keras, context):
        return keras.layers.Cropping2D(context.config.amounts, data_format="channels_last",
                                       **context.keras_identity)


def _image(shape: tuple) -> tuple:
    if len(shape) != 3:
        raise ExchangeError(f"expects rank-4 input, found shape (batch, {shape})")
    return shape


@dataclass(frozen=True)
class DropoutConfig:
    rate: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:   # Keras's Dropout refuses a rate outside [0, 1]
            raise ExchangeError(f"dropout rate must be from 0 to 1, got {self.rate!r}")


class _Dropout(LayerKind):
    """Random only in training; at inference the identity, in both frameworks."""

    Config = DropoutConfig
    keeps_element_order = True
    passes_mask = True

    def from_keras(self, options):
        options.take("noise_shape", None)
        options.take("seed", None)
        return DropoutConfig(options.number("rate", 0.0))

    def torch_forward(self, builder, context, inputs):
        return inputs[0]

    def keras_layer(self, keras, context):
        return getattr(keras.layers, self.keras_classes[0])(context.config.rate,
                                                            **context.keras_identity)

    def numpy_forward(self, context, tensors, inputs):
        return inputs[0]


@register
class Dropout(_Dropout):
    kind, keras_classes = "dropout", ("Dropout",)


@register
class SpatialDropout1D(_Dropout):
    kind, keras_classes = "spatial_dropout1d", ("SpatialDropout1D",)


@register
class StochasticDepth(_Dropout):
    """keras.applications' ConvNeXt: drops whole residual branches in training only."""

    kind, keras_classes = "stochastic_depth", ("StochasticDepth",)
    passes_mask = False   # ConvNeXt's own layer, without `supports_masking`

    def from_keras(self, options):
        return DropoutConfig(options.number("drop_path_rate", 0.0))

    def keras_layer(self, keras, context):
        from keras.src.applications.convnext import StochasticDepth as KerasStochasticDepth

        return KerasStochasticDepth(context.config.rate, **context.keras_identity)


@register
class SpatialDropout2D(_Dropout):
    kind, keras_classes = "spatial_dropout2d", ("SpatialDropout2D",)

    def from_keras(self, options):
        options.expect("data_format", "channels_last", None)
        return super().from_keras(options)


@dataclass(frozen=True)
class PermuteConfig:
    dims: tuple[int, ...]   # Keras's: 1-based axes after the batch axis, in Keras layout

    def __post_init__(self) -> None:
        # as Keras's Permute: a permutation of 1..n, n the input's rank without the batch axis
        if len(self.dims) >= MAX_AXIS or sorted(self.dims) != list(range(1, len(self.dims) + 1)):
            raise ExchangeError(f"Permute dims {list(self.dims)} are not a permutation of 1..{len(self.dims)}")


@register
class Permute(LayerKind):
    """Keras permutes its own (channels-last) axes; the torch side composes that with the two
    layout changes into one `permute`."""

    kind, keras_classes, Config = "permute", ("Permute",), PermuteConfig

    def from_keras(self, options):
        dims = options.take("dims")
        if not isinstance(dims, list) or not all(isinstance(dim, int) and not isinstance(dim, bool) for dim in dims):
            raise options.unsupported("dims", dims)
        return PermuteConfig(tuple(dims))

    def output_shape(self, config, input_shapes):
        shape = input_shapes[0]
        if len(config.dims) != len(shape):
            raise ExchangeError(f"dims {config.dims} do not match input shape {shape}")
        return tuple(shape[dim - 1] for dim in config.dims)

    def torch_forward(self, builder, context, inputs):
        from exchange.kinds.layout import to_keras_order, to_torch_order

        rank = len(context.input_shape)
        keras_permutation = (0,) + tuple(context.config.dims)
        # torch input -> Keras layout -> Keras's permutation -> torch layout, as one permutation
        combined = tuple(to_keras_order(rank)[keras_permutation[axis]] for axis in to_torch_order(rank))
        return builder.method(inputs[0], "permute", *combined)

    def keras_layer(self, keras, context):
        return keras.layers.Permute(context.config.dims, **context.keras_identity)


@dataclass(frozen=True)
class RepeatVectorConfig:
    n: int

    def __post_init__(self) -> None:
        check_int(self.n, "RepeatVector n", MAX_REPEATS)


@register
class RepeatVector(LayerKind):
    """(N, F) -> (N, n, F) in Keras; torch holds the result channels-first, (N, F, n)."""

    kind, keras_classes, Config = "repeat_vector", ("RepeatVector",), RepeatVectorConfig

    def from_keras(self, options):
        return RepeatVectorConfig(options.integer("n"))

    def output_shape(self, config, input_shapes):
        if len(input_shapes[0]) != 1:
            raise ExchangeError(f"repeats a (batch, features) input, found (batch, {input_shapes[0]})")
        return (config.n, input_shapes[0][0])

    def torch_forward(self, builder, context, inputs):
        return builder.method(builder.method(inputs[0], "unsqueeze", 2), "repeat", 1, 1, context.config.n)

    def keras_layer(self, keras, context):
        return keras.layers.RepeatVector(context.config.n, **context.keras_identity)


@dataclass(frozen=True)
class EmbeddingConfig:
    input_dim: int
    output_dim: int
    mask_zero: bool = False
    lora_rank: int | None = field(default=None, metadata=OMIT_DEFAULT)   # see exchange.kinds.dense
    lora_alpha: float | None = field(default=None, metadata=OMIT_DEFAULT)

    def __post_init__(self) -> None:
        from exchange.kinds.dense import check_lora

        check_int(self.input_dim, "Embedding input_dim (the vocabulary)", MAX_VOCABULARY)
        check_int(self.output_dim, "Embedding output_dim", MAX_FEATURES)
        check_lora(self.lora_rank, self.lora_alpha, "Embedding")
        if self.lora_rank is not None and self.lora_alpha != self.lora_rank:
            raise ExchangeError(f"Embedding lora_alpha must equal lora_rank (Keras 3.15's Embedding scales by 1), "
                                f"got {self.lora_alpha!r} for rank {self.lora_rank}")


@register
class Embedding(LayerKind):
    """Token ids -> vectors: Keras's `embeddings` (vocabulary, dim) is `nn.Embedding`'s weight as it
    is. Keras casts float ids to int; the torch side calls `.long()`. The result is held
    channels-first, (N, dim, T), like a Conv1D's. With `mask_zero=True` it makes the mask
    `ids != 0`, which Keras passes along to the layers that use it (see `Graph.masks`): recurrent
    layers skip masked steps, GlobalAveragePooling1D leaves them out of the mean."""

    kind, keras_classes, Config = "embedding", ("Embedding",), EmbeddingConfig

    def reads_integers(self, node, position):
        return True   # token ids

    def output_mask(self, node, input_masks):
        return node.inputs[0] if node.config.mask_zero else None   # `ids != 0`, named by the ids

    def from_keras(self, options):
        from exchange.kinds.dense import read_lora

        mask_zero = options.flag("mask_zero", False)
        rank, alpha = read_lora(options, honours_alpha=False)
        options.expect("sparse", False)
        options.expect("quantization_config", None)
        options.take("input_length", None)   # Keras 2: the sequence length, known from the input shape
        return EmbeddingConfig(options.integer("input_dim"), options.integer("output_dim"), mask_zero, rank, alpha)

    def merged_when_saved(self, config):
        return () if config.lora_rank is None else ("lora_embeddings_a", "lora_embeddings_b")

    def output_shape(self, config, input_shapes):
        return tuple(input_shapes[0]) + (config.output_dim,)

    def ports(self, context):
        from exchange.kinds.dense import check_lora_dtype

        config = context.config
        ports = [Port("embeddings", "weight", shape=(config.input_dim, config.output_dim))]
        if config.lora_rank is not None:
            check_lora_dtype(context)
            ports += [Port("lora_embeddings_a", "lora_a", shape=(config.input_dim, config.lora_rank)),
                      Port("lora_embeddings_b", "lora_b", shape=(config.lora_rank, config.output_dim))]
        return ports

    def torch_forward(self, builder, context, inputs):
        config = context.config
        # Given its (meta) weight, nn.Embedding skips its random init: normal_ on `meta` imports
        # torch._dynamo, measured at 1.9 s of a 2 s model_from_file.
        weight = builder.torch.empty(config.input_dim, config.output_dim, device="meta", dtype=builder.dtype(context))
        if config.lora_rank is None:
            module = builder.nn.Embedding(config.input_dim, config.output_dim, _weight=builder.nn.Parameter(weight))
        else:
            module = builder.helpers.LoRAEmbedding(config.input_dim, config.output_dim, config.lora_rank,
                                                   config.lora_alpha / config.lora_rank, device="meta",
                                                   dtype=builder.dtype(context))
        ids = builder.method(inputs[0], "long")
        if config.mask_zero and context.node.inputs[0] not in builder.masks:   # one per ids tensor
            builder.masks[context.node.inputs[0]] = builder.call(builder.torch.ne, ids, 0)
        value = builder.module(context, module, ids)
        return builder.call(builder.torch.movedim, value, -1, 1) if len(context.input_shape) >= 1 else value

    def keras_layer(self, keras, context):
        config = context.config
        from exchange.kinds.dense import lora_keras_args

        return keras.layers.Embedding(config.input_dim, config.output_dim, mask_zero=config.mask_zero,
                                      **lora_keras_args(config), **context.keras_identity)
