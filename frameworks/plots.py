"""Plots of a training report: both frameworks overlaid, their drift, and the first layer's weights.

Everything is drawn from `report.json` and the weight files beside it, so `scripts/plot.py` can
redraw a finished run. Uses matplotlib's Agg backend: no screen needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from exchange import fileformat

STYLES = {"keras": {"color": "tab:red", "linestyle": "-"}, "torch": {"color": "tab:blue", "linestyle": "--"}}
TILE_SIDE = 28  # the first layer's inputs are 28x28 images


def plot_curves(report: dict, path: Path) -> Path:
    """Training and validation loss and accuracy per epoch, frameworks overlaid."""
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for name, summary in report["frameworks"].items():
        epochs = np.arange(1, len(summary["history"]) + 1)
        for metric, axes in (("loss", loss_axes), ("accuracy", accuracy_axes)):
            for prefix, marker in (("", None), ("val_", "o")):
                axes.plot(
                    epochs,
                    [h[prefix + metric] for h in summary["history"]],
                    marker=marker,
                    markersize=3,
                    label=f"{name} {'validation' if prefix else 'training'}",
                    **STYLES[name],
                )
    for axes, metric in ((loss_axes, "loss"), (accuracy_axes, "accuracy")):
        axes.set_xlabel("epoch")
        axes.set_ylabel(metric)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle("Seed MLP on MNIST" + (" (lockstep)" if report.get("lockstep") else ""))
    return _save(figure, path)


def plot_weight_difference(report: dict, path: Path) -> Path | None:
    """Max |W_keras - W_torch| per epoch on a log scale, per tensor and over all tensors."""
    if not report.get("epochs"):
        return None
    figure, axes = plt.subplots(figsize=(6, 4))
    epochs = [entry["epoch"] for entry in report["epochs"]]
    for key in report["epochs"][0]["max_weight_diff"]:
        axes.plot(
            epochs,
            [max(entry["max_weight_diff"][key], 1e-12) for entry in report["epochs"]],
            linewidth=1,
            alpha=0.6,
            label=key,
        )
    axes.plot(
        epochs,
        [max(entry["max_weight_diff_all"], 1e-12) for entry in report["epochs"]],
        color="black",
        linewidth=2,
        label="all tensors",
    )
    axes.set_yscale("log")
    axes.set_xlabel("epoch")
    axes.set_ylabel("max |W_keras - W_torch|")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=7)
    axes.set_title("Weight drift between the frameworks")
    return _save(figure, path)


def plot_first_layer(weight_files: dict[str, Path], path: Path) -> Path | None:
    """The first layer's weight vectors as 28x28 tiles, one panel per framework."""
    weights = {name: first_weight(fileformat.load(file)) for name, file in weight_files.items() if Path(file).is_file()}
    weights = {name: w for name, w in weights.items() if w.shape[1] == TILE_SIDE * TILE_SIDE}
    if not weights:
        return None
    figure, panels = plt.subplots(1, len(weights), figsize=(5 * len(weights), 3.2), squeeze=False)
    limit = max(float(np.abs(w).max()) for w in weights.values())
    for axes, (name, weight) in zip(panels[0], weights.items()):
        axes.imshow(tile_rows(weight), cmap="RdBu_r", vmin=-limit, vmax=limit)
        axes.set_title(f"{name}: first layer, {weight.shape[0]} units")
        axes.axis("off")
    return _save(figure, path)


def first_weight(exchange_file) -> np.ndarray:
    """The first layer's weight (out, in) of a Dense stack."""
    graph = exchange_file.architecture
    return exchange_file.tensors[f"{graph.torch_names[graph.nodes[0].name]}.weight"]


def tile_rows(weight: np.ndarray, columns: int = 10) -> np.ndarray:
    """Each row of `weight` (out, 784) as a 28x28 tile, laid out in a grid with 1-pixel gaps."""
    rows = -(-len(weight) // columns)
    step = TILE_SIDE + 1
    canvas = np.full((rows * step - 1, columns * step - 1), np.nan, dtype=np.float32)
    for index, vector in enumerate(weight):
        row, column = divmod(index, columns)
        canvas[row * step : row * step + TILE_SIDE, column * step : column * step + TILE_SIDE] = vector.reshape(
            TILE_SIDE, TILE_SIDE
        )
    return canvas


def plot_report(report_path: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw every plot for a report; returns the PNG files written."""
    report_path = Path(report_path)
    report = json.loads(report_path.read_text())
    out_dir = Path(out_dir) if out_dir else report_path.parent
    weight_files = {name: report_path.parent / f"{name}.safetensors" for name in report["frameworks"]}
    written = [
        plot_curves(report, out_dir / "curves.png"),
        plot_weight_difference(report, out_dir / "weight_difference.png"),
        plot_first_layer(weight_files, out_dir / "first_layer.png"),
    ]
    return [path for path in written if path is not None]


def plot_resumed_runs(results: list[dict], path: Path) -> Path:
    """Max |W_keras - W_torch| along a resumed run (`frameworks.resume_lockstep`), one panel per
    model: the ported run against each of torch's own conventions, log scale."""
    models = list(dict.fromkeys(result["model"] for result in results))
    figure, panels = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for axes, model in zip(panels[0], models):
        for result in (result for result in results if result["model"] == model):
            steps, differences = zip(*result["weight_differences"])
            ported = result["variant"] == "ported"
            axes.plot(
                steps,
                [max(difference, 1e-12) for difference in differences],
                color="black" if ported else None,
                linewidth=2 if ported else 1,
                label=result["variant"],
            )
        axes.set_yscale("log")
        axes.set_xlabel("steps after the conversion")
        axes.set_ylabel("max |W_keras - W_torch|")
        axes.grid(alpha=0.3, which="both")
        axes.legend(fontsize=8)
        axes.set_title(f"{model.upper()} resumed in PyTorch")
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    with fileformat.atomic_output(path) as temporary:
        figure.savefig(temporary, dpi=80, format="png")
    plt.close(figure)
    return path
