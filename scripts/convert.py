#!/usr/bin/env python3
"""Convert model weights between .keras, .safetensors (common format) and .pt; see `--help`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exchange.cli import main

if __name__ == "__main__":
    sys.exit(main())
