"""docs/layers.md is generated from the kinds' docstrings (scripts/layer_docs.py): it must be what
the script writes now, so that the page says what the code does. Imports neither Keras nor torch."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "layer_docs.py"


def load_script():
    spec = importlib.util.spec_from_file_location("layer_docs", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layers_page_is_up_to_date():
    layer_docs = load_script()
    assert (ROOT / "docs" / "layers.md").read_text() == layer_docs.page(), (
        "docs/layers.md is stale: run python scripts/layer_docs.py"
    )


def test_every_kind_and_family_is_on_the_page():
    layer_docs = load_script()
    text = layer_docs.page()
    import exchange.kinds

    kinds = layer_docs.builtin_kinds()
    assert len(kinds) > 100 and all(type(kind).__module__.startswith("exchange.kinds.") for kind in kinds)
    # every kind that a module of exchange/kinds/ registers (another test may have added its own)
    for kind in exchange.kinds.KINDS.values():
        if type(kind).__module__.startswith("exchange.kinds."):
            assert f"(`{kind.kind}`)" in text
    assert set(layer_docs.kinds_by_module()) == {module for module, _ in layer_docs.FAMILIES}


def test_check_flag_reports_a_stale_page(tmp_path, monkeypatch):
    layer_docs = load_script()
    stale = tmp_path / "layers.md"
    stale.write_text("# old\n")
    monkeypatch.setattr(layer_docs, "PAGE", stale)
    monkeypatch.setattr(layer_docs, "ROOT", tmp_path)
    assert layer_docs.main(["--check"]) == 1
    assert layer_docs.main([]) == 0
    assert layer_docs.main(["--check"]) == 0


def test_generating_imports_no_framework():
    code = (  # the page is written, not only the script imported
        "import runpy, sys; runpy.run_path(%r, run_name='x')['page'](); "
        "print('keras' in sys.modules, 'torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code % str(SCRIPT)], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.split() == ["False", "False"]


def test_a_kind_registered_from_a_kinds_file_leaves_the_page_as_it_is(monkeypatch):
    """A `--kinds` file's kind (registered in the same process, as tests/test_custom_kinds.py
    does) is not one of the project's: the page stays the committed one."""
    import exchange.kinds

    layer_docs = load_script()
    before = layer_docs.page()
    outsider = type(
        "Outsider",
        (exchange.kinds.LayerKind,),
        {"__module__": "my_kinds", "kind": "custom.outsider", "keras_classes": ("Outsider",), "passes_mask": True},
    )
    monkeypatch.setitem(exchange.kinds.KINDS, "custom.outsider", outsider())
    assert layer_docs.page() == before
