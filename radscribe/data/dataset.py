"""Reading a prepared dataset folder (or any LLaMA-Factory sharegpt dataset with images) for train and eval.

Nothing holds a whole split: `train.json` (a JSON array, one row per line as `prepare` writes it, or laid out any
other way) and `train.jsonl` are parsed with an incremental decoder in 1 MiB reads. `read_split` streams samples;
`SplitRows` (training) keeps only each row's byte offsets, so that a sampler can draw rows in any order and a
DataLoader worker reads just the row it is given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from radscribe.errors import RadscribeError

IMAGE_TOKEN = "<image>"


@dataclass
class Sample:
    id: str
    """Row id (stable across runs)."""
    messages: list[dict]
    """ShareGPT messages: [{"role": "user"|"assistant"|"system", "content": str}, ...]."""
    images: list[Path]
    """Absolute image paths, in `<image>` order."""
    group: str | None = None
    """Group key used for the split (patient/source), when known."""
    truth: dict = field(default_factory=dict)
    """Ground-truth finding fields (synthetic data), else empty."""

    @property
    def prompt(self) -> str:
        return next(m["content"] for m in self.messages if m["role"] == "user")

    @property
    def report(self) -> str:
        return [m["content"] for m in self.messages if m["role"] == "assistant"][-1]


def split_file(dataset_dir: str | Path, split: str, missing_ok: bool = False) -> Path | None:
    """The file holding `split` of a dataset folder: ours (train.json/val.json), JSONL, or via dataset_info.json.

    `missing_ok`: None when the folder has no such split (an optional validation split); any other problem,
    and every error in the rows themselves (raised by `read_split`), still fails.
    """
    root = Path(dataset_dir)
    not_prepared = (f"{root} is not a prepared dataset folder; run `radscribe prepare {root} --out DATASET` "
                    "and pass DATASET")
    if root.is_file():
        raise RadscribeError(not_prepared)
    if not root.is_dir():
        raise RadscribeError(f"dataset folder {root} does not exist (run `radscribe prepare` first)")
    for name in (f"{split}.json", f"{split}.jsonl"):
        if (root / name).is_file():
            return root / name
    info = root / "dataset_info.json"
    if info.is_file():
        entries = json.loads(info.read_text(encoding="utf-8"))
        for key, entry in entries.items():
            if key.endswith(split) and "file_name" in entry and (root / entry["file_name"]).is_file():
                return root / entry["file_name"]
    if not any(root.glob("*.json")) and not any(root.glob("*.jsonl")):
        raise RadscribeError(not_prepared + " (it holds no train.json, train.jsonl or dataset_info.json)")
    if missing_ok:
        return None
    raise RadscribeError(f"{root}: no {split}.json, {split}.jsonl or dataset_info.json entry for split {split!r}")


CHUNK = 1 << 20
MAX_ROW_BYTES = 64 << 20
"""A row that does not parse within this many bytes is invalid JSON, not a long row (keeps a bad file's scan small)."""


def _scan_rows(path: Path, limit: int | None = None) -> Iterator[tuple[int, int, dict]]:
    """(start byte, end byte, row) of each row of a JSON array or JSON-lines file, in one streaming pass.

    The bytes are decoded as latin-1 here, one character per byte, so that positions in the text are byte offsets:
    JSON's structure is ASCII and every byte of a multi-byte UTF-8 character is >= 0x80, so rows split exactly as
    they would in UTF-8; only the strings in these rows are mis-decoded (`SplitRows` re-reads a row properly).
    """
    decoder = json.JSONDecoder()
    jsonl = path.suffix == ".jsonl"
    count = 0
    with path.open("rb") as f:
        buf, base, pos, started = "", 0, 0, jsonl  # buf[0] is byte `base` of the file
        while True:
            chunk = f.read(CHUNK).decode("latin-1")
            buf, base, pos = buf[pos:] + chunk, base + pos, 0
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    pos += 1
                if pos >= len(buf):
                    break
                if not started:
                    if buf[pos] != "[":
                        raise RadscribeError(f"{path}: expected a JSON array of rows")
                    started, pos = True, pos + 1
                    continue
                if buf[pos] == "]" and not jsonl:
                    return
                try:
                    row, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as err:
                    if chunk and len(buf) - pos < MAX_ROW_BYTES:  # the row may continue in the next read
                        break
                    raise RadscribeError(f"{path}: row {count}: truncated or invalid JSON ({err.msg}) at byte "
                                         f"{base + err.pos}") from None
                if not isinstance(row, dict):
                    raise RadscribeError(f"{path}: row {count} is not a JSON object")
                yield base + pos, base + end, row
                count += 1
                if limit is not None and count >= limit:
                    return
                pos = end
            if not chunk:
                if not started:
                    raise RadscribeError(f"{path}: empty file")
                if not jsonl:
                    raise RadscribeError(f"{path}: truncated JSON array (no closing ])")
                return


def _check_row(path: Path, index: int, row: dict) -> list:
    """The row's messages, checked: present, and one image per `<image>` placeholder."""
    messages = row.get("messages") or row.get("conversations")
    if not messages or not isinstance(messages, list):
        raise RadscribeError(f"{path}: row {index} has no messages")
    images = row.get("images") or []
    try:  # one join instead of a count per message: this runs on every row before training starts
        text = "\0".join([m["content"] if "content" in m else m.get("value", "") for m in messages])
    except (TypeError, AttributeError):
        raise RadscribeError(f"{path}: row {index}: every message needs a text content (or value)") from None
    placeholders = text.count(IMAGE_TOKEN)
    if placeholders != len(images):
        raise RadscribeError(f"{path}: row {index} has {placeholders} <image> placeholders "
                             f"but {len(images)} images")
    return messages


def _sample(path: Path, index: int, row: dict) -> Sample:
    messages = [_normalise_message(m) for m in _check_row(path, index, row)]
    images = [(path.parent / p) if not Path(p).is_absolute() else Path(p) for p in row.get("images") or []]
    return Sample(id=str(row.get("id", index)), messages=messages, images=images,
                  group=row.get("group"), truth=row.get("truth") or {})


class SplitRows:
    """The rows of one split, by index, without holding them: one pass finds (and checks) every row's bytes,
    then only their offsets stay in memory (8 bytes a row) and `rows[i]` reads row i back from the file.

    Safe in forked DataLoader workers (positional reads, the file opened per process) and picklable.
    """

    def __init__(self, dataset_dir: str | Path, split: str = "train", limit: int | None = None):
        import numpy as np

        self.path = split_file(dataset_dir, split)
        starts, ends = [], []
        for index, (start, end, row) in enumerate(_scan_rows(self.path, limit)):
            _check_row(self.path, index, row)
            starts.append(start)
            ends.append(end)
        self.starts = np.asarray(starts, dtype=np.int64)
        self.ends = np.asarray(ends, dtype=np.int64)
        self._fd = self._pid = None

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> Sample:
        import os

        if not 0 <= index < len(self):
            raise IndexError(index)
        if self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        start, end = int(self.starts[index]), int(self.ends[index])
        blob = os.pread(self._fd, end - start, start)
        try:
            row = json.loads(blob)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RadscribeError(f"{self.path}: row {index} changed since it was indexed or is not UTF-8 ({err}); "
                                 "do not rewrite a dataset during training") from None
        return _sample(self.path, index, row)

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": None}


def read_split(dataset_dir: str | Path, split: str = "train") -> Iterator[Sample]:
    """Stream the samples of one split; image paths are resolved against the dataset folder."""
    yield from SplitRows(dataset_dir, split)


def _normalise_message(m: dict) -> dict:
    # LLaMA-Factory's default sharegpt tags are from/value with human/gpt; accept both spellings.
    role = m.get("role", m.get("from"))
    role = {"human": "user", "gpt": "assistant"}.get(role, role)
    return {"role": role, "content": m.get("content", m.get("value", ""))}


def to_chat(messages: list[dict], images: list) -> list[dict]:
    """ShareGPT messages with `<image>` placeholders -> the processor's chat format with image entries.

    `images` are PIL images (or paths) consumed in placeholder order.
    """
    queue = list(images)
    chat = []
    for m in messages:
        parts: list[dict] = []
        pieces = m["content"].split(IMAGE_TOKEN)
        for i, text in enumerate(pieces):
            if i > 0:
                parts.append({"type": "image", "image": queue.pop(0)})
            if text:
                parts.append({"type": "text", "text": text})
        chat.append({"role": m["role"], "content": parts})
    if queue:
        raise RadscribeError(f"{len(queue)} image(s) have no <image> placeholder in the messages")
    return chat
