# All set-up happens here: `make test` and `make demo` work on a fresh machine.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint format clean demo constraints

# constraints.txt pins every version (the container image installs from it too)
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Tests run in TEST_WORKERS pytest-xdist processes. Most of an end-to-end test's time is spent
# waiting on Ray and subprocesses, so two processes keep this 2-core box busy. Tests sharing an
# expensive fixture (the demo run, the 2-node cluster) stay on one worker (xdist_group marks).
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# test-results/junit.xml keeps every failing test's full output (CI prints it)
test: $(STAMP)
	$(PYTEST) --junitxml=test-results/junit.xml

# The edit-test loop: everything but the end-to-end runs marked slow (Ray, MLflow, MTCNN).
test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

# The whole path on embedded defaults: built-in sample faces -> MTCNN -> LMDBs -> 4x4..32x32
# on local Ray, tracked in runs/mlflow.db. Extra settings: make demo ARGS="train.loss=wgan"
demo: $(STAMP)
	$(VENV)/bin/progan run conf/demo.yaml $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info

# After a dependency change in pyproject.toml: install, check, then pin what was installed.
constraints: $(STAMP)
	head -3 constraints.txt > constraints.new
	$(PY) -m pip freeze --exclude-editable | grep -v '^progan-pipeline' >> constraints.new
	mv constraints.new constraints.txt
