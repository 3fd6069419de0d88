"""The main job: train the seed MLP in Keras and/or PyTorch, exchange the weights, compare.

Both frameworks start from the same file (`initial.safetensors`, the seed's N(0, 0.05) draw), so
the PyTorch model gets its starting weights through the exchange. In lockstep (the default with
both frameworks) they also see the same batches in the same order, and after every epoch the job
records how far their weights and test-set outputs have drifted apart.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from exchange import fileformat
from exchange.graph import Graph
from frameworks.mnist import Mnist
from frameworks.recipe import Recipe, epoch_orders, layer_role, seed_initial_tensors, validation_split

FRAMEWORKS = ("keras", "torch")


class FrameworkRun:
    """What both halves of a run share: their exchange adapter and framework module, imported
    only when that framework is used."""

    adapter_module: str
    framework_module: str

    def __init__(self, recipe: Recipe):
        self.adapter = importlib.import_module(self.adapter_module)
        self.framework = importlib.import_module(self.framework_module)
        self.recipe = recipe

    @classmethod
    def model_from_file(cls, path: Path):
        return importlib.import_module(cls.adapter_module).model_from_file(path)

    @classmethod
    def predict_model(cls, model, x: np.ndarray) -> np.ndarray:
        return importlib.import_module(cls.framework_module).predict(model, x)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.predict_model(self.model, x)


class KerasRun(FrameworkRun):
    """The Keras half of a run: model and optimizer state."""

    adapter_module, framework_module = "exchange.keras_adapter", "frameworks.keras_mlp"

    def __init__(self, architecture: Graph, recipe: Recipe, initial_file: Path):
        super().__init__(recipe)
        keras_adapter, keras_mlp = self.adapter, self.framework
        self.model = keras_mlp.build_keras_model(architecture)
        keras_adapter.load_file(self.model, initial_file)
        keras_mlp.compile_with_recipe(self.model, recipe)

    def layer_shapes(self) -> list[tuple[tuple[int, ...], ...]]:
        """Shapes of `get_weights()` per layer, as the seed notebook printed them."""
        return [tuple(w.shape for w in layer.get_weights()) for layer in self.model.layers if layer.weights]

    def train_epoch(self, split, order: np.ndarray | None, epoch: int) -> dict[str, float]:
        return self.framework.train_keras_epoch(
            self.model, *split, self.recipe.batch_size, order=order, seed=self.recipe.shuffle_seed + epoch
        )


class TorchRun(FrameworkRun):
    """The PyTorch half of a run."""

    adapter_module, framework_module = "exchange.torch_adapter", "frameworks.torch_mlp"

    def __init__(self, architecture: Graph, recipe: Recipe, initial_file: Path):
        import torch

        super().__init__(recipe)
        torch_mlp = self.framework
        self.torch = torch
        self.model = torch_mlp.TorchMLP(architecture)
        self.adapter.load_file(self.model, initial_file)
        self.optimizer = torch_mlp.KerasSGD(self.model.parameters(), recipe)
        self.shuffle_generator = torch.Generator().manual_seed(recipe.shuffle_seed)
        self._tensors: tuple | None = None

    def layer_shapes(self) -> list[tuple[tuple[int, ...], ...]]:
        """Per layer, (weight shape turned to Keras's (in, out), bias shape), so the report
        counts inputs first as the seed notebook did."""
        return [
            tuple(tuple(p.shape[::-1]) if p.ndim == 2 else tuple(p.shape) for p in layer.parameters())
            for layer in self.model.linears
        ]

    def train_epoch(self, split, order: np.ndarray | None, epoch: int) -> dict[str, float]:
        if self._tensors is None:
            self._tensors = tuple(self.torch.from_numpy(np.ascontiguousarray(a)) for a in split)
        x_train = self._tensors[0]
        if order is None:
            batch_order = self.torch.randperm(len(x_train), generator=self.shuffle_generator)
        else:
            batch_order = self.torch.from_numpy(order)
        return self.framework.train_torch_epoch(
            self.model, self.optimizer, *self._tensors, self.recipe.batch_size, batch_order
        )


RUNNERS = {"keras": KerasRun, "torch": TorchRun}


def parameter_report(name: str, layer_shapes) -> tuple[list[str], int]:
    """The seed notebook's per-layer printout for one framework, and the total count.

    `layer_shapes` holds, per layer, the shapes of (kernel in Keras layout, bias)."""
    lines = [f"[{name}]"]
    total = 0
    for index, shapes in enumerate(layer_shapes):
        role = layer_role(index, len(layer_shapes))
        kernel_shape = shapes[0]
        lines.append(f"Number of Input Values for {role} layer is: {kernel_shape[0]}")
        lines.append(f"Number of Weights for {role} layer is: {kernel_shape[0] * kernel_shape[1]:,}")
        if len(shapes) > 1:
            lines.append(f"Number of Biases for {role} layer is: {shapes[1][0]}")
        total += sum(int(np.prod(shape)) for shape in shapes)
    lines.append(f"Total parameters of the model: {total:,}")
    return lines, total


def accuracy(probabilities: np.ndarray, one_hot: np.ndarray) -> float:
    return float((probabilities.argmax(-1) == one_hot.argmax(-1)).mean())


def compare_runs(runs: dict, x_test: np.ndarray) -> dict:
    """Max |W_keras - W_torch| per tensor (file layout) and the test-set output agreement."""
    keras_tensors = runs["keras"].adapter.get_tensors(runs["keras"].model)
    torch_tensors = runs["torch"].adapter.get_tensors(runs["torch"].model)
    weight_diffs = {key: float(np.max(np.abs(keras_tensors[key] - torch_tensors[key]))) for key in keras_tensors}
    keras_probs, torch_probs = runs["keras"].predict(x_test), runs["torch"].predict(x_test)
    return {
        "max_weight_diff": weight_diffs,
        "max_weight_diff_all": max(weight_diffs.values()),
        "max_output_diff": float(np.max(np.abs(keras_probs - torch_probs))),
        "argmax_agreement": float((keras_probs.argmax(-1) == torch_probs.argmax(-1)).mean()),
    }


def cross_load(runs: dict, out_dir: Path, x_test: np.ndarray) -> dict:
    """Load each framework's trained file into the other framework; max abs output difference."""
    results = {}
    for source, source_run in runs.items():
        target = "torch" if source == "keras" else "keras"
        loaded = RUNNERS[target].model_from_file(out_dir / f"{source}.safetensors")
        source_probs = source_run.predict(x_test)
        target_probs = RUNNERS[target].predict_model(loaded, x_test)
        results[f"{source}_to_{target}"] = {
            "max_abs_diff": float(np.max(np.abs(source_probs - target_probs))),
            "argmax_agreement": float((source_probs.argmax(-1) == target_probs.argmax(-1)).mean()),
        }
    return results


def run(
    data: Mnist,
    out_dir: str | Path,
    architecture: Graph,
    recipe: Recipe = Recipe(),
    frameworks: tuple[str, ...] = FRAMEWORKS,
    lockstep: bool = True,
    plots: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Train, save `keras.safetensors` / `torch.safetensors` / `report.json`, cross-load, plot;
    returns the report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lockstep = lockstep and len(frameworks) == 2
    split = validation_split(data.x_train, data.y_train, recipe.validation_split)
    initial_file = out_dir / "initial.safetensors"
    fileformat.save(initial_file, architecture, seed_initial_tensors(architecture, recipe), source_framework="keras")
    runs = {name: RUNNERS[name](architecture, recipe, initial_file) for name in frameworks}

    report: dict = {
        "architecture": architecture.to_dict(),
        "recipe": recipe.to_dict(),
        "lockstep": lockstep,
        "frameworks": {},
        "epochs": [],
    }
    for name, runner in runs.items():
        lines, total = parameter_report(name, runner.layer_shapes())
        for line in lines:
            log(line)
        report["frameworks"][name] = {"parameters": total, "history": [], "epoch_seconds": []}

    orders = epoch_orders(len(split[0]), recipe.epochs, recipe.shuffle_seed) if lockstep else None
    for epoch in range(recipe.epochs):
        for name, runner in runs.items():
            started = time.perf_counter()
            stats = runner.train_epoch(split, orders[epoch] if orders else None, epoch)
            seconds = time.perf_counter() - started
            report["frameworks"][name]["history"].append(stats)
            report["frameworks"][name]["epoch_seconds"].append(seconds)
            log(
                f"{name:5s} epoch {epoch + 1}/{recipe.epochs}: loss {stats['loss']:.4f} "
                f"acc {stats['accuracy']:.4f} val_loss {stats['val_loss']:.4f} "
                f"val_acc {stats['val_accuracy']:.4f} ({seconds:.2f} s)"
            )
        if len(runs) == 2:
            comparison = compare_runs(runs, data.x_test)
            report["epochs"].append({"epoch": epoch + 1, **comparison})
            log(
                f"      epoch {epoch + 1}: max |W_keras - W_torch| {comparison['max_weight_diff_all']:.3e}"
                f", max |p_keras - p_torch| {comparison['max_output_diff']:.3e}, "
                f"argmax agreement {comparison['argmax_agreement']:.4%}"
            )

    for name, runner in runs.items():
        summary = report["frameworks"][name]
        summary["test_accuracy"] = accuracy(runner.predict(data.x_test), data.y_test)
        summary["seconds_per_epoch"] = float(np.mean(summary["epoch_seconds"]))
        runner.adapter.save_file(runner.model, out_dir / f"{name}.safetensors")
        log(f"{name} test accuracy: {summary['test_accuracy']:.4f} ({summary['seconds_per_epoch']:.2f} s per epoch)")

    report["cross_load"] = cross_load(runs, out_dir, data.x_test)
    for direction, result in report["cross_load"].items():
        log(
            f"{direction.replace('_', ' ')}: max abs output difference on the test set "
            f"{result['max_abs_diff']:.3e}, argmax agreement {result['argmax_agreement']:.4%}"
        )
    write_report(report, out_dir / "report.json")
    if plots:
        try:
            from frameworks.plots import plot_report
        except ImportError:
            log("plots skipped: matplotlib is not installed (pip install '.[plots]')")
        else:
            for path in plot_report(out_dir / "report.json"):
                log(f"wrote {path}")
    return report


def write_report(report: dict, path: Path) -> None:
    with fileformat.atomic_output(path) as temporary:
        temporary.write_text(json.dumps(report, indent=1))
