"""Fixtures of the model tests."""

import pytest


@pytest.fixture(scope="session")
def models(tiny_model_dir):
    """arch -> the session's seed-0 tiny model folder (tests/conftest.py), shared by every test: read-only."""
    return {arch: tiny_model_dir(arch) for arch in ("qwen3_vl", "qwen3_vl_moe", "qwen2_5_vl")}
