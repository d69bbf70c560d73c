"""End to end through the CLI: a DICOM folder + reports CSV -> `radscribe prepare` -> `radscribe train` (tiny model).

Every step is the real command (`radscribe.cli.main`), as a user would type it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from safetensors.torch import load_file

from radscribe.cli import main

SOURCES = {"ct": get_testdata_file("CT_small.dcm", download=False), "mr": get_testdata_file("MR_small.dcm", download=False)}
REPORTS = {"ct": "腹部CT平扫：{}未见明确异常密度影。", "mr": "头颅MRI：{}未见异常信号。"}


def dicom_folder(root: Path, n: int = 8) -> Path:
    """n studies of n patients: copies of the pydicom samples with their own UIDs and slightly varied pixels."""
    folder = root / "dicom"
    folder.mkdir()
    for i in range(n):
        kind = "ct" if i % 2 == 0 else "mr"
        ds = pydicom.dcmread(SOURCES[kind])
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            setattr(ds, keyword, f"{getattr(ds, keyword)}.{i + 1}")
        ds.PatientID = f"{ds.PatientID}-{i}"
        pixels = ds.pixel_array.copy()
        pixels[i * 4:(i * 4) + 8, 10:30] = pixels.max()  # a bright bar at a per-study height
        ds.PixelData = pixels.astype(pixels.dtype).tobytes()
        ds.save_as(folder / f"{kind}-{i}.dcm")
    return folder


def test_dicom_folder_prepares_and_trains_a_tiny_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RADSCRIBE_DEID_KEY", "e2e-secret")
    folder = dicom_folder(tmp_path)
    csv = tmp_path / "reports.csv"
    lines = ["SOPInstanceUID,report"]
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        kind = path.name.split("-")[0]
        lines.append(f"{ds.SOPInstanceUID},{REPORTS[kind].format('第' + path.stem.split('-')[1] + '例')}")
    csv.write_text("\n".join(lines) + "\n", encoding="utf-8")

    data = tmp_path / "dataset"
    assert main(["prepare", "--dicom", str(folder), "--reports", str(csv), "--out", str(data),
                 "--window", "auto", "--workers", "1", "--val-ratio", "0.25"]) == 0
    summary = json.loads((data / "summary.json").read_text(encoding="utf-8"))
    assert summary["input_rows"] == 8 and summary["rejects"] == 0
    assert summary["train"] + summary["val"] == 8 and summary["train"] >= 4
    train_rows = json.loads((data / "train.json").read_text(encoding="utf-8"))
    assert all(r["images"][0].endswith(".png") and r["id"].startswith("dcm-") for r in train_rows)
    assert (data / "deid_report.json").is_file()

    model = tmp_path / "tiny"
    assert main(["tiny-model", str(model)]) == 0
    run = tmp_path / "run"
    assert main(["train", "--model", str(model), "--data", str(data), "--out", str(run),
                 "train.max_steps=3", "train.per_device_batch=2", "train.grad_accum=1", "train.lr=1e-2",
                 "train.precision=fp32", "train.logging_steps=1", "train.save_steps=1000"]) == 0
    capsys.readouterr()

    adapter = run / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    weights = load_file(adapter / "adapter_model.safetensors")
    lora_b = [t for name, t in weights.items() if "lora_B" in name]
    # LoRA B starts at zero: non-zero B matrices mean the saved adapter holds trained weights.
    assert lora_b and any(float(t.abs().max()) > 0 for t in lora_b)
    result = json.loads((run / "train_summary.json").read_text(encoding="utf-8"))
    assert result["steps"] == 3 and result["train_samples"] == summary["train"]
    assert np.isfinite(result["last_logged_loss"])
