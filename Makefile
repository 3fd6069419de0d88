# Two entry points: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv when it is missing (torch 2.13.0 CPU first, then the project with its extras).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MNIST_DIR ?= ../shared/data/mnist
export MNIST_DIR
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test test-slow venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[all,test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) scripts/train.py --out-dir runs/demo

test: venv
	$(PY) -m pytest -q

test-slow: venv
	$(PY) -m pytest -q -m slow
