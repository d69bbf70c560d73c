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
def read_dicom(source: Source, *, name: str | None = None, header_only: bool = False):
    """pydicom Dataset from a path or bytes (force=True so files without the 128-byte preamble read too)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        return pydicom.dcmread(fp, force=True, stop_before_pixels=header_only)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError) as err:
        raise RadscribeError(f"{_label(source, name)}: not a readable DICOM file ({err})") from None


def dicom_to_hu(ds, *, label: str | None = None) -> np.ndarray:
    """Stored pixels -> modality values as float (Hounsfield units for CT): RescaleSlope x raw + RescaleIntercept.

    Shape (rows, cols) or (frames, rows, cols). Raises RadscribeError naming the extra for compressed data
    that no installed decoder can read.
    """
    from pydicom.pixels import apply_modality_lut

    raw = dicom_pixels(ds, label=label)
    return np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)


def dicom_pixels(ds, *, label: str | None = None) -> np.ndarray:
    """The decoded stored pixel values, with the checks every DICOM read needs."""
    label = label or str(getattr(ds, "filename", None) or "DICOM data")
    if "PixelData" not in ds:
        raise RadscribeError(f"{label}: DICOM file has no pixel data (not an image)")
    pixels = int(ds.get("Rows", 0)) * int(ds.get("Columns", 0))
    if pixels > MAX_PIXELS:
        raise RadscribeError(f"{label}: {ds.Rows}x{ds.Columns} pixels is over the limit of {MAX_PIXELS}")
    if pixels * dicom_frame_count(ds) > MAX_VOXELS:
        raise RadscribeError(f"{label}: {dicom_frame_count(ds)} frames of {ds.Rows}x{ds.Columns} is over the limit "
                             f"of {MAX_VOXELS} voxels")
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        return ds.pixel_array
    except (RuntimeError, NotImplementedError, ValueError, AttributeError) as err:
        if syntax is not None and syntax.is_compressed:
            raise RadscribeError(
                f"{label}: cannot decode {syntax.name} pixel data with the installed decoders; {COMPRESSED_EXTRA}"
            ) from None
        raise RadscribeError(f"{label}: cannot decode the DICOM pixel data ({str(err).splitlines()[0]})") from None


def auto_window(ds, values: np.ndarray) -> tuple[str, float, float]:
    """The file's own window: first WindowCenter/WindowWidth value when present, else the data's min/max."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        # Multi-valued (e.g. "40\\400" for several presets): the first is the primary one.
        center = center[0] if _is_multi(center) else center
        width = width[0] if _is_multi(width) else width
        if float(width) >= 1:
            return "center", float(center), float(width)
    return "range", float(np.min(values)), float(np.max(values))


def _is_multi(value) -> bool:
    return isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue"


def dicom_images(ds, window, choose, *, label: str | None = None) -> list[tuple[int, Image.Image]]:
    """Render the frames `choose(n_frames)` selects: HU -> window -> MONOCHROME1 inversion -> RGB."""
    label = label or str(getattr(ds, "filename", None) or "DICOM data")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        # Colour (RGB/YBR: secondary captures, ultrasound): pydicom returns RGB; windows do not apply.
        pixels = dicom_pixels(ds, label=label)
        frames = pixels if pixels.ndim == 4 else pixels[None]
        bits = int(ds.get("BitsStored", 8))
        scale = 255.0 / (2 ** bits - 1)
        return [(i, Image.fromarray(np.clip(np.rint(frames[i] * scale), 0, 255).astype(np.uint8), mode="RGB"))
                for i in choose(len(frames))]
    if window not in (None, "auto") and str(ds.get("Modality", "")).upper() not in ("CT", ""):
        raise RadscribeError(f"{label}: window {window!r} is in Hounsfield units but the file is "
                             f"{ds.get('Modality')}; use window auto")
    values = dicom_to_hu(ds, label=label)
    frames = values if values.ndim == 3 else values[None]
    auto = auto_window(ds, frames) if window in (None, "auto") else ("range", 0.0, 0.0)
    out = []
    for i in choose(len(frames)):
        rgb = _windowed(frames[i], window, auto, label)
        if photometric == "MONOCHROME1":
            rgb = 255 - rgb  # MONOCHROME1: the lowest value is displayed white (PS3.3 C.7.6.3.1.2)
        out.append((i, Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")))
    return out


def dicom_frame_count(ds) -> int:
    return int(ds.get("NumberOfFrames", 1) or 1)


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
