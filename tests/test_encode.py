"""Streaming encode and packing (radscribe/encode.py): rows are encoded in DataLoader workers, losses are those of
the pre-encoding path, every rejected row reaches RUN/rejects.jsonl, and packed rows give each sample its own loss.

The 2-process form of the ledger is in test_encode_multiproc.py.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from radscribe.config import config_from_args
from radscribe.data.dataset import Sample, SplitRows
from radscribe.encode import (Encoder, Rejected, RowLedger, StreamingSplit, is_packed, model_inputs, pack_batch,
                              pad_batch, rope_index_of)
from radscribe.runlog import read_log
from radscribe.train import TrainConfig, train

ASSETS = Path(__file__).parent / "assets"
# The configuration tests/assets/losses_before_streaming.json was recorded with (on the pre-encoding path).
GOLDEN_OVERRIDES = ["train.precision=fp32", "train.max_steps=6", "train.per_device_batch=8", "train.grad_accum=2",
                    "train.lr=2e-3", "train.logging_steps=1", "train.save_steps=1000", "lora.rank=16",
                    "lora.alpha=32", "train.eval_steps=3"]
REJECT_CUTOFF = 128
LONG_PROMPT = "<image>" + " ".join(str(i) for i in range(400))  # far over REJECT_CUTOFF tokens


def _cfg(model_dir, dataset, out, *overrides) -> TrainConfig:
    return config_from_args(TrainConfig, None, list(overrides),
                            **{"model.path": str(model_dir), "data.dataset": str(dataset), "output.dir": str(out)})


def _losses(run: Path) -> tuple[list, list]:
    log = read_log(run)
    return [r["loss"] for r in log if "loss" in r], [r["eval_loss"] for r in log if "eval_loss" in r]


# --- encoded once, reused in later epochs --------------------------------------------------------------------
class _Counting:
    """An encoder that counts its calls per row id."""

    def __init__(self, encoder):
        self.encoder, self.calls = encoder, Counter()

    def __call__(self, sample):
        self.calls[sample.id] += 1
        return self.encoder(sample)


@pytest.mark.parametrize("budget_rows", [100, 0])
def test_later_epochs_reuse_the_encoded_rows_within_the_cache_budget(processor, rejects_dataset, tmp_path,
                                                                      budget_rows):
    # encoding costs more than a tiny model's step: a second epoch must not encode again what fits the budget, and
    # what it returns must be what encoding gives; rejected rows are tried (and recorded) again
    dataset, _ = rejects_dataset
    rows = SplitRows(dataset, "train")
    encoder = _Counting(Encoder(processor, REJECT_CUTOFF, 768 * 768, 32 * 32))
    one = encoder.encoder(rows[0])
    row_bytes = sum(v.numel() * v.element_size() for v in one.values() if hasattr(v, "element_size"))
    split = StreamingSplit(rows, encoder, RowLedger(tmp_path / "rows", "train", len(rows), fresh=True),
                           cache_bytes=budget_rows * row_bytes * 4)
    first = [split[i]["input_ids"] for i in range(len(split))]
    second = [split[i]["input_ids"] for i in range(len(split))]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    status, records = split.ledger.read()
    rejected = {r["id"] for r in records}
    usable = [sid for sid in encoder.calls if sid not in rejected]
    assert rejected and len(usable) == int((status == 1).sum())
    counts = {encoder.calls[sid] for sid in usable}
    if budget_rows:
        assert counts == {1}  # each usable row encoded once, the stand-in for a rejected row too
    else:
        assert min(counts) >= 2  # budget 0: every epoch encodes every row again


# --- the same losses as the pre-encoding path ----------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_gives_the_losses_recorded_on_the_pre_encoding_path(workers, tiny_model_dir, tiny_dataset,
                                                                      tmp_path):
    # Recorded once with the code that encoded every row before step 1 (see the file's "what"); with no rejected
    # rows the sampler draws the same rows, so every step must see the same batch. If training numerics change on
    # purpose (LoRA init, loss), re-record with this configuration and say so in the commit.
    recorded = json.loads((ASSETS / "losses_before_streaming.json").read_text())
    run = train(_cfg(tiny_model_dir("qwen3_vl"), tiny_dataset, tmp_path / "run", *GOLDEN_OVERRIDES,
                     f"train.dataloader_workers={workers}"))
    losses, evals = _losses(run)
    assert losses == pytest.approx(recorded["loss"], rel=1e-5, abs=0)
    assert evals == pytest.approx(recorded["eval_loss"], rel=1e-5, abs=0)
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["rows"]["val"] == {"rows": 46, "used": 46, "rejected": 0, "not_reached": 0}
    # 6 steps x 16 rows of 200 (a few more prefetched by the workers): the rest is counted as not reached
    train_rows = summary["rows"]["train"]
    assert train_rows["rejected"] == 0 and 96 <= train_rows["used"] < 200
    assert train_rows["used"] + train_rows["not_reached"] == 200 and summary["first_step_s"] > 0


# --- rejected rows -------------------------------------------------------------------------------------------
def make_rejects_dataset(tiny_dataset: Path, out: Path) -> Path:
    """40 train + 10 val rows of tiny_dataset with unusable rows put in (train 3, 7, 8, 12, 13, 14; val 2)."""
    out.mkdir()
    (out / "images").symlink_to(tiny_dataset / "images")
    train_rows = json.loads((tiny_dataset / "train.json").read_text())[:40]
    val_rows = json.loads((tiny_dataset / "val.json").read_text())[:10]
    (out / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 10)
    train_rows[3]["messages"][0]["content"] = LONG_PROMPT
    train_rows[7]["images"] = ["images/missing.png"]
    train_rows[8]["images"] = ["garbage.png"]
    train_rows[12]["messages"] = train_rows[12]["messages"][:1]
    for row in train_rows[13:15]:  # two in a row: the replacement goes past both
        row["messages"][1]["content"] += "<image>"
        row["images"] = row["images"] * 2
    val_rows[2]["images"] = ["images/missing.png"]
    for name, rows in (("train", train_rows), ("val", val_rows)):
        (out / f"{name}.json").write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n")
    return out


def expected_rejects(processor, dataset: Path) -> dict:
    """{(split, row): reason} as the pre-encoding path found them: an Encoder call on every row."""
    encoder = Encoder(processor, REJECT_CUTOFF, 768 * 768, 32 * 32)
    expected = {}
    for split in ("train", "val"):
        for i, sample in enumerate(SplitRows(dataset, split)):
            try:
                encoder(sample)
            except Rejected as err:
                expected[(split, i)] = err.reason
    return expected


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from radscribe.model.load import load_processor

    return load_processor(tiny_model_dir("qwen3_vl"))


@pytest.fixture(scope="module")
def rejects_dataset(tiny_dataset, processor, tmp_path_factory):
    dataset = make_rejects_dataset(tiny_dataset, tmp_path_factory.mktemp("rejects") / "dataset")
    return dataset, expected_rejects(processor, dataset)


def test_every_rejected_row_is_in_the_ledger_with_its_reason(tiny_model_dir, rejects_dataset, tmp_path):
    dataset, expected = rejects_dataset
    assert expected == {("train", 3): "prompt text longer than cutoff_len", ("train", 7): "image unreadable",
                        ("train", 8): "image unreadable", ("train", 12): "no assistant message",
                        ("train", 13): "image inside an assistant message",
                        ("train", 14): "image inside an assistant message", ("val", 2): "image unreadable"}
    run = train(_cfg(tiny_model_dir("qwen3_vl"), dataset, tmp_path / "run", "train.precision=fp32",
                     "train.epochs=1", "train.per_device_batch=4", "train.grad_accum=1", "train.logging_steps=1",
                     "train.save_steps=1000", f"data.cutoff_len={REJECT_CUTOFF}", "train.dataloader_workers=2"))
    ledger = [json.loads(line) for line in (run / "rejects.jsonl").read_text().splitlines()]
    assert {(r["split"], r["row"]): r["reason"] for r in ledger} == expected and len(ledger) == len(expected)
    ids = {split: [s.id for s in SplitRows(dataset, split)] for split in ("train", "val")}
    assert all(r["id"] == ids[r["split"]][r["row"]] for r in ledger)
    unreadable = {r["row"]: r["detail"] for r in ledger if r["split"] == "train" and r["reason"] == "image unreadable"}
    assert "missing.png" in unreadable[7] and "garbage.png" in unreadable[8]

    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["rows"] == {"train": {"rows": 40, "used": 34, "rejected": 6, "not_reached": 0},
                               "val": {"rows": 10, "used": 9, "rejected": 1, "not_reached": 0}}
    assert summary["rejected"] == 7 and summary["rejected_by_reason"] == dict(Counter(expected.values()))
    assert (summary["train_samples"], summary["val_samples"], summary["steps"]) == (34, 9, 10)  # 40 rows / 4
    # met and written by the DataLoader workers as they went, one file per process
    parts = list((run / "rows").glob("train-rank0-pid*.jsonl"))
    assert parts and all(int(p.stem.split("pid")[1]) != os.getpid() for p in parts)


def test_a_rejected_row_is_replaced_by_the_next_usable_one(processor, rejects_dataset, tmp_path):
    dataset, _ = rejects_dataset
    rows = SplitRows(dataset, "train")
    encoder = Encoder(processor, REJECT_CUTOFF, 768 * 768, 32 * 32)
    split = StreamingSplit(rows, encoder, RowLedger(tmp_path / "rows", "train", len(rows), fresh=True))
    assert len(split) == 40
    replaced = split[13]  # 13 and 14 are rejected: row 15 stands in, so the batch keeps its size
    assert torch.equal(replaced["input_ids"], encoder(rows[15])["input_ids"])
    assert torch.equal(split[0]["input_ids"], encoder(rows[0])["input_ids"])
    status, records = split.ledger.read()
    assert status[[0, 13, 14, 15, 16]].tolist() == [1, 2, 2, 1, 0]
    assert [(r["row"], r["reason"]) for r in records] == [(13, "image inside an assistant message"),
                                                         (14, "image inside an assistant message")]


def test_a_split_with_no_usable_row_fails_in_one_line_from_a_worker(tiny_model_dir, tiny_dataset, tmp_path, capsys):
    from radscribe.cli import main

    tiny_model_dir("qwen3_vl")
    capsys.readouterr()
    code = main(["train", "--model", str(tiny_model_dir("qwen3_vl")), "--data", str(tiny_dataset), "--out",
                 str(tmp_path / "run"), "data.cutoff_len=8", "data.max_samples=6", "data.val_split=null",
                 "train.max_steps=1", "train.per_device_batch=2", "train.dataloader_workers=1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "radscribe train: error:" in err and "no usable rows: every row of split 'train' was " \
        "rejected" in err and "Traceback" not in err


# --- packing -------------------------------------------------------------------------------------------------
def _features(processor, dataset: Path, n: int) -> list[dict]:
    encoder = Encoder(processor, 2048, 768 * 768, 32 * 32)
    rows = SplitRows(dataset, "train")
    text_only = Sample(id="t", messages=[{"role": "user", "content": "复述报告。"},
                                         {"role": "assistant", "content": rows[1].report}], images=[])
    long = Sample(id="l", messages=[rows[2].messages[0], {"role": "assistant", "content": rows[2].report * 4}],
                  images=rows[2].images)
    return [encoder(rows[i]) for i in range(n)] + [encoder(text_only), encoder(long)]


def _sample_losses(logits: torch.Tensor, labels: torch.Tensor, spans: list[tuple[int, int, int]]) -> list[float]:
    """Token-mean loss of each (row, start, end) span: logits at t predict the label at t + 1, inside the span."""
    out = []
    for row, start, end in spans:
        target = labels[row, start + 1:end]
        keep = target != -100
        out.append(torch.nn.functional.cross_entropy(logits[row, start:end - 1][keep], target[keep]).item())
    return out


def _packed_spans(batch: dict) -> list[tuple[int, int, int]]:
    spans = []
    for row, text_positions in enumerate(batch["position_ids"][0]):
        starts = (text_positions == 0).nonzero().flatten().tolist() + [text_positions.shape[0]]
        spans += [(row, a, z) for a, z in zip(starts, starts[1:]) if (batch["labels"][row, a:z] != -100).any()]
    return spans


@pytest.mark.parametrize("arch,layout", [("qwen3_vl", "ours"), ("qwen3_vl_moe", "ours"), ("qwen2_5_vl", "ours"),
                                         ("qwen3_vl", "real")])
def test_packed_rows_give_every_sample_its_unpacked_loss(arch, layout, tiny_model_dir, real_model_dir,
                                                         tiny_dataset):
    from radscribe.model.load import load_model

    model, processor = load_model((tiny_model_dir if layout == "ours" else real_model_dir)(arch), dtype="fp32")
    model.eval()
    features = _features(processor, tiny_dataset, 7)
    lengths = [f["input_ids"].shape[-1] for f in features]
    pad_id = processor.tokenizer.pad_token_id
    pack_len = max(lengths) * 2 + 5  # several rows, most holding more than one sample
    padded = pad_batch(features, pad_id)
    packed = pack_batch(features, pad_id, pack_len, rope_index_of(model))
    assert is_packed(packed) and 1 < packed["input_ids"].shape[0] < len(features)
    assert packed["input_ids"].shape[1] <= pack_len and "attention_mask" not in model_inputs(packed)
    # the same tokens, each sample whole and in one row; images in the order their token runs appear
    spans = _packed_spans(packed)
    assert sorted(z - a for _, a, z in spans) == sorted(lengths)
    order = []
    for row, a, z in spans:
        ids = packed["input_ids"][row, a:z]
        order.append(next(i for i, f in enumerate(features) if torch.equal(f["input_ids"], ids) and i not in order))
    grids = [f["image_grid_thw"] for i in order for f in [features[i]] if "image_grid_thw" in f]
    assert torch.equal(packed["image_grid_thw"], torch.cat(grids))
    assert int(packed["attention_mask"].sum()) == sum(lengths) == int(padded["attention_mask"].sum())
    assert packed["input_ids"].numel() < padded["input_ids"].numel()

    with torch.no_grad():
        unpacked_out = model(**padded)
        packed_out = model(**model_inputs(packed))
    unpacked = _sample_losses(unpacked_out.logits, padded["labels"], [(i, 0, n) for i, n in enumerate(lengths)])
    got = _sample_losses(packed_out.logits, packed["labels"], spans)
    assert got == pytest.approx([unpacked[i] for i in order], abs=1e-4)
    # the loss the Trainer uses is the token mean over the micro-batch: the same tokens in both layouts
    assert packed_out.loss.item() == pytest.approx(unpacked_out.loss.item(), abs=1e-4)


def test_packed_training_gives_the_unpacked_per_step_losses(tiny_model_dir, tiny_dataset, tmp_path):
    runs = {}
    for packing in (False, True):
        run = train(_cfg(tiny_model_dir("qwen3_vl"), tiny_dataset, tmp_path / f"p{packing}", *GOLDEN_OVERRIDES,
                         f"data.packing={str(packing).lower()}", "data.cutoff_len=160"))
        runs[packing] = (_losses(run), json.loads((run / "train_summary.json").read_text()))
    (unpacked, u_summary), (packed, p_summary) = runs[False], runs[True]
    assert len(packed[0]) == 6 and packed[0] == pytest.approx(unpacked[0], abs=1e-4)
    assert packed[1] == pytest.approx(unpacked[1], abs=1e-4)
    assert p_summary["tokens_seen"] == u_summary["tokens_seen"]  # non-padding tokens, counted alike
