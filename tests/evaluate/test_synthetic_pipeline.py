"""Acceptance on the project's own synthetic data: synth -> prepare -> audit (and a planted duplicate) -> eval --ablate."""

import json
import shutil

import pytest

from radscribe.cli import main
from radscribe.evaluate.audit import AuditConfig, audit


@pytest.fixture(scope="module")
def synth_parquet(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    assert main(["synth", "--out", str(root / "syn"), "--n", "60", "--size", "64", "--slices-per-patient", "3",
                 "--workers", "1"]) == 0
    return root


def _prepare(root, name, *extra):
    assert main(["prepare", str(root / "syn"), "--out", str(root / name), "--val-ratio", "0.25", "--workers", "1",
                 *extra]) == 0
    return root / name


def test_audit_on_synthetic_splits(synth_parquet, capsys):
    by_patient = _prepare(synth_parquet, "ds-patient", "--group-by", "patient")
    clean = audit(AuditConfig(str(by_patient)))
    assert clean.val_rows > 0 and clean.rate() == 0.0
    assert main(["audit", str(by_patient), "--strict"]) == 0

    # Slices of one patient are near-identical images: a row-level split leaks them and pHash sees it.
    by_row = _prepare(synth_parquet, "ds-row")
    leaky = audit(AuditConfig(str(by_row)))
    assert len(leaky.flagged.get("near", ())) > 0
    assert main(["audit", str(by_row), "--strict"]) == 2

    # A training image planted into the validation split is flagged as an exact duplicate.
    planted = synth_parquet / "ds-planted"
    shutil.copytree(by_patient, planted)
    train, val = (json.loads((planted / f"{s}.json").read_text()) for s in ("train", "val"))
    shutil.copy(planted / train[0]["images"][0], planted / val[0]["images"][0])
    result = audit(AuditConfig(str(planted)))
    assert result.flagged["exact"] == {val[0]["id"]}
    assert result.examples["exact"][0][1] == train[0]["id"]
    assert main(["audit", str(planted), "--strict"]) == 2
    assert "exact           1" in capsys.readouterr().out


def test_blank_ablation_with_tiny_model_on_synthetic_data(synth_parquet, tiny_model_dir, tmp_path):
    dataset = _prepare(synth_parquet, "ds-eval", "--group-by", "patient")
    assert main(["eval", "--model", str(tiny_model_dir("qwen3_vl")), "--data", str(dataset), "--limit", "4",
                 "--batch-size", "4", "--max-new-tokens", "6", "--dtype", "fp32", "--n-boot", "50",
                 "--ablate", "blank", "--out", str(tmp_path)]) == 0
    real = json.loads((tmp_path / "val" / "predict_results.json").read_text())
    blank = json.loads((tmp_path / "val-blank" / "predict_results.json").read_text())
    drop = json.loads((tmp_path / "val-blank" / "ablation.json").read_text())
    assert drop["bleu-4"]["real"] == pytest.approx(real["predict_bleu-4"])
    assert drop["bleu-4"]["ablated"] == pytest.approx(blank["predict_bleu-4"])
    assert drop["bleu-4"]["drop"] == pytest.approx(real["predict_bleu-4"] - blank["predict_bleu-4"])
    assert "truth_all_accuracy" in drop  # synthetic truth is scored
