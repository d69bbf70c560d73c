"""A reduced demo end to end: every stage runs, the fine-tuned model beats the base, a rerun reuses the stages."""

import json

from radscribe.config import load_config
from radscribe.demo import DemoConfig, demo, write_general_dataset
from radscribe.data.dataset import read_split


def test_reduced_demo_learns_and_caches(tmp_path, capsys):
    cfg = load_config(DemoConfig, None, [
        f"out={tmp_path / 'demo'}", "data.n=240", "data.size=64", "data.val_ratio=0.2",
        "pretrain.steps=120", "pretrain.batch=16", "pretrain.lr=2e-3",
        "finetune.steps=120", "finetune.batch=16", "eval_limit=32", "max_new_tokens=64", "eval_batch=16",
    ])
    result = demo(cfg)
    base, tuned = result["base"], result["fine_tuned"]
    # The LoRA stage must move the model from captions to reports: ROUGE-L rises clearly.
    assert tuned["rouge-l"]["value"] > base["rouge-l"]["value"] + 10
    out = tmp_path / "demo"
    html = (out / "report" / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in html
    assert json.loads((out / "demo_result.json").read_text())["report"].endswith("report.html")
    assert (out / "lora" / "adapter" / "adapter_config.json").is_file()
    assert (out / "base" / "model" / "config.json").is_file()
    capsys.readouterr()

    again = demo(cfg)  # every stage cached: same numbers, nothing retrained
    err = capsys.readouterr().err
    assert err.count(": cached") == 5
    assert again["fine_tuned"] == result["fine_tuned"]


def test_general_dataset_has_captions_and_text_only_rows(tmp_path):
    ds = tmp_path / "ds"
    (ds / "images").mkdir(parents=True)
    (ds / "images" / "a.png").write_bytes(b"x")
    row = {"id": "a", "images": ["images/a.png"], "truth": {"modality": "CT", "organ": "brain"},
           "messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "完整报告。"}]}
    for split in ("train", "val"):
        (ds / f"{split}.json").write_text(json.dumps([row], ensure_ascii=False), encoding="utf-8")
    general = write_general_dataset(ds, tmp_path / "general", "zh")
    train = list(read_split(general, "train"))
    assert [s.report for s in train] == ["这是一张脑CT图像。", "完整报告。"]
    assert train[0].images == [general / "../ds/images/a.png"] and train[1].images == []
    assert [s.report for s in read_split(general, "val")] == ["这是一张脑CT图像。"]
