"""The one image loader: JPEG/PNG/WebP, DICOM (Hounsfield units + windowing) and NIfTI, as display-ready RGB.

Used by `prepare` (medical folders, via `radscribe.data.medical`), the generation engine, `chat`, the API and the
web page, so a DICOM upload is windowed on the server exactly as training data was:

    load_image("scan.dcm", window="lung")             # one PIL RGB image
    load_image(upload_bytes, name="head.nii.gz")       # format sniffed from the content, name only helps
    load_slices("vol.nii.gz", slices="every:4")        # [(slice index, image), ...] for volumes

The format is detected from the content (JPEG/PNG/WebP magic, the DICOM `DICM` preamble, the NIfTI header
magic, gzip), falling back to the suffix (.dcm, .nii, .nii.gz) for DICOM files written without a preamble.
Windows apply to DICOM and NIfTI only; JPEG/PNG/WebP are display images already and are returned as they are.
See docs/medical.md for the window table, its sources and the orientation convention.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from radscribe.errors import RadscribeError

WINDOWS: dict[str, tuple[float, float]] = {
    # name: (center, width) in Hounsfield units. Sources in docs/medical.md (Radiopaedia "Windowing (CT)").
    "brain": (40, 80),
    "subdural": (80, 200),
    "stroke": (40, 40),
    "lung": (-600, 1500),
    "mediastinum": (50, 350),
    "soft_tissue": (40, 400),
    "liver": (90, 150),
    "bone": (400, 1800),
}

# window="multi": one CT window per RGB channel, chosen to span body CT (soft tissue, air, bone).
MULTI_WINDOW: tuple[str, str, str] = ("soft_tissue", "lung", "bone")

# Volumes (NIfTI, multi-frame DICOM) with more voxels are refused before reading pixels: 512^3 fits, as float32
# 512 MiB. A NIfTI given as bytes (an upload) may inflate to at most MAX_NIFTI_BYTES.
MAX_VOXELS = 512 ** 3
MAX_NIFTI_BYTES = 1 << 30

# Larger images are refused before decoding (a decompression bomb, or a scan no VLM should see whole):
# 8192 x 8192 covers mammography and whole-slide thumbnails.
MAX_PIXELS = 8192 * 8192

PIL_FORMATS = ("JPEG", "PNG", "WEBP")
COMPRESSED_EXTRA = "pip install 'radscribe[dicom-compressed]' (pylibjpeg) or python-gdcm"
NIFTI_EXTRA = "pip install 'radscribe[nifti]'"

Source = str | Path | bytes


# --- format detection --------------------------------------------------------------------------------------
def sniff_format(source: Source, name: str | None = None) -> str:
    """'image' (JPEG/PNG/WebP), 'dicom' or 'nifti', from the first bytes, else the (file) name's suffix."""
    head = _head(source, 352)
    label = (name or (str(source) if not isinstance(source, bytes) else "")).lower()
    if head[:3] == b"\xff\xd8\xff" or head[:8] == b"\x89PNG\r\n\x1a\n" or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    if head[128:132] == b"DICM":
        return "dicom"
    if head[:2] == b"\x1f\x8b":
        # gzip: NIfTI is the only gzipped format we read; look at the header inside.
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(_head(source, 4096), 352)
        except zlib.error:
            head = b""
    if _is_nifti_header(head):
        return "nifti"
    if label.endswith((".nii", ".nii.gz")):
        return "nifti"
    if label.endswith((".dcm", ".dicom")):
        return "dicom"
    return "unknown"


def _is_nifti_header(head: bytes) -> bool:
    if len(head) < 348:
        return False
    sizes = {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")}
    return (348 in sizes and head[344:348] in (b"n+1\x00", b"ni1\x00")) or (540 in sizes and head[4:8] in (b"n+2\x00", b"ni2\x00"))


def _head(source: Source, n: int) -> bytes:
    if isinstance(source, bytes):
        return source[:n]
    try:
        with open(source, "rb") as f:
            return f.read(n)
    except OSError as err:
        raise RadscribeError(f"{source}: cannot read the image file ({err.strerror or err})") from None


def _label(source: Source, name: str | None) -> str:
    return name or (f"<{len(source)} bytes>" if isinstance(source, bytes) else str(source))


# --- the public loaders --------------------------------------------------------------------------------------
def load_image(source: Source, window: str | tuple[float, float] | None = None, slice: str | int = "middle",
               *, name: str | None = None, plane: str = "axial") -> Image.Image:
    """One RGB image from a path or bytes. For volumes `slice` is "middle" or a slice index (after reorientation).

    `window`: None or "auto" (the file's own window; see `auto_window`), "multi" (`MULTI_WINDOW` into RGB),
    a `WINDOWS` name, or a (center, width) pair. `name` labels bytes in errors and helps sniff a .dcm without
    preamble. `plane` (axial|coronal|sagittal) applies to NIfTI volumes.
    """
    if isinstance(slice, int):
        return _load(source, window, lambda n: [_check_index(slice, n, source, name)], name, plane)[0][1]
    if slice != "middle":
        raise RadscribeError(f"load_image: slice must be 'middle' or an index, got {slice!r} (use load_slices)")
    return load_slices(source, window, "middle", name=name, plane=plane)[0][1]


def load_slices(source: Source, window: str | tuple[float, float] | None = None, slices: str = "middle",
                *, name: str | None = None, plane: str = "axial") -> list[tuple[int, Image.Image]]:
    """[(slice index, RGB image)] for the slices chosen by `slices` ("middle", "all", "every:N")."""
    return _load(source, window, lambda n: choose_slices(n, slices), name, plane)


def _load(source, window, choose, name, plane):
    kind = sniff_format(source, name)
    if kind == "image":
        # JPEG/PNG/WebP are display images already: there are no Hounsfield units for a window to act on.
        return [(0, _load_pil(source, name))]
    if kind == "dicom":
        ds = read_dicom(source, name=name)
        return dicom_images(ds, window, choose, label=_label(source, name))
    if kind == "nifti":
        return nifti_images(source, window, choose, name=name, plane=plane)
    raise RadscribeError(f"{_label(source, name)}: not a JPEG, PNG, WebP, DICOM or NIfTI image")


def choose_slices(n: int, spec: str) -> list[int]:
    """Indices of the slices to keep out of n: "middle" -> [n // 2], "all", "every:N" -> 0, N, 2N, ..."""
    if spec == "middle":
        return [n // 2]
    if spec == "all":
        return list(range(n))
    if spec.startswith("every:"):
        step = spec[len("every:"):]
        if step.isdigit() and int(step) > 0:
            return list(range(0, n, int(step)))
    raise RadscribeError(f"slices {spec!r} is not one of middle, all, every:N (N a positive integer)")


def _check_index(index: int, n: int, source, name) -> int:
    if not -n <= index < n:
        raise RadscribeError(f"{_label(source, name)}: slice {index} is out of range (the volume has {n} slices)")
    return index % n


# --- JPEG / PNG / WebP ----------------------------------------------------------------------------------------
def _load_pil(source: Source, name: str | None) -> Image.Image:
    label = _label(source, name)
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():
            # PIL only warns between its limit and twice it; above our own lower limit anyway, so refuse.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(fp, formats=PIL_FORMATS)
        with im:
            if im.width * im.height > MAX_PIXELS:
                raise RadscribeError(f"{label}: {im.width}x{im.height} pixels is over the limit of {MAX_PIXELS}")
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                # 16-bit/float PNGs (exported scans): PIL's convert would clip at 255, so stretch to 8 bits.
                arr = np.asarray(im, dtype=np.float64)
                return _gray_to_rgb(_range_window(arr, float(arr.min()), float(arr.max())))
            return im.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RadscribeError(f"{label}: image is over the decompression-bomb pixel limit") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise RadscribeError(f"{label}: cannot decode the image ({err})") from None


# --- windowing ----------------------------------------------------------------------------------------------
def apply_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear VOI window of DICOM PS3.3 C.11.2.1.2.1 -> uint8: below the window 0, above it 255, center ~128."""
    if width < 1:
        raise RadscribeError(f"window width must be >= 1, got {width}")
    x = np.asarray(values, dtype=np.float64)
    low = center - 0.5 - (width - 1) / 2
    y = ((x - (center - 0.5)) / (width - 1 if width > 1 else 1) + 0.5) * 255.0
    y = np.where(x <= low, 0.0, np.where(x > low + (width - 1), 255.0, y))
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def _range_window(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly onto 0..255 (data-derived ranges: min/max, percentiles, NIfTI cal range)."""
    x = np.asarray(values, dtype=np.float64)
    if high <= low:
        return np.zeros(x.shape, dtype=np.uint8)
    return np.clip(np.rint((x - low) / (high - low) * 255.0), 0, 255).astype(np.uint8)


def _windowed(values: np.ndarray, window, auto: tuple[str, float, float], label: str) -> np.ndarray:
    """Window a 2-D array -> (H, W, 3) uint8. `auto` is ("center", c, w) or ("range", low, high)."""
    if window in (None, "auto"):
        how, a, b = auto
        gray = apply_window(values, a, b) if how == "center" else _range_window(values, a, b)
        return np.repeat(gray[..., None], 3, axis=2)
    if window == "multi":
        return np.stack([apply_window(values, *WINDOWS[w]) for w in MULTI_WINDOW], axis=2)
    center, width = _named_window(window, label)
    return np.repeat(apply_window(values, center, width)[..., None], 3, axis=2)


def _named_window(window, label: str) -> tuple[float, float]:
    if isinstance(window, (tuple, list)) and len(window) == 2:
        return float(window[0]), float(window[1])
    if isinstance(window, str) and window in WINDOWS:
        return WINDOWS[window]
    known = ", ".join(["auto", "multi", *WINDOWS])
    raise RadscribeError(f"{label}: unknown window {window!r}; known: {known} (or a (center, width) pair)")


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=2), mode="RGB")


# --- DICOM -------------------------------------------------------------------------------------------------
# Every DICOM read here may be of an untrusted file (uploads, folders from elsewhere), so nothing is decoded or
# inflated before its size is known: a Deflated Explicit VR Little Endian dataset is inflated by us, first only
# as far as its header and then only as far as the pixel data it announces (pydicom would inflate the whole stream
# before parsing anything: FIELD_NOTES, ~1 MB became 1 GB), and compressed pixel data is decoded only after every
# frame's own codestream header agrees with the Rows x Columns x Samples the dataset announces.
MAX_DICOM_HEADER_BYTES = 4 << 20
"""Most bytes a deflated dataset may inflate to before its pixel data starts."""
DICOM_TRAILER_BYTES = 64 << 10
"""Bytes a deflated dataset may hold after its pixel data (trailing padding, signatures)."""
_FILE_META_BYTES = 128 + 4 + (64 << 10)  # preamble, "DICM", and a file meta group far larger than any real one


class DecodeLimitError(RadscribeError):
    """An image over a decoding limit (pixels, samples or inflated bytes): refused before the work is done."""


def read_dicom(source: Source, *, name: str | None = None, header_only: bool = False):
    """pydicom Dataset from a path or bytes (force=True so files without the 128-byte preamble read too).

    Deflated datasets are inflated within `MAX_DICOM_HEADER_BYTES` (header) and the size the header announces
    (pixels); past either a `DecodeLimitError` is raised.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    label = _label(source, name)
    fp = io.BytesIO(source) if isinstance(source, bytes) else None
    try:
        if fp is None:
            fp = open(source, "rb")
        with fp:
            meta, body_start = _dicom_file_meta(fp, label)
            fp.seek(0)
            if meta.get("TransferSyntaxUID") == pydicom.uid.DeflatedExplicitVRLittleEndian:
                return _read_deflated(fp, meta, body_start, header_only, label)
            return pydicom.dcmread(fp, force=True, stop_before_pixels=header_only)
    except RadscribeError:
        raise
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError, IndexError,
            OverflowError, NotImplementedError, RecursionError, struct.error, zlib.error) as err:
        # pydicom raises all of these for malformed headers (RecursionError: sequences nested thousands deep).
        raise RadscribeError(f"{label}: not a readable DICOM file ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''})") from None


def _dicom_file_meta(fp, label: str):
    """The file meta group (0002,xxxx) and where the dataset starts, read from the first bytes only.

    These are the two calls `pydicom.dcmread` itself begins with (pydicom 3.0 `read_partial`), so the transfer
    syntax we act on is the one pydicom would act on; they are not public API, hence the version pin.
    """
    from pydicom.filereader import _read_file_meta_info, read_preamble

    head = io.BytesIO(fp.read(_FILE_META_BYTES))
    read_preamble(head, True)
    meta = _read_file_meta_info(head)
    if head.tell() >= _FILE_META_BYTES:
        raise RadscribeError(f"{label}: the DICOM file meta group is over {_FILE_META_BYTES - 132} bytes")
    return meta, head.tell()


class _Inflater:
    """A raw deflate stream (PS3.5 A.5) inflated into `out` on demand, never past the length asked for."""

    def __init__(self, fp, out: io.BytesIO):
        self.fp, self.out = fp, out
        self.start = out.tell()
        self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
        self._pending = b""

    @property
    def size(self) -> int:
        return self.out.tell() - self.start

    def fill(self, limit: int) -> bool:
        """Inflate until the stream ends (True) or `limit` bytes are out and more would follow (False)."""
        while not self._zlib.eof:
            room = limit - self.size
            if not self._pending:
                self._pending = self.fp.read(1 << 16)
                if not self._pending:
                    raise RadscribeError("the deflated dataset is truncated")
            # max_length caps what one call may produce however small the input (0 would mean no cap).
            piece = self._zlib.decompress(self._pending, max(room, 1))
            self._pending = self._zlib.unconsumed_tail
            self.out.write(piece)  # at most one byte past the limit, kept for a later, larger fill
            if room <= 0 and piece:
                return False  # the stream goes on past the limit
        return True


def _read_deflated(fp, meta, body_start: int, header_only: bool, label: str):
    """Inflate a deflated dataset within the header and announced-pixel bounds, then parse it as explicit VR."""
    import pydicom
    from pydicom.filewriter import write_file_meta_info

    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    meta = pydicom.dataset.FileMetaDataset(meta)
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian  # what the inflated bytes are
    if "FileMetaInformationGroupLength" in meta:
        del meta.FileMetaInformationGroupLength  # its value would be stale; pydicom does not need it
    write_file_meta_info(out, meta, enforce_standard=False)
    fp.seek(body_start)
    inflater = _Inflater(fp, out)
    ended = inflater.fill(MAX_DICOM_HEADER_BYTES)
    header = io.BytesIO(out.getvalue())
    ds = pydicom.dcmread(header, force=True, stop_before_pixels=True)
    at_pixels = header.tell() < len(header.getvalue())  # dcmread stops at (not past) the pixel data element
    if not ended and not at_pixels:
        raise DecodeLimitError(f"{label}: the deflated DICOM header inflates to over {MAX_DICOM_HEADER_BYTES} "
                               "bytes (a decompression bomb?)")
    if header_only or ended:
        return ds if header_only else pydicom.dcmread(io.BytesIO(out.getvalue()), force=True)
    check_dicom_size(ds, label)
    pixel_start = header.tell() - inflater.start  # offset of the pixel data element in the inflated stream
    limit = pixel_start + 12 + _native_pixel_bytes(ds, label) + 1 + DICOM_TRAILER_BYTES
    if not inflater.fill(limit):
        raise DecodeLimitError(f"{label}: the deflated DICOM inflates past the {limit} bytes its header announces "
                               "(a decompression bomb?)")
    del header
    out.seek(0)
    return pydicom.dcmread(out, force=True)


def dicom_number(ds, keyword: str, label: str, default=None, *, integer: bool = False):
    """A numeric attribute as float (first value of a multi-valued one) or int, else a RadscribeError naming it.

    pydicom converts DS/IS strings on access and raises ValueError for text that is no number, so every
    numeric attribute we use goes through here.
    """
    try:
        value = ds.get(keyword)
    except (ValueError, TypeError, OverflowError):
        value = _raw_value(ds, keyword)
        raise RadscribeError(f"{label}: DICOM {keyword} {value!r} is not a number") from None
    if value is None or value == "":
        return default
    first = value[0] if is_multi(value) else value
    try:
        number = float(first)
    except (TypeError, ValueError, OverflowError):
        raise RadscribeError(f"{label}: DICOM {keyword} {first!r} is not a number") from None
    if not math.isfinite(number) or (integer and (number != int(number) or number < 0)):
        kind = "a non-negative integer" if integer else "a finite number"
        raise RadscribeError(f"{label}: DICOM {keyword} {first!r} is not {kind}")
    return int(number) if integer else number


def _raw_value(ds, keyword: str) -> str:
    from pydicom.datadict import tag_for_keyword

    raw = ds.get_item(tag_for_keyword(keyword))
    value = getattr(raw, "value", raw)
    return value.decode("latin-1", "replace")[:40] if isinstance(value, bytes) else str(value)[:40]


def dicom_frame_count(ds, label: str = "DICOM data") -> int:
    return dicom_number(ds, "NumberOfFrames", label, 1, integer=True) or 1


def dicom_shape(ds, label: str = "DICOM data") -> tuple[int, int, int, int]:
    """(frames, rows, columns, samples per pixel) from the header, validated as numbers."""
    return (dicom_frame_count(ds, label), dicom_number(ds, "Rows", label, 0, integer=True),
            dicom_number(ds, "Columns", label, 0, integer=True),
            dicom_number(ds, "SamplesPerPixel", label, 1, integer=True))


def check_dicom_size(ds, label: str) -> tuple[int, int, int, int]:
    """Refuse a header announcing more than `MAX_PIXELS` per frame or `MAX_VOXELS` samples in all (before decoding)."""
    frames, rows, columns, samples = shape = dicom_shape(ds, label)
    if samples not in (1, 3):
        raise RadscribeError(f"{label}: DICOM SamplesPerPixel {samples} is not 1 (grayscale) or 3 (colour)")
    if rows * columns > MAX_PIXELS:
        raise DecodeLimitError(f"{label}: {rows}x{columns} pixels is over the limit of {MAX_PIXELS}")
    if frames * rows * columns * samples > MAX_VOXELS:
        raise DecodeLimitError(f"{label}: {frames} frames of {rows}x{columns}x{samples} is over the limit of "
                               f"{MAX_VOXELS} samples")
    return shape


def _native_pixel_bytes(ds, label: str) -> int:
    frames, rows, columns, samples = dicom_shape(ds, label)
    bits = dicom_number(ds, "BitsAllocated", label, 16, integer=True)
    if bits not in (1, 8, 16, 32, 64):
        raise RadscribeError(f"{label}: DICOM BitsAllocated {bits} is not 1, 8, 16, 32 or 64")
    return (frames * rows * columns * samples * bits + 7) // 8


def dicom_to_hu(ds, *, label: str | None = None) -> np.ndarray:
    """Stored pixels -> modality values as float (Hounsfield units for CT): RescaleSlope x raw + RescaleIntercept.

    Shape (rows, cols) or (frames, rows, cols). Raises RadscribeError naming the extra for compressed data
    that no installed decoder can read.
    """
    from pydicom.pixels import apply_modality_lut

    label = label or str(getattr(ds, "filename", None) or "DICOM data")
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        dicom_number(ds, keyword, label)  # apply_modality_lut would raise a bare ValueError on text
    raw = dicom_pixels(ds, label=label)
    return np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)


def dicom_pixels(ds, *, label: str | None = None) -> np.ndarray:
    """The decoded stored pixel values, with the checks every DICOM read needs (sizes before decoding)."""
    label = label or str(getattr(ds, "filename", None) or "DICOM data")
    if "PixelData" not in ds:
        raise RadscribeError(f"{label}: DICOM file has no pixel data (not an image)")
    check_dicom_size(ds, label)
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is not None and syntax.is_encapsulated:
        check_encapsulated_frames(ds, label)
    try:
        return ds.pixel_array
    except (RuntimeError, NotImplementedError, ValueError, AttributeError) as err:
        if syntax is not None and syntax.is_compressed:
            raise RadscribeError(
                f"{label}: cannot decode {syntax.name} pixel data with the installed decoders; {COMPRESSED_EXTRA}"
            ) from None
        raise RadscribeError(f"{label}: cannot decode the DICOM pixel data ({str(err).splitlines()[0]})") from None


# --- compressed pixel data: each frame's own size, read from its codestream header -----------------------------
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}  # F7: JPEG-LS


def check_encapsulated_frames(ds, label: str) -> None:
    """Refuse compressed pixel data whose frames would decode to more than the header's Rows x Columns x Samples.

    A decoder sizes its output from the codestream, not from the DICOM header, so a 64x64 header can carry a
    frame that inflates to gigabytes (JPEG/JPEG-LS SOF, JPEG 2000 SIZ), or an RLE segment whose runs add up to
    far more than one plane. Syntaxes whose frames we cannot measure are refused rather than decoded blind.
    """
    import pydicom
    from pydicom.encaps import generate_frames

    syntax = ds.file_meta.TransferSyntaxUID
    frames, rows, columns, samples = dicom_shape(ds, label)
    if syntax in pydicom.uid.RLETransferSyntaxes:
        measure = None
        bits = dicom_number(ds, "BitsAllocated", label, 16, integer=True)
        plane = rows * columns
    elif syntax in (*pydicom.uid.JPEGTransferSyntaxes, *pydicom.uid.JPEGLSTransferSyntaxes,
                    *pydicom.uid.JPEG2000TransferSyntaxes):
        measure = _codestream_shape
    else:
        raise RadscribeError(f"{label}: {syntax.name} pixel data: radscribe cannot check its decoded size before "
                             "decoding, so it does not decode it")
    try:
        for index, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=frames)):
            if measure is None:
                if not _rle_fits(frame, plane, samples * max(1, bits // 8), label):
                    raise DecodeLimitError(f"{label}: RLE frame {index} decodes to more than {rows}x{columns}x"
                                           f"{samples} samples (a decompression bomb?)")
                continue
            shape = measure(frame)
            if shape is None:
                raise RadscribeError(f"{label}: frame {index} of the {syntax.name} pixel data has no readable "
                                     "codestream header")
            height, width, components = shape
            if height > rows or width > columns or components > samples:
                raise DecodeLimitError(f"{label}: frame {index} is {height}x{width}x{components} in its codestream "
                                       f"but the header says {rows}x{columns}x{samples} (a decompression bomb?)")
    except RadscribeError:
        raise
    except (ValueError, TypeError, IndexError, struct.error) as err:
        raise RadscribeError(f"{label}: malformed encapsulated pixel data ({err})") from None


def _codestream_shape(frame: bytes) -> tuple[int, int, int] | None:
    """(height, width, components) from a JPEG/JPEG-LS start-of-frame or a JPEG 2000 SIZ segment."""
    if frame[:2] == b"\xff\xd8":
        pos = 2
        while pos + 10 <= len(frame):
            if frame[pos] != 0xFF:
                return None
            marker = frame[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            if marker in _JPEG_SOF:
                height, width = struct.unpack_from(">HH", frame, pos + 5)
                return height, width, frame[pos + 9]
            pos += 2 + struct.unpack_from(">H", frame, pos + 2)[0]
        return None
    offset = 0
    if frame[:8] == b"\x00\x00\x00\x0cjP  ":  # a JP2 file (non-conformant in DICOM, but written): find jp2c
        offset = 12
        while offset + 8 <= len(frame) and frame[offset + 4:offset + 8] != b"jp2c":
            length = struct.unpack_from(">I", frame, offset)[0]
            if length < 8:
                return None
            offset += length
        offset += 8
    if frame[offset:offset + 4] != b"\xff\x4f\xff\x51" or len(frame) < offset + 44:
        return None
    x, y, x0, y0 = struct.unpack_from(">IIII", frame, offset + 8)
    components = struct.unpack_from(">H", frame, offset + 40)[0]
    return y - y0, x - x0, components


def _rle_fits(frame: bytes, plane: int, segments: int, label: str) -> bool:
    """Whether every RLE segment (PS3.5 G.3) decodes to at most one plane; stops counting as soon as one is over."""
    count = struct.unpack_from("<I", frame, 0)[0]
    if count != segments:
        raise RadscribeError(f"{label}: an RLE frame has {count} segments where its header needs {segments}")
    offsets = [*struct.unpack_from(f"<{count}I", frame, 4), len(frame)]
    for start, end in zip(offsets, offsets[1:]):
        total, pos = 0, start
        while pos < end and total <= plane:
            n = frame[pos]
            if n > 128:  # replicate the next byte 257 - n times (none when the segment ends first)
                total += 257 - n if pos + 1 < end else 0
                pos += 2
            elif n < 128:  # copy the next n + 1 bytes, as many as the segment still holds
                total += min(n + 1, end - pos - 1)
                pos += n + 2
            else:
                pos += 1
        if total > plane:
            return False
    return True


def auto_window(ds, values: np.ndarray, label: str = "DICOM data") -> tuple[str, float, float]:
    """The file's own window: first WindowCenter/WindowWidth value when present, else the data's min/max."""
    center, width = dicom_number(ds, "WindowCenter", label), dicom_number(ds, "WindowWidth", label)
    if center is not None and width is not None and width >= 1:
        return "center", center, width
    return "range", float(np.min(values)), float(np.max(values))


def is_multi(value) -> bool:
    return isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue"


def dicom_images(ds, window, choose, *, label: str | None = None) -> list[tuple[int, Image.Image]]:
    """Render the frames `choose(n_frames)` selects: HU -> window -> MONOCHROME1 inversion -> RGB."""
    label = label or str(getattr(ds, "filename", None) or "DICOM data")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if dicom_number(ds, "SamplesPerPixel", label, 1, integer=True) == 3:
        # Colour (RGB/YBR: secondary captures, ultrasound): pydicom returns RGB; windows do not apply.
        pixels = dicom_pixels(ds, label=label)
        frames = pixels if pixels.ndim == 4 else pixels[None]
        bits = dicom_number(ds, "BitsStored", label, 8, integer=True)
        scale = 255.0 / (2 ** bits - 1)
        return [(i, Image.fromarray(np.clip(np.rint(frames[i] * scale), 0, 255).astype(np.uint8), mode="RGB"))
                for i in choose(len(frames))]
    if window not in (None, "auto") and str(ds.get("Modality", "")).upper() not in ("CT", ""):
        raise RadscribeError(f"{label}: window {window!r} is in Hounsfield units but the file is "
                             f"{ds.get('Modality')}; use window auto")
    values = dicom_to_hu(ds, label=label)
    frames = values if values.ndim == 3 else values[None]
    auto = auto_window(ds, frames, label) if window in (None, "auto") else ("range", 0.0, 0.0)
    out = []
    for i in choose(len(frames)):
        rgb = _windowed(frames[i], window, auto, label)
        if photometric == "MONOCHROME1":
            rgb = 255 - rgb  # MONOCHROME1: the lowest value is displayed white (PS3.3 C.7.6.3.1.2)
        out.append((i, Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")))
    return out


# --- NIfTI ----------------------------------------------------------------------------------------------
def read_nifti(source: Source, *, name: str | None = None):
    """nibabel image (first volume of a 4-D series) reoriented to RAS with as_closest_canonical."""
    try:
        import nibabel as nib
    except ImportError:
        raise RadscribeError(f"{_label(source, name)}: reading NIfTI needs nibabel; {NIFTI_EXTRA}") from None
    label = _label(source, name)
    try:
        if isinstance(source, bytes):
            img = _nifti_from_bytes(nib, source, label)
        else:
            img = nib.load(str(source))
        shape = img.shape
        if len(shape) < 2:
            raise RadscribeError(f"{label}: NIfTI has {len(shape)} dimension(s); need a 2-D image or 3-D volume")
        if math.prod(shape[:3]) > MAX_VOXELS:
            raise RadscribeError(f"{label}: a {'x'.join(map(str, shape[:3]))} volume is over the limit of "
                                 f"{MAX_VOXELS} voxels")
        # 4-D (and higher) series: the first volume only (slicing the proxy reads just that volume).
        index = (slice(None),) * 3 + (0,) * (len(shape) - 3) if len(shape) > 3 else ...
        volume = np.asanyarray(img.dataobj[index], dtype=np.float32)
        if volume.ndim == 2:
            volume = volume[..., None]
        first = nib.Nifti1Image(volume, img.affine)
        first.header.set_zooms(img.header.get_zooms()[:3] if len(shape) >= 3 else (*img.header.get_zooms()[:2], 1.0))
        canonical = nib.as_closest_canonical(first)
    except RadscribeError:
        raise
    except Exception as err:  # nibabel raises many types (HeaderDataError, ImageFileError, EOFError, ...)
        raise RadscribeError(f"{label}: not a readable NIfTI file ({type(err).__name__}: {err})") from None
    return canonical, img.header


def _nifti_from_bytes(nib, source: bytes, label: str):
    """A NIfTI image from bytes (uploads), refusing sizes over the limits before inflating a .nii.gz (gzip bomb)."""
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if source[:2] == b"\x1f\x8b" else None
    head = inflate.decompress(source, 540) if inflate else source[:540]
    two = 540 in (int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big"))
    header_cls, image_cls = (nib.Nifti2Header, nib.Nifti2Image) if two else (nib.Nifti1Header, nib.Nifti1Image)
    header = header_cls.from_fileobj(io.BytesIO(head))
    shape = header.get_data_shape()
    size = int(header["vox_offset"]) + math.prod(shape) * header.get_data_dtype().itemsize
    if math.prod(shape[:3]) > MAX_VOXELS or size > MAX_NIFTI_BYTES:
        raise RadscribeError(f"{label}: a {'x'.join(map(str, shape))} NIfTI is over the upload limits "
                             f"({MAX_VOXELS} voxels a volume, {MAX_NIFTI_BYTES} bytes)")
    if inflate is None:
        return image_cls.from_bytes(source)
    # Inflate the rest (the 540 header bytes are already out), never past the size the header announces.
    data = head + inflate.decompress(inflate.unconsumed_tail, size - len(head) + 1)
    return image_cls.from_bytes(data)


def nifti_auto_window(header, volume: np.ndarray) -> tuple[str, float, float]:
    """The header's display range (cal_min/cal_max) when set, else the 0.5-99.5 percentiles of the volume."""
    cal_min, cal_max = float(header["cal_min"]), float(header["cal_max"])
    if cal_max > cal_min:
        return "range", cal_min, cal_max
    low, high = np.percentile(volume, [0.5, 99.5])
    return "range", float(low), float(high)


PLANES = {"axial": 2, "coronal": 1, "sagittal": 0}


def display_slice(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
    """A 2-D slice of a RAS volume in radiological display orientation.

    Axial: viewed from the feet, patient left on image right, anterior up. Coronal: viewed from the front,
    patient left on image right, superior up. Sagittal: anterior on image left, superior up. In all three the
    slice's first axis (R, R, A) runs right-to-left on screen and its second (A, S, S) bottom-to-top, so the
    display is the transposed slice flipped in both directions.
    """
    axis = PLANES[plane]
    section = np.take(volume, index, axis=axis)
    return section.T[::-1, ::-1]


def nifti_images(source: Source, window, choose, *, name: str | None = None,
                 plane: str = "axial") -> list[tuple[int, Image.Image]]:
    """Render the slices `choose(n)` selects along `plane` of a NIfTI volume (values taken as HU for presets)."""
    label = _label(source, name)
    if plane not in PLANES:
        raise RadscribeError(f"{label}: plane {plane!r} is not one of {', '.join(PLANES)}")
    canonical, header = read_nifti(source, name=name)
    volume = np.asanyarray(canonical.dataobj, dtype=np.float32)
    zooms = [float(z) for z in canonical.header.get_zooms()[:3]]
    auto = nifti_auto_window(header, volume) if window in (None, "auto") else ("range", 0.0, 0.0)
    axis = PLANES[plane]
    # Physical pixel sizes of the displayed slice: rows run along the second in-plane axis, columns the first.
    in_plane = [z for a, z in enumerate(zooms) if a != axis]
    col_size, row_size = in_plane[0], in_plane[1]
    out = []
    for i in choose(volume.shape[axis]):
        rgb = _windowed(display_slice(volume, plane, i), window, auto, label)
        image = Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")
        out.append((i, _physical_aspect(image, col_size, row_size)))
    return out


def _physical_aspect(image: Image.Image, col_size: float, row_size: float) -> Image.Image:
    """Resample anisotropic voxels (e.g. 1 mm x 5 mm coronal slices) so anatomy is not squashed."""
    if col_size <= 0 or row_size <= 0 or abs(col_size / row_size - 1) < 0.01:
        return image
    finest = min(col_size, row_size)
    size = (max(1, round(image.width * col_size / finest)), max(1, round(image.height * row_size / finest)))
    return image.resize(size, Image.Resampling.BILINEAR)
