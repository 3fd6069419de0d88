#!/usr/bin/env python3
"""Write the Keras 2 fixture files in tests/fixtures/keras2/ with the real Keras 2 package.

Needs tf-keras (Keras 2) beside TensorFlow, selected with TF_USE_LEGACY_KERAS=1:

    pip install tf-keras==2.21.0
    TF_USE_LEGACY_KERAS=1 python scripts/make_keras2_fixtures.py [OUT_DIR]

For each model it writes the file(s) and, in expected_outputs.npz, what Keras 2 itself computes on
a fixed batch (`np.random.default_rng(0).random((rows, *model.input_shape[1:]), dtype=np.float32)`,
64 rows for the dense models, 16 for the CNN), so the tests compare against real Keras 2 without having
it installed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
    sys.exit("error: run with TF_USE_LEGACY_KERAS=1 (and tf-keras installed) so that Keras 2 writes the files")

import numpy as np  # noqa: E402
import tf_keras as keras  # noqa: E402

FIXED_BATCH_SEED = 0
FIXED_BATCH_ROWS = 64
CNN_BATCH_ROWS = 16
CNN_WEIGHT_SEED = 7


def fixed_batch(model: keras.Model, rows: int = FIXED_BATCH_ROWS) -> np.ndarray:
    return np.random.default_rng(FIXED_BATCH_SEED).random((rows, *model.input_shape[1:]), dtype=np.float32)


def seed_mlp() -> keras.Model:
    """The seed's MLP as the notebook wrote it in Keras 2, with a Dropout passing through."""
    return keras.Sequential([
        keras.layers.Dense(50, activation="tanh", input_shape=(784,), name="dense_1"),
        keras.layers.Dropout(0.2, name="dropout_1"),
        keras.layers.Dense(50, activation="tanh", name="dense_2"),
        keras.layers.Dense(10, activation="softmax", name="dense_3"),
    ])


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
    return keras.Sequential([keras.layers.Dense(8, input_shape=(20,), name="dense"),
                             keras.layers.BatchNormalization(name="batch_norm"),
                             keras.layers.Dense(4, name="out")])


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


def main() -> None:
    default_dir = Path(__file__).resolve().parent.parent / "tests/fixtures/keras2"
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else default_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    np.random.seed(FIXED_BATCH_SEED)  # Keras 2 initialisers draw from TensorFlow's seeded RNG
    keras.utils.set_random_seed(FIXED_BATCH_SEED)
    expected = {}
    for name, model in (("seed_mlp", seed_mlp()), ("functional_chain", functional_chain())):
        model.save(out_dir / f"{name}.h5")                    # full model: config + weights
        model.save_weights(out_dir / f"{name}_weights.h5")     # weights only
        (out_dir / f"{name}_config.json").write_text(json.dumps(json.loads(model.to_json()), indent=1))
        expected[f"{name}_outputs"] = model.predict(fixed_batch(model), verbose=0)
    unsupported().save(out_dir / "unsupported_batchnorm.h5")
    branching().save(out_dir / "branching.h5")
    cnn_model = cnn()  # built last so the seeded initial weights of the models above do not change
    cnn_model.save(out_dir / "cnn.h5")                         # full model: config + weights
    expected["cnn_outputs"] = cnn_model.predict(fixed_batch(cnn_model, CNN_BATCH_ROWS), verbose=0)
    np.savez(out_dir / "expected_outputs.npz", **expected)
    (out_dir / "VERSIONS.txt").write_text(f"tf_keras {keras.__version__}\n")
    for path in sorted(out_dir.iterdir()):
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
