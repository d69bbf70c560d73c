"""The one image loader: HU, windows, MONOCHROME1, format sniffing, NIfTI orientation and slice choice.

Real samples shipped inside the pydicom and nibabel wheels (offline); synthetic volumes where a known answer is
needed (orientation).
"""

from __future__ import annotations

import gzip
import io
import re
import struct
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from radscribe.data.imaging import (MULTI_WINDOW, WINDOWS, apply_window, choose_slices, dicom_to_hu, load_image,
                                    load_slices, sniff_format)
from radscribe.errors import RadscribeError

CT = get_testdata_file("CT_small.dcm", download=False)
MR = get_testdata_file("MR_small.dcm", download=False)
NIB_DATA = Path(nib.__file__).parent / "tests" / "data"
EXAMPLE4D = NIB_DATA / "example4d.nii.gz"
ANATOMICAL = NIB_DATA / "anatomical.nii"


def gray(image: Image.Image) -> np.ndarray:
    arr = np.asarray(image)
    assert image.mode == "RGB" and arr.ndim == 3 and arr.shape[2] == 3
    return arr[..., 0]


# --- Hounsfield units ----------------------------------------------------------------------------------------
def test_ct_hu_of_known_pixels_is_raw_times_slope_plus_intercept():
    ds = pydicom.dcmread(CT)
    raw = ds.pixel_array
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    assert (slope, intercept) == (1.0, -1024.0)
    hu = dicom_to_hu(ds)
    assert hu.shape == (128, 128)
    for r, c in [(0, 0), (64, 64), (10, 100), (127, 3), (90, 45)]:
        assert hu[r, c] == raw[r, c] * slope + intercept
    # The sample's known range (air outside the phantom is not -1024 here: the file is cropped).
    assert (hu.min(), hu.max()) == (-896.0, 1167.0)


def test_hu_uses_a_non_trivial_rescale(tmp_path):
    ds = pydicom.dcmread(CT)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    path = tmp_path / "scaled.dcm"
    ds.save_as(path)
    raw = ds.pixel_array
    hu = dicom_to_hu(pydicom.dcmread(path))
    assert hu[64, 64] == raw[64, 64] * 2 - 100
    assert hu[5, 7] == raw[5, 7] * 2 - 100


# --- windows -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(WINDOWS))
def test_each_window_clips_outside_and_centers_at_mid_gray(name):
    center, width = WINDOWS[name]
    hu = np.array([-3000, center - width / 2 - 1, center, center + width / 2 + 1, 4000], dtype=float)
    out = apply_window(hu, center, width)
    assert out.dtype == np.uint8
    assert out[0] == 0 and out[1] == 0
    assert out[3] == 255 and out[4] == 255
    # The DICOM formula puts the center half a step above mid-gray: 127.5 + 127.5 / (width - 1).
    assert out[2] == round(127.5 + 127.5 / (width - 1)) and abs(int(out[2]) - 128) <= 4
    ramp = np.linspace(center - width, center + width, 501)
    assert np.all(np.diff(apply_window(ramp, center, width).astype(int)) >= 0)


def test_apply_window_follows_the_dicom_linear_formula():
    # PS3.3 C.11.2.1.2.1 with c=40, w=80: x <= 0 -> 0, x > 79 -> 255, else ((x - 39.5) / 79 + 0.5) * 255.
    out = apply_window(np.array([-5, 0, 1, 40, 79, 79.5, 80]), 40, 80)
    assert out.tolist() == [0, 0, round((1 - 39.5) / 79 * 255 + 127.5), round(0.5 / 79 * 255 + 127.5), 255, 255, 255]
    with pytest.raises(RadscribeError, match="width"):
        apply_window(np.zeros(3), 40, 0)


@pytest.mark.parametrize("name", ["brain", "lung", "bone", "mediastinum"])
def test_ct_presets_render_the_hu_through_the_window(name):
    hu = dicom_to_hu(pydicom.dcmread(CT))
    img = gray(load_image(CT, window=name))
    np.testing.assert_array_equal(img, apply_window(hu, *WINDOWS[name]))
    center, width = WINDOWS[name]
    assert np.all(img[hu <= center - width / 2 - 1] == 0)
    assert np.all(img[hu > center + width / 2] == 255)


def test_window_accepts_a_center_width_pair():
    hu = dicom_to_hu(pydicom.dcmread(CT))
    np.testing.assert_array_equal(gray(load_image(CT, window=(100, 700))), apply_window(hu, 100, 700))


def test_unknown_window_names_the_known_ones():
    with pytest.raises(RadscribeError, match="unknown window 'lungs'.*lung"):
        load_image(CT, window="lungs")


def test_multi_window_stacks_three_ct_windows_into_rgb():
    hu = dicom_to_hu(pydicom.dcmread(CT))
    arr = np.asarray(load_image(CT, window="multi"))
    for channel, name in enumerate(MULTI_WINDOW):
        np.testing.assert_array_equal(arr[..., channel], apply_window(hu, *WINDOWS[name]))
    assert not np.array_equal(arr[..., 0], arr[..., 1])
    assert not np.array_equal(arr[..., 1], arr[..., 2])


def test_auto_window_on_mr_uses_the_files_window():
    ds = pydicom.dcmread(MR)
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (600.0, 1600.0)
    np.testing.assert_array_equal(gray(load_image(MR)), apply_window(dicom_to_hu(ds), 600, 1600))
    np.testing.assert_array_equal(gray(load_image(MR, window="auto")), gray(load_image(MR)))


def test_auto_window_takes_the_first_of_several_values(tmp_path):
    ds = pydicom.dcmread(MR)
    ds.WindowCenter, ds.WindowWidth = [300, 600], [400, 1600]
    ds.save_as(tmp_path / "multi.dcm")
    np.testing.assert_array_equal(gray(load_image(tmp_path / "multi.dcm")), apply_window(dicom_to_hu(ds), 300, 400))


def test_auto_window_without_tags_stretches_min_to_max(tmp_path):
    ds = pydicom.dcmread(MR)
    del ds.WindowCenter, ds.WindowWidth
    ds.save_as(tmp_path / "nowin.dcm")
    img = gray(load_image(tmp_path / "nowin.dcm"))
    hu = dicom_to_hu(ds)
    assert img.min() == 0 and img.max() == 255
    assert np.all(img[hu == hu.min()] == 0) and np.all(img[hu == hu.max()] == 255)


def test_hu_presets_on_mr_are_refused():
    with pytest.raises(RadscribeError, match="Hounsfield.*MR"):
        load_image(MR, window="lung")


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(CT)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "mono1.dcm")
    for window in ("brain", "auto", "multi"):
        normal = np.asarray(load_image(CT, window=window)).astype(int)
        inverted = np.asarray(load_image(tmp_path / "mono1.dcm", window=window)).astype(int)
        np.testing.assert_array_equal(inverted, 255 - normal)


def test_compressed_without_a_decoder_names_the_extra():
    path = get_testdata_file("JPEG-lossy.dcm", download=False)  # 12-bit JPEG Extended: Pillow cannot decode it
    try:
        import pylibjpeg  # noqa: F401
        has_decoder = True
    except ImportError:
        has_decoder = False
    if has_decoder:
        assert load_image(path).mode == "RGB"
    else:
        with pytest.raises(RadscribeError, match=r"JPEG Extended.*radscribe\[dicom-compressed\]"):
            load_image(path)


def test_dicom_without_pixel_data_is_refused(tmp_path):
    ds = pydicom.dcmread(CT)
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    with pytest.raises(RadscribeError, match="no pixel data"):
        load_image(tmp_path / "nopix.dcm")


# --- format detection and plain images ------------------------------------------------------------------------
def test_dicom_bytes_load_like_the_path_and_are_sniffed_by_content():
    data = Path(CT).read_bytes()
    assert sniff_format(data) == "dicom"
    np.testing.assert_array_equal(np.asarray(load_image(data)), np.asarray(load_image(CT)))


def test_dicom_without_preamble_is_found_by_suffix(tmp_path):
    ds = pydicom.dcmread(CT)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    raw = buf.getvalue()[132:]  # drop the 128-byte preamble and "DICM", as some old writers do
    assert raw[128:132] != b"DICM"
    path = tmp_path / "old.dcm"
    path.write_bytes(raw)
    assert sniff_format(raw) == "unknown" and sniff_format(raw, name="old.dcm") == "dicom"
    np.testing.assert_array_equal(np.asarray(load_image(path)), np.asarray(load_image(CT)))
    np.testing.assert_array_equal(np.asarray(load_image(raw, name="upload.dcm")), np.asarray(load_image(CT)))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_plain_images_come_back_as_rgb(fmt):
    src = Image.fromarray((np.arange(64 * 48) % 256).astype(np.uint8).reshape(48, 64), mode="L")
    buf = io.BytesIO()
    src.save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    img = load_image(buf.getvalue())
    assert img.mode == "RGB" and img.size == (64, 48)
    if fmt != "JPEG":
        np.testing.assert_array_equal(gray(img), np.asarray(src))
    assert load_image(buf.getvalue(), window="lung").tobytes() == img.tobytes()  # windows don't touch JPEG/PNG


def test_sixteen_bit_png_is_stretched_not_clipped():
    values = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG")
    assert gray(load_image(buf.getvalue())).tolist() == [[0, 64], [128, 255]]


def _png_claiming(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(RadscribeError, match="8500x8500 pixels is over the limit"):
        load_image(_png_claiming(8500, 8500))  # over ours (8192^2), under PIL's own warning threshold
    # Past PIL's own warning threshold: refused too (by PIL's warning turned error, or by our check when another
    # module has lifted PIL's global limit, as prepare's workers do).
    with pytest.raises(RadscribeError, match="limit"):
        load_image(_png_claiming(10_000, 10_000))


def test_unknown_formats_are_refused():
    with pytest.raises(RadscribeError, match="not a JPEG, PNG, WebP, DICOM or NIfTI"):
        load_image(b"hello, I am not an image" * 20, name="note.txt")
    gif = io.BytesIO()
    Image.new("L", (4, 4)).save(gif, format="GIF")
    with pytest.raises(RadscribeError):
        load_image(gif.getvalue())


# --- NIfTI ---------------------------------------------------------------------------------------------------
def _marker_volume():
    """20 (R) x 30 (A) x 10 (S) volume in RAS storage, zero but for a marker left, anterior and superior."""
    vol = np.zeros((20, 30, 10), dtype=np.int16)
    vol[2, 25, 8] = 1000
    return vol


@pytest.mark.parametrize("storage", ["RAS", "LPS", "SLA"])
def test_nifti_orientation_is_radiological(tmp_path, storage):
    ras = _marker_volume()
    if storage == "RAS":
        data, affine = ras, np.eye(4)
    elif storage == "LPS":  # first axis runs to the left, second to the back
        data, affine = ras[::-1, ::-1, :], np.diag([-1.0, -1.0, 1.0, 1.0])
    else:  # axes stored as (S, L, A): a permuted, flipped layout
        data = np.transpose(ras[::-1], (2, 0, 1))
        affine = np.zeros((4, 4))
        affine[0, 1], affine[1, 2], affine[2, 0], affine[3, 3] = -1.0, 1.0, 1.0, 1.0
    path = tmp_path / f"marker-{storage}.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), path)
    assert nib.aff2axcodes(affine) == tuple(storage)

    def marker(image):
        arr = gray(image)
        return tuple(int(v) for v in np.unravel_index(np.argmax(arr), arr.shape)), arr.shape

    # Axial, seen from the feet: patient left on image right (col 17 of 20), anterior up (row 4 of 30).
    assert marker(load_image(path, window=(500, 1000), slice=8)) == ((4, 17), (30, 20))
    # Coronal: superior up (row 1 of 10), patient left on image right.
    assert marker(load_image(path, window=(500, 1000), slice=25, plane="coronal")) == ((1, 17), (10, 20))
    # Sagittal: superior up, anterior on image left (col 4 of 30).
    assert marker(load_image(path, window=(500, 1000), slice=2, plane="sagittal")) == ((1, 4), (10, 30))


def test_nifti_anisotropic_voxels_are_shown_at_physical_aspect(tmp_path):
    path = tmp_path / "thick.nii"
    nib.save(nib.Nifti1Image(_marker_volume(), np.diag([1.0, 1.0, 3.0, 1.0])), path)
    assert load_image(path, plane="coronal").size == (20, 30)  # 10 slices of 3 mm shown as 30 rows
    assert load_image(path).size == (20, 30)  # axial: 1 mm x 1 mm, untouched


def test_nifti_slice_choice_counts():
    # example4d: 128 x 96 x 24 (x 2 volumes); anatomical: 33 x 41 x 25; both stored LAS -> 24 / 25 axial slices.
    assert [i for i, _ in load_slices(EXAMPLE4D, slices="middle")] == [12]
    assert len(load_slices(EXAMPLE4D, slices="all")) == 24
    assert [i for i, _ in load_slices(EXAMPLE4D, slices="every:5")] == [0, 5, 10, 15, 20]
    assert [i for i, _ in load_slices(ANATOMICAL, slices="every:10")] == [0, 10, 20]
    assert {im.size for _, im in load_slices(ANATOMICAL, slices="all")} == {(33, 41)}


def test_nifti_4d_takes_the_first_volume(tmp_path):
    img = nib.load(EXAMPLE4D)
    first = np.asanyarray(img.dataobj[..., 0])
    second = np.asanyarray(img.dataobj[..., 1])
    assert not np.array_equal(first, second)
    for k, vol in (("first", first), ("second", second)):
        out = nib.Nifti1Image(vol, img.affine, img.header)
        out.header.set_data_shape(vol.shape)
        nib.save(out, tmp_path / f"{k}.nii.gz")
    four_d = np.asarray(load_image(EXAMPLE4D))
    np.testing.assert_array_equal(four_d, np.asarray(load_image(tmp_path / "first.nii.gz")))


def test_nifti_bytes_are_sniffed_by_header_magic():
    gz = EXAMPLE4D.read_bytes()
    plain = ANATOMICAL.read_bytes()
    assert sniff_format(gz) == "nifti" and sniff_format(plain) == "nifti"
    np.testing.assert_array_equal(np.asarray(load_image(gz)), np.asarray(load_image(EXAMPLE4D)))
    np.testing.assert_array_equal(np.asarray(load_image(plain)), np.asarray(load_image(ANATOMICAL)))
    assert sniff_format(gzip.compress(b"not nifti" * 100)) == "unknown"


def test_nifti_auto_window_uses_cal_range_else_percentiles():
    header = nib.load(EXAMPLE4D).header
    assert (float(header["cal_min"]), float(header["cal_max"])) == (0.0, 1162.0)
    vol = np.asanyarray(nib.as_closest_canonical(nib.load(EXAMPLE4D)).dataobj[..., 0], dtype=float)
    img = gray(load_image(EXAMPLE4D))
    section = vol[:, :, 12].T[::-1, ::-1]
    np.testing.assert_array_equal(img, np.clip(np.rint(section / 1162.0 * 255), 0, 255).astype(np.uint8))
    # anatomical.nii has no cal range: the 0.5/99.5 percentiles of the volume, so a few voxels saturate.
    anat = gray(load_image(ANATOMICAL))
    assert anat.min() == 0 and anat.max() == 255


def test_nifti_presets_treat_values_as_hu():
    vol = np.asanyarray(nib.as_closest_canonical(nib.load(ANATOMICAL)).dataobj, dtype=float)
    expected = apply_window(vol[:, :, 12].T[::-1, ::-1], *WINDOWS["soft_tissue"])
    np.testing.assert_array_equal(gray(load_image(ANATOMICAL, window="soft_tissue")), expected)


def test_slice_specs_are_validated():
    assert choose_slices(7, "middle") == [3] and choose_slices(1, "every:3") == [0]
    for bad in ("every:0", "every:x", "first", "every:"):
        with pytest.raises(RadscribeError, match="middle, all, every:N"):
            choose_slices(10, bad)
    with pytest.raises(RadscribeError, match="out of range"):
        load_image(ANATOMICAL, slice=25)


def test_missing_nibabel_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "nibabel", None)  # makes `import nibabel` raise ImportError
    with pytest.raises(RadscribeError, match=r"radscribe\[nifti\]"):
        load_image(ANATOMICAL)


def test_nifti_upload_announcing_a_huge_volume_is_refused_before_inflating():
    header = nib.Nifti1Header()
    header.set_data_shape((2048, 2048, 2048))
    header.set_data_dtype(np.int16)
    buf = io.BytesIO()
    header.write_to(buf)
    bomb = gzip.compress(buf.getvalue() + b"\x00" * 4 + b"\x00" * (1 << 20))  # 1 MiB of zeros, not 16 GiB
    with pytest.raises(RadscribeError, match="over the upload limits"):
        load_image(bomb)


def test_nifti_upload_truncated_is_a_clear_error():
    data = gzip.compress(gzip.decompress(EXAMPLE4D.read_bytes())[:5000])
    with pytest.raises(RadscribeError, match="not a readable NIfTI"):
        load_image(data)


def test_colour_dicom_is_shown_as_rgb_without_a_window():
    path = get_testdata_file("SC_rgb_jpeg_dcmtk.dcm", download=False)
    ds = pydicom.dcmread(path)
    assert ds.SamplesPerPixel == 3 and ds.BitsStored == 8
    np.testing.assert_array_equal(np.asarray(load_image(path)), ds.pixel_array)


def test_lossless_jpeg2000_decodes_to_the_same_image_as_the_uncompressed_file():
    path = get_testdata_file("MR_small_jp2klossless.dcm", download=False)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(np.asarray(load_image(path)), np.asarray(load_image(MR)))


def multiframe_ct(path: Path, frames: int = 5) -> Path:
    """CT_small as a multi-frame file whose frame i is the sample plus 100*i HU."""
    ds = pydicom.dcmread(CT)
    stack = np.stack([ds.pixel_array + 100 * i for i in range(frames)]).astype(ds.pixel_array.dtype)
    ds.NumberOfFrames = frames
    ds.PixelData = stack.tobytes()
    ds.save_as(path)
    return path


def test_multiframe_dicom_slices(tmp_path):
    path = multiframe_ct(tmp_path / "mf.dcm")
    hu = dicom_to_hu(pydicom.dcmread(path))
    assert hu.shape == (5, 128, 128) and hu[3, 64, 64] == hu[0, 64, 64] + 300
    assert [i for i, _ in load_slices(path, window="brain", slices="every:2")] == [0, 2, 4]
    np.testing.assert_array_equal(gray(load_image(path, window="brain")), apply_window(hu[2], *WINDOWS["brain"]))
    np.testing.assert_array_equal(gray(load_image(path, window="brain", slice=4)), apply_window(hu[4], 40, 80))


# --- untrusted DICOM: bounded inflating and decoding ---------------------------------------------------------------
from hostile_inputs import ct_dataset, deflate_bomb, deflated, non_numeric_dicom  # noqa: E402

from radscribe.data.imaging import (DecodeLimitError, _codestream_shape, check_encapsulated_frames,  # noqa: E402
                                    read_dicom)


def traced_peak(fn) -> tuple[int, BaseException | None]:
    """Peak bytes Python allocated while `fn` ran (zlib's output buffers included), and what it raised."""
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        raised = None
    except BaseException as err:  # noqa: BLE001 - handed back to the test
        raised = err
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, raised


def test_deflated_dicom_reads_exactly_like_the_same_file_uncompressed():
    plain = io.BytesIO()
    ct_dataset(96, 80).save_as(plain, enforce_file_format=True)
    packed = deflated(ct_dataset(96, 80))
    assert pydicom.dcmread(io.BytesIO(packed)).file_meta.TransferSyntaxUID.is_deflated
    np.testing.assert_array_equal(np.asarray(load_image(packed)), np.asarray(load_image(plain.getvalue())))
    assert read_dicom(packed, header_only=True).Rows == 96


@pytest.mark.parametrize("kind, message", [
    ("trailer", "inflates past the .* bytes its header announces"),  # a valid image, then gigabytes of padding
    ("header", "header inflates to over 4194304 bytes"),              # gigabytes before the pixel data
    ("pixels", "inflates past the .* bytes its header announces"),   # pixel data longer than Rows x Columns
])
def test_deflate_bombs_are_refused_after_inflating_a_bounded_prefix(kind, message):
    bomb = deflate_bomb(2048, kind)  # 2 GiB of zeros in ~2 MB: pydicom alone would inflate all of it first
    assert len(bomb) < 3 * 1024 * 1024
    for header_only in (False, True):
        peak, raised = traced_peak(lambda: read_dicom(bomb, header_only=header_only))
        if kind == "header" or not header_only:
            assert isinstance(raised, DecodeLimitError) and re.search(message, str(raised)), raised
        else:
            assert raised is None  # the header alone is fine; its pixel data is never inflated
        assert peak < 16 * 1024 * 1024, peak
    with pytest.raises(DecodeLimitError):
        load_image(bomb)


def test_deflated_pixel_count_is_checked_before_the_pixels_are_inflated():
    bomb = deflate_bomb(64, "pixels", rows=60000, columns=60000)
    peak, raised = traced_peak(lambda: load_image(bomb))
    assert isinstance(raised, DecodeLimitError) and "60000x60000 pixels is over the limit" in str(raised)
    assert peak < 16 * 1024 * 1024
    # A deflated image exactly as large as its header says is not a bomb: it decodes.
    assert load_image(deflate_bomb(8, "pixels", rows=2048, columns=2048)).size == (2048, 2048)


COMPRESSED_SAMPLES = ["693_J2KI.dcm", "MR_small_jp2klossless.dcm", "JPEG2000.dcm", "examples_jpeg2k.dcm",
                      "SC_rgb_gdcm_KY.dcm", "JPEG-lossy.dcm", "JPGExtended.dcm", "SC_rgb_jpeg_dcmtk.dcm",
                      "SC_rgb_small_odd_jpeg.dcm", "SC_rgb_jpeg_gdcm.dcm", "examples_ybr_color.dcm",
                      "MR_small_jpeg_ls_lossless.dcm", "JPEGLSNearLossless_16.dcm", "SC_rgb_jls_lossy_line.dcm",
                      "MR_small_RLE.dcm", "SC_rgb_rle_32bit_2frame.dcm", "rtdose_rle.dcm"]


@pytest.mark.parametrize("name", COMPRESSED_SAMPLES)
def test_real_compressed_samples_pass_the_frame_size_check(name):
    # pydicom's own samples from many encoders: the codestream sizes we read must match what they announce.
    ds = pydicom.dcmread(get_testdata_file(name, download=False))
    check_encapsulated_frames(ds, name)
    if ds.file_meta.TransferSyntaxUID not in pydicom.uid.RLETransferSyntaxes:
        frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1))))
        assert _codestream_shape(frame) == (ds.Rows, ds.Columns, ds.SamplesPerPixel)


def _encapsulated(ds, frame: bytes, syntax) -> bytes:
    ds = ds.copy()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = pydicom.encaps.encapsulate([frame])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _sof_sized(jpeg: bytes, height: int, width: int) -> bytes:
    pos = 2
    while jpeg[pos + 1] not in (0xC0, 0xC1, 0xC2):
        pos += 2 + struct.unpack_from(">H", jpeg, pos + 2)[0]
    return jpeg[:pos + 5] + struct.pack(">HH", height, width) + jpeg[pos + 9:]


def test_compressed_frames_larger_than_their_header_are_refused_before_decoding():
    small = ct_dataset(64, 64, pixels=False)
    small.BitsAllocated, small.BitsStored, small.HighBit, small.PixelRepresentation = 8, 8, 7, 0
    buf = io.BytesIO()
    Image.new("L", (64, 64), 90).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    assert load_image(_encapsulated(small, jpeg, pydicom.uid.JPEGBaseline8Bit)).size == (64, 64)
    # The header says 64x64; the JPEG inside says 8000x8000 (Pillow would decode 64 M pixels) or 60000x60000.
    for size in (8000, 60000):
        data = _encapsulated(small, _sof_sized(jpeg, size, size), pydicom.uid.JPEGBaseline8Bit)
        with pytest.raises(DecodeLimitError, match=f"frame 0 is {size}x{size}x1 in its codestream but the header "
                                                   "says 64x64x1"):
            load_image(data)
    # JPEG 2000: the SIZ segment's image size.
    j2k = pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm", download=False))
    frame = bytearray(next(pydicom.encaps.generate_frames(j2k.PixelData, number_of_frames=1)))
    struct.pack_into(">II", frame, 8, 50000, 50000)
    with pytest.raises(DecodeLimitError, match="50000x50000x1 in its codestream"):
        load_image(_encapsulated(j2k, bytes(frame), j2k.file_meta.TransferSyntaxUID))
    # RLE: runs adding up to 12.8 MB for a 64x64x8-bit plane.
    rle = struct.pack("<16I", 1, 64, *[0] * 14) + b"\x81\x00" * 100_000
    peak, raised = traced_peak(lambda: load_image(_encapsulated(small, rle, pydicom.uid.RLELossless)))
    assert isinstance(raised, DecodeLimitError) and "RLE frame 0 decodes to more than 64x64x1" in str(raised)
    assert peak < 8 * 1024 * 1024
    # A syntax whose frames we cannot measure is not decoded blind.
    with pytest.raises(RadscribeError, match="cannot check its decoded size"):
        load_image(_encapsulated(small, b"\x00\x00\x01\xb3" + b"\0" * 64, pydicom.uid.MPEG2MPML))


@pytest.mark.parametrize("keyword", ["WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept",
                                     "NumberOfFrames"])
def test_non_numeric_dicom_attributes_are_one_clear_error(keyword):
    with pytest.raises(RadscribeError, match=f"DICOM {keyword} 'abc' is not a number"):
        load_image(non_numeric_dicom(keyword))
    with pytest.raises(RadscribeError, match=f"DICOM {keyword} 'nan' is not a (finite number|non-negative integer)"):
        load_image(non_numeric_dicom(keyword, "nan"))


def test_deeply_nested_sequences_are_a_clear_error():
    # 5,000 nested sequences of undefined length: pydicom recurses once per level.
    item, seq = b"\xfe\xff\x00\xe0\xff\xff\xff\xff", b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff"
    body = (seq + item) * 5000
    data = b"\0" * 128 + b"DICM" + _meta_for(pydicom.uid.ExplicitVRLittleEndian) + body
    with pytest.raises(RadscribeError, match="not a readable DICOM file"):
        load_image(data)


def _meta_for(syntax) -> bytes:
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = "1.2.3"
    meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue()
