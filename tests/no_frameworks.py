"""`scripts/convert.py` run where tensorflow, keras and torch cannot be imported (nor in any
process it starts): the reader's promise that converting a file needs none of them."""

import subprocess
import sys
import textwrap
from pathlib import Path

from support import ROOT

# Runs scripts/convert.py in a process where importing tensorflow, keras or torch raises.
NO_FRAMEWORK_RUNNER = textwrap.dedent("""
    import runpy, sys
    BLOCKED = ("tensorflow", "keras", "tf_keras", "torch")

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")

    sys.meta_path.insert(0, Blocker())
    sys.argv = ["convert.py"] + sys.argv[1:]
    try:
        runpy.run_path(%r, run_name="__main__")
    finally:
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print("frameworks imported:", loaded or "none")
""") % str(ROOT / "scripts/convert.py")


# The same blocker in every process the run starts (`--verify` runs the frameworks in a child):
# a `sitecustomize` on PYTHONPATH, which Python imports at start-up.
CHILD_BLOCKER = NO_FRAMEWORK_RUNNER.split("sys.argv =")[0]


def convert_without_frameworks(*args):
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "sitecustomize.py").write_text(CHILD_BLOCKER)
        environment = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                [folder] + [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
            ),
        }
        return subprocess.run(
            [sys.executable, "-c", NO_FRAMEWORK_RUNNER, *map(str, args)],
            capture_output=True,
            text=True,
            timeout=300,
            env=environment,
        )
