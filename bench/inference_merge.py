"""Decode speed of a tiny Qwen3-VL-MoE with an expert adapter, merged at load vs PEFT's unmerged LoRA vs the base.

Run as: OMP_NUM_THREADS=1 python bench/inference_merge.py [--tokens 64] [--repeats 5] [--out bench/results/eval.md]

Three models on the same tiny MoE folder (`radscribe tiny-model`: text hidden 64, 2 layers, 4 experts top-2, and a
wider one, text hidden 256 with 16 experts, where the expert tensors dominate):
- "base": `load_model(BASE)`;
- "adapter, merged (the loader)": `load_model(BASE, adapter=A)`, what eval, chat and serve get;
- "adapter, unmerged (PEFT)": `PeftModel.from_pretrained(base, A)`, what they got before: PEFT's
  `target_parameters` LoRA rebuilds each layer's fused (E, in, out) expert tensors on every forward pass.
The adapter has LoRA r16 on q/v/o/down_proj and on both fused expert parameters. Each measurement is greedy
`generate` of exactly --tokens new tokens for one image prompt (64x64, 4 image tokens), batch 1, fp32, CPU, over
--repeats rounds, the three models alternating in each; the ratio is the median over rounds of each model's
tokens/s over the base's in the same round. Writes the <!-- inference-merge --> section of --out.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SIZES = {"tiny (hidden 64, 4 experts)": {}, "wider (hidden 256, 16 experts)": {"text_hidden": 256, "experts": 16,
                                                                              "moe_intermediate": 192}}


def make_adapter(base: Path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    from radscribe.model.load import load_model

    model, _ = load_model(base, device="cpu")
    torch.manual_seed(1)
    config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                        init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


def tokens_per_second(model, inputs, n: int) -> float:
    import torch

    with torch.no_grad():
        started = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        seconds = time.perf_counter() - started
    assert out.shape[1] - inputs["input_ids"].shape[1] == n
    return n / seconds


def measure(size_kwargs: dict, tokens: int, repeats: int, work: Path) -> dict[str, float]:
    import numpy as np
    from peft import PeftModel
    from PIL import Image

    from radscribe.model.load import load_model
    from radscribe.model.tiny import build_tiny_model

    base_dir = build_tiny_model("qwen3_vl_moe", work / "base", seed=0, **size_kwargs)
    adapter = make_adapter(base_dir, work / "adapter")
    base, processor = load_model(base_dir, device="cpu")
    merged, _ = load_model(base_dir, adapter=adapter, device="cpu")
    unmerged = PeftModel.from_pretrained(load_model(base_dir, device="cpu")[0], adapter).eval()
    models = {"base": base, "adapter, merged (the loader)": merged, "adapter, unmerged (PEFT)": unmerged}
    image = Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8"))
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "图片中的诊断结果是怎样?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    for model in models.values():  # warm-up
        tokens_per_second(model, inputs, 4)
    runs = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            runs[name].append(tokens_per_second(model, inputs, tokens))
    return runs


def write_section(out: Path, section: str) -> None:
    start, end = "<!-- inference-merge -->", "<!-- /inference-merge -->"
    text = out.read_text(encoding="utf-8") if out.exists() else ""
    block = f"{start}\n{section}\n{end}"
    if start in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    out.write_text(text, encoding="utf-8")


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "eval.md")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (size, kwargs) in enumerate(SIZES.items()):
            runs = measure(kwargs, args.tokens, args.repeats, Path(tmp) / str(i))
            for name, tps in runs.items():
                # per round, against the base run just before it: load swings between rounds cancel out
                ratio = statistics.median(t / b for t, b in zip(tps, runs["base"]))
                rows.append(f"| {size} | {name} | {max(tps):.1f} | {statistics.median(tps):.1f} | {ratio:.2f} |")
            print(size, {k: round(statistics.median(v), 1) for k, v in runs.items()}, flush=True)
    load_after = os.getloadavg()[0]
    section = "\n".join([
        "## Decoding with an expert adapter: merged at load vs PEFT unmerged vs the base (tiny Qwen3-VL-MoE)",
        "",
        (f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} python bench/inference_merge.py "
         f"--tokens {args.tokens} --repeats {args.repeats}`. Machine: {os.cpu_count()} CPU cores "
         f"({platform.machine()}), torch threads {torch.get_num_threads()}, shared with other work: 1-min load "
         f"average {load_before:.2f} before, {load_after:.2f} after. Greedy `generate` of {args.tokens} new "
         f"tokens, batch 1, one 64x64 image prompt, fp32; {args.repeats} rounds, the three models alternating in "
         "each. Adapter: LoRA r16 on q/v/o/down_proj and on the fused experts (`target_parameters` gate_up_proj, "
         "down_proj)."),
        "",
        "| model | loaded as | tokens/s (best) | tokens/s (median) | / base (median of per-round ratios) |",
        "|---|---|---|---|---|",
        *rows,
        "",
        ("eval, chat and serve load through `radscribe.model.load.load_model`, which merges an adapter it is not "
         "training (`merge_for_inference`), so they run the 'merged' row."),
    ])
    write_section(args.out, section)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
