"""Spectrograms of signals: MelSpectrogram (`helpers.KerasMelSpectrogram`) and STFTSpectrogram
(`helpers.KerasSTFTSpectrogram`).

Conventions that differ:
- Keras's MelSpectrogram returns (batch, mel bins, frames); the torch side holds a rank-3 tensor
  channels-first, Keras's last axis (frames) first: (batch, frames, mel bins), which is the order
  the spectrogram is computed in before Keras's final swap, so the torch side does no swap.
- Keras's stft (TensorFlow backend) reflect-pads by fft_length // 2 on each side, frames every
  sequence_stride samples, and windows each frame with TensorFlow's `hann_window`/`hamming_window`
  (periodic=True, which TensorFlow applies to even lengths only) of sequence_length samples
  centred in fft_length by zeros; the torch side pads, `unfold`s, multiplies and `torch.fft.rfft`s
  the same way (not `torch.stft`, whose window and framing conventions are its own).
- The mel filterbank is Keras's `linear_to_mel_weight_matrix` (HTK mel scale, float32,
  TensorFlow's linspace), computed the same way in torch when the module is built. TensorFlow's
  float32 `log` (Eigen's polynomial) differs from torch's by an ulp in about 5% of values, which
  the filterbank's differences of nearby mel frequencies magnify to 1e-5 of a weight: the torch
  side computes log as Eigen does (`tensorflow_log`, bit for bit; the dB scale uses it too). The
  filterbanks then agree to an ulp or two in a few entries.
- `power_to_db` clamps to (the maximum over the whole batch, every row) - top_db, as Keras does:
  a row's output depends on the other rows of its batch (Keras's `predict` cuts batches of 32).
- STFTSpectrogram's DFT kernels are weights (Keras draws them from a scipy window; a file holds
  their values): Keras's (frame_length, 1, F) kernels are torch Conv1d weights (F, 1,
  frame_length), applied to each channel on its own. The torch module takes and gives Keras's
  layout (permuted to and from the exchange's), so its `mode`, `expand_dims` and `data_format`
  reshapes are Keras's own. `same` padding is TensorFlow's (the odd cell after); torch's
  `padding="same"` refuses strides, so the signal is padded first.
- STFTSpectrogram floors the power and the magnitude at Keras's `backend.epsilon()`, a
  process-wide setting no file records: its default, 1e-7, is assumed.
- MelSpectrogram: Keras declares (input_length + stride + 1) // stride frames but computes 1 + (input_length + 2 *
  (fft_length // 2) - fft_length) // stride; where the two differ the model is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from exchange.errors import ExchangeError, UnsupportedLayerError
from exchange.kinds import (
    MAX_FEATURES,
    KerasOptions,
    LayerKind,
    TorchBuilder,
    TorchValue,
    check_choice,
    check_int,
    coerce,
    register,
)
from exchange.kinds.axis_order import to_keras_order, to_torch_order
from exchange.ports import Permute, Port

if TYPE_CHECKING:
    from exchange.graph import NodeContext, Shape
    from exchange.ports import AnyPort

WINDOWS = ("hann", "hamming")
# An FFT length, and a window: real audio front ends use at most a few thousand samples.
MAX_FFT = 1 << 16
# Mel bins: 40 to 512 in real models.
MAX_MEL_BINS = 1 << 14


@dataclass(frozen=True)
class MelSpectrogramConfig:
    fft_length: int
    sequence_stride: int
    sequence_length: int
    window: str | None
    sampling_rate: int | float
    num_mel_bins: int
    min_freq: int | float
    max_freq: int | float
    power_to_db: bool
    top_db: int | float | None
    mag_exp: int | float
    min_power: int | float
    ref_power: int | float

    def __post_init__(self) -> None:
        check_int(self.fft_length, "MelSpectrogram fft_length", MAX_FFT)
        check_int(self.sequence_length, "MelSpectrogram sequence_length", self.fft_length)
        check_int(self.sequence_stride, "MelSpectrogram sequence_stride", MAX_FEATURES)
        check_int(self.num_mel_bins, "MelSpectrogram num_mel_bins", MAX_MEL_BINS)
        if self.window is not None:
            check_choice(self.window, WINDOWS, "MelSpectrogram window")
        for key in ("sampling_rate", "min_freq", "max_freq", "mag_exp", "min_power", "ref_power"):
            coerce(getattr(self, key), int | float, f"MelSpectrogram {key}")
        coerce(self.top_db, int | float if self.power_to_db else int | float | None, "MelSpectrogram top_db")
        coerce(self.power_to_db, bool, "MelSpectrogram power_to_db")
        if not self.sampling_rate > 0:
            raise ExchangeError(f"MelSpectrogram sampling_rate must be positive, got {self.sampling_rate!r}")
        if not self.min_power > 0:
            raise ExchangeError(
                f"MelSpectrogram min_power must be positive (log10 of 0 is -inf), got {self.min_power!r}"
            )


@register
class MelSpectrogram(LayerKind):
    kind, keras_classes, Config = "mel_spectrogram", ("MelSpectrogram",), MelSpectrogramConfig

    def from_keras(self, options: KerasOptions) -> MelSpectrogramConfig:
        fft_length = options.integer("fft_length", 2048)
        sequence_length = options.take("sequence_length", None)
        sequence_length = None if sequence_length is None else options.integer("sequence_length")
        window = options.take("window", "hann")
        if window is not None and window not in WINDOWS:
            raise options.unsupported("window", window, "Keras's stft takes 'hann', 'hamming' or none")
        sampling_rate = self._number(options, "sampling_rate", 16000)
        max_freq = options.take("max_freq", None)
        if max_freq is not None:
            max_freq = self._number(options, "max_freq", None)
        power_to_db = options.flag("power_to_db", True)
        top_db = options.take("top_db", 80.0)
        if top_db is not None or power_to_db:  # Keras subtracts it from the maximum
            top_db = self._number(options, "top_db", 80.0)
        try:
            return MelSpectrogramConfig(
                fft_length,
                options.integer("sequence_stride", 512),
                sequence_length or fft_length,
                window,
                sampling_rate,
                options.integer("num_mel_bins", 128),
                self._number(options, "min_freq", 20.0),
                max_freq or int(sampling_rate / 2),
                power_to_db,
                top_db,
                self._number(options, "mag_exp", 2.0),
                self._number(options, "min_power", 1e-10),
                self._number(options, "ref_power", 1.0),
            )
        except ExchangeError as err:
            raise UnsupportedLayerError(f"{options.where()}: {err}") from None

    @staticmethod
    def _number(options: KerasOptions, key: str, default: float | None) -> float:
        """A number option as Keras wrote it (16000 stays an int)."""
        value = options.take(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise options.unsupported(key, value, "must be a number")
        return options.number(key, default) if isinstance(value, float) else value

    def output_shape(self, config: MelSpectrogramConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        shape = input_shapes[0]
        if len(shape) != 1 or shape[0] is None:
            raise UnsupportedLayerError(
                f"MelSpectrogram needs signals of a fixed length, shape (batch, samples); found (batch, {shape})"
            )
        length = shape[0]
        if length <= config.fft_length // 2:
            raise UnsupportedLayerError(
                f"MelSpectrogram of {length} samples is not supported (reflect padding by "
                f"fft_length // 2 = {config.fft_length // 2} needs more samples)"
            )
        frames = 1 + (length + 2 * (config.fft_length // 2) - config.fft_length) // config.sequence_stride
        declared = (length + config.sequence_stride + 1) // config.sequence_stride
        if frames != declared:
            raise UnsupportedLayerError(
                f"MelSpectrogram of {length} samples is not supported (Keras declares "
                f"{declared} frames but computes {frames})"
            )
        return (config.num_mel_bins, frames)

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config = context.config
        module = builder.helpers.KerasMelSpectrogram(
            config.fft_length,
            config.sequence_stride,
            config.sequence_length,
            window=config.window,
            sampling_rate=config.sampling_rate,
            num_mel_bins=config.num_mel_bins,
            min_freq=config.min_freq,
            max_freq=config.max_freq,
            power_to_db=config.power_to_db,
            top_db=config.top_db,
            mag_exp=config.mag_exp,
            min_power=config.min_power,
            ref_power=config.ref_power,
        )
        return builder.module(context, module, inputs[0])

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        return keras.layers.MelSpectrogram(
            fft_length=config.fft_length,
            sequence_stride=config.sequence_stride,
            sequence_length=config.sequence_length,
            window=config.window,
            sampling_rate=config.sampling_rate,
            num_mel_bins=config.num_mel_bins,
            min_freq=config.min_freq,
            max_freq=config.max_freq,
            power_to_db=config.power_to_db,
            top_db=config.top_db,
            mag_exp=config.mag_exp,
            min_power=config.min_power,
            ref_power=config.ref_power,
            **context.keras_identity,
        )


STFT_MODES = ("log", "magnitude", "psd", "real", "imag", "angle", "stft")
PADDINGS = ("valid", "same")
SCALINGS = ("density", "spectrum")
DATA_FORMATS = ("channels_last", "channels_first")
# Keras's `backend.epsilon()`, the floor of STFTSpectrogram's power and magnitude: a process-wide
# setting (`keras.config.set_epsilon`) that no file records; its default.
KERAS_EPSILON = 1e-7


@dataclass(frozen=True)
class STFTSpectrogramConfig:
    mode: str
    frame_length: int
    frame_step: int | None
    fft_length: int | None
    window: str | None  # the kernels' initializer only: the file's kernels are what count
    periodic: bool
    scaling: str | None
    padding: str
    expand_dims: bool
    data_format: str

    def __post_init__(self) -> None:
        check_choice(self.mode, STFT_MODES, "STFTSpectrogram mode")
        check_int(self.frame_length, "STFTSpectrogram frame_length", MAX_FFT)
        if self.frame_step is not None:
            check_int(self.frame_step, "STFTSpectrogram frame_step", self.frame_length)
        if self.fft_length is not None:
            check_int(self.fft_length, "STFTSpectrogram fft_length", MAX_FFT, self.frame_length)
        if self.window is not None and (
            not isinstance(self.window, str) or not 0 < len(self.window) <= 100 or not self.window.isprintable()
        ):
            raise ExchangeError("STFTSpectrogram window must be a scipy window name or null")
        coerce(self.periodic, bool, "STFTSpectrogram periodic")
        if self.scaling is not None:
            check_choice(self.scaling, SCALINGS, "STFTSpectrogram scaling")
        check_choice(self.padding, PADDINGS, "STFTSpectrogram padding")
        coerce(self.expand_dims, bool, "STFTSpectrogram expand_dims")
        check_choice(self.data_format, DATA_FORMATS, "STFTSpectrogram data_format")

    @property
    def step(self) -> int:
        return self.frame_step or self.frame_length // 2

    @property
    def frequencies(self) -> int:
        """The kernels' output channels: fft_length // 2 + 1 (fft_length: the next power of 2)."""
        fft_length = self.fft_length or 2 ** math.ceil(math.log2(self.frame_length))
        return fft_length // 2 + 1


@register
class STFTSpectrogram(LayerKind):
    """The spectrogram as Keras computes it: a strided 1-D convolution of each channel with two
    kernels (`helpers.KerasSTFTSpectrogram`); the kernels are weights (Keras initialises them
    from a scipy window, which the file's values already hold)."""

    kind, keras_classes, Config = "stft_spectrogram", ("STFTSpectrogram",), STFTSpectrogramConfig

    def from_keras(self, options: KerasOptions) -> STFTSpectrogramConfig:
        window = options.take("window", "hann")
        if window is not None and not isinstance(window, str):
            raise options.unsupported("window", window, "window values in the config: only a window name")
        scaling = options.take("scaling", "density")
        if scaling is not None and scaling not in SCALINGS:
            raise options.unsupported("scaling", scaling)
        values = {}
        for key, allowed, default in (
            ("mode", STFT_MODES, "log"),
            ("padding", PADDINGS, "valid"),
            ("data_format", DATA_FORMATS, None),
        ):
            value = options.take(key, default)
            value = "channels_last" if key == "data_format" and value is None else value
            if value not in allowed:
                raise options.unsupported(key, value)
            values[key] = value
        frame_step, fft_length = options.take("frame_step", None), options.take("fft_length", None)
        try:
            return STFTSpectrogramConfig(
                values["mode"],
                options.integer("frame_length", 256),
                None if frame_step is None else options.integer("frame_step"),
                None if fft_length is None else options.integer("fft_length"),
                window,
                options.flag("periodic", False),
                scaling,
                values["padding"],
                options.flag("expand_dims", False),
                values["data_format"],
            )
        except ExchangeError as err:
            raise UnsupportedLayerError(f"{options.where()}: {err}") from None

    def output_shape(self, config: STFTSpectrogramConfig, input_shapes: tuple[Shape, ...]) -> Shape:
        shape = input_shapes[0]
        if len(shape) != 2:
            raise UnsupportedLayerError(
                f"STFTSpectrogram needs signals of shape (batch, samples, channels) or "
                f"(batch, channels, samples), found (batch, {shape})"
            )
        length, channels = shape if config.data_format == "channels_last" else shape[::-1]
        if channels is None:
            raise UnsupportedLayerError("STFTSpectrogram needs a known number of channels")
        if length is None:
            frames = None
        elif config.padding == "same":
            frames = -(-length // config.step)
        else:
            if length < config.frame_length:
                raise UnsupportedLayerError(
                    f"STFTSpectrogram of {length} samples is shorter than its frame_length {config.frame_length}"
                )
            frames = (length - config.frame_length) // config.step + 1
        frequencies = config.frequencies * (2 if config.mode == "stft" else 1)
        if config.expand_dims:
            return (
                (frames, frequencies, channels)
                if config.data_format == "channels_last"
                else (channels, frames, frequencies)
            )
        return (
            (frames, frequencies * channels)
            if config.data_format == "channels_last"
            else (frequencies * channels, frames)
        )

    def ports(self, context: NodeContext) -> list[AnyPort]:
        config = context.config
        shape = (config.frame_length, 1, config.frequencies)
        return [
            Port(f"{part}_kernel", f"{part}_weight", (Permute((2, 1, 0)),), shape=shape)
            for part in ("real", "imag")
            if config.mode != ("imag" if part == "real" else "real")
        ]

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        config = context.config
        module = builder.helpers.KerasSTFTSpectrogram(
            config.mode,
            config.frame_length,
            config.step,
            config.frequencies,
            padding=config.padding,
            expand_dims=config.expand_dims,
            data_format=config.data_format,
            epsilon=KERAS_EPSILON,
            device="meta",
            dtype=builder.dtype(context),
        )
        signals = builder.call(builder.torch.permute, inputs[0], to_keras_order(2))  # as Keras holds them
        value = builder.module(context, module, signals)
        return builder.call(builder.torch.permute, value, to_torch_order(len(context.output_shape)))

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        return keras.layers.STFTSpectrogram(
            mode=config.mode,
            frame_length=config.frame_length,
            frame_step=config.frame_step,
            fft_length=config.fft_length,
            window=config.window,
            periodic=config.periodic,
            scaling=config.scaling,
            padding=config.padding,
            expand_dims=config.expand_dims,
            data_format=config.data_format,
            **context.keras_identity,
        )
