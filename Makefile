# make train   installs what is missing and runs the main job on its embedded default
# make test    installs what is missing (system packages too, as root), builds, lints, runs the CPU suite
PYTHON        ?= python3
DUALFLOW_CUDA ?= AUTO
BUILD_DIR     ?= build/cuda
JOBS          ?= $(shell nproc 2>/dev/null || echo 2)
STAMP         := .make
PYTEST_ARGS   ?=

export PYTHON DUALFLOW_CUDA
# NVLink multicast stays off in everything started from here (it can take a shared host's GPUs out of
# service); a value set by the user is kept.
NCCL_NVLS_ENABLE ?= 0
TORCH_SYMM_MEM_DISABLE_MULTICAST ?= 1
NVSHMEM_DISABLE_NVLS ?= 1
export NCCL_NVLS_ENABLE TORCH_SYMM_MEM_DISABLE_MULTICAST NVSHMEM_DISABLE_NVLS

.PHONY: train test test-gpu deps sysdeps build lint bench clean

# The install stamps count only while the installed dualflow is this checkout: an editable install
# made from another clone would otherwise be imported here without a word.
INSTALLED := $(shell cd / && $(PYTHON) -I -c "import dualflow, os; print(os.path.dirname(os.path.dirname(os.path.abspath(dualflow.__file__))))" 2>/dev/null)
ifneq ($(INSTALLED),$(CURDIR))
$(shell rm -f $(STAMP)/python-dev $(STAMP)/python-run)
endif

$(STAMP)/python-dev: pyproject.toml scripts/bootstrap.sh
	@mkdir -p $(STAMP)
	scripts/bootstrap.sh python dev,mpi,plot,hf
	@touch $@

$(STAMP)/python-run: pyproject.toml scripts/bootstrap.sh
	@mkdir -p $(STAMP)
	scripts/bootstrap.sh python plot
	@touch $@

deps: $(STAMP)/python-dev

sysdeps:
	scripts/bootstrap.sh system

# libdualflow_cuda into build/cuda (where dualflow/_cuda.py finds it in a checkout). With
# DUALFLOW_CUDA=OFF an earlier build is removed so that the tree behaves as if none had been made.
build: deps
	@if [ "$(DUALFLOW_CUDA)" = "OFF" ]; then rm -f $(BUILD_DIR)/libdualflow_cuda.so; \
	  echo "build: DUALFLOW_CUDA=OFF, no CUDA library"; \
	else cmake -S . -B $(BUILD_DIR) -DDUALFLOW_CUDA=$(DUALFLOW_CUDA) -DCMAKE_BUILD_TYPE=Release >/dev/null && \
	  cmake --build $(BUILD_DIR) -j $(JOBS); fi

lint: deps
	$(PYTHON) -m ruff check .

# The CPU suite runs with the GPUs hidden: its Triton tests run on the CPU under Triton's interpreter, which
# tests/conftest.py turns on only where no GPU is visible. Where GPUs are present the gpu tiers run after it.
test: deps sysdeps build lint
	@start=$$(date +%s); \
	CUDA_VISIBLE_DEVICES= $(PYTHON) -m pytest $(PYTEST_ARGS); rc=$$?; \
	echo "make test: the CPU suite finished in $$(( $$(date +%s) - start )) s"; \
	if [ $$rc -eq 0 ] && $(PYTHON) -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then \
	  $(PYTHON) -m pytest -m "gpu or multigpu" $(PYTEST_ARGS); rc=$$?; \
	  echo "make test: the gpu tiers finished in $$(( $$(date +%s) - start )) s in all"; fi; \
	exit $$rc

test-gpu: deps build
	$(PYTHON) -m pytest -m "gpu or multigpu" $(PYTEST_ARGS)

# The embedded default: 4 gloo processes on a CPU (2 pipeline stages x 2 expert-parallel ranks), a few
# hundred steps on the standard library's sources; configs/gpu*.toml for GPUs (README).
train: $(STAMP)/python-run
	$(PYTHON) -m dualflow launch --nproc-per-node 4 --log-dir runs/tiny_moe/logs -- -m dualflow train configs/tiny_moe.toml --fresh

bench: deps build
	$(PYTHON) -m dualflow bench

clean:
	rm -rf build $(STAMP) .pytest_cache
