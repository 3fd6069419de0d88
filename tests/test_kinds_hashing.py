"""Keras's integer hashing and lookups (Hashing, HashedCrossing, IntegerLookup's encoded outputs
and FarmHash/SipHash OOV indices): the torch hashes bit for bit TensorFlow's, and each layer in
both directions and through generated code. Inputs span the whole int64 range (every decimal
length, both signs), not only small ids.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch
from generated_code import check_generated_code
from kerasmodels import check_both_directions, max_difference

from exchange import keras_adapter
from exchange import torch_modules as helpers
from exchange.errors import UnsupportedLayerError

L = keras.layers
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def wide_integers(count: int, seed: int = 0) -> np.ndarray:
    """0, ±1, int64's extremes, 1- to 19-digit numbers of both signs, and random int64s."""
    generator = np.random.default_rng(seed)
    values = [0, 1, -1, 9, 10, -10, INT64_MIN, INT64_MIN + 1, INT64_MAX, INT64_MAX - 1, 1 << 31, -(1 << 31)]
    for digits in range(1, 20):
        low, high = 10 ** (digits - 1), min(10**digits - 1, INT64_MAX)
        values += [low, high, -low, -high]
        values += list(generator.integers(low, high, 8)) + list(-generator.integers(low, high, 8))
    values += list(generator.integers(INT64_MIN, INT64_MAX, max(count - len(values), 0), dtype=np.int64))
    return np.array(values, dtype=np.int64)


BINS = (1, 2, 3, 7, 1000003, (1 << 31) - 1, (1 << 62) - 1)


@pytest.mark.parametrize("salt", [None, (133, 137)])
def test_hashes_are_tensorflows_bit_for_bit(salt):
    values = wide_integers(3000)
    strings = tf.strings.as_string(values)
    text, length = helpers.decimal_bytes(torch.from_numpy(values))
    assert ["".join(map(chr, row[:size])) for row, size in zip(text.tolist(), length.tolist())] == [
        item.decode() for item in strings.numpy()
    ]
    for bins in BINS:
        if salt is None:
            expected = tf.strings.to_hash_bucket_fast(strings, bins).numpy()
        else:
            expected = tf.strings.to_hash_bucket_strong(strings, bins, key=list(salt)).numpy()
        np.testing.assert_array_equal(
            helpers.hash_integers(torch.from_numpy(values), bins, salt).numpy(), expected, err_msg=f"num_bins={bins}"
        )


@pytest.mark.slow
@pytest.mark.parametrize("salt", [(0, 0), (1, 1 << 40), (-5, (1 << 62) - 1)])
def test_sip_hash_keys_are_tensorflows(salt):
    values = wide_integers(2000, seed=1)
    strings = tf.strings.as_string(values)
    for bins in BINS:
        expected = tf.strings.to_hash_bucket_strong(strings, bins, key=list(salt)).numpy()
        np.testing.assert_array_equal(helpers.hash_integers(torch.from_numpy(values), bins, salt).numpy(), expected)


def test_feature_crosses_are_tensorflows():
    generator = np.random.default_rng(2)
    first, second = wide_integers(2000, seed=3), generator.permutation(wide_integers(2000, seed=4))
    third = generator.integers(-50, 50, first.shape[0])
    for bins in BINS:
        for features in ((first, second), (first, second, third)):
            expected = keras.layers.HashedCrossing(bins)(features)
            crossed = helpers.KerasHashedCrossing(bins)(*(torch.from_numpy(feature) for feature in features))
            np.testing.assert_array_equal(crossed.numpy(), np.asarray(expected), err_msg=f"num_bins={bins}")


def test_float_casts_are_tensorflows():
    values = np.array([np.nan, np.inf, -np.inf, 1e19, -1e19, 9.3e18, 2.5, -2.5, -0.7, 3e38, 12345.9], np.float32)
    for dtype in (np.float32, np.float64):
        np.testing.assert_array_equal(
            helpers.tensorflow_int64(torch.from_numpy(values.astype(dtype))).numpy(),
            tf.cast(values.astype(dtype), tf.int64).numpy(),
        )


def single(shape, layer, dtype):
    return keras.Sequential([keras.Input(shape, dtype=dtype), layer])


def crossing(layer, shape=(), count=2, dtype="int64"):
    features = [keras.Input(shape, dtype=dtype) for _ in range(count)]
    return keras.Model(features, layer(features))


# name -> (model, input kind): "wide" int64s, "small" ids in [-3, 9), "float" values in ±1e6.
CASES = {
    "hashing_int": (lambda: single((6,), L.Hashing(7), "int64"), "wide"),
    "hashing_int32_output": (lambda: single((5, 3), L.Hashing(1000, dtype="int32"), "int64"), "wide"),
    "hashing_two_bins_mask": (lambda: single((6,), L.Hashing(2, mask_value=0), "int64"), "small"),
    "hashing_mask_salt": (lambda: single((6,), L.Hashing(9, mask_value=3, salt=[5, 11]), "int32"), "small"),
    "hashing_single_salt": (lambda: single((4, 2), L.Hashing(50, salt=133), "int64"), "wide"),
    "hashing_floats_mask": (lambda: single((5, 3), L.Hashing(13, mask_value=0), "float32"), "float"),
    "hashing_one_hot": (lambda: single((4,), L.Hashing(5, output_mode="one_hot"), "int64"), "wide"),
    "hashing_one_hot_steps_of_one": (lambda: single((4, 1), L.Hashing(5, output_mode="one_hot"), "float32"), "float"),
    "hashing_one_hot_single": (
        lambda: single((1,), L.Hashing(6, output_mode="one_hot", mask_value=2), "int32"),
        "small",
    ),
    "hashing_multi_hot": (
        lambda: single((6,), L.Hashing(5, output_mode="multi_hot", dtype="float64"), "int32"),
        "small",
    ),
    "hashing_count_salt": (lambda: single((7,), L.Hashing(4, output_mode="count", salt=3), "int64"), "wide"),
    "crossing_int": (lambda: crossing(L.HashedCrossing(5)), "wide"),
    "crossing_int32": (lambda: crossing(L.HashedCrossing(1 << 40, dtype="int32"), (1,), 2, "int32"), "small"),
    "crossing_one_hot": (lambda: crossing(L.HashedCrossing(4, output_mode="one_hot"), (1,)), "wide"),
    "crossing_one_hot_float64": (
        lambda: crossing(L.HashedCrossing(3, output_mode="one_hot", dtype="float64")),
        "small",
    ),
    "lookup_one_hot": (
        lambda: single((4,), L.IntegerLookup(vocabulary=[1, 2, 3], output_mode="one_hot"), "int64"),
        "small",
    ),
    "lookup_one_hot_rank3": (
        lambda: single((2, 3), L.IntegerLookup(vocabulary=[4, 1, 2], output_mode="one_hot"), "int32"),
        "small",
    ),
    "lookup_multi_hot_mask": (
        lambda: single((6,), L.IntegerLookup(vocabulary=[1, 2, 3], mask_token=0, output_mode="multi_hot"), "int32"),
        "small",
    ),
    "lookup_count_padded_farmhash": (
        lambda: single(
            (6,),
            L.IntegerLookup(
                vocabulary=[1, 2, 3],
                num_oov_indices=2,
                oov_method="farmhash",
                output_mode="count",
                max_tokens=9,
                pad_to_max_tokens=True,
            ),
            "int32",
        ),
        "small",
    ),
    "lookup_tf_idf": (
        lambda: single(
            (6,), L.IntegerLookup(vocabulary=[1, 2, 3], idf_weights=[0.3, 1.7, 2.1], output_mode="tf_idf"), "int32"
        ),
        "small",
    ),
    "lookup_tf_idf_padded": (
        lambda: single(
            (6,),
            L.IntegerLookup(
                vocabulary=[5, 2, 3],
                idf_weights=[0.3, 1.7, 2.1],
                output_mode="tf_idf",
                max_tokens=8,
                pad_to_max_tokens=True,
                num_oov_indices=2,
            ),
            "int32",
        ),
        "small",
    ),
    "lookup_farmhash": (
        lambda: single(
            (6,), L.IntegerLookup(vocabulary=[12, 36, 1138, 42], num_oov_indices=5, oov_method="farmhash"), "int64"
        ),
        "wide",
    ),
    "lookup_siphash_mask": (
        lambda: single(
            (6,),
            L.IntegerLookup(
                vocabulary=[12, 36, 1138, 42], mask_token=0, num_oov_indices=3, oov_method="farmhash", salt=[137, 42]
            ),
            "int64",
        ),
        "wide",
    ),
    "lookup_special_tokens_listed": (lambda: single((6,), L.IntegerLookup(vocabulary=[-1, 4, 5]), "int64"), "small"),
}
# The default run: one case of each layer and mode family; `-m slow` runs all.
DEFAULT = (
    "hashing_mask_salt",
    "hashing_floats_mask",
    "hashing_one_hot",
    "crossing_one_hot",
    "lookup_tf_idf_padded",
    "lookup_siphash_mask",
)


def inputs_for(model, style: str, rows: int = 9, seed: int = 5) -> list[np.ndarray]:
    generator = np.random.default_rng(seed)
    arrays = []
    for spec in model.inputs:
        shape = (rows,) + tuple(spec.shape[1:])
        if style == "wide":
            values = generator.choice(wide_integers(400, seed), size=shape)
        elif style == "small":
            values = generator.integers(-3, 9, shape)
        else:
            values = np.round(generator.uniform(-1e6, 1e6, shape), 1)
            values.flat[::4] = 0.0  # the mask value
            values.flat[1::5] = np.trunc(values.flat[1::5])
        arrays.append(values.astype(spec.dtype))
    return arrays


def check_hashing_both_directions(model, inputs):
    """Exact in both directions; these layers hold no weights, so the torch -> Keras model computes
    the same as the one given."""
    checked = check_both_directions(model, inputs, tolerance=0, must_vary=0)
    assert checked.torch_state == {}
    assert json.dumps(checked.rebuilt.get_config()) and keras_adapter.get_tensors(checked.rebuilt) == {}
    return checked.graph


@pytest.mark.parametrize(
    "case", [pytest.param(case, marks=() if case in DEFAULT else pytest.mark.slow) for case in sorted(CASES)]
)
def test_kind_both_directions(case):
    build, style = CASES[case]
    model = build()
    check_hashing_both_directions(model, inputs_for(model, style))


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(case, marks=() if case == "lookup_siphash_mask" else pytest.mark.slow)
        for case in sorted(CASES)
        if not case.startswith("crossing")
    ],
)  # one input
def test_kind_generated_code(case, tmp_path):
    build, style = CASES[case]
    model = build()
    check_generated_code(model, inputs_for(model, style), tmp_path)


def parse(model, changes=None):
    """The model's config parsed, its last layer's options changed (as a hand-written file may)."""
    from exchange.keras_config import parse_model_config

    config = json.loads(json.dumps({"class_name": type(model).__name__, "config": model.get_config()}))
    config["config"]["layers"][-1]["config"].update(changes or {})
    return parse_model_config(config, "hand-written")


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda: single((3,), L.Hashing(4, name="bad"), "string"),
            r"input '.*': unsupported dtype 'string' \(torch has no string tensors\)",
        ),
        (
            lambda: (single((3,), L.Hashing(4, name="bad"), "int64"), {"mask_value": ""}),
            r"'bad' \(Hashing\): unsupported option mask_value='' \(only integer mask values",
        ),
        (
            lambda: (single((3,), L.Hashing(4, name="bad"), "int64"), {"dtype": "float32"}),
            r"'bad' \(Hashing\): unsupported option dtype='float32' \(output_mode 'int' needs an integer dtype",
        ),
        (
            lambda: single((3, 2), L.Hashing(4, output_mode="multi_hot", name="bad"), "int64"),
            r"layer 'bad' \(hashing\): Hashing output_mode 'multi_hot' takes values of shape \(batch, steps\); found "
            r"\(batch, \(3, 2\)\) \(Keras's output",
        ),
        (
            lambda: single((3, 2), L.IntegerLookup(vocabulary=[1], output_mode="count", name="bad"), "int64"),
            r"IntegerLookup output_mode 'count' takes values of shape \(batch, steps\)",
        ),
        (
            lambda: single(
                (3,),
                L.IntegerLookup(vocabulary=[-1, 4], idf_weights=[1.0, 2.0], output_mode="tf_idf", name="bad"),
                "int64",
            ),
            r"'bad' \(IntegerLookup\): unsupported option vocabulary=\[-1\] \(a tf_idf vocabulary that lists its special",
        ),
    ],
)
def test_refusals_are_one_line(build, message):
    built = build()
    with pytest.raises(UnsupportedLayerError, match=message) as caught:
        parse(*built) if isinstance(built, tuple) else parse(built)
    assert "\n" not in str(caught.value)


def test_string_hashing_stays_refused_with_its_reason():
    text = keras.Input((1,), dtype="string", name="text")
    model = keras.Model(text, L.Hashing(5, name="bad")(text))
    with pytest.raises(UnsupportedLayerError) as caught:
        parse(model)
    assert "input 'text': unsupported dtype 'string' (torch has no string tensors)" in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["crossing_int", "crossing_one_hot_float64"])
def test_crossing_generated_code(case, tmp_path):
    """Two inputs: the generated module run as the layer suite runs it."""
    from layer_suite import run_generated_code

    from exchange import cli

    build, style = CASES[case]
    model = build()
    inputs = inputs_for(model, style)
    model.save(tmp_path / "model.keras")
    graph = cli.convert(tmp_path / "model.keras", tmp_path / "model.py")
    assert (
        max_difference(keras_adapter.predict(model, inputs), run_generated_code(tmp_path / "model.py", graph, inputs))
        == 0
    )


def test_tf_idf_weights_in_a_file_must_be_the_configs(tmp_path):
    """Keras saves a tf_idf lookup's padded idf weights beside its config, and loads them: a file
    whose stored weights differ from the config's is refused; as saved, it converts."""
    import zipfile

    import h5py

    from exchange import cli
    from exchange.errors import ExchangeFileError

    model = CASES["lookup_tf_idf_padded"][0]()
    model.save(tmp_path / "model.keras")
    cli.convert(tmp_path / "model.keras", tmp_path / "model.pt")
    with zipfile.ZipFile(tmp_path / "model.keras") as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    (tmp_path / "model.weights.h5").write_bytes(members["model.weights.h5"])
    with h5py.File(tmp_path / "model.weights.h5", "r+") as h5:
        h5["layers/integer_lookup/vars/idf_weights"][0] += 1.0
    members["model.weights.h5"] = (tmp_path / "model.weights.h5").read_bytes()
    with zipfile.ZipFile(tmp_path / "edited.keras", "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with pytest.raises(ExchangeFileError, match="vars/idf_weights differs from the values the layer's config gives"):
        cli.convert(tmp_path / "edited.keras", tmp_path / "edited.pt")
