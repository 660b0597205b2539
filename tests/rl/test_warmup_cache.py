"""The warm-up cache is keyed by its settings: a config finds only the warm-up trained under its own settings,
two configs never share (or overwrite) one, and a folder whose recorded settings differ is trained again."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from megatron_sayo.config import load_config
from megatron_sayo.rl import warmup

CONFIG = Path(__file__).resolve().parents[2] / "megatron_sayo/configs/tiny.yaml"


@pytest.fixture
def trained(monkeypatch):
    """The warm-ups that were (re)trained; training is replaced by writing the folder it would publish."""
    monkeypatch.setattr(warmup.torch.distributed, "get_rank", lambda: 0)
    record = []

    def fake_run(cfg, hf_dir, samples):
        out = warmup.warmup_dir(cfg, hf_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metadata.json").write_text("{}")
        (out / "checkpoint_metadata.json").write_text(json.dumps({"warmup": warmup.fingerprint(cfg, hf_dir)}))
        record.append(cfg)
        return out

    monkeypatch.setattr(warmup, "run_warmup", fake_run)
    return record


def test_key_is_the_hash_of_the_settings(tmp_path):
    cfg = load_config(CONFIG, [f"warmup.cache_dir={tmp_path}"])
    want = hashlib.sha256(json.dumps(warmup.fingerprint(cfg, "ckpt"), sort_keys=True).encode()).hexdigest()[:16]
    assert warmup.warmup_dir(cfg, "ckpt") == tmp_path / want
    assert warmup.fingerprint(cfg, "ckpt")["train_file"] == str(Path(cfg.data.train_file).resolve())


def test_same_settings_reuse_one_warmup(tmp_path, trained):
    cfg = load_config(CONFIG, [f"warmup.cache_dir={tmp_path}"])
    first = warmup.warmed_up(cfg, "ckpt", [])
    again = load_config(CONFIG, [f"warmup.cache_dir={tmp_path}", "train.seed=7", "optim.lr=3e-4", "run_dir=x"])
    assert warmup.warmed_up(again, "ckpt", []) == first and trained == [cfg]   # GRPO-only settings share it


@pytest.mark.parametrize("override", ["warmup.steps=7", "warmup.lr=0.5", "warmup.seed=3", "rollout.group_size=2",
                                      "warmup.batch=8",
                                      "data.synthetic_n=64", "data.synthetic_task=shapes"])
def test_other_settings_get_their_own_folder(tmp_path, trained, override):
    cfg = load_config(CONFIG, [f"warmup.cache_dir={tmp_path}"])
    first = warmup.warmed_up(cfg, "ckpt", [])
    other = load_config(CONFIG, [f"warmup.cache_dir={tmp_path}", override])
    second = warmup.warmed_up(other, "ckpt", [])
    assert second != first and second.parent == first.parent and trained == [cfg, other]
    assert (first / "metadata.json").is_file()                 # the first config's warm-up is still there
    assert warmup.warmed_up(cfg, "ckpt", []) == first and len(trained) == 2


def test_an_edited_training_file_is_a_new_warmup(tmp_path, trained):
    data = tmp_path / "train.jsonl"
    data.write_text('{"id": "a"}\n')
    cfg = load_config(CONFIG, [f"warmup.cache_dir={tmp_path / 'cache'}", "data.synthetic_n=0",
                               f"data.train_file={data}", "data.eval_file=null", "eval.interval=0"])
    first = warmup.warmup_dir(cfg, "ckpt")
    data.write_text('{"id": "a"}\n{"id": "b"}\n')
    assert warmup.warmup_dir(cfg, "ckpt") != first


def test_folder_with_other_recorded_settings_is_trained_again(tmp_path, trained):
    cfg = load_config(CONFIG, [f"warmup.cache_dir={tmp_path}"])
    out = warmup.warmup_dir(cfg, "ckpt")
    out.mkdir(parents=True)
    (out / "metadata.json").write_text("{}")
    (out / "checkpoint_metadata.json").write_text(json.dumps({"warmup_steps": 40}))
    assert warmup.warmed_up(cfg, "ckpt", []) == out and trained == [cfg]


def test_warmup_batch_must_split_over_data_parallel_ranks():
    from megatron_sayo.config import ConfigError

    cfg = load_config(CONFIG, ["parallel.tp=1", "warmup.batch=15"])
    with pytest.raises(ConfigError, match="warmup: 15 answers per step .warmup.batch. must split evenly over dp=2"):
        cfg.validate_world(2)
    assert cfg.validate_world(1) == 1 and load_config(CONFIG, ["parallel.tp=1", "warmup.batch=16"]).validate_world(2)
    assert cfg.warmup_answers() == 15 and load_config(CONFIG).warmup_answers() == 4 * 4   # gb x G of tiny.yaml
