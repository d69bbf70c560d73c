"""The streaming ledger with 2 ranks (torchrun, gloo, DDP): each rank draws its own rows through the Trainer's
sampler, every rank's DataLoader workers record what they reject, and RUN/rejects.jsonl and train_summary.json
still account for every row once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_encode import REJECT_CUTOFF, expected_rejects, make_rejects_dataset

pytestmark = pytest.mark.slow


def test_two_ranks_reject_the_same_rows_and_account_for_every_row(tiny_model_dir, tiny_dataset, tmp_path):
    from radscribe.model.load import load_processor

    model_dir = tiny_model_dir("qwen3_vl")
    dataset = make_rejects_dataset(tiny_dataset, tmp_path / "dataset")
    expected = expected_rejects(load_processor(model_dir), dataset)
    run = tmp_path / "run"
    command = [sys.executable, "-m", "radscribe.cli", "train", "--model", str(model_dir), "--data", str(dataset),
               "--out", str(run), "--nproc", "2", "train.precision=fp32", "train.epochs=1",
               "train.per_device_batch=2", "train.grad_accum=1", "train.logging_steps=1", "train.save_steps=1000",
               f"data.cutoff_len={REJECT_CUTOFF}", "train.dataloader_workers=1"]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    ledger = [json.loads(line) for line in (run / "rejects.jsonl").read_text().splitlines()]
    assert {(r["split"], r["row"]): r["reason"] for r in ledger} == expected and len(ledger) == len(expected)
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 10  # 40 rows / (2 ranks x 2)
    assert summary["rows"] == {"train": {"rows": 40, "used": 34, "rejected": 6, "not_reached": 0},
                               "val": {"rows": 10, "used": 9, "rejected": 1, "not_reached": 0}}
    # both ranks met rows of their own shard, in their workers, and wrote them as they went
    for rank in (0, 1):
        assert (run / "rows" / f"train-rank{rank}.status").is_file()
    met = {rank: [json.loads(line)["row"] for part in (run / "rows").glob(f"train-rank{rank}-pid*.jsonl")
                  for line in part.read_text().splitlines()] for rank in (0, 1)}
    assert met[0] and met[1] and set(met[0]) | set(met[1]) == {row for split, row in expected if split == "train"}
