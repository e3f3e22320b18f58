# The two commands a newcomer needs:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

.PHONY: setup demo test lint typecheck unit docs bench clean

setup: $(VENV)/.bootstrapped

$(VENV)/.bootstrapped: pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh
	touch $@

demo: setup
	bash scripts/demo.sh

test: setup lint typecheck
	bash scripts/run_tests.sh

lint: setup
	$(BIN)/ruff check src tests examples scripts bench
	$(BIN)/ruff format --check src tests examples scripts bench

typecheck: setup
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest -q tests/unit tests/examples

docs: setup
	$(PY) -m microagent.compiler.specdoc > docs/spec.md

bench: setup
	$(PY) bench/bench_plan.py
	$(PY) bench/bench_cli.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# The fault campaigns (tests/faults) at full scale; rewrites docs/reliability.md.
.PHONY: faults
faults: setup
	nice -n 10 $(PY) scripts/faults.py

# Mutation testing of the guard modules (docs/testing.md): slow, never part of `make test`.
# MODULES="loader network" runs some of them; MUTATION_ARGS="--jobs 2" passes options on.
.PHONY: mutation
MODULES ?=
MUTATION_ARGS ?=
mutation: setup
	$(PY) -c "import mutmut" 2>/dev/null || $(BIN)/pip install -e '.[mutation]'
	$(PY) scripts/mutation/run.py $(MUTATION_ARGS) $(MODULES)
