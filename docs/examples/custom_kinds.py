"""Layer kinds for two Keras layers of a user's own, the worked example of docs/adding-a-layer-kind.md:

    python scripts/convert.py model.keras model.py --kinds docs/examples/custom_kinds.py --verify

- `MaskedAverage`: the mean over time of the steps with a nonzero feature (MMSplice's
  `GlobalAveragePooling1D_Mask0`): no weights.
- `AttentionWeightedAverage` (DeepMoji's): a softmax over time of `x @ kernel` weighs the steps:
  one weight, Keras's (features, 1) kernel, held by torch as an `nn.Linear(features, 1)`'s (1, features).

The Keras classes are defined here too, registered under the package name `custom_layers` (a real
project imports them from its own package), so that Keras opens the models in safe mode.
"""

from __future__ import annotations

import keras
from keras import ops

from exchange.errors import UnsupportedLayerError
from exchange.kinds import LayerKind, NoConfig, register
from exchange.ports import Permute, Port

PACKAGE = "custom_layers"
EPSILON = 1e-7  # what the Keras classes below add to the attention weights' sum (keras.config.epsilon())


# ---------------------------------------------------------------------------------------------
# The Keras layers, as a user's project has them


@keras.saving.register_keras_serializable(package=PACKAGE)
class MaskedAverage(keras.layers.Layer):
    def call(self, inputs):
        kept = ops.cast(ops.any(ops.not_equal(inputs, 0), axis=-1, keepdims=True), inputs.dtype)
        return ops.sum(inputs * kept, axis=1) / ops.maximum(ops.sum(kept, axis=1), 1.0)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])


@keras.saving.register_keras_serializable(package=PACKAGE)
class AttentionWeightedAverage(keras.layers.Layer):
    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], 1), name="kernel", initializer="glorot_uniform")

    def call(self, inputs):
        logits = ops.squeeze(ops.matmul(inputs, self.kernel), axis=-1)
        weights = ops.exp(logits - ops.max(logits, axis=-1, keepdims=True))
        weights = weights / (ops.sum(weights, axis=-1, keepdims=True) + EPSILON)
        return ops.sum(inputs * ops.expand_dims(weights, -1), axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])


# ---------------------------------------------------------------------------------------------
# Their kinds. The torch side holds a Keras (N, steps, features) sequence channels-first, as
# (N, features, steps): the steps are torch's axis 2.


def _sequence_features(input_shapes, what: str) -> tuple:
    if len(input_shapes[0]) != 2:
        raise UnsupportedLayerError(f"{what} takes (batch, steps, features), found (batch, {input_shapes[0]})")
    return (input_shapes[0][1],)


@register
class MaskedAverageKind(LayerKind):
    """The mean over the steps that have a nonzero feature (a step of zeros is padding)."""

    kind, keras_classes, Config = "custom.masked_average", (f"{PACKAGE}>MaskedAverage",), NoConfig

    def from_keras(self, options):
        return NoConfig()

    def output_shape(self, config, input_shapes):
        return _sequence_features(input_shapes, "MaskedAverage")

    def torch_forward(self, builder, context, inputs):
        torch = builder.torch
        (sequence,) = inputs
        kept = builder.call(torch.any, builder.call(torch.ne, sequence, 0), 1, keepdim=True)  # (N, 1, steps)
        kept = builder.method(kept, "type_as", sequence)
        total = builder.call(torch.sum, builder.call(torch.mul, sequence, kept), 2)
        count = builder.call(torch.clamp, builder.call(torch.sum, kept, 2), min=1.0)
        return builder.call(torch.div, total, count)

    def keras_layer(self, keras, context):
        return MaskedAverage(**context.keras_identity)


@register
class AttentionWeightedAverageKind(LayerKind):
    """Softmax over the steps of `sequence @ kernel`, then the weighted sum of the steps."""

    kind, keras_classes, Config = (
        "custom.attention_weighted_average",
        (f"{PACKAGE}>AttentionWeightedAverage",),
        NoConfig,
    )

    def from_keras(self, options):
        return NoConfig()

    def output_shape(self, config, input_shapes):
        return _sequence_features(input_shapes, "AttentionWeightedAverage")

    def ports(self, context):
        features = context.input_shape[-1]
        return [Port("kernel", "weight", (Permute((1, 0)),), shape=(features, 1))]

    def torch_forward(self, builder, context, inputs):
        torch, features = builder.torch, context.input_shape[-1]
        (sequence,) = inputs
        steps_last = builder.call(torch.movedim, sequence, 1, -1)  # (N, steps, features)
        scores = builder.module(
            context, builder.nn.Linear(features, 1, bias=False, device="meta", dtype=builder.dtype(context)), steps_last
        )
        logits = builder.call(torch.squeeze, scores, -1)  # (N, steps)
        peak = builder.call(torch.amax, logits, -1, keepdim=True)
        weights = builder.call(torch.exp, builder.call(torch.sub, logits, peak))
        total = builder.call(torch.add, builder.call(torch.sum, weights, -1, keepdim=True), EPSILON)
        weights = builder.call(torch.unsqueeze, builder.call(torch.div, weights, total), 1)  # (N, 1, steps)
        return builder.call(torch.sum, builder.call(torch.mul, sequence, weights), 2)

    def keras_layer(self, keras, context):
        return AttentionWeightedAverage(**context.keras_identity)
