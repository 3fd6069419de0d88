"""Layers that act only in training and are the identity at inference: Identity, GaussianNoise,
GaussianDropout, AlphaDropout, ActivityRegularization, SpatialDropout3D, and the random image
augmentations of `keras.layers` (RandomFlip, RandomRotation, ..., AugMix, CutMix, MixUp, RandAugment).

Each stays a node of the graph under its Keras name, so the graph reads like the Keras model, and
keeps every option of its Keras config, so that the Keras model rebuilt from an exchange file has
the same layer (a model trained further in Keras augments as before). The torch side passes its
input on: nothing to compute at inference. Dropout and SpatialDropout1D/2D are in reshaping.py.

Conventions that differ:
- At inference (`model.predict`, `training=False`) each of these Keras layers returns its input
  unchanged; torch has no augmentation layers, and its noise and dropout modules would act in
  `train()` mode where Keras's need `training=True`: the torch module holds none of them.
- Built to continue training (`builder.training`), the noise and dropout layers are modules that
  act in `train()` mode as Keras's do in training (the same distribution; the draws differ):
  GaussianNoise adds N(0, stddev^2) noise (`KerasGaussianNoise`), GaussianDropout multiplies by
  N(1, rate / (1 - rate)) noise (`KerasGaussianDropout`), AlphaDropout is `nn.AlphaDropout(rate)`
  (the same formula: a dropped value is SELU's -alpha * scale, then `a * x + b` with
  `a = ((1 - rate) * (1 + rate * (alpha * scale)^2))^-0.5`, `b = -a * (-alpha * scale) * rate`),
  SpatialDropout3D is `nn.Dropout3d` (see `exchange.kinds.reshaping`'s dropouts). Keras's
  training fails at rate 1 for GaussianDropout and AlphaDropout (a division by zero), and
  AlphaDropout's `noise_shape` has no torch form: such layers are refused there.
- ActivityRegularization adds `(l1 * sum(|x|) + l2 * sum(x^2)) / batch size` of its input to
  Keras's loss in training; torch has no layer losses: built for training it is
  `KerasActivityRegularization`, which keeps that penalty in `penalty` for the training step to
  add (`optimizers.activity_penalty`; generated `train_step` and `training_state.torch_loss` do).
  A shared one is refused there (its module would keep one call's penalty).
- The random augmentations are not reproduced in torch training: a conversion that carries a
  training state names them in a note (`acts_in_training`).
- Keras's image augmentations apply themselves when a model is called without `training=`
  (`model(x)`): the exchange's reference is `model.predict`, which does not.

- RandomCrop: at inference Keras 3.15 returns its input unchanged (TensorFlow backend, checked)
  but declares a (height, width) output; only where the input already is (height, width) do both
  agree, and only there is it converted (the identity); elsewhere it is refused.

Not here, because Keras computes something at inference: AutoContrast, CenterCrop, Resizing,
ContrastLimitedAdaptiveHistogramEqualization. Equalization is the identity at inference but cannot
be called in a functional model (its symbolic output is its input: Keras reports a cycle).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

from exchange.errors import ExchangeError, UnsupportedLayerError
from exchange.kinds import (
    MAX_FEATURES,
    MAX_WINDOW,
    KerasOptions,
    LayerKind,
    TorchBuilder,
    TorchValue,
    check_choice,
    check_int,
    check_ints,
    coerce,
    register,
)

if TYPE_CHECKING:
    from exchange.graph import NodeContext, Shape

# A Keras number option as written: an int stays an int (`factor=1` goes back as 1, not 1.0).
Number = int | float
# Keras's "factor" spellings: one number (a symmetric range, or its upper end) or (lower, upper).
Range = int | float | tuple[int | float, int | float]
DATA_FORMATS = ("channels_last", "channels_first")
INTERPOLATIONS = ("nearest", "bilinear")  # what Keras's affine transforms accept (TensorFlow backend)
FILL_MODES = ("reflect", "wrap", "constant", "nearest", "mirror")
FLIP_MODES = ("horizontal", "vertical", "horizontal_and_vertical")
# AugMix's chains and depth and RandAugment's operations: Keras's defaults are 2 or 3; each is a
# pass over the image in training.
MAX_AUGMENTATION_STEPS = 1 << 6
# MaxNumBoundingBoxes' boxes per image.
MAX_BOXES = 1 << 16


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of a training-only layer's Keras config: its type in the exchange config (what
    an exchange file's JSON is checked against), its Keras default (for a config that leaves it
    out), and the check of its value beyond its type."""

    hint: Any
    default: Any
    expected: str  # what the value must be, in words, for the one-line refusal of a Keras option
    check: Callable[[Any, str], object] = lambda value, what: None  # its result is not read

    def validated(self, value: Any, what: str) -> Any:
        """`value` as the config holds it (lists as tuples), or ExchangeError naming `what`."""
        value = coerce(value, self.hint, what)
        self.check(value, what)
        return value


def number(default: Any = dataclasses.MISSING) -> Option:
    return Option(Number, default, "a number")


def factor(default: Any = dataclasses.MISSING) -> Option:
    return Option(Range, default, "a number or 2 numbers")


def optional_factor() -> Option:
    return Option(Range | None, None, "a number, 2 numbers or null")


def value_range(default: tuple[Number, Number] = (0, 255)) -> Option:
    return Option(tuple[Number, Number], default, "2 numbers")


def seed() -> Option:
    return Option(int | None, None, "an integer or null")


def choice(default: str, allowed: tuple[str, ...]) -> Option:
    return Option(str, default, f"one of {', '.join(allowed)}", lambda value, what: check_choice(value, allowed, what))


def count(default: Any, maximum: int) -> Option:
    """A count (of steps, of boxes): an integer from 1 to `maximum`."""
    return Option(
        int, default, f"an integer from 1 to {maximum:,}", lambda value, what: check_int(value, what, maximum)
    )


def count_range(default: Any, maximum: int) -> Option:
    """A count, or the (lower, upper) range it is drawn from (AugMix's chain_depth)."""
    return Option(
        int | tuple[int, int],
        default,
        f"1 or 2 integers from 1 to {maximum:,}",
        lambda value, what: check_ints(value if isinstance(value, tuple) else (value,), what, maximum),
    )


def _check_kernel(value: int | tuple[int, ...], what: str) -> None:
    for size in value if isinstance(value, tuple) else (value,):
        check_int(size, what, MAX_WINDOW)


def _check_noise_shape(value: tuple[int | None, ...] | None, what: str) -> None:
    for size in value or ():
        if size is not None:
            check_int(size, what, MAX_FEATURES)


DATA_FORMAT = choice("channels_last", DATA_FORMATS)
INTERPOLATION = choice("bilinear", INTERPOLATIONS)
FILL_MODE = choice("reflect", FILL_MODES)


def options_config(name: str, **options: Option) -> Any:
    """A frozen dataclass with one field per option (typed by its `hint`, every value explicit),
    its `__post_init__` checking each value whichever source it comes from."""

    def __post_init__(self: Any) -> None:
        for key, option in options.items():
            object.__setattr__(self, key, option.validated(getattr(self, key), f"option {key!r}"))

    config: Any = dataclasses.make_dataclass(
        name,
        [(key, option.hint) for key, option in options.items()],
        frozen=True,
        namespace={"__post_init__": __post_init__},
    )
    config.OPTIONS = options
    return config


class _TrainingOnly(LayerKind):
    """The identity at inference in both frameworks; the Keras layer is rebuilt from every option."""

    keeps_element_order = True
    passes_mask = True  # Keras's `supports_masking` (the regularization layers)
    ranks: tuple[int, ...] = ()  # input ranks (batch excluded) the Keras layer accepts; () any
    Config: Any  # an `options_config` dataclass, its options in `Config.OPTIONS`

    def from_keras(self, options: KerasOptions) -> Any:
        values = {}
        for key, option in self.Config.OPTIONS.items():
            value = options.take(key, option.default)
            try:
                values[key] = option.validated(value, f"option {key!r}")
            except ExchangeError:
                raise options.unsupported(key, value, f"expected {option.expected}") from None
        return self.Config(**values)

    def output_shape(self, config: Any, input_shapes: tuple[Shape, ...]) -> Shape:
        shape = input_shapes[0]
        if self.ranks and len(shape) not in self.ranks:
            expected = " or ".join(str(rank + 1) for rank in self.ranks)
            raise ExchangeError(f"expects rank-{expected} input (batch included), found shape (batch, {shape})")
        return shape

    def torch_forward(self, builder: TorchBuilder, context: NodeContext, inputs: list[TorchValue]) -> TorchValue:
        if not builder.training or not self.acts_in_torch_training(context.config):
            return inputs[0]
        return builder.module(context, self.training_module(builder, context), inputs[0])

    reproduced_in_training = False  # its torch module acts as Keras's layer in training

    def acts_in_torch_training(self, config: Any) -> bool:
        """Whether a module built for training holds a module for this layer."""
        return self.reproduced_in_training and not self.passes_input_in_training(config)

    def training_module(self, builder: TorchBuilder, context: NodeContext) -> Any:
        """The torch module that acts in `train()` mode as the Keras layer does in training."""
        raise NotImplementedError

    def keras_layer(self, keras: ModuleType, context: NodeContext) -> Any:
        config = context.config
        options = {key: getattr(config, key) for key in self.Config.OPTIONS}
        return getattr(keras.layers, self.keras_classes[0])(**options, **context.keras_identity)

    def numpy_forward(self, context: NodeContext, tensors: dict[str, Any], inputs: list[Any]) -> Any:
        return inputs[0]

    def acts_in_training(self, config: Any) -> str | None:
        if self.passes_input_in_training(config) or self.reproduced_in_training:
            return None
        return "random in Keras training"


def _rate_below_one(context: NodeContext) -> float:
    """The rate of a GaussianDropout or AlphaDropout, which Keras's training divides by 1 - rate."""
    if context.config.rate >= 1:
        raise UnsupportedLayerError(
            f"layer {context.node.name!r} ({context.node.kind}): rate {context.config.rate} is not trained: "
            "Keras's training divides by 1 - rate"
        )
    return float(context.config.rate)


@register
class Identity(_TrainingOnly):
    kind, keras_classes, Config = "identity", ("Identity",), options_config("IdentityConfig")
    moves_values = True

    def passes_input_in_training(self, config: Any) -> bool:
        return True


@register
class GaussianNoise(_TrainingOnly):
    kind, keras_classes = "gaussian_noise", ("GaussianNoise",)
    Config = options_config("GaussianNoiseConfig", stddev=number(), seed=seed())
    reproduced_in_training = True

    def passes_input_in_training(self, config: Any) -> bool:
        return bool(config.stddev <= 0)  # Keras returns its input itself at stddev 0

    def training_module(self, builder: TorchBuilder, context: NodeContext) -> Any:
        return builder.helpers.KerasGaussianNoise(float(context.config.stddev))


@register
class GaussianDropout(_TrainingOnly):
    kind, keras_classes = "gaussian_dropout", ("GaussianDropout",)
    Config = options_config("GaussianDropoutConfig", rate=number(), seed=seed())
    reproduced_in_training = True

    def passes_input_in_training(self, config: Any) -> bool:
        return bool(config.rate <= 0)  # Keras returns its input itself at rate 0

    def training_module(self, builder: TorchBuilder, context: NodeContext) -> Any:
        return builder.helpers.KerasGaussianDropout(_rate_below_one(context))


@register
class AlphaDropout(_TrainingOnly):
    kind, keras_classes = "alpha_dropout", ("AlphaDropout",)
    Config = options_config(
        "AlphaDropoutConfig",
        rate=number(),
        seed=seed(),
        noise_shape=Option(tuple[int | None, ...] | None, None, "sizes or null", _check_noise_shape),
    )
    reproduced_in_training = True

    def passes_input_in_training(self, config: Any) -> bool:
        return bool(config.rate <= 0)  # Keras returns its input itself at rate 0

    def training_module(self, builder: TorchBuilder, context: NodeContext) -> Any:
        if context.config.noise_shape is not None:
            raise UnsupportedLayerError(
                f"layer {context.node.name!r} (AlphaDropout): noise_shape {context.config.noise_shape} is not "
                "trained (torch's AlphaDropout draws per value)"
            )
        return builder.nn.AlphaDropout(_rate_below_one(context))


@register
class ActivityRegularization(_TrainingOnly):
    """Adds a loss on its input in training; passes the input on."""

    kind, keras_classes = "activity_regularization", ("ActivityRegularization",)
    Config = options_config("ActivityRegularizationConfig", l1=number(0.0), l2=number(0.0))
    reproduced_in_training = True

    def passes_input_in_training(self, config: Any) -> bool:
        return True  # it adds a loss on its input and returns the input itself

    def acts_in_torch_training(self, config: Any) -> bool:
        return bool(config.l1 != 0 or config.l2 != 0)

    def training_module(self, builder: TorchBuilder, context: NodeContext) -> Any:
        if context.node.shares is not None:
            raise UnsupportedLayerError(
                f"layer {context.node.name!r} (ActivityRegularization): a shared layer's penalty is not trained "
                "(its torch module keeps one call's)"
            )
        return builder.helpers.KerasActivityRegularization(float(context.config.l1), float(context.config.l2))


@register
class SpatialDropout3D(_TrainingOnly):
    kind, keras_classes, ranks = "spatial_dropout3d", ("SpatialDropout3D",), (4,)
    Config = options_config("SpatialDropout3DConfig", rate=number(), seed=seed(), data_format=DATA_FORMAT)
    reproduced_in_training = True

    def passes_input_in_training(self, config: Any) -> bool:
        return bool(config.rate == 0)  # Keras returns its input itself at rate 0

    def training_module(self, builder: TorchBuilder, context: NodeContext) -> Any:
        from exchange.kinds.reshaping import spatial_dropout

        return spatial_dropout(builder, context)


class _Augmentation(_TrainingOnly):
    """A random image augmentation: Keras's call takes a batch of images (rank 4) or one image
    (rank 3) and drops any mask (no `supports_masking`)."""

    passes_mask = False
    casts_integers = True  # an image of uint8 or int32 pixels comes out float32
    ranks: tuple[int, ...] = (2, 3)

    def from_keras(self, options: KerasOptions) -> Any:
        options.expect("bounding_box_format", None)  # boxes only travel in dict inputs
        return super().from_keras(options)


def _augmentation(class_name: str, kind: str, **options: Option) -> type:
    """Register the kind of one Keras augmentation class, its config holding `options`."""
    namespace = {
        "kind": kind,
        "keras_classes": (class_name,),
        "__doc__": f"keras.layers.{class_name}",
        "Config": options_config(f"{class_name}Config", **options),
    }
    return register(type(class_name, (_Augmentation,), namespace))


# The classes and their options (as `get_config` writes them), with Keras's defaults.
_augmentation(
    "RandomFlip",
    "random_flip",
    mode=choice("horizontal_and_vertical", FLIP_MODES),
    seed=seed(),
    data_format=DATA_FORMAT,
)
_augmentation(
    "RandomRotation",
    "random_rotation",
    factor=factor(),
    fill_mode=FILL_MODE,
    interpolation=INTERPOLATION,
    seed=seed(),
    fill_value=number(0.0),
    data_format=DATA_FORMAT,
)
_augmentation(
    "RandomZoom",
    "random_zoom",
    height_factor=factor(),
    width_factor=optional_factor(),
    fill_mode=FILL_MODE,
    interpolation=INTERPOLATION,
    seed=seed(),
    fill_value=number(0.0),
    data_format=DATA_FORMAT,
)
_augmentation(
    "RandomTranslation",
    "random_translation",
    height_factor=factor(),
    width_factor=factor(),
    fill_mode=FILL_MODE,
    interpolation=INTERPOLATION,
    seed=seed(),
    fill_value=number(0.0),
    data_format=DATA_FORMAT,
)
_augmentation(
    "RandomShear",
    "random_shear",
    x_factor=factor(0.0),
    y_factor=factor(0.0),
    interpolation=INTERPOLATION,
    fill_mode=FILL_MODE,
    fill_value=number(0.0),
    seed=seed(),
    data_format=DATA_FORMAT,
)
_augmentation(
    "RandomPerspective",
    "random_perspective",
    factor=factor(1.0),
    scale=number(1.0),
    interpolation=INTERPOLATION,
    fill_value=number(0.0),
    seed=seed(),
    data_format=DATA_FORMAT,
)
_augmentation(
    "RandomElasticTransform",
    "random_elastic_transform",
    factor=factor(1.0),
    scale=factor(1.0),
    interpolation=INTERPOLATION,
    fill_mode=FILL_MODE,
    fill_value=number(0.0),
    value_range=value_range(),
    seed=seed(),
    data_format=DATA_FORMAT,
)
_augmentation(
    "RandomContrast",
    "random_contrast",
    factor=factor(),
    value_range=value_range(),
    seed=seed(),
    data_format=DATA_FORMAT,
)
_augmentation(
    "RandomBrightness",
    "random_brightness",
    factor=factor(),
    value_range=value_range(),
    seed=seed(),
    data_format=DATA_FORMAT,
)
_augmentation("RandomGrayscale", "random_grayscale", factor=number(0.5), data_format=DATA_FORMAT)
_augmentation(
    "RandomHue", "random_hue", factor=factor(), value_range=value_range(), seed=seed(), data_format=DATA_FORMAT
)
_augmentation(
    "RandomSaturation",
    "random_saturation",
    factor=factor(),
    value_range=value_range(),
    seed=seed(),
    data_format=DATA_FORMAT,
)
_augmentation(
    "RandomSharpness",
    "random_sharpness",
    factor=factor(),
    value_range=value_range(),
    seed=seed(),
    data_format=DATA_FORMAT,
)
_augmentation(
    "RandomColorDegeneration",
    "random_color_degeneration",
    factor=factor(),
    value_range=value_range(),
    seed=seed(),
    data_format=DATA_FORMAT,
)
_augmentation(
    "RandomColorJitter",
    "random_color_jitter",
    value_range=value_range(),
    brightness_factor=optional_factor(),
    contrast_factor=optional_factor(),
    saturation_factor=optional_factor(),
    hue_factor=optional_factor(),
    seed=seed(),
    data_format=DATA_FORMAT,
)
_augmentation(
    "RandomPosterization",
    "random_posterization",
    factor=factor(),
    value_range=value_range(),
    seed=seed(),
    data_format=DATA_FORMAT,
)
_augmentation(
    "RandomInvert", "random_invert", factor=factor(1.0), value_range=value_range(), seed=seed(), data_format=DATA_FORMAT
)
_augmentation(
    "RandomErasing",
    "random_erasing",
    factor=factor(1.0),
    scale=factor((0.02, 0.33)),
    fill_value=Option(Number | None, None, "a number or null"),
    value_range=value_range(),
    seed=seed(),
    data_format=DATA_FORMAT,
)
_augmentation(
    "RandomGaussianBlur",
    "random_gaussian_blur",
    factor=factor(1.0),
    kernel_size=Option(int | tuple[int, int], 3, "1 or 2 window sizes", _check_kernel),
    sigma=factor(1.0),
    value_range=value_range(),
    seed=seed(),
    data_format=DATA_FORMAT,
)
_augmentation(
    "Solarization",
    "solarization",
    addition_factor=factor(0.0),
    threshold_factor=factor(0.0),
    value_range=value_range(),
    seed=seed(),
    data_format=DATA_FORMAT,
)
_augmentation(
    "AugMix",
    "aug_mix",
    value_range=value_range(),
    num_chains=count(3, MAX_AUGMENTATION_STEPS),
    chain_depth=count_range(3, MAX_AUGMENTATION_STEPS),
    factor=factor(0.3),
    alpha=number(1.0),
    all_ops=Option(bool, True, "true or false"),
    interpolation=INTERPOLATION,
    seed=seed(),
    data_format=DATA_FORMAT,
)
_augmentation(
    "RandAugment",
    "rand_augment",
    value_range=value_range(),
    num_ops=count(2, MAX_AUGMENTATION_STEPS),
    factor=factor(0.5),
    interpolation=INTERPOLATION,
    seed=seed(),
    data_format=DATA_FORMAT,
)


class _RandomCrop(_Augmentation):
    """keras.layers.RandomCrop: the identity at inference, converted only where its declared
    (height, width) output is its input's shape. Only batches of images: Keras takes a rank-3
    input for one image, whose declared shape then replaces the batch axis."""

    ranks = (3,)

    def output_shape(self, config: Any, input_shapes: tuple[Shape, ...]) -> Shape:
        shape = super().output_shape(config, input_shapes)
        sides = shape[-3:-1] if config.data_format == "channels_last" else shape[-2:]
        if tuple(sides) != (config.height, config.width):
            raise UnsupportedLayerError(
                f"RandomCrop to {config.height}x{config.width} of a (batch, {shape}) input is not supported (Keras "
                "3.15's predict returns the input unchanged but declares the cropped shape: no graph holds both)"
            )
        return shape


register(
    type(
        "RandomCrop",
        (_RandomCrop,),
        {
            "kind": "random_crop",
            "keras_classes": ("RandomCrop",),
            "__doc__": _RandomCrop.__doc__,
            "Config": options_config(
                "RandomCropConfig",
                height=count(dataclasses.MISSING, MAX_FEATURES),
                width=count(dataclasses.MISSING, MAX_FEATURES),
                seed=seed(),
                data_format=DATA_FORMAT,
            ),
        },
    )
)
_augmentation("CutMix", "cut_mix", factor=factor(1.0), seed=seed(), data_format=DATA_FORMAT)
_augmentation("MixUp", "mix_up", alpha=number(0.2), seed=seed(), data_format=DATA_FORMAT)
_augmentation(
    "MaxNumBoundingBoxes",
    "max_num_bounding_boxes",
    max_number=count(dataclasses.MISSING, MAX_BOXES),
    data_format=DATA_FORMAT,
)
