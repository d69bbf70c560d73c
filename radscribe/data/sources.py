"""Readers that yield rows: MedTrinity-25M parquet (`25M_demo` and `25M_full` layouts).

DICOM/NIfTI folders with a reports CSV are read by `radscribe.data.medical` and yield the same `Row`.
"""

from __future__ import annotations

import glob
import itertools
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
    """Group key for the split (patient/source/volume), when the source knows one (`--group-by similar` sets it
    in `prepare`, from all the images)."""
    truth: dict = field(default_factory=dict)
    """Ground-truth finding fields (synthetic data)."""
    reject: str | None = None
    """Set by a source that already knows the row is unusable (e.g. burned-in annotation); the reason."""


# Ground-truth columns of `radscribe synth` (docs/architecture.md); copied into `Row.truth` when present.
TRUTH_COLUMNS = ("modality", "organ", "location", "density", "size", "area_pct", "finding")
DEMO_COLUMNS = ("image", "caption")  # 25M_demo: image struct (bytes + path), id, caption
FULL_COLUMNS = ("file_name", "caption")  # 25M_full: file_name, caption, source; images in a folder
GROUP_COLUMNS = ("patient", "source")
"""`--group-by` values that name a parquet column; `SIMILAR` groups near-duplicate images; anything else is a regex."""
SIMILAR = "similar"
NO_GROUP = "no group key"
"""The reject reason of a row that carries no key for the requested grouping."""
GROUP_SAMPLE_ROWS = 64
"""Rows of each file's first row group that `check_grouping` reads before anything is written."""


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


@dataclass(frozen=True)
class RowGroup:
    """One parquet row group: the unit `prepare` reads, verifies and checkpoints (memory ~ one row group)."""

    path: str
    """The parquet file."""
    group: int
    """Row-group number inside the file."""
    first_index: int
    """Index in the file of the group's first row."""
    num_rows: int
    """Rows in the group (from the footer)."""
    layout: str
    """`demo` or `full` (see `check_schema`)."""


def row_groups(inputs: str | Path | list, images_dir: str | None = None) -> list[RowGroup]:
    """Every row group of the inputs, in order, from the parquet footers alone (no data read)."""
    import pyarrow.parquet as pq

    units = []
    for path in parquet_files(inputs):
        layout = check_schema(path, images_dir)
        meta = pq.ParquetFile(path).metadata
        first = 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            units.append(RowGroup(str(path), g, first, n, layout))
            first += n
    return units


_RESOLVERS: dict[str, "_ImageResolver"] = {}


def read_row_group(unit: RowGroup, images_dir: str | None = None, group_by: str | None = None) -> Iterator[Row]:
    """Stream the `Row`s of one row group, a few at a time.

    `25M_demo`: `image` (struct of bytes + path, or binary), `id`, `caption`. `25M_full`: `file_name`, `caption`,
    `source`, the image read from `images_dir / file_name`. `group_by` fills `Row.group`: `source`, `patient`, or
    a regex searched in the file name (its first group if it has one, else the whole match).
    """
    import pyarrow.parquet as pq

    # No pre-buffering and small batches: a row group of large images is never held whole in memory.
    pf = pq.ParquetFile(unit.path, pre_buffer=False, buffer_size=1 << 20)
    names = set(pf.schema_arrow.names)
    columns = [c for c in ("image", "id", "caption", "file_name", "source", "patient", *TRUTH_COLUMNS) if c in names]
    pattern = group_pattern(group_by)
    resolver = None
    if unit.layout == "full":
        # One resolver per process: its base-name index of the images folder is built at most once.
        resolver = _RESOLVERS.get(images_dir) or _RESOLVERS.setdefault(images_dir, _ImageResolver(images_dir))
    index = unit.first_index
    for batch in pf.iter_batches(batch_size=32, row_groups=[unit.group], columns=columns, use_threads=False):
        # Column by column: ~4x cheaper than converting struct rows to dicts.
        data = {}
        for name in columns:
            column = batch.column(name)
            if name == "image" and hasattr(column.type, "get_field_index"):
                data["image"] = column.field("bytes").to_pylist()
                data["image_path"] = column.field("path").to_pylist() if column.type.get_field_index("path") >= 0 \
                    else [None] * batch.num_rows
                data["image_null"] = column.is_null().to_pylist()
            else:
                data[name] = column.to_pylist()
        for i in range(batch.num_rows):
            rec = {name: values[i] for name, values in data.items()}
            yield _row(rec, unit.layout, unit.path, index, pattern, group_by, resolver)
            index += 1


def medtrinity_rows(inputs: str | Path | list, images_dir: str | None = None, group_by: str | None = None,
                    start: int = 0) -> Iterator[Row]:
    """Stream `Row`s from MedTrinity-25M-shaped parquet, one row group at a time (memory stays flat).

    `start` skips that many rows using the parquet footers, so a resumed run does not re-read them.
    """
    group_pattern(group_by)  # a bad regex fails before any reading
    for unit in row_groups(inputs, images_dir):
        if start >= unit.num_rows:
            start -= unit.num_rows
            continue
        yield from itertools.islice(read_row_group(unit, images_dir, group_by), start, None)
        start = 0


def group_pattern(group_by: str | None) -> re.Pattern | None:
    """The compiled regex of a `--group-by` that is one; None for no grouping, a column name or `similar`."""
    if group_by is None or group_by in GROUP_COLUMNS or group_by == SIMILAR:
        return None
    if not group_by:
        raise RadscribeError(f"--group-by is empty; give {', '.join(GROUP_COLUMNS)}, {SIMILAR} or a regex on the "
                             f"file name")
    try:
        return re.compile(group_by)
    except re.error as err:
        raise RadscribeError(f"--group-by {group_by!r} is neither {'/'.join(GROUP_COLUMNS)}/{SIMILAR} nor a valid "
                             f"regex ({err})") from None


def check_grouping(units: list[RowGroup], group_by: str | None) -> None:
    """One line naming what was looked for when `group_by` can find no group in a file: the column is missing, or
    empty in the file's first rows, or the regex matches none of its first file names. Reads the footers and one
    small column of each file's first row group, so a silent row-level split never starts."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    pattern = group_pattern(group_by)
    if group_by is None or group_by == SIMILAR:
        return
    firsts: dict[str, RowGroup] = {}
    for unit in units:
        firsts.setdefault(unit.path, unit)
    for unit in firsts.values():
        pf = pq.ParquetFile(unit.path)
        if pattern is None:
            names = pf.schema_arrow.names
            if group_by not in names:
                raise RadscribeError(f"--group-by {group_by}: {unit.path} has no `{group_by}` column (it has "
                                     f"{', '.join(names)}); for data that names no patients, such as MedTrinity "
                                     f"25M_demo, use --group-by {SIMILAR} (near-duplicate images) or a regex on "
                                     f"the file name")
            column = group_by
        elif unit.layout == "full":
            column = "file_name"
        elif hasattr(pf.schema_arrow.field("image").type, "get_field_index") and \
                pf.schema_arrow.field("image").type.get_field_index("path") >= 0:
            column = "image.path"
        else:
            raise RadscribeError(f"--group-by {group_by!r}: {unit.path} stores no file names (its `image` column has "
                                 f"no `path`) for the regex to search; use --group-by {SIMILAR}")
        values = pf.read_row_group(unit.group, columns=[column]).column(0)
        if column == "image.path":
            values = pc.struct_field(values, "path")
        sample = [v for v in values.slice(0, GROUP_SAMPLE_ROWS).to_pylist() if v]
        if pattern is None and not sample:
            raise RadscribeError(f"--group-by {group_by}: the `{group_by}` column of {unit.path} is empty in its "
                                 f"first {min(len(values), GROUP_SAMPLE_ROWS)} rows")
        if pattern is not None and not any(pattern.search(name) for name in sample):
            seen = f"(e.g. {sample[0]!r})" if sample else "(they are empty)"
            raise RadscribeError(f"--group-by {group_by!r} matches none of the first "
                                 f"{min(len(values), GROUP_SAMPLE_ROWS)} file names of {unit.path} {seen}; the "
                                 f"regex is searched in the file name and its first group (else the whole match) "
                                 f"is the group")


def missing_group(group_by: str) -> str:
    """The ledger's detail for a row without a group key (reason `NO_GROUP`)."""
    if group_by in GROUP_COLUMNS:
        return f"--group-by {group_by}: the row's `{group_by}` is empty"
    return f"--group-by {group_by!r} does not match the row's file name"


def _row(rec: dict, layout: str, source: str, index: int, pattern, group_by, resolver) -> Row:
    reject = None
    if layout == "demo":
        image = None if rec.get("image_null") else rec.get("image")
        file_name = rec.get("image_path")
        row_id = rec.get("id") or (Path(file_name).stem if file_name else None)
    else:
        file_name = rec.get("file_name")
        image, reject = resolver.read(file_name)
        row_id = Path(file_name).stem if file_name else None
    truth = {c: rec[c] for c in TRUTH_COLUMNS if c in rec}
    group = None
    if group_by in GROUP_COLUMNS:
        group = rec.get(group_by) or None
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
