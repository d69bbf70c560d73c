"""A run's records: RUN/log.jsonl (one JSON per logging step), TensorBoard events in RUN/tb, RUN/loss.png, and
which checkpoints RUN/checkpoints holds.

Written by `radscribe train` through `RunLog` (a Trainer callback), read by `radscribe report`, eval and the
bench. This module imports neither transformers nor the training module, so readers stay cheap.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def read_log(run: str | Path) -> list[dict]:
    """The records of RUN/log.jsonl, oldest first; empty when the run logged nothing."""
    path = Path(run) / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def loss_summary(run: str | Path) -> dict:
    """First and last logged training loss and the first eval loss (None where nothing was logged)."""
    records = read_log(run)
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    return {"first_logged_loss": losses[0] if losses else None, "last_logged_loss": losses[-1] if losses else None,
            "eval_loss_start": evals[0] if evals else None}


def truncate_log(run: Path, step: int) -> None:
    """Keep only the records up to `step` (a resumed run redoes the steps after its checkpoint)."""
    kept = [r for r in read_log(run) if r.get("step", 0) <= step]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def checkpoint_step(path: Path) -> int | None:
    """N of a `checkpoint-N` folder, else None."""
    prefix, _, step = Path(path).name.rpartition("-")
    return int(step) if prefix == "checkpoint" and step.isdigit() else None


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete HF Trainer checkpoint in RUN/checkpoints (what `--resume` continues from)."""
    folder = Path(folder)
    found = [p for p in folder.glob("checkpoint-*") if checkpoint_step(p) is not None
             and (p / "trainer_state.json").is_file()] if folder.is_dir() else []
    return max(found, key=checkpoint_step) if found else None


class RunLog:
    """log.jsonl + TensorBoard with throughput; only the main process writes.

    A transformers `TrainerCallback` by its interface: the Trainer calls every `on_*` event on each callback, and
    the ones not handled here are no-ops (`__getattr__`), so that importing this module needs no transformers.
    """

    def __init__(self, run: Path, samples_per_step: int):
        self.run, self.samples_per_step = Path(run), samples_per_step
        self.writer = None
        self.last = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run / "tb"))
        self.last = (time.perf_counter(), state.global_step, state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now, step, tokens = time.perf_counter(), state.global_step, state.num_input_tokens_seen
        record = {"step": step, "epoch": round(state.epoch or 0.0, 4)}
        names = {"learning_rate": "lr"}
        for key, value in logs.items():
            if isinstance(value, (int, float)):
                record[names.get(key, key)] = value
        if "loss" in logs and self.last is not None:
            seconds = max(now - self.last[0], 1e-9)
            record["samples_per_s"] = round((step - self.last[1]) * self.samples_per_step / seconds, 3)
            record["tokens_per_s"] = round((tokens - self.last[2]) / seconds, 1)
            self.last = (now, step, tokens)
        with (self.run / "log.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer:
            for key, value in record.items():
                if key not in ("step", "epoch"):
                    self.writer.add_scalar(("eval/" if key.startswith("eval_") else "train/") + key, value, step)
            self.writer.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if self.writer:
            self.writer.close()

    def __getattr__(self, name: str):
        if name.startswith("on_"):
            return _ignore
        raise AttributeError(name)


def _ignore(*args, **kwargs) -> None:
    return None


def plot_loss(run: Path) -> Path:
    """loss.png from log.jsonl: training loss per step, eval loss as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(run)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run / "loss.png", dpi=100)
    plt.close(fig)
    return run / "loss.png"
