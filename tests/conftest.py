"""Shared fixtures: tiny real-architecture models (built once per session) and a small synthetic dataset.

`tiny_model_dir("qwen3_vl")` -> a model folder written by `radscribe.model.tiny.build_tiny_model` (seed 0);
`tiny_dataset` -> a prepared-dataset folder (docs/architecture.md) written by `radscribe.data.synth` + `prepare`:
200 train and 46 val rows whose reports follow the image (lesion position, density, size), with ground truth.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests share 2 cores with other work: thread contention makes tiny models several times slower (FIELD_NOTES).
os.environ.setdefault("OMP_NUM_THREADS", "1")


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


def make_synth_dataset(root: Path, n: int = 246, size: int = 64, val_ratio: float = 0.17) -> Path:
    """`radscribe synth` + `radscribe prepare` into `root`: with the defaults, 200 train and 46 val rows of 64x64
    PNG phantoms with Chinese reports and ground truth (the split is a hash of the row id, hence n=246)."""
    from radscribe.data.prepare import PrepareConfig, prepare
    from radscribe.data.synth import SynthConfig, synth

    shards = synth(SynthConfig(out=str(root / "synth"), n=n, size=size, format="png"))
    prepare(PrepareConfig(inputs=[str(s) for s in shards], out=str(root / "dataset"), val_ratio=val_ratio))
    return root / "dataset"


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A prepared-dataset folder from synth + prepare: 200 train + 46 val rows, 64x64 PNG phantoms."""
    return make_synth_dataset(tmp_path_factory.mktemp("tiny-dataset"))
