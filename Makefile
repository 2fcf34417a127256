# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

# `pip install` compiles the hot path (the modules in unpinned/compiled.txt) with mypyc when
# it can, and installs pure Python when it cannot (setup.py). An edit to one of those modules
# reinstalls, so the compiled build never lags behind its source.
COMPILED_SRC := $(shell grep -v '^ *\#' unpinned/compiled.txt)

$(STAMP): pyproject.toml setup.py unpinned/compiled.txt $(COMPILED_SRC)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@$(PY) -c "import unpinned; print('unpinned installed:', unpinned.build_description())"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/unpinned demo

test: $(STAMP) browser
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q
	@# The unit tests once more against the interpreted .py files (unpinned/__init__.py), so
	@# the pure-Python fallback stays tested; tests marked interpreted_only run only here.
	UNPINNED_PURE_PYTHON=1 $(PY) -m pytest -q tests/unit

# The live-page test renders the page in headless Chromium (Debian's package). Installed
# here when missing and possible (root with apt-get); otherwise that one test is skipped.
.PHONY: browser
browser:
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  if apt-get install -y -q chromium >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1); then \
	    echo "installed chromium (Debian) for the live-page test"; \
	  else echo "could not install chromium: the live-page test will be skipped"; fi; \
	else echo "no chromium (root and apt-get needed to install it): the live-page test will be skipped"; fi

clean:
	rm -rf $(VENV) build *.egg-info
	find unpinned -name '*.so' -delete

# Benchmarks are not tests: SPEC 8 figures side by side with PgBouncer and a direct
# connection, appended to docs/benchmarks.md (see there). Extra flags: BENCH_ARGS="--note ...".
.PHONY: bench bench-quick
bench: $(STAMP)
	UNPINNED_BENCH_VIA="make bench" $(PY) bench/run.py $(BENCH_ARGS)

bench-quick: $(STAMP)
	UNPINNED_BENCH_VIA="make bench-quick" $(PY) bench/run.py --quick $(BENCH_ARGS)

# PostgreSQL's regression scripts run directly and through the proxy, diffed per script;
# fails on any difference compat/expected_differences.toml does not list (see docs/compat.md).
# Needs ../shared/compat/pg_regress or UNPINNED_PG_REGRESS. Extra flags: COMPAT_ARGS="--pool-size 5 guc".
.PHONY: compat
compat: $(STAMP)
	$(PY) compat/run.py $(COMPAT_ARGS)

# Coverage-guided fuzzing of the pure code (fuzz/targets.py) with atheris, FUZZ_SECONDS per
# target. New interesting inputs go to fuzz/work/ (not kept); a crash is written into the
# target's corpus, fuzz/corpus/<target>/crash-<sha1>, which tests/test_fuzz.py then replays.
# `make test` runs each target for UNPINNED_FUZZ_SECONDS (default 2).
FUZZ_SECONDS ?= 120
FUZZ_TARGETS ?= startup backend_fields auth relay
.PHONY: fuzz
fuzz: $(STAMP)
	@status=0; for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/work/$$t; echo "== fuzzing $$t for $(FUZZ_SECONDS) s"; \
	  $(PY) fuzz/run.py $$t -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 \
	    -print_final_stats=1 -artifact_prefix=fuzz/corpus/$$t/ fuzz/work/$$t fuzz/corpus/$$t \
	    2>fuzz/work/$$t.log || { status=1; echo "   crash in $$t: see fuzz/work/$$t.log and fuzz/corpus/$$t/crash-*"; }; \
	  grep -E "^Done|stat::number_of_executed_units|stat::average_exec_per_sec" fuzz/work/$$t.log | sed 's/^/   /'; \
	done; exit $$status

# The fault suite, longer than its run in make test (CHAOS_SECONDS, default 120), and an hour of
# mixed load with faults and the proxy's memory sampled every 10 s (SOAK_SECONDS). Not in CI.
.PHONY: chaos soak
CHAOS_SECONDS ?= 120
SOAK_SECONDS ?= 3600
chaos: $(STAMP)
	$(PY) tests/support/chaos.py $(CHAOS_SECONDS)

soak: $(STAMP)
	$(PY) tests/support/chaos.py $(SOAK_SECONDS) --soak

# Large client messages at full size (issue 16): a 100 MB Query, 4 x 60 MB at once.
.PHONY: bench-large
bench-large: $(STAMP)
	$(PY) bench/large.py $(BENCH_ARGS)
