"""Readers that yield rows: MedTrinity-25M parquet (`25M_demo` and `25M_full` layouts).

DICOM/NIfTI folders with a reports CSV are read by `radscribe.data.medical` and yield the same `Row`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
