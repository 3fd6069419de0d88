#!/usr/bin/env python3
"""`--verify` on every model of the test zoo (tests/zoo_models.py: small CNNs, sequence models and
three keras.applications models, weights seeded as in the tests): for each, the float32 and the
float64 max abs difference between Keras (TensorFlow backend) and the converted model, the output
scale, the verdict and the `--verify` child's peak memory, for a `.safetensors` and a `.py` output.

    python scripts/verify_zoo.py [--markdown] [--only NAME ...]

Needs Keras and torch; about 3 minutes on this 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

OUTPUTS = ("model.safetensors", "model.py")


def measure(name: str, build, folder: Path) -> list[dict]:
    import keras
    from kerasmodels import randomize
    from zoo_models import APPLICATIONS

    from exchange import cli
    from exchange.verify import verify

    keras.utils.set_random_seed(21)
    model = randomize(build(), seed=5, offset_scale=0.05 if name in APPLICATIONS else 0.2)
    source = folder / f"{name}.keras"
    model.save(source)
    rows = []
    for output in OUTPUTS:
        out = folder / output
        graph = cli.convert(source, out)
        result = verify(
            source, out, graph, None, code_weights=folder / "model.safetensors" if output.endswith(".py") else None
        )
        float64 = result.float64
        rows.append(
            {
                "model": name,
                "output": output,
                "float32": result.float32.max_abs_diff,
                "float64": None if float64 is None else float64.max_abs_diff,
                "scale": result.float32.output_scale,
                "verdict": f"{result.verdict.dtype}: {'match' if result.passed else 'differ'}",
                "peak_mib": result.child_peak_mib,
            }
        )
    return rows


def main() -> None:
    from zoo_models import APPLICATIONS, SMALL

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--only", nargs="*", help="these zoo models only")
    args = parser.parse_args()
    models = {**SMALL, **APPLICATIONS}
    rows = []
    with tempfile.TemporaryDirectory() as name:
        for model_name in args.only or models:
            print(f"verifying {model_name}", file=sys.stderr)
            rows += measure(model_name, models[model_name], Path(name))
    if args.markdown:
        print("| model | output | float32 max abs diff | float64 max abs diff | output scale | verdict | child peak |")
        print("|---|---|---|---|---|---|---|")
    for row in rows:
        float64 = "not run" if row["float64"] is None else f"{row['float64']:.1e}"
        cells = [
            row["model"],
            row["output"],
            f"{row['float32']:.1e}",
            float64,
            f"{row['scale']:.3g}",
            row["verdict"],
            f"{row['peak_mib']:,.0f} MiB",
        ]
        print("| " + " | ".join(cells) + " |" if args.markdown else "  ".join(cells))


if __name__ == "__main__":
    main()
