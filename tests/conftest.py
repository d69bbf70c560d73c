"""Shared fixtures: tiny real-architecture models (built once per session) and a small synthetic dataset.

Two kinds of model folder, both for "qwen3_vl", "qwen3_vl_moe" and "qwen2_5_vl", seed 0, built once per session:
`tiny_model_dir(arch)` -> `radscribe.model.tiny.build_tiny_model` (`--layout ours`): a ~780-token vocabulary trained
  on our reports, fp32, our own template and processor limits. For tests that must learn in seconds (demo, training).
`real_model_dir(arch)` -> `radscribe.model.real_layout.build_real_layout_model` (`--layout real`): the published
  download's files with tiny widths (text hidden 64, 4 layers; vision hidden 32, depth 2) and random bf16 weights:
  Qwen's real 151,643-rank BPE with the added tokens at 151643+, the published chat template, processor limits
  (Qwen3-VL: 64 to 16,384 image tokens) and sampling defaults (generation_config.json), a transformers-4.57-style
  config.json, released key names, the MoE sharded with its experts in the hub layout. For every test of the path a
  user with a downloaded folder takes. Its tokenizer conversion is cached in ~/.cache/radscribe (see real_layout).
`tiny_dataset` -> a prepared-dataset folder (docs/architecture.md) written by `radscribe.data.synth` + `prepare`:
200 train and 46 val rows whose reports follow the image (lesion position, density, size), with ground truth.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests share 2 cores with other work: thread contention makes tiny models several times slower (FIELD_NOTES).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _built_once(tmp_path_factory, build, prefix: str):
    built: dict[str, Path] = {}

    def make(arch: str = "qwen3_vl") -> Path:
        if arch not in built:
            built[arch] = build(arch, tmp_path_factory.mktemp(f"{prefix}-{arch}"), seed=0)
        return built[arch]

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: arch ("qwen3_vl", "qwen3_vl_moe", "qwen2_5_vl") -> a tiny model folder, built once per session."""
    from radscribe.model.tiny import build_tiny_model

    return _built_once(tmp_path_factory, build_tiny_model, "tiny")


@pytest.fixture(scope="session")
def real_model_dir(tmp_path_factory):
    """Factory: arch -> a folder laid out like the published download (tiny widths), built once per session.

    Read-only for tests: copy it (shutil.copytree) before changing a file in it."""
    from radscribe.model.real_layout import build_real_layout_model

    return _built_once(tmp_path_factory, build_real_layout_model, "real")


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
