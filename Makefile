# The two entry points: `make demo` and `make test`. Each creates .venv if missing
# and installs the project into it. Torch is pinned to a build that has a matching
# torchvision on this kind of machine; override with `make test TORCH_SPEC=...`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Third-party SNN libraries used only by the interoperability tests and benchmarks;
# --no-deps because their pins clash with ours (SpikingJelly pulls torchaudio etc.).
INTEROP_SPEC ?= snntorch==1.0.0 spikingjelly==2.0.0 loguru
# PyTorch Lightning for the DASSDPCallback tests: installed WITH its deps (it keeps our torch;
# check with `pip install --dry-run` when changing the pin).
LIGHTNING_SPEC ?= lightning==2.6.6
# submitit for `dassdp compare --launcher local|slurm` (the `cluster` extra) and its tests.
CLUSTER_SPEC ?= submitit==1.5.4
# Wheels for scripts/gpu_check.sh on a GPU machine without network, into the git-ignored
# .whl/ (carry it with the checkout): pytest and its dependencies (a GPU image may lack them),
# SpikingJelly 2.0.0 and loguru (bench throughput's comparison row). All pure Python, fetched
# without their dependencies; the check installs, offline, only those the machine lacks.
WHEELS_SPEC ?= pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 pygments==2.21.0 \
	spikingjelly==2.0.0 loguru==0.7.3
STAMP := $(VENV)/.dassdp-installed

.PHONY: demo test test-slow lint format install clean-venv wheels

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml Makefile
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps $(INTEROP_SPEC)
	$(PY) -m pip install --quiet $(LIGHTNING_SPEC)
	$(PY) -m pip install --quiet $(CLUSTER_SPEC)
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST: baseline vs DA-SSDP over 3 paired seeds, then the report (~10 min on 2 cores).
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m dassdp demo --compare

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

# the long end-to-end tests (marked slow; CI runs them after `make test`)
test-slow: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --dest .whl $(WHEELS_SPEC)

clean-venv:
	rm -rf $(VENV)
