# Two entry points (see README): `make quickstart` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: quickstart test setup clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

setup: $(BIN)/.installed

quickstart: $(BIN)/.installed
	$(BIN)/clbench run --config configs/quickstart.yaml --overwrite

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -n auto

clean:
	rm -rf $(VENV) data/synthetic results/quickstart-padim
