# The two contract commands: `make train` and `make test`. Both bootstrap .venv first.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PY := .venv/bin/python
# Offline hub and one torch thread per process are this CPU contract's choice: SafeRL itself sets neither
# (run.torch_threads=0 pins one thread only where there is no GPU; GPU clusters download from the hub).
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export OMP_NUM_THREADS := 1
export MKL_NUM_THREADS := 1
export TOKENIZERS_PARALLELISM := false
export WANDB_MODE ?= disabled
export PIP_DISABLE_PIP_VERSION_CHECK := 1

CONFIG ?= configs/toy.yaml
STAMP := .venv/.saferl-stamp

.PHONY: venv train test test-fast toyworld clean

venv: $(STAMP)

# Rebuilt only when the lock or the package metadata changes; otherwise this is a no-op.
$(STAMP): requirements/cpu.lock pyproject.toml
	@test -x $(PY) || python3 -m venv .venv
	@echo "[saferl] installing the pinned CPU stack into .venv (first run: a few minutes)"
	@$(PY) -m pip install -q --no-deps -r requirements/cpu.lock 2>&1 | { grep -v "^WARNING: Location" || true; }
	@$(PY) -m pip install -q --no-deps -e . 2>&1 | { grep -v "^WARNING: Location" || true; }
	@$(PY) -c "import saferl, torch, transformers, vllm, ray, omegaconf; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	@touch $(STAMP)

train: venv
	$(PY) -m saferl.cli train -c $(CONFIG) $(ARGS)

toyworld: venv
	$(PY) -m saferl.cli toyworld build -c $(CONFIG)

# The import contracts first (pyproject.toml [tool.importlinter]: layers, no toy world in the product, no
# cycles; about a second), then the tests. The 25 slowest are listed at the end, so a CI log shows where the
# suite's time goes.
test: venv
	.venv/bin/lint-imports --no-cache
	$(PY) -m pytest tests --durations=25 $(ARGS)

test-fast: venv
	$(PY) -m pytest tests -m "not slow" $(ARGS)

clean:
	rm -rf .cache runs
