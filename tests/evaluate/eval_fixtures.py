"""A small hand-written ShareGPT dataset folder (docs/architecture.md) with phantom images and ground truth.

Used until the shared fixtures of tests/conftest.py and `radscribe.data.synth` exist; it needs neither.
"""

import io
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

MODALITY = {"CT": "CT", "MRI": "磁共振", "X-ray": "X线"}
ORGAN = {"brain": "脑部", "lung": "肺部", "liver": "肝脏", "kidney": "肾脏"}
LOCATION = {"left upper": ("左上", (0.3, 0.3)), "right upper": ("右上", (0.7, 0.3)),
            "left lower": ("左下", (0.3, 0.7)), "right lower": ("右下", (0.7, 0.7)), "central": ("中央", (0.5, 0.5))}
FINDING = {"nodule": "结节", "mass": "肿块", "cyst": "囊肿", "hemorrhage": "出血"}


def phantom(truth: dict, seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = 80 + 40 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.16) + rng.normal(0, 25, (size, size))
    cx, cy = LOCATION[truth["location"]][1]
    radius = 0.08 if truth["size"] == "small" else 0.16
    image[(xx - cx) ** 2 + (yy - cy) ** 2 < radius ** 2] = 230 if truth["density"] == "high" else 10
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).convert("RGB")


def report(truth: dict) -> str:
    density = "高密度" if truth["density"] == "high" else "低密度"
    size = "小" if truth["size"] == "small" else "大"
    return (f"这是一张{ORGAN[truth['organ']]}{MODALITY[truth['modality']]}图像，"
            f"{LOCATION[truth['location']][0]}可见一个{size}的{density}{FINDING[truth['finding']]}。")


def synth_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        truth = {"modality": rng.choice(list(MODALITY)), "organ": rng.choice(list(ORGAN)),
                 "location": rng.choice(list(LOCATION)), "density": rng.choice(["high", "low"]),
                 "size": rng.choice(["small", "large"]), "finding": rng.choice(list(FINDING))}
        rows.append({"id": f"s{seed}-{i:04d}", "truth": truth, "group": f"patient-{seed}-{i}",
                     "image": phantom(truth, seed * 100000 + i)})
    return rows


def write_dataset(root: Path, train: list[dict], val: list[dict]) -> Path:
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
                        "messages": [{"role": "user", "content": "<image>图片中的诊断结果是怎样?"},
                                     {"role": "assistant", "content": row.get("report") or report(row["truth"])}],
                        "images": [name], "group": row["group"], "truth": row["truth"]})
        (root / f"{split}.json").write_text(json.dumps(out, ensure_ascii=False), encoding="utf-8")
    return root
