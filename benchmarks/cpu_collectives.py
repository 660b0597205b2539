"""TP collectives on CPU: gloo's all_reduce / all_gather vs the shared-memory ones (distributed/shm_collectives).

Two local ranks (each on its own core, as a TP=2 CPU run), tensors the size of a decode step's row-parallel
output ([1, rows, hidden]) and of a prefill's, alone and with a small GEMM between calls (so the ranks
arrive at slightly different times, as in a forward pass). Prints microseconds per call, gloo vs shared
memory, and the ratio (with the GEMM: the time per GEMM + call); also checks both give the same bits.

    python benchmarks/cpu_collectives.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import time


def _rank(calls: int) -> list[tuple] | None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_sayo.distributed import runtime, shm_collectives

    runtime.init_distributed(tp=2)
    group, rank = parallel_state.get_tensor_model_parallel_group(), dist.get_rank()
    weight = torch.randn(512, 512)
    rows = []
    for label, shape in (("decode [1, 16, 64]", (1, 16, 64)), ("decode [1, 16, 1024]", (1, 16, 1024)),
                         ("prefill [256, 4, 512]", (256, 4, 512))):
        for work in (0, 1):
            x = torch.randn(shape, generator=torch.Generator().manual_seed(rank))
            times = {}
            for name, reduce in (("gloo", lambda t: dist.all_reduce(t, group=group)),
                                 ("shm", lambda t: shm_collectives.all_reduce(t, group))):
                n = calls if shape[0] == 1 else calls // 10
                for i in range(n // 10 + n):
                    if i == n // 10:
                        dist.barrier()
                        start = time.perf_counter()
                    for _ in range(work):
                        torch.mm(weight, weight[:, :64])
                    reduce(x.clone())
                times[name] = (time.perf_counter() - start) / n * 1e6
            reference = x.clone()
            dist.all_reduce(reference, group=group)
            same = torch.equal(reference, shm_collectives.all_reduce(x.clone(), group))
            rows.append((label + (" + GEMM" if work else ""), times["gloo"], times["shm"], same))
    return rows if rank == 0 else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=2000, help="collective calls timed per size")
    args = p.parse_args(argv)
    from megatron_sayo.distributed.runtime import spawn_local

    rows = next(r for r in spawn_local(_rank, 2, args.calls, timeout_s=1200) if r is not None)
    print(f"{'all_reduce, TP=2 on 2 CPU ranks':<34}{'gloo us':>10}{'shm us':>10}{'shm/gloo':>10}  same bits")
    for label, gloo, shm, same in rows:
        print(f"{label:<34}{gloo:>10.1f}{shm:>10.1f}{shm / gloo:>10.2f}  {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
