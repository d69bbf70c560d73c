"""Tiny real-architecture models: released layout, determinism, tokenizer and chat template."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from radscribe.cli import main
from radscribe.data.synth import synth_reports
from radscribe.errors import RadscribeError
from radscribe.model.load import load_model
from radscribe.model.tiny import SPECIAL_TOKENS, build_tiny_model


def _chat(image, report="这是一张脑部CT图像。"):
    return [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": "图片中的诊断结果是怎样?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": report}]}]


def test_moe_experts_are_written_in_the_released_layout(models):
    with safe_open(str(models["qwen3_vl_moe"] / "model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys() if "layers.0.mlp.experts" in k}
    # released: gate_up_proj (E, H, 2I), down_proj (E, I, H) with E=4, H=64, I=48
    assert shapes == {"model.language_model.layers.0.mlp.experts.gate_up_proj": [4, 64, 96],
                      "model.language_model.layers.0.mlp.experts.down_proj": [4, 48, 64]}


def _in_memory_name(key: str) -> str:
    # Qwen2.5-VL is saved with the released key names (model.layers.*, visual.*), as downloaded checkpoints are
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith(("model.language_model.", "model.visual.")):
        return "model.language_model." + key[len("model."):]
    return key


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen3_vl_moe", "qwen2_5_vl"])
def test_loaded_weights_equal_the_saved_ones(models, arch):
    model, _ = load_model(models[arch], device="cpu")
    saved = {_in_memory_name(k): v for k, v in load_file(str(models[arch] / "model.safetensors")).items()}
    loaded = model.state_dict()
    assert set(saved) == set(loaded)
    for key, tensor in saved.items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensor = tensor.transpose(1, 2)  # back to transformers' in-memory layout
        assert torch.equal(loaded[key], tensor), key


def test_logits_survive_save_and_reload_exactly(models, tmp_path):
    model, processor = load_model(models["qwen3_vl_moe"], device="cpu")
    model.save_pretrained(tmp_path / "again")
    processor.save_pretrained(tmp_path / "again")
    again, _ = load_model(tmp_path / "again", device="cpu")
    image = Image.new("RGB", (96, 96), (120, 40, 200))
    text = processor.apply_chat_template(_chat(image), tokenize=False)
    batch = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, again(**batch).logits)


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = build_tiny_model("qwen3_vl_moe", tmp_path / "a", seed=3)
    b = build_tiny_model("qwen3_vl_moe", tmp_path / "b", seed=3)
    c = build_tiny_model("qwen3_vl_moe", tmp_path / "c", seed=4)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_image_becomes_its_pad_run_and_reports_are_few_tokens(models):
    _, processor = load_model(models["qwen3_vl"], device="cpu")
    tok = processor.tokenizer
    image = Image.new("RGB", (224, 224), (10, 200, 30))
    text = processor.apply_chat_template(_chat(image), tokenize=False)
    assert text == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>图片中的诊断结果是怎样?<|im_end|>\n"
                    "<|im_start|>assistant\n这是一张脑部CT图像。<|im_end|>\n")
    ids = processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0].tolist()
    assert ids.count(tok.convert_tokens_to_ids("<|image_pad|>")) == 49  # 224² / 16² patches / 2² merge
    # every special token is one id, the report decodes back exactly, and BPE learned whole clauses
    assert all(len(tok.encode(t, add_special_tokens=False)) == 1 for t in SPECIAL_TOKENS)
    for lang, most in (("zh", 20), ("en", 64)):  # ~120 zh characters, ~45 en words
        for report in synth_reports(20, seed=7, lang=lang):
            ids = tok.encode(report, add_special_tokens=False)
            assert tok.decode(ids) == report
            assert len(ids) <= most, report
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_text_only_messages_and_generation_prompt(models):
    _, processor = load_model(models["qwen2_5_vl"], device="cpu")
    text = processor.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                         add_generation_prompt=True)
    # Qwen2.5-VL's template opens with the default system turn, as the released one does
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")


def test_model_config_matches_the_tokenizer(models):
    config = json.loads((models["qwen3_vl"] / "config.json").read_text())
    tokenizer = json.loads((models["qwen3_vl"] / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    assert config["image_token_id"] == ids["<|image_pad|>"]
    assert config["vision_start_token_id"] == ids["<|vision_start|>"]
    assert config["text_config"]["vocab_size"] >= max(ids.values()) + 1
    assert config["text_config"]["vocab_size"] % 16 == 0


def test_larger_model_and_own_corpus(tmp_path):
    corpus = ["肝脏右下见一大低密度肿块。", "肾脏中央见一小高密度结节。"] * 20
    out = build_tiny_model("qwen3_vl", tmp_path / "big", text_hidden=128, vision_hidden=64, corpus=corpus,
                           vocab_size=400)
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["hidden_size"] == 128 and config["vision_config"]["hidden_size"] == 64
    _, processor = load_model(out, device="cpu")
    # the tokenizer was trained on this corpus: a whole clause is one token
    assert len(processor.tokenizer.tokenize("肝脏右下见一大低密度肿块")) == 1

def test_cli_builds_a_model_and_rejects_bad_sizes(tmp_path, capsys):
    assert main(["tiny-model", "--arch", "qwen3_vl", str(tmp_path / "m"), "--seed", "1"]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert main(["tiny-model", str(tmp_path / "bad"), "--text-hidden", "40"]) == 2
    assert "--text-hidden (40)" in capsys.readouterr().err
    with pytest.raises(RadscribeError, match="corpus is empty"):
        build_tiny_model("qwen3_vl", tmp_path / "empty", corpus=[])


def test_cli_trains_the_tokenizer_on_a_prepared_dataset(tmp_path):
    dataset = tmp_path / "ds"
    dataset.mkdir()
    rows = [{"id": f"r{i}", "images": [f"images/r{i}.png"],
             "messages": [{"role": "user", "content": "<image>请描述这张片子"},
                          {"role": "assistant", "content": f"骨盆平片所见骨质结构完整{i % 3}"}]} for i in range(30)]
    (dataset / "train.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "m"
    assert main(["tiny-model", str(out), "--corpus-dataset", str(dataset), "--vocab-size", "400",
                 "--max-pixels", str(128 * 128)]) == 0
    _, processor = load_model(out, device="cpu")
    assert len(processor.tokenizer.tokenize("请描述这张片子")) == 1  # learned from the dataset's prompts
    assert processor.image_processor.size["longest_edge"] == 128 * 128
    image = Image.new("RGB", (512, 512))
    grid = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[image])["image_grid_thw"]
    assert int(grid[0].prod()) * 16 * 16 <= 128 * 128
