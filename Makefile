# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch to install when $(VENV) has none (a CPU build lies on our CI machines' disk). A torch already in
# $(VENV) is kept (install your CUDA/ROCm build there first, or point VENV at a conda env:
# `make setup VENV=$$CONDA_PREFIX`); `make setup TORCH_SPEC=` installs none and lets pip pick.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo demo-quick test test-slow bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "keeping torch $$($(PY) -c 'import torch; print(torch.__version__)') found in $(VENV)"; \
	elif [ -n "$(TORCH_SPEC)" ]; then \
		echo "$(PY) -m pip install -q $(TORCH_SPEC)"; $(PY) -m pip install -q "$(TORCH_SPEC)"; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/spatia demo --out runs/demo

demo-quick: setup
	$(VENV)/bin/spatia demo --quick --out runs/demo-quick

test: setup
	HF_HUB_OFFLINE=1 HF_EVALUATE_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -m "not slow" -q

test-slow: setup
	HF_HUB_OFFLINE=1 HF_EVALUATE_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -m slow -q

clean:
	rm -rf runs build dist src/*.egg-info .pytest_cache
