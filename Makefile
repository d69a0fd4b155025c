# converter: make demo | make test | make lint | make bench | make setup
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
# On a machine without an NVIDIA GPU, pin the CPU build of torch so no CUDA wheels are pulled.
CONSTRAINTS := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "-c constraints-cpu.txt")

.PHONY: setup demo convert test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(CONSTRAINTS) -e '.[test]'
	touch $(STAMP)

# the demo set (a tiny base, five adapters) under demo-out/, then configs/demo.yaml on a local Ray
demo: setup
	$(PY) scripts/demo_set.py --workdir demo-out
	$(PY) -m converter run configs/demo.yaml

# any manifest, on a local Ray (or RAY_ADDRESS): make convert MANIFEST=path
convert: setup
	@test -n "$(MANIFEST)" || { echo "usage: make convert MANIFEST=path/to/manifest.yaml"; exit 2; }
	$(PY) -m converter run $(MANIFEST)

test: setup
	$(PY) -m pytest -q tests

# ruff (pyflakes, pycodestyle, import order, docstrings of converter/'s public functions) and the layout rules
lint: setup
	$(PY) -m ruff check converter jobs tests bench scripts
	$(PY) -m pytest -q tests/test_layout.py

bench: setup
	$(PY) bench/bench.py $(BENCH_ARGS)

clean:
	rm -rf demo-out bench-out .pytest_cache
