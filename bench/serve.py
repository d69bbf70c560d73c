"""Load test of `radscribe serve`: N concurrent clients on loopback for a bounded time, batching off vs on.

Run as: python bench/serve.py [--clients 8] [--duration 40] [--rounds 4] [--max-tokens 32] [--threads 1]
                              [--device cpu] [--out bench/results/serve.md]

The server is a real `radscribe serve` subprocess on 127.0.0.1 with a tiny Qwen3-VL built in code (random
weights, so answer lengths vary a little; every request carries one 128x128 PNG). Each client thread sends
requests back to back until the time is up; the two modes run on two servers that are both up throughout,
in alternating rounds, so changes in machine load hit both alike. Reported per mode: completed requests,
errors (must be 0), requests/s, p50/p99 latency, and the speed-up of batching over one request per generate call.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def images(n: int) -> list[str]:
    uris = []
    for seed in range(n):
        arr = (np.random.RandomState(seed).rand(128, 128, 3) * 255).astype("uint8")
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        uris.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return uris


def start_server(model_dir: Path, port: int, max_batch: int, wait_ms: float, threads: int,
                 device: str = "cpu", extra: list[str] = ()) -> subprocess.Popen:
    """`radscribe serve` (plus `extra` flags) as a subprocess, once its /health answers (also bench/serve_hostile.py)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TQDM_DISABLE="1")
    cmd = [sys.executable, "-m", "radscribe.cli", "serve", "--model", str(model_dir), "--port", str(port),
           "--device", device, "--max-batch", str(max_batch), "--batch-wait-ms", str(wait_ms), *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not come up in 120 s")


def merge(rounds: list[dict]) -> dict:
    """Rounds of one mode -> totals; latency percentiles over all requests of all rounds."""
    latencies = sorted(x for r in rounds for x in r["latencies"])
    completed, wall = len(latencies), sum(r["wall_s"] for r in rounds)
    return {"completed": completed, "errors": sum(r["errors"] for r in rounds), "wall_s": wall,
            "rps": completed / wall, "p50_s": statistics.median(latencies) if latencies else float("nan"),
            "p99_s": latencies[min(completed - 1, int(0.99 * completed))] if latencies else float("nan"),
            "round_rps": [r["rps"] for r in rounds]}


def load(port: int, clients: int, duration: float, max_tokens: int, uris: list[str]) -> dict:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + duration

    def client(index: int) -> None:
        with httpx.Client(timeout=120) as http:
            k = 0
            while time.monotonic() < stop_at:
                body = {"model": "radscribe", "max_tokens": max_tokens, "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": uris[(index + k) % len(uris)]}},
                    {"type": "text", "text": "图片中的诊断结果是怎样?"}]}]}
                k += 1
                t0 = time.perf_counter()
                try:
                    reply = http.post(url, json=body)
                    ok = reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] is not None
                    problem = None if ok else f"HTTP {reply.status_code}: {reply.text[:200]}"
                except httpx.HTTPError as err:
                    problem = f"{type(err).__name__}: {err}"
                elapsed = time.perf_counter() - t0
                with lock:
                    (errors.append(problem) if problem else latencies.append(elapsed))

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ordered = sorted(latencies)
    return {
        "completed": len(latencies), "errors": len(errors), "first_error": errors[0] if errors else "",
        "wall_s": wall, "rps": len(latencies) / wall, "latencies": latencies,
        "p50_s": statistics.median(ordered) if ordered else float("nan"),
        "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of load per mode, all rounds")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--wait-ms", type=float, default=5.0, help="batching window")
    parser.add_argument("--rounds", type=int, default=4, help="alternations of the two modes")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--device", default="cpu", help="server device: cpu or cuda")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.md"))
    args = parser.parse_args()

    from radscribe.model.tiny import build_tiny_model

    uris = images(8)
    load_before = os.getloadavg()
    modes = [("off (max_batch=1)", 1), (f"on (max_batch={args.clients})", args.clients)]
    results: dict[str, list[dict]] = {label: [] for label, _ in modes}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model("qwen3_vl", Path(tmp) / "tiny", seed=0)
        # Both servers stay up and the modes alternate round by round, so a change in machine load (other
        # people's jobs share these cores) hits both modes alike instead of skewing the ratio.
        servers = {label: start_server(model_dir, args.port + i, max_batch, args.wait_ms, args.threads, args.device)
                   for i, (label, max_batch) in enumerate(modes)}
        try:
            for i, (label, _) in enumerate(modes):
                load(args.port + i, args.clients, min(3.0, args.duration), args.max_tokens, uris)  # warm-up
            for round_no in range(args.rounds):
                for i, (label, _) in enumerate(modes):
                    r = load(args.port + i, args.clients, args.duration / args.rounds, args.max_tokens, uris)
                    results[label].append(r)
                    print(f"round {round_no + 1} batching {label}: {r['completed']} requests, {r['errors']} errors, "
                          f"{r['rps']:.2f} req/s, p50 {r['p50_s']:.3f} s, p99 {r['p99_s']:.3f} s", flush=True)
                    if r["errors"]:
                        print(f"  first error: {r['first_error']}", flush=True)
            mean_batch = {label: httpx.get(f"http://127.0.0.1:{args.port + i}/health").json()["mean_batch"]
                          for i, (label, _) in enumerate(modes)}
        finally:
            for proc in servers.values():
                proc.terminate()
                proc.wait(timeout=30)
    rows = [(label, {**merge(results[label]), "mean_batch": mean_batch[label]}) for label, _ in modes]
    load_after = os.getloadavg()
    speedup = rows[1][1]["rps"] / rows[0][1]["rps"] if rows[0][1]["rps"] else float("nan")
    print(f"speed-up from batching at {args.clients} clients: {speedup:.2f}x")
    write_table(Path(args.out), args, rows, speedup, load_before, load_after)


def write_table(path: Path, args, rows, speedup: float, load_before, load_after) -> None:
    import torch

    lines = [
        "# Serve load test (`python bench/serve.py`)", "",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}",
        f"- load average (1/5/15 min) before: {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
        f"after: {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} (other engineers' jobs share the cores)",
        f"- server: `radscribe serve --device {args.device}` subprocess on 127.0.0.1, OMP_NUM_THREADS={args.threads}, "
        "tiny Qwen3-VL "
        "(text hidden 64, 2 layers; vision hidden 32, depth 2; random weights), batching window "
        f"{args.wait_ms} ms",
        f"- load: {args.clients} concurrent clients (threads, one HTTP connection each), back to back, "
        f"{args.duration:.0f} s per mode in {args.rounds} alternating rounds after a warm-up (both servers up "
        "throughout); one 128x128 PNG per request (8 different images), "
        f"max_tokens {args.max_tokens}, greedy",
        "",
        "| batching | completed | errors | requests/s | requests/s per round | p50 latency (s) | p99 latency (s) "
        "| mean batch |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for label, r in rows:
        per_round = ", ".join(f"{x:.1f}" for x in r["round_rps"])
        lines.append(f"| {label} | {r['completed']} | {r['errors']} | {r['rps']:.2f} | {per_round} | {r['p50_s']:.3f} | "
                     f"{r['p99_s']:.3f} | {r['mean_batch']} |")
    lines += ["", f"Speed-up from batching at {args.clients} clients: **{speedup:.2f}x** (target >= 2x).", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    # bench/serve_hostile.py writes its own section after this one: keep it.
    hostile = "## Under attack (`python bench/serve_hostile.py`)"
    previous = path.read_text(encoding="utf-8") if path.is_file() else ""
    kept = hostile + previous.split(hostile, 1)[1] if hostile in previous else ""
    path.write_text("\n".join(lines) + ("\n" + kept if kept else ""), encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
