"""DICOM / NIfTI folders plus a reports CSV -> `Row`s for `radscribe prepare`, with PHI removed.

Run as: radscribe prepare --dicom DIR --reports reports.csv [--window auto|multi|brain|…] [--slices middle|all|every:N]

Every chosen slice becomes one `Row` whose image is a PNG re-encoded from the windowed pixels (no DICOM
header survives), whose id and group are keyed-hash pseudonyms unless `keep_ids`, and whose caption is the
report text from the CSV. Unusable inputs (burned-in annotation, unreadable file, missing report, compressed
pixel data without a decoder, CSV rows with no file) are yielded as rejects so that every input is accounted for.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MedicalOptions:
    """What `radscribe prepare` reads from medical folders and how it turns them into rows."""

    dicom: str | None = None
    """Folder searched recursively for DICOM files (by the `DICM` preamble or a .dcm suffix)."""
    nifti: str | None = None
    """Folder searched recursively for .nii / .nii.gz volumes (needs the `radscribe[nifti]` extra)."""
    reports: str | None = None
    """CSV with one report per image/study: a join column (see `id_key`), `report`, and optionally `patient`."""
    window: str = "auto"
    """Display window: `auto` (the file's WindowCenter/WidthWidth, else min/max; NIfTI: header cal range, else
    0.5-99.5 percentiles), `multi` (three CT windows stacked into RGB), or a preset name from
    `radscribe.data.imaging.WINDOWS` (brain, subdural, stroke, lung, mediastinum, soft_tissue, liver, bone)."""
    slices: str = "middle"
    """Which slices of a volume become rows: `middle`, `all`, or `every:N` (every Nth slice)."""
    keep_ids: bool = False
    """Keep the source ids (file paths, patient ids) instead of keyed-hash pseudonyms. Only for data with no PHI."""
    allow_burned_in: bool = False
    """Accept images whose Burned In Annotation (0028,0301) is YES (PHI may be in the pixels); else reject them."""
    id_key: str | None = None
    """CSV column to join reports on: a file path column (relative to the folder), or StudyInstanceUID,
    SeriesInstanceUID or SOPInstanceUID. None: `file`/`path` if the CSV has one, else the first UID column."""
    key: str | None = None
    """Secret for the HMAC-SHA256 pseudonyms. None: env RADSCRIBE_DEID_KEY, else a random key created once in
    ~/.config/radscribe/deid.key (outside the dataset, so reruns/resume give the same pseudonyms)."""
