"""Hostile inputs built in code: decompression-bomb DICOMs and the like (tests and bench/serve_hostile.py).

Nothing here is stored: every bomb is generated, a few KB to a few MB on the wire, inflating to as much as asked.
"""

from __future__ import annotations

import io
import zlib

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

MIB = 1 << 20


def ct_dataset(rows: int = 64, columns: int = 64, frames: int = 1, pixels: bool = True) -> Dataset:
    """A small, valid 16-bit CT dataset (explicit VR little endian) with a gradient image."""
    import numpy as np

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, 1
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    if pixels:
        image = (np.arange(rows * columns, dtype=np.int32) % 2000).astype("<i2").reshape(rows, columns)
        ds.PixelData = np.repeat(image[None], frames, axis=0).tobytes()
    return ds


def deflated(ds: Dataset) -> bytes:
    """`ds` written with the Deflated Explicit VR Little Endian transfer syntax (by pydicom itself)."""
    ds = ds.copy()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _explicit_le(ds: Dataset) -> bytes:
    buf = pydicom.filebase.DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def _element_header(group: int, element: int, vr: bytes, length: int) -> bytes:
    return (group.to_bytes(2, "little") + element.to_bytes(2, "little") + vr + b"\0\0"
            + length.to_bytes(4, "little"))


def deflate_bomb(inflated_mib: int, kind: str = "trailer", rows: int = 64, columns: int = 64) -> bytes:
    """A Deflated Explicit VR Little Endian DICOM whose dataset inflates to about `inflated_mib` MiB of zeros.

    kind: "trailer" (a valid 64x64 image, then trailing padding (FFFC,FFFC) of that size), "header" (a private
    OB element of that size before the pixel data), "pixels" (a header announcing rows x columns pixels, whose
    pixel data is that many zeros). The zeros are compressed once per MiB with a full flush, so the same bytes
    can be repeated: building a 10 GiB bomb takes milliseconds.
    """
    header = ct_dataset(rows, columns, pixels=False)
    size = min(inflated_mib * MIB, 0xFFFFFFF0)  # an element is at most 4 GiB; zeros past it parse as more elements
    if kind == "trailer":
        pixels = rows * columns * 2
        prefix = _explicit_le(header) + _element_header(0x7FE0, 0x0010, b"OW", pixels) + b"\0" * pixels
        prefix += _element_header(0xFFFC, 0xFFFC, b"OB", size)
    elif kind == "header":
        prefix = _explicit_le(header) + _element_header(0x0009, 0x1010, b"OB", size)
    elif kind == "pixels":
        prefix = _explicit_le(header) + _element_header(0x7FE0, 0x0010, b"OW", size)
    else:
        raise ValueError(f"unknown bomb kind {kind!r}")
    meta = io.BytesIO()
    meta.write(b"\0" * 128 + b"DICM")
    file_meta = FileMetaDataset(header.file_meta)
    file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    write_file_meta_info(meta, file_meta, enforce_standard=True)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    start = packer.compress(prefix) + packer.flush(zlib.Z_FULL_FLUSH)
    zeros = b"\0" * MIB
    block = packer.compress(zeros) + packer.flush(zlib.Z_FULL_FLUSH)
    again = packer.compress(zeros) + packer.flush(zlib.Z_FULL_FLUSH)
    assert block == again, "a full flush should make each MiB of zeros compress to the same bytes"
    return meta.getvalue() + start + block * inflated_mib + packer.flush()


def non_numeric_dicom(keyword: str, text: str = "abc") -> bytes:
    """CT_small-like data whose numeric attribute `keyword` (a DS/IS one) holds `text` (implicit VR on disk)."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    ds = ct_dataset()
    tag = tag_for_keyword(keyword)
    assert dictionary_VR(tag) in ("DS", "IS")
    ds.add_new(tag, "LO", text)  # LO accepts any text; on disk (implicit VR) the dictionary's DS/IS is read back
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
