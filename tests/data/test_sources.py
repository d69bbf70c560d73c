"""MedTrinity parquet readers: file/glob/folder inputs, both layouts, schema errors, resume skipping, groups."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from radscribe.data.sources import check_grouping, check_schema, medtrinity_rows, parquet_files, row_groups
from radscribe.errors import RadscribeError


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((16, 16)) * 255).astype("uint8")).save(buf, "JPEG")
    return buf.getvalue()


def _demo(path, n, row_group_size=4, offset=0):
    images = [{"bytes": _jpeg(i), "path": f"vol{i // 3:03d}_slice{i % 3}.jpg"} for i in range(offset, offset + n)]
    table = pa.table({"image": images, "id": [f"r{i}" for i in range(offset, offset + n)],
                      "caption": [f"caption {i}" for i in range(offset, offset + n)],
                      "source": [f"src{i % 2}" for i in range(offset, offset + n)]})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_inputs_file_glob_folder_and_missing(tmp_path):
    (tmp_path / "sub").mkdir()
    a = _demo(tmp_path / "a.parquet", 3)
    b = _demo(tmp_path / "sub" / "b.parquet", 2)
    (tmp_path / "notes.txt").write_text("x")
    assert parquet_files(str(a)) == [a]
    assert parquet_files(str(tmp_path / "*.parquet")) == [a]
    assert parquet_files(tmp_path) == [a, b]
    assert sum(unit.num_rows for unit in row_groups(tmp_path)) == 5
    with pytest.raises(RadscribeError, match="does not exist"):
        parquet_files(str(tmp_path / "nope.parquet"))
    with pytest.raises(RadscribeError, match="no .parquet"):
        parquet_files(str(tmp_path / "*.csv"))


def test_wrong_schema_names_file_and_missing_columns(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"picture": [b"x"], "text": ["t"]}), path)
    with pytest.raises(RadscribeError) as err:
        check_schema(path, None)
    assert str(path) in str(err.value) and "image, caption" in str(err.value) and "file_name" in str(err.value)
    not_parquet = tmp_path / "x.parquet"
    not_parquet.write_bytes(b"not parquet at all")
    with pytest.raises(RadscribeError, match="not a readable parquet"):
        check_schema(not_parquet, None)


def test_demo_rows_carry_bytes_ids_and_positions(tmp_path):
    _demo(tmp_path / "a.parquet", 10)
    rows = list(medtrinity_rows(tmp_path / "a.parquet"))
    assert [r.id for r in rows] == [f"r{i}" for i in range(10)]
    assert [r.index for r in rows] == list(range(10))
    assert rows[4].image == _jpeg(4) and rows[4].caption == "caption 4"
    assert rows[0].source == str(tmp_path / "a.parquet") and rows[0].group is None and rows[0].truth == {}


@pytest.mark.parametrize("start", [0, 1, 4, 5, 9, 10, 13, 16])
def test_start_skips_exactly_that_many_rows_across_files(tmp_path, start):
    _demo(tmp_path / "a.parquet", 10, row_group_size=4)
    _demo(tmp_path / "b.parquet", 6, row_group_size=4, offset=10)
    everything = list(medtrinity_rows(tmp_path))
    resumed = list(medtrinity_rows(tmp_path, start=start))
    assert [(r.id, r.index, r.source) for r in resumed] == [(r.id, r.index, r.source) for r in everything[start:]]


def test_group_by_source_patient_and_regex(tmp_path):
    _demo(tmp_path / "a.parquet", 6)
    assert [r.group for r in medtrinity_rows(tmp_path, group_by="source")] == ["src0", "src1"] * 3
    assert [r.group for r in medtrinity_rows(tmp_path, group_by=r"vol(\d+)_")] == ["000"] * 3 + ["001"] * 3
    assert [r.group for r in medtrinity_rows(tmp_path, group_by=r"vol\d+")] == ["vol000"] * 3 + ["vol001"] * 3
    with pytest.raises(RadscribeError, match="regex"):
        list(medtrinity_rows(tmp_path, group_by="vol(["))


def test_check_grouping_passes_what_can_group_and_names_what_cannot(tmp_path):
    units = row_groups(_demo(tmp_path / "a.parquet", 6))
    for group_by in (None, "source", r"vol(\d+)_", "similar"):
        check_grouping(units, group_by)
    with pytest.raises(RadscribeError, match="a.parquet has no `patient` column"):
        check_grouping(units, "patient")
    with pytest.raises(RadscribeError, match=r"matches none of the first 4 file names .*'vol000_slice0.jpg'"):
        check_grouping(units, r"^scan(\d+)")
    binary = tmp_path / "bin.parquet"
    pq.write_table(pa.table({"image": pa.array([_jpeg(1)], pa.binary()), "id": ["a"], "caption": ["x"]}), binary)
    with pytest.raises(RadscribeError, match="stores no file names"):
        check_grouping(row_groups(binary), "vol")


def test_full_layout_joins_images_folder_and_never_escapes_it(tmp_path):
    images = tmp_path / "images"
    (images / "nested").mkdir(parents=True)
    (images / "a.jpg").write_bytes(_jpeg(1))
    (images / "nested" / "b.jpg").write_bytes(_jpeg(2))
    (tmp_path / "secret.jpg").write_bytes(_jpeg(3))
    meta = tmp_path / "meta.parquet"
    pq.write_table(pa.table({"file_name": ["a.jpg", "b.jpg", "missing.jpg", "../secret.jpg"],
                             "caption": ["A", "B", "C", "D"], "source": ["s", "s", "s", "s"]}), meta)
    with pytest.raises(RadscribeError, match="--images"):
        list(medtrinity_rows(meta))
    rows = list(medtrinity_rows(meta, images_dir=str(images), group_by="source"))
    assert [r.id for r in rows] == ["a", "b", "missing", "secret"]
    assert rows[0].image == _jpeg(1) and rows[1].image == _jpeg(2)  # found by base name in a subfolder
    assert rows[2].image is None and rows[2].reject == "missing image file"
    assert rows[3].image is None and rows[3].reject == "missing image file"
    assert rows[0].group == "s"


def test_synth_truth_columns_become_row_truth(tmp_path):
    from radscribe.data.synth import synth

    synth(out=str(tmp_path), n=4, size=32, slices_per_patient=2)
    rows = list(medtrinity_rows(tmp_path, group_by="patient"))
    assert rows[0].group == rows[1].group == "patient-000000" != rows[2].group
    assert set(rows[0].truth) == {"modality", "organ", "location", "density", "size", "area_pct", "finding"}


def test_binary_image_column_and_null_struct(tmp_path):
    path = tmp_path / "bin.parquet"
    pq.write_table(pa.table({"image": pa.array([_jpeg(1), None], pa.binary()), "id": ["a", "b"],
                             "caption": ["x", "y"]}), path)
    rows = list(medtrinity_rows(path))
    assert rows[0].image == _jpeg(1) and rows[1].image is None
    struct = tmp_path / "struct.parquet"
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array([None, {"bytes": None, "path": "p.jpg"}], image_type),
                             "caption": ["x", "y"]}), struct)
    rows = list(medtrinity_rows(struct))
    assert [r.image for r in rows] == [None, None]
    assert [r.id for r in rows] == [None, "p"]  # no id column: the image path's stem, when there is one
