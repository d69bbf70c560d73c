"""The demo end to end: every stage runs, the fine-tuned model passes the demo's gate, a rerun reuses the stages."""

import json
import subprocess
import sys

import pytest

from radscribe.cli import main
from radscribe.demo import improved, write_general_dataset
from radscribe.data.dataset import read_split


def _demo(out):
    done = subprocess.run([sys.executable, "-m", "radscribe.cli", "demo", "--out", str(out)], capture_output=True,
                          text=True, timeout=3500)
    return done.returncode, done.stdout, done.stderr


@pytest.mark.timeout(3600)  # ~90 s on an idle 2-core machine (bench/results/demo.md), far more when it is shared
def test_demo_learns_passes_its_gate_caches_and_prints_no_warning(tmp_path):
    # `radscribe demo` exactly as a user runs it: the README's claim is this run's gate, and its exit code.
    out = tmp_path / "demo"
    code, stdout, stderr = _demo(out)
    assert code == 0, stderr[-3000:]
    assert [line for line in (stdout + stderr).splitlines() if "warn" in line.lower()] == []
    result = json.loads((out / "demo_result.json").read_text())
    base, tuned = result["base"], result["fine_tuned"]
    # The LoRA stage must move the model from captions to reports: ROUGE-L rises clearly, the findings appear (the
    # captions name none, so the base scores 0), and the demo's own gate (non-overlapping CIs on both) passes.
    assert tuned["rouge-l"]["value"] > base["rouge-l"]["value"] + 10
    assert base["finding_f1"]["value"] == 0.0 and tuned["finding_f1"]["low"] > 50
    assert result["improved"] is True and "fine-tuned beats base on ROUGE-L and finding F1" in stdout
    html = (out / "report" / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in html and result["report"].endswith("report.html")
    assert (out / "lora" / "adapter" / "adapter_config.json").is_file()
    assert (out / "base" / "model" / "config.json").is_file()

    code, _, stderr = _demo(out)  # every stage cached: same numbers, nothing retrained
    assert code == 0 and stderr.count(": cached") == 5
    assert json.loads((out / "demo_result.json").read_text())["fine_tuned"] == tuned


def test_general_dataset_has_captions_and_text_only_rows(tmp_path):
    ds = tmp_path / "ds"
    (ds / "images").mkdir(parents=True)
    (ds / "images" / "a.png").write_bytes(b"x")
    row = {"id": "a", "images": ["images/a.png"], "truth": {"modality": "CT", "organ": "brain"},
           "messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "完整报告。"}]}
    for split in ("train", "val"):
        (ds / f"{split}.json").write_text(json.dumps([row], ensure_ascii=False), encoding="utf-8")
    general = write_general_dataset(ds, tmp_path / "general", "zh")
    train = list(read_split(general, "train"))
    assert [s.report for s in train] == ["这是一张脑CT图像。", "完整报告。"]
    assert train[0].images == [general / "../ds/images/a.png"] and train[1].images == []
    assert [s.report for s in read_split(general, "val")] == ["这是一张脑CT图像。"]


def _scores(**intervals):
    return {"metrics": {k: {"value": (lo + hi) / 2 if lo is not None else None, "low": lo, "high": hi}
                        for k, (lo, hi) in intervals.items()}}


def test_improvement_gate_needs_both_scores_with_separated_intervals():
    base = _scores(**{"rouge-l": (20, 30), "finding_f1": (0, 0)})
    assert improved(base, _scores(**{"rouge-l": (31, 40), "finding_f1": (5, 20)}))
    assert not improved(base, _scores(**{"rouge-l": (29, 40), "finding_f1": (5, 20)}))  # ROUGE-L CIs overlap
    assert not improved(base, _scores(**{"rouge-l": (31, 40), "finding_f1": (0, 20)}))  # finding F1 CIs touch
    assert not improved(base, _scores(**{"rouge-l": (31, 40)}))  # finding F1 missing
    assert not improved(base, _scores(**{"rouge-l": (31, 40), "finding_f1": (None, None)}))  # undefined (null)


def test_cli_demo_fails_when_the_gate_fails(tmp_path, monkeypatch, capsys):
    import radscribe.demo

    monkeypatch.setattr(radscribe.demo, "demo", lambda cfg, fresh=False: {"improved": False, "report": "R.html"})
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == ("radscribe demo: error: the fine-tuned model did not beat the base "
                                               "with non-overlapping CIs (see R.html)")
    monkeypatch.setattr(radscribe.demo, "demo", lambda cfg, fresh=False: {"improved": True, "report": "R.html"})
    assert main(["demo", "--out", str(tmp_path)]) == 0
