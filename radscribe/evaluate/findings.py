"""Finding-level scores: what a report says about modality, organ, location, density, size and finding kind.

BLEU/ROUGE reward templated wording: a report with the wrong side or the wrong lesion still scores ~90. Here both
prediction and reference are read with the bilingual lexicon shipped in `lexicon.yaml`, and compared term by term:
per-category precision/recall/F1 (micro-averaged over samples), a hallucination rate (the prediction states a
finding that the reference does not), and, on synthetic data, accuracy against the ground-truth `truth` fields.

Per-sample counts are returned as columns so that `radscribe.evaluate.stats` can bootstrap every ratio.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml

from radscribe.errors import RadscribeError

LEXICON_PATH = Path(__file__).with_name("lexicon.yaml")
CATEGORIES = ("modality", "organ", "location", "density", "size", "finding")
"""Term categories of the lexicon, in report order; the synthetic `truth` fields carry the same names."""
NORMAL = "normal"
"""The finding term meaning 'no lesion'; it is never a hallucination."""
GENERIC_FINDINGS = frozenset({NORMAL, "lesion"})
"""Finding terms that name no kind ("病灶", "normal"): dropped when a specific kind is stated beside them."""
CLAUSE_BREAK = re.compile(r"[，,。.;；:：!！?？\n]")


@dataclass(frozen=True)
class Mention:
    category: str
    """Lexicon category."""
    term: str
    """Canonical term (the lexicon key, e.g. `left upper`)."""
    start: int
    """Character offset in the text."""
    negated: bool
    """A negation cue precedes it in the same clause ("未见出血", "no evidence of hemorrhage")."""


class Lexicon:
    """Compiled surface forms of one lexicon file."""

    def __init__(self, path: str | Path = LEXICON_PATH):
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        self.terms: dict[str, dict[str, list[str]]] = {c: data.get(c) or {} for c in CATEGORIES}
        self.form_to_term: dict[str, tuple[str, str] | None] = {}  # lower-cased form -> (category, term)
        surface: list[str] = list(data.get("ignore") or [])
        for category, entries in self.terms.items():
            for term, forms in entries.items():
                for form in [term, *forms]:
                    surface.append(str(form))
                    key = str(form).lower()
                    if key in self.form_to_term and self.form_to_term[key] != (category, term):
                        raise RadscribeError(f"{path}: {form!r} is listed under both "
                                             f"{self.form_to_term[key]} and {(category, term)}")
                    self.form_to_term[key] = (category, term)
        for form in data.get("ignore") or []:
            self.form_to_term.setdefault(str(form).lower(), None)
        self.pattern = _alternation(surface)
        self.negation = _alternation(data.get("negation") or [])

    def mentions(self, text: str) -> list[Mention]:
        """Every lexicon term in `text`, left to right, longest form first, with its negation."""
        found = []
        for match in self.pattern.finditer(text):
            hit = self.form_to_term[match.group(0).lower()]
            if hit is None:
                continue
            clause_start = max((m.end() for m in CLAUSE_BREAK.finditer(text, 0, match.start())), default=0)
            negated = self.negation.search(text, clause_start, match.start()) is not None
            found.append(Mention(hit[0], hit[1], match.start(), negated))
        return found

    def extract(self, text: str) -> dict[str, set[str]]:
        """Category -> the canonical terms the text asserts (negated findings left out)."""
        out: dict[str, set[str]] = {c: set() for c in CATEGORIES}
        for m in self.mentions(text):
            if not (m.negated and m.category == "finding"):
                out[m.category].add(m.term)
        if out["finding"] - GENERIC_FINDINGS:
            # "小病灶…考虑为囊肿。周围结构未见明显异常": beside a specific kind, "lesion" only points at it and
            # "normal" describes the surroundings; neither is a second finding.
            out["finding"] -= GENERIC_FINDINGS
        return out

    def canonical(self, category: str, value: str) -> str | None:
        """A truth value as the lexicon's canonical term: `left upper` stays, `左上` becomes `left upper`."""
        if value in self.terms[category]:
            return value
        terms = self.extract(value)[category]
        return next(iter(terms)) if len(terms) == 1 else None


def _alternation(forms) -> re.Pattern:
    # Longest first, so at one position "left upper" wins over "left"; ASCII-letter forms only match whole words,
    # Chinese forms match anywhere (Chinese has no spaces between words).
    parts = []
    for form in sorted({str(f) for f in forms}, key=lambda f: (-len(f), f)):
        escaped = re.escape(form)
        if form.isascii() and form.isupper() and len(form) <= 5:
            # Abbreviations match only in capitals: "MR"/"DR"/"PET" must not read "Mr.", "Dr." or "pet".
            escaped = f"(?-i:{escaped})"
        if re.search(r"[A-Za-z]", form) and form.isascii():
            escaped = rf"(?<![A-Za-z]){escaped}(?![A-Za-z])"
        parts.append(escaped)
    return re.compile("|".join(parts) if parts else r"(?!x)x", re.IGNORECASE)


@lru_cache(maxsize=1)
def default_lexicon() -> Lexicon:
    return Lexicon(LEXICON_PATH)


def sample_columns(predict: str, label: str, truth: dict | None = None, lexicon: Lexicon | None = None) -> dict:
    """Per-sample counts: `<category>_tp/_fp/_fn`, `hallucinated` (0/1), and `truth_<field>_has/_ok` on synthetic rows."""
    lexicon = lexicon or default_lexicon()
    pred, ref = lexicon.extract(predict), lexicon.extract(label)
    row: dict[str, float] = {}
    for c in CATEGORIES:
        row[f"{c}_tp"] = len(pred[c] & ref[c])
        row[f"{c}_fp"] = len(pred[c] - ref[c])
        row[f"{c}_fn"] = len(ref[c] - pred[c])
    row["hallucinated"] = float(bool(pred["finding"] - ref["finding"] - GENERIC_FINDINGS))
    for field in CATEGORIES:
        value = (truth or {}).get(field)
        has = isinstance(value, str) and bool(value)
        value = lexicon.canonical(field, value) if has else None
        row[f"truth_{field}_has"] = float(has)
        # Right means the report names the true value and nothing else of that category.
        row[f"truth_{field}_ok"] = float(has and pred[field] == {value})
    has_any = [f for f in CATEGORIES if row[f"truth_{f}_has"]]
    row["truth_all_has"] = float(bool(has_any))
    row["truth_all_ok"] = float(bool(has_any) and all(row[f"truth_{f}_ok"] for f in has_any))
    return row


def columns(predicts: list[str], labels: list[str], truths: list[dict] | None = None,
            lexicon: Lexicon | None = None) -> dict[str, np.ndarray]:
    """Per-sample count columns for aligned lists (column name -> array of length n)."""
    truths = truths or [{}] * len(predicts)
    rows = [sample_columns(p, l, t, lexicon) for p, l, t in zip(predicts, labels, truths)]
    if not rows:
        return {}
    return {key: np.array([r[key] for r in rows], dtype=np.float64) for key in rows[0]}


def finding_statistics(cols: dict[str, np.ndarray]) -> dict[str, tuple[tuple[str, ...], callable]]:
    """Name -> (columns, function of the columns' sums) for every finding-level score, in percent.

    Ratios of sums (micro averages) rather than means of per-sample ratios, so a sample with nothing to find does
    not count as perfect; a ratio with a zero denominator is undefined (NaN) and shown as n/a.
    """
    stats: dict = {}
    for c in CATEGORIES:
        tp, fp, fn = f"{c}_tp", f"{c}_fp", f"{c}_fn"
        if cols and cols[tp].sum() + cols[fp].sum() + cols[fn].sum() == 0:
            continue  # the category is never mentioned on either side
        stats[f"{c}_precision"] = ((tp, fp), lambda s: _pct(s[0], s[0] + s[1]))
        stats[f"{c}_recall"] = ((tp, fn), lambda s: _pct(s[0], s[0] + s[1]))
        stats[f"{c}_f1"] = ((tp, fp, fn), lambda s: _pct(2 * s[0], 2 * s[0] + s[1] + s[2]))
    stats["hallucination_rate"] = (("hallucinated", "n"), lambda s: _pct(s[0], s[1]))
    for field in (*CATEGORIES, "all"):
        if cols and cols[f"truth_{field}_has"].sum() > 0:
            stats[f"truth_{field}_accuracy"] = ((f"truth_{field}_ok", f"truth_{field}_has"),
                                                lambda s: _pct(s[0], s[1]))
    return stats


def _pct(numerator, denominator):
    # Works on scalars and on the bootstrap's arrays of resampled sums alike.
    numerator, denominator = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.where(denominator == 0, np.nan, 100.0 * numerator / denominator)
    return float(value) if value.ndim == 0 else value
