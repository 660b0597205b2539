"""Process start-up: ranks from torchrun or Slurm, torch.distributed, megatron parallel_state, device.

This is the only module that knows whether we run on CPU. megatron-core 0.16 hard-codes CUDA in a few
places (pipeline p2p, schedules, grad-norm, TP gathers); `_install_cpu_shims` neutralises exactly those, and only
when CUDA is absent, so the GPU path runs megatron-core untouched. On CPU it also routes megatron's TP
all-reduce and all-gather through shared memory (distributed/shm_collectives.py), gloo being latency-bound.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import re
import signal
import socket
import subprocess
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_sayo.distributed import shm_collectives


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, read from torchrun's or Slurm's environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "single"


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list such as 'gpu[003-005,9],cpu1' (scontrol when available)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = re.split(r",(?![^\[]*\])", nodelist)[0]
    m = re.match(r"^([^\[]+)\[([^\],-]+)", head)
    return m.group(1) + m.group(2) if m else head


def read_launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    """torchrun (RANK/WORLD_SIZE) wins over Slurm (SLURM_PROCID/SLURM_NTASKS); neither means one process."""
    env = os.environ if environ is None else environ
    port = int(env.get("MASTER_PORT", "29500"))
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")),
                         env.get("MASTER_ADDR", "127.0.0.1"), port, "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
        if "MASTER_PORT" not in env and "SLURM_JOB_ID" in env:
            port = 20000 + int(env["SLURM_JOB_ID"]) % 20000
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0")),
                         addr or "127.0.0.1", port, "slurm")
    return LaunchEnv(0, 1, 0, "127.0.0.1", port, "single")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device() -> torch.device:
    """The device this rank computes on."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(tp: int = 1, pp: int = 1, *, launch: LaunchEnv | None = None, backend: str | None = None,
                     timeout_minutes: int = 30) -> LaunchEnv:
    """Initialise torch.distributed and megatron parallel_state (DP = world / (TP*PP)); idempotent."""
    from megatron.core import parallel_state

    launch = launch or read_launch_env()
    if launch.world_size % (tp * pp) != 0:
        raise ValueError(f"parallel: world size {launch.world_size} is not divisible by tp*pp = {tp}*{pp}")
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    else:
        _install_cpu_shims()
    if not dist.is_initialized():
        # on GPUs, NCCL for CUDA tensors and gloo for the CPU-side flags and metrics the trainer all-reduces
        backend = backend or ("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=backend, init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                                rank=launch.rank, world_size=launch.world_size,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    _install_distributed_optimizer_fixes()
    if not torch.cuda.is_available():
        shm_collectives.enable()
    return launch


def shutdown() -> None:
    from megatron.core import parallel_state

    shm_collectives.disable()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def one_local_rank():
    """A one-rank job here, in this process (a tool's single-rank path): the launch variables it lacks are set for
    the block, then removed with the process group, so neither a test process nor a later job inherits them."""
    defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(free_port())}
    added = {k: v for k, v in defaults.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        shutdown()
        for k in added:
            os.environ.pop(k, None)


def seed_everything(seed: int) -> None:
    """Seed torch (and megatron's TP RNG tracker on GPU) identically on every rank."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)


# --------------------------------------------------------------------------------------------------------------
# CPU shims: the one place that adapts megatron-core to a machine without CUDA.
# --------------------------------------------------------------------------------------------------------------

_CUDA = ("cuda",)


class _CpuCuda(types.SimpleNamespace):
    """Stands in for `torch.cuda` inside megatron modules that call it unconditionally."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return torch.device("cpu")

    @staticmethod
    def synchronize(*_, **__):
        return None

    @staticmethod
    def is_available():
        return False

    @staticmethod
    def current_stream(*_, **__):
        """megatron-core 0.19 orders its gradient reduce after the current stream; on CPU there is none to wait on
        (and torch's CUDA build without a driver raises here, where its CPU build does not)."""
        return _CpuStream()

    @staticmethod
    def empty_cache():
        return None


class _CpuStream:
    """A CUDA stream's waits, as no-ops: CPU work runs in program order."""

    def wait_event(self, *_):
        return None

    def wait_stream(self, *_):
        return None

    def synchronize(self):
        return None


class _CpuTorch(types.ModuleType):
    """`torch`, except that device='cuda' means CPU and torch.cuda is `_CpuCuda` (and, given, torch.distributed
    is `distributed`)."""

    def __init__(self, distributed: types.ModuleType | None = None):
        super().__init__("torch")
        self.cuda = _CpuCuda()
        if distributed is not None:
            self.distributed = distributed

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if callable(attr) and name in ("zeros", "empty", "ones", "tensor", "full", "arange", "zeros_like",
                                       "empty_like", "ones_like"):
            def on_cpu(*args, __f=attr, **kwargs):
                dev = kwargs.get("device")
                if dev is not None and str(dev).startswith(_CUDA):
                    kwargs["device"] = "cpu"
                return __f(*args, **kwargs)
            return on_cpu
        return attr


_shims_installed = False

# megatron-core modules that allocate on "cuda" / call torch.cuda unconditionally (0.16.1 and 0.19).
_CUDA_BOUND_MODULES = (
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
)
# megatron-core modules whose TP all-reduces and all-gathers go through shared memory on CPU (they also get
# the CUDA shim): the row-parallel / embedding forward reduce, the column-parallel backward reduce
_TP_COMM_MODULES = ("megatron.core.tensor_parallel.mappings", "megatron.core.tensor_parallel.layers")


def _clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's clip_grad_by_total_norm_fp32 without its `torch.cuda.FloatTensor` type assertion."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)


def _no_cuda_rng_state(*_args, **_kwargs) -> None:
    """CPU stand-in for megatron's CUDA RNG state get/set (activation recompute saves and restores it around the
    recomputed forward; on CPU the CPU generator, which megatron restores itself, is the only one)."""
    return None


def _gloo_reduce_scatter_tensor(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
    """reduce_scatter_tensor for gloo, which has none (the distributed optimizer's gradient reduce-scatter): an
    all-reduce of a copy of the whole input, of which this rank keeps its equal slice."""
    full = input.detach().clone()
    dist.all_reduce(full, op=op, group=group)
    n = output.numel()
    rank = dist.get_rank(group)
    output.view(-1).copy_(full.view(-1)[rank * n:(rank + 1) * n])


def _gloo_all_gather_into_tensor(output, input, group=None, async_op=False):
    """all_gather_into_tensor through gloo's list all-gather into the output's equal, contiguous rows (the
    distributed optimizer's parameter all-gather)."""
    world = dist.get_world_size(group)
    dist.all_gather(list(output.view(world, -1).unbind(0)), input.contiguous().view(-1), group=group)


@contextlib.contextmanager
def _no_coalescing(*_args, **_kwargs):
    """torch.distributed._coalescing_manager for synchronous gloo calls: each call has completed on return."""
    yield None


@contextlib.contextmanager
def megatron_tensor_types():
    """While megatron's optimizers are built: on CPU, `Tensor.type()` of a CPU float tensor answers the
    torch.cuda name megatron's constructors check parameters against (the name only: nothing moves); elsewhere
    nothing changes."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.type
    float_types = {"torch.FloatTensor", "torch.HalfTensor", "torch.BFloat16Tensor"}

    def cuda_named(self, *args, **kwargs):
        name = original(self, *args, **kwargs)
        return name.replace("torch.", "torch.cuda.", 1) if not args and not kwargs and name in float_types else name

    torch.Tensor.type = cuda_named
    try:
        yield
    finally:
        torch.Tensor.type = original


def _align_group_index_map(optimizer) -> None:
    """megatron-core 0.16's distributed optimizer gives its inner optimizer each group's float32 parameters first,
    then the fp32 copies of its 16-bit ones, but numbers them (model_param_group_index_map, through which the
    checkpoint is written and read) in buffer order. Where a group mixes both, as megatron's local layers do
    with bf16 weights (their torch norm keeps float32 weights in the no-weight-decay group beside bf16 biases),
    a checkpoint pairs a parameter with another one's Adam state: silently where the sizes agree. Renumber
    each parameter by the position of its own shard in its group; a no-op where the numbering is right."""
    inner = optimizer.optimizer
    if getattr(optimizer.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False) or not all(
            hasattr(optimizer, name) for name in ("model_param_group_index_map", "model_fp32_groups",
                                                  "shard_fp32_from_float16_groups")):
        return   # the fp32 copies live in the fused optimizer, or another megatron-core layout
    for index, group in enumerate(inner.param_groups):
        order = {id(shard): k for k, shard in enumerate(group["params"])}
        pairs = [*zip(optimizer.model_fp32_groups[index], optimizer.shard_fp32_groups[index]),
                 *zip(optimizer.model_float16_groups[index], optimizer.shard_fp32_from_float16_groups[index])]
        for model_param, shard in pairs:
            optimizer.model_param_group_index_map[model_param] = (index, order[id(shard)])


_optimizer_fixes_installed = False


def _install_distributed_optimizer_fixes() -> None:
    """Work-arounds for megatron-core 0.16's distributed optimizer checkpoints, installed once (both are no-ops
    where megatron is right, so a GPU run with Transformer Engine layers and optimizer runs it untouched):

    - after construction, `_align_group_index_map` (float32 and bf16 parameters in one group);
    - on torch's Adam (no Apex or Transformer Engine, as on CPU) a checkpoint cannot be loaded: building the
      loading template reads the step from the per-parameter Adam state (state_dict asserts one step over the
      states) and a fresh optimizer has none, so each parameter without state first gets what torch's Adam gives
      it at its first step (step 0, zero moments), which the checkpoint then overwrites; and the fully
      reshardable format hands over param / exp_avg / exp_avg_sq (the step travels in the param groups and
      load_state_dict sets it) while _set_main_param_and_optimizer_states copies every key of the Adam state,
      'step' included (KeyError): it copies the keys it is given; and load_state_dict hands every parameter's
      state one and the same step tensor, which torch's Adam then increments once per parameter at each step
      (the bias correction of every step after a resume wrong): each parameter gets its own copy."""
    global _optimizer_fixes_installed
    if _optimizer_fixes_installed:
        return
    from megatron.core.optimizer import distrib_optimizer

    cls = distrib_optimizer.DistributedOptimizer
    init = cls.__init__

    def init_aligned(self, *args, **kwargs):
        init(self, *args, **kwargs)
        _align_group_index_map(self)

    cls.__init__ = init_aligned
    if not getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True) and hasattr(cls, "_set_main_param_and_optimizer_states"):
        sharded_state_dict, set_states = cls.sharded_state_dict, cls._set_main_param_and_optimizer_states

        def sharded_state_dict_filled(self, model_sharded_state_dict, is_loading=False, *args, **kwargs):
            if is_loading and not self.ddp_config.use_megatron_fsdp:
                adam = self.optimizer
                for group in adam.param_groups:
                    for p in group["params"]:
                        if not adam.state[p]:
                            adam.state[p].update(step=torch.tensor(0.0, dtype=torch.float32),
                                                 exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            return sharded_state_dict(self, model_sharded_state_dict, is_loading, *args, **kwargs)

        def set_given_states(self, model_param, tensors):
            if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
                return set_states(self, model_param, tensors)
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            destination = {"param": main_param, **self.optimizer.state[main_param]}
            for key, value in tensors.items():
                destination[key].copy_(value)

        load_state_dict = cls.load_state_dict

        def load_state_dict_own_steps(self, state_dict):
            load_state_dict(self, state_dict)
            for state in self.optimizer.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()

        cls.sharded_state_dict = sharded_state_dict_filled
        cls.load_state_dict = load_state_dict_own_steps
        cls._set_main_param_and_optimizer_states = set_given_states
    _optimizer_fixes_installed = True


def _install_cpu_shims() -> None:
    """Point the CUDA-bound megatron modules at `_CpuTorch`; a no-op when already done."""
    global _shims_installed
    if _shims_installed:
        return
    import importlib

    cpu_torch = _CpuTorch()
    for name in _CUDA_BOUND_MODULES:
        importlib.import_module(name).torch = cpu_torch
    clip_grads = importlib.import_module("megatron.core.optimizer.clip_grads")
    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu
    tp_torch = _CpuTorch(distributed=shm_collectives.TorchDistributed("torch.distributed"))
    for name in _TP_COMM_MODULES:
        importlib.import_module(name).torch = tp_torch
    mappings = importlib.import_module("megatron.core.tensor_parallel.mappings")
    mappings.dist_all_gather_func = shm_collectives.all_gather_into_tensor   # bound at import: the TP gathers
    random = importlib.import_module("megatron.core.tensor_parallel.random")   # selective / full recompute
    random._get_cuda_rng_state = _no_cuda_rng_state
    random._set_cuda_rng_state = _no_cuda_rng_state
    buffers = importlib.import_module("megatron.core.distributed.param_and_grad_buffer")   # distributed optimizer
    buffers.dist_reduce_scatter_func = _gloo_reduce_scatter_tensor
    buffers.dist_all_gather_func = _gloo_all_gather_into_tensor
    buffers._coalescing_manager = _no_coalescing
    _shims_installed = True


def argsort_descending(x: torch.Tensor) -> torch.Tensor:
    """Indices that sort the last dimension of x (no NaN) in descending order; ties in any order.

    On CPU numpy's SIMD quicksort does it 4-5x faster than torch.sort (6 vs 30 ms at [16, 32000] float32,
    38 vs 153 ms at [16, 151936]: the rollout's top-p step); elsewhere torch's own sort.
    """
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return x.argsort(dim=-1, descending=True)
    import numpy as np

    return torch.from_numpy(np.argsort(np.negative(x.detach().numpy()), axis=-1))


# --------------------------------------------------------------------------------------------------------------
# Local multi-process launch (tools and tests start their own ranks; no torchrun needed).
# --------------------------------------------------------------------------------------------------------------

def die_with_parent(parent: int) -> None:
    """Linux: have the kernel send this process SIGTERM (SIGKILL if it ignores SIGTERM: its parent handles stops)
    when its parent dies, so a killed tool or test leaves no ranks (or helper processes) behind (ranks would
    wait on their collectives until the process-group timeout)."""
    try:
        import ctypes

        sig = signal.SIGKILL if signal.getsignal(signal.SIGTERM) == signal.SIG_IGN else signal.SIGTERM
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig))   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent:         # the parent died before prctl took effect
        os._exit(1)


def _spawn_entry(local_rank, fn, world_size, port, args, result_queue, parent):
    die_with_parent(parent)
    os.environ.update({"RANK": str(local_rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(local_rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    try:
        result = fn(*args)
        # plain pickle bytes: torch's queue reducers would pass tensors through shared memory that
        # disappears when this process exits
        result_queue.put((local_rank, "ok", pickle.dumps(result)))
    except BaseException as exc:  # report, then re-raise so the exit code is non-zero
        import traceback

        result_queue.put((local_rank, "error", traceback.format_exc()))
        raise exc
    finally:
        shutdown()


def spawn_local(fn, world_size: int, *args, timeout_s: float = 900.0, on_started=None):
    """Run `fn(*args)` on `world_size` local ranks (torchrun-style env set); returns the per-rank results.

    `fn` must be importable (a module-level function). `on_started()`, if given, is called once every rank's
    process has started. Raises RuntimeError with the failing rank's traceback, or when a rank dies or the run
    exceeds `timeout_s`.
    """
    import queue as queue_mod
    import time

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results_q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_spawn_entry, args=(r, fn, world_size, port, args, results_q, os.getpid()))
             for r in range(world_size)]
    for p in procs:
        p.start()
    if on_started is not None:
        on_started()
    results, errors, deadline = {}, [], time.monotonic() + timeout_s
    while len(results) < world_size and not errors:
        try:
            rank, status, payload = results_q.get(timeout=1.0)
        except queue_mod.Empty:
            dead = [r for r, p in enumerate(procs) if not p.is_alive() and p.exitcode != 0 and r not in results]
            if dead:
                errors.append(f"rank {dead[0]} exited with code {procs[dead[0]].exitcode}")
            elif time.monotonic() > deadline:
                errors.append(f"timed out after {timeout_s:.0f}s")
            continue
        if status == "ok":
            results[rank] = pickle.loads(payload)
        else:
            errors.append(f"rank {rank}:\n{payload}")
    for p in procs:
        p.join(timeout=30 if not errors else 2)
        if p.is_alive():
            p.kill()
    if errors:
        raise RuntimeError("distributed run failed on " + "\n".join(errors))
    return [results[r] for r in range(world_size)]
