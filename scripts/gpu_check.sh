#!/usr/bin/env bash
# GPU acceptance run (issue 19), from a fresh copy of the repository on a CUDA machine:
#   1. an environment: $GPU_CHECK_VENV (default .venv-gpu); a CUDA build of $TORCH_SPEC unless one is already
#      importable (a system torch with CUDA is reused through --system-site-packages), then this project with
#      the gpucheck extra; Transformer Engine from binary wheels only, given TE_INSTALL_S (120) seconds, else
#      skipped with the reason (and removed again if it breaks megatron-core's import);
#   2. the checks (python -m megatron_sayo.testing.gpu_check), each in its own process under its own limit,
#      within what is left of GPU_CHECK_TOTAL_S (480) seconds;
#   3. gpu_check.json (one entry per check: status, figures, seconds, reason) and gpu_check.log.
# Usage: scripts/gpu_check.sh [runner options, e.g. --only parity_tiny,region_mass]   (or: make gpu-check)
# Offline machines: point PIP_FIND_LINKS / PIP_INDEX_URL at a wheelhouse, or pre-install torch system-wide.
# GPU_CHECK_NO_INSTALL=1: install nothing, use $GPU_CHECK_VENV/bin/python as it is (a prepared environment;
# without CUDA the GPU checks skip with the reason: the CPU tests run the script this way).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
TOTAL_S=${GPU_CHECK_TOTAL_S:-480}
VENV=${GPU_CHECK_VENV:-.venv-gpu}
PYTHON=${GPU_CHECK_PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TE_INSTALL_S=${TE_INSTALL_S:-120}
OUT=${GPU_CHECK_OUT:-gpu_check.json}
LOG=${OUT%.json}.log
: > "$LOG"
say() { echo "[gpu-check] $*" | tee -a "$LOG"; }
elapsed() { echo $(( $(date +%s) - START )); }

setup_failed() {  # a JSON summary even when no check could start
    say "SETUP FAILED: $1"
    "$PYTHON" - "$OUT" "$1" "$(elapsed)" <<'PY'
import json, os, sys
out, reason, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
summary = {"setup": "failed", "reason": reason, "seconds": seconds, "checks": [], "pass": 0, "fail": 1, "skip": 0}
tmp = f"{out}.tmp-{os.getpid()}"
with open(tmp, "w") as f:
    json.dump(summary, f, indent=2)
os.replace(tmp, out)
PY
    exit 1
}

cuda_torch() {  # does this python import a torch that sees a GPU?
    "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >>"$LOG" 2>&1
}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    | tee -a "$LOG" || say "nvidia-smi not found"

if [ "${GPU_CHECK_NO_INSTALL:-0}" = "1" ]; then
    PY="$VENV/bin/python"
    [ -x "$PY" ] || setup_failed "GPU_CHECK_NO_INSTALL=1 but $PY does not exist"
    cuda_torch "$PY" || say "no CUDA torch in $VENV: the GPU checks will be skipped"
    export GPU_CHECK_SETUP_NOTES="installation skipped (GPU_CHECK_NO_INSTALL=1, $PY)"
else
    if [ ! -x "$VENV/bin/python" ]; then
        SITE=""
        if cuda_torch "$PYTHON"; then SITE="--system-site-packages"; say "reusing the system's CUDA torch"; fi
        "$PYTHON" -m venv $SITE "$VENV" >>"$LOG" 2>&1 || setup_failed "could not create $VENV with $PYTHON"
    fi
    PY="$VENV/bin/python"
    export PIP_DISABLE_PIP_VERSION_CHECK=1
    if ! cuda_torch "$PY"; then
        say "installing $TORCH_SPEC (CUDA build from the index) ..."
        timeout 300 "$PY" -m pip install -q "$TORCH_SPEC" >>"$LOG" 2>&1 \
            || setup_failed "pip install $TORCH_SPEC failed or took over 300 s (offline? see $LOG)"
        cuda_torch "$PY" || setup_failed "torch installed but torch.cuda.is_available() is False (driver? see $LOG)"
    fi
    say "torch ready after $(elapsed) s"
    timeout 240 "$PY" -m pip install -q -e ".[gpucheck]" >>"$LOG" 2>&1 \
        || setup_failed "pip install -e .[gpucheck] failed or took over 240 s (see $LOG)"
    "$PY" -c "import megatron.core, transformers, megatron_sayo" >>"$LOG" 2>&1 \
        || setup_failed "the project does not import after installation (see $LOG)"
    say "project ready after $(elapsed) s"

    TE_NOTE=""
    if [ "${GPU_CHECK_TE:-1}" = "0" ]; then
        TE_NOTE="Transformer Engine not attempted (GPU_CHECK_TE=0)"
    elif "$PY" -c "import transformer_engine.pytorch" >>"$LOG" 2>&1; then
        TE_NOTE="Transformer Engine already installed"
    else
        say "trying Transformer Engine from binary wheels (at most $TE_INSTALL_S s) ..."
        if timeout "$TE_INSTALL_S" "$PY" -m pip install -q --only-binary=:all: "transformer_engine[pytorch]" >>"$LOG" 2>&1; then
            TE_NOTE="Transformer Engine installed from binary wheels"
        else
            TE_NOTE="Transformer Engine skipped: no binary wheel installed within $TE_INSTALL_S s (see $LOG)"
        fi
        if ! "$PY" -c "import megatron.core, transformer_engine.pytorch" >>"$LOG" 2>&1; then
            "$PY" -m pip uninstall -q -y transformer_engine transformer_engine_torch transformer_engine_cu12 \
                >>"$LOG" 2>&1 || true
            case "$TE_NOTE" in *skipped*) ;; *) TE_NOTE="Transformer Engine removed: it installed but does not import";; esac
        fi
    fi
    say "$TE_NOTE"
    export GPU_CHECK_SETUP_NOTES="$TE_NOTE; setup took $(elapsed) s"
fi

LEFT=$(( TOTAL_S - $(elapsed) ))
[ "$LEFT" -lt 60 ] && LEFT=60
say "running the checks with a budget of $LEFT s"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} "$PY" -m megatron_sayo.testing.gpu_check --out "$OUT" --budget-s "$LEFT" "$@" \
    2>&1 | tee -a "$LOG"
STATUS=${PIPESTATUS[0]}
say "done in $(elapsed) s: $OUT"
exit "$STATUS"
