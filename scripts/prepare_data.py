#!/usr/bin/env python3
"""Write the seed's four MNIST pickles (mnist_X_train.pkl, …) from IDX files or a Keras mnist.npz.

python scripts/prepare_data.py SOURCE_DIR_OR_NPZ OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exchange.runner import OneLineArgumentParser, run_command
from frameworks.mnist import load_folder, write_pickles


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="folder of IDX files (.gz or not), or a mnist.npz")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)

    def command() -> None:
        if args.source.suffix == ".npz":
            from frameworks.mnist import load_npz

            mnist = load_npz(args.source)
        else:
            mnist = load_folder(args.source)
        for path in write_pickles(mnist, args.out_dir):
            print(f"wrote {path}")

    return run_command(command, "nothing was written")


if __name__ == "__main__":
    sys.exit(main())
