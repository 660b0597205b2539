"""log.wandb: the metrics logger writes a Weights & Biases run in offline mode (the default), under run_dir/wandb,
with the scalars of each step; nothing is sent (no API key, offline). Uses the real wandb client (in the test extra;
for users an optional extra, `pip install 'megatron_sayo[wandb]'`: without it log.wandb = true stops with that
advice)."""

from __future__ import annotations

import pytest
import wandb

from megatron_sayo.config import LogConfig
from megatron_sayo.rl.metrics import MetricsLogger


@pytest.mark.multiproc     # the wandb client starts its service process
def test_offline_run_holds_the_logged_scalars(tmp_path, monkeypatch):
    from wandb.proto import wandb_internal_pb2

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = LogConfig(wandb=True)
    assert cfg.wandb_mode == "offline"
    logger = MetricsLogger(tmp_path, True, 3, tensorboard=False, wandb=cfg, run_config={"train": {"steps": 3}})
    rows = [{"step": s, "reward_total": 0.5 * s, "reward_attention": 0.1, "reward_format": 1.0,
             "reward_accuracy": 0.0, "tas": 1.0 + s, "completion_tokens": 9.0, "tokens_per_s": 10.0,
             "time_step": 0.1, "sample_completion": "text is not a scalar"} for s in (1, 2, 3)]
    for row in rows:
        logger.log(row)
    logger.close()
    wandb.teardown()   # the service writes the transaction log out when it stops (at exit in a training run)
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    history = []
    for data in wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            history.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    got = [(int(h["_step"]), float(h["reward_total"]), float(h["tas"])) for h in history]
    assert got == [(r["step"], r["reward_total"], r["tas"]) for r in rows]
    assert all("sample_completion" not in h for h in history)


def wandb_records(path) -> list[bytes]:
    """The records of a .wandb transaction log: a 7-byte header (":W&B", 0xBEE1, version), then LevelDB log
    blocks of 32 KiB holding [crc32 4 | length 2 | type 1 | data] chunks (1 full, 2 first, 3 middle, 4 last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    out, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:            # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            out.append(pending + chunk)
    return out
