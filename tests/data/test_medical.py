"""DICOM/NIfTI folders + reports CSV -> rows: joins, slice stacks, rejects, pseudonyms, and no PHI in the output."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from radscribe.data.imaging import load_image
from radscribe.data.medical import BURNED_IN_REASON, deid_key, medical_rows
from radscribe.data.prepare import PrepareConfig
from radscribe.errors import RadscribeError

CT = get_testdata_file("CT_small.dcm", download=False)
MR = get_testdata_file("MR_small.dcm", download=False)
EXAMPLE4D = Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz"
KEY = "test-secret"


@pytest.fixture(autouse=True)
def _no_user_key(monkeypatch, tmp_path):
    # Never touch the real ~/.config: the default key file goes to a temporary config home.
    monkeypatch.delenv("RADSCRIBE_DEID_KEY", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


def write_csv(path: Path, header: str, *rows: str) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def two_files(tmp_path: Path) -> Path:
    folder = tmp_path / "dicom"
    (folder / "b").mkdir(parents=True)
    (folder / "a.dcm").write_bytes(Path(CT).read_bytes())
    (folder / "b" / "mr.dcm").write_bytes(Path(MR).read_bytes())
    return folder


def rows_of(opts: PrepareConfig) -> tuple[list, dict]:
    deid: dict = {}
    return list(medical_rows(opts, deid)), deid


def test_rows_carry_png_pixels_reports_and_pseudonyms(tmp_path):
    folder = two_files(tmp_path)
    csv = write_csv(tmp_path / "r.csv", "file,report,patient", "a.dcm,CT report,alice-mrn", "b/mr.dcm,MR report,")
    rows, deid = rows_of(PrepareConfig(dicom=str(folder), reports=str(csv), key=KEY))
    assert [r.reject for r in rows] == [None, None]
    ct, mr = rows
    assert (ct.caption, mr.caption) == ("CT report", "MR report")
    # Pixels are exactly what the one loader renders, stored as PNG (lossless).
    png = Image.open(io.BytesIO(ct.image))
    assert png.format == "PNG" and not png.info  # no text chunks
    np.testing.assert_array_equal(np.asarray(png.convert("RGB")), np.asarray(load_image(CT)))
    # Ids hash the SOP Instance UID; groups hash the CSV patient, else the file's PatientID.
    uid = str(pydicom.dcmread(CT).SOPInstanceUID)
    expect = hmac.new(KEY.encode(), f"dcm:{uid}".encode(), hashlib.sha256).hexdigest()[:16]
    assert ct.id == f"dcm-{expect}"
    assert ct.group == "pt-" + hmac.new(KEY.encode(), b"patient:alice-mrn", hashlib.sha256).hexdigest()[:12]
    mr_pid = str(pydicom.dcmread(MR).PatientID)
    assert mr.group == "pt-" + hmac.new(KEY.encode(), f"patient:PatientID:{mr_pid}".encode(),
                                        hashlib.sha256).hexdigest()[:12]
    assert "a.dcm" not in ct.source and "mr" not in mr.source  # file names can carry PHI: not in the ledger
    assert deid["ids"] == "hmac-sha256" and deid["files"] == 2
    assert deid["dropped_fields"]["PatientName"] == 2 and deid["dropped_fields"]["InstitutionName"] == 2


def test_pseudonyms_are_stable_per_key_and_keep_ids_keeps_them(tmp_path):
    folder = two_files(tmp_path)
    csv = write_csv(tmp_path / "r.csv", "file,report", "a.dcm,x", "b/mr.dcm,y")
    first = [r.id for r in rows_of(PrepareConfig(dicom=str(folder), reports=str(csv), key=KEY))[0]]
    again = [r.id for r in rows_of(PrepareConfig(dicom=str(folder), reports=str(csv), key=KEY))[0]]
    other = [r.id for r in rows_of(PrepareConfig(dicom=str(folder), reports=str(csv), key="other"))[0]]
    kept, deid = rows_of(PrepareConfig(dicom=str(folder), reports=str(csv), keep_ids=True))
    assert first == again and set(first).isdisjoint(other)
    assert [r.id for r in kept] == ["dicom-a.dcm", "dicom-b/mr.dcm"]
    assert kept[0].source == str(folder / "a.dcm") and deid["ids"].startswith("kept")


def test_default_key_comes_from_env_then_a_private_key_file(tmp_path, monkeypatch):
    opts = PrepareConfig()
    key, source = deid_key(opts)
    path = tmp_path / "config" / "radscribe" / "deid.key"
    assert source.startswith("user key file") and len(key) == 64 and path.read_text().encode() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert deid_key(opts)[0] == key  # created once, reused: reruns and resumes keep their pseudonyms
    monkeypatch.setenv("RADSCRIBE_DEID_KEY", "from-env")
    assert deid_key(opts) == (b"from-env", "env RADSCRIBE_DEID_KEY")
    assert deid_key(PrepareConfig(key="given")) == (b"given", "option key")


def test_every_input_is_accounted_for(tmp_path):
    folder = two_files(tmp_path)
    (folder / "junk.dcm").write_bytes(b"not dicom at all")
    (folder / "extra.dcm").write_bytes(Path(CT).read_bytes())
    csv = write_csv(tmp_path / "r.csv", "file,report", "a.dcm,ok", "gone.dcm,lost", "b/mr.dcm,", "a.dcm,again",
                    "junk.dcm,bad file")
    rows, _ = rows_of(PrepareConfig(dicom=str(folder), reports=str(csv), key=KEY))
    reasons = sorted(r.reject or "ok" for r in rows)
    assert reasons == sorted([
        "ok",                                                               # a.dcm
        "no readable file matches the report's file",                       # gone.dcm
        "empty `report` in the reports CSV",                                # b/mr.dcm with no text ...
        "no report in the reports CSV matches this file (by file)",         # ... so mr.dcm has no report
        "duplicate file in the reports CSV (an earlier row gives the report)",
        "no readable file matches the report's file",                       # junk.dcm row
        "no report in the reports CSV matches this file (by file)",         # extra.dcm
        next(r.reject for r in rows if r.reject and r.reject.startswith("not a readable DICOM image")),  # junk.dcm
    ])
    csv_rejects = sorted(r.index for r in rows if r.source == str(csv))
    assert csv_rejects == [2, 3, 4, 5]  # 1-based CSV data rows


def test_burned_in_annotation_is_rejected_unless_allowed(tmp_path):
    folder = tmp_path / "dicom"
    folder.mkdir()
    ds = pydicom.dcmread(CT)
    ds.BurnedInAnnotation = "YES"
    ds.save_as(folder / "burned.dcm")
    csv = write_csv(tmp_path / "r.csv", "file,report", "burned.dcm,text")
    rows, deid = rows_of(PrepareConfig(dicom=str(folder), reports=str(csv), key=KEY))
    assert [(r.reject, r.image) for r in rows] == [(BURNED_IN_REASON, None)]
    assert deid["burned_in_annotation"] == "rejected"
    rows, _ = rows_of(PrepareConfig(dicom=str(folder), reports=str(csv), key=KEY, allow_burned_in=True))
    assert rows[0].reject is None and rows[0].image


def series(tmp_path: Path, n: int = 5) -> tuple[Path, list[str]]:
    """n single-slice files of one series; file names sort opposite to their position along the slice normal."""
    folder = tmp_path / "series"
    folder.mkdir()
    names = []
    for i in range(n):
        ds = pydicom.dcmread(CT)
        ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{i}"
        ds.ImagePositionPatient = [0.0, 0.0, float(10 * i)]
        ds.InstanceNumber = i + 1
        name = f"slice-{chr(ord('z') - i)}.dcm"
        ds.save_as(folder / name)
        names.append(name)
    return folder, names


@pytest.mark.parametrize("spec,picked", [("middle", [2]), ("all", [0, 1, 2, 3, 4]), ("every:2", [0, 2, 4])])
def test_series_joined_by_uid_is_one_stack_ordered_by_position(tmp_path, spec, picked):
    folder, names = series(tmp_path)
    uid = str(pydicom.dcmread(CT).SeriesInstanceUID)
    csv = write_csv(tmp_path / "r.csv", "SeriesInstanceUID,report", f"{uid},one report for the series")
    rows, _ = rows_of(PrepareConfig(dicom=str(folder), reports=str(csv), slices=spec, keep_ids=True))
    assert sorted(r.id for r in rows) == sorted(f"dicom-{names[i]}" for i in picked)
    assert {r.caption for r in rows} == {"one report for the series"}


def test_join_by_sop_uid_and_an_explicit_id_key(tmp_path):
    folder = two_files(tmp_path)
    uid = str(pydicom.dcmread(MR).SOPInstanceUID)
    csv = write_csv(tmp_path / "r.csv", "accession,SOPInstanceUID,report", f"x,{uid},mr only")
    rows, _ = rows_of(PrepareConfig(dicom=str(folder), reports=str(csv), key=KEY, id_key="SOPInstanceUID"))
    ok = [r for r in rows if r.reject is None]
    assert len(ok) == 1 and ok[0].caption == "mr only"
    with pytest.raises(RadscribeError, match="'accesion' is not in the header"):
        rows_of(PrepareConfig(dicom=str(folder), reports=str(csv), id_key="accesion"))


def test_csv_and_option_mistakes_are_one_line_errors(tmp_path):
    folder = two_files(tmp_path)
    with pytest.raises(RadscribeError, match="needs --reports|need --reports"):
        rows_of(PrepareConfig(dicom=str(folder)))
    with pytest.raises(RadscribeError, match="no `report` column"):
        rows_of(PrepareConfig(dicom=str(folder), reports=str(write_csv(tmp_path / "a.csv", "file,text", "a.dcm,x"))))
    with pytest.raises(RadscribeError, match="no join column"):
        rows_of(PrepareConfig(dicom=str(folder), reports=str(write_csv(tmp_path / "b.csv", "report", "x"))))
    with pytest.raises(RadscribeError, match="every:N"):
        rows_of(PrepareConfig(dicom=str(folder), reports=str(tmp_path / "a.csv"), slices="some"))
    with pytest.raises(RadscribeError, match="does not exist"):
        rows_of(PrepareConfig(dicom=str(tmp_path / "nope"), reports=str(tmp_path / "a.csv")))


def test_hu_window_on_mr_becomes_a_reject_not_a_crash(tmp_path):
    folder = two_files(tmp_path)
    csv = write_csv(tmp_path / "r.csv", "file,report", "a.dcm,ct", "b/mr.dcm,mr")
    rows, _ = rows_of(PrepareConfig(dicom=str(folder), reports=str(csv), key=KEY, window="lung"))
    assert rows[0].reject is None
    assert rows[1].reject == "window 'lung' is in Hounsfield units but the file is MR; use window auto"


def test_nifti_volume_rows_per_slice(tmp_path):
    folder = tmp_path / "nifti"
    folder.mkdir()
    (folder / "fmri.nii.gz").write_bytes(EXAMPLE4D.read_bytes())
    csv = write_csv(tmp_path / "r.csv", "file,report,patient", "fmri.nii.gz,functional,p7")
    rows, deid = rows_of(PrepareConfig(nifti=str(folder), reports=str(csv), key=KEY, slices="every:8"))
    assert [r.reject for r in rows] == [None] * 3
    assert [r.id.rsplit("-", 1)[1] for r in rows] == ["0000", "0008", "0016"]
    assert len({r.group for r in rows}) == 1
    assert deid["dropped_fields"] == {"nifti:descrip": 1}


def test_no_phi_bytes_in_any_row(tmp_path):
    folder = two_files(tmp_path)
    csv = write_csv(tmp_path / "r.csv", "file,report", "a.dcm,ct", "b/mr.dcm,mr")
    rows, deid = rows_of(PrepareConfig(dicom=str(folder), reports=str(csv), key=KEY, window="multi"))
    blob = b"".join(r.image or b"" for r in rows) + json.dumps(
        [[r.id, r.source, r.group, r.reject] for r in rows] + [deid]).encode()
    for path in (CT, MR):
        ds = pydicom.dcmread(path)
        for value in (str(ds.PatientName), str(ds.get("InstitutionName") or ""), str(ds.PatientID)):
            if value:
                assert value.encode() not in blob and value.lower().encode() not in blob.lower()


def test_prepare_output_folder_holds_no_phi_and_a_deid_report(tmp_path):
    from radscribe.data.prepare import PrepareConfig, prepare

    folder = two_files(tmp_path)
    csv = write_csv(tmp_path / "r.csv", "file,report", "a.dcm,腹部CT平扫未见异常。", "b/mr.dcm,头颅MRI未见异常。")
    out = tmp_path / "ds"
    summary = prepare(PrepareConfig(dicom=str(folder), reports=str(csv), out=str(out), key=KEY, workers=1,
                                    val_ratio=0.5))
    assert summary["train"] + summary["val"] == 2 and summary["rejects"] == 0
    phi = []
    for path in (CT, MR):
        ds = pydicom.dcmread(path)
        for keyword in ("PatientName", "InstitutionName", "PatientID", "PatientBirthDate", "ReferringPhysicianName"):
            value = str(ds.get(keyword) or "").strip()
            if len(value) >= 3:
                phi.append(value)
    assert "CompressedSamples^CT1" in phi and "JFK IMAGING CENTER" in phi  # the test reads the real values
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".png" for p in files) and (out / "deid_report.json") in files
    for path in files:
        data = path.read_bytes()
        for value in phi:
            for form in {value, value.lower(), value.upper(), value.replace("^", " ")}:
                for encoded in (form.encode("utf-8"), form.encode("utf-16-le"), form.encode("utf-16-be")):
                    assert encoded not in data, f"{value!r} found in {path.relative_to(out)}"
    # The images are PNG re-encodings, not copies of the DICOM files.
    assert not any(data.startswith(b"\x00" * 128 + b"DICM") for data in (p.read_bytes() for p in files))
    report = json.loads((out / "deid_report.json").read_text(encoding="utf-8"))
    assert report["dropped_fields"]["PatientName"] == 2 and report["dropped_fields"]["InstitutionName"] == 2
    assert report["ids"] == "hmac-sha256"


def multiframe_ct(path: Path, frames: int) -> None:
    ds = pydicom.dcmread(CT)
    stack = np.stack([ds.pixel_array + 100 * i for i in range(frames)]).astype(np.int16)
    ds.NumberOfFrames = frames
    ds.PixelData = stack.tobytes()
    ds.save_as(path)


def test_multiframe_dicom_gives_one_row_per_chosen_frame(tmp_path):
    folder = tmp_path / "dicom"
    folder.mkdir()
    multiframe_ct(folder / "mf.dcm", frames=5)
    csv = write_csv(tmp_path / "r.csv", "file,report", "mf.dcm,five frames")
    rows, _ = rows_of(PrepareConfig(dicom=str(folder), reports=str(csv), key=KEY, slices="all"))
    assert [r.id.rsplit("-", 1)[1] for r in rows] == ["0000", "0001", "0002", "0003", "0004"]
    assert len({r.image for r in rows}) == 5 and {r.caption for r in rows} == {"five frames"}
    middle, _ = rows_of(PrepareConfig(dicom=str(folder), reports=str(csv), key=KEY))
    assert [r.id for r in middle] == [rows[2].id] and middle[0].image == rows[2].image


def test_prepare_dicom_rejects_bombs_and_bad_values_and_keeps_every_other_row(tmp_path):
    # An untrusted folder: two good files, two deflate bombs (gigabytes inflated from a few MB), a file whose
    # window is text, and a file whose slice position is text. Each bad file is one reject with its reason.
    from hostile_inputs import deflate_bomb, non_numeric_dicom

    from radscribe.cli import main

    folder = two_files(tmp_path)
    (folder / "bomb-trailer.dcm").write_bytes(deflate_bomb(4096, "trailer"))
    (folder / "bomb-header.dcm").write_bytes(deflate_bomb(4096, "header"))
    (folder / "window.dcm").write_bytes(non_numeric_dicom("WindowCenter"))
    (folder / "position.dcm").write_bytes(non_numeric_dicom("ImagePositionPatient", "a\\b\\c"))
    names = ["a.dcm", "b/mr.dcm", "bomb-trailer.dcm", "bomb-header.dcm", "window.dcm", "position.dcm"]
    csv = write_csv(tmp_path / "r.csv", "file,report", *[f"{n},report {i}" for i, n in enumerate(names)])
    out = tmp_path / "ds"
    assert main(["prepare", "--dicom", str(folder), "--reports", str(csv), "--out", str(out), "--key", KEY,
                 "--keep-ids", "--workers", "1", "--val-ratio", "0.5"]) == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    kept = [r["id"] for split in ("train", "val") for r in json.loads((out / f"{split}.json").read_text())]
    assert sorted(kept) == ["dicom-a.dcm", "dicom-b/mr.dcm"]
    by_file = {Path(r["source"]).name: r["reason"] for r in rejects if r["source"] != str(csv)}
    assert "inflates past the" in by_file["bomb-trailer.dcm"] and "bomb" in by_file["bomb-trailer.dcm"]
    assert "header inflates to over" in by_file["bomb-header.dcm"]
    assert by_file["window.dcm"] == "DICOM WindowCenter 'abc' is not a number"
    assert by_file["position.dcm"] == "DICOM ImagePositionPatient is not a valid value for its type"
    # The header bomb is unreadable, so its CSV row matches no file: accounted for as a reject too.
    assert summary["input_rows"] == summary["train"] + summary["val"] + summary["rejects"]
    assert summary["train"] + summary["val"] == 2 and summary["rejects"] == len(rejects)
