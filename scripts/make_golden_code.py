#!/usr/bin/env python3
"""Regenerate the golden generated source of the seed MLP (tests/test_codegen.py pins it):

python scripts/make_golden_code.py
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exchange import codegen  # noqa: E402
from frameworks.recipe import SEED_ARCHITECTURE  # noqa: E402

GOLDEN = ROOT / "tests/fixtures/golden/seed_mlp.py"

if __name__ == "__main__":
    GOLDEN.write_text(codegen.generate(SEED_ARCHITECTURE, "seed_mlp.safetensors", "seed_mlp.keras"))
    print(f"wrote {GOLDEN}")
