"""The whole user path on folders laid out like the published Qwen3-VL downloads (`real_model_dir`: Qwen's real
151,643-rank BPE, the published chat template, processor and generation_config, bf16 safetensors, the MoE sharded
with its experts in the hub layout), dense and MoE, every stage the real command a user types:

    radscribe synth -> radscribe prepare -> radscribe train (dense: a short run; MoE: `--config recommended
    lora.experts=true` with short overrides) -> radscribe eval -> radscribe chat -> radscribe serve (the official
    `openai` client, the image as a data URL) -> radscribe export, reloaded with the stock Auto* classes.

One training run per architecture is shared by the downstream stages (module-scoped fixture).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from radscribe.cli import main
from radscribe.runlog import read_log

pytestmark = pytest.mark.slow

PROMPT = "图片中的诊断结果是怎样?"  # prepare's default zh prompt, the one the model is trained on
# A short run on CPU: 6 optimizer steps of 2 samples, fp32 (bf16 autocast is several times slower on CPU).
SHORT = ["train.max_steps=6", "train.per_device_batch=2", "train.grad_accum=1", "train.lr=5e-3",
         "train.precision=fp32", "train.logging_steps=1", "train.save_steps=1000", "data.val_split=null"]
# dense: the defaults, shortened; MoE: the recommended preset (r32, gradient checkpointing, warmup, dropout 0.05 on
# a small set, which PEFT cannot apply to expert parameters) with expert LoRA, shortened the same way
RECIPES = {"qwen3_vl": [], "qwen3_vl_moe": ["--config", "recommended", "lora.experts=true"]}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("user-path-data")
    assert main(["synth", "--out", str(root / "synth"), "--n", "40", "--size", "64", "--format", "png"]) == 0
    assert main(["prepare", str(root / "synth"), "--out", str(root / "dataset"), "--val-ratio", "0.25",
                 "--group-by", "patient"]) == 0
    summary = json.loads((root / "dataset" / "summary.json").read_text(encoding="utf-8"))
    assert summary["input_rows"] == 40 and summary["rejects"] == 0 and summary["images_stored"] == 40
    assert summary["train"] + summary["val"] == 40 and summary["val"] >= 3
    return root / "dataset"


@pytest.fixture(scope="module", params=sorted(RECIPES))
def trained(request, real_model_dir, dataset, tmp_path_factory) -> dict:
    """One `radscribe train` run on the real-layout folder of each architecture."""
    arch = request.param
    model = real_model_dir(arch)
    run = tmp_path_factory.mktemp(f"user-path-{arch}") / "run"
    assert main(["train", *RECIPES[arch], "--model", str(model), "--data", str(dataset), "--out", str(run),
                 *SHORT]) == 0
    return {"arch": arch, "model": model, "run": run, "data": dataset}


def val_image(data: Path) -> Path:
    row = json.loads((data / "val.json").read_text(encoding="utf-8"))[0]
    return data / row["images"][0]


def test_train_loss_falls_every_row_is_counted_and_the_adapter_changes_the_model(trained):
    from radscribe.model.load import load_model

    run = trained["run"]
    summary = json.loads((run / "train_summary.json").read_text(encoding="utf-8"))
    losses = [r["loss"] for r in read_log(run) if "loss" in r]
    assert summary["steps"] == 6 and len(losses) == 6
    # a random model over Qwen's 151,936-row vocabulary starts near ln(151936) = 11.93
    assert 11.0 < losses[0] < 12.5
    assert losses[-1] < losses[0] - 0.05 and min(losses[3:]) < min(losses[:3])
    rows = summary["rows"]["train"]
    assert rows["rejected"] == 0 and rows["used"] + rows["not_reached"] == rows["rows"] and rows["used"] >= 6 * 2
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    if trained["arch"] == "qwen3_vl_moe":  # the recommended preset with expert LoRA: r32, experts trained
        assert adapter_config["r"] == 32 and adapter_config["lora_alpha"] == 64
        assert sorted(summary["lora_expert_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
        # both fused expert weights of each of the fixture's 4 text layers
        targets = adapter_config["target_parameters"]
        assert sorted(t.split(".", 4)[-1] for t in targets) == sorted(summary["lora_expert_parameters"] * 4)
        assert summary["lora_dropout"] == 0.05 and adapter_config["lora_dropout"] == 0.0
    else:
        assert adapter_config["r"] == 8 and not summary["lora_expert_parameters"]

    # PEFT reloads the adapter on the downloaded base, and it moves the model's output
    tuned, processor = load_model(trained["model"], adapter=run, dtype="fp32", device="cpu")
    base, _ = load_model(trained["model"], dtype="fp32", device="cpu")
    inputs = chat_inputs(processor, val_image(trained["data"]))
    with torch.no_grad():
        delta = (tuned(**inputs).logits - base(**inputs).logits).abs().max().item()
    assert delta > 1e-2


def chat_inputs(processor, image_path: Path):
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(image_path).convert("RGB")},
                                             {"type": "text", "text": PROMPT}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


def test_eval_writes_a_prediction_for_every_sample_and_scores(trained):
    run, data = trained["run"], trained["data"]
    assert main(["eval", "--model", str(trained["model"]), "--adapter", str(run), "--data", str(data),
                 "--max-new-tokens", "12", "--batch-size", "4", "--n-boot", "50", "--dtype", "fp32"]) == 0
    out = run / "eval" / "val"
    val = json.loads((data / "val.json").read_text(encoding="utf-8"))
    predictions = [json.loads(line) for line in (out / "generated_predictions.jsonl").open(encoding="utf-8")]
    assert sorted(p["id"] for p in predictions) == sorted(r["id"] for r in val)
    assert all(p["label"] and isinstance(p["predict"], str) for p in predictions)
    assert any(p["predict"].strip() for p in predictions)
    results = json.loads((out / "predict_results.json").read_text())
    assert {"predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l"} <= set(results)
    assert all(0.0 <= results[k] <= 100.0 for k in ("predict_bleu-4", "predict_rouge-l"))
    scores = json.loads((out / "scores.json").read_text())
    assert scores["n"] == len(val) and scores["settings"]["temperature"] == 0.0  # eval stays greedy
    for name in ("rouge-l", "bleu-4", "finding_f1", "truth_all_accuracy"):
        score = scores["metrics"][name]
        assert 0.0 <= score["low"] <= score["value"] <= score["high"] <= 100.0


def test_chat_answers_about_one_image(trained, capsys):
    capsys.readouterr()
    assert main(["chat", "--model", str(trained["model"]), "--adapter", str(trained["run"]), "--image",
                 str(val_image(trained["data"])), "--max-new-tokens", "8", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Research use only — not a diagnosis."
    assert "".join(lines[1:]).strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_the_openai_client_with_an_image_data_url(trained, tmp_path):
    import httpx
    import openai

    from radscribe.model.load import load_processor, resolve_adapter
    from radscribe.model.pixels import apply_trained_limits
    from radscribe.serve.api import data_uri

    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "radscribe.cli", "serve", "--model", str(trained["model"]),
                               "--adapter", str(trained["run"]), "--port", str(port), "--device", "cpu"],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "radscribe serve did not answer in 600 s"
            try:
                if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        image = val_image(trained["data"])
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        reply = client.chat.completions.create(model="radscribe", max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri(image.read_bytes(), "image/png")}},
            {"type": "text", "text": PROMPT}]}])
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content.strip()
    assert reply.choices[0].finish_reason in ("stop", "length")
    usage = reply.usage
    assert 1 <= usage.completion_tokens <= 8 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # the prompt is what the run's processor makes of this chat: the run's image policy (data.image_min_pixels
    # 32x32 replaces the published 65,536-px floor), so the 64x64 image is its 4 training tokens, not 64
    processor = load_processor(trained["model"])
    apply_trained_limits(processor, resolve_adapter(trained["run"]))
    expected = chat_inputs(processor, image)["input_ids"].shape[-1]
    assert usage.prompt_tokens == expected


def test_export_reloads_with_the_stock_auto_classes_and_generates_like_base_plus_adapter(trained, tmp_path):
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    from radscribe.model.load import load_model, load_processor

    out = tmp_path / "export"
    assert main(["export", "--model", str(trained["model"]), "--adapter", str(trained["run"]), str(out)]) == 0
    assert not any(p.name.startswith("adapter") for p in out.iterdir())
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == trained["arch"] and config.text_config.dtype == torch.bfloat16  # as downloaded
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("Hello world")["input_ids"] == [9707, 1879]
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|image_pad|>"]) == [151644, 151645, 151655]
    image_processor = AutoImageProcessor.from_pretrained(out)
    assert (image_processor.patch_size, image_processor.merge_size) == (16, 2)
    # AutoProcessor itself needs torchvision for Qwen3-VL's video processor, which does not import beside CPU torch
    # (FIELD_NOTES); load_processor builds the same processor class without it.
    processor = load_processor(out)
    merged = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    tuned, base_processor = load_model(trained["model"], adapter=trained["run"], dtype="fp32", device="cpu")
    base, _ = load_model(trained["model"], dtype="fp32", device="cpu")

    image = val_image(trained["data"])
    exported, reference = chat_inputs(processor, image), chat_inputs(base_processor, image)
    assert torch.equal(exported["input_ids"], reference["input_ids"])
    assert torch.equal(exported["pixel_values"], reference["pixel_values"])
    with torch.no_grad():
        tokens = [m.generate(**x, max_new_tokens=12, do_sample=False)[0, x["input_ids"].shape[1]:].tolist()
                  for m, x in ((merged, exported), (tuned, reference))]
        logits = {name: m(**reference).logits for name, m in (("merged", merged), ("tuned", tuned), ("base", base))}
    assert tokens[0] == tokens[1] and len(tokens[0]) >= 1
    # The export is merged and stored in bf16 (the checkpoint's dtype): it reproduces what the adapter does to the
    # base to well within that change (the merge's rounding is the only difference).
    effect = (logits["tuned"] - logits["base"]).abs().max().item()
    error = (logits["merged"] - logits["tuned"]).abs().max().item()
    assert effect > 1e-2 and error < effect / 5
