"""Leakage audit: planted duplicates across the splits are flagged; a clean split passes --strict."""

import io

import pytest

from radscribe.cli import main
from radscribe.errors import RadscribeError
from radscribe.evaluate.audit import AuditConfig, audit, check_strict

from eval_fixtures import clean_split, synth_rows, write_dataset


def test_clean_split_has_no_image_or_group_leak(small_dataset, capsys):
    result = audit(AuditConfig(str(small_dataset)))
    assert (result.train_rows, result.val_rows) == (24, 8)
    assert not result.flagged.get("exact") and not result.flagged.get("near") and not result.flagged.get("group")
    check_strict(result, AuditConfig(str(small_dataset)))
    assert main(["audit", str(small_dataset), "--strict"]) == 0
    assert "leakage audit: 24 train rows, 8 val rows" in capsys.readouterr().out


def test_planted_duplicates_are_flagged(tmp_path, capsys):
    train, val = clean_split()
    # exact copy of train[3]'s image, a JPEG re-encode of train[5]'s (near), a shared patient, a copied caption
    val[0]["image"] = train[3]["image"]
    buf = io.BytesIO()
    train[5]["image"].save(buf, format="JPEG", quality=70)
    val[1]["image_bytes"] = buf.getvalue()
    val[2]["group"] = train[7]["group"]
    val[3]["truth"] = dict(train[9]["truth"])
    root = write_dataset(tmp_path / "ds", train, val)

    result = audit(AuditConfig(str(root)))
    assert result.flagged["exact"] == {val[0]["id"]}
    assert result.examples["exact"][0][:2] == (val[0]["id"], train[3]["id"])
    assert result.flagged["near"] == {val[1]["id"]}
    assert result.examples["near"][0][1] == train[5]["id"]
    assert result.flagged["group"] == {val[2]["id"]}
    assert val[3]["id"] in result.flagged["caption"]
    assert result.rate() == pytest.approx(3 / 8)
    with pytest.raises(RadscribeError, match="37.50% of val rows leak"):
        check_strict(result, AuditConfig(str(root)))
    check_strict(result, AuditConfig(str(root), max_rate=0.5))

    assert main(["audit", str(root)]) == 0  # without --strict it only reports
    assert main(["audit", str(root), "--strict"]) == 2
    out, err = capsys.readouterr()
    assert "exact           1" in out and "radscribe audit: error:" in err and "\n" not in err.strip()


def test_rows_without_a_group_are_counted_not_silently_skipped(tmp_path, capsys):
    train, val = synth_rows(6, 1, ("left upper", "right upper")), synth_rows(3, 2, ("left lower", "central"))
    for row in train[:2] + val[:1]:
        row["group"] = None
    result = audit(AuditConfig(str(write_dataset(tmp_path / "ds", train, val))))
    assert result.ungrouped_rows == 3
    assert "3 of 9 rows have no group key" in result.table()
