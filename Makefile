# Two entry points for a fresh machine with Python 3.11 (each creates .venv if missing):
#   make demo   -- install, then run the main job (scripts/demo.py)
#   make test   -- install, then run lint + the test suite
#   make demo-runtimes -- the demo's models in LiteRT and ONNX Runtime (~10 min, after make demo)
#   make test-torch -- the torchvision conversion tests in .venv-torch (torch + torchvision)
#   make docs   -- the documentation site (mkdocs build --strict into build/site; docs/, mkdocs.yml)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VENV := .venv-torch
TORCH_BIN := $(TORCH_VENV)/bin

.PHONY: demo demo-runtimes test test-torch docs lint install clean

$(BIN)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

install: $(BIN)/.installed

$(TORCH_BIN)/.installed: requirements.txt requirements-torch.txt pyproject.toml
	test -x $(TORCH_BIN)/python || $(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_BIN)/python -m pip install --quiet --upgrade pip
	$(TORCH_BIN)/python -m pip install --quiet -r requirements-torch.txt
	$(TORCH_BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# Not part of `make test`: torch is a test-only reference (~5 GB), kept out of .venv.
test-torch: $(TORCH_BIN)/.installed
	$(TORCH_BIN)/python -m pytest -q tests/with_torch

# The API reference is generated from the docstrings at build time (docs/_hooks/reference.py);
# --strict turns every warning (a broken link or reference, a public name without an entry)
# into a failure. NO_MKDOCS_2_WARNING silences mkdocs-material's notice about MkDocs 2.
$(BIN)/.docs-installed: requirements-docs.txt $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -r requirements-docs.txt
	touch $@

docs: $(BIN)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

demo: install
	$(BIN)/python scripts/demo.py

# The demo's two models (reused from runs/demo when `make demo` trained them) in LiteRT and
# ONNX Runtime next to kure_jax's PTQ (configs/sweeps/runtimes.py; docs/results.md).
demo-runtimes: install
	$(BIN)/python scripts/demo.py --sweep configs/sweeps/runtimes.py --out runs/demo/eval_runtimes

clean:
	rm -rf $(VENV) $(TORCH_VENV) .pytest_cache .ruff_cache .hypothesis
