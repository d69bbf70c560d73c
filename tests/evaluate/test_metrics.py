"""Parity of our BLEU-4 / ROUGE with LLaMA-Factory's definition, computed here directly with nltk/jieba/rouge-chinese."""

import json
import random

import jieba
import numpy as np
import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from radscribe.errors import RadscribeError
from radscribe.evaluate import metrics

PIECES = ["这是一张脑部CT图像", "左上肺野见一小结节", "右下", "高密度", "低信号", "肿块", "囊肿", "出血", "未见异常",
          "，", "。", "！", "？", "The lesion is in the left upper lobe", "no evidence of hemorrhage", "CT", "MRI",
          "X-ray", "...", "……", " ", "\n", "3.5 cm", "area 12%", "肝脏", "肾脏", "右肾", "mass", "“引号”", "?"]
FIXED = [("", ""), ("", "这是一张CT图像。"), ("这是一张CT图像。", ""), ("。。。", "，，"), ("!!!", "???"),
         ("   ", "正常"), ("a", "a"), ("ab", "ab"), ("same text 相同的文本。", "same text 相同的文本。"),
         ("completely different", "毫不相干的句子"), ("\n\n", "\n"), ("The liver is normal.", "The liver is normal."),
         ("左上", "右下"), ("？", "?"), ("CT", "MRI"), ("……", "......")]


def _pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = list(FIXED)
    while len(pairs) < n:
        label = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 8)))
        kind = rng.random()
        if kind < 0.2:
            pred = label
        elif kind < 0.5:  # a perturbed copy: one piece swapped
            parts = [rng.choice(PIECES) for _ in range(rng.randint(0, 8))]
            pred = label[: len(label) // 2] + "".join(parts[:2])
        else:
            pred = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 8)))
        pairs.append((pred, label))
    return pairs


def _reference(pred: str, label: str) -> dict:
    # LLaMA-Factory 0.9.x ComputeSimilarity, written out from its definition.
    hyp, ref = list(jieba.cut(pred)), list(jieba.cut(label))
    if len(" ".join(hyp).split()) == 0 or len(" ".join(ref).split()) == 0:
        result = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
    else:
        result = Rouge().get_scores(" ".join(hyp), " ".join(ref))[0]
    scores = {k: round(v["f"] * 100, 4) for k, v in result.items()}
    bleu = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
    scores["bleu-4"] = round(bleu * 100, 4)
    return scores


def test_parity_with_reference_definition_on_varied_pairs():
    pairs = _pairs(240)
    kinds = {"empty": sum(1 for p, l in pairs if not p or not l),
             "identical": sum(1 for p, l in pairs if p == l and p),
             "english": sum(1 for p, l in pairs if p.isascii() and p.strip())}
    assert all(count >= 5 for count in kinds.values()), kinds
    ours = metrics.score_pairs([p for p, _ in pairs], [l for _, l in pairs])
    refs = [_reference(p, l) for p, l in pairs]
    for (p, l), mine, theirs in zip(pairs, ours, refs):
        for key in metrics.METRICS:
            assert mine[key] == pytest.approx(theirs[key], abs=1e-4), (p, l, key)
    agg = metrics.aggregate(ours)
    for key in metrics.METRICS:
        assert agg[f"predict_{key}"] == pytest.approx(float(np.mean([r[key] for r in refs])), abs=1e-4)
    assert set(agg) == {"predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l"}


def test_known_values():
    assert metrics.score_pair("", "报告") == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}
    same = metrics.score_pair("左上肺野见一小结节。", "左上肺野见一小结节。")
    assert same == {"rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0, "bleu-4": 100.0}
    # 2 characters: only 1- and 2-gram matches exist; method3 smooths the missing 3/4-grams -> 59.4604.
    assert metrics.score_pair("ab", "ab")["bleu-4"] == 59.4604


def test_process_pool_gives_identical_scores():
    pairs = _pairs(96, seed=1)
    preds, labels = [p for p, _ in pairs], [l for _, l in pairs]
    assert metrics.score_pairs(preds, labels, workers=2) == metrics.score_pairs(preds, labels, workers=1)


def test_score_file_reads_llamafactory_output(tmp_path):
    path = tmp_path / "generated_predictions.jsonl"
    rows = [{"prompt": "q", "predict": "左上结节", "label": "左上结节"}, {"prompt": "q", "predict": "", "label": "正常"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    result, per_sample = metrics.score_file(path)
    assert result["predict_rouge-1"] == 50.0 and len(per_sample) == 2
    path.write_text('{"predict": "x"}\n', encoding="utf-8")
    with pytest.raises(RadscribeError, match=r":1: field 'label'"):
        metrics.score_file(path)
