"""`radscribe train --dry-run` (radscribe/plan.py) on the published Qwen3-VL-30B-A3B-Instruct config.json alone.

tests/assets/qwen3_vl_30b_a3b_instruct_config.json is that file (see tests/assets/README.md for its source). The
expected numbers below are computed here from the config's own fields, parameter class by parameter class, and
DeepSpeed's published per-parameter byte counts -- not read back from the plan.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from radscribe.config import config_from_args
from radscribe.train import TrainConfig

ASSET = Path(__file__).parent / "assets" / "qwen3_vl_30b_a3b_instruct_config.json"
GPUS = 4


@pytest.fixture(scope="module")
def config_only(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qwen3-vl-30b-a3b-config-only")
    shutil.copyfile(ASSET, folder / "config.json")  # nothing else: no weights, tokenizer or processor
    return folder


def counts_by_class(config: dict) -> dict[str, int]:
    """Parameters of Qwen3-VL-MoE per class, from the config's widths."""
    t, v = config["text_config"], config["vision_config"]
    layers, h, head = t["num_hidden_layers"], t["hidden_size"], t["head_dim"]
    q, kv = t["num_attention_heads"] * head, t["num_key_value_heads"] * head
    experts, width = t["num_experts"], t["moe_intermediate_size"]
    hv, iv, merged = v["hidden_size"], v["intermediate_size"], v["hidden_size"] * v["spatial_merge_size"] ** 2
    block = 4 * hv + (hv * 3 * hv + 3 * hv) + (hv * hv + hv) + (hv * iv + iv) + (iv * hv + hv)  # 2 LayerNorms, qkv,
    patch = v["in_channels"] * v["temporal_patch_size"] * v["patch_size"] ** 2 * hv + hv       # proj, fc1, fc2
    merger_mlp = (merged * merged + merged) + (merged * v["out_hidden_size"] + v["out_hidden_size"])
    vision = (patch + v["num_position_embeddings"] * hv + v["depth"] * block
              + 2 * hv + merger_mlp  # the merger normalises before the 2x2 shuffle ...
              + len(v["deepstack_visual_indexes"]) * (2 * merged + merger_mlp))  # ... the deepstack ones after it
    return {
        "experts": layers * experts * 3 * h * width,  # gate_up (2I x h) + down (h x I) per expert
        "attention": layers * (h * q + 2 * h * kv + q * h),
        "vision": vision,
        "embedding": t["vocab_size"] * h,
        "lm_head": t["vocab_size"] * h,  # tie_word_embeddings: false
        "router_and_norms": layers * (experts * h + 2 * h + 2 * head) + h,
    }


def lora_r8_attention(config: dict, rank: int = 8) -> int:
    t = config["text_config"]
    h, q, kv = t["hidden_size"], t["num_attention_heads"] * t["head_dim"], t["num_key_value_heads"] * t["head_dim"]
    return t["num_hidden_layers"] * rank * ((h + q) + 2 * (h + kv) + (q + h))  # q, k, v, o: r x (in + out) each


def _cfg(preset: str, model_dir: Path, *overrides: str) -> TrainConfig:
    return config_from_args(TrainConfig, preset, list(overrides), **{"model.path": str(model_dir),
                                                                    "train.nproc": GPUS})


def test_reference_z2_and_z3_on_4_gpus_match_the_config_and_deepspeeds_byte_counts(config_only):
    from radscribe.plan import plan

    published = json.loads(ASSET.read_text())
    classes = counts_by_class(published)
    total, trainable = sum(classes.values()), lora_r8_attention(published)
    assert round(total / 1e9, 2) == 31.07  # the published size
    t = published["text_config"]
    largest_layer = t["num_experts"] * 3 * t["hidden_size"] * t["moe_intermediate_size"]  # one layer's experts

    z2 = plan(_cfg("reference-z2", config_only))
    z3 = plan(_cfg("reference-z3", config_only))
    for p in (z2, z3):
        assert p.by_class == classes and p.total_parameters == total
        assert p.trainable_parameters == trainable and p.lora_modules == 4 * t["num_hidden_layers"]
        assert p.gpus == GPUS and p.checkpointing is True
    # ZeRO-2: frozen bf16 weights whole on every GPU; DeepSpeed's ZeRO-2 count for the trainable ones:
    # 2 B (bf16 weights) + 18 B / GPUs (bf16 + fp32 grads, fp32 master, Adam m, v)
    assert z2.zero_stage == 2 and z2.weights_bytes == 2 * total
    assert z2.trainable_states_bytes == 2 * trainable + int(18 * trainable / GPUS)
    # ZeRO-3: frozen weights partitioned; 4 B x the largest gathered layer + 18 B / GPUs
    assert z3.zero_stage == 3 and z3.weights_bytes == pytest.approx(2 * total / GPUS)
    assert z3.largest_layer_parameters == largest_layer
    assert z3.trainable_states_bytes == 4 * largest_layer + int(18 * trainable / GPUS)
    assert z3.model_states_bytes < 0.3 * z2.model_states_bytes  # 18.0 GB against 62.2 GB per GPU
    assert round(z2.model_states_bytes / 1e9, 1) == 62.2 and round(z3.model_states_bytes / 1e9, 1) == 18.0
    # the preset's batch x cutoff: 4 x 2048 (z2) and 32 x 2048 (z3) per GPU, 8 accumulation steps, 4 GPUs
    assert (z2.tokens_per_device_step, z2.tokens_per_optimizer_step) == (4 * 2048, 4 * 2048 * 8 * GPUS)
    assert (z3.tokens_per_device_step, z3.tokens_per_optimizer_step) == (32 * 2048, 32 * 2048 * 8 * GPUS)
    for p in (z2, z3):  # checkpointing keeps one hidden state per layer instead of a layer's worth of tensors
        saved = p.activations_bytes[False] - p.activations_bytes[True]
        assert saved > 0 and p.activations_bytes[True] > p.tokens_per_device_step * t["num_hidden_layers"] * 2 * 2048
    assert z2.steps_per_epoch is None


def test_gpu_mem_24_is_refused_in_one_line_and_80_fits_reference_z2(config_only, tiny_dataset, capsys):
    from radscribe.cli import main

    base = ["train", "--model", str(config_only), "--dry-run", "--nproc", str(GPUS)]
    assert main([*base, "--config", "reference-z2", "--gpu-mem", "24"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("radscribe train: error: --gpu-mem 24: the plan needs")

    assert main([*base, "--config", "reference-z2", "--gpu-mem", "80", "--data", str(tiny_dataset)]) == 0
    out = capsys.readouterr().out
    assert "DeepSpeed ZeRO-2" in out and "estimate_zero2_model_states_mem_needs" in out
    assert "frozen ones included" in out  # what DeepSpeed's own estimators assume, said in the output
    # 200 rows on 4 GPUs, per-device batch 4, accumulation 8: ceil(ceil(ceil(200 / 4) / 4) / 8) optimizer steps
    assert f"steps per epoch: {math.ceil(math.ceil(math.ceil(200 / GPUS) / 4) / 8)} (200 training rows" in out


def test_plan_counts_what_training_builds_on_a_real_layout_moe_with_expert_lora(real_model_dir):
    from peft import get_peft_model

    from radscribe.model.load import load_model
    from radscribe.model.lora import build_lora_config, describe
    from radscribe.plan import plan

    folder = real_model_dir("qwen3_vl_moe")
    p = plan(_cfg("recommended", folder, "lora.experts=true", "train.nproc=1"))
    model, _ = load_model(folder, dtype="bf16", device="cpu", trainable=True)
    real = describe(get_peft_model(model, build_lora_config(model, rank=32, alpha=64, experts=True)))
    assert (p.trainable_parameters, p.total_parameters) == (real["trainable_parameters"],
                                                            real["total_parameters"] - real["trainable_parameters"])
    assert p.lora_expert_parameters == 2 * 4  # gate_up_proj and down_proj in each of the 4 layers
    # one process, no DeepSpeed: bf16 frozen weights + 16 B per trainable parameter (fp32 weight, grad, Adam m, v)
    assert p.zero_stage is None and p.trainable_states_bytes == 16 * p.trainable_parameters
    assert p.weights_bytes == 2 * p.total_parameters
