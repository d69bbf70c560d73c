"""Fixtures of the eval tests (helpers live in eval_fixtures.py so test modules can import them)."""

import pytest
from eval_fixtures import clean_split, write_dataset


@pytest.fixture
def small_dataset(tmp_path):
    return write_dataset(tmp_path / "ds", *clean_split())
