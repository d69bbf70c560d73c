"""Finding-level scores: the lexicon reads zh/en reports, and the scores move the right way."""

import math

import numpy as np
import pytest
import yaml

from radscribe.evaluate import findings, stats
from radscribe.evaluate.findings import default_lexicon

# The synthetic vocabulary of docs/architecture.md: (category, canonical en value, zh surface forms).
SYNTH_VOCAB = {
    "modality": {"CT": ["CT"], "MRI": ["磁共振", "MRI"], "X-ray": ["X线"]},
    "organ": {"brain": ["脑"], "lung": ["肺"], "liver": ["肝脏"], "kidney": ["肾脏"]},
    "location": {"left upper": ["左上"], "right upper": ["右上"], "left lower": ["左下"], "right lower": ["右下"],
                 "central": ["中央"]},
    "density": {"high": ["高密度", "高信号"], "low": ["低密度", "低信号"]},
    "size": {"small": ["小"], "large": ["大"]},
    "finding": {"nodule": ["结节"], "mass": ["肿块"], "cyst": ["囊肿"], "hemorrhage": ["出血"]},
}
REF = "这是一张脑部CT图像，左上可见一个小的高密度结节。"
REF_EN = "Brain CT image: a small high density nodule in the left upper region."


def _score(predicts, labels, truths=None):
    cols = findings.columns(predicts, labels, truths)
    return {k: v["value"] for k, v in stats.bootstrap(cols, findings.finding_statistics(cols), n_boot=50).items()}


def test_lexicon_holds_every_synthetic_term_in_both_languages():
    lex = default_lexicon()
    for category, values in SYNTH_VOCAB.items():
        for value, zh_forms in values.items():
            assert lex.extract(value)[category] == {value}, (category, value)
            for form in zh_forms:
                assert lex.extract(form)[category] == {value}, (category, form)
    from radscribe.data.synth import VOCAB

    for category, values in VOCAB.items():
        for value, forms in values.items():
            for form in forms.values():
                assert lex.extract(form)[category] == {value}, (category, value, form)


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_synth_reports_read_back_as_their_truth(lang):
    from radscribe.data.synth import report, sample_truth

    truths = [sample_truth(0, i) for i in range(300)]
    reports = [report(t, lang) for t in truths]
    assert _score(reports, reports, truths)["truth_all_accuracy"] == 100.0


def test_extraction_zh_and_en():
    lex = default_lexicon()
    zh = lex.extract(REF)
    assert zh == {"modality": {"CT"}, "organ": {"brain"}, "location": {"left upper"}, "density": {"high"},
                  "size": {"small"}, "finding": {"nodule"}}
    assert lex.extract(REF_EN) == zh
    # abbreviations only in capitals; MRI is not also read as MR
    assert lex.extract("Seen by Dr. Wang and Mr. Li, no pet.")["modality"] == set()
    assert lex.extract("DR and MRI")["modality"] == {"X-ray", "MRI"}
    # compounds are not read as their characters: 大小 is "size", 左右 "about"
    assert lex.extract("病灶大小约3cm")["size"] == set()


def test_negation():
    lex = default_lexicon()
    assert lex.extract("右下见肿块，未见出血。")["finding"] == {"mass"}
    assert lex.extract("No evidence of hemorrhage. A cyst in the liver.")["finding"] == {"cyst"}
    assert lex.extract("肝脏未见明显异常")["finding"] == {"normal"}
    negated = [m for m in lex.mentions("未见出血") if m.category == "finding"]
    assert negated and negated[0].negated


def test_identical_prediction_scores_100():
    refs = [REF, "这是一张肺部磁共振图像，右下可见一个大的低信号肿块。", REF_EN]
    scores = _score(refs, refs)
    assert scores and all(v == 100.0 for k, v in scores.items() if k != "hallucination_rate")
    assert scores["hallucination_rate"] == 0.0
    assert scores["location_f1"] == 100.0 and scores["finding_f1"] == 100.0


def test_changed_laterality_or_finding_scores_lower():
    wrong_side = REF.replace("左上", "右上")
    wrong_kind = REF.replace("结节", "囊肿")
    side = _score([wrong_side], [REF])
    kind = _score([wrong_kind], [REF])
    assert side["location_f1"] == 0.0 and side["finding_f1"] == 100.0
    assert kind["finding_f1"] == 0.0 and kind["location_f1"] == 100.0
    # a wrong finding kind stated is also an invented one
    assert kind["hallucination_rate"] == 100.0 and side["hallucination_rate"] == 0.0


def test_invented_finding_is_a_hallucination():
    normal = "这是一张脑部CT图像，未见异常。"
    scores = _score([normal.replace("未见异常", "左上可见出血"), normal, REF + "另见出血。"], [normal, normal, REF])
    assert scores["hallucination_rate"] == pytest.approx(200 / 3)
    # a negated finding invents nothing
    assert _score([REF + "未见出血。"], [REF])["hallucination_rate"] == 0.0


def test_truth_accuracy_on_synthetic_fields():
    truth = {"modality": "CT", "organ": "brain", "location": "left upper", "density": "high", "size": "small",
             "finding": "nodule", "area_pct": 1.5}
    good = _score([REF], [REF], [truth])
    assert good["truth_all_accuracy"] == 100.0 and good["truth_location_accuracy"] == 100.0
    bad = _score([REF.replace("左上", "右下"), REF], [REF, REF], [truth, truth])
    assert bad["truth_location_accuracy"] == 50.0 and bad["truth_finding_accuracy"] == 100.0
    assert bad["truth_all_accuracy"] == 50.0


def test_bootstrap_ci_brackets_the_estimate_and_is_seeded():
    rng = np.random.default_rng(3)
    cols = {"x": rng.normal(50, 10, 400)}
    spec = stats.mean_statistics(["x"])
    a, b = stats.bootstrap(cols, spec, seed=1), stats.bootstrap(cols, spec, seed=1)
    assert a == b
    r = a["x"]
    assert r["low"] < r["value"] < r["high"]
    # ~ mean ± 1.96 sd/sqrt(n)
    assert (r["high"] - r["low"]) / 2 == pytest.approx(1.96 * cols["x"].std() / 20, rel=0.15)


def test_paired_difference():
    rng = np.random.default_rng(0)
    base = rng.normal(50, 10, 300)
    spec = stats.mean_statistics(["x"])
    out = stats.paired({"x": base}, {"x": base + 2 + rng.normal(0, 0.5, 300)}, spec)["x"]
    assert out["diff"] == pytest.approx(2, abs=0.2) and out["low"] > 1.5 and out["high"] < 2.5
    undefined = stats.bootstrap({"tp": np.zeros(5), "fp": np.zeros(5)},
                                {"p": (("tp", "fp"), lambda s: findings._pct(s[0], s[0] + s[1]))})["p"]
    assert math.isnan(undefined["value"]) and math.isnan(undefined["low"])


def test_lexicon_file_is_well_formed():
    data = yaml.safe_load(findings.LEXICON_PATH.read_text(encoding="utf-8"))
    assert set(findings.CATEGORIES) <= set(data) and data["negation"]
    # YAML 1.1 turns a bare `no` into False: every surface form must stay a string
    forms = [f for c in findings.CATEGORIES for fs in data[c].values() for f in fs] + data["negation"] + data["ignore"]
    assert all(isinstance(f, str) for f in forms)


def test_truth_in_chinese_and_normal_surroundings():
    lex = default_lexicon()
    assert lex.canonical("location", "左上") == "left upper" and lex.canonical("organ", "脑") == "brain"
    text = "这是一张脑部CT图像。左上区域可见一小的高密度影,考虑结节。周围结构未见明显异常。"
    assert lex.extract(text)["finding"] == {"nodule"}
    truth = {"modality": "CT", "organ": "脑", "location": "左上", "density": "high", "size": "small", "finding": "结节"}
    assert _score([text], [text], [truth])["truth_all_accuracy"] == 100.0
