"""Leakage audit of a prepared dataset: what the validation split shares with the training split.

Run as: radscribe audit DATASET [--near-threshold 4] [--strict] [--max-rate 0.0]

Four checks, each counted as the number of validation rows it flags:
- exact: an image byte-identical (sha256) to a training image;
- near: a perceptual hash (imagehash pHash, 64 bits; `radscribe.data.similar`) within `near_threshold` bits of a
  training image's — re-encoded, resized or adjacent slices of one volume — exact duplicates excluded. Pairs are
  found by multi-index hashing, not by comparing all pairs; `prepare --group-by similar` groups with the same hash;
- caption: a reference report identical to a training report (whitespace-normalised). Templated captions repeat by
  design, so this one is reported but does not fail `--strict`;
- group: a group key (patient/volume) present in both splits.
`--strict` fails when the share of validation rows flagged by exact, near or group exceeds `max_rate`.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from radscribe.data.dataset import read_split
from radscribe.data.similar import NEAR_THRESHOLD, image_hash, near_pairs
from radscribe.errors import RadscribeError

STRICT_CHECKS = ("exact", "near", "group")
"""Checks that count towards `--strict`; `caption` is informational."""


@dataclass
class AuditConfig:
    dataset: str
    """The prepared dataset folder."""
    near_threshold: int = NEAR_THRESHOLD
    """Largest pHash Hamming distance (of 64 bits) that counts as a near duplicate."""
    strict: bool = False
    """Fail (exit 2) when the share of validation rows flagged by exact/near/group exceeds `max_rate`."""
    max_rate: float = 0.0
    """With `strict`: the largest tolerated share of validation rows flagged by exact/near/group (0-1)."""
    examples: int = 5
    """How many example pairs to keep per check."""


@dataclass
class AuditResult:
    train_rows: int
    val_rows: int
    flagged: dict[str, set[str]] = field(default_factory=dict)
    """check -> ids of validation rows it flags."""
    examples: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)
    """check -> (val id, train id, detail) examples."""
    ungrouped_rows: int = 0
    """Rows (train + val) without a group key: the group check cannot see them."""

    def rate(self, checks=STRICT_CHECKS) -> float:
        ids = set().union(*(self.flagged.get(c, set()) for c in checks))
        return len(ids) / self.val_rows if self.val_rows else 0.0

    def table(self) -> str:
        lines = [f"leakage audit: {self.train_rows} train rows, {self.val_rows} val rows",
                 f"{'check':<8} {'val rows':>8} {'share':>8}  example (val id <-> train id)"]
        for check in ("exact", "near", "caption", "group"):
            ids = self.flagged.get(check, set())
            example = self.examples.get(check) or []
            shown = f"{example[0][0]} <-> {example[0][1]} ({example[0][2]})" if example else "-"
            share = len(ids) / self.val_rows if self.val_rows else 0.0
            if check == "group" and self.ungrouped_rows:
                shown += f"; {self.ungrouped_rows} of {self.train_rows + self.val_rows} rows have no group key"
            lines.append(f"{check:<8} {len(ids):>8} {share:>8.2%}  {shown}")
        lines.append(f"{'any*':<8} {'':>8} {self.rate():>8.2%}  (* exact, near and group; captions are informational)")
        return "\n".join(lines)


def audit(cfg: AuditConfig) -> AuditResult:
    """Run all checks on DATASET's train and val splits."""
    from tqdm import tqdm

    train, val = list(read_split(cfg.dataset, "train")), list(read_split(cfg.dataset, "val"))
    result = AuditResult(train_rows=len(train), val_rows=len(val))
    hashes = {}
    for sample in tqdm(train + val, desc="hashing images", unit="row", disable=len(train) + len(val) < 500):
        hashes[id(sample)] = [_image_hashes(p) for p in sample.images]

    # exact: sha256 of the file bytes
    by_sha = defaultdict(list)
    for s in train:
        for sha, _ in hashes[id(s)]:
            by_sha[sha].append(s.id)
    for s in val:
        for sha, _ in hashes[id(s)]:
            if sha in by_sha:
                _flag(result, cfg, "exact", s.id, by_sha[sha][0], f"sha256 {sha[:12]}")

    # near: pHash within the threshold, a different file (exact duplicates are counted above)
    images = [(s, sha, phash) for s in train + val for sha, phash in hashes[id(s)]]
    first_val = sum(len(hashes[id(s)]) for s in train)
    i, j, distance = near_pairs(np.array([phash for _, _, phash in images], np.uint64), cfg.near_threshold)
    across = (i < first_val) & (j >= first_val)  # i < j, and training images come first
    for ti, vi, d in zip(i[across], j[across], distance[across]):
        (train_sample, train_sha, _), (val_sample, val_sha, _) = images[ti], images[vi]
        if val_sha != train_sha:
            _flag(result, cfg, "near", val_sample.id, train_sample.id, f"{int(d)} bits")

    # caption: identical reference reports
    train_reports = {}
    for s in train:
        train_reports.setdefault(" ".join(s.report.split()), s.id)
    for s in val:
        key = " ".join(s.report.split())
        if key in train_reports:
            _flag(result, cfg, "caption", s.id, train_reports[key], key[:30])

    # group: shared patient/volume keys
    result.ungrouped_rows = sum(not s.group for s in train + val)
    train_groups = {}
    for s in train:
        if s.group:
            train_groups.setdefault(s.group, s.id)
    for s in val:
        if s.group and s.group in train_groups:
            _flag(result, cfg, "group", s.id, train_groups[s.group], f"group {s.group}")
    return result


def check_strict(result: AuditResult, cfg: AuditConfig) -> None:
    """Raise when the flagged share of validation rows exceeds `max_rate`."""
    if result.rate() > cfg.max_rate:
        raise RadscribeError(f"{cfg.dataset}: {result.rate():.2%} of val rows leak from train (exact/near/group), "
                             f"above --max-rate {cfg.max_rate:.2%}; re-split by group with `radscribe prepare`")


def _flag(result: AuditResult, cfg: AuditConfig, check: str, val_id: str, train_id: str, detail: str) -> None:
    ids = result.flagged.setdefault(check, set())
    examples = result.examples.setdefault(check, [])
    if val_id not in ids and len(examples) < cfg.examples:
        examples.append((val_id, train_id, detail))
    ids.add(val_id)


def _image_hashes(path: Path) -> tuple[str, int]:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RadscribeError(f"image {path} cannot be read ({err.strerror}); re-run `radscribe prepare`") from None
    # Decoded by the one loader, which raises a RadscribeError naming the file.
    return hashlib.sha256(data).hexdigest(), image_hash(data, name=str(path))
