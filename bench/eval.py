"""Benchmark of `radscribe eval`: generation throughput by batch size, locally and through an endpoint, and metric
time for 3,232 predictions.

Run as: OMP_NUM_THREADS=1 python bench/eval.py [--samples 256] [--size 224] [--max-new-tokens 64]
        [--batches 1,8,16] [--concurrency 1,4] [--metric-rows 3232] [--out bench/results/eval.md]

Generation: a tiny random Qwen3-VL (radscribe.model.tiny, text hidden 64, 2 layers) evaluates `--samples` validation
rows of a `radscribe synth` + `prepare` dataset through the full eval path (image loading, chat template, left-padded
batched greedy generation, scoring) at each batch size; samples/s is `predict_samples_per_second`. Image shapes are
real (224 px -> 49 image tokens). Caveat: a random model seldom emits EOS, so the rows of a batch tend to run to
`--max-new-tokens` together; a trained model's reports end at different lengths, which wastes part of each batch, so
real speed-ups from batching are somewhat lower than measured here.
Endpoint: the same samples through `radscribe eval --endpoint` against a `radscribe serve` subprocess of the same
model on 127.0.0.1 (`--max-batch 8`, `--batch-wait-ms 5`, OMP_NUM_THREADS=1 in the server), at each `--concurrency`
(requests in flight); samples/s is again `predict_samples_per_second` (wall time of the whole generation, PNG
encoding and HTTP included). Client and server share the machine's cores.
Metrics: BLEU-4/ROUGE (LLaMA-Factory definition), finding extraction and 1,000 bootstrap resamples of every score on
3,232 synthetic prediction/reference pairs (the reference article's validation size), jieba cache cleared first.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import tempfile
import time
from pathlib import Path


def machine_line() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    load = os.getloadavg()
    return (f"{cpu}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
            f"torch threads {__import__('torch').get_num_threads()}, load average at start "
            f"{load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}")


def bench_generation(args, work: Path) -> list[tuple]:
    import json

    from radscribe.cli import main
    from radscribe.evaluate.predict import EvalConfig, evaluate
    from radscribe.model.tiny import build_tiny_model
    from radscribe.serve.engine import Engine

    model_dir = build_tiny_model("qwen3_vl", work / "tiny", seed=0)
    n_rows = int(args.samples / 0.8) + 8
    main(["synth", "--out", str(work / "syn"), "--n", str(n_rows), "--size", str(args.size), "--workers", "1"])
    main(["prepare", str(work / "syn"), "--out", str(work / "ds"), "--val-ratio", "0.8", "--workers", "1",
          "--group-by", "patient"])
    engine = Engine.from_pretrained(model_dir, dtype="fp32", device="cpu")
    rows, reference = [], None
    for batch in args.batches:
        cfg = EvalConfig(model=str(model_dir), data=str(work / "ds"), limit=args.samples, batch_size=batch,
                         max_new_tokens=args.max_new_tokens, out=str(work / f"b{batch}"), n_boot=100,
                         overwrite=True)  # a rerun must measure, not reuse the saved results
        scores = evaluate(cfg, engine=engine)
        predictions = [json.loads(l)["predict"] for l in
                       (work / f"b{batch}" / "val" / "generated_predictions.jsonl").read_text().splitlines()]
        reference = reference or predictions
        same = sum(a == b for a, b in zip(predictions, reference)) / len(reference)
        r = scores["predict_results"]
        rows.append((f"local, batch size {batch}", scores["n"], r["predict_runtime"], r["predict_samples_per_second"],
                     same))
    rows += bench_endpoint(args, work, model_dir, reference)
    return rows


def bench_endpoint(args, work: Path, model_dir: Path, reference: list[str]) -> list[tuple]:
    """The same eval through `radscribe serve` (a subprocess) at each concurrency."""
    import json
    import socket
    import sys

    from radscribe.evaluate.predict import EvalConfig, evaluate

    sys.path.insert(0, str(Path(__file__).parent))
    from serve import start_server  # bench/serve.py: a `radscribe serve` subprocess, once /health answers

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = start_server(model_dir, port, max_batch=8, wait_ms=5.0, threads=1)
    rows = []
    try:
        for concurrency in args.concurrency:
            out = work / f"endpoint-c{concurrency}"
            cfg = EvalConfig(data=str(work / "ds"), endpoint=f"http://127.0.0.1:{port}/v1", concurrency=concurrency,
                             limit=args.samples, max_new_tokens=args.max_new_tokens, out=str(out), n_boot=100,
                             overwrite=True)
            scores = evaluate(cfg)
            predictions = [json.loads(l)["predict"] for l in
                           (out / "val" / "generated_predictions.jsonl").read_text().splitlines()]
            same = sum(a == b for a, b in zip(predictions, reference)) / len(reference)
            r = scores["predict_results"]
            rows.append((f"endpoint (radscribe serve), concurrency {concurrency}", scores["n"], r["predict_runtime"],
                         r["predict_samples_per_second"], same))
    finally:
        server.terminate()
        server.wait(timeout=30)
    return rows


def bench_metrics(n: int) -> list[tuple]:
    from radscribe.data.synth import report, sample_truth
    from radscribe.evaluate import metrics
    from radscribe.evaluate.predict import score_rows

    rng = random.Random(0)
    truths = [sample_truth(1, i) for i in range(n)]
    rows = []
    for t in truths:
        guess = dict(t)
        if rng.random() < 0.3 and t.get("location"):  # a wrong side now and then, as a half-trained model would
            guess["location"] = rng.choice(["left upper", "right upper", "left lower", "right lower", "central"])
        rows.append({"predict": report(guess), "label": report(t), "truth": t})
    out = []
    for workers in (1, 2):
        metrics._words.cache_clear()
        start = time.perf_counter()
        metrics.score_pairs([r["predict"] for r in rows], [r["label"] for r in rows], workers=workers)
        out.append((f"BLEU-4 + ROUGE-1/2/L, {workers} process(es)", time.perf_counter() - start))
    metrics._words.cache_clear()
    start = time.perf_counter()
    score_rows(rows, n_boot=1000, seed=0, workers=1)
    out.append(("everything `eval` computes (BLEU/ROUGE + findings + 1,000-resample CIs), 1 process",
                time.perf_counter() - start))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,8,16")
    parser.add_argument("--concurrency", default="1,4", help="endpoint concurrencies to measure")
    parser.add_argument("--metric-rows", type=int, default=3232)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "eval.md"))
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.concurrency = [int(c) for c in args.concurrency.split(",")]

    machine = machine_line()
    with tempfile.TemporaryDirectory() as tmp:
        generation = bench_generation(args, Path(tmp))
    metric_times = bench_metrics(args.metric_rows)
    end_load = os.getloadavg()

    base = generation[0][3]
    lines = ["# eval benchmark", "", f"Machine: {machine}; load average at end {end_load[0]:.2f}.",
             "The machine is shared with other work; the load average says how busy it was.", "",
             f"## Generation: tiny Qwen3-VL, {args.samples} val samples, {args.size} px images, "
             f"greedy, max_new_tokens {args.max_new_tokens}", "",
             "| how | samples | runtime (s) | samples/s | speed-up vs local batch 1 | outputs identical to local "
             "batch 1 |", "|---|---|---|---|---|---|"]
    for how, n, runtime, sps, same in generation:
        lines.append(f"| {how} | {n} | {runtime:.1f} | {sps:.2f} | {sps / base:.2f}× | {same:.0%} |")
    lines += ["", "Endpoint rows: `radscribe eval --endpoint http://127.0.0.1:PORT/v1 --concurrency N` against "
              "`radscribe serve --max-batch 8 --batch-wait-ms 5` (a subprocess, 1 thread) of the same model on the "
              "same machine; the client (image loading, PNG encoding, HTTP) shares the cores with it."]
    lines += ["", f"## Metrics on {args.metric_rows} predictions", "", "| what | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.2f} |" for name, seconds in metric_times]
    lines += ["", "Command: `OMP_NUM_THREADS=1 python bench/eval.py`", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
