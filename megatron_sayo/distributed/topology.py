"""Where the ranks run and how their groups talk: logged once at start-up, and used to name a lost peer.

`report()` (every rank, after runtime.init_distributed) gathers each rank's host name and address and the
transport of its TP and DP group; rank 0 prints

    topology: rank 0 host sayo-node1 addr 10.250.0.11
    ...
    topology: TP group [0, 1] hosts sayo-node1: shared memory
    topology: DP group [0, 2] hosts sayo-node1,sayo-node2: gloo

A TP group's transport is what distributed/shm_collectives.py decided for it (shared memory only where all its
ranks share a host, and the segment handshake passed); DP groups always take torch.distributed (gloo on CPU,
NCCL on GPU). `failure_message(exc)` turns a collective's error that names a peer's address (gloo's
"Connection closed by peer [10.250.0.12]:41234") into the ranks and host behind it.
"""

from __future__ import annotations

import re
import socket

import torch
import torch.distributed as dist

_table: list[dict] = []     # per global rank: {"rank", "host", "addr"} (filled by `report`)

_ADDR = re.compile(r"\[?((?:\d{1,3}\.){3}\d{1,3})\]?:\d+")
_PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused",
              "socket timeout", "timed out", "no route to host", "read error", "write error")


def _addr(host: str) -> str:
    """The address this host name resolves to (what gloo binds and peers connect to), '' if none."""
    try:
        return socket.gethostbyname(host)
    except OSError:
        return ""


def _transports(tp_group, dp_group) -> tuple[str, str]:
    if torch.cuda.is_available():
        return "nccl", "nccl"
    from megatron_sayo.distributed import shm_collectives

    return shm_collectives.transport(tp_group), "gloo"


def report(tp_group=None, dp_group=None, *, echo: bool = True) -> list[dict]:
    """Gather host, address and group transports of every rank (collective); rank 0 prints them once.
    Groups default to megatron's TP and DP groups. Returns the rows (every rank gets them)."""
    global _table
    if not dist.is_initialized():
        return []
    if tp_group is None or dp_group is None:
        from megatron.core import parallel_state

        tp_group = tp_group or parallel_state.get_tensor_model_parallel_group()
        dp_group = dp_group or parallel_state.get_data_parallel_group()
    host = socket.gethostname()
    tp, dp = _transports(tp_group, dp_group)
    mine = {"rank": dist.get_rank(), "host": host, "addr": _addr(host),
            "tp_ranks": dist.get_process_group_ranks(tp_group), "tp": tp,
            "dp_ranks": dist.get_process_group_ranks(dp_group), "dp": dp}
    rows: list = [None] * dist.get_world_size()
    dist.all_gather_object(rows, mine)
    _table = rows
    if echo and dist.get_rank() == 0:
        print("\n".join(describe(rows)), flush=True)
    return rows


def describe(rows: list[dict]) -> list[str]:
    """The log lines of `report`: one per rank, then one per distinct TP and DP group."""
    lines = [f"topology: rank {r['rank']} host {r['host']} addr {r['addr'] or '?'}" for r in rows]
    host_of = {r["rank"]: r["host"] for r in rows}
    for kind in ("tp", "dp"):
        seen = set()
        for r in rows:
            ranks = tuple(r[f"{kind}_ranks"])
            if ranks in seen:
                continue
            seen.add(ranks)
            hosts = ",".join(dict.fromkeys(host_of[x] for x in ranks))
            lines.append(f"topology: {kind.upper()} group {list(ranks)} hosts {hosts}: {r[kind]}")
    return lines


def failure_message(exc: BaseException) -> str | None:
    """For an error of a collective that lost a peer: which ranks and host it lost, else None."""
    texts, seen = [], exc
    while seen is not None and len(texts) < 8:
        texts.append(f"{type(seen).__name__}: {seen}")
        seen = seen.__cause__ or seen.__context__
    text = "\n".join(texts)
    lowered = text.lower()
    distributed = isinstance(exc, getattr(dist, "DistError", RuntimeError)) or "gloo" in lowered \
        or "nccl" in lowered or "c10d" in lowered
    if not distributed or not any(k in lowered for k in _PEER_LOST):
        return None
    me = socket.gethostname()
    rank = dist.get_rank() if dist.is_initialized() else "?"
    by_addr: dict[str, list[dict]] = {}
    for r in _table:
        by_addr.setdefault(r["addr"], []).append(r)
    lost = [r for a in dict.fromkeys(_ADDR.findall(text)) for r in by_addr.get(a, []) if r["rank"] != rank]
    if lost and all(r["host"] == me for r in lost):
        ranks = ", ".join(str(r["rank"]) for r in lost)
        return (f"rank {rank} on {me}: lost contact with rank(s) {ranks} on this same host: they stopped, most "
                f"likely on an error of their own (see their ERROR line: a lost node is named there); the job "
                f"stops here, resubmit it to resume from the last complete checkpoint")
    if lost:
        hosts = ", ".join(dict.fromkeys(f"{r['host']} ({r['addr']})" for r in lost))
        ranks = ", ".join(str(r["rank"]) for r in lost)
        return (f"rank {rank} on {me}: lost contact with rank(s) {ranks} on host {hosts}: the host or its "
                f"ranks are gone (a lost node, or ranks killed there); the job stops here, resubmit it to "
                f"resume from the last complete checkpoint")
    known = ", ".join(f"{r['rank']}@{r['host']}" for r in _table) or "unknown"
    return (f"rank {rank} on {me}: a collective lost a peer it cannot name from the error (ranks: {known}); "
            f"the job stops here, resubmit it to resume from the last complete checkpoint")
