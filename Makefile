# Two entry points (see README.md):
#   make demo   set up .venv and run the main job on the shipped demo data
#   make test   set up .venv (with the test dependencies) and run ruff + the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint setup setup-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: requirements.txt | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

$(VENV)/.test: tests/requirements.txt requirements.txt | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q -r tests/requirements.txt
	touch $@

setup: $(VENV)/.runtime
setup-test: $(VENV)/.runtime $(VENV)/.test

demo: setup
	$(BIN)/python main.py --config=configs/loopcot.py --workdir=workdirs/loopcot

lint: setup-test
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) workdirs
