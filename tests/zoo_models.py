"""The zoo's model builders (CNNs, keras.applications, sequence models) and their tolerances,
shared by tests/test_zoo.py, tests/test_codegen.py and scripts/bench_convert.py."""

import keras
import pytest
from support import ROOT

L = keras.layers
# Small models: float32 rounding between TensorFlow and PyTorch stays near 1e-6.
SMALL_TOLERANCE = 1e-5
# keras.applications models: 50+ layers of rounding, relative to the largest output.
APPLICATION_RELATIVE_TOLERANCE = 1e-4
KERAS2_FIXTURES = ROOT / "tests/fixtures/keras2"


def mnist_cnn():
    inputs = keras.Input((28, 28, 1), name="digits")
    x = L.Conv2D(8, 3, activation="relu", name="conv1")(inputs)
    x = L.MaxPooling2D(2, name="pool1")(x)
    x = L.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="conv2")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(32, activation="relu", name="fc1")(x)
    x = L.Dropout(0.5, name="dropout")(x)
    return keras.Model(inputs, L.Dense(10, activation="softmax", name="fc2")(x), name="mnist_cnn")


def conv_bn_relu_gap():
    inputs = keras.Input((27, 33, 3), name="image")
    x = L.Conv2D(12, (3, 5), padding="same", use_bias=False, name="conv1")(inputs)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="relu1")(x)
    x = L.Conv2D(16, 3, strides=2, name="conv2")(x)
    x = L.BatchNormalization(epsilon=1.001e-5, name="bn2")(x)
    x = L.ReLU(name="relu2")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, L.Dense(5, activation="softmax", name="classifier")(x), name="conv_bn_relu_gap")


def depthwise_separable():
    inputs = keras.Input((30, 26, 4), name="image")
    x = L.DepthwiseConv2D(3, depth_multiplier=2, strides=2, padding="same", name="dw")(inputs)
    x = L.BatchNormalization(name="dw_bn")(x)
    x = L.ReLU(6.0, name="dw_relu")(x)
    x = L.SeparableConv2D(10, 3, padding="same", name="sep")(x)
    x = L.BatchNormalization(name="sep_bn")(x)
    x = L.Activation("swish", name="sep_swish")(x)
    x = L.GlobalMaxPooling2D(name="gmp")(x)
    return keras.Model(inputs, L.Dense(3, name="head")(x), name="depthwise_separable")


def conv_transpose_autoencoder():
    inputs = keras.Input((24, 20, 2), name="image")
    x = L.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="enc1")(inputs)
    x = L.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="enc2")(x)
    x = L.Conv2DTranspose(8, 3, strides=2, padding="same", activation="relu", name="dec1")(x)
    outputs = L.Conv2DTranspose(2, 3, strides=2, padding="same", activation="sigmoid", name="dec2")(x)
    return keras.Model(inputs, outputs, name="autoencoder")


def mobilenet_v2():
    return keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3))


def resnet50():
    return keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3))


def mobilenet_v3_small():
    """Hard-swish written as `x + 3.0` and `x * (1 / 6)`: Keras operations, not layers."""
    return keras.applications.MobileNetV3Small(weights=None, input_shape=(64, 64, 3))


VOCABULARY = 13  # token ids in tests are drawn below kerasmodels.TOKEN_IDS (7), 0 included: padding


def text_cnn():
    inputs = keras.Input((17,), dtype="int32", name="tokens")
    x = L.Embedding(VOCABULARY, 8, name="embed")(inputs)
    x = L.Conv1D(6, 3, padding="same", activation="relu", name="conv")(x)
    x = L.GlobalMaxPooling1D(name="pool")(x)
    return keras.Model(inputs, L.Dense(3, activation="softmax", name="classify")(x), name="text_cnn")


def embedding_lstm():
    inputs = keras.Input((15,), dtype="int32", name="tokens")
    x = L.Embedding(VOCABULARY, 6, mask_zero=True, name="embed")(inputs)
    x = L.LSTM(9, name="lstm")(x)
    return keras.Model(inputs, L.Dense(4, activation="softmax", name="classify")(x), name="embedding_lstm")


def embedding_gru():
    inputs = keras.Input((15,), dtype="int32", name="tokens")
    x = L.Embedding(VOCABULARY, 6, mask_zero=True, name="embed")(inputs)
    x = L.GRU(7, return_sequences=True, name="gru_1")(x)
    x = L.GRU(5, go_backwards=True, name="gru_2")(x)
    return keras.Model(inputs, L.Dense(2, name="score")(x), name="embedding_gru")


def embedding_bilstm():
    inputs = keras.Input((13,), dtype="int32", name="tokens")
    x = L.Embedding(VOCABULARY, 5, mask_zero=True, name="embed")(inputs)
    x = L.Bidirectional(L.LSTM(6, return_sequences=True), name="bilstm")(x)
    x = L.GlobalAveragePooling1D(name="mean")(x)  # masked: the mean of the unpadded steps
    return keras.Model(inputs, L.Dense(3, activation="softmax", name="classify")(x), name="embedding_bilstm")


def simple_rnn():
    inputs = keras.Input((19, 3), name="series")
    x = L.SimpleRNN(8, return_sequences=True, name="rnn_1")(inputs)
    x = L.SimpleRNN(4, activation="relu", name="rnn_2")(x)
    return keras.Model(inputs, L.Dense(1, name="forecast")(x), name="simple_rnn")


def transformer_block():
    """Masked token embeddings -> self-attention (4 heads x key_dim 8 = width 32: nn.MultiheadAttention)
    -> Add & LayerNorm -> Dense feed-forward on (steps, features) -> Add & LayerNorm -> masked mean."""
    inputs = keras.Input((11,), dtype="int32", name="tokens")
    x = L.Embedding(VOCABULARY, 32, mask_zero=True, name="embed")(inputs)
    attended = L.MultiHeadAttention(4, 8, name="attention")(x, x)
    x = L.LayerNormalization(epsilon=1e-6, name="norm_1")(L.Add(name="residual_1")([x, attended]))
    hidden = L.Dense(48, activation="gelu", name="ffn_1")(x)
    x = L.Add(name="residual_2")([x, L.Dense(32, name="ffn_2")(hidden)])
    x = L.LayerNormalization(epsilon=1e-6, name="norm_2")(x)
    x = L.GlobalAveragePooling1D(name="mean")(x)
    return keras.Model(inputs, L.Dense(3, activation="softmax", name="classify")(x), name="transformer_block")


SEQUENCE_MODELS = ("text_cnn", "embedding_lstm", "embedding_gru", "embedding_bilstm", "simple_rnn", "transformer_block")
SMALL = {
    "mnist_cnn": mnist_cnn,
    "conv_bn_relu_gap": conv_bn_relu_gap,
    "depthwise_separable": depthwise_separable,
    "autoencoder": conv_transpose_autoencoder,
    "text_cnn": text_cnn,
    "embedding_lstm": embedding_lstm,
    "embedding_gru": embedding_gru,
    "embedding_bilstm": embedding_bilstm,
    "simple_rnn": simple_rnn,
    "transformer_block": transformer_block,
}
APPLICATIONS = {"mobilenet_v2": mobilenet_v2, "resnet50": resnet50, "mobilenet_v3_small": mobilenet_v3_small}
# The zoo as test parameters: MobileNetV2's layers (depthwise convolutions, relu6, residual adds)
# are all in MobileNetV3Small and ResNet50 too, so the default run leaves it to `-m slow`.
ZOO = sorted(SMALL) + [
    pytest.param(name, marks=pytest.mark.slow) if name == "mobilenet_v2" else name for name in sorted(APPLICATIONS)
]
