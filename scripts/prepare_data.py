#!/usr/bin/env python3
"""Write the seed's four MNIST pickles (mnist_X_train.pkl, …) from IDX files or a Keras mnist.npz.

    python scripts/prepare_data.py SOURCE_DIR_OR_NPZ OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exchange.cli import (INTERRUPT_EXIT_CODES, Interrupted, OneLineArgumentParser, interruptible,  # noqa: E402
                          one_line_errors)
from exchange.errors import ExchangeError  # noqa: E402
from exchange.mnist import DataError, load_folder, write_pickles  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="folder of IDX files (.gz or not), or a mnist.npz")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        with one_line_errors(), interruptible():
            if args.source.suffix == ".npz":
                from exchange.mnist import load_npz

                mnist = load_npz(args.source)
            else:
                mnist = load_folder(args.source)
            written = write_pickles(mnist, args.out_dir)
    except Interrupted as err:
        print(f"error: interrupted by {err}; nothing was written", file=sys.stderr)
        return INTERRUPT_EXIT_CODES[err.signal_number]
    except (DataError, ExchangeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a disk problem: full, read-only
        print(f"error: {err.filename + ': ' if err.filename else ''}{err.strerror or err}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
