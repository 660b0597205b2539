"""All-reduce and all-gather through shared memory for the ranks of a process group on one CPU host.

Gloo's collectives cost ~0.6 ms each on loopback even for a few-KB tensor, and a TP=2 decode step makes
ten of them (benchmarks/cpu_collectives.py). Here each rank copies its tensor into its own slot of a segment
in /dev/shm, stores a sequence number in its flag, and spins until every flag shows the same number; the
result is then read from the slots and summed in rank order, so every rank holds the same bits (for two
ranks the same bits as gloo's). Slots alternate between two sets by sequence parity, so a rank that runs
ahead never overwrites a slot a peer is still reading.

Only on CPU (runtime installs it with the other CPU shims), for tensors up to SLOT_BYTES, for groups whose
ranks share a host, on x86-64 (whose store order makes a flag written after the data safe to read), and when
the kernel has a core for every rank it runs (a spinning rank must not hold the core of the peer it waits for).
Anything else takes torch.distributed. MEGATRON_SAYO_SHM_COLLECTIVES=0 turns it off; =always skips the core
count (the ranks of a group must still share a host and the segment).

"Same host" is the node as the network sees it: the same kernel (boot id), the same host name (UTS namespace)
and the same network namespace. Two Slurm nodes made as namespaces of one machine (scripts/slurm_local.sh
start --nodes N) are two hosts although /dev/shm is one tmpfs for both: their groups take gloo, over their
addresses, as on separate machines. The segment handshake (_Channel.open) then proves that the ranks of one
host do share the segment (containers with private /dev/shm mounts fail it and take gloo). The core budget is
counted per kernel: nodes that are namespaces of one machine share its cores.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import platform
import socket
import time
import types

import torch
import torch.distributed as dist

SLOT_BYTES = 4 << 20          # per rank and parity; larger tensors are bandwidth-bound: gloo does them
FLAG_STRIDE = 8               # int64 per flag: one 64-byte cache line each
SPIN_S, YIELD_S = 50e-6, 2e-3  # busy-wait, then sched_yield, then sleep-poll
TIMEOUT_S = 1800.0            # the process groups' own timeout (runtime.init_distributed)

_host_ok: list[bool] | None = None          # per global rank: may use shared memory (set by `enable`)
_host_of: list[int] | None = None           # per global rank: its host id (_host_id)
_why_not: list[str] | None = None           # per global rank: why it may not ("" where it may)
_channels: dict = {}                        # process group -> _Channel or None (gloo)
_reasons: dict = {}                         # process group -> why it takes shared memory or gloo
_names = itertools.count()


def _boot_id() -> bytes:
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return f.read(64).strip()
    except OSError:
        return b""


def _netns() -> bytes:
    """This process's network namespace (its nsfs inode, unique on one kernel), b"" where unreadable."""
    try:
        return str(os.stat("/proc/self/ns/net").st_ino).encode()
    except OSError:
        return b""


def _hash63(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") & (2**63 - 1)


def _host_id() -> int:
    """63 bits of a hash of this host: kernel boot id, host name and network namespace (the same for every rank
    of one node; different for nodes that are namespaces of one machine, see the module's docstring)."""
    return _hash63(b"/".join((_boot_id(), socket.gethostname().encode(), _netns())))


def _kernel_id() -> int:
    """63 bits of a hash of the kernel's boot id: ranks with the same one share the machine's cores."""
    return _hash63(_boot_id())


def _mode() -> str:
    """MEGATRON_SAYO_SHM_COLLECTIVES: "0" (off), "always" (no core count) or anything else (on)."""
    value = os.environ.get("MEGATRON_SAYO_SHM_COLLECTIVES", "1").strip().lower()
    return {"0": "off", "always": "always"}.get(value, "on")


def enable() -> bool:
    """Decide, once per job, which ranks may use shared memory: one all-gather of (host, fit) over the world.

    Call on every rank after init_process_group. Returns whether this rank may."""
    global _host_ok, _host_of, _why_not
    _channels.clear()
    _reasons.clear()
    world = dist.get_world_size()
    mode = _mode()
    supported = platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir("/dev/shm")
    # wanted: 0 off, 1 on, 2 always (no core count), -1 not supported here
    wanted = -1 if not supported else {"off": 0, "on": 1, "always": 2}[mode]
    mine = torch.tensor([_host_id(), wanted, os.cpu_count() or 1, _kernel_id()], dtype=torch.int64)
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    _host_of = [int(t[0]) for t in every]
    kernels = [int(t[3]) for t in every]
    _host_ok = usable_ranks(_host_of, [int(t[1]) > 0 for t in every], [int(t[2]) for t in every], kernels,
                            always=[int(t[1]) == 2 for t in every])
    _why_not = []
    for ok, t, k in zip(_host_ok, every, kernels):
        wish, cores = int(t[1]), int(t[2])
        _why_not.append("" if ok else "MEGATRON_SAYO_SHM_COLLECTIVES=0" if wish == 0
                        else "not x86-64 or no /dev/shm" if wish < 0
                        else f"{kernels.count(k)} ranks share this machine's {cores} cores")
    return _host_ok[dist.get_rank()]


def usable_ranks(hosts: list[int], wanted: list[bool], cores: list[int], kernels: list[int] | None = None,
                 always: list[bool] | None = None) -> list[bool]:
    """Per rank: it wants shared memory and its machine has at least one core per rank placed on it (ranks
    counted per kernel, `kernels`, default: per host; `always`: no core count for that rank)."""
    kernels = hosts if kernels is None else kernels
    always = [False] * len(hosts) if always is None else always
    return [w and (a or c >= kernels.count(k)) for k, w, c, a in zip(kernels, wanted, cores, always)]


def disable() -> None:
    """Forget every channel (process groups destroyed); collectives take torch.distributed until `enable`."""
    global _host_ok, _host_of, _why_not
    _host_ok = _host_of = _why_not = None
    _channels.clear()
    _reasons.clear()


class _Channel:
    """The shared segment of one process group: [parity, rank] flags, then [parity, rank] data slots."""

    def __init__(self, group, ranks: list[int], segment: torch.Tensor):
        self.group, self.world = group, len(ranks)
        self.rank = ranks.index(dist.get_rank())
        header = 2 * self.world * FLAG_STRIDE * 8
        self.flags = segment[:header].view(torch.int64).numpy().reshape(2, self.world, FLAG_STRIDE)[:, :, 0]
        self.data = segment[header:]
        self.seq = 0

    @staticmethod
    def open(group, ranks: list[int]) -> _Channel | None:
        """Group rank 0 creates (exclusively) and names the segment, every rank maps it, rank 0 unlinks it; then
        each rank writes a random tag into its flag and checks, against the tags gloo carries, that it sees its
        peers' (ranks in separate containers of one host may not share /dev/shm). None (on every rank) if
        the segment could not be made or is not shared; a file rank 0 did not create is never touched."""
        me, world = ranks.index(dist.get_rank()), len(ranks)
        size = 2 * world * FLAG_STRIDE * 8 + 2 * world * SLOT_BYTES
        name = torch.tensor([os.getpid(), next(_names), 0], dtype=torch.int64)    # pid, counter, created
        if me == 0:
            name[2] = int(_create_segment(_segment_path(name), size))
        dist.broadcast(name, ranks[0], group=group)
        path, created = _segment_path(name), bool(name[2])
        channel = None
        try:
            if created and os.path.exists(path):    # exists: never create a file a peer could not see
                channel = _Channel(group, ranks, torch.from_file(path, shared=True, size=size, dtype=torch.uint8))
        except (OSError, RuntimeError):
            channel = None
        finally:
            dist.barrier(group=group)
            if me == 0 and created:
                os.unlink(path)
        tag = -1 - int.from_bytes(os.urandom(6), "little")     # negative: never a sequence number
        if channel is not None:
            channel.flags[0, me] = tag
        tags = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(tags, torch.tensor([tag]), group=group)
        shared = torch.tensor([int(channel is not None
                                   and all(int(channel.flags[0, r]) == int(tags[r]) for r in range(world)))])
        dist.all_reduce(shared, op=dist.ReduceOp.MIN, group=group)
        return channel if bool(shared) else None

    def _slot(self, parity: int, rank: int, like: torch.Tensor) -> torch.Tensor:
        start = (parity * self.world + rank) * SLOT_BYTES
        return self.data[start:start + like.numel() * like.element_size()].view(like.dtype).view(like.shape)

    def exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every group rank's `tensor` (same shape and dtype on all), in rank order, as views of the segment
        that stay valid until this rank's next-but-one exchange."""
        self.seq += 1
        parity = self.seq & 1
        self._slot(parity, self.rank, tensor).copy_(tensor)
        self.flags[parity, self.rank] = self.seq
        self._wait(self.flags[parity])
        return [self._slot(parity, r, tensor) for r in range(self.world)]

    def _wait(self, flags) -> None:
        start = time.perf_counter()
        while not (flags >= self.seq).all():
            waited = time.perf_counter() - start
            if waited > YIELD_S:
                if waited > TIMEOUT_S:
                    late = [r for r in range(self.world) if flags[r] < self.seq]
                    raise RuntimeError(f"shared-memory collective: group ranks {late} did not arrive within "
                                       f"{TIMEOUT_S:g} s (collective #{self.seq})")
                time.sleep(1e-4)
            elif waited > SPIN_S:
                os.sched_yield()


def _segment_path(name: torch.Tensor) -> str:
    """/dev/shm path of a channel's segment from the creating rank's (pid, counter)."""
    return f"/dev/shm/megatron_sayo_{os.getuid()}_{int(name[0])}_{int(name[1])}"


def _create_segment(path: str, size: int) -> bool:
    """Create `path` exclusively (mode 600) with `size` bytes; False, leaving nothing, where it cannot (a file
    of that name exists: not ours to touch; or /dev/shm refuses)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError:
        return False
    try:
        os.ftruncate(fd, size)
        return True
    except OSError:
        os.unlink(path)
        return False
    finally:
        os.close(fd)


def _channel(group, tensor: torch.Tensor) -> _Channel | None:
    if _host_ok is None or tensor.device.type != "cpu" or tensor.numel() * tensor.element_size() > SLOT_BYTES:
        return None
    group = group if group is not None else dist.group.WORLD
    if group not in _channels:
        ranks = dist.get_process_group_ranks(group)
        hosts = len({_host_of[r] for r in ranks})
        blocked = [r for r in ranks if not _host_ok[r]]
        if len(ranks) == 1:
            _channels[group], _reasons[group] = None, "one rank"
        elif hosts > 1:
            _channels[group], _reasons[group] = None, f"gloo: its ranks are on {hosts} hosts"
        elif blocked:
            _channels[group], _reasons[group] = None, f"gloo: rank {blocked[0]}: {_why_not[blocked[0]]}"
        else:
            _channels[group] = _Channel.open(group, ranks)
            _reasons[group] = ("shared memory" if _channels[group] is not None
                               else "gloo: one host, but the ranks do not share a /dev/shm segment")
    return _channels[group]


def transport(group) -> str:
    """How this group's TP all-reduces and all-gathers travel: "shared memory", or "gloo: <why not>".
    Collective over `group` the first time (it opens the channel the group's collectives would open)."""
    if not dist.is_initialized():
        return "one process"
    if _host_ok is None:
        return "torch.distributed (shared-memory collectives not enabled: a GPU job, or before init)"
    group = group if group is not None else dist.group.WORLD
    _channel(group, torch.zeros(1))
    return _reasons[group]


def all_reduce(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum `tensor` over `group` in place and return it (no autograd): shared memory where it applies."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return tensor
    channel = _channel(group, tensor)
    if channel is None:
        dist.all_reduce(tensor, group=group)
        return tensor
    parts = channel.exchange(tensor.contiguous())
    total = parts[0].clone()
    for part in parts[1:]:
        total.add_(part)
    return tensor.copy_(total)


def all_gather_into_tensor(output: torch.Tensor, tensor: torch.Tensor, group=None, async_op: bool = False):
    """torch.distributed.all_gather_into_tensor (ranks stacked along dim 0), through shared memory where it
    applies; megatron's TP gathers call it."""
    channel = None if async_op else _channel(group, tensor)
    if channel is None:
        return dist.all_gather_into_tensor(output, tensor, group=group, async_op=async_op)
    torch.cat(channel.exchange(tensor.contiguous()), dim=0, out=output.view(-1, *tensor.shape[1:]))
    return None


class _Finished:
    """The handle of an async_op call that has already finished (the shared-memory path is synchronous)."""

    def wait(self, *_, **__) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def torch_all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM, group=None, async_op: bool = False):
    """torch.distributed.all_reduce as megatron's TP layers call it (sums, sync or async): through shared
    memory where it applies, else torch's own."""
    if op == dist.ReduceOp.SUM and tensor.is_contiguous() and dist.get_world_size(group) > 1 \
            and _channel(group, tensor) is not None:
        all_reduce(tensor, group)
        return _Finished() if async_op else None
    return dist.all_reduce(tensor, op=op, group=group, async_op=async_op)


class TorchDistributed(types.ModuleType):
    """`torch.distributed` with all_reduce and all_gather_into_tensor through shared memory where they apply:
    what megatron's TP modules see on CPU (runtime swaps it in)."""

    all_reduce = staticmethod(torch_all_reduce)
    all_gather_into_tensor = staticmethod(all_gather_into_tensor)

    def __getattr__(self, name):
        return getattr(dist, name)
