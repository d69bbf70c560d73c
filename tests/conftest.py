"""Shared fixtures: tiny real-architecture models (built once per session) and a small synthetic dataset.

`tiny_model_dir("qwen3_vl")` -> a model folder written by `radscribe.model.tiny.build_tiny_model` (seed 0);
`tiny_dataset` -> a prepared-dataset folder (docs/architecture.md) with 200 train and 40 val rows whose reports
are a deterministic function of the image (lesion position, density, size), so a model can learn them.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

# Tests share 2 cores with other work: thread contention makes tiny models several times slower (FIELD_NOTES).
os.environ.setdefault("OMP_NUM_THREADS", "1")

LOCATIONS = {"左上": (0.25, 0.25), "右上": (0.75, 0.25), "左下": (0.25, 0.75), "右下": (0.75, 0.75),
             "中央": (0.5, 0.5)}
ORGANS = ["脑", "肺", "肝脏", "肾脏"]
FINDINGS = ["结节", "肿块", "囊肿", "出血"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: arch ("qwen3_vl", "qwen3_vl_moe", "qwen2_5_vl") -> a tiny model folder, built once per session."""
    from radscribe.model.tiny import build_tiny_model

    built: dict[str, Path] = {}

    def make(arch: str = "qwen3_vl") -> Path:
        if arch not in built:
            built[arch] = build_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"), seed=0)
        return built[arch]

    return make


def write_dataset(root: Path, n_train: int = 200, n_val: int = 40, size: int = 64, seed: int = 0) -> Path:
    """A prepared-dataset folder of phantom images (one bright or dark blob) with templated Chinese reports."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    splits = {"train": [], "val": []}
    for i in range(n_train + n_val):
        location = rng.choice(list(LOCATIONS))
        high = rng.random() < 0.5
        large = rng.random() < 0.5
        organ, finding = rng.choice(ORGANS), rng.choice(FINDINGS)
        image = Image.new("RGB", (size, size), (96, 96, 96))
        cx, cy = (int(v * size) for v in LOCATIONS[location])
        r = size // (5 if large else 10)
        shade = 230 if high else 20
        ImageDraw.Draw(image).ellipse((cx - r, cy - r, cx + r, cy + r), fill=(shade, shade, shade))
        name = f"images/syn-{i:04d}.png"
        image.save(root / name)
        report = (f"这是一张{organ}部CT图像。{location}区域可见一{'大' if large else '小'}的"
                  f"{'高密度' if high else '低密度'}影,考虑{finding}。周围结构未见明显异常。")
        row = {"id": f"syn-{i:04d}",
               "messages": [{"role": "user", "content": "<image>图片中的诊断结果是怎样?"},
                            {"role": "assistant", "content": report}],
               "images": [name], "group": f"patient-{i:04d}",
               "truth": {"modality": "CT", "organ": organ, "location": location,
                         "density": "high" if high else "low", "size": "large" if large else "small",
                         "finding": finding}}
        splits["train" if i < n_train else "val"].append(row)
    for split, rows in splits.items():
        (root / f"{split}.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A prepared-dataset folder: 200 train + 40 val rows, 64x64 PNG phantoms, reports that follow the image."""
    return write_dataset(tmp_path_factory.mktemp("tiny-dataset"))
