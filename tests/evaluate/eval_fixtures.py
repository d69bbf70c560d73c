"""A small ShareGPT dataset folder (docs/architecture.md) written row by row, for tests that plant leaks or errors.

Images, reports and ground truth come from `radscribe.data.synth` (the phantoms `radscribe synth` writes); the rows
are laid out here, without `prepare`, so a test can change one row's image, group or truth before writing.
"""

import io
import json
from pathlib import Path

from PIL import Image

from radscribe.data.synth import render, report, sample_truth

PROMPT = "<image>图片中的诊断结果是怎样?"


def synth_rows(n: int, seed: int, locations: tuple[str, ...], size: int = 64) -> list[dict]:
    """`n` rows, one synthetic patient each, with a lesion at one of `locations` in turn: id, group, truth, image."""
    rows = []
    for i in range(n):
        truth = sample_truth(seed, i, normal_fraction=0.0)
        truth = {k: truth[k] for k in ("modality", "organ", "location", "density", "size", "area_pct", "finding")}
        truth["location"] = locations[i % len(locations)]
        rows.append({"id": f"s{seed}-{i:04d}", "truth": truth, "group": f"patient-{seed}-{i}",
                     "image": Image.fromarray(render(truth, seed, i, size))})
    return rows


def clean_split() -> tuple[list[dict], list[dict]]:
    """24 train and 8 val rows that share no image: pHash mostly sees the lesion, so different patients with a
    lesion at the same place look alike to it (2-4 bits); here train lesions are upper, val ones lower or central
    (12+ bits apart)."""
    return (synth_rows(24, 1, ("left upper", "right upper")),
            synth_rows(8, 2, ("left lower", "right lower", "central")))


def write_dataset(root: Path, train: list[dict], val: list[dict]) -> Path:
    """Write the rows as DATASET/{train,val}.json + images/ (PNG, or a row's own `image_bytes` as JPEG)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("val", val)):
        out = []
        for row in rows:
            if "image_bytes" in row:
                data, ext = row["image_bytes"], "jpg"
            else:
                buf = io.BytesIO()
                row["image"].save(buf, format="PNG")
                data, ext = buf.getvalue(), "png"
            name = f"images/{row['id']}.{ext}"
            (root / name).write_bytes(data)
            out.append({"id": row["id"],
                        "messages": [{"role": "user", "content": PROMPT},
                                     {"role": "assistant", "content": row.get("report") or report(row["truth"])}],
                        "images": [name], "group": row["group"], "truth": row["truth"]})
        (root / f"{split}.json").write_text(json.dumps(out, ensure_ascii=False), encoding="utf-8")
    return root
