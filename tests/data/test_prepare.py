"""radscribe prepare: nothing lost, byte-exact images, deterministic grouped split, prompts, resume after SIGKILL."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from radscribe.cli import main as cli_main
from radscribe.data.dataset import read_split
from radscribe.data.prepare import DEFAULT_PROMPTS, PrepareConfig, prepare, sanitise_id, split_of
from radscribe.data.sources import Row
from radscribe.errors import RadscribeError


def _image(seed: int, fmt: str = "JPEG", size: int = 24) -> bytes:
    buf = io.BytesIO()
    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype("uint8")
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def _parquet(path: Path, records: list[dict], row_group_size: int = 8) -> Path:
    images = [None if r.get("image") is None else {"bytes": r["image"], "path": r.get("path", f"{r['id']}.jpg")}
              for r in records]
    table = pa.table({"image": pa.array(images, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      "id": [r["id"] for r in records], "caption": [r.get("caption", f"report {r['id']}")
                                                                     for r in records],
                      "patient": [r.get("patient", r["id"]) for r in records]})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def _tree(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file: the checksum of an output tree."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _rows(folder: Path, split: str) -> list[dict]:
    text = (folder / f"{split}.json").read_text(encoding="utf-8")
    return json.loads(text)


def _planted(tmp_path: Path) -> Path:
    good = [{"id": f"good-{i}", "image": _image(i)} for i in range(10)]
    jpeg = _image(100)
    bad = [
        {"id": "truncated", "image": jpeg[: len(jpeg) // 2]},
        {"id": "text", "image": b"this is not an image at all"},
        {"id": "null", "image": None},
        {"id": "blank", "image": _image(101), "caption": "   \n"},
        {"id": "good-3", "image": _image(102)},  # duplicate id, different picture
        {"id": "bmp", "image": _image(103, "BMP"), "path": "bmp.bmp"},
        {"id": "big", "image": _image(104, size=200)},  # over the pixel limit set below
        {"id": "same-pixels-as-good-0", "image": _image(0)},
    ]
    return _parquet(tmp_path / "planted.parquet", good[:5] + bad + good[5:], row_group_size=3)


def test_planted_bad_rows_are_accounted_for(tmp_path):
    src = _planted(tmp_path)
    out = tmp_path / "ds"
    summary = prepare(PrepareConfig(inputs=[str(src)], out=str(out), max_pixels=100 * 100, workers=1, chunk_rows=4))
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    reasons = {r["id"]: r["reason"] for r in rejects}
    assert reasons == {"truncated": "truncated image", "text": "non-image bytes", "null": "null image",
                       "blank": "empty caption", "good-3": "duplicate id", "big": "image over pixel limit"}
    assert all(r["source"] == str(src) for r in rejects)
    assert {r["id"]: r["row"] for r in rejects}["null"] == 7
    assert summary["input_rows"] == 18 == summary["train"] + summary["val"] + summary["rejects"]
    assert summary["rejects"] == 6 and sum(summary["reasons"].values()) == 6
    assert summary["reasons"]["duplicate id"] == 1
    kept = _rows(out, "train") + _rows(out, "val")
    assert len(kept) == 12 and len({r["id"] for r in kept}) == 12
    # The duplicate id's different picture was not left behind in images/.
    assert len(list((out / "images").iterdir())) == summary["images_stored"] == 11
    assert summary["duplicate_image_rows"] == 1


def test_images_are_byte_exact_deduplicated_and_other_formats_become_lossless_png(tmp_path):
    src = _planted(tmp_path)
    out = tmp_path / "ds"
    prepare(PrepareConfig(inputs=[str(src)], out=str(out), max_pixels=100 * 100, workers=1))
    by_id = {r["id"]: r for r in _rows(out, "train") + _rows(out, "val")}
    for i in range(10):
        assert (out / by_id[f"good-{i}"]["images"][0]).read_bytes() == _image(i)
    # The same pixels under another id are stored once and referenced twice.
    assert by_id["same-pixels-as-good-0"]["images"] == by_id["good-0"]["images"]
    bmp = out / by_id["bmp"]["images"][0]
    assert bmp.suffix == ".png"
    original = np.asarray(Image.open(io.BytesIO(_image(103, "BMP"))))
    assert np.array_equal(np.asarray(Image.open(bmp)), original)
    name = Path(by_id["good-1"]["images"][0]).name
    assert name == f"good-1-{hashlib.sha256(_image(1)).hexdigest()[:12]}.jpg"


def test_hostile_ids_cannot_escape_the_output_folder(tmp_path):
    ids = ["../../escape", "/etc/passwd", "a/b\\c", "..", "x" * 300, "患者-1"]
    src = _parquet(tmp_path / "p.parquet", [{"id": i, "image": _image(n)} for n, i in enumerate(ids)])
    out = tmp_path / "ds"
    prepare(PrepareConfig(inputs=[str(src)], out=str(out), workers=1, val_ratio=0.0))
    files = list((out / "images").iterdir())
    assert len(files) == len(ids)
    for f in files:
        assert f.resolve().parent == (out / "images").resolve()
        assert len(f.name.rsplit("-", 1)[0]) <= 64 and not f.name.startswith(".")
    assert [r["id"] for r in _rows(out, "train")] == ids  # the id itself is kept verbatim as data
    assert sanitise_id("../../escape") == "_.._escape" and sanitise_id("..") == "row"
    assert not (tmp_path / "escape").exists()


def test_output_matches_the_contract_and_reads_back(tmp_path):
    from radscribe.data.synth import synth

    synth(out=str(tmp_path / "synth"), n=40, size=32, slices_per_patient=4)
    out = tmp_path / "ds"
    prepare(PrepareConfig(inputs=[str(tmp_path / "synth")], out=str(out), group_by="patient", workers=1,
                          val_ratio=0.3))
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["radscribe_train"] == {
        "file_name": "train.json", "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}
    assert info["radscribe_val"]["file_name"] == "val.json"
    row = _rows(out, "train")[0]
    assert set(row) == {"id", "messages", "images", "group", "truth"}
    assert row["messages"][0] == {"role": "user", "content": DEFAULT_PROMPTS["zh"]}
    assert row["messages"][1]["role"] == "assistant" and row["images"][0].startswith("images/")
    samples = list(read_split(out, "train")) + list(read_split(out, "val"))
    assert len(samples) == 40 and all(s.images[0].is_file() for s in samples)
    assert {s.truth["finding"] for s in samples} <= {"nodule", "mass", "cyst", "hemorrhage", "normal"}
    # Grouped split: every patient on one side only.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["split"]["groups_on_both_sides"] == 0
    assert summary["split"]["train_groups"] + summary["split"]["val_groups"] == 10
    train_groups = {r["group"] for r in _rows(out, "train")}
    val_groups = {r["group"] for r in _rows(out, "val")}
    assert val_groups and train_groups and not train_groups & val_groups


def test_split_is_deterministic_and_stable_when_rows_are_added(tmp_path):
    small = _parquet(tmp_path / "small.parquet", [{"id": f"r{i}", "image": _image(i)} for i in range(30)])
    large = _parquet(tmp_path / "large.parquet", [{"id": f"r{i}", "image": _image(i)} for i in range(60)])
    prepare(PrepareConfig(inputs=[str(small)], out=str(tmp_path / "a"), val_ratio=0.3, workers=1))
    prepare(PrepareConfig(inputs=[str(large)], out=str(tmp_path / "b"), val_ratio=0.3, workers=1))
    val_a = {r["id"] for r in _rows(tmp_path / "a", "val")}
    val_b = {r["id"] for r in _rows(tmp_path / "b", "val")}
    assert val_a == {i for i in val_b if int(i[1:]) < 30} and val_a
    assert val_a == {f"r{i}" for i in range(30) if split_of(f"r{i}", 0.3) == "val"}
    fractions = [split_of(f"id-{i}", 0.1) for i in range(5000)]
    assert 0.085 < fractions.count("val") / 5000 < 0.115


def test_prompts_lang_custom_and_sampled_file(tmp_path):
    src = _parquet(tmp_path / "p.parquet", [{"id": f"r{i}", "image": _image(i)} for i in range(40)])

    def user_prompts(name, **kw):
        prepare(PrepareConfig(inputs=[str(src)], out=str(tmp_path / name), workers=1, val_ratio=0.0, **kw))
        return [r["messages"][0]["content"] for r in _rows(tmp_path / name, "train")]

    assert set(user_prompts("en", lang="en")) == {DEFAULT_PROMPTS["en"]}
    assert set(user_prompts("custom", prompt="Describe the scan.")) == {"<image>Describe the scan."}
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Findings?\n<image>Report please.\n\nImpression?\n", encoding="utf-8")
    sampled = user_prompts("file", prompts_file=str(prompts), seed=7)
    assert set(sampled) == {"<image>Findings?", "<image>Report please.", "<image>Impression?"}
    assert sampled == user_prompts("file2", prompts_file=str(prompts), seed=7)
    assert sampled != user_prompts("file3", prompts_file=str(prompts), seed=8)
    assert all(p.count("<image>") == 1 for p in sampled)
    with pytest.raises(RadscribeError, match="2 <image> placeholders"):
        prepare(PrepareConfig(inputs=[str(src)], out=str(tmp_path / "x"), prompt="<image><image>?"))


def test_jsonl_format(tmp_path):
    src = _parquet(tmp_path / "p.parquet", [{"id": f"r{i}", "image": _image(i)} for i in range(12)])
    out = tmp_path / "ds"
    prepare(PrepareConfig(inputs=[str(src)], out=str(out), format="jsonl", workers=1, val_ratio=0.25))
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["radscribe_train"]["file_name"] == "train.jsonl" and not (out / "train.json").exists()
    lines = (out / "train.jsonl").read_text().splitlines() + (out / "val.jsonl").read_text().splitlines()
    assert len(lines) == 12 and all(json.loads(line)["images"] for line in lines)
    assert len(list(read_split(out, "train"))) + len(list(read_split(out, "val"))) == 12


def test_rerun_is_a_noop_and_other_arguments_are_refused(tmp_path, capsys):
    src = _parquet(tmp_path / "p.parquet", [{"id": f"r{i}", "image": _image(i)} for i in range(6)])
    out = tmp_path / "ds"
    prepare(PrepareConfig(inputs=[str(src)], out=str(out), workers=1))
    before = _tree(out)
    mtime = (out / "train.json").stat().st_mtime_ns
    prepare(PrepareConfig(inputs=[str(src)], out=str(out), workers=2, chunk_rows=2))
    assert "nothing to do" in capsys.readouterr().out
    assert _tree(out) == before and (out / "train.json").stat().st_mtime_ns == mtime
    with pytest.raises(RadscribeError, match="other arguments"):
        prepare(PrepareConfig(inputs=[str(src)], out=str(out), val_ratio=0.5, workers=1))


def test_resume_from_a_torn_checkpoint_gives_identical_output(tmp_path, monkeypatch):
    """A crash after checkpoint k leaves extra bytes in the partial files and a half-written image; resume repairs
    both."""
    src = _planted(tmp_path)
    args = dict(inputs=[str(src)], max_pixels=100 * 100, workers=1, chunk_rows=3)
    prepare(PrepareConfig(out=str(tmp_path / "whole"), **args))

    out = tmp_path / "torn"
    class Crash(Exception):
        pass

    from radscribe.data import prepare as prepare_module

    real = prepare_module._work_units

    def crashing_units(cfg, done):
        units, total, deid = real(cfg, done)

        def gen():
            for n, unit in enumerate(units):
                if n == 3:
                    raise Crash()
                yield unit
        return gen(), total, deid

    monkeypatch.setattr(prepare_module, "_work_units", crashing_units)
    with pytest.raises(Crash):
        prepare(PrepareConfig(out=str(out), **args))
    monkeypatch.setattr(prepare_module, "_work_units", real)
    import sqlite3

    with sqlite3.connect(out / ".prepare_state.sqlite") as db:
        rows_done = json.loads(db.execute("SELECT value FROM state WHERE key = 'rows_done'").fetchone()[0])
    assert 0 < rows_done < 18
    with open(out / "train.json.partial", "ab") as f:
        f.write(b'{"id": "torn half row')
    # Images are written in place: a kill mid-write leaves a short file under the final name.
    unwritten = sorted(set(os.listdir(tmp_path / "whole" / "images")) - set(os.listdir(out / "images")))
    whole_image = (tmp_path / "whole" / "images" / unwritten[0]).read_bytes()
    (out / "images" / unwritten[0]).write_bytes(whole_image[: len(whole_image) // 2])
    prepare(PrepareConfig(out=str(out), **args))
    assert _tree(out) == _tree(tmp_path / "whole")


@pytest.mark.slow
@pytest.mark.parametrize("group_by", ["patient", "similar"])
def test_sigkill_mid_run_then_rerun_gives_identical_checksums(tmp_path, group_by):
    from radscribe.data.synth import synth

    synth(out=str(tmp_path / "synth"), n=2000, size=48, shard_rows=1000, slices_per_patient=4, volumes=True)
    cmd = [sys.executable, "-m", "radscribe.cli", "prepare", str(tmp_path / "synth"), "--group-by", group_by,
           "--workers", "2"]
    subprocess.run(cmd + ["--out", str(tmp_path / "whole")], check=True, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:  # kill once a few hundred images are stored, well before the end
        if (out / "images").is_dir() and len(os.listdir(out / "images")) >= 300:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists(), "the run finished before it could be killed"
    rerun = subprocess.run(cmd + ["--out", str(out)], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _tree(out) == _tree(tmp_path / "whole")
    assert json.loads((out / "summary.json").read_text())["input_rows"] == 2000


def test_medical_rows_rejects_and_deid_report(tmp_path, monkeypatch):
    import radscribe.data.medical as medical

    def fake_medical_rows(opts, deid):
        assert opts.dicom == str(tmp_path) and opts.window == "lung" and opts.keep_ids is False
        deid["removed_tags"] = ["PatientName"]
        yield Row(id="pseudo-1", image=_image(1, "PNG"), caption="ct report", source="a.dcm", index=0, group="p1")
        yield Row(id="pseudo-2", image=None, caption="x", source="b.dcm", index=0, reject="burned-in annotation")

    monkeypatch.setattr(medical, "medical_rows", fake_medical_rows, raising=False)
    out = tmp_path / "ds"
    summary = prepare(PrepareConfig(dicom=str(tmp_path), reports="r.csv", window="lung", out=str(out), workers=1))
    assert summary["input_rows"] == 2 and summary["reasons"] == {"burned-in annotation": 1}
    assert json.loads((out / "deid_report.json").read_text()) == {"removed_tags": ["PatientName"]}


def test_cli_wrong_schema_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": ["t"]}), bad)
    assert cli_main(["prepare", str(bad), "--out", str(tmp_path / "ds")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("radscribe prepare: error:") and str(bad) in err
    assert "image, caption" in err


def test_cli_full_layout_with_images_folder(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(5):
        (images / f"vol{i // 2}_s{i}.jpg").write_bytes(_image(i))
    meta = tmp_path / "meta.parquet"
    pq.write_table(pa.table({"file_name": [f"vol{i // 2}_s{i}.jpg" for i in range(5)] + ["gone.jpg"],
                             "caption": [f"r{i}" for i in range(6)], "source": ["s"] * 6}), meta)
    out = tmp_path / "ds"
    assert cli_main(["prepare", str(meta), "--images", str(images), "--out", str(out), "--group-by", r"(vol\d+)_",
                     "--workers", "1", "--lang", "en"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input_rows"] == 6 and summary["reasons"] == {"missing image file": 1}
    rows = _rows(out, "train") + _rows(out, "val")
    assert sorted(r["group"] for r in rows) == ["vol0", "vol0", "vol1", "vol1", "vol2"]
    assert all((out / r["images"][0]).read_bytes() == _image(int(r["id"][-1])) for r in rows)
    assert rows[0]["messages"][0]["content"] == DEFAULT_PROMPTS["en"]


def test_dicom_folder_through_the_real_medical_reader(tmp_path):
    import shutil

    import pydicom.data

    dicom = tmp_path / "dicom"
    dicom.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(pydicom.data.get_testdata_file(name, download=False), dicom / name)
    reports = tmp_path / "reports.csv"
    reports.write_text("file,report\nCT_small.dcm,CT report\nMR_small.dcm,MR report\nmissing.dcm,lost\n")
    out = tmp_path / "ds"
    assert cli_main(["prepare", "--dicom", str(dicom), "--reports", str(reports), "--out", str(out),
                     "--key", "test-secret", "--workers", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input_rows"] == 3 and summary["train"] + summary["val"] == 2 and summary["rejects"] == 1
    rows = _rows(out, "train") + _rows(out, "val")
    assert sorted(r["messages"][1]["content"] for r in rows) == ["CT report", "MR report"]
    assert all(r["images"][0].endswith(".png") and "CT_small" not in r["id"] for r in rows)
    deid = json.loads((out / "deid_report.json").read_text())
    assert deid["dropped_fields"]["PatientName"] == 2
    assert "test-secret" not in (out / "summary.json").read_text()


def test_crash_inside_finish_resumes_to_identical_output(tmp_path, monkeypatch):
    from radscribe.data import prepare as prepare_module

    src = _planted(tmp_path)
    args = dict(inputs=[str(src)], max_pixels=100 * 100, workers=1)
    prepare(PrepareConfig(out=str(tmp_path / "whole"), **args))
    real = prepare_module._write_json

    def crash_on_summary(path, obj):
        if path.name == "summary.json":
            raise KeyboardInterrupt
        real(path, obj)

    monkeypatch.setattr(prepare_module, "_write_json", crash_on_summary)
    with pytest.raises(KeyboardInterrupt):
        prepare(PrepareConfig(out=str(tmp_path / "torn"), **args))
    assert (tmp_path / "torn" / "train.json").exists() and not (tmp_path / "torn" / "summary.json").exists()
    monkeypatch.setattr(prepare_module, "_write_json", real)
    prepare(PrepareConfig(out=str(tmp_path / "torn"), **args))
    assert _tree(tmp_path / "torn") == _tree(tmp_path / "whole")


@pytest.mark.parametrize("verify", ["decode", "structure"])
def test_both_verify_modes_reject_truncation_and_non_images(tmp_path, verify):
    from radscribe.data.prepare import verify_image

    jpeg, png = _image(1), _image(2, "PNG")
    decode = verify == "decode"
    assert verify_image(jpeg, 10 ** 6, decode)[:1] == (None,) and verify_image(jpeg, 10 ** 6, decode)[2] == jpeg
    assert verify_image(jpeg + b"\x00" * 8, 10 ** 6, decode)[0] is None
    assert verify_image(jpeg[: len(jpeg) // 2], 10 ** 6, decode)[0] == "truncated image"
    assert verify_image(jpeg[:-2], 10 ** 6, decode)[0] == "truncated image"
    assert verify_image(png[:-12], 10 ** 6, decode)[0] == "truncated image"
    flipped = bytearray(png)
    flipped[60] ^= 0xFF
    assert verify_image(bytes(flipped), 10 ** 6, decode)[0] in ("undecodable image", "truncated image")
    assert verify_image(b"GIF89a not really", 10 ** 6, decode)[0] in ("non-image bytes", "truncated image",
                                                                      "undecodable image")
    assert verify_image(b"plain text", 10 ** 6, decode)[0] == "non-image bytes"
    src = _planted(tmp_path)
    summary = prepare(PrepareConfig(inputs=[str(src)], out=str(tmp_path / "ds"), max_pixels=100 * 100, workers=1,
                                    verify=verify))
    assert summary["reasons"] == {"duplicate id": 1, "empty caption": 1, "image over pixel limit": 1,
                                  "non-image bytes": 1, "null image": 1, "truncated image": 1}


def test_rerun_after_synth_rewrites_identical_shards_is_a_noop(tmp_path, capsys):
    from radscribe.data.synth import synth

    synth(out=str(tmp_path / "synth"), n=8, size=32)
    prepare(PrepareConfig(inputs=[str(tmp_path / "synth")], out=str(tmp_path / "ds"), workers=1))
    synth(out=str(tmp_path / "synth"), n=8, size=32)  # same data, new mtimes
    prepare(PrepareConfig(inputs=[str(tmp_path / "synth")], out=str(tmp_path / "ds"), workers=1))
    assert "nothing to do" in capsys.readouterr().out
    synth(out=str(tmp_path / "synth"), n=8, size=32, seed=1)  # different data
    with pytest.raises(RadscribeError, match="other arguments or inputs"):
        prepare(PrepareConfig(inputs=[str(tmp_path / "synth")], out=str(tmp_path / "ds"), workers=1))


def test_user_mistakes_leave_no_half_started_folder(tmp_path):
    src = _parquet(tmp_path / "p.parquet", [{"id": "a", "image": _image(1)}])
    out = tmp_path / "ds"
    with pytest.raises(RadscribeError, match="regex"):
        prepare(PrepareConfig(inputs=[str(src)], out=str(out), group_by="p(["))
    assert not out.exists()
    with pytest.raises(RadscribeError, match="--reports"):
        prepare(PrepareConfig(dicom=str(tmp_path), out=str(out), workers=1))
    assert not out.exists()
    prepare(PrepareConfig(inputs=[str(src)], out=str(out), group_by="patient", workers=1))  # now fine
    assert json.loads((out / "summary.json").read_text())["train"] + \
        json.loads((out / "summary.json").read_text())["val"] == 1


def test_overwrite_replaces_a_dataset_prepared_with_other_arguments(tmp_path):
    src = _parquet(tmp_path / "p.parquet", [{"id": f"r{i}", "image": _image(i)} for i in range(10)])
    out = tmp_path / "ds"
    prepare(PrepareConfig(inputs=[str(src)], out=str(out), workers=1, val_ratio=0.0))
    (out / "notes.txt").write_text("mine")
    prepare(PrepareConfig(inputs=[str(src)], out=str(tmp_path / "fresh"), workers=1, val_ratio=1.0))
    prepare(PrepareConfig(inputs=[str(src)], out=str(out), workers=1, val_ratio=1.0, overwrite=True))
    mine = (out / "notes.txt").read_text()
    (out / "notes.txt").unlink()
    assert mine == "mine" and _tree(out) == _tree(tmp_path / "fresh")


def test_a_row_split_of_data_with_patients_warns(tmp_path, capsys):
    from radscribe.data.prepare import PrepareConfig, prepare
    from radscribe.data.synth import SynthConfig, synth

    shards = synth(SynthConfig(out=str(tmp_path / "synth"), n=12, size=32, slices_per_patient=3))
    prepare(PrepareConfig(inputs=[str(s) for s in shards], out=str(tmp_path / "rows"), workers=1))
    assert "pass --group-by patient" in capsys.readouterr().err
    prepare(PrepareConfig(inputs=[str(s) for s in shards], out=str(tmp_path / "grouped"), group_by="patient",
                          workers=1))
    assert "--group-by" not in capsys.readouterr().err


# --- grouping: fail in one line, reject rows without a key, group near-duplicate images ---------------------------
def _demo_without_patients(path: Path, n: int = 6) -> Path:
    """MedTrinity 25M_demo's columns only: image (bytes + path), id, caption."""
    images = [{"bytes": _image(i), "path": f"case{i}.jpg"} for i in range(n)]
    pq.write_table(pa.table({"image": pa.array(images, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                             "id": [f"r{i}" for i in range(n)], "caption": [f"report {i}" for i in range(n)]}),
                   path, row_group_size=4)
    return path


@pytest.mark.parametrize("group_by, message", [
    ("patient", "--group-by patient: {src} has no `patient` column (it has image, id, caption); for data that names "
                "no patients, such as MedTrinity 25M_demo, use --group-by similar"),
    ("source", "--group-by source: {src} has no `source` column"),
    (r"(vol\d+)_", r"--group-by '(vol\\d+)_' matches none of the first 4 file names of {src} (e.g. 'case0.jpg')"),
])
def test_a_grouping_that_finds_nothing_fails_in_one_line_before_writing(tmp_path, capsys, group_by, message):
    src = _demo_without_patients(tmp_path / "demo.parquet")
    out = tmp_path / "ds"
    assert cli_main(["prepare", str(src), "--out", str(out), "--group-by", group_by, "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("radscribe prepare: error: ")
    assert message.format(src=src) in err
    assert not out.exists()


def test_an_empty_group_column_or_a_folder_with_medical_rows_fails(tmp_path):
    src = _parquet(tmp_path / "p.parquet", [{"id": f"r{i}", "image": _image(i), "patient": None} for i in range(5)])
    with pytest.raises(RadscribeError, match=r"the `patient` column of .*p.parquet is empty in its first 5 rows"):
        prepare(PrepareConfig(inputs=[str(src)], out=str(tmp_path / "ds"), group_by="patient"))
    with pytest.raises(RadscribeError, match="DICOM/NIfTI rows are always grouped by patient"):
        prepare(PrepareConfig(dicom=str(tmp_path), reports="r.csv", out=str(tmp_path / "ds"), group_by="source"))
    with pytest.raises(RadscribeError, match="--near-threshold applies to --group-by similar only"):
        prepare(PrepareConfig(inputs=[str(src)], out=str(tmp_path / "ds"), near_threshold=2))
    with pytest.raises(RadscribeError, match="--group-by is empty"):
        prepare(PrepareConfig(inputs=[str(src)], out=str(tmp_path / "ds"), group_by=""))
    assert not (tmp_path / "ds").exists()


def test_rows_without_their_group_key_are_rejected_not_split_alone(tmp_path):
    patients = ["p1", None, "p1", "", "p2", "p2"]
    src = _parquet(tmp_path / "p.parquet", [{"id": f"r{i}", "image": _image(i), "patient": p}
                                            for i, p in enumerate(patients)])
    out = tmp_path / "ds"
    summary = prepare(PrepareConfig(inputs=[str(src)], out=str(out), group_by="patient", workers=1))
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["id"], r["row"], r["reason"]) for r in rejects] == [("r1", 1, "no group key"), ("r3", 3, "no group key")]
    assert rejects[0]["detail"] == "--group-by patient: the row's `patient` is empty"
    assert summary["reasons"] == {"no group key": 2} and summary["input_rows"] == 6
    assert sorted(r["group"] for r in _rows(out, "train") + _rows(out, "val")) == ["p1", "p1", "p2", "p2"]

    images = tmp_path / "imgs"
    images.mkdir()
    names = ["vol1_a.jpg", "scout.jpg", "vol1_b.jpg", "vol2_a.jpg"]
    for i, name in enumerate(names):
        (images / name).write_bytes(_image(i))
    meta = tmp_path / "meta.parquet"
    pq.write_table(pa.table({"file_name": names, "caption": ["c"] * 4, "source": ["s"] * 4}), meta)
    summary = prepare(PrepareConfig(inputs=[str(meta)], images=str(images), out=str(tmp_path / "full"),
                                    group_by=r"(vol\d+)_", workers=1))
    reject = json.loads((tmp_path / "full" / "rejects.jsonl").read_text())
    assert (reject["id"], reject["reason"]) == ("scout", "no group key")
    assert reject["detail"] == r"--group-by '(vol\\d+)_' does not match the row's file name"
    assert summary["split"]["train_groups"] + summary["split"]["val_groups"] == 2


def test_a_run_that_fails_before_its_first_row_leaves_nothing_behind(tmp_path, capsys):
    out = tmp_path / "ds"
    assert cli_main(["prepare", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no input" in err and not out.exists()
    # Leftovers of a run killed before its first checkpoint (or of an older version that failed like the above)
    # do not block the next, correct run: it recognises them as its own and starts afresh.
    src = _parquet(tmp_path / "p.parquet", [{"id": f"r{i}", "image": _image(i)} for i in range(6)])
    from radscribe.data.prepare import _Ledger

    (out / "images").mkdir(parents=True)
    stopped = _Ledger(out, "json", fingerprint="an earlier run's")  # checkpointed 0 rows, then "killed":
    stopped.files["train"].write(b'[\n{"id": "half')
    (out / "images" / "stray-0123456789ab.jpg").write_bytes(b"x")
    for f in stopped.files.values():
        f.close()
    stopped.db.close()
    prepare(PrepareConfig(inputs=[str(src)], out=str(out), workers=1))
    prepare(PrepareConfig(inputs=[str(src)], out=str(tmp_path / "clean"), workers=1))
    assert _tree(out) == _tree(tmp_path / "clean")


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    """MedTrinity-shaped slices of scans: 25 patients x 6 adjacent slices, each patient its own anatomy."""
    root = tmp_path_factory.mktemp("volumes")
    assert cli_main(["synth", "--out", str(root), "--n", "150", "--size", "64", "--slices-per-patient", "6",
                     "--volumes", "--shard-rows", "75", "--workers", "1"]) == 0
    return root


def test_group_by_similar_keeps_near_duplicate_slices_on_one_side_so_audit_strict_passes(volumes, tmp_path, capsys):
    from radscribe.evaluate.audit import AuditConfig, audit

    def prepared(name, *extra):
        assert cli_main(["prepare", str(volumes), "--out", str(tmp_path / name), "--val-ratio", "0.3",
                         "--workers", "1", *extra]) == 0
        return tmp_path / name

    by_row = prepared("by-row")
    leaky = audit(AuditConfig(str(by_row)))
    assert len(leaky.flagged["near"]) > 0 and leaky.ungrouped_rows == 150
    assert cli_main(["audit", str(by_row), "--strict"]) == 2
    assert "150 of 150 rows have no group key" in capsys.readouterr().out

    similar = prepared("similar", "--group-by", "similar")
    assert cli_main(["audit", str(similar), "--strict"]) == 0
    clean = audit(AuditConfig(str(similar)))
    assert not clean.flagged.get("near") and not clean.flagged.get("group") and clean.val_rows > 0
    rows = _rows(similar, "train") + _rows(similar, "val")
    summary = json.loads((similar / "summary.json").read_text())
    assert len(rows) == summary["train"] + summary["val"] == 150 and summary["rejects"] == 0
    assert all(r["group"].startswith("similar-") and len(r["group"]) == len("similar-") + 16 for r in rows)
    assert set(rows[0]) == {"id", "messages", "images", "group", "truth"}
    split = summary["split"]
    assert split["group_by"] == "similar" and split["near_threshold"] == 4 and split["groups_on_both_sides"] == 0
    groups = split["train_groups"] + split["val_groups"]
    # Slices of one scan are joined (fewer groups than rows), different patients mostly are not.
    assert 25 <= groups < 150 and split["largest_group_rows"] <= 24 and split["rows_in_shared_groups"] > 75
    by_patient = {}
    for r in rows:
        by_patient.setdefault(r["id"].split("-s")[0], set()).add(r["group"])
    assert sum(len(g) == 1 for g in by_patient.values()) >= 10  # whole scans kept in one group

    assert "warning" not in capsys.readouterr().err
    # The threshold is a real setting: 0 joins only identical hashes.
    exact = prepared("exact", "--group-by", "similar", "--near-threshold", "0")
    assert json.loads((exact / "summary.json").read_text())["split"]["train_groups"] > split["train_groups"]


def test_group_by_similar_says_so_when_one_group_swallows_the_data(tmp_path, capsys):
    pixels = np.kron((np.random.default_rng(0).random((6, 6)) * 255).astype("uint8"), np.ones((16, 16), "uint8"))
    copies = []
    for quality in range(60, 100, 4):  # one picture re-encoded: ten near-duplicates under ten ids
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
        copies.append({"id": f"q{quality}", "image": buf.getvalue()})
    src = _parquet(tmp_path / "p.parquet", copies)
    summary = prepare(PrepareConfig(inputs=[str(src)], out=str(tmp_path / "ds"), group_by="similar", workers=1))
    assert summary["split"]["largest_group_rows"] == 10 and summary["train"] * summary["val"] == 0
    err = capsys.readouterr().err
    assert "warning: --group-by similar joined 10 of 10 rows (100%) into one group" in err
    assert "Lower --near-threshold" in err and err.count("\n") == 1


def _undecodable_jpeg() -> bytes:
    """Well-formed markers and an end marker (so `--verify structure` passes), but the scan names Huffman tables
    that are not defined: libjpeg refuses to decode it."""
    jpeg = bytearray(_image(200, size=96))
    sos = jpeg.find(b"\xff\xda")
    for component in range(jpeg[sos + 4]):
        jpeg[sos + 6 + 2 * component] = 0x33
    return bytes(jpeg)


def test_group_by_similar_rejects_an_image_it_cannot_decode_to_hash(tmp_path):
    good = [{"id": f"r{i}", "image": _image(i)} for i in range(4)]
    src = _parquet(tmp_path / "p.parquet", good + [{"id": "broken", "image": _undecodable_jpeg()}])
    grouped = prepare(PrepareConfig(inputs=[str(src)], out=str(tmp_path / "similar"), group_by="similar", workers=1))
    reject = json.loads((tmp_path / "similar" / "rejects.jsonl").read_text())
    assert (reject["id"], reject["reason"]) == ("broken", "undecodable image") and "broken" in reject["detail"]
    assert grouped["train"] + grouped["val"] == 4 and len(list((tmp_path / "similar" / "images").iterdir())) == 4
    assert not (tmp_path / "similar" / "staged.jsonl.partial").exists()
    assert not (tmp_path / "similar" / "phash.u64.partial").exists()
    by_row = prepare(PrepareConfig(inputs=[str(src)], out=str(tmp_path / "by-row"), workers=1))
    assert by_row["train"] + by_row["val"] == 5  # the structure check alone lets it through


@pytest.mark.parametrize("crash_in", ["hashing pass", "distribution"])
def test_group_by_similar_resumes_to_identical_output(volumes, tmp_path, monkeypatch, crash_in):
    from radscribe.data import prepare as prepare_module

    args = dict(inputs=[str(volumes)], group_by="similar", workers=1, val_ratio=0.3)
    prepare(PrepareConfig(out=str(tmp_path / "whole"), **args))

    class Crash(BaseException):
        pass

    real_units, real_place = prepare_module._work_units, prepare_module._Ledger._place
    placed = []

    def crashing_units(cfg, done):
        units, total, deid = real_units(cfg, done)
        return (u if n < 1 else (_ for _ in ()).throw(Crash()) for n, u in enumerate(units)), total, deid

    def crashing_place(self, rec, group, val_ratio):
        placed.append(rec["id"])
        if len(placed) == 40:
            raise Crash()
        real_place(self, rec, group, val_ratio)

    if crash_in == "hashing pass":
        monkeypatch.setattr(prepare_module, "_work_units", crashing_units)
    else:
        monkeypatch.setattr(prepare_module._Ledger, "_place", crashing_place)
    with pytest.raises(Crash):
        prepare(PrepareConfig(out=str(tmp_path / "torn"), **args))
    assert (tmp_path / "torn" / "staged.jsonl.partial").stat().st_size > 0
    if crash_in == "hashing pass":  # a kill mid-unit leaves bytes past the checkpoint in both staged files
        with open(tmp_path / "torn" / "staged.jsonl.partial", "ab") as f:
            f.write(b'{"id": "torn half row')
        with open(tmp_path / "torn" / "phash.u64.partial", "ab") as f:
            f.write(b"\x01\x02\x03")
    monkeypatch.undo()
    import gc

    gc.collect()  # the crashed run's SQLite connection goes, as a killed process's would
    prepare(PrepareConfig(out=str(tmp_path / "torn"), **args))
    assert _tree(tmp_path / "torn") == _tree(tmp_path / "whole")
