"""Benchmark `radscribe prepare` against the reference recipe's approach; writes bench/results/prepare.md.

Run as: OMP_NUM_THREADS=1 python bench/prepare.py [--rows 16000] [--size 512] [--small-rows 4000] [--workdir DIR]

Input: a MedTrinity `25M_demo`-shaped parquet folder of `--rows` JPEG phantoms (`radscribe synth`, cached in
bench/out/). Compared, each in its own process:
- baseline: the reference recipe re-implemented: `datasets.load_dataset("parquet")`, decode every image,
  `image.save(path)`, collect the rows, one `json.dump(..., indent=2)` at the end;
- radscribe: `radscribe prepare INPUT --out OUT` (default workers: one per core);
- radscribe on the first `--small-rows` rows, to show that peak memory does not grow with the row count.
Measured: wall time, peak RSS of the whole process tree (sampled every 50 ms from /proc), output bytes, and the
fraction of stored images byte-identical to the source bytes. Also: `radscribe synth` throughput at 224 px, and
a run killed with SIGKILL then rerun, compared file by file with the uninterrupted run.

`--group-by similar` section (`--only similar` reruns just that section and replaces it in the results file): a
second input of `--rows` slices of scans (`radscribe synth --volumes --slices-per-patient 8`: adjacent slices are
near-duplicates, as in MedTrinity), prepared with the per-row split, `--group-by patient` (the synthetic truth,
which MedTrinity does not have) and `--group-by similar`; each dataset then goes through `radscribe audit`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "prepare"
RESULTS = HERE / "results" / "prepare.md"

BASELINE = r'''
import json, os, sys
from pathlib import Path
import datasets
src, out = sys.argv[1], Path(sys.argv[2])
(out / "images").mkdir(parents=True, exist_ok=True)
ds = datasets.load_dataset("parquet", data_files=f"{src}/*.parquet", split="train", cache_dir=str(out / "hf-cache"))
rows = []
for example in ds:
    path = f"images/{example['id']}.jpg"
    example["image"].save(out / path)  # decode + re-encode at PIL's default quality: the reference recipe
    rows.append({"messages": [{"role": "user", "content": "<image>图片中的诊断结果是怎样?"},
                              {"role": "assistant", "content": example["caption"]}], "images": [path]})
with open(out / "train.json", "w", encoding="utf-8") as f:
    json.dump(rows, f, ensure_ascii=False, indent=2)
shutil = __import__("shutil"); shutil.rmtree(out / "hf-cache")
'''


def tree_memory_kib(root: int) -> tuple[int, int]:
    """(summed RSS, summed PSS) of `root` and its descendants. RSS counts shared pages (libraries, the
    interpreter) once per process; PSS splits them, so the PSS sum is the tree's real footprint."""
    rss = pss = 0
    stack = [root]
    while stack:
        pid = stack.pop()
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except OSError:
            pass
    return rss, pss


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd`; wall seconds and peak RSS (MiB) of its process tree.

    The disk is synced and left to settle first, so that the writeback of the previous run's output (1 GB of
    images, then its deletion) is not billed to this one: on this machine that alone swung a run 4.5 s -> 8 s.
    """
    os.sync()
    time.sleep(3)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = [0, 0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            rss, pss = tree_memory_kib(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err.decode()[-2000:]}")
    return {"wall_s": wall, "peak_rss_mib": peak[0] / 1024, "peak_pss_mib": peak[1] / 1024}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def identical_fraction(src: Path, out: Path, ours: bool) -> float:
    """Fraction of source images stored byte-identical in `out`."""
    import json

    import pyarrow.parquet as pq

    stored = {}
    if ours:
        for split in ("train", "val"):
            for row in json.loads((out / f"{split}.json").read_text(encoding="utf-8")):
                stored[row["id"]] = out / row["images"][0]
    same = total = 0
    for shard in sorted(src.glob("*.parquet")):
        for batch in pq.ParquetFile(shard).iter_batches(columns=["image", "id"], batch_size=512):
            for image, row_id in zip(batch.column("image").to_pylist(), batch.column("id").to_pylist()):
                path = stored.get(row_id) if ours else out / "images" / f"{row_id}.jpg"
                total += 1
                same += path is not None and path.is_file() and path.read_bytes() == image["bytes"]
    return same / max(1, total)


def file_create_ms(folder: Path, n: int = 300) -> float:
    """Milliseconds to create and write one 66 kB file in `folder` (the per-image floor of both runs)."""
    probe = folder / "create-probe"
    probe.mkdir(parents=True, exist_ok=True)
    data = os.urandom(66_000)
    start = time.perf_counter()
    for i in range(n):
        with open(probe / f"f{i}", "wb") as f:
            f.write(data)
    elapsed = time.perf_counter() - start
    shutil.rmtree(probe)
    return elapsed / n * 1000


def tree_digest(folder: Path) -> str:
    """sha256 over every file's relative path and sha256: equal digests = identical output trees."""
    import hashlib

    outer = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        outer.update(f"{path.relative_to(folder)}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return outer.hexdigest()


def sigkill_and_resume(src: Path, out: Path, rows: int) -> dict:
    """Kill a run once ~40 % of the images are stored, rerun it, then rerun the finished folder."""
    import signal

    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "radscribe.cli", "prepare", str(src), "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        if (out / "images").is_dir() and len(os.listdir(out / "images")) >= 0.4 * rows:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    result = {"killed_after_s": time.perf_counter() - start, "images_at_kill": len(os.listdir(out / "images"))}
    assert not (out / "summary.json").exists(), "the run finished before it was killed"
    result["rerun_s"] = measure(cmd)["wall_s"]
    result["digest"] = tree_digest(out)
    result["files"] = sum(1 for p in out.rglob("*") if p.is_file())
    result["noop_s"] = measure(cmd)["wall_s"]
    shutil.rmtree(out, ignore_errors=True)
    return result


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


SIMILAR_HEADING = "## `--group-by similar` on slices of scans"


def similar_section(rows: int, size: int, workdir: Path, slices: int = 8) -> list[str]:
    """Per-row split vs --group-by patient vs --group-by similar on near-duplicate slices, with the audit of each."""
    import json

    import numpy as np

    from radscribe.data.similar import near_pairs, similar_groups
    from radscribe.data.synth import synth
    from radscribe.evaluate.audit import AuditConfig, audit

    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    load_before = loadavg()
    src = OUT / f"volumes-{rows}x{size}-s{slices}"
    if not (src / "DONE").is_file():
        shutil.rmtree(src, ignore_errors=True)
        t = time.perf_counter()
        synth(out=str(src), n=rows, size=size, shard_rows=1000, seed=0, slices_per_patient=slices, volumes=True)
        print(f"volumes input written in {time.perf_counter() - t:.1f} s", flush=True)
        (src / "DONE").write_text("")
    runs = [("per-row split (default)", []), ("`--group-by patient` (synthetic truth)", ["--group-by", "patient"]),
            ("`--group-by similar`", ["--group-by", "similar"])]
    results = []
    for n, (name, extra) in enumerate(runs):
        out = workdir / "similar" / str(n)
        shutil.rmtree(out, ignore_errors=True)
        print(f"running {name} ...", flush=True)
        r = measure([sys.executable, "-m", "radscribe.cli", "prepare", str(src), "--out", str(out), *extra])
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        start = time.perf_counter()
        leaks = audit(AuditConfig(str(out)))
        r.update(name=name, summary=summary, audit=leaks, audit_s=time.perf_counter() - start)
        print(name, {k: v for k, v in r.items() if k not in ("summary", "audit")}, leaks.rate(), flush=True)
        results.append(r)
    for n in range(len(runs)):
        shutil.rmtree(workdir / "similar" / str(n), ignore_errors=True)
    # The index alone at a scale this machine cannot hash in a benchmark: random hashes (buckets even; clusters of
    # near-identical images make theirs larger).
    random_hashes = np.random.default_rng(0).integers(0, 2 ** 64 - 1, size=1_000_000, dtype=np.uint64)
    start = time.perf_counter()
    similar_groups(random_hashes, 4)
    index_1m_s = time.perf_counter() - start
    assert len(near_pairs(random_hashes[:1000], 4)[0]) == 0

    per_row, _, similar = results
    lines = [
        SIMILAR_HEADING,
        "",
        f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC with `OMP_NUM_THREADS={threads} "
        f"python bench/prepare.py --rows {rows} --size {size} --workdir {workdir} --only similar`.",
        f"Machine: {os.cpu_count()} CPU cores, shared with other engineers' jobs; load average (1/5/15 min, "
        f"`uptime`) before: {load_before}, after: {loadavg()}. prepare uses one worker per core.",
        f"Input: {rows} rows of {size}x{size} JPEG slices (`radscribe synth --volumes --slices-per-patient "
        f"{slices}`: {rows // slices} patients, each its own anatomy, adjacent slices a small step apart).",
        "",
        "| split | prepare wall (s) | rows/s | peak RSS / PSS (MiB) | groups (train + val) | largest group (rows) | "
        "val rows | audit: near / exact / group (val rows flagged) | leak share | `audit --strict` | audit wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        sm, leaks = r["summary"], r["audit"]
        split = sm["split"]
        groups = split["train_groups"] + split["val_groups"]
        largest = split.get("largest_group_rows", 1 if split["group_by"] is None else slices)
        flagged = [len(leaks.flagged.get(c, ())) for c in ("near", "exact", "group")]
        lines.append(f"| {r['name']} | {r['wall_s']:.1f} | {rows / r['wall_s']:.0f} | {r['peak_rss_mib']:.0f} / "
                     f"{r['peak_pss_mib']:.0f} | {groups} | {largest} | {sm['val']} | "
                     f"{' / '.join(map(str, flagged))} | {leaks.rate():.2%} | "
                     f"{'passes' if leaks.rate() == 0 else 'fails'} | {r['audit_s']:.0f} |")
    lines += [
        "",
        f"`--group-by similar` took {similar['wall_s'] / per_row['wall_s']:.1f}x the per-row split's time: every "
        f"image is decoded once to hash it (pHash of the image box-reduced to >= 128 px), which the per-row split's "
        f"structure check never does; then all {similar['summary']['train'] + similar['summary']['val']} accepted rows "
        f"are grouped and written out in a second pass that reads no image. "
        f"{similar['summary']['split']['rows_in_shared_groups']} rows share a group with at least one other. "
        f"Wall times depend on the load stated above; compare the rows with each other.",
        f"The near-pair index alone (multi-index hashing, 5 blocks of 12-13 bits at threshold 4, then union-find) "
        f"on 1,000,000 random hashes: {index_1m_s:.1f} s in this process.",
        "",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=16000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--small-rows", type=int, default=4000)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--workdir", default=str(OUT), help="where the runs write their outputs")
    parser.add_argument("--only", choices=["all", "similar"], default="all",
                        help="similar: rerun only the --group-by similar section and replace it in the results")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    if args.only == "similar":
        section = similar_section(args.rows, args.size, workdir)
        previous = RESULTS.read_text(encoding="utf-8") if RESULTS.is_file() else ""
        RESULTS.write_text(_replace_section(previous, section), encoding="utf-8")
        print("\n".join(section))
        return
    from radscribe.data.synth import synth

    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    load_before = loadavg()
    src = OUT / f"input-{args.rows}x{args.size}"
    shard_rows = 1000
    if not (src / "DONE").is_file():
        shutil.rmtree(src, ignore_errors=True)
        t = time.perf_counter()
        synth(out=str(src), n=args.rows, size=args.size, shard_rows=shard_rows, seed=0)
        print(f"input written in {time.perf_counter() - t:.1f} s")
        (src / "DONE").write_text("")
    small = OUT / f"input-{args.small_rows}x{args.size}"
    small.mkdir(parents=True, exist_ok=True)
    for shard in sorted(src.glob("*.parquet"))[: args.small_rows // shard_rows]:
        if not (small / shard.name).exists():
            os.link(shard, small / shard.name)

    # synth throughput at its default size, both cores
    synth_dir = OUT / "synth-224"
    shutil.rmtree(synth_dir, ignore_errors=True)
    synth_run = measure([sys.executable, "-m", "radscribe.cli", "synth", "--out", str(synth_dir), "--n", "4000",
                         "--shard-rows", "500"])
    shutil.rmtree(synth_dir, ignore_errors=True)

    results = {}
    runs = [("radscribe", src, True), (f"radscribe ({args.small_rows} rows)", small, True),
            ("radscribe --verify decode", src, True)]
    if not args.skip_baseline:
        runs.insert(0, ("baseline (reference recipe)", src, False))
    finished = []
    for name, input_dir, ours in runs:
        out = workdir / ("ours" if ours else "baseline") / f"{input_dir.name}-{len(results)}"
        shutil.rmtree(out, ignore_errors=True)
        if ours:
            cmd = [sys.executable, "-m", "radscribe.cli", "prepare", str(input_dir), "--out", str(out)]
            cmd += ["--verify", "decode"] if "decode" in name else []
        else:
            cmd = [sys.executable, "-c", BASELINE, str(input_dir), str(out)]
        print(f"running {name} ...", flush=True)
        r = measure(cmd)
        r["rows"] = sum(1 for _ in input_dir.glob("*.parquet")) * shard_rows
        r["out_mib"] = folder_bytes(out) / 2 ** 20
        r["identical"] = identical_fraction(input_dir, out, ours)
        if name == "radscribe":
            r["digest"] = tree_digest(out)
        results[name] = r
        print(name, r, flush=True)
        # Outputs are deleted only at the end: ext4 skips inodes freed in the last minutes when it allocates
        # new ones (perf: recently_deleted under ext4_create), which made a run right after a 16,000-file delete
        # spend most of its time in the kernel.
        finished.append(out)
    for out in finished:
        shutil.rmtree(out, ignore_errors=True)
    resume = sigkill_and_resume(src, workdir / "ours" / "killed", args.rows)
    print("resume", resume, flush=True)

    input_mib = folder_bytes(src) / 2 ** 20
    create_ms = {str(d): file_create_ms(d) for d in dict.fromkeys([workdir, OUT])}
    lines = [
        "# `radscribe prepare` benchmark",
        "",
        f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC with `OMP_NUM_THREADS={threads} "
        f"python bench/prepare.py --rows {args.rows} --size {args.size} --small-rows {args.small_rows} "
        f"--workdir {args.workdir}`.",
        f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), shared with other "
        f"engineers' jobs; load average (1/5/15 min) before: {load_before}, after: {loadavg()}.",
        f"Input: {args.rows} rows of {args.size}x{args.size} JPEG phantoms (`radscribe synth`), "
        f"{input_mib:.0f} MiB of parquet in {args.rows // shard_rows} shards, row groups of 256. "
        f"Outputs written under {workdir}.",
        "Creating + writing one 66 kB file costs " + ", ".join(f"{ms:.2f} ms in {d}" for d, ms in create_ms.items())
        + " (measured at the end; it swings between ~0.04 and ~0.8 ms with the other jobs' disk traffic, and "
        "every run pays it once per image).",
        "",
        "| run | rows | wall (s) | rows/s | peak RSS sum / PSS sum, process tree (MiB) | output (MiB) | "
        "images byte-identical |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['rows']} | {r['wall_s']:.1f} | {r['rows'] / r['wall_s']:.0f} | "
                     f"{r['peak_rss_mib']:.0f} / {r['peak_pss_mib']:.0f} | {r['out_mib']:.0f} | {100 * r['identical']:.1f} % |")
    lines.append("")
    base = results.get("baseline (reference recipe)")
    ours = results["radscribe"]
    if base:
        decode = results["radscribe --verify decode"]
        lines.append(f"Speed-up over the baseline: **{base['wall_s'] / ours['wall_s']:.1f}x** with the default "
                     f"`--verify structure`, {base['wall_s'] / decode['wall_s']:.1f}x with `--verify decode` "
                     f"(target >= 5x). ")
    lines += [
        f"Peak memory of radscribe (RSS sum / PSS sum): {ours['peak_rss_mib']:.0f} / {ours['peak_pss_mib']:.0f} MiB "
        f"at {ours['rows']} rows vs {results[f'radscribe ({args.small_rows} rows)']['peak_rss_mib']:.0f} / "
        f"{results[f'radscribe ({args.small_rows} rows)']['peak_pss_mib']:.0f} MiB at {args.small_rows} rows "
        f"(target < 500 MB, independent of the row count). The tree total counts the main process and the "
        f"image-verification workers (spawned interpreters).",
        "",
        f"`radscribe synth` at its default 224 px, 4000 images: {synth_run['wall_s']:.1f} s = "
        f"{4000 / synth_run['wall_s'] * 60:.0f} images/min including interpreter start-up (target >= 2,000/min).",
        "",
        "Notes: the baseline re-encodes every JPEG at PIL's default quality (75), so none of its images are "
        "byte-identical and fine detail is lost; its wall time includes `datasets`' Arrow cache of the input. "
        "radscribe copies JPEG/PNG bytes unchanged after checking their structure (headers, end marker, PNG CRCs) "
        "in a process pool; `--verify decode` adds a 1/8-scale JPEG decode, which libjpeg passes even for most "
        "corrupt entropy data.",
        "",
    ]
    lines += [
        "## SIGKILL and resume (acceptance 4)",
        "",
        f"`radscribe prepare` on the {args.rows}-row input was killed with SIGKILL after {resume['killed_after_s']:.1f} s "
        f"({resume['images_at_kill']} images stored), then rerun with the same arguments: the rerun took "
        f"{resume['rerun_s']:.1f} s and the output tree (every file's sha256) is "
        f"**{'identical' if resume['digest'] == ours['digest'] else 'DIFFERENT'}** to the uninterrupted run's "
        f"({resume['files']} files). A further rerun on the finished folder is a no-op: {resume['noop_s']:.2f} s "
        f"(mostly interpreter start-up).",
        "",
    ]
    lf = HERE / "results" / "llamafactory_check.json"
    if lf.is_file():
        import json

        check = json.loads(lf.read_text(encoding="utf-8"))
        c = check["checks"]
        lines += [
            "## LLaMA-Factory compatibility (acceptance 2)",
            "",
            "`radscribe synth --out bench/out/lf/synth` then `radscribe prepare bench/out/lf/synth --out "
            "bench/out/lf/dataset --group-by patient`, loaded by `bench/llamafactory_check.py` in a scratch venv "
            f"(llamafactory {check['llamafactory']}, torch 2.13.0+cpu): result **{'ok' if check['ok'] else 'FAILED'}**.",
            f"- converter (`_get_merged_dataset`, sharegpt): rows {c['aligned_rows']}, equal to summary.json: "
            f"{c['aligned_rows_match_summary']}; every image path resolved: {c['images_resolved']}",
            f"- `get_dataset(stage='sft')`, template `qwen3_vl_nothink`, Qwen2-VL image processor (patch 16, merge 2): "
            f"rows {c['tokenized_rows']}, equal to summary.json: {c['tokenized_rows_match_summary']}; "
            f"{c['image_tokens_first_row']} `<|image_pad|>` tokens for a 224 px image; prompt masked in labels: "
            f"{c['prompt_masked']}; labels decode to the report: {c['labels_decode_to_report']}",
            "- the scratch venv needs `pip uninstall torchvision torchaudio` (PyPI's CUDA-linked wheels do not load "
            "beside torch 2.13.0+cpu) and the check script puts an empty `torchaudio` module in place "
            "(LLaMA-Factory imports it at module level, for audio only).",
            "",
        ]
    lines += similar_section(args.rows, args.size, workdir)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


def _replace_section(text: str, section: list[str]) -> str:
    """`text` with its `SIMILAR_HEADING` section (up to the next `## ` heading) replaced by `section`, or with
    `section` appended."""
    lines = text.splitlines()
    if SIMILAR_HEADING not in lines:
        return "\n".join([*lines, "", *section]) if lines else "\n".join(section)
    start = lines.index(SIMILAR_HEADING)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join([*lines[:start], *section, *lines[end:]])


if __name__ == "__main__":
    main()
