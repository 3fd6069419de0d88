"""Generated PyTorch code, checked the way a user would run it: in a fresh process where
tensorflow, keras and this project cannot be imported, loading its own weights, eagerly and
after `torch.export`."""

import json
import subprocess
import sys
import textwrap

import numpy as np
from support import ROOT

from exchange import cli, keras_adapter, torch_adapter

# Runs in the child: imports the generated file alone, compares, exports.
RUNNER = textwrap.dedent("""
    import importlib.machinery, importlib.util, json, os, sys
    BLOCKED = ("tensorflow", "keras", "tf_keras", "exchange", "frameworks")

    class Blocker:
        # Found (torch._dynamo only asks whether modules exist) but never loadable.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                return importlib.machinery.ModuleSpec(name, self)

        def create_module(self, spec):
            raise ImportError(f"{spec.name} is blocked in this test")

        def exec_module(self, module):
            raise ImportError(f"{module.__name__} is blocked in this test")

    sys.meta_path.insert(0, Blocker())
    PROJECT = {ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "scripts")}
    sys.path[:] = [entry for entry in sys.path if os.path.realpath(entry or ".") not in PROJECT]
    import numpy as np, torch

    code_path, class_name, data_path = sys.argv[1:4]
    spec = importlib.util.spec_from_file_location("generated", code_path)
    generated = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generated)
    model = getattr(generated, class_name)()
    model.load_state_dict(generated.load(code_path[:-3] + ".safetensors"), strict=True)
    model.eval()
    data = np.load(data_path)
    inputs = torch.from_numpy(data["inputs"])
    inputs = inputs.permute(0, inputs.ndim - 1, *range(1, inputs.ndim - 1)) if inputs.ndim > 2 else inputs
    expected = torch.from_numpy(data["expected"])
    def keras_layout(output):
        return output.permute(0, *range(2, output.ndim), 1) if output.ndim > 2 else output
    with torch.no_grad():
        eager = keras_layout(model(inputs))
        exported = torch.export.export(model, (inputs,))
        from_export = keras_layout(exported.module()(inputs))
    print(json.dumps({"eager": float((eager - expected).abs().max()),
                      "exported": float((from_export - expected).abs().max()),
                      "scale": float(expected.abs().max()),
                      "argmax_equal": bool((eager.argmax(-1) == expected.argmax(-1)).all()),
                      "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}))
""").replace("ROOT", repr(str(ROOT)))


def run_generated(code_path, class_name, inputs, expected, tmp_path) -> dict:
    data_path = tmp_path / "data.npz"
    np.savez(data_path, inputs=inputs, expected=expected)
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, str(code_path), class_name, str(data_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def check_generated_file(code_path):
    """Compiles, and pyflakes (the linter CI installs) finds nothing to say."""
    subprocess.run([sys.executable, "-m", "py_compile", str(code_path)], check=True)
    lint = subprocess.run([sys.executable, "-m", "pyflakes", str(code_path)], capture_output=True, text=True)
    assert lint.returncode == 0 and not lint.stdout.strip(), lint.stdout


def check_generated_code(keras_model, inputs, tmp_path, tolerance: float = 1e-5):
    """The model saved as .keras, converted to Python: the generated module computes Keras's outputs."""
    (expected,) = keras_adapter.predict(keras_model, inputs)
    keras_path = tmp_path / "model.keras"
    keras_model.save(keras_path)
    code_path = tmp_path / "model.py"
    graph = cli.convert(keras_path, code_path)
    check_generated_file(code_path)
    data_path = tmp_path / "data.npz"
    np.savez(data_path, inputs=inputs[0], expected=expected)
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, str(code_path), torch_adapter.class_name(graph.name), str(data_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["eager"] <= tolerance * max(1.0, outcome["scale"]), outcome
    assert outcome["exported"] <= tolerance * max(1.0, outcome["scale"]), outcome
    return graph
