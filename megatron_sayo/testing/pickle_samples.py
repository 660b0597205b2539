"""The pickles this interpreter and torch write for what our checkpoints hold, saved for the allow-list tests.

Each Python release pickles some objects its own way (early 3.11 releases: enum members as getattr(cls, name)),
so the allow-list is tested on the exact bytes every supported interpreter produced. `make compat` runs this in
each cell of the matrix and writes tests/formats/pickle_samples/<python>-torch<version>.json where it is missing:

    python -m megatron_sayo.testing.pickle_samples tests/formats/pickle_samples
"""

from __future__ import annotations

import argparse
import base64
import pickle
import platform
import random
import sys
import tempfile
from pathlib import Path

from megatron_sayo.formats.atomic import write_json_atomic


def megatron_save(out_dir: str) -> None:
    """One gloo rank: megatron's dist_checkpointing.save (torch_dist, as our checkpoints) of a tensor and an object."""
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    from megatron_sayo.distributed import runtime

    runtime.init_distributed(1, 1)
    w = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    dist_checkpointing.save({"w": ShardedTensor.from_rank_offsets("layer.w", w, replica_id=0),
                             "o": ShardedObject("extra/obj", {"step": 3}, (1,), (0,), replica_id=0)}, out_dir)


def samples() -> dict[str, bytes]:
    """name -> pickle bytes: a megatron checkpoint's `.metadata`, common state and stored
    objects, optimizer/RNG state as torch.save
    writes it, and every member of the enum classes DCP pickles, at protocols 2 and the default."""
    import numpy as np
    import torch
    from torch.distributed.checkpoint import metadata, planner

    from megatron_sayo.distributed.runtime import spawn_local
    from megatron_sayo.formats.dcp_metadata import load_dcp_metadata

    out: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        spawn_local(megatron_save, 1, tmp, timeout_s=300)
        out["megatron/.metadata"] = (Path(tmp) / ".metadata").read_bytes()
        common = Path(tmp) / "common.pt"          # megatron-core 0.16; later ones store it in the .distcp file
        if common.is_file():
            out["torch.save/common.pt"] = common.read_bytes()
        for key, (file, offset, length) in load_dcp_metadata(out["megatron/.metadata"]).objects.items():
            with open(Path(tmp) / file, "rb") as f:
                f.seek(offset)
                out[f"torch.save/{key}"] = f.read(length)
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=1e-3)
        opt.step()
        path = Path(tmp) / "state.pt"
        torch.save({"optimizer": opt.state_dict(), "rng": {"torch": torch.get_rng_state(),
                                                          "numpy": np.random.get_state(),
                                                          "python": random.getstate()}}, path)
        out["torch.save/state.pt"] = path.read_bytes()
    for cls in (metadata._MEM_FORMAT_ENCODING, planner.WriteItemType, planner.LoadItemType):
        for member in cls:
            for protocol in (2, pickle.DEFAULT_PROTOCOL):
                out[f"enum/{cls.__name__}.{member.name}/protocol{protocol}"] = pickle.dumps(member, protocol)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="folder for <python>-torch<version>.json")
    parser.add_argument("--refresh", action="store_true", help="write the file again where it exists")
    args = parser.parse_args(argv)
    import torch

    name = f"python{platform.python_version()}-torch{torch.__version__.split('+')[0]}.json"
    if (args.out_dir / name).is_file() and not args.refresh:
        print(f"pickle_samples: {args.out_dir / name} exists (--refresh writes it again)")
        return
    record = {"python": sys.version, "torch": torch.__version__,
              "pickles": {k: base64.b64encode(v).decode() for k, v in sorted(samples().items())}}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out_dir / name, record)
    print(f"pickle_samples: wrote {args.out_dir / name} ({len(record['pickles'])} pickles)")


if __name__ == "__main__":
    main()
