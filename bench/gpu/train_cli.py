"""The real CLI on a Qwen3-VL-30B-A3B cut to a few layers at its released widths, on one GPU: `radscribe train
--dry-run`, then `radscribe train` and `radscribe eval`, recording tokens/s, peak GPU memory, MFU and peak host RSS.

Run as (a lent GPU, one command, < 8 minutes on one H200):  python bench/gpu/train_cli.py [--out DIR]
CPU smoke form (tiny widths, minutes):                       python bench/gpu/train_cli.py --smoke --out /tmp/x

1. The model folder: `radscribe.model.real_layout` writes every file of the published download (Qwen's real
   tokenizer, template, processor, generation config); its config.json is then the published 30B-A3B one
   (tests/assets/qwen3_vl_30b_a3b_instruct_config.json) with --layers text layers and --vision-depth vision blocks,
   and the builder writes bf16 weights for it in the hub layout (sharded, experts as released). --smoke keeps the
   builder's tiny widths.
2. Data: `radscribe synth` + `radscribe prepare` (--rows phantom rows at --image-px).
3. `radscribe train --config recommended --dry-run`: the plan's per-GPU total, to set beside the measured peak.
4. `radscribe train --config recommended lora.experts=true` for --steps steps (per-device batch --batch, no
   accumulation, no eval): tokens/s from RUN/log.jsonl (non-padding tokens, after --warmup logged steps).
5. `radscribe eval` on the val split with the trained adapter (--eval-limit samples): predict samples/s.
Peak GPU memory is sampled from nvidia-smi every 0.2 s (whole device, the allocator's cache included); peak host RSS
is each command's own VmHWM: with the weights read straight onto the GPU it stays far below the model's size. MFU = tokens/s x (6 x active parameters per token + 6 x layers x mean sequence x attention width)
/ the card's dense bf16 peak (H100/H200 SXM 989 TFLOPS; --peak-tflops): the 6N convention of full training, so a
LoRA step (no frozen-weight gradients) does about 2/3 of what is credited.
Writes OUT/train_cli.md and OUT/train_cli.json (OUT: --out, else $OUT, else bench/results; smoke: *_smoke.*).
Needs radscribe's dependencies with CUDA torch and the `dashscope` wheel (the `[test]` extra: Qwen's real vocabulary
for the real-layout files); nothing is downloaded from a hub. bench/gpu/train_real_dims.py is the bare training
loop (no CLI) with and without expert LoRA.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # a plain checkout on a lent machine, radscribe not pip-installed
PUBLISHED_CONFIG = ROOT / "tests" / "assets" / "qwen3_vl_30b_a3b_instruct_config.json"
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0}


def build_model(out: Path, layers: int, vision_depth: int, smoke: bool) -> Path:
    """A real-layout Qwen3-VL-MoE folder; unless smoke, at the published widths with its depth cut."""
    from radscribe.model import real_layout

    real_layout.build_real_layout_model("qwen3_vl_moe", out)
    if smoke:
        return out
    config = json.loads(PUBLISHED_CONFIG.read_text())
    config["text_config"]["num_hidden_layers"] = layers
    config["vision_config"]["depth"] = vision_depth
    # published taps [8, 16, 24] of 27 blocks, scaled to the cut depth; fewer taps than text layers
    config["vision_config"]["deepstack_visual_indexes"] = sorted({vision_depth // 3, 2 * vision_depth // 3,
                                                                  vision_depth - 1})[:max(layers - 1, 1)]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for stale in out.glob("model*.safetensors*"):
        stale.unlink()
    # the builder's own weight writer, reading the config.json just written (bf16, released key names, sharded)
    real_layout._write_weights(out, real_layout._published("qwen3_vl_moe"), tied=False, seed=0)
    return out


class GpuMemory:
    """Peak `memory.used` of GPU 0 while a stage runs (nvidia-smi, MiB); None without a GPU."""

    def __init__(self):
        self.peak, self._stop = None, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            try:
                used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                       "-i", "0"], capture_output=True, text=True, timeout=5).stdout.strip()
                self.peak = max(self.peak or 0, int(used.splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return
            self._stop.wait(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# `radscribe ARGS` that writes its own peak RSS (VmHWM of its own address space) at exit: a child's ru_maxrss
# would start from this driver's RSS, which fork/exec hands down on Linux
_WITH_PEAK_RSS = """import atexit, os, sys
def _peak():
    hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:'))
    open(os.environ['RADSCRIBE_BENCH_RSS'], 'w').write(hwm.split()[1])
atexit.register(_peak)
from radscribe.cli import main
sys.exit(main(sys.argv[1:]))"""


def radscribe(*args: str, log: Path) -> dict:
    """Run `radscribe ARGS`; its wall time, peak host RSS and (on a GPU) peak GPU memory."""
    print("$ radscribe", " ".join(args), flush=True)
    rss = log.with_suffix(".rss")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "RADSCRIBE_BENCH_RSS": str(rss)}
    started = time.perf_counter()
    with GpuMemory() as gpu, log.open("w") as sink:
        done = subprocess.run([sys.executable, "-c", _WITH_PEAK_RSS, *args], stdout=subprocess.PIPE, stderr=sink,
                              text=True, env=env, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"radscribe {args[0]} failed (exit {done.returncode}); see {log}:\n"
                         f"{log.read_text()[-3000:]}")
    return {"seconds": round(time.perf_counter() - started, 1), "peak_host_rss_mib": round(int(rss.read_text()) / 1024),
            "peak_gpu_mib": gpu.peak, "stdout": done.stdout}


def active_flops_per_token(config: dict, mean_seq: float) -> float:
    """6 x active parameters per text token (attention, router, top-k experts, lm_head) + causal attention."""
    t = config["text_config"]
    h, layers, head = t["hidden_size"], t["num_hidden_layers"], t["head_dim"]
    q, kv = t["num_attention_heads"] * head, t["num_key_value_heads"] * head
    per_layer = h * q + 2 * h * kv + q * h + t["num_experts"] * h + t["num_experts_per_tok"] * 3 * h * t[
        "moe_intermediate_size"]
    active = layers * per_layer + t["vocab_size"] * h
    return 6 * active + 6 * layers * mean_seq * q  # 12·L·S·d for QK^T and AV, halved by the causal mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny widths on CPU: check the script end to end")
    parser.add_argument("--layers", type=int, default=4, help="text layers (48 in the release)")
    parser.add_argument("--vision-depth", type=int, default=4, help="vision blocks (27 in the release)")
    parser.add_argument("--rows", type=int, default=160, help="synthetic dataset rows (train + val)")
    parser.add_argument("--image-px", type=int, default=448)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3, help="logged steps left out of tokens/s")
    parser.add_argument("--batch", type=int, default=8, help="per-device batch")
    parser.add_argument("--eval-limit", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--peak-tflops", type=float, default=None, help="card's dense bf16 peak (default: by name)")
    parser.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "bench" / "results")))
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one under --out)")
    args = parser.parse_args()
    import torch

    if args.smoke:
        args.rows, args.image_px, args.steps, args.warmup, args.batch = 24, 64, 3, 1, 2
        args.eval_limit, args.max_new_tokens = 2, 8
        card = f"CPU ({platform.machine()}), {torch.get_num_threads()} threads"
    elif not torch.cuda.is_available():
        raise SystemExit("no GPU: run with --smoke on a CPU")
    else:
        card = torch.cuda.get_device_name(0)
        args.peak_tflops = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in card), 989.0)
    out = Path(args.out)
    work = Path(args.work or out / ("train_cli_smoke_work" if args.smoke else "train_cli_work"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    stages = {}

    t0 = time.perf_counter()
    model = build_model(work / "model", args.layers, args.vision_depth, args.smoke)
    stages["build model"] = {"seconds": round(time.perf_counter() - t0, 1)}
    config = json.loads((model / "config.json").read_text())
    stages["synth"] = radscribe("synth", "--out", str(work / "synth"), "--n", str(args.rows), "--size",
                                str(args.image_px), "--format", "png", log=work / "synth.log")
    stages["prepare"] = radscribe("prepare", str(work / "synth"), "--out", str(work / "data"), "--overwrite",
                                  log=work / "prepare.log")
    common = ["--config", "recommended", "--model", str(model), "--data", str(work / "data"), "--out",
              str(work / "run"), "lora.experts=true", f"train.max_steps={args.steps}",
              f"train.per_device_batch={args.batch}", "train.grad_accum=1", "train.logging_steps=1",
              "train.save_steps=100000", "data.val_split=null"]
    if args.smoke:
        common.append("train.precision=fp32")  # CPU bf16 is slow and is not what a GPU run measures
    stages["train --dry-run"] = radscribe("train", *common, "--dry-run", log=work / "plan.log")
    plan_text = stages["train --dry-run"].pop("stdout")
    plan_total = next(float(line.split()[-1]) for line in plan_text.splitlines() if "total as configured" in line)
    if (work / "run").exists():  # a rerun starts over
        import shutil

        shutil.rmtree(work / "run")
    stages["train"] = radscribe("train", *common, log=work / "train.log")
    logged = [json.loads(line) for line in (work / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "tokens_per_s" in r][args.warmup:]
    tokens_per_s = sum(r["tokens_per_s"] for r in steps) / max(len(steps), 1)
    summary = json.loads((work / "run" / "train_summary.json").read_text())
    mean_seq = summary["tokens_seen"] / max(summary["steps"] * args.batch, 1)
    flops = tokens_per_s * active_flops_per_token(config, mean_seq)
    stages["eval"] = radscribe("eval", "--model", str(model), "--adapter", str(work / "run"), "--data",
                               str(work / "data"), "--split", "val", "--limit", str(args.eval_limit), "--batch-size",
                               "8", "--max-new-tokens", str(args.max_new_tokens), log=work / "eval.log")
    predict = json.loads(next((work / "run" / "eval").rglob("predict_results.json")).read_text())
    for stage in stages.values():
        stage.pop("stdout", None)
    result = {
        "device": card, "torch": torch.__version__, "smoke": args.smoke, "layers": config["text_config"][
            "num_hidden_layers"], "hidden": config["text_config"]["hidden_size"], "steps": summary["steps"],
        "batch": args.batch, "mean_tokens_per_sample": round(mean_seq, 1), "tokens_per_s": round(tokens_per_s, 1),
        "model_tflops_per_s": round(flops / 1e12, 3),
        "mfu_pct": round(100 * flops / (args.peak_tflops * 1e12), 2) if args.peak_tflops else None,
        "plan_total_gb": plan_total, "train_peak_gpu_gb": (round(stages["train"]["peak_gpu_mib"] * 2**20 / 1e9, 2)
                                                           if stages["train"]["peak_gpu_mib"] else None),
        "train_peak_host_rss_mib": stages["train"]["peak_host_rss_mib"],
        "weights_mib": round(sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20),
        "first_loss": round(summary["first_logged_loss"], 4), "last_loss": round(summary["last_logged_loss"], 4),
        "predict_samples_per_second": predict["predict_samples_per_second"],
        "eval_peak_gpu_mib": stages["eval"]["peak_gpu_mib"], "stages": stages,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    name = "train_cli_smoke" if args.smoke else "train_cli"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# The real CLI on Qwen3-VL-30B-A3B cut to {result['layers']} text layers "
        f"({'SMOKE: tiny widths, CPU' if args.smoke else 'released widths'})", "",
        f"{card}; torch {torch.__version__}; `python bench/gpu/train_cli.py{' --smoke' if args.smoke else ''}`; "
        f"recommended preset + expert LoRA, {summary['steps']} steps at per-device batch {args.batch} "
        f"({result['mean_tokens_per_sample']} tokens per sample, one {args.image_px}px image), "
        f"{result['weights_mib']:,} MiB of bf16 weights. Total {result['total_seconds']} s.", "",
        "| tokens/s | MFU % | peak GPU GB (train) | plan total GB | peak host RSS MiB (train) | eval samples/s | loss first -> last |",
        "|---:|---:|---:|---:|---:|---:|---|",
        f"| {result['tokens_per_s']:,} | {result['mfu_pct']} | {result['train_peak_gpu_gb']} | {plan_total} | "
        f"{result['train_peak_host_rss_mib']:,} | {result['predict_samples_per_second']} | "
        f"{result['first_loss']} -> {result['last_loss']} |", "",
        "| stage | seconds | peak host RSS MiB | peak GPU MiB |", "|---|---:|---:|---:|",
        *(f"| {k} | {v['seconds']} | {v.get('peak_host_rss_mib', '')} | {v.get('peak_gpu_mib') or ''} |"
          for k, v in stages.items()),
    ]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
