# Two entry points: `make demo` runs the main job, then converts its trained Keras weights to PyTorch
# code with --verify on the MNIST test images (which train.py writes with --test-images); `make test`
# runs the tests; `make lint` checks the house rules.
# Both create .venv when it is missing (torch 2.13.0 CPU first, then the project with its extras).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MNIST_DIR ?= ../shared/data/mnist
export MNIST_DIR
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test test-core test-slow lint venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[all,test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) scripts/train.py --out-dir runs/demo --test-images runs/demo/mnist_test.npz
	$(PY) scripts/convert.py runs/demo/keras.safetensors runs/demo/seed_mlp.py --verify \
		--verify-inputs runs/demo/mnist_test.npz

test: venv
	$(PY) -m pytest -q

# The seconds-long tier: tests that import neither Keras nor TensorFlow (graph, exchange file, validation,
# the numpy reference). `pytest --lf` reruns what failed last.
CORE_TESTS := tests/test_graph.py tests/test_fileformat.py tests/test_graph_validation.py tests/test_reference.py tests/test_layer_docs.py
test-core: venv
	$(PY) -m pytest -q $(CORE_TESTS)

test-slow: venv
	$(PY) -m pytest -q -m slow

# House rules (docs/house-rules.md): lint, formatting and types, with the versions pinned in the test extra.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
