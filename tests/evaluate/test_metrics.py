"""BLEU-4 / ROUGE-1/2/L against LLaMA-Factory's own metric function, on fixed pairs whose values it computed.

The expected values below were computed once by LLaMA-Factory 0.9.5's `ComputeSimilarity`
(llamafactory/train/sft/metric.py) with jieba 0.42.1, nltk 3.10.4, rouge-chinese 1.0.3 (the versions of our venv),
on the pairs of llamafactory_reference.PAIRS (Chinese and English reports, empty and blank strings, punctuation only,
repeated characters), with this command from the repository root:

    python tests/evaluate/llamafactory_reference.py    # builds a scratch venv: torch 2.14.1, torchvision 0.29.1,
                                                       # llamafactory 0.9.5 (see its docstring), prints these values

It also wrote assets/llamafactory_generated_predictions.jsonl through LLaMA-Factory's own `save_predictions`.
"""

import json

import pytest
from llamafactory_reference import ASSET, PAIRS

from radscribe.cli import main
from radscribe.errors import RadscribeError
from radscribe.evaluate import metrics

EXPECTED_PER_PAIR = [  # rouge-1, rouge-2, rouge-l, bleu-4 of PAIRS[i], as LLaMA-Factory computed them
    (0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 29.7302),
    (0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0),
    (100.0, 100.0, 100.0, 100.0), (100.0, 0.0, 66.6667, 30.2138), (100.0, 0.0, 40.0, 15.9736),
    (100.0, 0.0, 50.0, 16.2334), (0.0, 0.0, 0.0, 34.5721), (100.0, 0.0, 100.0, 35.3553),
    (100.0, 0.0, 100.0, 59.4604), (0.0, 0.0, 0.0, 45.1801), (100.0, 100.0, 100.0, 100.0),
    (93.3333, 85.7143, 93.3333, 88.9526), (51.6129, 20.6897, 51.6129, 23.6369), (28.5714, 0.0, 28.5714, 41.1134),
    (63.6364, 50.0, 63.6364, 25.6175), (100.0, 100.0, 100.0, 100.0), (54.5455, 20.0, 54.5455, 52.9362),
    (40.0, 11.1111, 40.0, 30.1771), (0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0), (90.9091, 66.6667, 90.9091, 68.9215),
    (40.0, 0.0, 40.0, 31.9472), (83.3333, 50.0, 71.4286, 67.0342),
]
EXPECTED_PREDICT = {"predict_rouge-1": 44.86473000000001, "predict_rouge-2": 20.139393333333334,
                    "predict_rouge-l": 39.690129999999996, "predict_bleu-4": 33.23518333333333}
"""LLaMA-Factory's predict_* means over PAIRS (ComputeSimilarity on all pairs at once)."""


def test_each_pair_scores_exactly_as_llamafactory():
    assert len(PAIRS) == len(EXPECTED_PER_PAIR)
    for (predict, label), expected in zip(PAIRS, EXPECTED_PER_PAIR):
        scores = metrics.score_pair(predict, label)
        assert [scores[k] for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")] == list(expected), (predict, label)


def test_dataset_means_are_llamafactorys():
    per_sample = metrics.score_pairs([p for p, _ in PAIRS], [l for _, l in PAIRS])
    assert metrics.aggregate(per_sample) == pytest.approx(EXPECTED_PREDICT, rel=1e-12)


def test_radscribe_score_on_a_llamafactory_prediction_file(tmp_path, capsys):
    rows = [json.loads(line) for line in ASSET.read_text(encoding="utf-8").splitlines()]
    assert [(r["predict"], r["label"]) for r in rows] == PAIRS and set(rows[0]) == {"prompt", "predict", "label"}
    assert main(["score", str(ASSET), "--out", str(tmp_path), "--n-boot", "50"]) == 0
    assert json.loads((tmp_path / "predict_results.json").read_text()) == pytest.approx(EXPECTED_PREDICT, rel=1e-12)
    per_sample = [json.loads(line) for line in (tmp_path / "per_sample.jsonl").read_text().splitlines()]
    assert [[r[k] for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")] for r in per_sample] == \
        [list(e) for e in EXPECTED_PER_PAIR]
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["n"] == len(PAIRS)
    assert scores["metrics"]["bleu-4"]["value"] == pytest.approx(EXPECTED_PREDICT["predict_bleu-4"], rel=1e-12)
    assert f"{ASSET}: {len(PAIRS)} samples" in capsys.readouterr().out


def test_process_pool_gives_identical_scores():
    pairs = PAIRS * 4  # above the 64 pairs from which scoring is split over processes
    preds, labels = [p for p, _ in pairs], [l for _, l in pairs]
    assert metrics.score_pairs(preds, labels, workers=2) == metrics.score_pairs(preds, labels, workers=1)


def test_prediction_file_errors_name_the_line(tmp_path):
    path = tmp_path / "generated_predictions.jsonl"
    path.write_text('{"predict": "x", "label": "x"}\n{"predict": "x"}\n', encoding="utf-8")
    with pytest.raises(RadscribeError, match=r":2: field 'label' is missing"):
        metrics.read_predictions(path)
    path.write_text('{"predict": "x", "label": "x"}\n{not json\n', encoding="utf-8")
    with pytest.raises(RadscribeError, match=r":2: invalid JSON"):
        metrics.read_predictions(path)
