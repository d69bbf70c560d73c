"""Reading a prepared dataset folder (or any LLaMA-Factory sharegpt dataset with images) for train and eval.

Rows are streamed one at a time: `train.json` is a JSON array, so it is parsed with an incremental decoder
rather than loaded whole; `.jsonl` files are read line by line.
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


def _iter_json_rows(path: Path) -> Iterator[dict]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as err:
                        raise RadscribeError(f"{path}:{line_no}: invalid JSON ({err.msg})") from None
        return
    # Incremental decode of a JSON array, one element at a time, in 1 MiB reads.
    decoder = json.JSONDecoder()
    with path.open(encoding="utf-8") as f:
        buf, pos, started = "", 0, False
        while True:
            chunk = f.read(1 << 20)
            buf = buf[pos:] + chunk
            pos = 0
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    pos += 1
                if not started:
                    if pos < len(buf):
                        if buf[pos] != "[":
                            raise RadscribeError(f"{path}: expected a JSON array of rows")
                        started, pos = True, pos + 1
                    continue_outer = pos >= len(buf)
                    if continue_outer:
                        break
                    continue
                if pos < len(buf) and buf[pos] == "]":
                    return
                try:
                    row, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError:
                    if not chunk:
                        raise RadscribeError(f"{path}: truncated or invalid JSON near character {pos}") from None
                    break
                yield row
                pos = end
            if not chunk:
                if not started:
                    raise RadscribeError(f"{path}: empty file")
                return


def read_split(dataset_dir: str | Path, split: str = "train") -> Iterator[Sample]:
    """Stream the samples of one split; image paths are resolved against the dataset folder."""
    path = split_file(dataset_dir, split)
    root = path.parent
    for index, row in enumerate(_iter_json_rows(path)):
        messages = row.get("messages") or row.get("conversations")
        if not messages:
            raise RadscribeError(f"{path}: row {index} has no messages")
        messages = [_normalise_message(m) for m in messages]
        images = [(root / p) if not Path(p).is_absolute() else Path(p) for p in row.get("images") or []]
        placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
        if placeholders != len(images):
            raise RadscribeError(f"{path}: row {index} has {placeholders} <image> placeholders "
                                 f"but {len(images)} images")
        yield Sample(id=str(row.get("id", index)), messages=messages, images=images,
                     group=row.get("group"), truth=row.get("truth") or {})


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
