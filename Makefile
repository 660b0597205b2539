# megatron_sayo: every target creates/refreshes the local virtual environment first.
# torch is installed before the project; TORCH picks the wheel (a CPU-only machine without a local CPU wheel needs
# TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu", else pip takes the CUDA build).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
EXTRAS ?= test
BIN    := $(VENV)/bin

.PHONY: venv demo ablation test test-fast compat gpu-check clean
venv: $(VENV)/.installed

# SYSTEM_TORCH=1 (inside a container whose torch, Transformer Engine and flash-attn belong together): the venv sees
# the system's site-packages, the torch found there is kept (pinned by a constraint), and only what is missing
# is installed.
ifeq ($(SYSTEM_TORCH),1)
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" || { echo "SYSTEM_TORCH=1: no torch importable by $(PYTHON)"; exit 1; }
	$(BIN)/python scripts/requirements.py --keep-installed torch > $(VENV)/keep-torch.txt
	$(BIN)/python scripts/requirements.py --extras $(EXTRAS) --except torch > $(VENV)/requirements.txt
	$(BIN)/python -m pip install -q -c $(VENV)/keep-torch.txt -r $(VENV)/requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@
else
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@
endif

demo: venv                      ## the embedded default: tiny Qwen2.5-VL SAYO GRPO run on CPU
	$(BIN)/python -m megatron_sayo.demo

ablation: venv                  ## the paper's Table 2 on CPU: 3 arms x 2 toys x 3 seeds, ~17 min (runs/ablation/summary.md)
	$(BIN)/python -m megatron_sayo.experiments.ablation --out runs/ablation

test: venv                      ## the whole test suite (what CI runs)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -ra

test-fast: venv                 ## the in-process tests (no slow, slurm or multi-process ones): about a minute
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not slow and not slurm and not multiproc"

compat:                         ## the support matrix (Python 3.11/3.13, torch, megatron-core): compat.json, docs/compat.md
	bash scripts/compat.sh

gpu-check:                      ## GPU acceptance run on a CUDA machine (own venv, <= 8 min): gpu_check.json
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) .cache runs

include mk/slurm.mk
