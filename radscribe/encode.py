"""Rows -> model inputs, on the fly: assistant-only labels, the one image policy, an image-safe cutoff, collation
(padded, or packed several samples to a row), and the ledger of rows that cannot be used.

Used by `radscribe train` (radscribe/train.py). Nothing is encoded before training: `StreamingSplit` hands the
Trainer's sampler row indices, and a DataLoader worker reads, decodes and encodes each row when its batch is
built (TRL's VLM collator works the same way), so time to the first step does not grow with the dataset. Two
things hold here that LLaMA-Factory's collation does not guarantee: the loss sees only assistant tokens (the
report and its end-of-turn token), and `cutoff_len` never cuts through an image's token run (their issue #5964) -
text is truncated, images are downscaled or the row is rejected, and every rejected row is written, with its
reason, to RUN/rejects.jsonl.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from radscribe import dist
from radscribe.errors import RadscribeError

IGNORE_INDEX = -100
# Per-token keys are padded along the sequence; every other key the processor returns (pixel_values,
# image_grid_thw, ...) is concatenated along dim 0, so nothing it returns is dropped (Qwen3-VL's forward
# raises without mm_token_type_ids when images are present).
SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids", "labels")
PAD_VALUES = {"labels": IGNORE_INDEX}
MAX_IMAGE_SHRINKS = 4
IMAGE_PAD = "<|image_pad|>"


class Rejected(Exception):
    """A sample that cannot be trained on; the reason is counted in the run's rejects."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def chat_segments(processor, messages: list[dict], n_images: int) -> list[tuple[str, bool]]:
    """Render the conversation with the model's own chat template and split it into (text, is_label) pieces.

    The label pieces are exactly each assistant message's content plus the end-of-turn token; whatever the
    template puts before the content (a role header, an empty think block) or after the end-of-turn token
    stays unlabelled.
    """
    from radscribe.data.dataset import to_chat

    chat = to_chat(messages, [None] * n_images)
    eos = processor.tokenizer.eos_token
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if "<image>" in message["content"]:
            raise Rejected("image inside an assistant message")
        prefix = processor.apply_chat_template(chat[:i], add_generation_prompt=True, tokenize=False)
        full = processor.apply_chat_template(chat[:i + 1], tokenize=False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise RadscribeError("the model's chat template does not render conversations incrementally; "
                                 "assistant-only labels cannot be located")
        reply = full[len(prefix):]
        start = reply.find(message["content"])
        end = reply.find(eos, start + len(message["content"]))
        if start < 0 or end < 0:
            raise RadscribeError(f"the chat template does not end assistant turns with {eos}")
        end += len(eos)
        pieces.append((prefix[len(done):] + reply[:start], False))
        pieces.append((reply[start:end], True))
        done = prefix + reply[:end]
    if not pieces:
        raise Rejected("no assistant message")
    return [(text, label) for text, label in pieces if text]


@dataclass
class Encoder:
    """One sample -> model inputs + labels, within `cutoff_len` and without cutting an image token run.

    Images are sized by the processor itself under the run's pixel limits (`size` = [image_min_pixels,
    image_max_pixels], radscribe.model.pixels), the policy that eval, chat, serve and export read back from the
    processor saved with the run: a 1024x1024 scan becomes the same tokens in training and at inference.
    """

    processor: object
    cutoff_len: int
    image_max_pixels: int
    image_min_pixels: int

    def __call__(self, sample) -> dict:
        from radscribe.data.imaging import load_image
        from radscribe.model.pixels import sized

        try:
            images = [load_image(p) for p in sample.images]
        except RadscribeError as err:  # missing, truncated or not an image: the message names the file
            raise Rejected("image unreadable", str(err)) from None
        try:
            # sized as the processor will size them, so that the downscaling below starts from what it sees
            images = [sized(self.processor, im, (self.image_min_pixels, self.image_max_pixels)) for im in images]
        except ValueError as err:  # the processor's own size rules (an aspect ratio over 200)
            raise Rejected("image size the processor refuses", str(err)) from None
        pieces = chat_segments(self.processor, sample.messages, len(images))
        for _ in range(MAX_IMAGE_SHRINKS + 1):
            queue = list(images)
            encoded = [self._encode_piece(text, label, queue) for text, label in pieces]
            kept, budget = [], self.cutoff_len
            for enc in encoded:
                n = enc["input_ids"].shape[-1]
                if n <= budget:
                    kept.append(enc)
                    budget -= n
                    continue
                if enc["is_label"] and budget > 0:  # truncate report text, never a prompt with images
                    kept.append({k: (v[..., :budget] if k in SEQUENCE_KEYS else v) for k, v in enc.items()})
                break
            if any(e["is_label"] for e in kept):
                return _concat(kept)
            images = self._shrunk(images, encoded[0])
        raise Rejected("image tokens exceed cutoff_len after downscaling")

    def _encode_piece(self, text: str, label: bool, queue: list) -> dict:
        import torch

        count = text.count(IMAGE_PAD)
        taken = queue[:count]
        del queue[:count]
        if taken:
            enc = dict(self.processor(text=[text], images=taken, size=self.pixel_size, return_tensors="pt"))
        else:
            # Text-only pieces skip the processor (its per-call overhead was half the encoding time); the
            # per-token keys it would add are constant for text: mask 1, token type 0 (not an image token).
            ids = self.processor.tokenizer([text], add_special_tokens=False, return_tensors="pt")["input_ids"]
            enc = {key: torch.ones_like(ids) if key == "attention_mask" else torch.zeros_like(ids)
                   for key in self.sequence_keys}
            enc["input_ids"] = ids
        ids = enc["input_ids"]
        enc["labels"] = ids.clone() if label else torch.full_like(ids, IGNORE_INDEX)
        enc["is_label"] = label
        return enc

    @property
    def pixel_size(self) -> dict:
        """The processor's `size` for this run's images: the one image policy (radscribe.model.pixels)."""
        return {"shortest_edge": self.image_min_pixels, "longest_edge": self.image_max_pixels}

    @functools.cached_property
    def sequence_keys(self) -> list[str]:
        """The per-token keys this processor returns for text (input_ids, attention_mask, mm_token_type_ids...)."""
        return [k for k in self.processor(text=["x"], return_tensors="pt") if k in SEQUENCE_KEYS]

    def _shrunk(self, images: list, first: dict) -> list:
        """Downscale the images so that the first prompt + one report token fit, or reject the sample."""
        image_id = self.processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        ids = first["input_ids"][0]
        image_tokens = int((ids == image_id).sum())
        if not image_tokens:
            raise Rejected("prompt text longer than cutoff_len")
        room = self.cutoff_len - (ids.shape[-1] - image_tokens) - 1
        if room <= 0:
            raise Rejected("prompt text longer than cutoff_len")
        # image tokens grow with pixel area, so scale each side by sqrt(room / tokens), with a margin for the
        # processor rounding sides up to a multiple of patch * merge
        scale = math.sqrt(room / image_tokens) * 0.9
        smaller = []
        for im in images:
            w, h = im.size
            if w * h * scale * scale < self.image_min_pixels:
                raise Rejected("image tokens exceed cutoff_len even at image_min_pixels")
            smaller.append(im.resize((max(1, int(w * scale)), max(1, int(h * scale)))))
        return smaller


def _concat(pieces: list[dict]) -> dict:
    import torch

    out: dict = {}
    for key in pieces[0]:
        if key == "is_label":
            continue
        values = [p[key] for p in pieces if key in p]
        out[key] = torch.cat(values, dim=-1 if key in SEQUENCE_KEYS else 0)
    for key in SEQUENCE_KEYS:
        if key in out:
            out[key] = out[key][0]
    return out


def pad_batch(features: list[dict], pad_token_id: int) -> dict:
    """Right-pad the per-token keys; concatenate every other key (images of all samples, in order)."""
    import torch

    longest = max(f["input_ids"].shape[-1] for f in features)
    batch: dict = {}
    keys = dict.fromkeys(k for f in features for k in f)
    for key in keys:
        if key in SEQUENCE_KEYS:
            pad = pad_token_id if key == "input_ids" else PAD_VALUES.get(key, 0)
            rows = [torch.nn.functional.pad(f[key], (0, longest - f[key].shape[-1]), value=pad) for f in features]
            batch[key] = torch.stack(rows)
        else:
            batch[key] = torch.cat([f[key] for f in features if key in f], dim=0)
    return batch


def pack_batch(features: list[dict], pad_token_id: int, max_len: int, rope_index: Callable) -> dict:
    """Several samples per row, rows of at most `max_len` tokens (first fit, in order); a sample is never split.

    Each sample keeps its own positions: the model's `get_rope_index` on that sample alone (its 3-D M-RoPE rows),
    under a text row that restarts at 0 per sample (position_ids of 4 rows, as Qwen-VL's text model reads them).
    From the restarts transformers derives a block-diagonal causal mask (sdpa/eager) or varlen boundaries
    (FlashAttention), so attention stays inside each sample. Row-end padding is a segment of its own with no labels.
    `attention_mask` is only there for the Trainer's token count: the model must not get it (`model_inputs`).
    """
    import torch

    rows: list[list[dict]] = []
    room: list[int] = []  # tokens left in each row
    for f in features:
        n = f["input_ids"].shape[-1]
        k = next((k for k, left in enumerate(room) if n <= left), None)
        if k is None:
            rows.append([f])
            room.append(max_len - n)
        else:
            rows[k].append(f)
            room[k] -= n
    longest = max_len - min(room)
    seq_keys = [k for k in SEQUENCE_KEYS if k in features[0] and k != "attention_mask"]
    batch: dict = {k: [] for k in (*seq_keys, "position_ids", "attention_mask")}
    for row in rows:
        parts: dict = {k: [] for k in batch}
        for f in row:
            n = f["input_ids"].shape[-1]
            mrope, _ = rope_index(input_ids=f["input_ids"][None], mm_token_type_ids=f["mm_token_type_ids"][None],
                                  image_grid_thw=f.get("image_grid_thw"))
            parts["position_ids"].append(torch.cat([torch.arange(n)[None], mrope[:, 0]], dim=0))
            labels = f["labels"].clone()
            labels[0] = IGNORE_INDEX  # the previous sample's last token must not learn to predict this one
            for key in seq_keys:
                parts[key].append(labels if key == "labels" else f[key])
            parts["attention_mask"].append(torch.ones(n, dtype=torch.long))
        pad = longest - sum(f["input_ids"].shape[-1] for f in row)
        if pad:
            for key in seq_keys:
                value = pad_token_id if key == "input_ids" else PAD_VALUES.get(key, 0)
                parts[key].append(torch.full((pad,), value, dtype=parts[key][0].dtype))
            parts["position_ids"].append(torch.arange(pad)[None].expand(4, -1))
            parts["attention_mask"].append(torch.zeros(pad, dtype=torch.long))
        for key, values in parts.items():
            batch[key].append(torch.cat(values, dim=-1))
    out = {key: torch.stack(values, dim=1 if key == "position_ids" else 0) for key, values in batch.items()}
    packed = [f for row in rows for f in row]  # images in the order their tokens now appear
    for key in dict.fromkeys(k for f in packed for k in f):
        if key not in SEQUENCE_KEYS:
            out[key] = torch.cat([f[key] for f in packed if key in f], dim=0)
    return out


def is_packed(batch: dict) -> bool:
    position_ids = batch.get("position_ids")
    return position_ids is not None and position_ids.ndim == 3 and position_ids.shape[0] == 4


def model_inputs(batch: dict) -> dict:
    """What the model gets. A packed batch goes without its attention_mask and without a KV cache: transformers
    reads the sample boundaries from position_ids only when neither is there (else samples attend to each other)."""
    if not is_packed(batch):
        return batch
    return {**{k: v for k, v in batch.items() if k != "attention_mask"}, "use_cache": False}


@dataclass
class Collator:
    """The Trainer's data_collator: padded rows, or with `pack_len` packed rows (runs in DataLoader workers)."""

    pad_token_id: int
    pack_len: int | None = None
    rope_index: Callable | None = None

    def __call__(self, features: list[dict]) -> dict:
        if self.pack_len:
            return pack_batch(features, self.pad_token_id, self.pack_len, self.rope_index)
        return pad_batch(features, self.pad_token_id)


def rope_index_of(model) -> Callable:
    """The model's own per-sample position computation (`get_rope_index` of Qwen2.5-VL / Qwen3-VL / -MoE)."""
    found = next((m.get_rope_index for m in model.modules() if hasattr(m, "get_rope_index")), None)
    if found is None:
        raise RadscribeError(f"data.packing: {type(model).__name__} has no get_rope_index, so per-sample positions "
                             "cannot be computed; set data.packing=false")
    return found


def trainer_class():
    """The HF Trainer, with packed batches reaching the model as `model_inputs` (it counts tokens first)."""
    from transformers import Trainer

    class StreamingTrainer(Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            return super().compute_loss(model, model_inputs(inputs), *args, **kwargs)

    return StreamingTrainer


# --- streaming splits and the ledger of rows ---------------------------------------------------------------
class RowLedger:
    """What became of each row of one split in this rank, written as it happens, by whichever process meets it.

    RUN/rows/<split>-rank<R>.status holds one byte a row (0 not reached, 1 encoded for a batch, 2 rejected), shared
    by the rank's DataLoader workers through a memory map (a row always gets the same value, so concurrent writes
    agree); each process appends the rows it rejects, with their reasons, to its own
    RUN/rows/<split>-rank<R>-pid<P>.jsonl. Nothing is sent back through the batches, so any worker count works.
    """

    def __init__(self, folder: Path, split: str, n_rows: int, fresh: bool):
        self.folder, self.split, self.rank = Path(folder), split, dist.get_dist_info().rank
        self.folder.mkdir(parents=True, exist_ok=True)
        self.status_path = self.folder / f"{split}-rank{self.rank}.status"
        if fresh:  # each rank clears only its own files, so no rank deletes what another has begun
            for old in self.folder.glob(f"{split}-rank{self.rank}[.-]*"):
                old.unlink()
        with open(self.status_path, "ab") as f:
            f.truncate(n_rows)
        self.n_rows = n_rows
        self._pid = self._status = self._log = None
        self._told: set[str] = set()

    def _open(self) -> None:
        import numpy as np

        if self._pid != os.getpid():  # first use in this process (the rank itself or a forked worker)
            self._pid = os.getpid()
            self._status = np.memmap(self.status_path, dtype=np.uint8, mode="r+", shape=(self.n_rows,))
            self._log = open(self.folder / f"{self.split}-rank{self.rank}-pid{self._pid}.jsonl", "a",
                             encoding="utf-8")

    def used(self, row: int) -> None:
        self._open()
        self._status[row] = 1

    def reject(self, row: int, sample_id: str, err: Rejected) -> None:
        self._open()
        record = {"split": self.split, "row": row, "id": sample_id, "reason": err.reason}
        if err.detail:
            record["detail"] = err.detail
        self._log.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._log.flush()
        self._status[row] = 2
        if err.reason not in self._told:  # once per reason and process; the rest are in the ledger
            self._told.add(err.reason)
            print(f"[radscribe train] rejected {self.split} row {row} ({sample_id}): {err.reason}; every rejected "
                  f"row is listed in {self.folder.parent / 'rejects.jsonl'} at the end", file=sys.stderr, flush=True)

    def read(self) -> tuple:
        """(status bytes, rejected records) of this rank, from its files (the workers' included)."""
        import numpy as np

        status = np.fromfile(self.status_path, dtype=np.uint8, count=self.n_rows)
        records = []
        for part in sorted(self.folder.glob(f"{self.split}-rank{self.rank}-pid*.jsonl")):
            records += [json.loads(line) for line in part.read_text(encoding="utf-8").splitlines() if line]
        return status, records

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pid": None, "_status": None, "_log": None}


class StreamingSplit:
    """One split for the Trainer: `len` is the row count (so steps per epoch need no pass over the data), and
    item i is row i read, decoded and encoded when its batch is built (in a DataLoader worker when there are any).

    A row that cannot be used is recorded in the ledger and replaced by the next usable row of the split (wrapping
    around): every batch keeps its size, and the replacing row is seen twice that epoch. Today's set of rejected
    rows is unchanged (a full epoch meets every row); with no rejects, batches are exactly the Trainer's sampler's.
    """

    def __init__(self, rows, encoder: Encoder, ledger: RowLedger, cache_bytes: int = 0):
        self.rows, self.encoder, self.ledger = rows, encoder, ledger
        # Encoding is deterministic and costs far more than a tiny model's step (~20 ms a sample on one core), so
        # each process keeps what it encoded, up to its budget, for the later epochs (the DataLoader workers are
        # persistent so their caches live across epochs); beyond the budget rows are re-encoded when met again.
        self.cache: dict[int, dict] = {}
        self.cache_bytes, self.cached_bytes = cache_bytes, 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self.rows)):
            row = (index + offset) % len(self.rows)
            if row in self.cache:
                return self.cache[row]
            sample = self.rows[row]
            try:
                features = self.encoder(sample)
            except Rejected as err:
                self.ledger.reject(row, sample.id, err)
                continue
            self.ledger.used(row)
            self._keep(row, features)
            return features
        raise RadscribeError(f"{self.rows.path}: no usable rows: every row of split {self.ledger.split!r} was rejected "
                             f"(reasons in {self.ledger.folder}/*.jsonl); raise data.cutoff_len or check the images")

    def _keep(self, row: int, features: dict) -> None:
        size = sum(v.numel() * v.element_size() for v in features.values() if hasattr(v, "element_size"))
        if self.cached_bytes + size <= self.cache_bytes:
            self.cache[row] = features
            self.cached_bytes += size


def streaming_splits(processor, data, run_dir: Path, train_rows, val_rows, fresh: bool):
    """The train split and (when it has rows) the val split per a `TrainConfig.data` section, encoded on access."""
    encoder = Encoder(processor, data.cutoff_len, data.image_max_pixels, data.image_min_pixels)
    if not len(train_rows):
        raise RadscribeError(f"{data.dataset}: split {data.train_split!r} has no rows")
    splits = [StreamingSplit(rows, encoder, RowLedger(run_dir / "rows", name, len(rows), fresh),
                             cache_bytes=data.encode_cache_mb * 2**20)
              for name, rows in (("train", train_rows), ("val", val_rows)) if len(rows)]
    return splits[0], (splits[1] if len(splits) > 1 else None)


def account(run_dir: Path, splits: list) -> dict:
    """Every row of every split, counted over all ranks: used, rejected (by reason) and not reached (a run that
    stopped before the end of an epoch). Writes RUN/rejects.jsonl (one line per rejected row) on the main process."""
    import numpy as np

    mine = [s.ledger.read() for s in splits]
    gathered = _all_gather(mine)
    counts: dict = {}
    rejects: list[dict] = []
    for i, split in enumerate(splits):
        status = np.maximum.reduce([rank[i][0] for rank in gathered])
        unique = {r["row"]: r for rank in gathered for r in rank[i][1]}
        rejects += [unique[row] for row in sorted(unique)]
        counts[split.ledger.split] = {"rows": len(status), "used": int((status == 1).sum()),
                                      "rejected": int((status == 2).sum()), "not_reached": int((status == 0).sum())}
    if dist.is_main():
        with (run_dir / "rejects.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects)
    return {"rows": counts, "rejected": len(rejects), "rejected_by_reason": dict(Counter(r["reason"] for r in rejects))}


def _all_gather(obj) -> list:
    import torch.distributed as torch_dist

    if not (torch_dist.is_available() and torch_dist.is_initialized()) or torch_dist.get_world_size() == 1:
        return [obj]
    out = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def worker_error(err: RadscribeError) -> RadscribeError:
    """A RadscribeError raised in a DataLoader worker arrives with the worker's traceback in its message: keep the
    one line that says what is wrong."""
    last = str(err).strip().splitlines()[-1]
    prefix = "RadscribeError: "
    return RadscribeError(last.split(prefix, 1)[1]) if prefix in last else err
