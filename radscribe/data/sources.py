"""Readers that yield rows: MedTrinity-25M parquet (`25M_demo` and `25M_full` layouts).

DICOM/NIfTI folders with a reports CSV are read by `radscribe.data.medical` and yield the same `Row`.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from radscribe.errors import RadscribeError


@dataclass
class Row:
    """One input row, as every source yields it; `prepare` turns it into a dataset row or a reject."""

    id: str | None
    """The row id as the source gives it (sanitised later, never trusted as a path)."""
    image: bytes | None
    """Encoded image bytes exactly as stored (JPEG/PNG are copied byte-exact); None when missing."""
    caption: str | None
    """The report text."""
    source: str
    """The input file this row came from (for the rejects ledger)."""
    index: int
    """The row's position in that file (for the rejects ledger)."""
    group: str | None = None
    """Group key for the split (patient/source/volume), when the source knows one."""
    truth: dict = field(default_factory=dict)
    """Ground-truth finding fields (synthetic data)."""
    reject: str | None = None
    """Set by a source that already knows the row is unusable (e.g. burned-in annotation); the reason."""


# Ground-truth columns of `radscribe synth` (docs/architecture.md); copied into `Row.truth` when present.
TRUTH_COLUMNS = ("modality", "organ", "location", "density", "size", "area_pct", "finding")
DEMO_COLUMNS = ("image", "caption")  # 25M_demo: image struct (bytes + path), id, caption
FULL_COLUMNS = ("file_name", "caption")  # 25M_full: file_name, caption, source; images in a folder
BATCH_ROWS = 256


def parquet_files(inputs: str | Path | list) -> list[Path]:
    """A parquet file, a glob, a folder (searched recursively) or a list of these -> sorted parquet files."""
    items = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    files: list[Path] = []
    for item in items:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            found = sorted(path.rglob("*.parquet"))
        elif any(ch in text for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(text, recursive=True) if p.endswith(".parquet"))
        elif path.is_file():
            found = [path]
        else:
            raise RadscribeError(f"input {text} does not exist (give a parquet file, a glob or a folder)")
        if not found:
            raise RadscribeError(f"input {text} holds no .parquet files")
        files.extend(found)
    return files


def count_rows(files: list[Path]) -> int:
    """Total rows from the parquet footers (no data read)."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def check_schema(path: Path, images_dir: str | None) -> str:
    """`demo` or `full` for a parquet file's columns; a one-line error naming the file and missing columns."""
    import pyarrow.parquet as pq

    try:
        names = set(pq.ParquetFile(path).schema_arrow.names)
    except Exception as err:  # pyarrow raises several types for a file that is not parquet
        raise RadscribeError(f"{path}: not a readable parquet file ({err})") from None
    if all(c in names for c in DEMO_COLUMNS):
        return "demo"
    if all(c in names for c in FULL_COLUMNS):
        if not images_dir:
            raise RadscribeError(f"{path}: 25M_full layout (file_name, caption) needs --images DIR with the images")
        return "full"
    missing_demo = [c for c in DEMO_COLUMNS if c not in names]
    missing_full = [c for c in FULL_COLUMNS if c not in names]
    raise RadscribeError(f"{path}: missing column(s) {', '.join(missing_demo)} (25M_demo layout) or "
                         f"{', '.join(missing_full)} (25M_full layout); found: {', '.join(sorted(names))}")


def medtrinity_rows(inputs: str | Path | list, images_dir: str | None = None, group_by: str | None = None,
                    start: int = 0) -> Iterator[Row]:
    """Stream `Row`s from MedTrinity-25M-shaped parquet, one record batch at a time (memory stays flat).

    `25M_demo`: `image` (struct of bytes + path, or binary), `id`, `caption`. `25M_full`: `file_name`, `caption`,
    `source`, with the image read from `images_dir / file_name`. `group_by` fills `Row.group`: `source`,
    `patient`, or a regular expression searched in the file name (its first group if it has one, else the match).
    `start` skips that many rows using the parquet footers, so a resumed run does not re-read them.
    """
    import pyarrow.parquet as pq

    files = parquet_files(inputs)
    layouts = [check_schema(f, images_dir) for f in files]
    pattern = _group_pattern(group_by)
    resolver = _ImageResolver(images_dir) if images_dir else None
    for path, layout in zip(files, layouts):
        pf = pq.ParquetFile(path)
        if start >= pf.metadata.num_rows:
            start -= pf.metadata.num_rows
            continue
        names = set(pf.schema_arrow.names)
        # Skip whole row groups from the footer, then the remainder inside the first group read.
        groups, offset = [], 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset + n > start:
                groups.append(g)
            offset += n
        first_index = sum(pf.metadata.row_group(g).num_rows for g in range(groups[0])) if groups else 0
        skip = start - first_index
        start = 0
        columns = [c for c in ("image", "id", "caption", "file_name", "source", "patient", *TRUTH_COLUMNS)
                   if c in names]
        index = first_index
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=groups, columns=columns):
            data = batch.to_pydict()
            for i in range(batch.num_rows):
                if skip:
                    skip -= 1
                    index += 1
                    continue
                rec = {c: data[c][i] for c in columns}
                yield _row(rec, layout, str(path), index, pattern, group_by, resolver)
                index += 1


def _group_pattern(group_by: str | None) -> re.Pattern | None:
    if group_by in (None, "", "source", "patient", "id"):
        return None
    try:
        return re.compile(group_by)
    except re.error as err:
        raise RadscribeError(f"--group-by {group_by!r} is neither source/patient nor a valid regex ({err})") from None


def _row(rec: dict, layout: str, source: str, index: int, pattern, group_by, resolver) -> Row:
    reject = None
    if layout == "demo":
        image = rec.get("image")
        file_name = None
        if isinstance(image, dict):
            file_name = image.get("path")
            image = image.get("bytes")
        row_id = rec.get("id") or (Path(file_name).stem if file_name else None)
    else:
        file_name = rec.get("file_name")
        image, reject = resolver.read(file_name)
        row_id = Path(file_name).stem if file_name else None
    truth = {c: rec[c] for c in TRUTH_COLUMNS if c in rec}
    group = None
    if group_by == "source":
        group = rec.get("source")
    elif group_by == "patient":
        group = rec.get("patient")
    elif pattern is not None and file_name:
        match = pattern.search(file_name)
        if match:
            group = match.group(1) if match.groups() else match.group(0)
    return Row(id=None if row_id is None else str(row_id), image=image, caption=rec.get("caption"), source=source,
               index=index, group=group, truth=truth, reject=reject)


class _ImageResolver:
    """Finds `file_name` under the 25M_full images folder: the direct path, else by base name (indexed once)."""

    def __init__(self, images_dir: str):
        self.root = Path(images_dir).resolve()
        if not self.root.is_dir():
            raise RadscribeError(f"--images {images_dir} is not a folder")
        self._by_name: dict[str, str] | None = None

    def read(self, file_name: str | None) -> tuple[bytes | None, str | None]:
        if not file_name:
            return None, "missing file_name"
        direct = (self.root / file_name).resolve()
        # A file name is data, never a path that may leave the images folder.
        if direct.is_relative_to(self.root) and direct.is_file():
            return direct.read_bytes(), None
        if self._by_name is None:
            self._by_name = {}
            for folder, _, names in os.walk(self.root):
                for name in names:
                    self._by_name.setdefault(name, os.path.join(folder, name))
        found = self._by_name.get(Path(file_name).name)
        if found is None:
            return None, "missing image file"
        return Path(found).read_bytes(), None
