"""radscribe synth: deterministic MedTrinity-shaped shards whose ground truth is visible in the pixels."""

import io
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from radscribe.data.synth import (FINDING_OF, LESION_CONTRAST, LOCATION_XY, MODALITY_LEVELS, VOCAB, SynthConfig,
                                  report, sample_truth, synth, synth_reports)
from radscribe.errors import RadscribeError


def _table(paths):
    rows = []
    for p in paths:
        rows.extend(pq.read_table(p).to_pylist())
    return rows


def test_vocab_matches_the_architecture_table():
    assert list(VOCAB["modality"]) == ["CT", "MRI", "X-ray"]
    assert list(VOCAB["organ"]) == ["brain", "lung", "liver", "kidney"]
    assert list(VOCAB["location"]) == ["left upper", "right upper", "left lower", "right lower", "central"]
    assert [VOCAB["location"][k]["zh"] for k in VOCAB["location"]] == ["左上", "右上", "左下", "右下", "中央"]
    assert list(VOCAB["density"]) == ["high", "low"] and list(VOCAB["size"]) == ["small", "large"]
    assert set(VOCAB["finding"]) == {"nodule", "mass", "cyst", "hemorrhage", "normal"}
    assert VOCAB["modality"]["MRI"]["zh"] == "磁共振(MRI)" and VOCAB["density"]["low"]["zh_mri"] == "低信号"
    assert set(FINDING_OF.values()) == {"nodule", "mass", "cyst", "hemorrhage"}


def test_shards_are_deterministic_and_independent_of_sharding(tmp_path):
    a = _table(synth(out=str(tmp_path / "a"), n=12, seed=3, size=64, shard_rows=5))
    b = _table(synth(out=str(tmp_path / "b"), n=12, seed=3, size=64, shard_rows=12))
    c = _table(synth(out=str(tmp_path / "c"), n=12, seed=4, size=64, shard_rows=12))
    assert len(list((tmp_path / "a").glob("*.parquet"))) == 3
    assert a == b
    assert [r["caption"] for r in a] != [r["caption"] for r in c]


def test_schema_is_medtrinity_demo_and_datasets_decodes_images(tmp_path):
    import datasets

    synth(out=str(tmp_path), n=6, size=48, format="png", slices_per_patient=3)
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "cache"))
    for col in ("image", "id", "caption", "patient", "source", "modality", "organ", "location", "density", "size",
                "area_pct", "finding"):
        assert col in ds.column_names
    first = ds[0]
    assert isinstance(first["image"], Image.Image) and first["image"].size == (48, 48)
    assert first["image"].format == "PNG"
    assert ds["patient"][:3] == ["patient-000000"] * 3 and ds["patient"][3] == "patient-000001"
    assert ds["id"][:3] == ["synth-p000000-s00", "synth-p000000-s01", "synth-p000000-s02"]
    # Slices of one patient share every ground-truth field.
    assert len({(r["modality"], r["organ"], r["finding"], r["location"]) for r in ds.select(range(3))}) == 1


@pytest.mark.parametrize("volumes", [False, True])
def test_ground_truth_is_visible_in_the_pixels(tmp_path, volumes):
    size = 96
    rows = _table(synth(out=str(tmp_path), n=60, size=size, seed=1, slices_per_patient=3, volumes=volumes))
    seen = Counter()
    for r in rows:
        grey = np.asarray(Image.open(io.BytesIO(r["image"]["bytes"])))[:, :, 0].astype(float)
        # Mean grey in a small window at each of the five lesion positions.
        means = {}
        for loc, (fx, fy) in LOCATION_XY.items():
            x, y = int(fx * size), int(fy * size)
            means[loc] = grey[y - 2:y + 3, x - 2:x + 3].mean()
        tissue = np.median(list(means.values()))
        if r["finding"] == "normal":
            assert r["location"] is None and r["area_pct"] == 0.0
            assert max(abs(m - tissue) for m in means.values()) < 30
            seen["normal"] += 1
            continue
        deviation = {loc: m - tissue for loc, m in means.items()}
        brightest = max(deviation, key=lambda k: abs(deviation[k]))
        assert brightest == r["location"]
        assert np.sign(deviation[brightest]) == np.sign(LESION_CONTRAST[r["density"]])
        assert abs(deviation[brightest]) > 40
        assert r["finding"] == FINDING_OF[(r["density"], r["size"])]
        seen[r["size"]] += 1
    assert seen["normal"] > 0 and seen["small"] > 0 and seen["large"] > 0


def test_modality_has_a_distinct_intensity_profile(tmp_path):
    rows = _table(synth(out=str(tmp_path), n=40, size=64, seed=2))
    corner = {}
    for r in rows:
        grey = np.asarray(Image.open(io.BytesIO(r["image"]["bytes"])))[:, :, 0].astype(float)
        corner.setdefault(r["modality"], []).append(grey[:4, :4].mean())
    ct, mri, xray = (np.mean(corner[m]) for m in ("CT", "MRI", "X-ray"))
    assert ct < 8 < mri and xray > MODALITY_LEVELS["MRI"][0] + 15


def test_reports_use_vocab_terms_in_medtrinity_order():
    for index in range(40):
        truth = sample_truth(0, index)
        zh, en = report(truth, "zh"), report(truth, "en")
        assert VOCAB["finding"][truth["finding"]]["zh"] in zh and VOCAB["organ"][truth["organ"]]["zh"] in zh
        assert VOCAB["modality"][truth["modality"]]["zh"] in zh and VOCAB["finding"][truth["finding"]]["en"] in en
        if truth["finding"] == "normal":
            continue
        density = VOCAB["density"][truth["density"]]
        assert (density["zh_mri"] if truth["modality"] == "MRI" else density["zh"]) in zh
        loc = VOCAB["location"][truth["location"]]["zh"]
        # modality/organ -> location and area % -> density -> finding -> neighbours
        order = [zh.index(VOCAB["modality"][truth["modality"]]["zh"]), zh.index(loc),
                 zh.index(f"{truth['area_pct']:.1f}%"), zh.index("病灶呈"), zh.index("考虑为"), zh.index("邻近结构")]
        assert order == sorted(order)
        assert f"{truth['location']} region" in en and f"{truth['area_pct']:.1f}%" in en


def test_synth_reports_equal_the_written_captions(tmp_path):
    rows = _table(synth(out=str(tmp_path), n=10, size=32, lang="en", slices_per_patient=2, seed=5))
    assert [r["caption"] for r in rows] == list(synth_reports(10, seed=5, lang="en", slices_per_patient=2))


def test_normal_fraction_and_config_errors(tmp_path):
    findings = Counter(sample_truth(0, i, normal_fraction=0.3)["finding"] for i in range(2000))
    assert 0.25 < findings["normal"] / 2000 < 0.35
    assert all(findings[f] > 200 for f in ("nodule", "mass", "cyst", "hemorrhage"))
    with pytest.raises(RadscribeError, match="--size"):
        synth(SynthConfig(out=str(tmp_path), n=3, size=8))
    with pytest.raises(RadscribeError, match="--n"):
        synth(out=str(tmp_path), n=0)


def test_two_workers_write_the_same_rows(tmp_path):
    one = _table(synth(out=str(tmp_path / "one"), n=8, size=32, shard_rows=4, workers=1))
    two = _table(synth(out=str(tmp_path / "two"), n=8, size=32, shard_rows=4, workers=2))
    assert one == two


def test_rerun_into_the_same_folder_leaves_no_stale_shards(tmp_path):
    synth(out=str(tmp_path), n=9, size=32, shard_rows=3)
    paths = synth(out=str(tmp_path), n=4, size=32, shard_rows=3)
    assert sorted(tmp_path.glob("*.parquet")) == sorted(paths) and len(paths) == 2
    assert len(_table(paths)) == 4


def test_volumes_make_adjacent_slices_near_duplicates_and_patients_distinct(tmp_path):
    from radscribe.data.similar import NEAR_THRESHOLD, image_hash

    def distances(volumes):
        rows = _table(synth(out=str(tmp_path / str(volumes)), n=160, size=96, slices_per_patient=8,
                            volumes=volumes))
        hashes = np.array([image_hash(r["image"]["bytes"], r["id"]) for r in rows], np.uint64)
        distance = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
        patient = np.array([r["patient"] for r in rows])
        same = patient[:, None] == patient[None, :]
        adjacent = np.diagonal(distance, 1)[patient[1:] == patient[:-1]]
        upper = np.triu(np.ones_like(same), 1)
        return adjacent, distance[upper & ~same], rows

    adjacent, across, rows = distances(True)
    assert np.mean(adjacent <= NEAR_THRESHOLD) > 0.5 and np.median(adjacent) <= NEAR_THRESHOLD
    assert np.mean(across <= NEAR_THRESHOLD) < 0.002 and np.median(across) > 16
    # Adjacent slices differ (the anatomy moves), and each patient keeps one ground truth.
    assert len({r["image"]["bytes"] for r in rows}) == len(rows)
    for first in range(0, 160, 8):
        assert len({(r["modality"], r["organ"], r["finding"], r["location"]) for r in rows[first:first + 8]}) == 1
    _, across_template, _ = distances(False)
    assert np.sum(across_template <= NEAR_THRESHOLD) > 5 * max(1, np.sum(across <= NEAR_THRESHOLD))
