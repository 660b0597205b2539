"""Planner: parameter counts against transformers, memory terms against the published formulas by hand."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from megatron_sayo import plan

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3

# The table of ../shared/notes/qwen25vl-facts.md: (hidden, intermediate, layers, heads, kv heads, vocab, tied, vision I)
TABLE = {
    "3b": (2048, 11008, 36, 16, 2, 151936, True, 3420),
    "7b": (3584, 18944, 28, 28, 4, 152064, False, 3420),
    "72b": (8192, 29568, 80, 64, 8, 152064, False, 3456),
}
PUBLISHED = {"3b": 3.75e9, "7b": 8.29e9, "72b": 73.4e9}


def hub_config(size: str) -> dict:
    """A hub-style (flat) config.json for one row of the facts table."""
    h, inter, layers, heads, kv, vocab, tied, vis_inter = TABLE[size]
    return {
        "model_type": "qwen2_5_vl", "hidden_size": h, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "vocab_size": vocab, "tie_word_embeddings": tied, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": vis_inter, "num_heads": 16,
                          "in_chans": 3, "out_hidden_size": h, "patch_size": 14, "spatial_merge_size": 2,
                          "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]},
    }


def real_size(size: str, tmp_path: Path):
    """(size, path of its config.json fixture, transformers model on the meta device)."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hub_config(size)))
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_pretrained(path))
    return size, path, model


def numel(module) -> int:
    """Parameters of a module as transformers counts them (shared tensors once)."""
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- parameter counts

def tiny_config(tied: bool) -> Qwen2_5_VLConfig:
    """A tiny random-size Qwen2.5-VL config with GQA and an odd vision MLP width."""
    return Qwen2_5_VLConfig(
        text_config={"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
                     "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 300,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1]}},
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 44, "num_heads": 4,
                       "out_hidden_size": 64, "fullatt_block_indexes": [1]},
        tie_word_embeddings=tied, image_token_id=290, video_token_id=291, vision_start_token_id=292,
        vision_end_token_id=293,
    )


@pytest.mark.parametrize("tied", [False, True])
def test_count_equals_transformers_on_tiny_nested_config(tied):
    cfg = tiny_config(tied)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    arch = plan.parse_arch(json.loads(cfg.to_json_string()), "tiny")
    assert plan.total_params(arch) == numel(model)
    assert plan.vision_params(arch.vision) == numel(model.model.visual)


@pytest.mark.parametrize("size", sorted(TABLE))
def test_count_equals_transformers_at_real_size(size, tmp_path):
    size, path, model = real_size(size, tmp_path)
    arch = plan.load_arch(path)
    assert plan.total_params(arch) == numel(model)
    assert plan.vision_params(arch.vision) == numel(model.model.visual)
    assert plan.total_params(arch) == pytest.approx(PUBLISHED[size], rel=0.01)


def test_example_configs_match_the_facts_table():
    for size in TABLE:
        example = plan.load_arch(ROOT / f"examples/configs/qwen25vl_{size}.config.json")
        assert example == plan.parse_arch(hub_config(size), size)


def test_model_dir_is_accepted(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hub_config("7b")))
    assert plan.load_arch(tmp_path) == plan.parse_arch(hub_config("7b"))


# ---------------------------------------------------------------- config errors

def test_missing_field_names_file_and_field(tmp_path):
    cfg = hub_config("7b")
    del cfg["num_attention_heads"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(plan.ConfigError, match=r"config\.json: .*mrope_section.* defaults: .*num_attention_heads"):
        plan.load_arch(path)


def test_bad_vision_field_names_vision_config(tmp_path):
    cfg = hub_config("7b")
    cfg["vision_config"]["depth"] = -1
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(plan.ConfigError,
                       match=r"c\.json: vision_config: field 'depth' = -1 must be a positive integer"):
        plan.load_arch(path)


def test_invalid_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(plan.ConfigError, match="bad.json: not valid JSON"):
        plan.load_arch(bad)
    with pytest.raises(plan.ConfigError, match="no such file"):
        plan.load_arch(tmp_path / "absent.json")


# ---------------------------------------------------------------- memory formulas by hand

def test_megatron_bytes_per_param():
    """Megatron-LM README: 18 bytes/param without the distributed optimizer, 6 + 12/DP with it."""
    assert sum(plan.state_bytes_per_param(8, distributed_optimizer=False).values()) == 18
    assert sum(plan.state_bytes_per_param(8).values()) == 6 + 12 / 8


def test_korthikanti_activations_per_layer():
    s, b, h, a, t = 4096, 2, 8192, 64, 8
    f = plan.activation_bytes_per_layer
    assert f(s, b, h, a, t, "none", True) == s * b * h * (34 + 5 * a * s / h) / t
    assert f(s, b, h, a, t, "none", False) == s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
    assert f(s, b, h, a, t, "selective", True) == 34 * s * b * h / t
    assert f(s, b, h, a, t, "full", False) == 2 * s * b * h
    assert f(s, b, h, a, 1, "none", True) == s * b * h * (34 + 5 * a * s / h)  # SP is a no-op at TP=1


def test_7b_tp2_pp2_stages_by_hand(tmp_path):
    _, path, model = real_size("7b", tmp_path)
    w = plan.Workload(seq=4096, max_new_tokens=110, micro_batch=1, group_size=16, recompute="selective")
    lay = plan.Layout(tp=2, pp=2, dp=2)
    s, h, tp, dp = 4096 + 110, 3584, 2, 2
    lm = model.model.language_model
    vision = numel(model.model.visual)                      # replicated on every TP rank: never divided by TP
    first = vision + (numel(lm.embed_tokens) + sum(numel(layer) for layer in lm.layers[:14])) / tp
    last = sum(numel(layer) for layer in lm.layers[14:]) + numel(lm.norm) + numel(model.lm_head)
    # ViT (depth 32, hidden 1280, SwiGLU 3420) on 1024 image tokens = 4096 patches, bf16: per block 8 tensors
    # of s x h and 4 of s x I, plus the merger's ~4 of s x h; 2 micro-batches in flight on the first stage
    patches = 1024 * 4
    vit = 32 * patches * (16 * 1280 + 8 * 3420) + 8 * patches * 1280

    got = plan.stage_memory(plan.load_arch(path), lay, w, first=True, last=False)
    assert got.weights == pytest.approx(2 * first)
    assert got.grads == pytest.approx(4 * first)
    assert got.optimizer == pytest.approx(12 * first / dp)
    assert got.reference == pytest.approx(2 * first)
    assert got.activations == pytest.approx(34 * s * h / tp * 14 * 2)  # 14 layers, 2 micro-batches in flight
    assert got.vision_activations == pytest.approx(2 * vit)
    assert got.logits == 0
    assert got.kv_cache == pytest.approx(2 * 14 * (4 // tp) * 128 * 2 * 16 * s)
    static = (2 + 4 + 12 / dp + 2) * first
    assert got.total == pytest.approx(static + max(34 * s * h / tp * 28 + 2 * vit, 2 * 14 * 2 * 128 * 2 * 16 * s))

    got = plan.stage_memory(plan.load_arch(path), lay, w, first=False, last=True)
    assert got.weights == pytest.approx(2 * last / tp)
    assert got.activations == pytest.approx(34 * s * h / tp * 14) and got.vision_activations == 0
    assert got.logits == pytest.approx(4 * s * 152064 / tp)


def test_frozen_vision_keeps_weights_drops_grads_and_optimizer():
    arch = plan.load_arch(ROOT / "examples/configs/qwen25vl_7b.config.json")
    lay, vision = plan.Layout(tp=4, pp=1, dp=2), 676_550_144  # vision tower of 7B, counted by transformers above
    trained = plan.stage_memory(arch, lay, plan.Workload(), first=True, last=True)
    frozen = plan.stage_memory(arch, lay, plan.Workload(freeze_vision=True), first=True, last=True)
    assert frozen.weights == trained.weights
    assert trained.grads - frozen.grads == pytest.approx(4 * vision)          # replicated: not divided by TP=4
    assert trained.optimizer - frozen.optimizer == pytest.approx(12 * vision / 2)
    assert frozen.vision_activations == 0 < trained.vision_activations


def test_vision_tower_is_replicated_over_tp():
    """Going from TP=4 to TP=8 halves the language model's share per GPU, never the vision tower's."""
    arch = plan.load_arch(ROOT / "examples/configs/qwen25vl_72b.config.json")
    vision, w = plan.vision_params(arch.vision), plan.Workload()
    text_first = plan.stage_params(arch, 2, first=True, last=False) - vision
    for tp in (1, 4, 8):
        got = plan.stage_memory(arch, plan.Layout(tp, 2, 64 // (2 * tp)), w, first=True, last=False)
        assert got.weights == pytest.approx(2 * (text_first / tp + vision))
    # the figure: at TP8 PP2 DP4 the old model undercounted the first stage by about 6 GiB
    got = plan.stage_memory(arch, plan.Layout(8, 2, 4), w, first=True, last=False)
    old_static = (2 + 4 + 12 / 4 + 2) * (text_first + vision) / 8
    assert 5 * GIB < (got.weights + got.grads + got.optimizer + got.reference) - old_static < 7 * GIB


def test_lora_counts_frozen_base_adapter_state_and_no_reference():
    arch = plan.load_arch(ROOT / "examples/configs/qwen25vl_7b.config.json")
    lay, t = plan.Layout(tp=2, pp=1, dp=4), arch.text
    full = plan.stage_memory(arch, lay, plan.Workload(), first=True, last=True)
    lora = plan.stage_memory(arch, lay, plan.Workload(lora_rank=16), first=True, last=True)
    # by hand for 7B (h 3584, 28 heads x 128, 4 kv heads, ffn 18944), r = 16, TP = 2, per layer:
    # q/k/v A 3 x 16 x 3584, B 16 x (3584 + 2 x 512) / 2; gate/up A 2 x 16 x 3584, B 2 x 16 x 18944 / 2;
    # o A 16 x 3584 / 2, B 16 x 3584; down A 16 x 18944 / 2, B 16 x 3584
    per_layer = 16 * (3 * 3584 + 4608 / 2 + 2 * 3584 + 18944 + 3584 / 2 + 3584 + 18944 / 2 + 3584)
    assert plan.lora_layer_params(t, 16, 2) == pytest.approx(per_layer)
    adapters = 28 * per_layer
    assert lora.reference == 0 and full.reference > 0
    assert lora.weights == pytest.approx(full.weights + 2 * adapters)
    assert lora.grads == pytest.approx(4 * adapters)
    assert lora.optimizer == pytest.approx(12 * adapters / 4)
    assert (lora.activations, lora.logits, lora.kv_cache) == (full.activations, full.logits, full.kv_cache)
    # 7B at TP=1 on 80 GB: full fine-tuning does not fit, LoRA does
    rows = {(r.layout.tp, r.layout.pp): r for r in plan.plan(arch, 8, 80 * GIB, plan.Workload(lora_rank=16))}
    assert rows[(1, 1)].fits and not plan.layout_memory(arch, plan.Layout(1, 1, 8), plan.Workload()).total <= 72 * GIB


@pytest.mark.multiproc
def test_cli_prints_full_and_lora_side_by_side():
    out = subprocess.run([sys.executable, str(ROOT / "tools/plan_parallelism.py"), "--model",
                          str(ROOT / "examples/configs/qwen25vl_7b.config.json"), "--gpus", "8", "--lora-rank", "16"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "full fine-tuning vs LoRA" in out.stdout and "recommended, LoRA" in out.stdout


# ---------------------------------------------------------------- recommendation

def test_72b_on_64_gpus_fits_with_tp_at_most_8():
    """With the vision tower frozen (the 72B example's setting) TP8 PP2 DP4 fits on 80 GB; training the ViT on
    1024 image tokens per sample does not fit any TP <= 8 layout on 80 GB, and does on 141 GB."""
    arch = plan.load_arch(ROOT / "examples/configs/qwen25vl_72b.config.json")
    with pytest.raises(plan.NoLayoutFits, match="--freeze-vision"):
        plan.recommend(plan.plan(arch, gpus=64, gpu_memory=80 * GIB))
    assert plan.recommend(plan.plan(arch, gpus=64, gpu_memory=141 * GIB)).fits
    rows = plan.plan(arch, gpus=64, gpu_memory=80 * GIB, w=plan.Workload(freeze_vision=True))
    best = plan.recommend(rows)
    assert best.fits and best.layout.tp <= 8 and (best.layout.tp, best.layout.pp) == (8, 2)
    assert best.layout.tp * best.layout.pp * best.layout.dp == 64
    assert best.memory.total <= 0.9 * 80 * GIB
    assert best.layout.model_parallel == min(r.layout.model_parallel for r in rows if r.fits)
    assert {r.layout.tp for r in rows} <= {1, 2, 4, 8}


def test_no_layout_fits_is_a_clear_error():
    arch = plan.load_arch(ROOT / "examples/configs/qwen25vl_72b.config.json")
    with pytest.raises(plan.NoLayoutFits, match="no TP/PP/DP layout fits"):
        plan.recommend(plan.plan(arch, gpus=8, gpu_memory=80 * GIB))


@pytest.mark.multiproc
def test_cli_json_and_errors(tmp_path):
    tool = [sys.executable, str(ROOT / "tools/plan_parallelism.py")]
    out = subprocess.run([*tool, "--model", str(ROOT / "examples/configs/qwen25vl_7b.config.json"),
                          "--gpus", "8", "--gpu-memory", "80GB", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rec = json.loads(out.stdout)["recommended"]
    assert rec["fits"] and rec["tp"] * rec["pp"] * rec["dp"] == 8 and rec["total"] <= 0.9 * 80 * GIB

    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"hidden_size": 64}))
    out = subprocess.run([*tool, "--model", str(bad), "--gpus", "8"], capture_output=True, text=True)
    assert out.returncode != 0 and str(bad) in out.stderr and "field 'model_type'" in out.stderr


def test_training_flops_equal_torch_flop_counter():
    """Megatron-LM's count against torch's FlopCounterMode over a forward + backward of transformers' Qwen2
    decoder (eager attention, every weight trainable): the same GEMMs, so the same number."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=500, tie_word_embeddings=False)
    model = Qwen2ForCausalLM._from_config(cfg, attn_implementation="eager")
    batch, seq = 3, 40
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids).logits.float().sum().backward()
    arch = plan.TextArch(hidden=64, intermediate=176, layers=3, heads=4, kv_heads=2, head_dim=16, vocab=500, tied=False)
    assert plan.training_flops(arch, batch, seq) == pytest.approx(counter.get_total_flops(), rel=1e-12)


def test_megatron_bytes_per_param_float32():
    """Megatron-LM's table, float32 parameters and gradients: 16 bytes/param, 8 + 8/DP distributed."""
    assert sum(plan.state_bytes_per_param(8, distributed_optimizer=False, params_dtype="float32").values()) == 16
    assert sum(plan.state_bytes_per_param(8, params_dtype="float32").values()) == 8 + 8 / 8


def test_rollout_kv_cache_holds_global_batch_over_dp_prompts(tmp_path):
    """The trainer rolls out global_batch / DP prompts x G at once: 7B (28 layers, 4 KV heads of 128) at TP=4,
    16 prompts over DP=2 -> 8 x 16 rows of K and V in bf16."""
    _, path, _ = real_size("7b", tmp_path)
    w = plan.Workload(seq=1000, max_new_tokens=24, group_size=16, global_batch=16)
    s = 1000 + 24
    got = plan.stage_memory(plan.load_arch(path), plan.Layout(tp=4, pp=1, dp=2), w, first=True, last=True).kv_cache
    assert got == 2 * 28 * (4 // 4) * 128 * 2 * 16 * s * 8
