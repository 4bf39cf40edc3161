# Two entry points: `make run` (install + serve the bundled model) and `make test`
# (install + the whole test suite). Each builds its own virtual environment in .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test tools openapi clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,ray]'
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/medexplain serve --host $(HOST) --port $(PORT)

test: $(VENV)/.installed-test
	bash scripts/system-deps.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# PyTorch for tools/ (training the demo model, fixtures); never needed to serve or test.
tools: $(VENV)/.installed-test
	$(BIN)/pip install --quiet -e '.[tools]'

openapi: $(VENV)/.installed
	$(BIN)/medexplain openapi --out openapi/openapi.json

clean:
	rm -rf $(VENV) .pytest_cache
