# Two entry points, each doing all the set-up on a fresh machine (see README):
#   make demo   build the embedded offline benchmark and compare ACE with FusionBench's baselines
#   make test   run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# re-install whenever the pinned set or the project metadata changes
STAMP := $(VENV)/.installed-$(shell cat constraints.txt pyproject.toml | sha1sum | cut -c1-12)

.PHONY: install demo test

$(STAMP): constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -c constraints.txt -e ".[test]"
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/fusion-bench-ace demo

test: install
	$(BIN)/python -m pytest
