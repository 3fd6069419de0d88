"""Histogram equalization of images: ContrastLimitedAdaptiveHistogramEqualization (CLAHE), a fixed
function of its input computed at inference; and Equalization, refused: Keras 3.15 cannot call it in
a functional model (its symbolic output is its input, a cycle). It would be the identity at
inference (it equalizes only with training=True, over the whole batch per channel).

Conventions that differ:
- Keras computes CLAHE with TensorFlow ops whose float32 roundings depend on their order; the torch
  side (`torch_modules.KerasCLAHE`) spells each one out as TensorFlow 2.21's CPU kernels and graph
  rewrites compute it (measured bit for bit against `model.predict`):
  - the clipped histogram's excess is summed in Eigen's vectorised order (`tensorflow_cpu_sum`),
    the cumulative histogram one bin after another in float32 (torch's cumsum adds in float64);
  - the value_range scaling: TensorFlow's graph optimiser turns `x / c` by a constant into
    `x * (1 / c)` and folds the constant factors, so Keras's `(x - low) / (high - low) * 255` is
    `(x - low) * float32(255 * (1 / (high - low)))` in `model.predict` (eager Keras, `model(x)`,
    divides: up to one float32 rounding apart there);
  - histogram bins are `trunc(clip(x, 0, 255))`; Keras casts to int32 before clipping, and
    TensorFlow's cast of values at or above 2**31 (and of NaN) gives INT32_MIN, bin 0: so does the
    torch side. A NaN pixel makes Keras's lookup raise; torch's gather raises too.
- Keras's `data_format="channels_first"` image (channels, height, width) is held by the torch side
  as (width, channels, height) like any rank-4 tensor; it is permuted to (channels, height, width)
  and back (`preprocessing.torch_image`).
- Integer images (Keras keeps their dtype and truncates the result) are refused by the exchange's
  check of integer inputs, as for every layer that does not read ids; so are mixed-precision
  policies (the exchange holds them as float32, where Keras bins the half-precision image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from exchange.errors import ExchangeError, UnsupportedLayerError
from exchange.kinds import (
    MAX_WINDOW,
    OMIT_DEFAULT,
    KerasOptions,
    LayerKind,
    TorchBuilder,
    TorchValue,
    check_choice,
    check_ints,
    refuse_keras_class,
    register,
)
from exchange.kinds.preprocessing import DATA_FORMATS, _read_data_format, torch_image

if TYPE_CHECKING:
    from exchange.graph import NodeContext, Shape

refuse_keras_class(
    "Equalization",
    "Keras 3.15 cannot call it in a functional model (its symbolic output is its "
    "input tensor: a cycle), so no Keras model holds one to check a conversion against",
)

# Real clip limits are a few units (OpenCV's default 40 is the largest in use); past this the float32
# limit overflows where TensorFlow cannot convert it.
MAX_CLIP_LIMIT = 1e30


# Keras counts a tile's pixels in float32 (a sum of one-hot vectors): exact up to 2**24.
MAX_TILE_PIXELS = 1 << 24


def _float32_finite(value: float) -> bool:
    with np.errstate(over="ignore"):
        return bool(np.isfinite(np.float32(value)))


def _float32_width_usable(value_range: tuple[float, float]) -> bool:
    """Whether high - low in float32, which Keras divides by, is finite and nonzero."""
    low, high = (np.float32(value) for value in value_range)
    with np.errstate(over="ignore"):
        width = high - low
    return bool(width != 0 and np.isfinite(width))


def _image(shape: Shape, what: str, data_format: str) -> tuple[int, int, int | None]:
    """(height, width, channels) of a Keras image in `data_format`, of fixed height and width."""
    sides = shape[:2] if data_format == "channels_last" else shape[1:]
    if len(shape) != 3 or None in sides:
        raise UnsupportedLayerError(
            f"{what} needs a {data_format} image of fixed height and width, found (batch, {shape})"
        )
    height, width = cast("tuple[int, int]", sides)
    return height, width, shape[2] if data_format == "channels_last" else shape[0]


@dataclass(frozen=True)
class CLAHEConfig:
    value_range: tuple[float, float] = (0.0, 255.0)
    clip_limit: float = 4.0
    tile_grid_size: tuple[int, int] = (8, 8)
    data_format: str = field(default="channels_last", metadata=OMIT_DEFAULT)

    def __post_init__(self) -> None:
        check_choice(self.data_format, DATA_FORMATS, "ContrastLimitedAdaptiveHistogramEqualization data_format")
        check_ints(
            self.tile_grid_size, "ContrastLimitedAdaptiveHistogramEqualization tile_grid_size", MAX_WINDOW, count=(2,)
        )
        if (
            not isinstance(self.value_range, tuple)
            or len(self.value_range) != 2
            or not all(isinstance(value, float) and _float32_finite(value) for value in self.value_range)
        ):
            raise ExchangeError(
                f"ContrastLimitedAdaptiveHistogramEqualization value_range must be two finite "
                f"float32 numbers, got {self.value_range!r}"
            )
        if not _float32_width_usable(self.value_range):
            raise ExchangeError(
                f"ContrastLimitedAdaptiveHistogramEqualization value_range {self.value_range!r} "
                "must span a finite, nonzero float32 width (Keras divides by it)"
            )
        if not isinstance(self.clip_limit, float) or not abs(self.clip_limit) <= MAX_CLIP_LIMIT:
            raise ExchangeError(
                f"ContrastLimitedAdaptiveHistogramEqualization clip_limit must be a number of at "
                f"most {MAX_CLIP_LIMIT:g} in size, got {self.clip_limit!r}"
            )


def _read_value_range(options: KerasOptions) -> tuple[float, float]:
    value = options.take("value_range", [0, 255])
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(
            isinstance(item, (int, float))
            and not isinstance(item, bool)
            and math.isfinite(item)
            and _float32_finite(item)
            for item in value
        )
    ):
        raise options.unsupported("value_range", value, "must be two finite float32 numbers")
    return float(value[0]), float(value[1])


@register
class ContrastLimitedAdaptiveHistogramEqualization(LayerKind):
    """Per tile and channel, a histogram of the image's values (scaled to [0, 255]), clipped and
    accumulated into a mapping; each pixel mapped through its four nearest tiles' mappings,
    interpolated bilinearly (`torch_modules.KerasCLAHE`). Images of fixed height and width only."""

    kind, keras_classes, Config = "clahe", ("ContrastLimitedAdaptiveHistogramEqualization",), CLAHEConfig

    def from_keras(self, options: KerasOptions) -> CLAHEConfig:
        policy = options.take("dtype", None)
        policy_name = (policy.get("config") or {}).get("name") if isinstance(policy, dict) else policy
        if isinstance(policy_name, str) and policy_name.startswith("mixed_"):
            raise options.unsupported(
                "dtype",
                policy_name,
                "Keras takes the histogram bins of the image cast to "
                "the half-precision compute dtype; the exchange computes in float32 there",
            )
        value_range = _read_value_range(options)
        if not _float32_width_usable(value_range):
            raise options.unsupported(
                "value_range", list(value_range), "Keras divides by its float32 width, which is zero or infinite"
            )
        clip_limit = options.number("clip_limit", 4.0)
        if abs(clip_limit) > MAX_CLIP_LIMIT:
            raise options.unsupported(
                "clip_limit",
                clip_limit,
                f"at most {MAX_CLIP_LIMIT:g} in size: TensorFlow cannot convert a larger limit to float32",
            )
        tile_rows, tile_columns = options.sizes("tile_grid_size", 2, (8, 8))
        return CLAHEConfig(value_range, clip_limit, (tile_rows, tile_columns), _read_data_format(options))

    def _image(self, config: CLAHEConfig, input_shape: Shape) -> tuple[int, int]:
        """(height, width) of the input, after checking that TensorFlow can pad it to whole tiles
        (its symmetric padding mirrors at most the whole image) and count their pixels exactly."""
        height, width, _ = _image(input_shape, "ContrastLimitedAdaptiveHistogramEqualization", config.data_format)
        for side, size, grid, cells in (
            ("height", height, config.tile_grid_size[0], "rows"),
            ("width", width, config.tile_grid_size[1], "columns"),
        ):
            padding = -(-size // grid) * grid - size
            if padding > size:
                raise UnsupportedLayerError(
                    f"ContrastLimitedAdaptiveHistogramEqualization tile_grid_size {config.tile_grid_size} on an "
                    f"image {side} of {size}: Keras pads {padding} mirrored {cells}, more than the image has "
                    "(TensorFlow raises)"
                )
        tile_pixels = -(-height // config.tile_grid_size[0]) * -(-width // config.tile_grid_size[1])
        if tile_pixels > MAX_TILE_PIXELS:
            raise UnsupportedLayerError(
                f"ContrastLimitedAdaptiveHistogramEqualization tiles of {tile_pixels:,} pixels are not supported "
                f"(Keras counts them in float32, exact up to {MAX_TILE_PIXELS:,})"
            )
        return height, width

    def output_shape(self, config: CLAHEConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        self._image(config, input_shapes[0])
        return input_shapes[0]

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config = context.config
        height, width = self._image(config, context.input_shape)
        module = builder.helpers.KerasCLAHE(
            height,
            width,
            value_range=config.value_range,
            clip_limit=config.clip_limit,
            tile_grid_size=config.tile_grid_size,
        )
        value = builder.module(context, module, torch_image(builder, inputs[0], config.data_format, 3))
        return torch_image(builder, value, config.data_format, 3, back=True)

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        return keras.layers.ContrastLimitedAdaptiveHistogramEqualization(
            value_range=config.value_range,
            clip_limit=config.clip_limit,
            tile_grid_size=config.tile_grid_size,
            data_format=config.data_format,
            **context.keras_identity,
        )
