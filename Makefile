# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/unpinned demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info

# Benchmarks are not tests: SPEC 8 figures side by side with PgBouncer and a direct
# connection, appended to docs/benchmarks.md (see there). Extra flags: BENCH_ARGS="--note ...".
.PHONY: bench bench-quick
bench: $(STAMP)
	UNPINNED_BENCH_VIA="make bench" $(PY) bench/run.py $(BENCH_ARGS)

bench-quick: $(STAMP)
	UNPINNED_BENCH_VIA="make bench-quick" $(PY) bench/run.py --quick $(BENCH_ARGS)
