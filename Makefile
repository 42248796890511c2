# Everything a fresh machine needs: `make demo` (setup + the main job) and `make test`.
# OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads that spin make torch up to 10x slower on a shared machine.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo demo-full test test-slow bench clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m logart.io.kernel || echo "CPU kernel not built: packed layers will use the PyTorch path"
	test -d /usr/share/datasets/fashion-mnist || (command -v apt-get >/dev/null && apt-get install -y -q \
	  dataset-fashion-mnist >/dev/null) || echo "Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/logart demo

demo-full: setup
	$(VENV)/bin/logart demo --full

test: setup
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q -m "not slow"

test-slow: setup
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q -m slow

bench: setup
	$(PY) bench/codebook_speed.py

clean:
	rm -rf $(VENV) build *.egg-info
