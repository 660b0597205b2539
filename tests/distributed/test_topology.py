"""Host identity for the shared-memory decision, and naming the peer a failed collective lost (no processes)."""

from __future__ import annotations

import socket

from megatron_sayo.distributed import shm_collectives, topology


def test_host_id_separates_namespace_nodes_of_one_kernel(monkeypatch):
    """Two UTS/network namespaces on one kernel share the boot id: the host name, and the network namespace
    where the name is the same, still make them two hosts; the kernel id (core budget) stays one."""
    monkeypatch.setattr(shm_collectives, "_boot_id", lambda: b"boot-1")
    ids = {}
    for name, netns in (("node1", b"111"), ("node2", b"222"), ("node1", b"333"), ("node1", b"111")):
        monkeypatch.setattr(socket, "gethostname", lambda n=name: n)
        monkeypatch.setattr(shm_collectives, "_netns", lambda ns=netns: ns)
        ids.setdefault(shm_collectives._host_id(), []).append((name, netns))
    assert sorted(map(len, ids.values())) == [1, 1, 2], ids   # only the same name in the same netns match
    assert shm_collectives._kernel_id() == shm_collectives._kernel_id()
    monkeypatch.setattr(shm_collectives, "_boot_id", lambda: b"boot-2")
    monkeypatch.setattr(socket, "gethostname", lambda: "node1")
    monkeypatch.setattr(shm_collectives, "_netns", lambda: b"111")
    assert shm_collectives._host_id() not in ids          # another kernel (after a reboot, or another machine)


def test_core_budget_is_per_kernel():
    # two namespace nodes (hosts 1, 2) of one 2-core kernel, 2 ranks each: 4 ranks spin on 2 cores -> no
    hosts, wanted, cores, kernels = [1, 1, 2, 2], [True] * 4, [2] * 4, [9] * 4
    assert shm_collectives.usable_ranks(hosts, wanted, cores, kernels) == [False] * 4
    # per host (no kernels given) each node would look fine: the old rule
    assert shm_collectives.usable_ranks(hosts, wanted, cores) == [True] * 4
    # MEGATRON_SAYO_SHM_COLLECTIVES=always skips the count; off stays off
    assert shm_collectives.usable_ranks(hosts, [True, False, True, True], cores, kernels, always=[True] * 4) == \
        [True, False, True, True]
    # two real machines (two kernels) with 2 cores and 2 ranks each -> yes
    assert shm_collectives.usable_ranks(hosts, wanted, cores, [1, 1, 2, 2]) == [True] * 4


GLOO_LOST = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
             "[10.250.0.12]:15596. This is typically caused by a remote worker crashing.")


def test_failure_message_names_the_lost_ranks_and_host(monkeypatch):
    monkeypatch.setattr(topology, "_table", [
        {"rank": 0, "host": "n1", "addr": "10.250.0.11"}, {"rank": 1, "host": "n1", "addr": "10.250.0.11"},
        {"rank": 2, "host": "n2", "addr": "10.250.0.12"}, {"rank": 3, "host": "n2", "addr": "10.250.0.12"}])
    monkeypatch.setattr(socket, "gethostname", lambda: "n1")
    msg = topology.failure_message(RuntimeError(GLOO_LOST))
    assert msg is not None and "lost contact with rank(s) 2, 3 on host n2 (10.250.0.12)" in msg, msg
    # the same error from a local peer that stopped first: not blamed as a lost node
    local = topology.failure_message(RuntimeError(GLOO_LOST.replace("10.250.0.12", "10.250.0.11")))
    assert local is not None and "on this same host" in local and "host n2" not in local, local
    # an error wrapped by another keeps its cause
    try:
        try:
            raise RuntimeError(GLOO_LOST)
        except RuntimeError as inner:
            raise ValueError("step failed") from inner
    except ValueError as outer:
        assert "rank(s) 2, 3 on host n2" in topology.failure_message(outer)
    # not a lost peer: nothing to add
    assert topology.failure_message(RuntimeError("shape mismatch [1.2.3.4]:5")) is None
    assert topology.failure_message(ValueError("Connection closed by peer, but not from a collective")) is None


def test_describe_lists_hosts_and_group_transports():
    rows = [{"rank": r, "host": f"n{r // 2 + 1}", "addr": f"10.0.0.{r // 2 + 1}",
             "tp_ranks": [r - r % 2, r - r % 2 + 1], "tp": "shared memory", "dp_ranks": [r % 2, r % 2 + 2],
             "dp": "gloo"} for r in range(4)]
    lines = topology.describe(rows)
    assert lines[:4] == [f"topology: rank {r} host n{r // 2 + 1} addr 10.0.0.{r // 2 + 1}" for r in range(4)]
    assert lines[4:] == ["topology: TP group [0, 1] hosts n1: shared memory",
                         "topology: TP group [2, 3] hosts n2: shared memory",
                         "topology: DP group [0, 2] hosts n1,n2: gloo",
                         "topology: DP group [1, 3] hosts n1,n2: gloo"]
