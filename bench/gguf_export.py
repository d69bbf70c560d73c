"""GGUF export: parity with transformers per quantisation, measured bits per weight, and the 30B-A3B arithmetic.

Run as: python bench/gguf_export.py [--write-table] [--out bench/results/gguf.md]

For the dense and the MoE real-layout tiny model (Qwen's real vocabulary, 4 text layers, one deepstack tap, text
hidden 256 so llama-quantize's 256-wide k-quant blocks apply as on the released models) with a random-B adapter
(expert LoRA on the MoE): `radscribe export --format gguf --quantize f16`, then llama-quantize q8_0 and q4_k_m
from that f16 file (what `--quantize` runs). Each GGUF answers two text prompts and one 256x256 image prompt on
`llama-server` (greedy: temperature 0, top_k 1), compared token by token with the merged model's greedy output in
transformers (fp32); the cases and the adapter trained to answer them are tests/test_gguf.py's (CASES,
train_adapter). `--write-table` rewrites radscribe/interop/gguf_bits.json, the bits per weight per tensor
class that `radscribe export --dry-run --format gguf` applies to a real config; the results file then shows that
arithmetic for the published Qwen3-VL-30B-A3B-Instruct config (tests/assets) and checks it on a tiny export of
another shape (predicted vs actual file sizes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gguf_trained import SECTION as TRAINED_SECTION  # noqa: E402
from radscribe.cli import main  # noqa: E402
from radscribe.export import export  # noqa: E402
from radscribe.interop import gguf, llamacpp  # noqa: E402
from radscribe.model.real_layout import Widths, build_real_layout_model  # noqa: E402
from tests.test_gguf import MIN_GAP, TOKENS, enough_cases, make_adapter, parity_cases, references  # noqa: E402

WIDTHS = Widths(text_hidden=256, moe_intermediate=256)
GGUF_ARCH = {"qwen3_vl": "qwen3vl", "qwen3_vl_moe": "qwen3vlmoe"}
CONFIG_30B = ROOT / "tests" / "assets" / "Qwen3-VL-30B-A3B-Instruct"
_GIB = 1024 ** 3


def prepare(arch: str, root: Path):
    base = build_real_layout_model(arch, root / "base", seed=0, widths=WIDTHS)
    adapter = make_adapter(base, root / "adapter", experts=arch.endswith("moe"))
    return base, adapter, export(base, adapter, root / "hf")


def run_arch(arch: str, root: Path) -> dict:
    base, adapter, hf = prepare(arch, root)
    start = time.monotonic()
    assert main(["export", "--format", "gguf", "--quantize", "f16", "--model", str(base), "--adapter", str(adapter),
                 str(root / "f16")]) == 0
    export_s = time.monotonic() - start
    entry = {"root": root, "base": base, "adapter": adapter, "hf": hf, "f16": root / "f16"}
    files = {"f16": root / "f16" / gguf.model_file("f16")}
    for quant in ("q8_0", "q4_k_m"):
        files[quant] = gguf.quantize_gguf(files["f16"], root / gguf.model_file(quant), quant)
    mmproj = root / "f16" / gguf.MMPROJ_FILE
    refs = references(entry, enough=enough_cases)
    try:
        cases = parity_cases(refs)
    except AssertionError as err:  # still measure the bits; the parity table then shows what was found
        print(f"bench/gguf_export.py: {arch}: {err}", flush=True)
        cases = sorted(refs, key=lambda r: -r[4])[:4]
    result = {"export_s": export_s, "quants": {}, "cases": [(c, gap) for c, _, _, _, gap in cases],
              "candidates": [(c, gap, len(set(tokens))) for c, _, _, tokens, gap in refs]}
    for quant, path in files.items():
        with llamacpp.LlamaServer(path, mmproj=mmproj) as server:
            answers = [server.complete(prompt, TOKENS, images) for _, prompt, images, _, _ in cases]
        measured = {"model": gguf.measure(path), "mmproj": gguf.measure(mmproj)}
        result["quants"][quant] = {
            "bytes": path.stat().st_size, "mmproj_bytes": mmproj.stat().st_size,
            "bits": gguf.bits_table(measured),
            "cases": [dict(gguf.agreement(expected, got), distinct=len(set(expected)), exact=expected == got)
                      for (_, _, _, expected, _), got in zip(cases, answers)],
        }
    return result


def cross_shape_check(root: Path, measured_export: Path) -> dict:
    """Bits measured on the 4-layer MoE export predict a 6-layer, 6-expert, 512-wide MoE: predicted vs actual."""
    other = build_real_layout_model("qwen3_vl_moe", root / "other", seed=1, widths=dataclasses.replace(
        WIDTHS, text_hidden=512, text_layers=6, experts=6, moe_intermediate=512))
    assert main(["export", "--format", "gguf", "--quantize", "q4_k_m", "--model", str(other),
                 str(root / "other-gguf")]) == 0
    predicted = gguf.plan(other, "q4_k_m", bits_from=measured_export)
    actual = json.loads((root / "other-gguf" / gguf.MANIFEST).read_text())["bytes"]
    return {part: (predicted.bytes[part], actual[part]) for part in ("model", "mmproj")}


def write_table(results: dict) -> None:
    table = {
        "llama_cpp_python": llamacpp.LLAMA_CPP_PYTHON,
        "measured_on": {"widths": dataclasses.asdict(WIDTHS),
                        "how": "python bench/gguf_export.py --write-table: real-layout tiny Qwen3-VL / Qwen3-VL-MoE exported "
                               "with radscribe export --format gguf, quantised by llama-quantize, read back with gguf"},
    }
    for arch, result in results.items():
        table[GGUF_ARCH[arch]] = {quant: q["bits"] for quant, q in result["quants"].items()}
    gguf.BITS_TABLE.write_text(json.dumps(table, indent=1, sort_keys=False) + "\n")


def report(results: dict, cross: dict, build: dict, load_before, load_after, seconds: float) -> str:
    lines = [
        "# GGUF export (`python bench/gguf_export.py`)", "",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; whole run {seconds / 60:.1f} min",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        f"- load average before: {load_before}, after: {load_after} (other engineers' jobs share the cores)",
        f"- llama.cpp: the copy vendored in llama-cpp-python {llamacpp.LLAMA_CPP_PYTHON}, built by "
        f"`radscribe llamacpp install` in {build.get('build_seconds', 0) / 60:.0f} min with {build.get('jobs')} jobs",
        f"- models: real-layout tiny Qwen3-VL and Qwen3-VL-MoE (Qwen's real vocabulary, 4 text layers, text hidden "
        f"{WIDTHS.text_hidden}, MoE {WIDTHS.experts} experts of width {WIDTHS.moe_intermediate}; random bf16 weights) "
        "+ a LoRA r4 with random B and scale 16 on every projection (expert LoRA on the MoE; tests/test_gguf.py "
        "make_adapter), merged",
        "- reference: transformers greedy on the merged safetensors in fp32 (loaded by radscribe.model.load); "
        "GGUF: llama-server `POST /completion`, "
        f"temperature 0, top_k 1, {TOKENS} tokens, llama-server threads = cores",
        f"- cases: tests/test_gguf.py parity_cases, the first two text-only and two image candidates whose {TOKENS} "
        f"greedy steps in transformers all lead by >= {MIN_GAP} in log-probability (image = a 256x256 noise PNG of "
        "that seed, 64 image tokens on both sides, no resize): "
        + "; ".join(f"{arch}: " + ", ".join(f"`{t}`" + (f" + image {seed}" if seed is not None else "")
                                             + f" (gap {g:.4f})" for (t, seed), g in r["cases"])
                    for arch, r in results.items()),
        "- decided candidates: " + "; ".join(
            f"{arch} {sum(g >= MIN_GAP for _, g, _ in r['candidates'])} of {len(r['candidates'])}"
            for arch, r in results.items()), "",
        "## Parity: tokens equal to transformers' greedy output (of the first 32)", "",
        "agreement = share of the 32 positions holding the same token; prefix = tokens before the first difference;"
        " distinct = different tokens among the reference's 32 (a degenerate repeat would show 1-2).", "",
        "| model | GGUF | case 1 | case 2 | case 3 | case 4 | file size |", "|---|---|---|---|---|---|---:|",
    ]
    for arch, result in results.items():
        for quant, q in result["quants"].items():
            cells = [f"{c['agreement']:.0%} (prefix {c['common_prefix']}, distinct {c['distinct']})"
                     + (" exact" if c["exact"] else "") for c in q["cases"]]
            lines.append(f"| {arch} | {quant} | " + " | ".join(cells) + f" | {q['bytes'] / 1024 ** 2:.1f} MiB |")
    lines += ["", "## Bits per weight per tensor class, measured in the q4_k_m files", "",
              "| class | qwen3vl | qwen3vlmoe |", "|---|---:|---:|"]
    dense, moe = (results[a]["quants"]["q4_k_m"]["bits"]["bits"]["model"] for a in ("qwen3_vl", "qwen3_vl_moe"))
    for name in sorted(set(dense) | set(moe)):
        lines.append(f"| {name} | {dense.get(name, '')} | {moe.get(name, '')} |")
    lines += ["", "## The arithmetic checked on a tiny export of another shape", "",
              "Bits measured on the 4-layer MoE q4_k_m export, applied to a 6-layer, 6-expert, 512-wide MoE built from "
              "its config; then that model exported for real:", "",
              "| file | predicted | actual | error |", "|---|---:|---:|---:|"]
    for part, (pred, actual) in cross.items():
        lines.append(f"| {part} | {pred:,d} B | {actual:,d} B | {pred / actual - 1:+.2%} |")
    lines += ["", "## Qwen3-VL-30B-A3B-Instruct (published config.json), `radscribe export --dry-run --format gguf`",
              "", "| --quantize | model GGUF | mmproj | KV cache at 8192 | total | 24 GiB card |",
              "|---|---:|---:|---:|---:|---|"]
    for quant in gguf.QUANTS:
        p = gguf.plan(CONFIG_30B, quant, ctx=8192, gpu_mem_gib=24)
        left = 24 - p.total_bytes / _GIB
        lines.append(f"| {quant} | {p.bytes['model'] / _GIB:.2f} GiB | {p.bytes['mmproj'] / _GIB:.2f} GiB | "
                     f"{p.kv_bytes / _GIB:.2f} GiB | {p.total_bytes / _GIB:.2f} GiB | "
                     f"{'fits' if p.fits else 'does not fit'} ({left:+.2f} GiB left) |")
    lines += ["", "```", gguf.format_plan(gguf.plan(CONFIG_30B, "q4_k_m", ctx=8192, gpu_mem_gib=24)), "```", ""]
    return "\n".join(lines)


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-table", action="store_true", help="rewrite radscribe/interop/gguf_bits.json")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gguf.md"))
    args = parser.parse_args()
    start = time.monotonic()
    load_before = "/".join(f"{x:.2f}" for x in os.getloadavg())
    tools = llamacpp.install()
    build = json.loads((tools.root.parent / "radscribe-build.json").read_text()) \
        if (tools.root.parent / "radscribe-build.json").is_file() else {}
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        results = {arch: run_arch(arch, Path(tmp) / arch) for arch in GGUF_ARCH}
        if args.write_table:
            write_table(results)
        moe_q4 = Path(tmp) / "moe-q4"
        assert main(["export", "--format", "gguf", "--quantize", "q4_k_m", "--model",
                     str(Path(tmp) / "qwen3_vl_moe" / "base"), "--adapter", str(Path(tmp) / "qwen3_vl_moe" / "adapter"),
                     str(moe_q4)]) == 0
        cross = cross_shape_check(Path(tmp), moe_q4)
    load_after = "/".join(f"{x:.2f}" for x in os.getloadavg())
    text = report(results, cross, build, load_before, load_after, time.monotonic() - start)
    out = Path(args.out)
    trained = out.read_text().partition(TRAINED_SECTION)[1:] if out.exists() else ("", "")
    out.write_text(text + ("\n" + "".join(trained) if trained[0] else ""))  # bench/gguf_trained.py's section stays
    print(text)


if __name__ == "__main__":
    main_bench()
