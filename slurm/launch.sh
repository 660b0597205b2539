#!/usr/bin/env bash
# The one launcher behind slurm/*.sbatch. It runs inside the batch step of an allocation:
#
#   launch.sh train [CONFIG] [key=value ...]   GRPO training: validate once, one rank per GPU through srun,
#                                              resume from run_dir, checkpoint + requeue on preemption
#   launch.sh run COMMAND [ARG ...]            one task (converter, evaluation) through srun
#
# The sbatch scripts `exec` this file, so it *is* the batch shell and receives `--signal=B:USR1@T`.
#
# Environment (all optional; sbatch exports the submitting shell's environment, srun passes it on):
#   SAYO_ROOT             repository root (the sbatch scripts find it from the submitted script's path)
#   SAYO_DEFAULT_CONFIG   config used when the first argument is not a config (set by each sbatch script)
#   SAYO_CPU=1            CPU mode (gloo, no NCCL/CUDA settings); automatic when the job has no GPUs
#   SAYO_GPU_MEMORY       memory per GPU for the pre-flight memory check, e.g. 80GB (default: the smallest GPU
#                         nvidia-smi reports on the first node)
#   SAYO_PYTHON           interpreter (default: python of $SAYO_ROOT/.venv when present, else `python`)
#   SAYO_MAX_RESTARTS     stop requeueing after this many restarts (default 50)
#   CONTAINER_IMAGE       run every step in this image via pyxis/enroot (`srun --container-image`)
#   CONTAINER_MOUNTS      extra mounts, "src:dst[,src:dst...]"; the repository is always mounted at its path
#   MASTER_ADDR / MASTER_PORT   rendezvous of rank 0 (default: first node of the job, port from the job id)
#   NCCL_* / TORCH_NCCL_*       see "NCCL" below
set -euo pipefail

die() { echo "launch.sh: ERROR: $*" >&2; exit 2; }
say() { echo "[launch $(date +%H:%M:%S)] $*"; }

[[ -n ${SLURM_JOB_ID:-} ]] || die "run me through sbatch (e.g. sbatch slurm/train_7b.sbatch); SLURM_JOB_ID is not set"
MODE=${1:-}; shift || true
ROOT=${SAYO_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
[[ -f $ROOT/megatron_sayo/__init__.py ]] || die "SAYO_ROOT=$ROOT is not the megatron_sayo repository"
ROOT=$(cd "$ROOT" && pwd)

# ---------------------------------------------------------------------------------------------------------
# Job shape: one task per GPU. `--gpus-per-node=0` (or SAYO_CPU=1) makes it a CPU job (gloo).
# ---------------------------------------------------------------------------------------------------------
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
WORLD=${SLURM_NTASKS:-1}
GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-0}
GPUS_PER_NODE=${GPUS_PER_NODE##*:}            # "h100:8" -> "8"
if [[ ${SAYO_CPU:-} == 1 || $GPUS_PER_NODE == 0 ]]; then
    CPU_MODE=1
else
    CPU_MODE=0
fi

# ---------------------------------------------------------------------------------------------------------
# Python: the repository's venv unless a container or SAYO_PYTHON says otherwise. PYTHONPATH makes the
# package importable from a checkout mounted into a container as well.
# ---------------------------------------------------------------------------------------------------------
if [[ -n ${SAYO_PYTHON:-} ]]; then
    PY=$SAYO_PYTHON
elif [[ -z ${CONTAINER_IMAGE:-} && -x $ROOT/.venv/bin/python ]]; then
    PY=$ROOT/.venv/bin/python
else
    PY=python
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

# ---------------------------------------------------------------------------------------------------------
# Container (optional, pyxis): every srun step, the config check included, runs in the image.
# ---------------------------------------------------------------------------------------------------------
CONTAINER_ARGS=()
if [[ -n ${CONTAINER_IMAGE:-} ]]; then
    mounts=$ROOT:$ROOT${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}
    CONTAINER_ARGS=(--container-image="$CONTAINER_IMAGE" --container-mounts="$mounts"
                    --container-workdir="$ROOT")
fi

# ---------------------------------------------------------------------------------------------------------
# Rendezvous: rank 0 on the first node; the port depends on the job id and the restart count, so a
# requeued job does not meet a socket of its previous run in TIME_WAIT. Ranks read RANK/WORLD from
# SLURM_PROCID/SLURM_NTASKS (megatron_sayo.distributed.runtime.read_launch_env); torchrun's variables would win, so
# they are cleared.
# ---------------------------------------------------------------------------------------------------------
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
MASTER_PORT=${MASTER_PORT:-$((20000 + (SLURM_JOB_ID + 997 * ${SLURM_RESTART_COUNT:-0}) % 20000))}
export MASTER_ADDR MASTER_PORT

# ---------------------------------------------------------------------------------------------------------
# NCCL (GPU jobs). Defaults below are safe on InfiniBand and Ethernet clusters; everything is an env var
# that you may set before `sbatch` to override it:
#   NCCL_DEBUG=INFO                 print the topology/transport NCCL picked (default WARN)
#   NCCL_SOCKET_IFNAME=ib0|eth0|^lo,docker0   interface for NCCL's bootstrap/socket traffic (not set by us)
#   NCCL_IB_HCA=mlx5_0,mlx5_1       InfiniBand adapters to use (not set: NCCL picks all)
#   NCCL_IB_DISABLE=1               no InfiniBand (Ethernet-only clusters)
#   NCCL_IB_TIMEOUT=22              IB verbs timeout exponent; large clusters need more than the default
#   NCCL_NET_GDR_LEVEL / NCCL_P2P_LEVEL   GPUDirect RDMA / NVLink policy, cluster specific
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1   a failed/hung collective aborts the rank (and, through
#                                   srun --kill-on-bad-exit, the step) instead of hanging until the timeout
#   CUDA_DEVICE_MAX_CONNECTIONS=1   megatron-core needs it for ordered TP communication/compute overlap
#   GLOO_SOCKET_IFNAME              like NCCL_SOCKET_IFNAME, for gloo (CPU jobs, CPU-side groups)
# ---------------------------------------------------------------------------------------------------------
if [[ $CPU_MODE == 0 ]]; then
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

say "job $SLURM_JOB_ID ($SLURM_JOB_NAME) restart ${SLURM_RESTART_COUNT:-0}: $NNODES node(s) [$SLURM_JOB_NODELIST]," \
    "$WORLD task(s), $( ((CPU_MODE)) && echo "CPU (gloo)" || echo "$GPUS_PER_NODE GPU(s)/node (NCCL)")"
say "repository $ROOT ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'no git')), python $PY," \
    "master $MASTER_ADDR:$MASTER_PORT${CONTAINER_IMAGE:+, container $CONTAINER_IMAGE}"
cd "$ROOT"    # relative paths in configs (runs/..., .cache/...) are relative to the repository

# One task (the check, the converter, the evaluation). Without a container it runs in the batch shell.
run_one() {
    if [[ -n ${CONTAINER_IMAGE:-} ]]; then
        srun --nodes=1 --ntasks=1 "${CONTAINER_ARGS[@]}" "$@"
    else
        "$@"
    fi
}

# Preemption: Slurm sends USR1 `--signal=B:USR1@T` seconds before the time limit (and TERM on scancel or
# preemption) to this shell, which passes it to the running srun step; srun forwards it to every rank, and
# the trainer finishes its step, checkpoints and exits 0. A shell runs traps only between commands, hence
# `srun ... &` + `wait`. A signal that arrives before the ranks start is remembered (see mode_train).
STEP_PID=
GOT_SIGNAL=${_SAYO_EARLY_SIGNAL:-}    # caught by the sbatch script before it exec'd this launcher
on_signal() {
    GOT_SIGNAL=$1
    if [[ -n $STEP_PID ]]; then
        say "received SIG$1: asking the ranks to checkpoint and stop"
        kill "-$1" "$STEP_PID" 2>/dev/null || true
    else
        say "received SIG$1 before any rank runs"
    fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

run_forwarding() {  # COMMAND...: run it in the background, forward signals to it, return its exit code
    "$@" &
    STEP_PID=$!
    local rc
    while true; do
        set +e; wait "$STEP_PID"; rc=$?; set -e
        kill -0 "$STEP_PID" 2>/dev/null || break    # still alive: wait returned for a trapped signal
    done
    STEP_PID=
    return "$rc"
}

# ---------------------------------------------------------------------------------------------------------
mode_run() {
    [[ $# -gt 0 ]] || die "launch.sh run: no command"
    if [[ $1 == python ]]; then shift; set -- "$PY" "$@"; fi    # the job's interpreter (venv/container)
    say "running: $*"
    run_forwarding srun --nodes=1 --ntasks=1 --kill-on-bad-exit=1 "${CONTAINER_ARGS[@]}" "$@"
}

# Progress of a run: "<step of the checkpoint the trainer would resume from, or 0> <train.steps> <run_dir>".
run_progress() {
    run_one "$PY" - "$CONFIG" "${OVERRIDES[@]}" <<'EOF'
import sys
from megatron_sayo.checkpoint.files import STEP_PREFIX, find_resumable
from megatron_sayo.config import load_config
cfg = load_config(sys.argv[1], sys.argv[2:])
ckpt = find_resumable(cfg.run_dir)
print(int(ckpt.name[len(STEP_PREFIX):]) if ckpt else 0, cfg.train.steps, cfg.run_dir)
EOF
}

# Memory per GPU the pre-flight checks against: SAYO_GPU_MEMORY, else the smallest GPU of this node (MiB).
gpu_memory() {
    if [[ -n ${SAYO_GPU_MEMORY:-} ]]; then echo "$SAYO_GPU_MEMORY"; return; fi
    local mib
    mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | sort -n | head -n 1) || true
    [[ $mib =~ ^[0-9]+$ ]] || die "cannot tell the GPUs' memory (nvidia-smi answered '${mib}'): set" \
        "SAYO_GPU_MEMORY, e.g. SAYO_GPU_MEMORY=80GB sbatch ..."
    echo "${mib}MiB"
}

# Sets DONE TOTAL RUN_DIR from run_progress (its last line: imports may print above it).
read_progress() {
    local out
    out=$(run_progress) || die "cannot read the progress of the run (see above)"
    read -r DONE TOTAL RUN_DIR <<< "$(tail -n 1 <<< "$out")"
    [[ $DONE =~ ^[0-9]+$ && $TOTAL =~ ^[0-9]+$ ]] || die "unexpected progress line: $out"
}

mode_train() {
    # [CONFIG] [key=value ...]: the first argument is the config unless it looks like an override
    CONFIG=${SAYO_DEFAULT_CONFIG:-}
    if [[ $# -gt 0 && $1 != *=* ]]; then
        CONFIG=$1; shift
    fi
    [[ -n $CONFIG ]] || die "no config given and SAYO_DEFAULT_CONFIG is not set"
    # a relative config path is relative to where sbatch was called, else to the repository
    if [[ $CONFIG != /* ]]; then
        if [[ -e ${SLURM_SUBMIT_DIR:-$ROOT}/$CONFIG ]]; then CONFIG=${SLURM_SUBMIT_DIR:-$ROOT}/$CONFIG
        else CONFIG=$ROOT/$CONFIG; fi
    fi
    OVERRIDES=("$@")
    if [[ $CPU_MODE == 0 ]]; then
        local tpn=${SLURM_NTASKS_PER_NODE:-$((WORLD / NNODES))}
        [[ $tpn == "$GPUS_PER_NODE" ]] || die "one process per GPU: --ntasks-per-node ($tpn) must equal" \
            "--gpus-per-node ($GPUS_PER_NODE); for a CPU job pass --gpus-per-node=0"
    fi
    local cmd=("$PY" -m megatron_sayo.train --config "$CONFIG" "${OVERRIDES[@]}")

    # 1. validate once, with the job's world size and GPU memory, before any rank starts (a typo or a layout
    #    that cannot fit fails in seconds). The world size goes in torchrun's RANK/WORLD_SIZE, which the trainer
    #    reads first: in a container the check runs as a 1-task srun step, which sets SLURM_NTASKS=1 itself.
    local check=(--check) mem
    if [[ $CPU_MODE == 0 ]]; then
        mem=$(gpu_memory) || exit 2
        check+=(--gpu-memory "$mem")
    fi
    say "checking $CONFIG ${OVERRIDES[*]} for world size $WORLD ${check[*]:1}"
    local rc=0
    RANK=0 WORLD_SIZE=$WORLD LOCAL_RANK=0 run_one "${cmd[@]}" "${check[@]}" || rc=$?
    if [[ $rc != 0 ]]; then
        say "config check failed (exit $rc); no rank was started"
        exit "$rc"
    fi

    read_progress
    if [[ $DONE -ge $TOTAL ]]; then
        say "$RUN_DIR already holds the final checkpoint (step $DONE of $TOTAL): nothing to do"
        exit 0
    fi
    START_STEP=$DONE
    if [[ $DONE -gt 0 ]]; then say "resuming $RUN_DIR from its checkpoint at step $DONE of $TOTAL"
    else say "starting $RUN_DIR from step 0 of $TOTAL"; fi

    # The warning signal came while we were checking: the time limit is shorter than the --signal lead time
    # (or the job is being preempted). Starting the ranks now would only be killed; say why and stop.
    if [[ -n $GOT_SIGNAL ]]; then
        say "SIG$GOT_SIGNAL arrived before the ranks started: is --time shorter than the lead time of" \
            "--signal=B:USR1@SECONDS? Submit with a shorter one, e.g. --signal=B:USR1@60. Not starting."
        exit 1
    fi

    # 2. all ranks, one per GPU; a rank that dies takes the step down (no hang until the NCCL timeout)
    rc=0
    run_forwarding srun --kill-on-bad-exit=1 "${CONTAINER_ARGS[@]}" "${cmd[@]}" || rc=$?
    read_progress
    say "ranks exited with $rc; newest checkpoint: step $DONE of $TOTAL${GOT_SIGNAL:+ (after SIG$GOT_SIGNAL)}"
    if [[ $rc != 0 ]]; then
        if [[ -n $GOT_SIGNAL && $DONE -eq $START_STEP ]]; then
            say "the ranks died on SIG$GOT_SIGNAL before their first checkpoint (during start-up the trainer" \
                "cannot catch it yet); if it came from --signal=B:USR1@SECONDS, --time is shorter than SECONDS"
        fi
        exit "$rc"    # a crash is not a preemption: no requeue, the job ends FAILED
    fi

    # 3. stopped before the end (the trainer checkpointed on USR1 and exited 0): queue the job again; the
    #    next run resumes from that checkpoint. TERM means scancel (or preemption, which Slurm requeues
    #    itself when its PreemptMode says so): the checkpoint is written, the job stays cancelled.
    if [[ $DONE -lt $TOTAL && $GOT_SIGNAL == TERM ]]; then
        say "stopped at step $DONE of $TOTAL by SIGTERM (scancel/preemption): not requeueing"
        exit 0
    fi
    if [[ $DONE -lt $TOTAL ]]; then
        local restarts=${SLURM_RESTART_COUNT:-0} max=${SAYO_MAX_RESTARTS:-50}
        if [[ $restarts -ge $max ]]; then
            say "not requeueing: $restarts restarts reached SAYO_MAX_RESTARTS=$max"
            exit 1
        fi
        say "stopped at step $DONE of $TOTAL: requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))"
        scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue $SLURM_JOB_ID failed; resubmit to resume"
        exit 0
    fi
    say "finished: $RUN_DIR at step $DONE of $TOTAL"
}

case "$MODE" in
    train) mode_train "$@" ;;
    run) mode_run "$@" ;;
    *) die "usage: launch.sh train [CONFIG] [key=value ...] | launch.sh run COMMAND [ARG ...]" ;;
esac
