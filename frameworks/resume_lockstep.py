"""Continuing a Keras run in PyTorch, in lockstep: a model trained in Keras, saved mid-run as
`.keras`, converted with its training state, then trained on in both frameworks on the same batches.

Two models carry the conventions that differ between the frameworks' training:
- "cnn": Conv2D with an L2 kernel regularizer, BatchNormalization (trained: its moving statistics
  move), Dense logits; Adam with Keras's epsilon under an ExponentialDecay schedule; Keras's
  cross-entropy from logits.
- "lstm": a text model: token ids (0 pads the end, masked) -> Embedding -> LSTM (Keras's one
  bias is torch's two) -> Dense logits; centered RMSprop with momentum under a
  PiecewiseConstantDecay schedule. The tokens follow Zipf's law over a small vocabulary: every
  batch looks up some tokens many times (Keras's RMSprop squares each lookup's gradient row,
  `exchange.optimizers.per_lookup`) and misses others (their slots decay all the same).
Neither has Dropout: its randomness cannot be shared between frameworks.

`run(variant=...)` replaces one ported convention by torch's own ("torch_adam", "torch_batch_norm",
"no_regularizer" for the CNN; "torch_rmsprop", "summed_lookups" (the Embedding's dense gradient,
a token's lookups summed before Keras's RMSprop squares them) for the LSTM) to show that each is
needed.
`python -m frameworks.resume_lockstep` prints the figures.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from exchange import fileformat, keras_adapter, keras_files, optimizers, torch_adapter, training_state

INPUT_SHAPES = {"cnn": (7, 6, 3), "lstm": (9,)}  # Keras layout: (height, width, channels), (steps,) token ids
VOCABULARY = 24  # token 0 pads
CLASSES = 5
BATCH = 8
LEARNING_RATE = {"initial_learning_rate": 0.01, "decay_steps": 20, "decay_rate": 0.5, "staircase": False}
BETAS = (0.9, 0.999)
EPSILON = 1e-3  # Keras's epsilon, added to sqrt(v): torch adds its own after the bias correction
L2 = 0.01
# The variants each model runs: its ported conventions, then torch's own in place of one of them.
VARIANTS = {
    "cnn": ("ported", "torch_adam", "torch_batch_norm", "no_regularizer"),
    "lstm": ("ported", "torch_rmsprop", "summed_lookups"),
}
RMSPROP = {
    "learning_rate": {"boundaries": [20, 100], "values": [0.01, 0.005, 0.002]},
    "rho": 0.9,
    "momentum": 0.5,
    "epsilon": 1e-7,
    "centered": True,
}


def batches(count: int, seed: int, model_kind: str = "cnn") -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        (
            INPUT_BATCHES[model_kind](rng),
            np.eye(CLASSES, dtype=np.float32)[rng.integers(0, CLASSES, BATCH)],
        )
        for _ in range(count)
    ]


def image_batch(rng: np.random.Generator) -> np.ndarray:
    """The CNN's inputs: normal values, (batch, height, width, channels)."""
    return rng.normal(size=(BATCH, *INPUT_SHAPES["cnn"])).astype(np.float32)


def token_batch(rng: np.random.Generator) -> np.ndarray:
    """The text LSTM's inputs: token ids 1.. with Zipf's frequencies, then 0 (padding) after each
    sequence's length."""
    (steps,) = INPUT_SHAPES["lstm"]
    frequencies = 1.0 / np.arange(1, VOCABULARY)
    tokens = rng.choice(np.arange(1, VOCABULARY), size=(BATCH, steps), p=frequencies / frequencies.sum())
    lengths = rng.integers(3, steps + 1, size=(BATCH, 1))
    return np.where(np.arange(steps) < lengths, tokens, 0).astype(np.int32)


INPUT_BATCHES = {"cnn": image_batch, "lstm": token_batch}


def keras_cnn(seed: int = 0):
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input(INPUT_SHAPES["cnn"])
    x = keras.layers.Conv2D(
        4, 3, strides=2, activation="relu", kernel_regularizer=keras.regularizers.L2(L2), name="conv"
    )(inputs)
    x = keras.layers.BatchNormalization(name="norm")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = keras.layers.Dense(CLASSES, name="logits")(x)
    model = keras.Model(inputs, outputs, name="cnn")
    schedule = keras.optimizers.schedules.ExponentialDecay(**LEARNING_RATE)
    model.compile(
        optimizer=keras.optimizers.Adam(schedule, beta_1=BETAS[0], beta_2=BETAS[1], epsilon=EPSILON),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
    )
    return model


def keras_lstm(seed: int = 0):
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input(INPUT_SHAPES["lstm"], dtype="int32")
    x = keras.layers.Embedding(VOCABULARY, 4, mask_zero=True, name="embedding")(inputs)
    x = keras.layers.LSTM(6, name="lstm")(x)
    outputs = keras.layers.Dense(CLASSES, name="logits")(x)
    model = keras.Model(inputs, outputs, name="rnn")
    options = dict(RMSPROP)
    options["learning_rate"] = keras.optimizers.schedules.PiecewiseConstantDecay(**options["learning_rate"])
    model.compile(
        optimizer=keras.optimizers.RMSprop(**options), loss=keras.losses.CategoricalCrossentropy(from_logits=True)
    )
    return model


MODELS = {"cnn": keras_cnn, "lstm": keras_lstm}


def keras_state(model, folder: Path):
    """(graph, tensors, training state) of a live Keras model, through a saved `.keras` file."""
    path = folder / "state.keras"
    keras_adapter.save_keras_file(model, path)
    with keras_files.open_keras_file(path) as weights:
        graph, tensors = weights.architecture, fileformat.materialize(weights.tensors)
    return graph, tensors, training_state.read_keras_training(path, graph, training_state.parameter_keys_of(graph))


def _naive_adam(module, state):
    """torch's own Adam given Keras's hyperparameters and state (exp_avg = m, exp_avg_sq = v)."""
    parameters = dict(module.named_parameters())
    adam = torch.optim.Adam([parameters[key] for key in state.slots], lr=0.01, betas=BETAS, eps=EPSILON)
    for key, slots in state.slots.items():
        adam.state[parameters[key]] = {
            "step": torch.tensor(float(state.iteration)),
            "exp_avg": torch.from_numpy(slots["momentum"].copy()),
            "exp_avg_sq": torch.from_numpy(slots["velocity"].copy()),
        }
    schedule = optimizers.make_schedule(state.optimizer.options["learning_rate"])
    return adam, schedule


def _naive_rmsprop(module, state):
    """torch's own RMSprop given Keras's hyperparameters and state (square_avg = velocity,
    grad_avg = average_gradient, momentum_buffer = Keras's buffer without the learning rate)."""
    parameters = dict(module.named_parameters())
    options = state.optimizer.options
    schedule = optimizers.make_schedule(options["learning_rate"])
    rate = float(schedule(state.iteration))
    rmsprop = torch.optim.RMSprop(
        [parameters[key] for key in state.slots],
        lr=rate,
        alpha=options["rho"],
        eps=options["epsilon"],
        momentum=options["momentum"],
        centered=options["centered"],
    )
    for key, slots in state.slots.items():
        rmsprop.state[parameters[key]] = {
            "step": torch.tensor(float(state.iteration)),
            "square_avg": torch.from_numpy(slots["velocity"].copy()),
            "grad_avg": torch.from_numpy(slots["average_gradient"].copy()),
            "momentum_buffer": torch.from_numpy(slots["momentum"] / rate),
        }
    return rmsprop, schedule


def run(
    keras_steps: int = 5,
    torch_steps: int = 200,
    variant: str = "ported",
    seed: int = 0,
    every: int = 0,
    model_kind: str = "cnn",
    back_to_keras_at: int | None = None,
) -> dict:
    """Train `keras_steps` in Keras, convert, then `torch_steps` more in both. Returns the largest
    weight difference at the end (and every `every` steps when given) and, for the ported
    variant, the largest optimizer slot difference at the end.

    `back_to_keras_at` (a multiple of `every`): at that step the Keras side is replaced by a Keras
    model resumed from the torch run's state (weights and optimizer, written as `.keras` and
    loaded by Keras), so the steps after it check the torch -> Keras direction."""
    if variant not in VARIANTS.get(model_kind, ()):
        raise ValueError(f"model {model_kind!r} runs the variants {VARIANTS.get(model_kind)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small gains nothing from threads that wait on TensorFlow's
    try:
        return _run(keras_steps, torch_steps, variant, seed, every, model_kind, back_to_keras_at)
    finally:
        torch.set_num_threads(threads)


def _run(
    keras_steps: int,
    torch_steps: int,
    variant: str,
    seed: int,
    every: int,
    model_kind: str,
    back_to_keras_at: int | None,
) -> dict:
    model = MODELS[model_kind](seed)
    for x, y in batches(keras_steps, seed, model_kind):
        model.train_on_batch(x, y)
    with tempfile.TemporaryDirectory() as folder:
        graph, tensors, state = keras_state(model, Path(folder))
        module = torch_adapter.model_from_tensors(graph, tensors)
        if variant != "torch_batch_norm":
            optimizers.use_keras_batch_norm(module)
        if variant == "torch_adam":
            optimizer, schedule = _naive_adam(module, state)
        elif variant == "torch_rmsprop":
            optimizer, schedule = _naive_rmsprop(module, state)
        else:
            optimizer, schedule = training_state.torch_optimizer(module, state), None
        if variant == "summed_lookups":
            for embedding in (child for child in module.modules() if isinstance(child, torch.nn.Embedding)):
                embedding.sparse = False
        regularizers = {} if variant == "no_regularizer" else state.regularizers
        loss_fn = training_state.make_loss(state.loss)  # the compile config's, with Keras's semantics
        module.train()
        weight_differences = []
        chunk = every or torch_steps
        all_batches = batches(torch_steps, seed + 1, model_kind)
        for first in range(0, torch_steps, chunk):
            # Keras: one `fit` over the chunk's batches in order (as fast as Keras trains);
            # torch: the same batches one by one.
            chunk_batches = all_batches[first : first + chunk]
            if first == back_to_keras_at:
                model = _keras_from_torch(graph, module, optimizer, state, Path(folder))
            model.fit(
                np.concatenate([x for x, _ in chunk_batches]),
                np.concatenate([y for _, y in chunk_batches]),
                batch_size=BATCH,
                shuffle=False,
                epochs=1,
                verbose=0,
            )
            for step, (x, y) in enumerate(chunk_batches, start=first):
                if schedule is not None:
                    optimizer.param_groups[0]["lr"] = float(schedule(state.iteration + step))
                optimizer.zero_grad(set_to_none=True)
                (inputs,) = torch_adapter.torch_inputs(graph, [x])  # channels-first
                logits = module(inputs)
                loss = loss_fn(logits, torch.from_numpy(y)) + optimizers.regularization_penalty(module, regularizers)
                loss.backward()
                optimizer.step()
            weight_differences.append(
                (first + len(chunk_batches), _max_difference(keras_adapter.get_tensors(model), _state(module)))
            )
        result = {
            "model": model_kind,
            "variant": variant,
            "keras_steps": keras_steps,
            "torch_steps": torch_steps,
            "weight_differences": weight_differences,
            "weight_difference": weight_differences[-1][1],
        }
        if variant == "ported":
            _, _, keras_after = keras_state(model, Path(folder))
            torch_after = training_state.state_of_torch_optimizer(module, optimizer, state)
            result["iterations"] = (keras_after.iteration, torch_after.iteration)
            result["max_slot_difference"] = max(
                float(np.max(np.abs(value - torch_after.slots[key][slot])))
                for key, slots in keras_after.slots.items()
                for slot, value in slots.items()
            )
    return result


def _keras_from_torch(graph, module, optimizer, state, folder: Path):
    """The torch run's weights and optimizer state in a `.keras` file, loaded by Keras."""
    import keras

    torch_state = training_state.state_of_torch_optimizer(module, optimizer, state)
    resumed = training_state.keras_model_with_training(graph, torch_adapter.get_tensors(module), torch_state)
    path = folder / "from_torch.keras"
    keras_adapter.save_keras_file(resumed, path)
    return keras.saving.load_model(path, compile=True, safe_mode=True)


def _state(module) -> dict[str, np.ndarray]:
    return {key: value.detach().numpy() for key, value in module.state_dict().items()}


def _max_difference(keras_tensors: dict, torch_tensors: dict) -> float:
    """Over every weight and statistic (not torch's `num_batches_tracked`, which Keras lacks)."""
    return max(
        float(np.max(np.abs(value - torch_tensors[key])))
        for key, value in keras_tensors.items()
        if not key.endswith("num_batches_tracked")
    )


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Figures of a Keras run continued in PyTorch.")
    parser.add_argument("--plot", type=Path, help="also draw the weight difference along each run (PNG)")
    args = parser.parse_args(argv)
    results = []
    for model_kind, variant in [
        (model_kind, variant) for model_kind, variants in VARIANTS.items() for variant in variants
    ]:
        result = run(variant=variant, every=10 if args.plot else 50, model_kind=model_kind)
        results.append(result)
        slots = f"; max slot difference {result['max_slot_difference']:.2e}" if "max_slot_difference" in result else ""
        steps = ", ".join(
            f"{step}: {difference:.2e}" for step, difference in result["weight_differences"] if step % 50 == 0
        )
        print(f"{model_kind} {variant}: max weight difference after steps {steps}{slots}")
    for model_kind in VARIANTS:
        result = run(every=50, model_kind=model_kind, back_to_keras_at=100)
        steps = ", ".join(f"{step}: {difference:.2e}" for step, difference in result["weight_differences"])
        print(
            f"{model_kind} back to Keras at step 100: max weight difference after steps {steps}; "
            f"max slot difference {result['max_slot_difference']:.2e}"
        )
    if args.plot:
        from frameworks import plots

        print(f"wrote {plots.plot_resumed_runs(results, args.plot)}")


if __name__ == "__main__":
    main()
