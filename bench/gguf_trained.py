"""Quantised GGUFs of a fine-tuned model against transformers: token agreement and the margins behind it.

Run as: python bench/gguf_trained.py [--out bench/results/gguf.md]

The model is tests/test_gguf.py's `train_confident` (the dense real-layout tiny Qwen3-VL fine-tuned by
`radscribe train`, recipe in TRAIN_ARGS); its cases are its training prompts, text-only and with their 256x256
phantom. For each of f16, q8_0 and q4_k_m: `radscribe export --format gguf --quantize Q`, then llama-server's greedy
answers (temperature 0, top_k 1, 32 tokens) compared token by token with transformers' greedy output on the merged
model (fp32). Replaces the section "## Quantised GGUFs of a fine-tuned model" of the results file, the rest kept
(bench/gguf_export.py writes the rest and keeps this section).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from radscribe.cli import main  # noqa: E402
from radscribe.interop import gguf, llamacpp  # noqa: E402
from tests.test_gguf import TOKENS, TRAIN_ARGS, TRAIN_ROWS, references, train_confident  # noqa: E402

SECTION = "## Quantised GGUFs of a fine-tuned model"


def measure(root: Path) -> dict:
    start = time.monotonic()
    entry = train_confident(root)
    train_s = time.monotonic() - start
    refs = references(entry, entry["cases"])
    rows = {}
    for quant in gguf.QUANTS:
        out = root / quant
        assert main(["export", "--format", "gguf", "--quantize", quant, "--model", str(entry["base"]), "--adapter",
                     str(entry["adapter"]), str(out)]) == 0
        with llamacpp.LlamaServer(out / gguf.model_file(quant), mmproj=out / gguf.MMPROJ_FILE) as server:
            rows[quant] = [gguf.agreement(expected, server.complete(prompt, TOKENS, images))
                           for _, prompt, images, expected, _ in refs]
    return {"summary": entry["summary"], "train_s": train_s, "refs": refs, "rows": rows}


def section(result: dict, load_before: str, load_after: str) -> str:
    s, refs = result["summary"], result["refs"]
    names = [f"`{text}`" + (" + its image" if images else "") for (text, _), _, images, _, _ in refs]
    lines = [
        SECTION + " (`python bench/gguf_trained.py`)", "",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; load average before {load_before}, after "
        f"{load_after}; training at OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        f"- model: tests/test_gguf.py `train_confident`: the dense real-layout tiny Qwen3-VL (text hidden 256, Qwen's "
        f"real vocabulary) fine-tuned by `radscribe train` on {TRAIN_ROWS} synthetic rows, each once with its "
        f"256x256 phantom and once text-only under a prompt of its own: {' '.join(TRAIN_ARGS)}",
        f"- training: {s['steps']} steps in {result['train_s']:.0f} s (model build and data included); loss "
        f"{s['first_logged_loss']:.2f} at step 1 (chance: ln 151,936 = 11.93) -> {s['last_logged_loss']:.2f}",
        "- margin = smallest log-probability lead of transformers' greedy token over the runner-up across the "
        "answer's steps; distinct answers among the cases: "
        f"{len({tuple(tokens) for _, _, _, tokens, _ in refs})} of {len(refs)}",
        f"- agreement = share of the first {TOKENS} positions holding transformers' token (answers that end earlier "
        "with <|im_end|> count their own length); prefix = tokens before the first difference", "",
        "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(refs),
        "| answer tokens, margin | " + " | ".join(f"{len(tokens)}, {gap:.3f}" for _, _, _, tokens, gap in refs) + " |",
    ]
    for quant, cells in result["rows"].items():
        lines.append(f"| {quant} | " + " | ".join(f"{c['agreement']:.0%} (prefix {c['common_prefix']})"
                                                  for c in cells) + " |")
    return "\n".join(lines) + "\n"


def replace_section(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else ""
    kept = old.split(SECTION, 1)[0].rstrip("\n")
    path.write_text((kept + "\n\n" if kept else "") + text)


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gguf.md"))
    args = parser.parse_args()
    load_before = "/".join(f"{x:.2f}" for x in os.getloadavg())
    llamacpp.install()
    with tempfile.TemporaryDirectory(prefix="bench-gguf-trained-") as tmp:
        result = measure(Path(tmp))
    text = section(result, load_before, "/".join(f"{x:.2f}" for x in os.getloadavg()))
    replace_section(Path(args.out), text)
    print(text)


if __name__ == "__main__":
    main_bench()
