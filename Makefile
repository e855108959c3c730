# Two commands on a fresh machine: `make run` (the study, small CPU setting) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
FULL   ?=
CONFIG ?= $(if $(FULL),configs/full.yaml,configs/small.yaml)
# The local archive beside the project is used when present; else $MAMMO_TF_DATA; else the official origin.
MAMMO_TF_DATA ?= $(firstword $(wildcard $(abspath ../shared/data/mini-mias/all-mias.tar.gz)))
export MAMMO_TF_DATA
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: run test notebooks bench report clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/mammo-tf run --config $(CONFIG)

test: $(BIN)/.installed
	$(BIN)/python -m pytest

bench: $(BIN)/.installed
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf runs .pytest_cache
