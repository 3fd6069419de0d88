#!/usr/bin/env python3
"""Benchmark `.keras -> .safetensors` conversion: whole-process wall time and peak RSS.

For the seed MLP, a large MLP (4096 -> 8 x Dense 4096 -> 10, about 134M parameters, 537 MB) and
keras.applications ResNet50 (64x64 input, 25.6M parameters), each route runs in a fresh process,
`--repeats` times (median time, largest peak RSS):

    convert.py      python scripts/convert.py model.keras model.safetensors (reads the file directly)
    no fsync        the same with the output's fsync (data, then folder) skipped, and the fsync
                    alone timed inside a convert.py run: the cost of durability
    by hand         keras.saving.load_model, get_weights(), transpose, safetensors save_file (MLPs)
    plain write     safetensors.numpy.save_file of the same tensors already in memory (the write
                    alone is timed, inside the process; the floor for any converter)
    model_from_file exchange.torch_adapter.model_from_file(model.safetensors), timed inside the
                    process after torch is imported (ResNet50)

The sequence zoo of the tests (tests/zoo_models.py: text CNN, masked Embedding -> LSTM / GRU /
Bidirectional LSTM, SimpleRNN, transformer block) is timed the same way: convert.py and
model_from_file (`--skip-sequences` leaves it out).

    python scripts/bench_convert.py [--repeats 3] [--work-dir DIR] [--json FILE] [--skip-large]

`--memory` measures peak memory instead, each in a fresh process: `--verify` (its child's own peak
RSS, and the part above its imports) to `.safetensors` and to generated `.py` code, on the seed MLP
and two models with large activations (`conv_chain`: 256x256x3 -> 6 x Conv2D(32) -> pooling;
`branches`: 12 parallel Conv2D(16) of a 256x256x8 input, added), and one forward pass of the
generated module against the fx module on the same batch (conv_chain, 8 rows: 64 MiB a tensor).

    python scripts/bench_convert.py --memory [--repeats 1]

`--optimizer-state` times `convert.py` of a compiled `.keras` that holds Adam's state (a Dense
model 1024 -> 2048 -> 2048 -> 10, 6.3M parameters, trained one step: three times the tensors)
without and with `--optimizer-state` (its slots through the ports into the exchange file).

    python scripts/bench_convert.py --optimizer-state [--repeats 3]

Needs Keras (to write the input files and for the by-hand route). Figures go in docs/measured.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

LARGE_WIDTH, LARGE_HIDDEN_LAYERS = 4096, 8

BY_HAND = """
import sys, numpy as np, keras
from safetensors.numpy import save_file
model = keras.saving.load_model(sys.argv[1], compile=False)
weights = model.get_weights()  # kernel, bias, kernel, bias, ...
tensors = {}
for index in range(len(weights) // 2):
    tensors[f"layers.{index}.weight"] = np.ascontiguousarray(weights[2 * index].T)
    tensors[f"layers.{index}.bias"] = weights[2 * index + 1]
save_file(tensors, sys.argv[2], metadata={"format": "pt"})
"""

PLAIN_WRITE = """
import sys, time, numpy as np
from safetensors.numpy import load_file, save_file
tensors = {key: np.array(value) for key, value in load_file(sys.argv[1]).items()}  # in memory
started = time.perf_counter()
save_file(tensors, sys.argv[2], metadata={"format": "pt"})
print(f"write_seconds={time.perf_counter() - started:.4f}")
"""


NO_FSYNC = """
import sys
sys.path.insert(0, sys.argv[1])
from exchange import fileformat
fileformat.flush_to_disk = lambda path: None   # what this route leaves out
from exchange.cli import main
sys.exit(main(sys.argv[2:]))
"""
FSYNC_TIMED = """
import sys, time
sys.path.insert(0, sys.argv[1])
from exchange import fileformat
flush_to_disk, spent = fileformat.flush_to_disk, []
def timed_flush_to_disk(path):
    started = time.perf_counter()
    flush_to_disk(path)
    spent.append(time.perf_counter() - started)
fileformat.flush_to_disk = timed_flush_to_disk
from exchange.cli import main
status = main(sys.argv[2:])
print(f"fsync_seconds={sum(spent):.4f}")
sys.exit(status)
"""
VERIFY_MEASURED = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from exchange import cli
source, out = Path(sys.argv[2]), Path(sys.argv[3])
graph = cli.convert(source, out)
started = time.perf_counter()
result = cli.verify(source, out, graph, None, float(sys.argv[4]))
print("verify=" + json.dumps({"seconds": time.perf_counter() - started, "inputs": result.inputs,
                              "max_abs_diff": result.verdict.max_abs_diff, "child_peak_mib": result.child_peak_mib,
                              "child_imports_mib": result.child_imports_mib}))
"""
MODEL_FROM_FILE = """
import sys, time
sys.path.insert(0, sys.argv[2])
from exchange import torch_adapter
started = time.perf_counter()
model = torch_adapter.model_from_file(sys.argv[1])
print(f"load_seconds={time.perf_counter() - started:.4f}")
"""


# Children write and use bytecode caches, as an installed package does (a session that sets
# PYTHONDONTWRITEBYTECODE would otherwise time the compilation of every module on every run).
CHILD_ENVIRONMENT = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}


def run_measured(command: list[str], output: Path | None = None) -> dict:
    """Wall time and peak RSS (MB) of one child process, from os.wait4's resource usage.

    Dirty pages left by the previous run are flushed first (os.sync): otherwise the kernel's
    write-back throttling of one run lands in the next run's time. The previous run's `output`
    is removed first, so each run writes a new file (replacing a 537 MB file costs its unlinking).
    Linux keeps a process's peak RSS across fork and exec, so this parent stays small (it never
    imports Keras or numpy).
    """
    if output is not None:
        output.unlink(missing_ok=True)
    os.sync()
    time.sleep(0.5)
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=CHILD_ENVIRONMENT)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    stdout, stderr = process.stdout.read().decode(), process.stderr.read().decode()
    process.stdout.close()
    process.stderr.close()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed ({process.returncode}): {stderr[-2000:]}")
    result = {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024}
    for line in stdout.splitlines():
        for key in ("write_seconds", "load_seconds", "fsync_seconds"):
            if line.startswith(f"{key}="):
                result[key] = float(line.split("=", 1)[1])
        if line.startswith("verify="):
            result["verify"] = json.loads(line.split("=", 1)[1])
    return result


def repeat(command: list[str], repeats: int, output: Path | None = None) -> dict:
    """A first unmeasured run warms the page cache and the bytecode cache; then `repeats` runs."""
    run_measured(command, output)
    runs = [run_measured(command, output) for _ in range(repeats)]
    summary = {
        "seconds": statistics.median(r["seconds"] for r in runs),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "runs": runs,
    }
    for key in ("write_seconds", "load_seconds", "fsync_seconds"):
        if key in runs[0]:
            summary[key] = statistics.median(r[key] for r in runs)
    return summary


def write_models(work_dir: Path, skip_large: bool) -> None:
    """Runs in its own process (`--write-models`): Keras would make this one large."""
    import keras
    import numpy as np

    from exchange.graph import dense_chain
    from frameworks.keras_mlp import build_keras_model
    from frameworks.recipe import SEED_ARCHITECTURE

    models = {
        "seed": lambda: build_keras_model(SEED_ARCHITECTURE),
        "resnet50": lambda: keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3)),
    }
    if not skip_large:
        models["large"] = lambda: build_keras_model(
            dense_chain("large", LARGE_WIDTH, [(LARGE_WIDTH, "relu")] * LARGE_HIDDEN_LAYERS + [(10, "softmax")])
        )
    for name, build in models.items():
        model = build()
        generator = np.random.default_rng(0)
        model.set_weights(
            [generator.standard_normal(w.shape).astype(w.dtype) * np.float32(0.01) for w in model.get_weights()]
        )
        path = work_dir / f"{name}.keras"
        model.save(path)
        print(f"{name}: {model.count_params():,} parameters, {path.stat().st_size / 2**20:,.1f} MiB file", flush=True)
        del model
        keras.backend.clear_session()


def write_sequence_models(work_dir: Path) -> list[str]:
    """The tests' sequence zoo as `.keras` files (runs in the `--write-models` process)."""
    import keras

    sys.path.insert(0, str(ROOT / "tests"))
    from kerasmodels import randomize
    from zoo_models import SEQUENCE_MODELS, SMALL

    for name in SEQUENCE_MODELS:
        keras.utils.set_random_seed(21)
        randomize(SMALL[name](), seed=5).save(work_dir / f"sequence_{name}.keras")
    return list(SEQUENCE_MODELS)


def bench_sequences(work_dir: Path, repeats: int) -> dict:
    """The models `write_sequence_models` wrote (this process never imports Keras: see run_measured)."""
    results = {}
    print("\nsequence zoo")
    print(
        "| model | convert.py .keras -> .safetensors, whole process (s) | peak RSS (MiB) | "
        "model_from_file, the call (s) |"
    )
    print("|---|---|---|---|")
    for keras_path in sorted(work_dir.glob("sequence_*.keras")):
        name, ours = keras_path.stem[len("sequence_") :], keras_path.with_suffix(".safetensors")
        convert = repeat([sys.executable, str(ROOT / "scripts/convert.py"), str(keras_path), str(ours)], repeats, ours)
        load = repeat([sys.executable, "-c", MODEL_FROM_FILE, str(ours), str(ROOT)], repeats)
        results[name] = {"convert.py": convert, "model_from_file": load}
        print(
            f"| {name} | {convert['seconds']:.3f} | {convert['peak_rss_mb']:,.0f} | {load['load_seconds']:.4f} |",
            flush=True,
        )
    return results


MEMORY_MODELS = ("seed", "conv_chain", "branches")


def write_memory_models(work_dir: Path) -> None:
    """The `--memory` models (runs in the `--write-models` process)."""
    import keras

    sys.path.insert(0, str(ROOT / "tests"))
    from memory_models import branches, conv_chain

    from frameworks.keras_mlp import build_keras_model
    from frameworks.recipe import SEED_ARCHITECTURE

    keras.utils.set_random_seed(0)
    build_keras_model(SEED_ARCHITECTURE).save(work_dir / "seed.keras")
    conv_chain(size=256, channels=32, layers=6).save(work_dir / "conv_chain.keras")
    branches(size=256, channels=16, count=12).save(work_dir / "branches.keras")


def write_optimizer_state_model(work_dir: Path) -> None:
    """The `--optimizer-state` model (runs in the `--write-models` process)."""
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    inputs = keras.Input((1024,))
    x = keras.layers.Dense(2048, activation="relu")(inputs)
    x = keras.layers.Dense(2048, activation="relu")(x)
    model = keras.Model(inputs, keras.layers.Dense(10)(x))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    model.train_on_batch(rng.normal(size=(8, 1024)).astype(np.float32), np.eye(10, dtype=np.float32)[:8])
    model.save(work_dir / "adam.keras")


def bench_optimizer_state(work_dir: Path, repeats: int) -> dict:
    """convert.py of the Adam model without and with its optimizer state."""
    keras_path, ours = work_dir / "adam.keras", work_dir / "adam.safetensors"
    command = [sys.executable, str(ROOT / "scripts/convert.py"), str(keras_path), str(ours)]
    results = {
        "file_mb": keras_path.stat().st_size / 2**20,
        "without": repeat(command, repeats, ours),
        "with": repeat(command + ["--optimizer-state"], repeats, ours),
    }
    ratio = results["with"]["seconds"] / results["without"]["seconds"]
    print(f"\nAdam-trained Dense model, 6.3M parameters ({results['file_mb']:,.1f} MiB .keras)")
    print("| convert.py | wall time, whole process (s) | peak RSS (MiB) |")
    print("|---|---|---|")
    for route in ("without", "with"):
        figures = results[route]
        print(f"| {route} --optimizer-state | {figures['seconds']:.3f} | {figures['peak_rss_mb']:,.0f} |")
    print(f"with / without: {ratio:.2f}x", flush=True)
    return results


def bench_memory(work_dir: Path, repeats: int) -> dict:
    """`--verify`'s peak and time per model and output kind; the generated forward against fx's."""
    results: dict = {}
    print("| model | output | rows verified | --verify (s) | child peak RSS (MiB) | of which imports (MiB) |")
    print("|---|---|---|---|---|---|")
    for name in MEMORY_MODELS:
        keras_path = work_dir / f"{name}.keras"
        for suffix in (".safetensors", ".py"):
            out = work_dir / f"{name}.measured{suffix}"
            runs = [
                run_measured([sys.executable, "-c", VERIFY_MEASURED, str(ROOT), str(keras_path), str(out), "1e-4"])
                for _ in range(repeats)
            ]
            verify = [run["verify"] for run in runs]
            figures = {
                "seconds": statistics.median(v["seconds"] for v in verify),
                "child_peak_mib": max(v["child_peak_mib"] for v in verify),
                "child_imports_mib": max(v["child_imports_mib"] for v in verify),
                "inputs": verify[0]["inputs"],
                "max_abs_diff": verify[0]["max_abs_diff"],
            }
            results[f"{name}{suffix}"] = figures
            print(
                f"| {name} | {suffix} | {figures['inputs']} | {figures['seconds']:.1f} | "
                f"{figures['child_peak_mib']:,.0f} | {figures['child_imports_mib']:,.0f} |",
                flush=True,
            )
    sys.path.insert(0, str(ROOT / "tests"))
    from memory_models import measure_forward  # imports Keras: after the runs above (see run_measured)

    folder = work_dir / "forward"
    folder.mkdir(exist_ok=True)
    subprocess.run([sys.executable, __file__, "--write-models", str(folder), "--forward-model"], check=True)
    paths = (folder / "graph.json", folder / "state.npz", folder / "generated.py")
    fx = max((measure_forward(*paths[:2], None, rows=8) for _ in range(repeats)), key=lambda r: r["added_mib"])
    generated = max((measure_forward(*paths, rows=8) for _ in range(repeats)), key=lambda r: r["added_mib"])
    results["forward"] = {"fx": fx, "generated": generated}
    print(
        f"\none forward pass, conv_chain at 256x256, 8 rows (64 MiB a tensor): peak RSS added by the fx module "
        f"{fx['added_mib']:,.0f} MiB, by the generated module {generated['added_mib']:,.0f} MiB",
        flush=True,
    )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, help="default: a temporary folder")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--skip-sequences", action="store_true")
    parser.add_argument("--only-sequences", action="store_true")
    parser.add_argument("--memory", action="store_true", help="peak memory of --verify and of generated code")
    parser.add_argument("--optimizer-state", action="store_true", help="conversion with and without Adam's state")
    parser.add_argument("--write-models", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--forward-model", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write_models and args.forward_model:
        import keras

        sys.path.insert(0, str(ROOT / "tests"))
        from memory_models import conv_chain, write_model

        keras.utils.set_random_seed(0)
        write_model(args.write_models, conv_chain(size=256, channels=32, layers=6))
        return 0
    if args.write_models and args.memory:
        write_memory_models(args.write_models)
        return 0
    if args.write_models and args.optimizer_state:
        write_optimizer_state_model(args.write_models)
        return 0
    if args.write_models:
        if not args.only_sequences:
            write_models(args.write_models, args.skip_large)
        if not args.skip_sequences:
            write_sequence_models(args.write_models)
        return 0

    with tempfile.TemporaryDirectory() as temporary:
        work_dir = args.work_dir or Path(temporary)
        work_dir.mkdir(parents=True, exist_ok=True)
        if args.memory:
            subprocess.run([sys.executable, __file__, "--write-models", str(work_dir), "--memory"], check=True)
            results = bench_memory(work_dir, args.repeats)
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))
            return 0
        if args.optimizer_state:
            subprocess.run([sys.executable, __file__, "--write-models", str(work_dir), "--optimizer-state"], check=True)
            results = bench_optimizer_state(work_dir, args.repeats)
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))
            return 0
        subprocess.run(
            [sys.executable, __file__, "--write-models", str(work_dir)]
            + (["--skip-large"] if args.skip_large else [])
            + (["--skip-sequences"] if args.skip_sequences else [])
            + (["--only-sequences"] if args.only_sequences else []),
            check=True,
        )
        results = {}
        names = ("seed", "resnet50") if args.skip_large else ("seed", "large", "resnet50")
        if args.only_sequences:
            names = ()
        for name in names:
            keras_path = work_dir / f"{name}.keras"
            ours = work_dir / f"{name}.safetensors"
            size_mb = keras_path.stat().st_size / 2**20
            results[name] = {
                "file_mb": size_mb,
                "convert.py": repeat(
                    [sys.executable, str(ROOT / "scripts/convert.py"), str(keras_path), str(ours)], args.repeats, ours
                ),
                "no fsync": repeat(
                    [sys.executable, "-c", NO_FSYNC, str(ROOT), str(keras_path), str(ours)], args.repeats, ours
                ),
                "fsync timed": repeat(
                    [sys.executable, "-c", FSYNC_TIMED, str(ROOT), str(keras_path), str(ours)], args.repeats, ours
                ),
                "plain write": repeat(
                    [sys.executable, "-c", PLAIN_WRITE, str(ours), str(work_dir / f"{name}.plain.safetensors")],
                    args.repeats,
                    work_dir / f"{name}.plain.safetensors",
                ),
            }
            if name == "resnet50":
                results[name]["model_from_file"] = repeat(
                    [sys.executable, "-c", MODEL_FROM_FILE, str(ours), str(ROOT)], args.repeats
                )
            else:
                by_hand = work_dir / f"{name}.byhand.safetensors"
                results[name]["by hand"] = repeat(
                    [sys.executable, "-c", BY_HAND, str(keras_path), str(by_hand)], args.repeats, by_hand
                )
            print_table(name, results[name])
        if not args.skip_sequences:
            results["sequences"] = bench_sequences(work_dir, args.repeats)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def print_table(name: str, figures: dict) -> None:
    ours, plain = figures["convert.py"], figures["plain write"]
    print(f"\n{name} ({figures['file_mb']:,.1f} MiB of weights)")
    print("| route | wall time, whole process (s) | peak RSS (MiB) |")
    print("|---|---|---|")
    print(f"| convert.py | {ours['seconds']:.3f} | {ours['peak_rss_mb']:,.0f} |")
    no_fsync = figures["no fsync"]
    print(
        f"| convert.py without the fsync of data and folder | {no_fsync['seconds']:.3f} | "
        f"{no_fsync['peak_rss_mb']:,.0f} |"
    )
    if "by hand" in figures:
        by_hand = figures["by hand"]
        print(
            f"| by hand (Keras load, get_weights, transpose, save) | {by_hand['seconds']:.3f} | "
            f"{by_hand['peak_rss_mb']:,.0f} |"
        )
    print(
        f"| plain safetensors write of the same tensors | {plain['seconds']:.3f} "
        f"(write alone {plain['write_seconds']:.3f}) | {plain['peak_rss_mb']:,.0f} |"
    )
    if "model_from_file" in figures:
        load = figures["model_from_file"]
        print(
            f"| torch_adapter.model_from_file (whole process, torch import included) | {load['seconds']:.3f} "
            f"(the call alone {load['load_seconds']:.3f}) | {load['peak_rss_mb']:,.0f} |"
        )
    print(
        f"fsync of data and folder: {figures['fsync timed']['fsync_seconds']:.3f} s inside convert.py "
        f"(median); whole process with and without it {ours['seconds']:.3f} / {no_fsync['seconds']:.3f} s"
    )
    print(
        f"speed relative to the plain write alone: {plain['write_seconds'] / ours['seconds']:.2f}; "
        f"peak RSS / file size: {ours['peak_rss_mb'] / figures['file_mb']:.2f}"
        + (
            f"; {figures['by hand']['seconds'] / ours['seconds']:.1f}x faster than by hand"
            if "by hand" in figures
            else ""
        ),
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
