"""BLEU-4 and ROUGE-1/2/L exactly as LLaMA-Factory computes them for `do_predict` (0.9.x, `ComputeSimilarity`).

Per sample: ROUGE F-scores from `rouge_chinese` on jieba-segmented words joined by spaces (all three are 0 when
either side has no word after segmentation); BLEU-4 from NLTK `sentence_bleu` on *characters* with
`SmoothingFunction().method3`. Each is ×100 and rounded to 4 decimals, then the dataset score is the plain mean.
We call the same libraries rather than reimplementing them; tests/evaluate/test_metrics.py checks the values
against ones computed by LLaMA-Factory's own `ComputeSimilarity` (Chinese, English, empty, punctuation-only pairs).

Run as: radscribe score generated_predictions.jsonl   (any LLaMA-Factory / vLLM prediction file)
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path

from radscribe.errors import RadscribeError

METRICS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
"""Per-sample score names, in the order LLaMA-Factory fills its score dict."""


@lru_cache(maxsize=1)
def _libraries():
    # Imported lazily: jieba builds its prefix dictionary on first use (~1 s) and `radscribe --help` needs none.
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba.setLogLevel(logging.WARNING)  # its "Building prefix dict" lines would interleave with our progress bar
    return jieba, Rouge(), sentence_bleu, SmoothingFunction().method3


@lru_cache(maxsize=65536)
def _words(text: str) -> str:
    # Templated reports repeat the same reference sentences thousands of times; jieba is deterministic, so caching
    # the segmentation changes no value and removes most of the scoring time.
    jieba = _libraries()[0]
    return " ".join(jieba.cut(text))


def score_pair(predict: str, label: str) -> dict[str, float]:
    """The four LLaMA-Factory scores of one prediction against its reference, ×100, rounded to 4 decimals."""
    _, rouge, sentence_bleu, smoothing = _libraries()
    hypothesis, reference = _words(predict), _words(label)
    if not hypothesis.split() or not reference.split():
        scores = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    else:
        result = rouge.get_scores(hypothesis, reference)[0]
        scores = {key: round(result[key]["f"] * 100, 4) for key in ("rouge-1", "rouge-2", "rouge-l")}
    bleu = sentence_bleu([list(label)], list(predict), smoothing_function=smoothing)
    scores["bleu-4"] = round(bleu * 100, 4)
    return scores


def _score_chunk(pairs: list[tuple[str, str]]) -> list[dict[str, float]]:
    return [score_pair(p, l) for p, l in pairs]


def score_pairs(predicts: list[str], labels: list[str], workers: int = 1) -> list[dict]:
    """Per-sample scores for aligned predictions and references; `workers` > 1 splits the list over processes."""
    if len(predicts) != len(labels):
        raise RadscribeError(f"{len(predicts)} predictions but {len(labels)} references")
    pairs = list(zip(predicts, labels))
    if workers <= 1 or len(pairs) < 64:
        return [score_pair(p, l) for p, l in pairs]
    size = -(-len(pairs) // workers)
    chunks = [pairs[i:i + size] for i in range(0, len(pairs), size)]
    with ProcessPoolExecutor(workers) as pool:
        return [score for part in pool.map(_score_chunk, chunks) for score in part]


def aggregate(per_sample: list[dict], prefix: str = "predict_") -> dict[str, float]:
    """Mean of each per-sample score under LLaMA-Factory's output keys (`predict_bleu-4`, ...)."""
    if not per_sample:
        raise RadscribeError("no predictions to score")
    return {f"{prefix}{key}": float(sum(s[key] for s in per_sample) / len(per_sample)) for key in METRICS}


def read_predictions(path: str | Path) -> list[dict]:
    """Rows of a generated_predictions.jsonl (LLaMA-Factory, vLLM or ours): each needs `predict` and `label`."""
    path = Path(path)
    if not path.is_file():
        raise RadscribeError(f"prediction file {path} does not exist")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise RadscribeError(f"{path}:{line_no}: invalid JSON ({err.msg})") from None
            for key in ("predict", "label"):
                if not isinstance(row.get(key), str):
                    raise RadscribeError(f"{path}:{line_no}: field {key!r} is missing or not a string")
            rows.append(row)
    if not rows:
        raise RadscribeError(f"{path}: no predictions")
    return rows
