#!/usr/bin/env python3
"""Write the Keras 2 fixture files in tests/fixtures/keras2/ with the real Keras 2 package.

Needs tf-keras (Keras 2) beside TensorFlow, selected with TF_USE_LEGACY_KERAS=1:

    pip install tf-keras==2.21.0
    TF_USE_LEGACY_KERAS=1 python scripts/make_keras2_fixtures.py [OUT_DIR]

For each model it writes the file(s) and, in expected_outputs.npz, what Keras 2 itself computes on
a fixed batch (`np.random.default_rng(0).random((rows, *model.input_shape[1:]), dtype=np.float32)`,
64 rows for the dense models, 16 for the CNN and the GRU model), so the tests compare against real
Keras 2 without having it installed.

Recurrent fixtures: lstm.h5 (Embedding with mask_zero -> LSTM -> LSTM with hard_sigmoid and
go_backwards -> Dense) and gru.h5 (GRU with reset_after=False -> GRU with reset_after=True ->
Dense; no hard_sigmoid, so it can also be written as a Keras 3 file), full models only, every
weight overwritten with seeded non-default values (biases, the LSTM forget-gate part included,
are non-trivial). Keras 2's hard_sigmoid is clip(0.2 * x + 0.5, 0, 1), unlike Keras 3's. The
LSTM model takes int32 token ids; its batch is stored in expected_outputs.npz as `lstm_ids` (16 x 9):

    rng = np.random.default_rng(0)
    ids = rng.integers(1, 20, (16, 9), dtype=np.int32)
    ids[r, 9 - r % 5:] = 0 for each row r    # the last r % 5 positions are padding (mask_zero)

and its outputs as `lstm_outputs`; the GRU model's outputs on the 16-row fixed batch as `gru_outputs`.

TF1-era weight names: `--tf1-names [OUT_DIR]` (a separate run: it switches TensorFlow to graph
mode) writes tf1_names.h5, a CNN built twice in one graph as Keras on TensorFlow 1 did when a
model was loaded twice, so its weights sit under name scopes made unique
(`model_weights/conv2d_1/conv2d_1_1/kernel:0`), with tf1_names_expected.npz (`inputs`, `outputs`).

TensorFlow ops (`TFOpLambda`, `SlicingOpLambda` layers): `--tfop [OUT_DIR]` (a separate run)
writes tfop_unet.h5 (a small U-Net glued with tf.concat, tf.reshape, tf.expand_dims/squeeze,
tf.transpose, tf.image.resize, tf.clip_by_value, tf.math.add_n, tf.math and tf.nn functions and
operator arithmetic), tfop_reduce.h5 (reductions and slicing, four outputs), tfop_every_op.h5
(each op the exchange reads, one output each) and tfop_unsupported.h5 (a tf.math.cumsum), with
tfop_expected.npz: each model's inputs (`<model>_inputs_<i>`, 8 rows seeded uniform in [0, 1),
input i from `default_rng(i)`) and outputs (`<model>_outputs_<i>`).

Shared layers: shared.h5 (one Conv1D and one nested Sequential, each called on two inputs), its
two inputs stored as `shared_inputs_exon` and `shared_inputs_intron`, its outputs as `shared_outputs`.

SavedModel folders: `--saved-model [OUT_DIR]` (a separate run; default tests/fixtures/keras2/saved_model/)
writes three folders with `model.save(folder)` (tf-keras's default SavedModel format): `cnn/`
(Conv2D -> BatchNormalization with seeded moving statistics -> MaxPooling2D -> Dense), `rnn/`
(LSTM -> GRU -> Bidirectional(LSTM): variables kept by nested cells and wrapped layers) and
`nested/` (a functional model calling a nested Sequential and a nested functional model), every
weight seeded; the inputs and outputs of each in saved_model_expected.npz (`<name>_inputs`,
`<name>_outputs`); and the same models as Keras 2 `.h5` files (`<name>.h5`), whose tensors the
SavedModel reader must reproduce. saved_model.pb (the traced graphs, 75 KB to over 1 MB each) is
deleted from the written folders: the exchange never reads it (only keras_metadata.pb and
variables/), and the fixtures stay small.

Training state: `--training [OUT_DIR]` (a separate run) writes training_adam.h5, a small text model
(int32 ids -> Embedding -> Flatten -> Dense with an L2 kernel regularizer -> Dense logits) compiled
with Adam (epsilon 1e-4) and categorical cross-entropy from logits, trained 3 steps with `fit`, so
the file holds `training_config` and `optimizer_weights` (`iteration`, `Adam/m/...`, `Adam/v/...`);
and training_expected.npz: the 20 batches Keras 2 then continues on (`x` ids, `y` one-hot), and
after them every weight (`weight/<weight name>`) and optimizer variable (`optimizer/<name>`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
    sys.exit("error: run with TF_USE_LEGACY_KERAS=1 (and tf-keras installed) so that Keras 2 writes the files")

import numpy as np
import tf_keras as keras

FIXED_BATCH_SEED = 0
FIXED_BATCH_ROWS = 64
CNN_BATCH_ROWS = 16
CNN_WEIGHT_SEED = 7
LSTM_WEIGHT_SEED = 11
GRU_WEIGHT_SEED = 13
WRAPPERS_WEIGHT_SEED = 17
SHARED_WEIGHT_SEED = 19
TF1_WEIGHT_SEED = 23
SAVED_MODEL_WEIGHT_SEED = 29
RNN_BATCH_ROWS = 16
VOCAB_SIZE = 20
SEQ_LEN = 9


def fixed_batch(model: keras.Model, rows: int = FIXED_BATCH_ROWS) -> np.ndarray:
    return np.random.default_rng(FIXED_BATCH_SEED).random((rows, *model.input_shape[1:]), dtype=np.float32)


def seed_mlp() -> keras.Model:
    """The seed's MLP as the notebook wrote it in Keras 2, with a Dropout passing through."""
    return keras.Sequential(
        [
            keras.layers.Dense(50, activation="tanh", input_shape=(784,), name="dense_1"),
            keras.layers.Dropout(0.2, name="dropout_1"),
            keras.layers.Dense(50, activation="tanh", name="dense_2"),
            keras.layers.Dense(10, activation="softmax", name="dense_3"),
        ]
    )


def functional_chain() -> keras.Model:
    """A functional single chain with InputLayer, Flatten, Activation and a bias-less Dense."""
    inputs = keras.Input(shape=(20,), name="features")
    hidden = keras.layers.Flatten(name="flat")(inputs)
    hidden = keras.layers.Dense(16, name="hidden")(hidden)
    hidden = keras.layers.Activation("relu", name="relu")(hidden)
    hidden = keras.layers.Dense(8, activation="sigmoid", use_bias=False, name="no_bias")(hidden)
    outputs = keras.layers.Dense(4, activation="softmax", name="out")(hidden)
    return keras.Model(inputs, outputs, name="chain")


def unsupported() -> keras.Model:
    return keras.Sequential(
        [
            keras.layers.Dense(8, input_shape=(20,), name="dense"),
            keras.layers.BatchNormalization(name="batch_norm"),
            keras.layers.Dense(4, name="out"),
        ]
    )


def branching() -> keras.Model:
    inputs = keras.Input(shape=(20,), name="x")
    left = keras.layers.Dense(8, name="left")(inputs)
    right = keras.layers.Dense(8, name="right")(inputs)
    return keras.Model(inputs, keras.layers.Add(name="add")([left, right]), name="branching")


def cnn() -> keras.Model:
    """A small channels-last CNN; every weight (BatchNorm statistics included) is overwritten with
    seeded non-default values so that biases, beta, moving mean and variance are all exercised."""
    inputs = keras.Input(shape=(29, 30, 3), name="image")
    x = keras.layers.Conv2D(8, (3, 5), padding="valid", activation="relu", name="conv_a")(inputs)
    x = keras.layers.BatchNormalization(epsilon=1e-3, name="bn_a")(x)
    x = keras.layers.MaxPooling2D((2, 2), name="pool_a")(x)
    x = keras.layers.Conv2D(12, 3, strides=2, padding="same", name="conv_b")(x)
    x = keras.layers.Activation("relu", name="relu_b")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(16, activation="tanh", name="fc")(x)
    outputs = keras.layers.Dense(5, activation="softmax", name="logits")(x)
    model = keras.Model(inputs, outputs, name="cnn")
    rng = np.random.default_rng(CNN_WEIGHT_SEED)
    for layer in model.layers:
        new = []
        for var, w in zip(layer.weights, layer.get_weights()):
            short = var.name.split("/")[-1].split(":")[0]
            if short in ("moving_variance", "gamma"):  # keep variance and scale positive
                new.append(rng.uniform(0.5, 1.5, w.shape).astype(w.dtype))
            else:
                new.append(rng.normal(0.0, 0.3, w.shape).astype(w.dtype))
        if new:
            layer.set_weights(new)
    return model


def overwrite_weights(model: keras.Model, seed: int) -> keras.Model:
    """Replace every weight with seeded values: embeddings normal(0, 1), the rest (kernels,
    recurrent kernels, biases: all gate parts, the LSTM forget gate included) normal(0, 0.3)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        new = []
        for var, w in zip(layer.weights, layer.get_weights()):
            short = var.name.split("/")[-1].split(":")[0]
            scale = 1.0 if short == "embeddings" else 0.3
            new.append(rng.normal(0.0, scale, w.shape).astype(w.dtype))
        if new:
            layer.set_weights(new)
    return model


def lstm() -> keras.Model:
    """Token ids -> masked Embedding -> LSTM (sequences) -> backwards LSTM with hard_sigmoid -> Dense."""
    inputs = keras.Input(shape=(SEQ_LEN,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(input_dim=VOCAB_SIZE, output_dim=6, mask_zero=True, name="embed")(inputs)
    x = keras.layers.LSTM(7, return_sequences=True, name="lstm_a")(x)
    x = keras.layers.LSTM(5, recurrent_activation="hard_sigmoid", go_backwards=True, name="lstm_b")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="out")(x)
    return overwrite_weights(keras.Model(inputs, outputs, name="lstm_model"), LSTM_WEIGHT_SEED)


def gru() -> keras.Model:
    """A float series -> GRU (reset_after=False, sequences) -> GRU (reset_after=True) -> Dense."""
    inputs = keras.Input(shape=(11, 4), name="series")
    x = keras.layers.GRU(6, reset_after=False, return_sequences=True, name="gru_a")(inputs)
    x = keras.layers.GRU(5, reset_after=True, name="gru_b")(x)
    outputs = keras.layers.Dense(3, name="out")(x)
    return overwrite_weights(keras.Model(inputs, outputs, name="gru_model"), GRU_WEIGHT_SEED)


def token_batch(rows: int = RNN_BATCH_ROWS) -> np.ndarray:
    """Seeded int32 ids in [1, VOCAB_SIZE); row r ends with r % 5 padding zeros."""
    ids = np.random.default_rng(FIXED_BATCH_SEED).integers(1, VOCAB_SIZE, (rows, SEQ_LEN), dtype=np.int32)
    for r in range(rows):
        ids[r, SEQ_LEN - r % 5 :] = 0
    return ids


def wrappers() -> keras.Model:
    """A float series -> TimeDistributed(Dense) -> Bidirectional(GRU, concat) -> self-attention
    (MultiHeadAttention, 2 heads x key_dim 4, width 8) -> GlobalAveragePooling1D -> Dense: Keras 2's
    weight names for wrapped and attention layers (`bi/forward_gru/gru_cell/kernel:0`, `mha/query/kernel:0`)."""
    inputs = keras.Input(shape=(7, 5), name="series")
    x = keras.layers.TimeDistributed(keras.layers.Dense(6, activation="tanh"), name="td")(inputs)
    x = keras.layers.Bidirectional(keras.layers.GRU(4, return_sequences=True), name="bi")(x)
    x = keras.layers.MultiHeadAttention(2, 4, name="mha")(x, x)
    x = keras.layers.GlobalAveragePooling1D(name="mean")(x)
    outputs = keras.layers.Dense(3, name="out")(x)
    return overwrite_weights(keras.Model(inputs, outputs, name="wrappers_model"), WRAPPERS_WEIGHT_SEED)


def shared() -> keras.Model:
    """Two float series (9 and 7 steps) -> one Conv1D called on both (as MTSplice's `conv_exon`)
    -> GlobalMaxPooling1D each -> one nested Sequential encoder called on both -> Subtract ->
    Dense: Keras 2's config of shared layers (several `inbound_nodes`, tensors named by node index)."""
    exon, intron = keras.Input(shape=(9, 4), name="exon"), keras.Input(shape=(7, 4), name="intron")
    conv = keras.layers.Conv1D(6, 3, padding="same", activation="relu", name="conv_exon")
    encoder = keras.Sequential(
        [
            keras.layers.Dense(5, activation="tanh", input_shape=(6,), name="enc_hidden"),
            keras.layers.Dense(3, name="enc_out"),
        ],
        name="encoder",
    )
    pooled = [
        keras.layers.GlobalMaxPooling1D(name=f"pool_{side}")(conv(x))
        for side, x in (("exon", exon), ("intron", intron))
    ]
    difference = keras.layers.Subtract(name="difference")([encoder(pooled[0]), encoder(pooled[1])])
    outputs = keras.layers.Dense(2, activation="softmax", name="out")(difference)
    return overwrite_weights(keras.Model([exon, intron], outputs, name="siamese"), SHARED_WEIGHT_SEED)


def main() -> None:
    default_dir = Path(__file__).resolve().parent.parent / "tests/fixtures/keras2"
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else default_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    np.random.seed(FIXED_BATCH_SEED)  # Keras 2 initialisers draw from TensorFlow's seeded RNG
    keras.utils.set_random_seed(FIXED_BATCH_SEED)
    expected = {}
    for name, model in (("seed_mlp", seed_mlp()), ("functional_chain", functional_chain())):
        model.save(out_dir / f"{name}.h5")  # full model: config + weights
        model.save_weights(out_dir / f"{name}_weights.h5")  # weights only
        (out_dir / f"{name}_config.json").write_text(json.dumps(json.loads(model.to_json()), indent=1))
        expected[f"{name}_outputs"] = model.predict(fixed_batch(model), verbose=0)
    unsupported().save(out_dir / "unsupported_batchnorm.h5")
    branching().save(out_dir / "branching.h5")
    cnn_model = cnn()  # built last so the seeded initial weights of the models above do not change
    cnn_model.save(out_dir / "cnn.h5")  # full model: config + weights
    expected["cnn_outputs"] = cnn_model.predict(fixed_batch(cnn_model, CNN_BATCH_ROWS), verbose=0)
    # the recurrent models come after all the above, each with its own weight seed
    lstm_model = lstm()
    lstm_model.save(out_dir / "lstm.h5")
    expected["lstm_ids"] = token_batch()
    expected["lstm_outputs"] = lstm_model.predict(expected["lstm_ids"], verbose=0)
    gru_model = gru()
    gru_model.save(out_dir / "gru.h5")
    expected["gru_outputs"] = gru_model.predict(fixed_batch(gru_model, RNN_BATCH_ROWS), verbose=0)
    wrappers_model = wrappers()
    wrappers_model.save(out_dir / "wrappers.h5")
    expected["wrappers_outputs"] = wrappers_model.predict(fixed_batch(wrappers_model, RNN_BATCH_ROWS), verbose=0)
    shared_model = shared()
    shared_model.save(out_dir / "shared.h5")
    expected["shared_inputs_exon"] = np.random.default_rng(FIXED_BATCH_SEED).random(
        (RNN_BATCH_ROWS, 9, 4), dtype=np.float32
    )
    expected["shared_inputs_intron"] = np.random.default_rng(FIXED_BATCH_SEED + 1).random(
        (RNN_BATCH_ROWS, 7, 4), dtype=np.float32
    )
    expected["shared_outputs"] = shared_model.predict(
        [expected["shared_inputs_exon"], expected["shared_inputs_intron"]], verbose=0
    )
    np.savez(out_dir / "expected_outputs.npz", **expected)
    (out_dir / "VERSIONS.txt").write_text(f"tf_keras {keras.__version__}\n")
    for path in sorted(out_dir.iterdir()):
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")


def tf1_names_cnn() -> keras.Model:
    """Conv2D -> BatchNormalization -> Flatten -> Dense, with the layer names Keras 1/2 generated."""
    return keras.Sequential(
        [
            keras.layers.Conv2D(3, 3, strides=2, input_shape=(7, 6, 2), name="conv2d_1"),
            keras.layers.BatchNormalization(name="batch_normalization_1"),
            keras.layers.Flatten(name="flatten_1"),
            keras.layers.Dense(4, activation="softmax", name="dense_1"),
        ]
    )


def main_tf1_names(out_dir: Path) -> None:
    import tensorflow as tf

    tf.compat.v1.disable_eager_execution()  # graph mode: name scopes are made unique per graph
    out_dir.mkdir(parents=True, exist_ok=True)
    tf1_names_cnn()  # the first build takes the plain scopes
    model = overwrite_weights(tf1_names_cnn(), TF1_WEIGHT_SEED)
    normalization = model.get_layer("batch_normalization_1")  # a variance must be positive
    gamma, beta, mean, variance = normalization.get_weights()
    normalization.set_weights([gamma, beta, mean, np.abs(variance) + 0.5])
    if not model.weights[0].name.startswith("conv2d_1_1/"):
        sys.exit(f"error: expected TF1-era names, found {model.weights[0].name}")
    model.save(out_dir / "tf1_names.h5")
    inputs = np.random.default_rng(FIXED_BATCH_SEED).random((CNN_BATCH_ROWS, 7, 6, 2), dtype=np.float32)
    np.savez(out_dir / "tf1_names_expected.npz", inputs=inputs, outputs=model.predict(inputs, verbose=0))
    print(f"wrote {out_dir / 'tf1_names.h5'} and {out_dir / 'tf1_names_expected.npz'}")


def seeded_normal_weights(model: keras.Model, seed: int) -> keras.Model:
    """Every weight of every layer, nested ones included, from a seeded normal(0, 0.3); scales and
    variances uniform in [0.5, 1.5] so that a BatchNormalization divides by a positive variance."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        short = variable.name.split("/")[-1].split(":")[0]
        shape = tuple(variable.shape)
        if short in ("moving_variance", "gamma"):
            variable.assign(rng.uniform(0.5, 1.5, shape).astype(variable.dtype.as_numpy_dtype))
        else:
            variable.assign(rng.normal(0.0, 0.3, shape).astype(variable.dtype.as_numpy_dtype))
    return model


def saved_model_cnn() -> keras.Model:
    inputs = keras.Input(shape=(13, 10, 3), name="image")
    x = keras.layers.Conv2D(6, (3, 2), activation="relu", name="conv")(inputs)
    x = keras.layers.BatchNormalization(epsilon=1e-3, name="bn")(x)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = keras.layers.Dense(4, activation="softmax", name="fc")(x)
    return keras.Model(inputs, outputs, name="saved_cnn")


def saved_model_rnn() -> keras.Model:
    inputs = keras.Input(shape=(7, 5), name="series")
    x = keras.layers.LSTM(6, return_sequences=True, name="lstm")(inputs)
    x = keras.layers.GRU(4, return_sequences=True, name="gru")(x)
    x = keras.layers.Bidirectional(keras.layers.LSTM(3), name="bi")(x)
    outputs = keras.layers.Dense(2, name="out")(x)
    return keras.Model(inputs, outputs, name="saved_rnn")


def saved_model_nested() -> keras.Model:
    encoder = keras.Sequential(
        [keras.layers.Dense(7, activation="tanh", input_shape=(9,), name="enc_a"), keras.layers.Dense(5, name="enc_b")],
        name="encoder",
    )
    head_in = keras.Input(shape=(5,), name="head_in")
    head = keras.Model(
        head_in,
        keras.layers.Dense(3, name="head_dense")(keras.layers.BatchNormalization(name="head_bn")(head_in)),
        name="head",
    )
    inputs = keras.Input(shape=(9,), name="features")
    x = keras.layers.Dense(9, activation="relu", name="pre")(inputs)
    outputs = head(encoder(x))
    return keras.Model(inputs, outputs, name="saved_nested")


def main_saved_model(out_dir: Path) -> None:
    import shutil

    out_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(FIXED_BATCH_SEED)
    expected = {}
    for index, (name, build) in enumerate(
        (("cnn", saved_model_cnn), ("rnn", saved_model_rnn), ("nested", saved_model_nested))
    ):
        model = seeded_normal_weights(build(), SAVED_MODEL_WEIGHT_SEED + index)
        folder = out_dir / name
        if folder.exists():
            shutil.rmtree(folder)
        model.save(str(folder))  # no suffix: tf-keras writes a SavedModel folder
        model.save(out_dir / f"{name}.h5")  # the same model as a Keras 2 .h5: the tests compare the tensors
        (folder / "saved_model.pb").unlink()  # the traced graphs: never read by the exchange
        for empty in (folder / "assets",):
            if empty.is_dir() and not any(empty.iterdir()):
                empty.rmdir()
        inputs = fixed_batch(model, RNN_BATCH_ROWS)
        expected[f"{name}_inputs"] = inputs
        expected[f"{name}_outputs"] = model.predict(inputs, verbose=0)
    np.savez(out_dir / "saved_model_expected.npz", **expected)
    for path in sorted(out_dir.rglob("*")):
        if path.is_file():
            print(f"wrote {path} ({path.stat().st_size:,} bytes)")


TFOP_WEIGHT_SEED = 29


def tfop_unet() -> keras.Model:
    """A small U-Net whose glue is TensorFlow ops on Keras tensors, as keras-unet-collection's."""
    import tensorflow as tf

    image = keras.Input(shape=(12, 10, 3), name="image")
    skip = keras.layers.Conv2D(4, 3, padding="same", name="conv_in")(image)
    skip = tf.nn.relu(skip)
    skip = tf.math.multiply(skip, 0.5) + 0.1
    down = keras.layers.MaxPooling2D(2, name="pool")(skip)
    down = keras.layers.Conv2D(6, 3, padding="same", name="conv_down")(down)
    down = tf.math.sigmoid(down) * tf.math.tanh(down)
    up = keras.layers.UpSampling2D(2, name="up")(down)
    merged = tf.concat([up, skip], axis=-1)
    merged = keras.layers.Conv2D(5, 1, name="conv_merge")(merged)
    merged = tf.maximum(merged, -0.2) - tf.minimum(merged, 0.3) / 3
    merged = 2.0 - tf.pow(merged, 2) + tf.math.sqrt(tf.abs(merged) + 1.0)
    merged = tf.math.log(tf.square(merged) + 1.0) + tf.math.exp(-merged)
    pixels = tf.reshape(merged, [-1, 120, 5])  # (batch, 120, 5)
    pixels = tf.transpose(pixels, perm=[0, 2, 1])  # (batch, 5, 120)
    pixels = tf.squeeze(tf.expand_dims(pixels, 2), axis=[2])
    pixels = keras.layers.Dense(7, name="dense")(pixels)  # (batch, 5, 7)
    scores = tf.nn.softmax(pixels, axis=1)
    small = tf.image.resize(tf.nn.silu(merged), [5, 7])
    small = tf.math.add_n([tf.clip_by_value(small, -0.5, 1.5), small, tf.math.rsqrt(small * small + 1.0)])
    return overwrite_weights(keras.Model(image, [scores, merged, small], name="tfop_unet"), TFOP_WEIGHT_SEED)


def tfop_reduce() -> keras.Model:
    """Reductions and slicing of a (batch, 7, 5, 4) tensor."""
    import tensorflow as tf

    volume = keras.Input(shape=(7, 5, 4), name="volume")
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(volume)
    mean = tf.math.reduce_mean(x, axis=[1, 2], keepdims=True)
    centred = x - mean
    pooled = (
        tf.reduce_sum(centred, -1)
        + tf.reduce_max(x, axis=-1, keepdims=True)[..., 0]
        - tf.math.reduce_min(x, axis=2)[:, :, 1:2] * tf.math.reduce_prod(x[..., 1:3] + 1.0, axis=-1)
    )
    sliced = centred[:, 1:6:2, :, 0]
    last = x[:, -1]
    added = tf.expand_dims(x[:, tf.newaxis, 2, ..., 3], -1)
    flat = keras.layers.Flatten(name="flatten")(pooled)
    out = keras.layers.Dense(3, name="dense")(flat)
    return overwrite_weights(keras.Model(volume, [out, sliced, last, added], name="tfop_reduce"), TFOP_WEIGHT_SEED + 1)


def tfop_every_op() -> keras.Model:
    """Each TensorFlow op the exchange reads at least once, on two images (batch, 4, 6, 3) and a
    vector (batch, 5), one output per op (and array constants): 42 outputs."""
    import tensorflow as tf

    x, y, v = keras.Input((4, 6, 3), name="x"), keras.Input((4, 6, 3), name="y"), keras.Input((5,), name="v")
    outputs = [
        tf.math.add(x, y),
        tf.math.divide(x, y + 2.0),
        tf.math.reciprocal(x + 1.5),
        tf.math.floor(x * 3),
        tf.math.ceil(x * 3),
        tf.math.sin(x),
        tf.math.cos(x),
        tf.nn.relu6(x * 10 - 2),
        tf.math.softplus(x),
        tf.nn.softsign(x),
        tf.nn.relu(x - 0.5),
        tf.math.rsqrt(x + 0.1),
        tf.minimum(x, y),
        tf.maximum(y, x),
        tf.math.reduce_prod(x, axis=[1, 3]),
        tf.squeeze(x[:, :1, :, :1], axis=[1, 3]),
        tf.concat([x, y, x], 1),
        tf.math.pow(2.0, x),
        3.0 / (x + 1.0),
        x[:, ::2, 1:-1],
        x[:, 2],
        tf.expand_dims(v, 1),
        tf.reduce_mean(v, axis=-1),
        tf.nn.softmax(x),
        tf.nn.softmax(v),
        tf.transpose(x, [0, 3, 1, 2]),
        tf.reshape(v, [-1, 5, 1]),
        tf.nn.sigmoid(v) - v,
        tf.math.negative(x),
        tf.math.abs(x - 0.5),
        tf.math.reduce_max(x, axis=(1, 2)),
        tf.clip_by_value(x, 0.2, 0.7),
        tf.image.resize(x, (9, 5), method="nearest"),
        tf.math.add_n([x, y]),
        tf.nn.silu(x),
        x * y,
        tf.square(v),
        tf.exp(v),
        tf.math.log(v + 1.0),
        x * np.array([1.0, -2.0, 0.5], "float32"),
        tf.math.subtract(np.arange(6, dtype="float32").reshape(6, 1), x),
        tf.maximum(v, [0.1, 0.2, 0.3, 0.4, 0.5]),
    ]
    return keras.Model([x, y, v], outputs, name="tfop_every_op")


def tfop_unsupported() -> keras.Model:
    import tensorflow as tf

    series = keras.Input(shape=(6, 3), name="series")
    hidden = keras.layers.Dense(4, name="dense")(series)
    return keras.Model(series, tf.math.cumsum(hidden, axis=1) * 2.0, name="tfop_unsupported")


def main_tfop(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(FIXED_BATCH_SEED)
    expected = {}
    for name, model in (("tfop_unet", tfop_unet()), ("tfop_reduce", tfop_reduce()), ("tfop_every_op", tfop_every_op())):
        model.save(out_dir / f"{name}.h5")
        inputs = [
            np.random.default_rng(FIXED_BATCH_SEED + index).random((8, *tensor.shape[1:]), dtype=np.float32)
            for index, tensor in enumerate(model.inputs)
        ]
        for index, values in enumerate(inputs):
            expected[f"{name}_inputs_{index}"] = values
        for index, output in enumerate(model.predict(inputs, verbose=0)):
            expected[f"{name}_outputs_{index}"] = output
    tfop_unsupported().save(out_dir / "tfop_unsupported.h5")
    np.savez(out_dir / "tfop_expected.npz", **expected)
    for name in ("tfop_unet.h5", "tfop_reduce.h5", "tfop_every_op.h5", "tfop_unsupported.h5", "tfop_expected.npz"):
        print(f"wrote {out_dir / name} ({(out_dir / name).stat().st_size:,} bytes)")


TRAINING_WEIGHT_SEED = 31
TRAINING_VOCABULARY, TRAINING_STEPS, TRAINING_BATCH = 10, 20, 8


def training_batches(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` batches of 8 rows of 5 token ids (Zipf-like: some looked up often, some not at all)."""
    rng = np.random.default_rng(seed)
    frequencies = 1.0 / np.arange(1, TRAINING_VOCABULARY + 1)
    ids = rng.choice(TRAINING_VOCABULARY, size=(count * TRAINING_BATCH, 5), p=frequencies / frequencies.sum())
    labels = np.eye(3, dtype=np.float32)[rng.integers(0, 3, count * TRAINING_BATCH)]
    return ids.astype(np.int32), labels


def main_training(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(TRAINING_WEIGHT_SEED)
    inputs = keras.Input((5,), dtype="int32")
    x = keras.layers.Embedding(TRAINING_VOCABULARY, 3, name="tokens")(inputs)
    x = keras.layers.Flatten(name="flat")(x)
    x = keras.layers.Dense(4, activation="tanh", kernel_regularizer=keras.regularizers.L2(0.01), name="hidden")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="logits")(x), name="text")
    model.compile(
        optimizer=keras.optimizers.Adam(0.01, beta_1=0.8, epsilon=1e-4),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
    )
    x, y = training_batches(3, TRAINING_WEIGHT_SEED)
    model.fit(x, y, batch_size=TRAINING_BATCH, shuffle=False, epochs=1, verbose=0)
    model.save(out_dir / "training_adam.h5")
    x, y = training_batches(TRAINING_STEPS, TRAINING_WEIGHT_SEED + 1)
    model.fit(x, y, batch_size=TRAINING_BATCH, shuffle=False, epochs=1, verbose=0)
    expected = {"x": x, "y": y}
    expected.update({f"weight/{weight.name}": weight.numpy() for weight in model.weights})
    expected.update({f"optimizer/{variable.name}": variable.numpy() for variable in model.optimizer.variables})
    np.savez(out_dir / "training_expected.npz", **expected)
    for name in ("training_adam.h5", "training_expected.npz"):
        print(f"wrote {out_dir / name} ({(out_dir / name).stat().st_size:,} bytes)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--training"]:
        main_training(
            Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).resolve().parent.parent / "tests/fixtures/keras2"
        )
    elif sys.argv[1:2] == ["--tfop"]:
        main_tfop(
            Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).resolve().parent.parent / "tests/fixtures/keras2"
        )
    elif sys.argv[1:2] == ["--tf1-names"]:
        main_tf1_names(
            Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).resolve().parent.parent / "tests/fixtures/keras2"
        )
    elif sys.argv[1:2] == ["--saved-model"]:
        main_saved_model(
            Path(sys.argv[2])
            if len(sys.argv) > 2
            else Path(__file__).resolve().parent.parent / "tests/fixtures/keras2/saved_model"
        )
    else:
        main()
