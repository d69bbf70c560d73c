"""Training throughput of `radscribe train` vs a bare HF Trainer + PEFT loop on the same data and tiny models.

Run as: python bench/train.py [--steps 40] [--batch 8] [--out bench/results/train.md]
        python bench/train.py --zero-compare      # ZeRO-2 vs ZeRO-3, 2 CPU processes (docs/recipes.md)

For each tiny model (Qwen3-VL dense, Qwen3-VL-MoE with expert LoRA off) and thread count (1, 2), both loops
run in a fresh subprocess (so peak RSS is per run): the same 200 synthetic rows, LoRA r16 on the same Linear
modules, batch 8, fp32, the same number of optimizer steps. Reported: samples/s and tokens/s over
`trainer.train()` (non-padding tokens), peak RSS of the process. The bare loop is what a user would write first:
the processor on whole rendered conversations, labels = input ids with padding masked (no assistant-only
masking, no cutoff handling). Machine load is stated because tiny models are dominated by thread contention.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(args) -> None:
    """One measured run; prints a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    if args.impl == "radscribe":
        result = _ours(args)
    else:
        result = _bare(args)
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print("RESULT " + json.dumps(result))


def _ours(args) -> dict:
    from radscribe.config import config_from_args
    from radscribe.train import TrainConfig, train

    run = Path(tempfile.mkdtemp(prefix=f"ours-{args.arch}-{args.threads}-", dir=args.work))
    cfg = config_from_args(TrainConfig, None, [
        "train.precision=fp32", f"train.max_steps={args.steps}", f"train.per_device_batch={args.batch}",
        "train.grad_accum=1", "train.lr=1e-3", "train.logging_steps=10", "train.save_steps=100000",
        "lora.rank=16", "lora.alpha=32", "data.val_split=null"],
        **{"model.path": args.model, "data.dataset": args.data, "output.dir": str(run)})
    train(cfg)
    s = json.loads((run / "train_summary.json").read_text())
    samples = s["steps"] * s["global_batch"]
    return {"samples_per_s": samples / s["runtime_s"], "tokens_per_s": s["tokens_seen"] / s["runtime_s"],
            "samples_per_s_with_encoding": samples / (s["runtime_s"] + s["encode_s"]),
            "final_loss": s["last_logged_loss"]}


def _bare(args) -> dict:
    from peft import LoraConfig, get_peft_model
    from PIL import Image
    from transformers import Trainer, TrainingArguments, set_seed

    from radscribe.data.dataset import read_split, to_chat
    from radscribe.model.load import load_model
    from radscribe.model.lora import lora_targets

    set_seed(42)
    model, processor = load_model(args.model, dtype="fp32", device="cpu", trainable=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=lora_targets(model, "all")))
    rows = list(read_split(args.data, "train"))
    pad = processor.tokenizer.pad_token_id
    tokens = {"n": 0}

    def collate(samples):
        texts, images = [], []
        for s in samples:
            pics = [Image.open(p).convert("RGB") for p in s.images]
            texts.append(processor.apply_chat_template(to_chat(s.messages, pics), tokenize=False))
            images += pics
        batch = processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        batch["labels"] = batch["input_ids"].masked_fill(batch["input_ids"] == pad, -100)
        tokens["n"] += int(batch["attention_mask"].sum())
        return dict(batch)

    targs = TrainingArguments(
        output_dir=str(Path(args.work) / f"bare-{args.arch}-{args.threads}"), per_device_train_batch_size=args.batch,
        max_steps=args.steps, learning_rate=1e-3, lr_scheduler_type="cosine", logging_steps=10, save_strategy="no",
        report_to="none", remove_unused_columns=False, use_cpu=True, seed=42, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=collate)
    started = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - started
    samples_per_s = args.steps * args.batch / seconds
    return {"samples_per_s": samples_per_s, "tokens_per_s": tokens["n"] / seconds,
            "samples_per_s_with_encoding": samples_per_s, "final_loss": out.training_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=2, help="runs per cell, alternating loops; the best is kept")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "train.md"))
    parser.add_argument("--zero-compare", action="store_true",
                        help="ZeRO-2 vs ZeRO-3 loss curves instead (2 processes): same global batch, and 8x apart")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--arch", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.threads = int(args.threads)
        return child(args)

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_synth_dataset

    from radscribe.model.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    data = make_synth_dataset(work / "data")
    if args.zero_compare:
        return zero_compare(work, data, build_tiny_model("qwen3_vl", work / "qwen3_vl", seed=0),
                            Path(args.out))
    load_before = os.getloadavg()
    rows = []
    for arch in ("qwen3_vl", "qwen3_vl_moe"):
        model = build_tiny_model(arch, work / arch, seed=0)
        for threads in [int(t) for t in args.threads.split(",")]:
            best: dict[str, dict] = {}
            for _ in range(args.repeats):  # alternate the two loops so load spikes hit both alike
                for impl in ("bare", "radscribe"):
                    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                    cmd = [sys.executable, __file__, "--child", "--impl", impl, "--arch", arch, "--model",
                           str(model), "--data", str(data), "--work", str(work), "--threads", str(threads),
                           "--steps", str(args.steps), "--batch", str(args.batch)]
                    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
                    if done.returncode or not line:
                        raise SystemExit(f"{impl} {arch} t{threads} failed:\n{done.stderr[-3000:]}")
                    result = json.loads(line[0][7:])
                    print(impl, arch, threads, result, flush=True)
                    if impl not in best or result["samples_per_s"] > best[impl]["samples_per_s"]:
                        best[impl] = result
            rows += [{"arch": arch, "threads": threads, "impl": impl, **best[impl]} for impl in ("bare", "radscribe")]
    load_after = os.getloadavg()
    write_table(rows, args, load_before, load_after, Path(args.out))


def write_table(rows, args, load_before, load_after, out: Path) -> None:
    lines = [
        "## `radscribe train` throughput vs a bare HF Trainer + PEFT loop",
        "",
        f"Command: `python bench/train.py --steps {args.steps} --batch {args.batch} --repeats {args.repeats}`. "
        f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), shared with other "
        f"work: 1-min load average {load_before[0]:.2f} before, {load_after[0]:.2f} after. Tiny models from "
        "`radscribe tiny-model` (text hidden 64, 2 layers; MoE 4 experts top-2), 200 synthetic rows "
        "(synth + prepare) with 64x64 "
        f"images (4 image tokens), LoRA r16 on every language-model Linear, fp32, batch "
        f"{args.batch}, {args.steps} optimizer steps, each run in its own process, best of {args.repeats} "
        "alternating runs.",
        "",
        "| model | threads | loop | samples/s | samples/s incl. encoding pass | tokens/s | peak RSS (MiB) "
        "| ours / bare (samples/s) | RSS ours / bare |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["arch"], r["threads"], r["impl"]): r for r in rows}
    for r in rows:
        bare = by_key[(r["arch"], r["threads"], "bare")]
        ratio = rss = ""
        if r["impl"] == "radscribe":
            ratio = f"{r['samples_per_s'] / bare['samples_per_s']:.2f}"
            rss = f"{r['peak_rss_mib'] / bare['peak_rss_mib']:.2f}"
        lines.append(f"| {r['arch']} | {r['threads']} | {r['impl']} | {r['samples_per_s']:.1f} | "
                     f"{r['samples_per_s_with_encoding']:.1f} | {r['tokens_per_s']:.0f} | {r['peak_rss_mib']:.0f} | {ratio} | {rss} |")
    lines += ["", "samples/s and tokens/s are over `trainer.train()`; tokens are non-padding tokens. Ours encodes every "
              "row once before training (rejects are counted there, and encoded rows are kept in memory up to "
              "`data.cache_mib`); the column 'incl. encoding pass' adds that pass to our time. The bare loop "
              "encodes inside its collator, so both of its columns are the same."]
    replace_section(out, "throughput", "\n".join(lines))


def replace_section(out: Path, name: str, text: str) -> None:
    """Write `text` between <!-- name --> and <!-- /name --> in `out`, keeping the rest (hand-written notes)."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    existing = out.read_text(encoding="utf-8") if out.is_file() else ""
    block = f"{start}\n{text}\n{end}"
    if start in existing and end in existing:
        existing = existing[:existing.index(start)] + block + existing[existing.index(end) + len(end):]
    else:
        existing = (existing.rstrip() + "\n\n" if existing.strip() else "") + block + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(existing, encoding="utf-8")
    print(out)


def zero_compare(work: Path, data: Path, model: Path, out: Path) -> None:
    """One epoch of the 200 rows at lr 2e-3 in 2 processes: z2 vs z3 at the same global batch (8), then the
    reference article's pairing scaled down: z2 at per-device 2 (global 4) vs z3 at per-device 16 (global 32)."""
    from radscribe.runlog import read_log

    runs = {"z2, per-device 4 (global 8)": ("z2", 4), "z3, per-device 4 (global 8)": ("z3", 4),
            "z2, per-device 2 (global 4)": ("z2", 2), "z3, per-device 16 (global 32)": ("z3", 16)}
    curves = {}
    for name, (stage, batch) in runs.items():
        run = work / f"zero-{stage}-{batch}"
        cmd = [sys.executable, "-m", "radscribe.cli", "train", "--model", str(model), "--data", str(data),
               "--out", str(run), "--deepspeed", stage, "--nproc", "2", "train.precision=fp32", "train.epochs=1",
               f"train.per_device_batch={batch}", "train.grad_accum=1", "train.lr=2e-3", "train.logging_steps=1",
               "train.save_steps=100000", "lora.rank=16", "lora.alpha=32"]
        done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        summary = json.loads((run / "train_summary.json").read_text())
        curves[name] = ([r["loss"] for r in read_log(run) if "loss" in r], summary)
        print(name, summary["steps"], summary["eval_loss"], flush=True)
    (a, _), (b, _) = curves["z2, per-device 4 (global 8)"], curves["z3, per-device 4 (global 8)"]
    diff = max(abs(x - y) / abs(x) for x, y in zip(a, b))
    lines = ["## ZeRO-2 vs ZeRO-3 on 2 CPU processes (tiny Qwen3-VL, LoRA r16, fp32, lr 2e-3 cosine, 1 epoch of 200 rows)",
             "", "Command: `OMP_NUM_THREADS=1 python bench/train.py --zero-compare`", "",
             "| run | optimizer steps | first loss | last logged loss | eval loss after |", "|---|---|---|---|---|"]
    for name, (curve, summary) in curves.items():
        lines.append(f"| {name} | {summary['steps']} | {curve[0]:.5f} | {curve[-1]:.5f} | {summary['eval_loss']:.5f} |")
    lines += ["", f"Same global batch: {len(a)} logged steps, largest relative loss difference z2 vs z3 = {diff:.2e}.",
              "", "Per-step losses (same global batch):", "", "| step | z2 | z3 |", "|---|---|---|"]
    lines += [f"| {i + 1} | {x:.6f} | {y:.6f} |" for i, (x, y) in enumerate(zip(a, b))]
    replace_section(out, "zero-compare", "\n".join(lines))


if __name__ == "__main__":
    main()
