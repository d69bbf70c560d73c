"""The expected values of tests/evaluate/test_metrics.py, computed by LLaMA-Factory's own code (run by hand, once).

Run as: python tests/evaluate/llamafactory_reference.py [--python LF_VENV/bin/python]
Without --python it builds (once, cached) a scratch venv with REQUIREMENTS through tests/scratch_venv.py. It needs
the network for what this machine's local wheels lack.

In that venv it calls LLaMA-Factory 0.9.5's `ComputeSimilarity` (llamafactory/train/sft/metric.py) on each pair of
PAIRS (the per-sample scores) and on all pairs at once (the `predict_*` means), and its
`CustomSeq2SeqTrainer.save_predictions` to write ASSET, the `generated_predictions.jsonl` that `radscribe score` is
tested on. Both take token ids and a tokenizer: the ids here index whole strings of PAIRS, so decoding gives back
each string exactly and the scores are those of the strings themselves. It prints the JSON that the test holds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# jieba, nltk and rouge-chinese are LLaMA-Factory's requirements/metrics.txt (unpinned there; the versions of our venv)
REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1", "llamafactory==0.9.5", "jieba==0.42.1", "nltk==3.10.4",
                "rouge-chinese==1.0.3"]
ASSET = Path(__file__).with_name("assets") / "llamafactory_generated_predictions.jsonl"
PROMPT = "<image>图片中的诊断结果是怎样?"

# (predict, label): Chinese and English reports, empty and blank strings, punctuation only, repeated characters.
PAIRS = [
    ("", ""),
    ("", "这是一张CT图像。"),
    ("这是一张CT图像。", ""),
    ("   ", "正常"),
    ("\n\n", "\n"),
    ("。。。", "，，"),
    ("!!!", "???"),
    ("？", "?"),
    ("……", "......"),
    ("，。！？", "，。！？"),
    ("哈哈哈哈哈哈", "哈哈哈"),
    ("的的的的", "的"),
    ("结节结节结节", "结节"),
    ("aaaaaaaa", "aaaa"),
    ("a", "a"),
    ("ab", "ab"),
    ("abc", "abd"),
    ("这是一张脑部CT图像，左上可见一个小的高密度结节。", "这是一张脑部CT图像，左上可见一个小的高密度结节。"),
    ("这是一张脑部CT图像，右上可见一个小的高密度结节。", "这是一张脑部CT图像，左上可见一个小的高密度结节。"),
    ("这是一张肺部磁共振图像，右下可见一个大的低信号肿块。", "这是一张脑部CT图像，左上可见一个小的高密度结节。"),
    ("肝脏未见明显异常", "肝脏未见异常。"),
    ("这是一张肾脏X线图像。", "这是一张肾脏X线图像，中央可见一个大的低密度囊肿。"),
    ("The liver is normal.", "The liver is normal."),
    ("A small high density nodule in the left upper region.",
     "A large low density mass in the right lower region."),
    ("Brain CT: no evidence of hemorrhage.", "Brain CT image, a small hemorrhage in the central region."),
    ("completely different", "毫不相干的句子"),
    ("CT", "MRI"),
    ("MRI示右肾囊肿 3.5 cm", "MRI示右肾囊肿, 3.5cm"),
    ("ＣＴ图像", "CT图像"),
    ("“引号”与'quotes'", "“引号”与\"quotes\""),
]


def compute() -> dict:
    """Runs inside the LLaMA-Factory venv."""
    import importlib.metadata
    import tempfile
    from types import SimpleNamespace

    import numpy as np
    from llamafactory.train.sft.metric import ComputeSimilarity
    from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer
    from transformers import EvalPrediction
    from transformers.trainer_utils import PredictionOutput

    texts = sorted({t for pair in PAIRS for t in pair} | {PROMPT})
    index = {t: i for i, t in enumerate(texts)}

    class WholeStringTokenizer:
        pad_token_id = len(texts)  # decodes to nothing

        def batch_decode(self, rows, skip_special_tokens=True):
            return ["".join(texts[i] for i in row if i != self.pad_token_id) for row in rows]

    tokenizer = WholeStringTokenizer()
    preds = np.array([[index[p]] for p, _ in PAIRS])
    labels = np.array([[index[l]] for _, l in PAIRS])
    metric = ComputeSimilarity(tokenizer=tokenizer)
    per_pair = []
    for k in range(len(PAIRS)):
        scores = metric(EvalPrediction(predictions=preds[k:k + 1], label_ids=labels[k:k + 1]))
        per_pair.append([scores[key] for key in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")])
    means = ComputeSimilarity(tokenizer=tokenizer)(EvalPrediction(predictions=preds, label_ids=labels))

    with tempfile.TemporaryDirectory() as tmp:
        trainer = SimpleNamespace(is_world_process_zero=lambda: True, args=SimpleNamespace(output_dir=tmp),
                                  processing_class=tokenizer)
        dataset = {"input_ids": [[index[PROMPT]]] * len(PAIRS)}
        CustomSeq2SeqTrainer.save_predictions(trainer, dataset, PredictionOutput(preds, labels, {}))
        predictions = (Path(tmp) / "generated_predictions.jsonl").read_text(encoding="utf-8")

    versions = {name: importlib.metadata.version(name)
                for name in ("llamafactory", "jieba", "nltk", "rouge-chinese", "transformers")}
    return {"versions": versions, "per_pair": per_pair, "predict": {f"predict_{k}": v for k, v in means.items()},
            "generated_predictions": predictions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", help="python of a venv with REQUIREMENTS installed (default: a scratch venv)")
    parser.add_argument("--compute", action="store_true", help=argparse.SUPPRESS)  # the run inside that venv
    a = parser.parse_args()
    if a.compute:
        print(json.dumps(compute(), ensure_ascii=False))
        return
    import subprocess

    if a.python:
        done = subprocess.run([a.python, __file__, "--compute"], capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from scratch_venv import ScratchVenv

        code = f"import runpy, sys; sys.argv = [{__file__!r}, '--compute']; runpy.run_path({__file__!r}, run_name='__main__')"
        result = ScratchVenv(REQUIREMENTS).run(code, timeout=1800)
    ASSET.parent.mkdir(exist_ok=True)
    ASSET.write_text(result.pop("generated_predictions"), encoding="utf-8")
    print(json.dumps(result, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
