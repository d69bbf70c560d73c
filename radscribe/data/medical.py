"""DICOM / NIfTI folders plus a reports CSV -> `Row`s for `radscribe prepare`, with PHI removed.

Run as: radscribe prepare --dicom DIR --reports reports.csv [--window auto|multi|brain|…] [--slices middle|all|every:N]

Every chosen slice becomes one `Row` whose image is a PNG re-encoded from the windowed pixels (no DICOM
header survives), whose id and group are keyed-hash pseudonyms unless `keep_ids`, and whose caption is the
report text from the CSV. Unusable inputs (burned-in annotation, unreadable file, missing report, compressed
pixel data without a decoder, CSV rows with no file) are yielded as rejects so that every input is accounted for.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import os
import secrets
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from radscribe.data.imaging import (NIFTI_EXTRA, is_multi, choose_slices, dicom_frame_count, dicom_images,
                                    nifti_images, read_dicom, sniff_format)
from radscribe.data.sources import Row
from radscribe.errors import RadscribeError

if TYPE_CHECKING:  # the options are PrepareConfig's medical fields (documented there)
    from radscribe.data.prepare import PrepareConfig


IDENTIFYING_TAGS = (
    # Identifying attributes of DICOM PS3.15 Annex E (Basic Application Level Confidentiality Profile) that are
    # commonly filled in. None of them is copied anywhere (the dataset holds only re-encoded pixels); the list
    # decides what deid_report.json counts as "present and dropped".
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "OtherPatientIDsSequence",
    "OtherPatientNames", "PatientBirthDate", "PatientBirthTime", "PatientSex", "PatientAge", "PatientSize",
    "PatientWeight", "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName", "MilitaryRank",
    "EthnicGroup", "Occupation", "AdditionalPatientHistory", "PatientComments", "MedicalRecordLocator",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "ReferringPhysicianName",
    "ReferringPhysicianAddress", "PerformingPhysicianName", "OperatorsName", "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy", "RequestingPhysician", "AccessionNumber", "StudyID", "StudyDate",
    "SeriesDate", "AcquisitionDate", "ContentDate", "StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime",
    "InstanceCreationDate", "InstanceCreationTime", "StationName", "DeviceSerialNumber", "StudyDescription",
    "SeriesDescription", "ImageComments", "RequestAttributesSequence", "StudyInstanceUID",
    "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID", "InstanceCreatorUID",
)
NIFTI_TEXT_FIELDS = ("descrip", "aux_file", "intent_name", "db_name")
UID_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
PATH_KEYS = ("file", "path", "filename", "file_name")
PATIENT_KEYS = ("patient", "patient_id", "PatientID")
REPORT_KEY = "report"
HEADER_KEPT = (*UID_KEYS, "PatientID", "BurnedInAnnotation", "ImagePositionPatient", "ImageOrientationPatient",
               "InstanceNumber")
NUMERIC_KEPT = ("ImagePositionPatient", "ImageOrientationPatient", "InstanceNumber")
BURNED_IN_REASON = "Burned In Annotation (0028,0301) is YES: PHI may be in the pixels (--allow-burned-in to accept)"


@dataclass
class _Volume:
    """One input file as found on disk (header read, pixels not yet)."""

    path: Path
    rel: str
    """Path relative to its folder, POSIX separators (what a CSV path column names)."""
    kind: str
    """dicom | nifti"""
    listing_index: int
    """Position in the sorted listing of its folder (the rejects ledger's row when ids are pseudonymised)."""
    header: dict | None = None
    """DICOM only: the `HEADER_KEPT` attributes, read without pixels."""
    frames: int = 1
    error: str | None = None


@dataclass
class _Report:
    row: int
    """1-based data row of the CSV (the header line is row 0)."""
    key: str
    text: str
    patient: str | None
    reject: str | None = None


def medical_rows(opts: PrepareConfig, deid: dict) -> Iterator[Row]:
    """One `Row` per (file, chosen slice), with PNG bytes; rejects for everything unusable. Fills `deid`.

    `deid` receives: `dropped_fields` {DICOM keyword or nifti:<field>: files where it was present},
    `files_with_private_tags`, `files`, `ids` ("hmac-sha256" or "kept"), `key_source`, and the burned-in policy.
    Values are never recorded.
    """
    if not opts.dicom and not opts.nifti:
        raise RadscribeError("medical input needs --dicom DIR and/or --nifti DIR")
    if not opts.reports:
        raise RadscribeError("--dicom/--nifti need --reports CSV (a join column, `report`, optional `patient`)")
    choose_slices(1, opts.slices)  # validate the spec before any work
    key, key_source = deid_key(opts)
    deid.setdefault("dropped_fields", {})
    deid.setdefault("files_with_private_tags", 0)
    deid.update(ids="kept (--keep-ids)" if opts.keep_ids else "hmac-sha256", key_source=key_source,
                images="PNG re-encoded from windowed pixels; no DICOM/NIfTI header is copied",
                burned_in_annotation="accepted (--allow-burned-in)" if opts.allow_burned_in else "rejected")
    pseudo = _Pseudonymiser(key, opts.keep_ids)
    volumes = _list_volumes(opts)
    id_key, reports = read_reports(opts.reports, opts.id_key)
    deid["files"] = deid.get("files", 0) + len(volumes)
    for vol in tqdm(volumes, desc="read headers", unit="file", disable=len(volumes) < 50):
        _read_header(vol, deid)

    matches, unmatched_reports = _join(reports, volumes, id_key)
    for report in unmatched_reports:
        yield Row(id=pseudo.id("csv", report.key or f"row{report.row}"), image=None, caption=report.text, source=str(opts.reports),
                  index=report.row, reject=report.reject)
    matched = {id(v) for _, vols in matches for v in vols}
    for vol in volumes:
        if id(vol) not in matched:
            reason = vol.error or f"no report in the reports CSV matches this file (by {id_key})"
            yield _file_reject(vol, opts, pseudo, reason)

    stacks = [(report, stack) for report, vols in matches for stack in _stacks(vols, id_key, opts.slices)]
    bar = tqdm(stacks, desc="render slices", unit="volume", disable=len(stacks) < 50)
    for report, stack in bar:
        yield from _render(report, stack, opts, pseudo)


def deid_key(opts: PrepareConfig) -> tuple[bytes, str]:
    """The pseudonymisation secret and where it came from (option, env, or the per-user key file)."""
    if opts.key:
        return opts.key.encode("utf-8"), "option key"
    if os.environ.get("RADSCRIBE_DEID_KEY"):
        return os.environ["RADSCRIBE_DEID_KEY"].encode("utf-8"), "env RADSCRIBE_DEID_KEY"
    # Deterministic per user, secret, and never inside the dataset: reruns and resumes give the same pseudonyms,
    # while whoever receives the dataset cannot hash candidate patient ids to re-identify rows.
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "radscribe"
    path = config / "deid.key"
    if not path.is_file():
        config.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    # The report names the kind of key only: the path would put the user's home folder into the dataset.
    return path.read_text(encoding="utf-8").strip().encode("utf-8"), "user key file (~/.config/radscribe/deid.key)"


class _Pseudonymiser:
    def __init__(self, key: bytes, keep: bool):
        self.key, self.keep = key, keep

    def hash(self, kind: str, value: str, n: int = 16) -> str:
        return hmac.new(self.key, f"{kind}:{value}".encode("utf-8"), hashlib.sha256).hexdigest()[:n]

    def id(self, kind: str, value: str) -> str:
        return f"{kind}-{value}" if self.keep else f"{kind}-{self.hash(kind, value)}"

    def group(self, patient: str) -> str:
        return patient if self.keep else f"pt-{self.hash('patient', patient, 12)}"


# --- reading the reports CSV and the folders ------------------------------------------------------------------
def read_reports(path: str, id_key: str | None) -> tuple[str, list[_Report]]:
    """(join column, reports) from the CSV; the join column is `id_key` or the first path/UID column present."""
    csv_path = Path(path)
    if not csv_path.is_file():
        raise RadscribeError(f"reports CSV {csv_path} does not exist")
    with csv_path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if id_key is None:
            id_key = next((c for c in (*PATH_KEYS, *UID_KEYS) if c in columns), None)
            if id_key is None:
                raise RadscribeError(f"{csv_path}: no join column; name one with --id-key (columns: {', '.join(columns)})"
                                     f" or add one of {', '.join(PATH_KEYS + UID_KEYS)}")
        if id_key not in columns:
            raise RadscribeError(f"{csv_path}: --id-key column {id_key!r} is not in the header ({', '.join(columns)})")
        if REPORT_KEY not in columns:
            raise RadscribeError(f"{csv_path}: no `{REPORT_KEY}` column (columns: {', '.join(columns)})")
        patient_key = next((c for c in PATIENT_KEYS if c in columns), None)
        reports = []
        for row_no, row in enumerate(reader, 1):
            patient = (row.get(patient_key) or "").strip() if patient_key else ""
            reports.append(_Report(row=row_no, key=(row.get(id_key) or "").strip(),
                                   text=(row.get(REPORT_KEY) or "").strip(), patient=patient or None))
    return id_key, reports


def _list_volumes(opts: PrepareConfig) -> list[_Volume]:
    volumes = []
    for folder, kind in ((opts.dicom, "dicom"), (opts.nifti, "nifti")):
        if not folder:
            continue
        root = Path(folder)
        if not root.is_dir():
            raise RadscribeError(f"--{kind} folder {root} does not exist")
        files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
        found = [p for p in files if _is_kind(p, kind)]
        for i, path in enumerate(found):
            volumes.append(_Volume(path=path, rel=path.relative_to(root).as_posix(), kind=kind, listing_index=i))
    return volumes


def _is_kind(path: Path, kind: str) -> bool:
    name = path.name.lower()
    if kind == "nifti":
        return name.endswith((".nii", ".nii.gz"))
    if name == "dicomdir":
        return False  # the media directory index, no image
    return name.endswith((".dcm", ".dicom")) or sniff_format(path) == "dicom"


def _read_header(vol: _Volume, deid: dict) -> None:
    dropped = deid["dropped_fields"]
    try:
        if vol.kind == "dicom":
            ds = read_dicom(vol.path, header_only=True)
            if "Rows" not in ds or "Columns" not in ds:
                # force=True parses almost any bytes; an image has at least its matrix size.
                raise RadscribeError(f"{vol.path}: not a readable DICOM image (no Rows/Columns)")
            # Keep only what joins, sorting and the burned-in check need: headers of 100k files stay small.
            vol.header = _kept_header(ds, str(vol.path))
            vol.frames = dicom_frame_count(ds, str(vol.path))
            for keyword in IDENTIFYING_TAGS:
                if keyword in ds and ds[keyword].value not in (None, "", b"", []):
                    dropped[keyword] = dropped.get(keyword, 0) + 1
            if any(elem.tag.is_private for elem in ds):
                deid["files_with_private_tags"] += 1
        else:
            import nibabel as nib

            img = nib.load(str(vol.path))
            header = img.header
            # Slices run along the axis that becomes RAS "S" after reorientation (see imaging.read_nifti).
            if len(img.shape) >= 3:
                axes = nib.orientations.io_orientation(img.affine)[:, 0]
                vol.frames = int(img.shape[int(np.flatnonzero(axes == 2)[0])])
            for field in NIFTI_TEXT_FIELDS:
                if field in header and bytes(header[field]).strip(b"\x00 "):
                    dropped[f"nifti:{field}"] = dropped.get(f"nifti:{field}", 0) + 1
    except RadscribeError as err:
        vol.error = _reason(err, str(vol.path))
    except ImportError:
        vol.error = f"reading NIfTI needs nibabel; {NIFTI_EXTRA}"
    except Exception as err:  # nibabel's many exception types (DICOM errors are RadscribeErrors by now)
        vol.error = f"not a readable NIfTI file ({type(err).__name__})"


def _kept_header(ds, label: str) -> dict:
    kept = {}
    for keyword in HEADER_KEPT:
        try:
            value = ds.get(keyword)
            if value is not None and keyword in NUMERIC_KEPT:  # sorting a series reads them as numbers
                [float(v) for v in (value if is_multi(value) else [value])]
        except (ValueError, TypeError, OverflowError):  # pydicom converts DS/IS text on access
            raise RadscribeError(f"{label}: DICOM {keyword} is not a valid value for its type") from None
        if value is not None:
            kept[keyword] = value
    return kept


def _join(reports: list[_Report], volumes: list[_Volume], id_key: str):
    """[(report, [volumes])] and the reports matching no file (each carrying its reject reason)."""
    readable = [v for v in volumes if v.error is None]
    index: dict[str, list[_Volume]] = defaultdict(list)
    if id_key in UID_KEYS:
        for vol in readable:
            if vol.kind == "dicom" and vol.header.get(id_key):
                index[str(vol.header.get(id_key)).strip()].append(vol)
    else:
        names: dict[str, list[_Volume]] = defaultdict(list)
        for vol in readable:
            index[vol.rel].append(vol)
            index[str(vol.path.resolve())].append(vol)
            names[vol.path.name].append(vol)
        for name, vols in names.items():
            if len(vols) == 1:  # a bare file name joins only when it is unambiguous
                index.setdefault(name, vols)
    matches, unmatched, used = [], [], {}
    for report in reports:
        value = report.key.replace("\\", "/").removeprefix("./")
        vols = index.get(value) if value else None
        # Reasons are categories (the ledger counts them); the CSV row number is the ledger's `row`.
        if not report.text:
            report.reject = f"empty `{REPORT_KEY}` in the reports CSV"
        elif not vols:
            report.reject = f"no readable file matches the report's {id_key}"
        elif id(vols[0]) in used:
            report.reject = f"duplicate {id_key} in the reports CSV (an earlier row gives the report)"
        if report.reject:
            unmatched.append(report)
            continue
        for vol in vols:
            used[id(vol)] = report.row
        matches.append((report, vols))
    return matches, unmatched


def _stacks(vols: list[_Volume], id_key: str, slices: str) -> list[list[tuple[_Volume, int]]]:
    """The (file, frame) lists that slice choice runs over.

    Joined by study/series, the single-slice files of one series form one volume (sorted along the slice
    normal), so `middle` picks the middle slice of the series; joined by file or SOPInstanceUID, each file is
    its own stack (its frames, for multi-frame DICOM and NIfTI).
    """
    if id_key not in ("StudyInstanceUID", "SeriesInstanceUID"):
        return [[(vol, i) for i in range(vol.frames)] for vol in vols]
    series: dict[str, list[_Volume]] = defaultdict(list)
    for vol in vols:
        series[str(vol.header.get("SeriesInstanceUID", vol.rel))].append(vol)
    return [[(vol, i) for vol in sorted(group, key=_slice_position) for i in range(vol.frames)]
            for _, group in sorted(series.items())]


def _slice_position(vol: _Volume):
    ds = vol.header
    position, orientation = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if position is not None and orientation is not None and len(position) == 3 and len(orientation) == 6:
        normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
        return (0, float(np.dot(normal, np.asarray(position, float))), vol.rel)
    return (1, float(ds.get("InstanceNumber") or 0), vol.rel)


# --- rows ----------------------------------------------------------------------------------------------------
def _render(report: _Report, stack: list[tuple[_Volume, int]], opts: PrepareConfig,
            pseudo: _Pseudonymiser) -> Iterator[Row]:
    chosen = [stack[i] for i in choose_slices(len(stack), opts.slices)] if stack else []
    by_file: dict[int, list[int]] = defaultdict(list)
    files: dict[int, _Volume] = {}
    for vol, frame in chosen:
        by_file[id(vol)].append(frame)
        files[id(vol)] = vol
    for key, frames in by_file.items():
        vol = files[key]
        group = pseudo.group(_patient(report, vol))
        burned = vol.kind == "dicom" and str(vol.header.get("BurnedInAnnotation", "")).strip().upper() == "YES"
        if burned and not opts.allow_burned_in:
            yield _file_reject(vol, opts, pseudo, BURNED_IN_REASON, report, group)
            continue
        try:
            wanted = set(frames)
            if vol.kind == "dicom":
                images = dicom_images(read_dicom(vol.path), opts.window, lambda n: sorted(wanted & set(range(n))),
                                      label=_source(vol, opts))
            else:
                images = nifti_images(vol.path, opts.window, lambda n: sorted(wanted & set(range(n))),
                                      name=_source(vol, opts))
        except RadscribeError as err:
            yield _file_reject(vol, opts, pseudo, _reason(err, _source(vol, opts)), report, group)
            continue
        base = _file_id(vol, pseudo)
        multi = vol.frames > 1
        for frame, image in images:
            yield Row(id=f"{base}-{frame:04d}" if multi else base, image=_png(image), caption=report.text,
                      source=_source(vol, opts), index=vol.listing_index, group=group)


def _file_id(vol: _Volume, pseudo: _Pseudonymiser) -> str:
    if pseudo.keep:
        return f"{vol.kind}-{vol.rel}"
    # DICOM: the SOP Instance UID names the image wherever the file is copied to; NIfTI has only its path.
    uid = vol.header.get("SOPInstanceUID") if vol.kind == "dicom" and vol.header is not None else None
    return pseudo.id("dcm" if vol.kind == "dicom" else "nii", str(uid) if uid else vol.rel)


def _patient(report: _Report | None, vol: _Volume) -> str:
    if report is not None and report.patient:
        return report.patient
    if vol.kind == "dicom" and vol.header is not None:
        for keyword in ("PatientID", "StudyInstanceUID"):
            if str(vol.header.get(keyword) or "").strip():
                return f"{keyword}:{str(vol.header.get(keyword)).strip()}"
    return f"file:{vol.rel}"


def _source(vol: _Volume, opts: PrepareConfig) -> str:
    # File names can carry patient names; unless ids are kept, the ledger names the folder and the position
    # in its sorted listing instead.
    root = opts.dicom if vol.kind == "dicom" else opts.nifti
    return str(vol.path) if opts.keep_ids else f"{root} (file {vol.listing_index} of the sorted listing)"


def _reason(err: Exception, label: str) -> str:
    # imaging errors open with the file's label; the ledger names the file in `source` (pseudonymised) instead.
    return str(err).removeprefix(f"{label}: ")


def _file_reject(vol: _Volume, opts: PrepareConfig, pseudo: _Pseudonymiser, reason: str,
                 report: _Report | None = None, group: str | None = None) -> Row:
    return Row(id=_file_id(vol, pseudo), image=None, caption=report.text if report else None, source=_source(vol, opts),
               index=vol.listing_index, group=group, reject=reason)


def _png(image: Image.Image) -> bytes:
    # PNG is lossless and PIL writes no text chunks unless asked: nothing but pixels leaves.
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
