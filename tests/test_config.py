"""Config: YAML + dotted overrides, errors that name the key, the example files, the CLI."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_sayo.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    describe,
    load_config,
    parse_override,
    reference_markdown,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "megatron_sayo" / "configs" / "tiny.yaml"
MINIMAL = {"model": {"hf_path": "ckpt"}, "data": {"train_file": "train.jsonl"}}


def write(tmp_path, data) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_defaults_are_the_paper_hyperparameters():
    cfg = config_from_dict(MINIMAL)
    assert (cfg.rollout.group_size, cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_new_tokens) == \
        (16, 1.0, 0.9, 110)
    assert (cfg.loss.clip_eps, cfg.loss.kl_beta, cfg.loss.aggregation, cfg.loss.advantage_eps) == \
        (0.2, 0.001, "token", 1e-4)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.grad_clip) == (5e-6, 0.01, 0.8)
    r = cfg.reward
    assert (r.weights.attention, r.weights.format, r.weights.accuracy) == (1.0, 1.0, 0.0)
    assert (r.eps, r.top_entropy_ratio, r.format_long_bound, r.format_short_bound, r.format_factor) == \
        (1e-8, 0.3, 100, 60, 0.6)


def test_overrides_are_yaml_values(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["train.steps=20", "parallel.tp=2", "optim.lr=5e-6",
                                                  "reward.weights.accuracy=0.5", "data.max_pixels=null",
                                                  "model.make_tiny_if_missing=true"])
    assert cfg.train.steps == 20 and cfg.parallel.tp == 2
    assert cfg.optim.lr == 5e-6 and isinstance(cfg.optim.lr, float)
    assert cfg.reward.weights.accuracy == 0.5 and cfg.data.max_pixels is None
    assert cfg.model.make_tiny_if_missing is True
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])


def test_round_trip_through_dict(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["rollout.group_size=8"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg and isinstance(again, RunConfig)


@pytest.mark.parametrize("override, words", [
    ("train.step=3", ["train.step", "steps", "global_batch"]),
    ("trian.steps=3", ["trian", "train", "rollout"]),
    ("reward.attention_form=foo", ["reward.attention_form", "'paper'", "'code'"]),
    ("model.attention_backend=cuda", ["model.attention_backend", "'sdpa'", "'flash'"]),
    ("model.layer_backend=apex", ["model.layer_backend", "'local'", "'te'"]),
    ("data.on_error=ignore", ["data.on_error", "'raise'", "'skip'"]),
    ("parallel.tp=two", ["parallel.tp", "expected int"]),
    ("parallel.tp=2.5", ["parallel.tp", "expected int"]),
    ("parallel.tp=0", ["parallel.tp", ">= 1"]),
    ("rollout.top_p=1.5", ["rollout.top_p", "<= 1"]),
    ("optim.lr=abc", ["optim.lr", "expected float"]),
    ("log.tensorboard=3", ["log.tensorboard", "expected bool"]),
    ("model.megatron_path=x", ["exactly one", "model.hf_path"]),
    ("trainsteps", ["section.key=value"]),
])
def test_errors_name_the_key_and_the_choices(tmp_path, override, words):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    for word in words:
        assert word in str(err.value)


def test_file_errors_name_the_file(tmp_path):
    path = write(tmp_path, {**MINIMAL, "loss": {"kl_beta": -1}})
    with pytest.raises(ConfigError, match=rf"{path}.*loss.kl_beta.*>= 0"):
        load_config(path)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed"))


def test_world_size_validation(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["parallel.tp=2", "parallel.pp=2", "train.global_batch=2",
                                                  "rollout.group_size=4", "train.micro_batch=2"])
    assert cfg.validate_world(8) == 2
    with pytest.raises(ConfigError, match="not divisible"):
        cfg.validate_world(6)
    with pytest.raises(ConfigError, match="global_batch = 2 prompts must split evenly over dp=3"):
        cfg.validate_world(4 * 3)  # dp=3: 2 prompts do not split
    odd = load_config(write(tmp_path, MINIMAL), ["train.global_batch=2", "rollout.group_size=3",
                                                 "train.micro_batch=4"])
    with pytest.raises(ConfigError, match="micro_batch"):
        odd.validate_world(2)  # dp=2: 6 completions do not split into 2 x 4


@pytest.mark.parametrize("name", ["tiny", "qwen25vl_7b", "qwen25vl_72b", "qwen25vl_7b_lora", "qwen25vl_72b_lora"])
def test_examples_load(name):
    cfg = load_config(TINY if name == "tiny" else ROOT / "examples" / f"{name}.yaml")
    assert cfg.lora.enabled == name.endswith("_lora")
    if cfg.lora.enabled:  # the paper's LoRA: rank 16, alpha 32, every linear of the language decoder
        assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.vision) == (16, 32.0, 0.0, False)
        assert cfg.lora.targets == ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    if name != "tiny":  # the paper's numbers
        assert (cfg.rollout.group_size, cfg.optim.lr, cfg.loss.kl_beta, cfg.rollout.max_new_tokens) == \
            (16, 5e-6, 0.001, 110)
    else:
        assert cfg.parallel.tp == 2 and cfg.validate_world(2) == 1


def test_lora_block_defaults_and_errors():
    lora = config_from_dict(MINIMAL).lora
    assert not lora.enabled and (lora.rank, lora.alpha, lora.dropout) == (16, 32.0, 0.0)
    assert lora.targets == ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    cfg = config_from_dict({**MINIMAL, "lora": {"enabled": True, "targets": ["linear_qkv"]}})
    assert cfg.lora.targets == ["linear_qkv"]
    for lora, words in [({"targets": ["q_proj"]}, "linear_qkv, linear_proj"), ({"targets": []}, "non-empty"),
                        ({"targets": "linear_qkv"}, "a list of str"), ({"rank": 0}, "lora.rank"),
                        ({"enabled": True, "vision": True}, "vision tower"),
                        ({"targets": ["linear_qkv", 3]}, "lora.targets[1]")]:
        with pytest.raises(ConfigError, match="lora"):
            try:
                config_from_dict({**MINIMAL, "lora": lora})
            except ConfigError as exc:
                assert words in str(exc), str(exc)
                raise
    with pytest.raises(ConfigError, match="layer_backend: local"):
        config_from_dict({"model": {"hf_path": "x", "layer_backend": "te"}, "data": {"train_file": "t"},
                          "lora": {"enabled": True}})


@pytest.mark.multiproc
def test_cli_prints_resolved_config_and_exits_2_on_error():
    ok = subprocess.run([sys.executable, "-m", "megatron_sayo.config", str(TINY), "train.steps=7"],
                        cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0 and yaml.safe_load(ok.stdout)["train"]["steps"] == 7
    bad = subprocess.run([sys.executable, "-m", "megatron_sayo.config", str(TINY), "train.stepz=7"],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "train.stepz" in bad.stderr


def test_defaults_files_are_read_first_and_merged_key_by_key(tmp_path):
    """`defaults:` (one file or a list, relative to the including file) under the file's own keys: mappings
    merge key by key, lists and scalars are replaced, later defaults win over earlier ones."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "a.yaml").write_text(yaml.safe_dump(
        {**MINIMAL, "train": {"steps": 5, "seed": 9}, "lora": {"targets": ["linear_qkv", "linear_proj"]}}))
    (tmp_path / "base" / "b.yaml").write_text(yaml.safe_dump({"train": {"steps": 6}, "rollout": {"top_p": 0.5}}))
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"defaults": ["base/a.yaml", "base/b.yaml"], "train": {"global_batch": 3},
                                     "lora": {"targets": ["linear_fc1"]}}))
    cfg = load_config(child, ["rollout.group_size=3"])
    assert (cfg.train.steps, cfg.train.seed, cfg.train.global_batch) == (6, 9, 3)
    assert cfg.rollout.top_p == 0.5 and cfg.rollout.group_size == 3 and cfg.lora.targets == ["linear_fc1"]
    assert cfg.model.hf_path == "ckpt" and cfg.optim.lr == 5e-6      # untouched defaults stay the dataclass's
    single = tmp_path / "single.yaml"
    single.write_text("defaults: base/a.yaml\n")
    assert load_config(single).train.steps == 5


def test_defaults_errors_name_the_file(tmp_path):
    loop_a, loop_b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    loop_a.write_text("defaults: b.yaml\n")
    loop_b.write_text("defaults: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(loop_a)
    missing = write(tmp_path, "defaults: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml: cannot read"):
        load_config(missing)
    with pytest.raises(ConfigError, match="defaults = 3"):
        load_config(write(tmp_path, "defaults: 3\n"))


def test_synthetic_data_never_replaces_a_named_file(tmp_path):
    """data.synthetic_n names its cached set itself; a user's data file named beside it is refused (the typo that
    used to be filled with synthetic samples), and with synthetic_n = 0 the named files are used as given."""
    cfg = load_config(TINY)
    assert cfg.data.train_file == f".cache/synthetic/{cfg.data.synthetic_task}-{cfg.data.synthetic_n}/train.jsonl"
    assert cfg.data.eval_file.endswith(f"{cfg.data.synthetic_task}-{cfg.data.synthetic_n}/eval.jsonl")
    assert config_from_dict(cfg.to_dict()) == cfg                # a run's config.yaml loads again
    other = load_config(TINY, ["data.synthetic_n=64", f"data.synthetic_dir={tmp_path}"])
    assert other.data.train_file == f"{tmp_path}/tiles-64/train.jsonl"
    with pytest.raises(ConfigError, match=r"data.train_file = 'my/trian.jsonl' is set together with "
                                          r"data.synthetic_n = 1024.*data.synthetic_n=0"):
        load_config(TINY, ["data.train_file=my/trian.jsonl"])
    mine = load_config(TINY, ["data.synthetic_n=0", "data.train_file=my/train.jsonl", "data.eval_file=my/e.jsonl"])
    assert (mine.data.train_file, mine.data.eval_file) == ("my/train.jsonl", "my/e.jsonl")


@pytest.mark.multiproc
def test_every_field_has_a_doc_and_print_config_shows_it():
    """--print-config: the resolved values (file + overrides) as YAML, every field on its own line with a doc."""
    out = subprocess.run([sys.executable, "-m", "megatron_sayo.train", "--print-config", "--config", str(TINY),
                          "train.steps=7"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout) == load_config(TINY, ["train.steps=7"]).to_dict()
    assert "\n  steps: 7  # GRPO steps in all" in out.stdout
    leaves = [ln for ln in out.stdout.splitlines() if not ln.split("  #")[0].endswith(":")]
    assert len(leaves) == sum(1 for _ in _leaf_fields(RunConfig))
    assert [ln for ln in leaves if "  # " not in ln or ln.endswith("# ")] == []
    bare = subprocess.run([sys.executable, "-m", "megatron_sayo.train", "--print-config"], cwd=ROOT,
                          capture_output=True, text=True)
    assert bare.returncode == 0 and yaml.safe_load(bare.stdout)["train"]["steps"] == RunConfig().train.steps


def _leaf_fields(cls):
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaf_fields(hints[f.name])
        else:
            yield f.name


def test_docs_config_md_is_current():
    """docs/config.md is what `python -m megatron_sayo.config --markdown` writes from the dataclasses now."""
    text = (ROOT / "docs" / "config.md").read_text()
    assert text == reference_markdown(), "stale: python -m megatron_sayo.config --markdown > docs/config.md"
    assert text.count("\n| `") == sum(1 for _ in _leaf_fields(RunConfig))


def test_describe_lines_are_yaml_with_comments():
    cfg = load_config(TINY)
    text = describe(cfg)
    assert yaml.safe_load(text) == cfg.to_dict()
    assert f"  group_size: {cfg.rollout.group_size}  # G completions per prompt" in text
