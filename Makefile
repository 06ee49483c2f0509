# The two set-up commands of the README:
#   make up    -> installs into .venv and runs the local stack with the demo model answering a request
#   make test  -> installs into .venv (if needed) and runs the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A looser torch pin pulls a multi-GB CUDA build onto CPU-only machines.
TORCH_PIN ?= torch==2.13.0

.PHONY: up test install clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test,servers]"
	touch $@

install: $(VENV)/.installed

up: install
	$(VENV)/bin/ringserve up --demo-request

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .ringserve
