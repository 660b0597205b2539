"""Training across two Slurm nodes made of namespaces (scripts/slurm_local.sh start --nodes 2, docs/slurm.md).

The nodes are network + UTS namespaces of this machine, each with its own host name and address on a private
bridge; slurm/train_7b.sbatch runs across them unchanged (TP=2 inside each node, DP=2 across them over gloo).
The reference for every metric is a one-node run of the same layout and seed (4 ranks on one node).

Uses the running cluster when it has two namespace nodes of scripts/slurm_local.sh; else starts a separate one
for this module (its own config, port, namespaces) and removes it afterwards. Skips, with the reason, only
where network namespaces cannot be made (not root, no iproute2, no CAP_SYS_ADMIN).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_utils import FINAL_STATES, job_output, wait_for

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts/slurm_local.sh"
TRAIN_7B = ROOT / "slurm/train_7b.sbatch"
TINY = "megatron_sayo/configs/tiny.yaml"
STEPS = 4
COMPARED = ("reward_total", "reward_attention", "reward_format", "reward_accuracy", "loss", "pg_loss", "kl",
            "grad_norm")
REL = 1e-6

OWN_STATE = Path("/run/slurm_local_test2")      # the separate cluster of this module (see `cluster`)
OWN_PREFIX = "sayot"

pytestmark = [pytest.mark.slurm, pytest.mark.multiproc]   # Slurm jobs, sbatch and the cluster script


def _run(cmd, env=None, timeout=120, check=False):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=timeout,
                          check=check)


def _namespace_nodes(env) -> list[str]:
    """Usable nodes of the answering cluster that are network namespaces of this machine."""
    if shutil.which("sinfo") is None:
        return []
    try:
        out = _run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, timeout=20)
    except subprocess.TimeoutExpired:
        return []
    nodes = sorted({ln.split()[0] for ln in out.stdout.splitlines()
                    if len(ln.split()) == 2 and ln.split()[1].rstrip("*~#") in ("idle", "mix", "alloc")})
    return [n for n in nodes if Path("/run/netns", n).exists()]


def _why_no_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return "iproute2 (ip) / util-linux (unshare, nsenter) missing"
    probe = _run(["unshare", "--net", "--uts", "--mount", "true"], timeout=20)
    if probe.returncode != 0:
        return f"cannot make network/UTS/mount namespaces here: {probe.stderr.strip()}"
    return None


class Cluster:
    def __init__(self, env: dict, nodes: list[str], own: bool):
        self.env, self.nodes, self.own = env, nodes, own

    def script(self, *args, timeout=180):
        out = _run([SCRIPT, *args], env=self.env, timeout=timeout)
        assert out.returncode == 0, f"slurm_local.sh {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
        return out.stdout

    def sbatch(self, args, extra_env=None) -> str:
        out = _run(["sbatch", "--parsable", *args], env={**self.env, **(extra_env or {})}, timeout=60)
        assert out.returncode == 0, f"sbatch failed: {out.stderr.strip()}"
        return out.stdout.strip().split(";")[0]

    def field(self, job: str, name: str) -> str | None:
        out = _run(["scontrol", "show", "job", "-o", job], env=self.env, timeout=30)
        m = re.search(rf"\b{name}=(\S+)", out.stdout)
        return m.group(1) if m else None

    def wait_idle(self, timeout=120):
        deadline = time.monotonic() + timeout
        while True:
            out = _run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, timeout=20).stdout
            states = {ln.split()[0]: ln.split()[1] for ln in out.splitlines() if len(ln.split()) == 2}
            if all(states.get(n) == "idle" for n in self.nodes):
                return
            assert time.monotonic() < deadline, f"nodes not idle after {timeout}s: {states}"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster():
    env = dict(os.environ)
    nodes = _namespace_nodes(env)
    if len(nodes) >= 2:
        yield Cluster(env, nodes[:2], own=False)
        return
    why = _why_no_namespaces()
    if why:
        pytest.skip(f"two-node local Slurm: {why}")
    # a fixed state folder (not a pytest tmp one): a session killed before its teardown left this cluster up,
    # and the `stop` below removes it before the start (its pid files and node count are found there)
    base = OWN_STATE
    env.update(SLURM_CONF=str(base / "slurm.conf"), SLURM_LOCAL_STATE=str(base),
               SLURM_LOCAL_PREFIX=OWN_PREFIX, SLURM_LOCAL_PORT="6917", SLURM_LOCAL_SUBNET="10.250.7")
    own = Cluster(env, [f"{OWN_PREFIX}-node1", f"{OWN_PREFIX}-node2"], own=True)
    try:
        own.script("stop")
        own.script("start", "--nodes", "2")
        yield own
    finally:
        out = _run([SCRIPT, "stop"], env=env, timeout=180)
        left = sorted(p.name for p in Path("/run/netns").glob(f"{OWN_PREFIX}-*"))
        left += [f"/etc/netns/{p.name}" for p in Path("/etc/netns").glob(f"{OWN_PREFIX}-*")]
        assert out.returncode == 0 and not left, f"stop left {left}:\n{out.stdout}\n{out.stderr}"


def job_args(tmp: Path, name: str, nodes: int, per_node: int) -> list[str]:
    return [f"--nodes={nodes}", f"--ntasks-per-node={per_node}", "--gpus-per-node=0", "--cpus-per-task=1",
            "--time=10", "--signal=B:USR1@30", f"--job-name={name}", f"--output={tmp}/%x-%j.out", f"--chdir={ROOT}"]


def overrides(tmp: Path, interval: int = 0) -> list[str]:
    """The issue's command (TP=2, 4 steps) with the small groups/completions of the one-node slurm tests."""
    return [TINY, "parallel.tp=2", f"train.steps={STEPS}", "train.global_batch=2", "train.micro_batch=2",
            "rollout.group_size=2", "rollout.max_new_tokens=8", "warmup.steps=0", "data.synthetic_n=8",
            f"checkpoint.interval={interval}", f"data.synthetic_dir={tmp}/data", f"run_dir={tmp}/run",
            "log.tensorboard=false", "eval.interval=0"]


def rows_by_step(run: Path) -> dict[int, dict]:
    """metrics.jsonl by step, the last line of a step winning (a resumed run logs again the steps after its
    checkpoint)."""
    path = run / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    return {r["step"]: r for r in rows}


def max_rel_diff(got: dict[int, dict], ref: dict[int, dict], steps) -> tuple[float, str]:
    worst, where = 0.0, ""
    for step in steps:
        for key in COMPARED:
            a, b = float(got[step][key]), float(ref[step][key])
            rel = abs(a - b) / max(abs(a), abs(b)) if a != b else 0.0
            if rel > worst:
                worst, where = rel, f"step {step} {key}: {a!r} vs {b!r}"
    return worst, where


def topology(text: str) -> tuple[dict[int, str], list[tuple[str, list[int], list[str], str]]]:
    hosts = {int(r): h for r, h in re.findall(r"^topology: rank (\d+) host (\S+) addr", text, re.M)}
    groups = [(k, json.loads(r), h.split(","), t)
              for k, r, h, t in re.findall(r"^topology: (TP|DP) group (\[[^\]]*\]) hosts (\S+): (.*)$", text, re.M)]
    return hosts, groups


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    """The one-node run: 4 ranks on one node, the same layout (TP=2, DP=2) and seed."""
    tmp = tmp_path_factory.mktemp("one_node")
    job = cluster.sbatch([*job_args(tmp, "ref", 1, 4), f"--nodelist={cluster.nodes[0]}", TRAIN_7B,
                          *overrides(tmp)])
    state = wait_for_env(cluster, job, 400)
    text = job_output(tmp / f"ref-{job}.out")
    assert state == "COMPLETED", text
    rows = rows_by_step(tmp / "run")
    assert sorted(rows) == list(range(1, STEPS + 1)), text
    hosts, _ = topology(text)
    assert set(hosts.values()) == {cluster.nodes[0]}, text
    return rows


def wait_for_env(cluster: Cluster, job: str, timeout: float) -> str:
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = cluster.env.get("SLURM_CONF", "/etc/slurm/slurm.conf")
    try:
        return wait_for(job, timeout=timeout)
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF")
        else:
            os.environ["SLURM_CONF"] = old


def state_of(cluster: Cluster, job: str) -> str | None:
    return cluster.field(job, "JobState")


def test_two_nodes_preempted_equal_one_node(cluster, reference, tmp_path):
    """sbatch --nodes=2 --ntasks-per-node=2 train_7b.sbatch (TP=2 per node, DP=2 across), preempted with USR1
    once its ranks run: it checkpoints, requeues, resumes on both nodes; every step equals the one-node run."""
    job = cluster.sbatch([*job_args(tmp_path, "two", 2, 2), TRAIN_7B, *overrides(tmp_path)],
                         extra_env={"MEGATRON_SAYO_SHM_COLLECTIVES": "always"})   # TP in each node through /dev/shm
    run, log = tmp_path / "run", tmp_path / f"two-{job}.out"
    # the ranks are up (their signal handlers too) once rank 0 logged the topology: preempt then, so the stop
    # comes after the first step or soon after, well before the last (steps take well under a second)
    deadline = time.monotonic() + 400
    while not (log.is_file() and "topology: DP group" in log.read_text()):
        assert time.monotonic() < deadline, f"the ranks did not start in 400s (state {state_of(cluster, job)})"
        assert state_of(cluster, job) in ("PENDING", "RUNNING", "CONFIGURING"), job_output(log)
        time.sleep(0.2)
    _run(["scancel", "--batch", "--signal=USR1", job], env=cluster.env, check=True)
    deadline = time.monotonic() + 300
    while not (cluster.field(job, "Restarts") == "1" and state_of(cluster, job) == "PENDING"):
        assert time.monotonic() < deadline, f"not requeued (state {state_of(cluster, job)}):\n{job_output(log)}"
        assert state_of(cluster, job) not in FINAL_STATES, job_output(log)
        time.sleep(0.2)
    stopped_at = max(rows_by_step(run))
    assert 0 < stopped_at < STEPS, "the job finished before the signal: nothing was preempted"
    cluster.wait_idle()     # releasing while a node still ends the first run gets the job killed (see one-node test)
    time.sleep(2)
    _run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=cluster.env, check=True)
    state = wait_for_env(cluster, job, 400)
    text = job_output(log)
    assert state == "COMPLETED", text
    assert f"resuming {run} from its checkpoint at step {stopped_at} of {STEPS}" in text, text
    assert len(re.findall(r"restart \d+: 2 node\(s\)", text)) == 2, text

    # every rank reports its host: two hosts, two ranks each; no TP group spans two hosts; TP through shared
    # memory (forced on: one core per rank is not there), DP across the hosts over gloo. Both runs report it.
    hosts, groups = topology(text)
    assert sorted(hosts) == [0, 1, 2, 3] and sorted(set(hosts.values())) == sorted(cluster.nodes), text
    assert [hosts[r] for r in range(4)].count(cluster.nodes[0]) == 2, hosts
    tp = [g for g in groups if g[0] == "TP"]
    dp = [g for g in groups if g[0] == "DP"]
    assert len(tp) == 4 and len(dp) == 4, groups     # 2 groups of each kind, logged by each of the 2 runs
    for _, ranks, group_hosts, transport in tp:
        assert len(group_hosts) == 1 and {hosts[r] for r in ranks} == set(group_hosts), groups
        assert transport == "shared memory", groups
    for _, _ranks, group_hosts, transport in dp:
        assert sorted(group_hosts) == sorted(cluster.nodes), groups
        assert transport == "gloo", groups

    rows = rows_by_step(run)
    assert sorted(rows) == list(range(1, STEPS + 1)), text
    worst, where = max_rel_diff(rows, reference, range(1, STEPS + 1))
    print(f"two nodes (preempted at step {stopped_at}) vs one node: max relative difference {worst:.3g} {where}")
    assert worst <= REL, f"two-node run differs from the one-node run: {where} (relative {worst:.3g})"


def test_lost_node_fails_fast_and_resumes_from_last_complete_checkpoint(cluster, reference, tmp_path):
    """The second node dies (slurmd, steps and ranks killed) while the ranks write the step-2 checkpoint: the
    job ends in seconds with an error naming the lost ranks and host, step_0000002 is never complete, and the
    next submission resumes from step 1 and finishes equal to the one-node run."""
    node1, node2 = cluster.nodes
    args = [*job_args(tmp_path, "lost", 2, 2), TRAIN_7B, *overrides(tmp_path, interval=1)]
    job = cluster.sbatch(["--no-requeue", *args])
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    half = ckpts / "step_0000002.tmp"
    deadline, polls = time.monotonic() + 400, 0
    while not half.is_dir():
        assert time.monotonic() < deadline, f"no step-2 checkpoint started after 400s (state {state_of(cluster, job)})"
        polls += 1
        if polls % 100 == 0:    # scontrol is slow next to the checkpoint: ask it about once every 2 s
            assert state_of(cluster, job) in ("PENDING", "RUNNING", "CONFIGURING"), \
                job_output(tmp_path / f"lost-{job}.out")
        time.sleep(0.02)
    cluster.script("fail-node", node2)
    killed = time.monotonic()
    state = wait_for_env(cluster, job, 240)
    took = time.monotonic() - killed
    text = job_output(tmp_path / f"lost-{job}.out")
    assert state in ("FAILED", "NODE_FAIL"), text
    assert took < 120, f"the job took {took:.0f}s to end after its node was lost (process-group timeout: 30 min)"
    assert re.search(rf"ERROR: rank [01] on {node1}: lost contact with rank\(s\) 2, 3 on host {node2} ", text), text
    print(f"lost node: job {state} {took:.0f}s after the kill")

    # the half-written step is not a checkpoint: latest and the resume scan both name step 1
    from megatron_sayo.checkpoint.files import find_resumable

    assert not (ckpts / "step_0000002").exists(), sorted(p.name for p in ckpts.iterdir())
    assert (ckpts / "latest").read_text().strip() == "step_0000001"
    assert find_resumable(run) == ckpts / "step_0000001"

    cluster.script("start", "--nodes", "2")     # the node comes back
    cluster.wait_idle()
    again = cluster.sbatch(args)
    state = wait_for_env(cluster, again, 400)
    text = job_output(tmp_path / f"lost-{again}.out")
    assert state == "COMPLETED", text
    assert f"resuming {run} from its checkpoint at step 1 of {STEPS}" in text, text
    rows = rows_by_step(run)
    assert sorted(rows) == list(range(1, STEPS + 1)), text
    worst, where = max_rel_diff(rows, reference, range(1, STEPS + 1))
    print(f"lost node + resume vs one node: max relative difference {worst:.3g} {where}")
    assert worst <= REL, f"resumed run differs from the one-node run: {where} (relative {worst:.3g})"


SHM_PROBE = r'''
import os, socket, sys
import torch, torch.distributed as dist
from megatron_sayo.distributed import shm_collectives as shm
rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                        rank=rank, world_size=world)
os.environ["MEGATRON_SAYO_SHM_COLLECTIVES"] = "always"
shm.enable()
natural = shm.transport(None)
shm._host_of = [shm._host_of[0]] * world      # pretend "same host" meant only what the handshake can see
shm._channels.clear(); shm._reasons.clear()
forced = shm.transport(None)
total = shm.all_reduce(torch.full((4,), float(rank + 1))).tolist()
print(f"PROBE {sys.argv[1]} rank={rank} host={socket.gethostname()} natural={natural} | forced={forced} | "
      f"sum={total}", flush=True)
dist.barrier()
os._exit(0)     # no gloo teardown: a peer closing first can abort it ("terminate called ...")
'''


def test_same_host_means_same_node_not_same_dev_shm(cluster, tmp_path):
    """Ranks on two namespace nodes of one kernel: shm_collectives gives their group gloo (two hosts: the host
    id is kernel + host name + network namespace). The handshake alone would not: with the host ids made equal
    it passes, /dev/shm being one tmpfs for both nodes; with a private /dev/shm per rank it fails (gloo)."""
    probe = tmp_path / "probe.py"
    probe.write_text(SHM_PROBE)
    py = ROOT / ".venv/bin/python" if (ROOT / ".venv/bin/python").exists() else Path(sys.executable)
    batch = tmp_path / "probe.sbatch"
    batch.write_text(f"""#!/bin/bash
set -euo pipefail
export PYTHONPATH={ROOT} OMP_NUM_THREADS=1
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
srun --kill-on-bad-exit=1 {py} {probe} shared
export MASTER_PORT=$((MASTER_PORT + 1))
srun --kill-on-bad-exit=1 unshare --mount --propagation private /bin/sh -c \\
    'mount -t tmpfs -o size=64m tmpfs /dev/shm && exec "$0" "$@"' {py} {probe} private
""")
    job = cluster.sbatch(["--nodes=2", "--ntasks-per-node=1", "--time=5", f"--output={tmp_path}/%j.out", batch])
    state = wait_for_env(cluster, job, 300)
    text = job_output(tmp_path / f"{job}.out")
    assert state == "COMPLETED", text
    found = re.findall(r"PROBE (\w+) rank=(\d) host=(\S+) natural=(.*) \| forced=(.*) \| sum=(.*)", text)
    assert len(found) == 4, text
    assert {f[2] for f in found} == set(cluster.nodes), text
    for kind, _, _, natural, forced, total in found:
        assert natural == "gloo: its ranks are on 2 hosts", text
        assert total == "[3.0, 3.0, 3.0, 3.0]", text
        if kind == "shared":
            assert forced == "shared memory", text
        else:
            assert forced == "gloo: one host, but the ranks do not share a /dev/shm segment", text
