"""Rows -> a ShareGPT multimodal dataset folder that LLaMA-Factory 0.9.x loads unchanged (docs/architecture.md).

Run as: radscribe prepare data/synth --out data/dataset [--val-ratio 0.1] [--group-by patient] [--lang en]
        radscribe prepare shards/*.parquet --out data/mt --group-by similar  (MedTrinity 25M_demo: no patient ids)
        radscribe prepare meta.parquet --images DIR --out data/full          (MedTrinity 25M_full layout)
        radscribe prepare --dicom DIR --reports reports.csv --out data/ct    (medical folders, de-identified)

What it guarantees:
- images are copied byte-exact when they are JPEG or PNG (the reference recipe re-encodes every JPEG at default
  quality and loses detail); other formats become lossless PNG; identical images are stored once;
- every input row ends in train, val or `rejects.jsonl` with its reason, and `summary.json`'s counts add up;
- the split is a hash of the id or of a group key, so it is deterministic and stable when rows are added; a
  grouping that finds nothing to group on is an error, never a silent per-row split; `--group-by similar` makes
  the groups from near-duplicate images (`radscribe.data.similar`), in a second pass over the accepted rows;
- input is streamed one record batch at a time; images are verified in a process pool (both cores);
- a run killed at any point and rerun with the same arguments ends with the same bytes as an uninterrupted run
  (outputs are appended to `*.partial` files and truncated back to the last checkpoint on resume); a rerun on
  finished output is a no-op.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import os
import re
import signal
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Literal

from radscribe.data.sources import NO_GROUP, SIMILAR, Row, RowGroup
from radscribe.errors import RadscribeError

IMAGE_TOKEN = "<image>"
DEFAULT_PROMPTS = {"zh": "<image>图片中的诊断结果是怎样?", "en": "<image>What are the findings in this image?"}
STATE_FILE = ".prepare_state.sqlite"
SPLITS = ("train", "val")
STAGED, HASHES = "staged.jsonl.partial", "phash.u64.partial"
"""`--group-by similar`: accepted rows and their image hashes, held until all images are hashed and grouped."""
OWN_FILES = ("train.json", "val.json", "train.jsonl", "val.jsonl", "rejects.jsonl", "dataset_info.json",
             "deid_report.json", "summary.json", STATE_FILE, "train.json.partial", "val.json.partial",
             "train.jsonl.partial", "val.jsonl.partial", "rejects.jsonl.partial", STAGED, HASHES)
"""Every file radscribe writes in a dataset folder besides images/ (what --overwrite may remove)."""
# LLaMA-Factory 0.9.x sharegpt entry (FIELD_NOTES: these exact columns and tags).
SHAREGPT_ENTRY = {"formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
                  "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                           "assistant_tag": "assistant"}}


@dataclass
class PrepareConfig:
    """What `radscribe prepare` reads and how it writes the dataset folder."""

    inputs: list[str] | None = None
    """Parquet files, globs or folders in the MedTrinity `25M_demo` (or, with `images`, `25M_full`) layout."""
    out: str = "data/dataset"
    """Output dataset folder."""
    images: str | None = None
    """Images folder of the `25M_full` layout, joined on the parquet's `file_name`."""
    dicom: str | None = None
    """DICOM folder (with `reports`), searched recursively for DICOM files (by the `DICM` preamble or a .dcm
    suffix); rows come from `radscribe.data.medical`, de-identified."""
    nifti: str | None = None
    """NIfTI folder (with `reports`), searched recursively for .nii / .nii.gz volumes (needs the `radscribe[nifti]`
    extra)."""
    reports: str | None = None
    """Reports CSV for `dicom`/`nifti`: one report per image/study: a join column (see `id_key`), `report`, and
    optionally `patient`."""
    window: str = "auto"
    """Display window for medical images: `auto` (the file's WindowCenter/WindowWidth, else min/max; NIfTI: header
    cal range, else 0.5-99.5 percentiles), `multi` (three CT windows stacked into RGB), or a preset name from
    `radscribe.data.imaging.WINDOWS` (brain, subdural, stroke, lung, mediastinum, soft_tissue, liver, bone)."""
    slices: str = "middle"
    """Which slices of a volume become rows: `middle`, `all`, or `every:N` (every Nth slice)."""
    keep_ids: bool = False
    """Keep the source ids (file paths, patient ids) instead of keyed-hash pseudonyms. Only for data with no PHI."""
    allow_burned_in: bool = False
    """Accept images whose Burned In Annotation (0028,0301) is YES (PHI may be in the pixels); else reject them."""
    id_key: str | None = None
    """Reports CSV column to join on: a file path column (relative to the folder), or StudyInstanceUID,
    SeriesInstanceUID or SOPInstanceUID. None: `file`/`path` if the CSV has one, else the first UID column."""
    key: str | None = None
    """Secret for the HMAC-SHA256 pseudonyms. None: env RADSCRIBE_DEID_KEY, else a random key created once in
    ~/.config/radscribe/deid.key (outside the dataset, so reruns/resume give the same pseudonyms)."""
    val_ratio: float = 0.1
    """Fraction of rows (or groups) hashed into the validation split."""
    group_by: str | None = None
    """Keep each group on one side of the split: `patient`/`source` (a column), `similar` (near-duplicate images),
    or a regex on the file name; None: each row alone. `patient` or `source`: that parquet column. `similar`:
    images within `near_threshold` pHash bits, joined transitively (e.g. the adjacent slices of one scan), for data
    that names no patients, such as MedTrinity 25M_demo. A regex is searched in the file name; its first group, if
    it has one, else the whole match, is the key.
    A grouping that can find nothing (no such column, a column empty in the first rows, a regex that matches none
    of the first file names) is an error before anything is written. A row whose own key is missing (an empty
    `patient`, a file name the regex misses) is rejected as "no group key" (rejects.jsonl names it), never split
    on its own; with `similar`, an image that cannot be decoded to hash is rejected as "undecodable image".
    DICOM/NIfTI rows are always grouped by patient (None or `patient` only)."""
    near_threshold: int | None = None
    """With `group_by: similar`: the largest pHash Hamming distance (of 64 bits) joining two images (None: 4). 4 is
    the default of `radscribe audit --near-threshold`, so that audit then finds no near pair across the split."""
    format: Literal["json", "jsonl"] = "json"
    """train/val files as JSON arrays (`train.json`) or JSON lines (`train.jsonl`)."""
    lang: Literal["zh", "en"] = "zh"
    """Language of the default prompt."""
    prompt: str | None = None
    """A custom prompt; `<image>` is prepended when it has none."""
    prompts_file: str | None = None
    """A file of prompts, one per line, sampled per row (a hash of seed and id, so resumes agree)."""
    seed: int = 0
    """Seed of the prompt sampling."""
    max_pixels: int = 50_000_000
    """Decompression-bomb guard: images with more pixels are rejected before they are decoded."""
    verify: Literal["decode", "structure"] = "structure"
    """How JPEG/PNG are checked. `structure` (default): headers are parsed and the end marker required (JPEG EOI;
    PNG chunks and their CRCs up to IEND), no pixel decode: catches truncation and non-image bytes. `decode`
    also decodes every JPEG (at 1/8 scale): about twice as slow, and it adds little, because libjpeg decodes
    corrupt entropy data without an error (200 random bytes written into the middle of a JPEG raised on 1 of 50
    files here); PNG corruption is already caught by the CRCs. Other formats are always decoded (they are
    converted to PNG)."""
    workers: int = 0
    """Image-verification processes; 0 = one per CPU core."""
    chunk_rows: int = 256
    """Rows per work unit and checkpoint for medical folders (parquet works per row group)."""
    overwrite: bool = False
    """Replace a dataset (finished or not) prepared in `out` with other arguments; only radscribe's own files
    there are removed. Without it, such a folder is an error."""


# --- per-image work (runs in the process pool) -------------------------------------------------------------
def sanitise_id(row_id: str) -> str:
    """An id as a safe file-name stem: [A-Za-z0-9._-] only, no leading dot, at most 64 characters."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", row_id).lstrip(".")[:64]
    return stem or "row"


def verify_image(data: bytes, max_pixels: int, decode: bool = True) -> tuple[str | None, str, bytes | None, str]:
    """Check one encoded image: (reject reason or None, detail, bytes to store, file extension).

    JPEG and PNG are stored as given; anything else PIL decodes is converted to PNG losslessly.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        return "image over pixel limit", str(err), None, ""
    except UnidentifiedImageError:
        return "non-image bytes", f"{len(data)} bytes, starts {data[:8].hex()}", None, ""
    except Exception as err:  # PIL raises many types for corrupt headers
        return _decode_failure(err), f"{type(err).__name__}: {err}", None, ""
    width, height = img.size
    if width * height > max_pixels:
        return "image over pixel limit", f"{width}x{height} > {max_pixels} pixels", None, ""
    if not decode and img.format in ("JPEG", "MPO"):
        # Trailing zero padding after EOI is common and harmless.
        if data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
            return "truncated image", "no JPEG end-of-image marker", None, ""
        return None, "", data, "jpg"
    try:
        if not decode and img.format == "PNG":
            Image.open(io.BytesIO(data)).verify()  # chunk CRCs up to IEND, no inflate
            return None, "", data, "png"
        if img.format in ("JPEG", "MPO"):
            # DCT-domain downscaling to grey halves the decode time, yet every entropy-coded byte of every
            # component is still read, so a truncated stream fails as in a full decode (we store the originals).
            img.draft("L" if img.mode in ("L", "RGB") else img.mode, (max(1, width // 8), max(1, height // 8)))
        img.load()  # a decode: the only honest test of a truncated or corrupt stream
        if img.format == "PNG":
            # load() stops at the last pixel row; verify() walks the chunks to IEND and checks their CRCs.
            Image.open(io.BytesIO(data)).verify()
    except Exception as err:
        return _decode_failure(err), f"{type(err).__name__}: {err}", None, ""
    if img.format in ("JPEG", "MPO"):
        return None, "", data, "jpg"
    if img.format == "PNG":
        return None, "", data, "png"
    if img.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
        img = img.convert("RGBA" if "A" in img.mode else "RGB")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return None, f"converted {img.format or 'image'} to PNG", buf.getvalue(), "png"


def _decode_failure(err: Exception) -> str:
    return "truncated image" if isinstance(err, EOFError) or "truncat" in str(err).lower() else "undecodable image"


def _process_unit(unit: RowGroup | list[Row], images_dir: str, max_pixels: int, decode: bool,
                  source_images: str | None, group_by: str | None) -> list[tuple]:
    """Read one work unit (a parquet row group, or a list of rows), verify and store its images.

    Runs in the pool: image bytes never travel between processes. Returns per row (row without its image bytes,
    id, reject reason or None, detail, stored file name, sha256, perceptual hash with `similar` grouping);
    order-dependent verdicts (duplicate id, duplicate pixels) are left to the main process.
    """
    from radscribe.data.sources import RowGroup, read_row_group

    rows = read_row_group(unit, source_images, group_by) if isinstance(unit, RowGroup) else unit
    results = []
    for row in rows:
        row_id = str(row.id) if row.id not in (None, "") else f"{Path(row.source).stem}-{row.index}"
        (why, detail), name, sha, phash = _precheck(row, group_by), None, None, None
        if why is None:
            why, detail, stored, ext = verify_image(row.image, max_pixels, decode)
        if why is None and group_by == SIMILAR:
            why, detail, phash = _hash(stored, row_id)
        if why is None:
            sha = hashlib.sha256(stored).hexdigest()
            name = f"{sanitise_id(row_id)}-{sha[:12]}.{ext}"
            _store(os.path.join(images_dir, name), stored)
        results.append((dataclasses.replace(row, image=None), row_id, why, detail, name, sha, phash))
    return results


def _precheck(row: Row, group_by: str | None) -> tuple[str | None, str]:
    from radscribe.data.sources import missing_group

    if row.reject:
        return row.reject, ""
    if row.image is None:
        return "null image", ""
    if not (row.caption or "").strip():
        return "empty caption", ""
    if row.group is None and group_by not in (None, SIMILAR):
        return NO_GROUP, missing_group(group_by)
    return None, ""


def _hash(stored: bytes, row_id: str) -> tuple[str | None, str, int | None]:
    """(reject reason, detail, pHash) of an image that passed `verify_image`; the audit hashes it the same way."""
    from radscribe.data.similar import image_hash

    try:
        return None, "", image_hash(stored, name=row_id)
    except RadscribeError as err:  # `--verify structure` does not decode; the hash must
        return "undecodable image", str(err), None


def _store(path: str, data: bytes) -> None:
    # Written in place, no temporary + rename: both workers renaming into images/ serialised on the directory
    # lock and spent most of the run spinning in the kernel (perf: rwsem_spin_on_owner under rename). A kill
    # mid-write leaves a short file; its size differs from the data's, so the resumed run writes it again (the
    # name carries the content hash, so a file of the right size under it is this image).
    try:
        if os.stat(path).st_size == len(data):
            return
    except FileNotFoundError:
        pass
    with open(path, "wb") as f:
        f.write(data)


# --- the stage ----------------------------------------------------------------------------------------------
def prepare(cfg: PrepareConfig) -> dict:
    """Build the dataset folder; returns the summary (also written to `summary.json`)."""
    from tqdm import tqdm

    cfg = _checked(cfg)
    prompts = _prompts(cfg)
    out = Path(cfg.out)
    fingerprint = _fingerprint(cfg)
    summary_path = out / "summary.json"
    if summary_path.is_file():
        done = json.loads(summary_path.read_text(encoding="utf-8"))
        if done.get("fingerprint") == fingerprint:
            _remove_partials(out)  # a run killed after writing summary.json, before its own clean-up
            print(f"{out}: already prepared with these arguments; nothing to do")
            return done
        if not cfg.overwrite:
            raise RadscribeError(f"{out} holds a dataset prepared with other arguments or inputs; choose a new "
                                 f"--out, delete the folder, or pass --overwrite")
        _remove_previous(out)
    elif cfg.overwrite and _state_fingerprint(out) not in (None, fingerprint):
        _remove_previous(out)
    if cfg.inputs:  # a wrong schema, regex or grouping fails before anything is written
        from radscribe.data.sources import check_grouping, row_groups

        units = row_groups(cfg.inputs, cfg.images)
        check_grouping(units, cfg.group_by)
        if cfg.group_by is None and units:
            _warn_if_groups_ignored(units[0].path)
    (out / "images").mkdir(parents=True, exist_ok=True)

    ledger = _Ledger(out, cfg.format, fingerprint, staged=cfg.group_by == SIMILAR)
    pool = bar = None
    try:
        units, total, deid = _work_units(cfg, done=ledger.rows_done)
        bar = tqdm(total=total, initial=ledger.rows_done, unit="rows", desc="prepare", disable=None, smoothing=0.1)
        args = (str(out / "images"), cfg.max_pixels, cfg.verify == "decode", cfg.images, cfg.group_by)
        workers = cfg.workers or (os.cpu_count() or 1)
        if isinstance(units, list) and len(units) < 2:
            workers = 1  # starting interpreters would cost more than the work
        if workers > 1:
            import multiprocessing as mp

            pool = mp.get_context("spawn").Pool(workers, initializer=_die_with_parent)
        pending: collections.deque = collections.deque()
        for unit in units:
            pending.append(pool.apply_async(_process_unit, (unit, *args)) if pool else _process_unit(unit, *args))
            # At most two units in flight per worker: memory stays flat however large the input.
            while pending and (pool is None or len(pending) > 2 * workers or pending[0].ready()):
                bar.update(_commit(ledger, pending.popleft(), prompts, cfg))
        while pending:
            bar.update(_commit(ledger, pending.popleft(), prompts, cfg))
    except RadscribeError:
        if ledger.rows_done == 0:
            ledger.discard()  # a user mistake found before any row: leave no half-started folder behind
        raise
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()

    summary = ledger.finish(cfg, deid)
    print(f"{out}: {summary['train']} train, {summary['val']} val, {summary['rejects']} rejected "
          f"of {summary['input_rows']} rows; {summary['images_stored']} images")
    _warn_if_one_group_dominates(summary)
    return summary


def _warn_if_one_group_dominates(summary: dict) -> None:
    """`similar` joins chains of look-alike images; when they link most of the data into one group, no split
    near `val_ratio` exists that keeps near-duplicates apart, and the user must hear it (summary.json has the
    numbers)."""
    split, kept = summary["split"], summary["train"] + summary["val"]
    largest = split.get("largest_group_rows", 0)
    if kept and largest > 0.5 * split["val_ratio"] * kept:
        print(f"radscribe prepare: warning: --group-by similar joined {largest} of {kept} rows ({largest / kept:.0%}) "
              f"into one group of images linked within {split['near_threshold']} pHash bits; val holds "
              f"{split['val_fraction']:.1%} against --val-ratio {split['val_ratio']}. Lower --near-threshold, or "
              f"group by a patient column or a file-name regex if the data has one", file=sys.stderr, flush=True)


def _checked(cfg: PrepareConfig) -> PrepareConfig:
    """The request checked as a whole before anything is written; `near_threshold` resolved for `similar`."""
    from radscribe.data.similar import NEAR_THRESHOLD, check_threshold
    from radscribe.data.sources import group_pattern

    medical = bool(cfg.dicom or cfg.nifti)
    if medical and cfg.inputs:
        raise RadscribeError("give either parquet inputs or --dicom/--nifti, not both")
    if not medical and not cfg.inputs:
        raise RadscribeError("no input: give parquet files/globs/folders, or --dicom/--nifti with --reports")
    group_pattern(cfg.group_by)  # an empty or invalid regex
    if medical and cfg.group_by not in (None, "patient"):
        raise RadscribeError(f"--group-by {cfg.group_by}: DICOM/NIfTI rows are always grouped by patient (the "
                             f"reports CSV's patient column, else PatientID, else the study); drop --group-by")
    if cfg.group_by != SIMILAR:
        if cfg.near_threshold is not None:
            raise RadscribeError(f"--near-threshold applies to --group-by {SIMILAR} only")
        return cfg
    threshold = NEAR_THRESHOLD if cfg.near_threshold is None else cfg.near_threshold
    check_threshold(threshold)
    return dataclasses.replace(cfg, near_threshold=threshold)


def _state_fingerprint(out: Path) -> str | None:
    """The fingerprint of an unfinished run in `out`, if there is one."""
    import sqlite3

    if not (out / STATE_FILE).is_file():
        return None
    with sqlite3.connect(out / STATE_FILE) as db:
        found = db.execute("SELECT value FROM state WHERE key = 'fingerprint'").fetchone()
    return json.loads(found[0]) if found else None


def _remove_previous(out: Path) -> None:
    """--overwrite: remove radscribe's own files from `out` (and nothing else a user may keep there)."""
    import shutil

    shutil.rmtree(out / "images", ignore_errors=True)
    for name in OWN_FILES:
        (out / name).unlink(missing_ok=True)


def _remove_partials(out: Path) -> None:
    for name in (STATE_FILE, *(n for n in OWN_FILES if n.endswith(".partial"))):
        (out / name).unlink(missing_ok=True)


def _die_with_parent() -> None:
    """Pool initializer: a worker whose main process is killed (SIGKILL) dies too (Linux), instead of finishing
    its row group into the folder while a rerun already works there."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


def _warn_if_groups_ignored(parquet: str) -> None:
    """A row-level split of data that names its patients leaks slices of one patient into validation."""
    import pyarrow.parquet as pq

    if "patient" in pq.ParquetFile(parquet).schema_arrow.names:
        print(f"radscribe prepare: warning: {parquet} has a 'patient' column but the split is by row id; "
              "pass --group-by patient to keep each patient's rows on one side of the split",
              file=sys.stderr, flush=True)


def _prompts(cfg: PrepareConfig) -> list[str]:
    if cfg.prompts_file:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise RadscribeError(f"--prompts-file {path} does not exist")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise RadscribeError(f"--prompts-file {path} holds no prompts")
    else:
        prompts = [cfg.prompt or DEFAULT_PROMPTS[cfg.lang]]
    fixed = []
    for i, prompt in enumerate(prompts):
        count = prompt.count(IMAGE_TOKEN)
        if count > 1:
            raise RadscribeError(f"prompt {i + 1} ({prompt!r}) holds {count} {IMAGE_TOKEN} placeholders; "
                                 f"each row has exactly one image")
        # LLaMA-Factory fails hard when placeholders and images differ in number.
        fixed.append(prompt if count else IMAGE_TOKEN + prompt)
    return fixed


def _fingerprint(cfg: PrepareConfig) -> str:
    """Everything that decides the output bytes: the arguments (not workers/chunk size) and the input files."""
    from radscribe.data.sources import parquet_files

    # Not the output folder (a moved dataset is the same dataset), nor the de-identification secret.
    args = {k: v for k, v in asdict(cfg).items() if k not in ("workers", "chunk_rows", "out", "key", "overwrite")}
    paths = parquet_files(cfg.inputs) if cfg.inputs else []
    for folder in (cfg.dicom, cfg.nifti):
        if folder and Path(folder).is_dir():
            paths += sorted(p for p in Path(folder).rglob("*") if p.is_file())
    for extra in (cfg.reports, cfg.prompts_file):
        if extra and Path(extra).is_file():
            paths.append(Path(extra))
    files = [(str(p), p.stat().st_size, _tail_digest(p)) for p in paths]
    blob = json.dumps({"args": args, "files": files}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _tail_digest(path: Path, size: int = 1 << 16) -> str:
    """Hash of a file's last 64 KiB: for parquet, the footer (row groups, offsets, statistics). Unlike mtime it
    survives a rewrite of identical data, e.g. `radscribe synth` run again with the same arguments."""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return hashlib.sha256(f.read()).hexdigest()[:16]


def _work_units(cfg: PrepareConfig, done: int) -> tuple[Iterator, int | None, dict | None]:
    """Work units after the first `done` rows, the total row count when known, and the de-identification report.

    Parquet: one unit per row group (read by the worker itself). Medical folders: lists of `chunk_rows` rows.
    """
    if cfg.dicom or cfg.nifti:
        import itertools

        from radscribe.data.medical import medical_rows

        deid: dict = {}
        # Medical rows are re-derived on resume, so the de-identification report covers all of them.
        rows = itertools.islice(medical_rows(cfg, deid), done, None)
        return iter(lambda: list(itertools.islice(rows, cfg.chunk_rows)), []), None, deid
    from radscribe.data.sources import row_groups

    units = row_groups(cfg.inputs, cfg.images)
    total = sum(u.num_rows for u in units)
    skipped = 0
    while units and skipped + units[0].num_rows <= done:
        skipped += units.pop(0).num_rows
    if skipped != done:
        raise RadscribeError(f"{cfg.out}: the checkpoint ({done} rows) does not fall on a row-group boundary of the "
                             f"inputs; delete the folder and rerun")
    return units, total, None


def _commit(ledger: "_Ledger", pending, prompts: list[str], cfg: PrepareConfig) -> int:
    """Write one unit's rows in input order, then checkpoint."""
    results = pending if isinstance(pending, list) else pending.get()
    for row, row_id, why, detail, name, sha, phash in results:
        if why is None and ledger.seen(row_id):
            why = "duplicate id"
        if why is not None:
            ledger.reject(row, row_id, why, detail, name)
            continue
        ledger.accept(row, row_id, name, sha, _pick_prompt(prompts, cfg.seed, row_id), cfg.val_ratio, phash)
    ledger.checkpoint(len(results))
    return len(results)


def _pick_prompt(prompts: list[str], seed: int, row_id: str) -> str:
    if len(prompts) == 1:
        return prompts[0]
    digest = hashlib.sha256(f"{seed}:{row_id}".encode()).digest()
    return prompts[int.from_bytes(digest[:8], "little") % len(prompts)]


def split_of(key: str, val_ratio: float) -> str:
    """`train` or `val` from a hash of the id or group key: stable when rows are added or reordered."""
    digest = hashlib.sha256(f"split:{key}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2 ** 64 < val_ratio else "train"


class _Ledger:
    """The output files, the running counts, and the checkpoint.

    Everything order-dependent (ids seen, image hash -> stored name, groups per split, counts, the output files'
    byte offsets) lives in an SQLite file next to the output and is committed once per work unit, after the
    output files are flushed: memory stays flat however many rows there are, and a killed run resumes from the
    last commit by truncating the output files back to the committed offsets.

    With `staged` (`--group-by similar`) a row's split depends on every image, so accepted rows go to
    `STAGED` and their perceptual hashes (8 bytes each) to `HASHES`, checkpointed like the other files; `finish`
    groups the hashes and streams the staged rows into train/val. That second pass reads no image and is redone
    from the start when a run is killed inside it.
    """

    def __init__(self, out: Path, fmt: str, fingerprint: str, staged: bool = False):
        self.out, self.fmt, self.fingerprint = out, fmt, fingerprint
        self.names = {s: f"{s}.{fmt}" for s in SPLITS}
        self.paths = {s: out / f"{self.names[s]}.partial" for s in SPLITS}
        self.paths["rejects"] = out / "rejects.jsonl.partial"
        if staged:
            self.paths.update(staged=out / STAGED, hashes=out / HASHES)
        state = self._open_state()
        if state and state["fingerprint"] != fingerprint:
            if state.get("rows_done"):
                raise RadscribeError(f"{out} holds an unfinished prepare run with other arguments or inputs; rerun "
                                     f"with the same arguments to resume it, choose a new --out, or pass "
                                     f"--overwrite")
            # Left by a run that stopped before its first row: nothing in it is worth keeping.
            self.db.close()
            _remove_previous(out)
            (out / "images").mkdir(parents=True, exist_ok=True)
            state = self._open_state()
        self.rows_done = state.get("rows_done", 0)
        self.counts = state.get("counts", {s: 0 for s in SPLITS})
        self.duplicate_images = state.get("duplicate_images", 0)
        offsets = state.get("offsets", {})
        finals = {**{s: out / self.names[s] for s in SPLITS}, "rejects": out / "rejects.jsonl"}
        for key, path in self.paths.items():
            if state and not path.exists() and key in finals and finals[key].exists():
                os.replace(finals[key], path)  # killed inside `finish`, after the renames: undo them
            with open(path, "ab") as f:
                if f.tell() < offsets.get(key, 0):
                    raise RadscribeError(f"{path} is shorter than its checkpoint (the machine crashed?); delete "
                                         f"{out} and rerun")
                f.truncate(offsets.get(key, 0))
        self.files = {k: open(p, "ab") for k, p in self.paths.items()}
        self.db.execute("BEGIN")
        if not state:
            self.checkpoint(0)

    def _open_state(self) -> dict:
        import sqlite3

        self.db = sqlite3.connect(self.out / STATE_FILE, isolation_level=None)
        # Safe against a killed process (the guarantee we give); an OS crash may need a fresh run (checked above).
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.executescript(
            "CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT);"
            "CREATE TABLE IF NOT EXISTS ids (id TEXT PRIMARY KEY);"
            "CREATE TABLE IF NOT EXISTS images (sha12 TEXT PRIMARY KEY, name TEXT);"
            "CREATE TABLE IF NOT EXISTS groups (key TEXT, split TEXT, PRIMARY KEY (key, split));"
            "CREATE TABLE IF NOT EXISTS reasons (reason TEXT PRIMARY KEY, n INTEGER);")
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM state")}

    def _write(self, key: str, rec: dict) -> None:
        text = json.dumps(rec, ensure_ascii=False)
        if key in SPLITS and self.fmt == "json":
            # A JSON array, one row per line, closed by `finish`: "[\n" row (",\n" row)*
            text = ("[\n" if self.counts[key] == 0 else ",\n") + text
        else:
            text += "\n"
        self.files[key].write(text.encode("utf-8"))

    def reject(self, row: Row, row_id: str, reason: str, detail: str, name: str | None) -> None:
        rec = {"source": row.source, "row": row.index, "id": row_id, "reason": reason}
        if detail:
            rec["detail"] = detail
        self._write("rejects", rec)
        self.db.execute("INSERT INTO reasons VALUES (?, 1) ON CONFLICT(reason) DO UPDATE SET n = n + 1", (reason,))
        # The worker stored this row's image before the duplicate-id verdict; drop it unless another row uses it.
        if name and self._stored_name(name) != name:
            (self.out / "images" / name).unlink(missing_ok=True)

    def seen(self, row_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM ids WHERE id = ?", (row_id,)).fetchone() is not None

    def _stored_name(self, name: str) -> str | None:
        found = self.db.execute("SELECT name FROM images WHERE sha12 = ?", (_sha12_of(name),)).fetchone()
        return found[0] if found else None

    def accept(self, row: Row, row_id: str, name: str, sha: str, prompt: str, val_ratio: float,
               phash: int | None = None) -> None:
        kept = self._stored_name(name)
        if kept is None:
            self.db.execute("INSERT INTO images VALUES (?, ?)", (sha[:12], name))
            kept = name
        elif kept != name:  # the same pixels are already stored under an earlier row's name
            self.duplicate_images += 1
            (self.out / "images" / name).unlink(missing_ok=True)
        rec = {"id": row_id,
               "messages": [{"role": "user", "content": prompt},
                            {"role": "assistant", "content": row.caption.strip()}],
               "images": [f"images/{kept}"]}
        if row.truth:
            rec["truth"] = row.truth
        self.db.execute("INSERT INTO ids VALUES (?)", (row_id,))
        if "staged" in self.files:
            self._write("staged", rec)
            self.files["hashes"].write(phash.to_bytes(8, "little"))
        else:
            self._place(rec, row.group, val_ratio)

    def _place(self, rec: dict, group: str | None, val_ratio: float) -> None:
        """Write a row to its split: a hash of its group key, or of its id when it has no group."""
        key = group if group is not None else rec["id"]
        split = split_of(key, val_ratio)
        placed = {k: rec[k] for k in ("id", "messages", "images")}
        if group is not None:
            placed["group"] = group
        if "truth" in rec:
            placed["truth"] = rec["truth"]
        self._write(split, placed)
        self.counts[split] += 1
        self.db.execute("INSERT OR IGNORE INTO groups VALUES (?, ?)", (key, split))

    def _distribute(self, threshold: int, val_ratio: float) -> dict:
        """`similar`: group every accepted row by its image hash, then write the staged rows to their splits."""
        import numpy as np

        from radscribe.data.similar import similar_groups

        for key in ("staged", "hashes"):
            self.files[key].flush()
        keys = similar_groups(np.fromfile(self.paths["hashes"], dtype="<u8"), threshold)
        placed = 0
        with open(self.paths["staged"], "rb") as staged:
            for line, key in zip(staged, keys):
                self._place(json.loads(line), f"{SIMILAR}-{int(key):016x}", val_ratio)
                placed += 1
        assert placed == len(keys) == sum(self.counts.values()), "staged rows and image hashes disagree"
        sizes = np.unique(keys, return_counts=True)[1]
        return {"near_threshold": threshold, "largest_group_rows": int(sizes.max(initial=0)),
                "rows_in_shared_groups": int(sizes[sizes > 1].sum())}

    def checkpoint(self, rows: int) -> None:
        self.rows_done += rows
        offsets = {}
        for key, f in self.files.items():
            # flush, not fsync: a killed process loses nothing the kernel holds, and an fsync here forces
            # ext4 (data=ordered) to write out every image written so far, which stalled runs 3x on this machine.
            f.flush()
            offsets[key] = f.tell()
        state = {"fingerprint": self.fingerprint, "rows_done": self.rows_done, "offsets": offsets,
                 "counts": self.counts, "duplicate_images": self.duplicate_images}
        self.db.executemany("INSERT OR REPLACE INTO state VALUES (?, ?)",
                            [(k, json.dumps(v)) for k, v in state.items()])
        self.db.execute("COMMIT")  # the checkpoint: output bytes up to `offsets` and the index agree
        self.db.execute("BEGIN")

    def discard(self) -> None:
        """Remove what a run that committed no row created (the folder itself only when it is left empty)."""
        self.db.close()
        for f in self.files.values():
            f.close()
        for path in (*self.paths.values(), self.out / STATE_FILE):
            path.unlink(missing_ok=True)
        for folder in (self.out / "images", self.out):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()

    def finish(self, cfg: PrepareConfig, deid: dict | None) -> dict:
        similar = self._distribute(cfg.near_threshold, cfg.val_ratio) if "staged" in self.files else {}
        for split in SPLITS:
            if self.fmt == "json":
                self.files[split].write(b"\n]\n" if self.counts[split] else b"[]\n")
        for f in self.files.values():
            f.close()
        for split in SPLITS:
            os.replace(self.paths[split], self.out / self.names[split])
        os.replace(self.paths["rejects"], self.out / "rejects.jsonl")
        info = {f"radscribe_{s}": {"file_name": self.names[s], **SHAREGPT_ENTRY} for s in SPLITS}
        _write_json(self.out / "dataset_info.json", info)
        if deid is not None:
            _write_json(self.out / "deid_report.json", deid)
        reasons = dict(sorted(self.db.execute("SELECT reason, n FROM reasons").fetchall()))
        rejects = sum(reasons.values())
        groups = {split: self.db.execute("SELECT COUNT(*) FROM groups WHERE split = ?", (split,)).fetchone()[0]
                  for split in SPLITS}
        both = self.db.execute("SELECT COUNT(*) FROM (SELECT key FROM groups GROUP BY key HAVING COUNT(*) > 1)")
        images_stored = self.db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        summary = {
            "input_rows": self.rows_done, "train": self.counts["train"], "val": self.counts["val"],
            "rejects": rejects, "reasons": reasons,
            "images_stored": images_stored, "duplicate_image_rows": self.duplicate_images,
            "split": {"val_ratio": cfg.val_ratio, "group_by": cfg.group_by,
                      "train_groups": groups["train"], "val_groups": groups["val"],
                      "val_fraction": round(self.counts["val"] / max(1, self.counts["train"] + self.counts["val"]), 4),
                      "groups_on_both_sides": both.fetchone()[0], **similar},
            "arguments": {k: v for k, v in asdict(cfg).items()
                          if k not in ("workers", "chunk_rows", "key", "out", "overwrite")},
            "fingerprint": self.fingerprint,
        }
        assert summary["train"] + summary["val"] + rejects == summary["input_rows"], "a row was lost"
        # summary.json last: its presence marks the folder finished (the no-op rerun check).
        _write_json(self.out / "summary.json", summary)
        self.db.execute("COMMIT")
        self.db.close()
        for path in (self.out / STATE_FILE, self.paths.get("staged"), self.paths.get("hashes")):
            if path is not None:
                path.unlink(missing_ok=True)
        return summary


def _sha12_of(name: str) -> str:
    """`<id>-<sha12>.<ext>` -> sha12."""
    return name.rsplit("-", 1)[1].split(".")[0]


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
