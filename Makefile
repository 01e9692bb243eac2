# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
# Both create .venv when missing and install the package into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

export TF_USE_LEGACY_KERAS := 1
export TF_CPP_MIN_LOG_LEVEL := 2
# oneDNN kernels: TF 2.16 enables them only on AVX512-VNNI/AMX CPUs; on AVX2 a training
# step is 4-5x slower without them (bireal_tf/_keras_setup.py sets the same default).
export TF_ENABLE_ONEDNN_OPTS ?= 1

.PHONY: install test test-slow demo bench clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The fast suite (3:18 measured on 2 cores from a fresh clone, install included, 2026-12-07; --no-compile
# above: Python compiles only the modules a test imports, 30 s less than compiling all of them).
test: $(STAMP)
	$(PY) -m pytest -n 2 --durations=10 -m "not slow" $(PYTEST_ARGS) tests

# The slow tests (23:03 for 62 tests on 2 cores, 2026-12-07): the demo (and its portable file), kill/resume, distribution, the notebook, the
# large nets, runs and conversions of 30 s or more, long fuzzing, the benchmark smoke run. CI runs both.
test-slow: $(STAMP)
	$(PY) -m pytest -n 2 --durations=10 -m slow $(PYTEST_ARGS) tests

demo: $(STAMP)
	$(PY) -m bireal_tf.recipes.train r18_adam --demo

bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) runs
