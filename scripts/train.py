#!/usr/bin/env python3
"""Train the seed MLP in Keras and/or PyTorch on MNIST, exchange the weights, compare outputs.

python scripts/train.py [--data DIR] [--epochs N] [--framework keras|torch|both] [--out-dir DIR]
                        [--test-images FILE.npz]

`--test-images` also writes the MNIST test images, keyed by the seed model's input name, for
`convert --verify --verify-inputs FILE.npz` (make demo verifies the trained model on them).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"  # TensorFlow's start-up logging would bury a one-line error

from exchange.runner import OneLineArgumentParser, run_command
from frameworks.mnist import load_mnist, write_test_images
from frameworks.recipe import SEED_ARCHITECTURE, Recipe


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        help="folder of the seed's pickles, IDX files or mnist.npz "
        "(default: $MNIST_DIR, then ./data/, then Keras's download)",
    )
    parser.add_argument("--epochs", type=int, default=Recipe.epochs, help="default: %(default)s")
    parser.add_argument("--framework", choices=("keras", "torch", "both"), default="both")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/latest"), help="default: %(default)s")
    parser.add_argument(
        "--no-lockstep",
        action="store_true",
        help="let each framework shuffle its own batches (default: same batch order)",
    )
    parser.add_argument(
        "--test-images",
        type=Path,
        metavar="FILE.npz",
        help="also write the MNIST test images there, for convert --verify-inputs",
    )
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")

    from frameworks import train_job

    frameworks = train_job.FRAMEWORKS if args.framework == "both" else (args.framework,)

    def command() -> None:
        data = load_mnist(args.data)
        if args.test_images is not None:
            write_test_images(data, args.test_images, SEED_ARCHITECTURE.inputs[0].name)
        train_job.run(
            data,
            args.out_dir,
            SEED_ARCHITECTURE,
            Recipe(epochs=args.epochs),
            frameworks=frameworks,
            lockstep=not args.no_lockstep,
        )
        print(
            f"wrote {args.out_dir}/keras.safetensors, torch.safetensors and report.json"
            if args.framework == "both"
            else f"wrote into {args.out_dir}"
        )

    return run_command(command, f"files already written in {args.out_dir} are complete")


if __name__ == "__main__":
    sys.exit(main())
