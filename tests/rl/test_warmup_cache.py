"""The warm-up cache is reused only when it was trained under the current settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_sayo.config import load_config
from megatron_sayo.rl import warmup

CONFIG = Path(__file__).resolve().parents[2] / "megatron_sayo/configs/tiny.yaml"


@pytest.fixture
def cached(tmp_path, monkeypatch):
    """A config whose warm-up cache exists, and a record of the warm-ups that were (re)trained."""
    cfg = load_config(CONFIG, [f"warmup.cache_dir={tmp_path / 'cache'}"])
    monkeypatch.setattr(warmup.torch.distributed, "get_rank", lambda: 0)
    trained = []
    monkeypatch.setattr(warmup, "run_warmup", lambda c, hf_dir, samples: trained.append(c) or Path(c.warmup.cache_dir))
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "metadata.json").write_text("{}")
    return cfg, cache, trained


def test_matching_cache_is_reused(cached):
    cfg, cache, trained = cached
    (cache / "checkpoint_metadata.json").write_text(json.dumps({"warmup": warmup.fingerprint(cfg, "ckpt")}))
    assert warmup.warmed_up(cfg, "ckpt", []) == cache and trained == []


@pytest.mark.parametrize("override", ["warmup.steps=7", "warmup.lr=0.5", "warmup.seed=3", "rollout.group_size=2"])
def test_stale_cache_is_trained_again(cached, override):
    cfg, cache, trained = cached
    (cache / "checkpoint_metadata.json").write_text(json.dumps({"warmup": warmup.fingerprint(cfg, "ckpt")}))
    changed = load_config(CONFIG, [f"warmup.cache_dir={cache}", override])
    assert warmup.warmed_up(changed, "ckpt", []) == cache and trained == [changed]


def test_cache_without_settings_is_trained_again(cached):
    cfg, cache, trained = cached
    (cache / "checkpoint_metadata.json").write_text(json.dumps({"warmup_steps": 40}))
    warmup.warmed_up(cfg, "ckpt", [])
    assert trained == [cfg]
