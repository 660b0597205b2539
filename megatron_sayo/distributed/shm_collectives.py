"""All-reduce and all-gather through shared memory for the ranks of a process group on one CPU host.

Gloo's collectives cost ~0.6 ms each on loopback even for a few-KB tensor, and a TP=2 decode step makes
ten of them (benchmarks/cpu_collectives.py). Here each rank copies its tensor into its own slot of a segment
in /dev/shm, stores a sequence number in its flag, and spins until every flag shows the same number; the
result is then read from the slots and summed in rank order, so every rank holds the same bits (for two
ranks the same bits as gloo's). Slots alternate between two sets by sequence parity, so a rank that runs
ahead never overwrites a slot a peer is still reading.

Only on CPU (runtime installs it with the other CPU shims), for tensors up to SLOT_BYTES, for groups whose
ranks share a host, on x86-64 (whose store order makes a flag written after the data safe to read), and when
the host has a core for every local rank (a spinning rank must not hold the core of the peer it waits for).
Anything else takes torch.distributed. MEGATRON_SAYO_SHM_COLLECTIVES=0 turns it off.
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
_host_of: list[int] | None = None           # per global rank: a hash of its host name
_channels: dict = {}                        # process group -> _Channel or None (gloo)
_names = itertools.count()


def _host_id() -> int:
    """63 bits of a hash of this machine's host name and boot id (the same for every process on it)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            boot = f.read(64)
    except OSError:
        boot = b""
    digest = hashlib.sha256(socket.gethostname().encode() + b"/" + boot).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def enable() -> bool:
    """Decide, once per job, which ranks may use shared memory: one all-gather of (host, fit) over the world.

    Call on every rank after init_process_group. Returns whether this rank may."""
    global _host_ok, _host_of
    _channels.clear()
    world = dist.get_world_size()
    host = _host_id()
    wanted = (os.environ.get("MEGATRON_SAYO_SHM_COLLECTIVES", "1") != "0"
              and platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir("/dev/shm"))
    mine = torch.tensor([host, int(wanted), os.cpu_count() or 1], dtype=torch.int64)
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    _host_of = [int(t[0]) for t in every]
    _host_ok = usable_ranks(_host_of, [bool(t[1]) for t in every], [int(t[2]) for t in every])
    return _host_ok[dist.get_rank()]


def usable_ranks(hosts: list[int], wanted: list[bool], cores: list[int]) -> list[bool]:
    """Per rank: it wants shared memory and its host has at least one core per rank placed there."""
    return [w and c >= hosts.count(h) for h, w, c in zip(hosts, wanted, cores)]


def disable() -> None:
    """Forget every channel (process groups destroyed); collectives take torch.distributed until `enable`."""
    global _host_ok, _host_of
    _host_ok = _host_of = None
    _channels.clear()


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
        same_host = len({_host_of[r] for r in ranks}) == 1
        usable = same_host and all(_host_ok[r] for r in ranks) and len(ranks) > 1
        _channels[group] = _Channel.open(group, ranks) if usable else None
    return _channels[group]


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
