# Two commands do everything on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# pip on this kind of machine prints a warning per package for missing local
# indexes; they are harmless, so keep them out of the way.
PIP_QUIET := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: env browser demo test test-fast bench clean

$(BIN)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing batchsight and its test extras into $(VENV) (torch is large; the first time takes minutes)"
	$(BIN)/python -m pip install -q -e '.[test]' 2>&1 | $(PIP_QUIET)
	@$(BIN)/python -c "import torch, torchvision, prefect, faiss, moto" 
	@touch $@

env: $(BIN)/.installed

demo: env
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/batchsight demo

# The page's browser tests drive Debian's chromium with its chromedriver; as root
# they are installed here, otherwise those tests skip and say how to install them.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium and chromium-driver for the browser tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else \
	    echo "chromium or chromedriver missing (not root): the browser tests will skip; sudo apt-get install chromium chromium-driver"; \
	  fi; \
	fi

test: env browser
	$(BIN)/python -m pytest -q

# The inner loop: every test not marked slow (end-to-end runs against real
# servers, clusters and subprocesses), in under 3 minutes. `make test` runs all.
test-fast: env
	$(BIN)/python -m pytest -q -m "not slow"

bench: env
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) demo-data bench-data .pytest_cache
