"""`radscribe report`: a self-contained page with tables, plots and sample images that a real browser renders."""

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from radscribe.cli import main
from radscribe.evaluate.predict import EvalConfig, evaluate

from test_predict import BlindEngine, OracleEngine

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def two_runs(small_dataset, tmp_path):
    """A base-model eval root (blind model) and a run folder (image-reading model) on the same val split."""
    base = tmp_path / "base-eval"
    evaluate(EvalConfig(model="m", data=str(small_dataset), out=str(base), n_boot=100), engine=BlindEngine())
    run = tmp_path / "run-lora"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "config.yaml").write_text("lora:\n  rank: 16\ntrain:\n  lr: 0.002\n")
    (run / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3 * np.exp(-s / 40) + 0.1}) + "\n"
                                           for s in range(1, 200, 5)) + json.dumps({"step": 200, "eval_loss": 0.3}))
    oracle = OracleEngine(small_dataset)
    cfg = EvalConfig(model="m", data=str(small_dataset), adapter=str(run), n_boot=100)
    evaluate(cfg, engine=oracle)
    evaluate(EvalConfig(model="m", data=str(small_dataset), adapter=str(run), ablate="blank", n_boot=100), engine=oracle)
    return base, run


def test_report_contents(two_runs, tmp_path):
    base, run = two_runs
    out = tmp_path / "report"
    assert main(["report", str(base), str(run), "--out", str(out), "--n-boot", "200"]) == 0
    page = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    # self-contained: every image is a data URI, nothing is fetched
    sources = re.findall(r"<img[^>]* src='([^']*)'", page)
    assert len(sources) >= 2 + 6 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http://" not in page and "https://" not in page
    # before/after comparison: the image-reading run beats the blind base on finding accuracy, CI excludes 0
    assert "base-eval (A) → run-lora (B) · val · 8 paired samples" in page
    row = re.search(r"<tr><td>truth_all_accuracy</td><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td>"
                    r"<td>([^<]*)</td><td>([^<]*)</td></tr>", page)
    assert row and float(row.group(2)) == 100.0 and float(row.group(3)) > 0 and row.group(5) == "yes"
    assert "Image-grounding checks" in page and "Loss curves" in page and "rank: 16" in page
    assert "max_new_tokens: 512" in page  # each eval's own settings
    # samples: reference and both runs' reports side by side
    assert page.count("class='sample'") == 6 and page.count("<b>run-lora</b>") == 6
    assert "![loss](loss.png)" in md and (out / "loss.png").is_file() and (out / "sample-0.png").is_file()
    assert "| truth_all_accuracy |" in md


def test_report_renders_in_headless_chromium(two_runs, tmp_path):
    # The tests need Debian's chromium (README; .ci/run installs it): without it this fails, never skips.
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: apt-get install chromium fonts-noto-cjk"
    base, run = two_runs
    out = tmp_path / "report"
    assert main(["report", str(base), str(run), "--out", str(out), "--n-boot", "100"]) == 0
    page = out / "report.html"
    profile = tmp_path / "chromium-profile"
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             "--virtual-time-budget=5000"]
    dom = subprocess.run(flags + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    decoded = re.search(r'data-images-decoded="(\d+)/(\d+)"', dom)
    assert decoded, "the page's load handler did not run"
    assert decoded.group(1) == decoded.group(2) and int(decoded.group(2)) >= 8  # plots + 6 samples all decoded
    shot = tmp_path / "report.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1280,3000", page.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.is_file()
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (3000, 1280)
    # non-trivial: not a blank page, and the plot region (charts, dark sample images) has real contrast
    assert pixels.std() > 20 and (pixels < 60).mean() > 0.002
    shutil.copy(shot, os.environ.get("RADSCRIBE_KEEP_SCREENSHOT", tmp_path / "kept.png"))


def test_a_sample_whose_image_moved_is_shown_without_it(two_runs, tmp_path, capsys):
    base, run = two_runs
    rows = [json.loads(line) for line in (base / "val" / "generated_predictions.jsonl").open()]
    moved = Path(rows[1]["image"][0])
    moved.rename(moved.with_suffix(".moved"))
    out = tmp_path / "report"
    assert main(["report", str(base), str(run), "--out", str(out), "--n-boot", "50"]) == 0
    page = (out / "report.html").read_text()
    assert page.count("class='sample'") == 6  # the same six samples, the second one without its picture
    assert page.count("<img alt='sample ") == 5 and f"image not found: {html.escape(str(moved))}" in page
    assert f"<figcaption>{rows[1]['id']}</figcaption>" in page
    assert f"*(image not found: {moved})*" in (out / "report.md").read_text()
    assert not (out / "sample-1.png").exists() and (out / "sample-2.png").is_file()
    assert f"report: 1 sample image(s) no longer readable, shown without the image: {moved}" in capsys.readouterr().err
