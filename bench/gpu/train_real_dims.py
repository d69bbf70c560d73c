"""LoRA training throughput of a Qwen3-VL-30B-A3B-shaped model on one GPU: tokens/s, peak memory and MFU,
with and without LoRA on the fused MoE experts.

Run as (on a lent GPU, < 8 minutes):  python bench/gpu/train_real_dims.py [--layers 4] [--batch 4] [--seq 1024]
Smoke test on CPU at tiny dims:       python bench/gpu/train_real_dims.py --smoke

The model is the real transformers class (Qwen3VLMoeForConditionalGeneration) with the released config's
widths and expert counts (text hidden 2048, 32 query / 4 KV heads of 128, 128 experts top-8 of width 768,
vocab 151,936; vision hidden 1152, patch 16, merge 2), its depth cut to --layers text layers and
--vision-depth vision blocks so it fits and starts fast; weights are random, in bf16, built on the GPU. Each
configuration runs --warmup steps, then --steps timed steps of AdamW on the LoRA parameters (rank 8, alpha 16,
target "all" as radscribe.model.lora resolves it), batch --batch of one 448x448 image (196 image tokens) plus
text up to --seq tokens per sample.

MFU = model FLOPs per second / peak dense bf16 FLOPs of the card (H100/H200 SXM: 989 TFLOPS; --peak-tflops to
override). Model FLOPs per step follow the usual 6·N·tokens training count over the *active* parameters
(attention, router, top-k experts, lm_head per text token; the vision tower per patch) plus causal attention
6·L·S²·d_attn per sample. A LoRA step skips the frozen weight gradients, so it does ~2/3 of that work: the
table shows MFU on the 6N convention so it compares with full fine-tuning numbers elsewhere.
Writes $OUT/train_real_dims.md and $OUT/train_real_dims.json (or --out DIR). Needs torch with CUDA,
transformers 5.x and peft (the versions in pyproject.toml); `--experts-impl` picks transformers' MoE kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

# Runs from a plain checkout on a lent GPU machine, where radscribe may not be pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# Qwen/Qwen3-VL-30B-A3B-Instruct config.json (text and vision widths as released; depth is cut below).
RELEASED_TEXT = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
    num_key_value_heads=4, head_dim=128, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
    decoder_sparse_step=1, norm_topk_prob=True, rms_norm_eps=1e-6, max_position_embeddings=262144,
    tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                     "mrope_interleaved": True},
)
RELEASED_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                       spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2048,
                       num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24],
                       hidden_act="gelu_pytorch_tanh")
# Token ids as in the released tokenizer
IMAGE_PAD, VISION_START, VISION_END = 151655, 151652, 151653
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def model_config(layers: int, vision_depth: int, smoke: bool):
    from transformers import Qwen3VLMoeConfig

    text, vision = dict(RELEASED_TEXT), dict(RELEASED_VISION)
    if smoke:  # tiny widths, same structure: checks the script end to end on a CPU
        text.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2, vocab_size=2048,
                     rope_parameters={**text["rope_parameters"], "mrope_section": [4, 2, 2]})
        vision.update(hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      num_position_embeddings=256)
    text["num_hidden_layers"] = layers
    vision["depth"] = vision_depth
    vision["deepstack_visual_indexes"] = sorted({vision_depth // 3, (2 * vision_depth) // 3, vision_depth - 1})
    ids = dict(image_token_id=IMAGE_PAD, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
               video_token_id=151656)
    if smoke:
        ids = dict(vision_start_token_id=2000, vision_end_token_id=2001, image_token_id=2002, video_token_id=2003)
    return Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


def make_batch(config, batch: int, seq: int, image_px: int, device, dtype) -> dict:
    """Random text around one image per sample, laid out as the processor would (vision_start, pads, end)."""
    vision = config.vision_config
    grid = image_px // vision.patch_size
    merged = (grid // vision.spatial_merge_size) ** 2
    if seq < merged + 8:
        raise SystemExit(f"--seq {seq} is too short for a {image_px}px image ({merged} image tokens)")
    g = torch.Generator().manual_seed(0)
    # ordinary text ids sit below the special tokens (151643 = <|endoftext|> in the release)
    ids = torch.randint(0, min(config.vision_start_token_id, 151643), (batch, seq), generator=g)
    ids[:, 4] = config.vision_start_token_id
    ids[:, 5:5 + merged] = config.image_token_id
    ids[:, 5 + merged] = config.vision_end_token_id
    mm = (ids == config.image_token_id).long()
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    pixels = torch.randn(batch * grid * grid, patch_dim, generator=g)
    return {
        "input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
        "mm_token_type_ids": mm.to(device), "labels": ids.to(device),
        "pixel_values": pixels.to(device, dtype),
        "image_grid_thw": torch.tensor([[1, grid, grid]] * batch, device=device),
    }


def active_params(model, config) -> tuple[float, float]:
    """(active text parameters per token, vision tower parameters per patch), embeddings excluded."""
    text = config.text_config
    lm = model.model.language_model
    lm_total = sum(p.numel() for n, p in lm.named_parameters() if "embed_tokens" not in n)
    experts = sum(p.numel() for n, p in lm.named_parameters() if ".experts." in n)
    active_text = lm_total - experts + experts * text.num_experts_per_tok / text.num_experts
    active_text += model.lm_head.weight.numel()
    vision = sum(p.numel() for p in model.model.visual.parameters())
    return active_text, vision


def step_flops(config, batch_inputs, active_text: float, vision: float) -> float:
    text = config.text_config
    batch, seq = batch_inputs["input_ids"].shape
    patches = batch_inputs["pixel_values"].shape[0]
    attn = 6 * text.num_hidden_layers * seq * seq * text.num_attention_heads * text.head_dim  # causal ≈ half of 12
    return 6 * active_text * batch * seq + 6 * vision * patches + batch * attn


def run_one(args, device, experts: bool) -> dict:
    from peft import get_peft_model

    from radscribe.model.lora import build_lora_config, describe
    from transformers import Qwen3VLMoeForConditionalGeneration

    dtype = torch.bfloat16 if device.type == "cuda" or args.bf16 else torch.float32
    config = model_config(args.layers, args.vision_depth, args.smoke)
    torch.manual_seed(0)
    start = time.perf_counter()
    if args.experts_impl:
        config._experts_implementation = args.experts_impl
    with torch.device(device):
        model = Qwen3VLMoeForConditionalGeneration._from_config(config, dtype=dtype)
    build_s = time.perf_counter() - start
    active_text, vision = active_params(model, config)
    model.requires_grad_(False)
    model = get_peft_model(model, build_lora_config(model, rank=8, alpha=16, experts=experts))
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    info = describe(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    batch = make_batch(config, args.batch, args.seq, args.image_px, device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(round(loss.item(), 4))
        print(f"  expert_lora={experts} step {step + 1}/{args.warmup + args.steps} loss {loss.item():.4f} "
              f"{time.perf_counter() - t0:.3f}s", flush=True)
    step_s = sum(times) / len(times)
    tokens = batch["input_ids"].numel()
    flops = step_flops(config, batch, active_text, vision)
    peak = args.peak_tflops * 1e12 if device.type == "cuda" else float("nan")
    result = {
        "expert_lora": experts, "step_s": round(step_s, 4), "tokens_per_s": round(tokens / step_s, 1),
        "samples_per_s": round(args.batch / step_s, 3),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "model_tflops_per_s": round(flops / step_s / 1e12, 2), "mfu_pct": round(100 * flops / step_s / peak, 2),
        "trainable_parameters": info["trainable_parameters"], "total_parameters": info["total_parameters"],
        "active_text_params_per_token": int(active_text), "build_s": round(build_s, 2), "losses": losses,
    }
    del model, optimizer, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny widths on CPU: check the script runs")
    parser.add_argument("--layers", type=int, default=4, help="text layers (48 in the release)")
    parser.add_argument("--vision-depth", type=int, default=4, help="vision blocks (27 in the release)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024, help="tokens per sample, image tokens included")
    parser.add_argument("--image-px", type=int, default=448)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--bf16", action="store_true", help="bf16 on CPU too (always bf16 on a GPU)")
    parser.add_argument("--experts-impl", default=None, help="eager | grouped_mm | batched_mm (default: "
                        "transformers' choice, grouped_mm)")
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    parser.add_argument("--peak-tflops", type=float, default=None, help="card's dense bf16 peak (default: by name)")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.vision_depth, args.batch, args.seq, args.image_px = 2, 2, 2, 96, 64
        args.warmup, args.steps = 1, 2
        device = torch.device("cpu")
        card = f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU: run with --smoke on a CPU")
        device = torch.device("cuda")
        card = torch.cuda.get_device_name(0)
        if args.peak_tflops is None:
            args.peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in card), 989.0)
    results = []
    for experts in (False, True):
        print(f"expert_lora={experts}: building {args.layers}-layer model on {device}", flush=True)
        results.append(run_one(args, device, experts))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "train_real_dims_smoke" if args.smoke else "train_real_dims"
    meta = {"device": card, "torch": torch.__version__, "layers": args.layers, "vision_depth": args.vision_depth,
            "batch": args.batch, "seq": args.seq, "image_px": args.image_px, "steps": args.steps,
            "grad_ckpt": args.grad_ckpt, "experts_impl": args.experts_impl, "peak_tflops": args.peak_tflops,
            "smoke": args.smoke}
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lines = [f"# LoRA on a Qwen3-VL-30B-A3B-shaped model ({'SMOKE, tiny widths' if args.smoke else 'real widths'})",
             "", f"{card}; torch {torch.__version__}; {args.layers} text layers, {args.vision_depth} vision "
             f"blocks; batch {args.batch} x {args.seq} tokens (one {args.image_px}px image each); "
             f"mean of {args.steps} steps after {args.warmup} warm-up; rank 8, target all; "
             f"gradient checkpointing {'on' if args.grad_ckpt else 'off'}.", "",
             "| expert LoRA | trainable params | step s | tokens/s | peak GPU GiB | model TFLOP/s | MFU % |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {'yes' if r['expert_lora'] else 'no'} | {r['trainable_parameters']:,} | {r['step_s']} | "
                     f"{r['tokens_per_s']:,} | {r['peak_mem_gib']} | {r['model_tflops_per_s']} | {r['mfu_pct']} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
