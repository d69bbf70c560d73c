"""The real-layout fixture: a folder that differs from the published Qwen download only in widths and weights.

Expected values are the published ones (token ids Qwen's tokenizer gives, the published config/processor/generation
values, renderings read off the published template text), not values read back from our own builder.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import (AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer,
                          GenerationConfig)

from radscribe.cli import main
from radscribe.errors import RadscribeError
from radscribe.model import real_layout
from radscribe.model.load import load_model, load_processor
from radscribe.model.real_layout import Widths, build_real_layout_model

ARCHS = ("qwen3_vl", "qwen3_vl_moe", "qwen2_5_vl")

# The published ids (FIELD_NOTES: what Qwen2/2.5/3's own tokenizer gives).
TOKEN_FACTS = [
    ("Hello world", [9707, 1879]),
    ("<|im_start|>user\n你好<|im_end|>\n", [151644, 872, 198, 108386, 151645, 198]),
    ("What is 2 plus 2?", [3838, 374, 220, 17, 5519, 220, 17, 30]),
]
PUBLISHED_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
                 "<|vision_end|>": 151653, "<|vision_pad|>": 151654, "<|image_pad|>": 151655, "<|video_pad|>": 151656,
                 "<tool_call>": 151657, "<|file_sep|>": 151664}
QWEN3_ONLY_IDS = {"<tool_response>": 151665, "</tool_response>": 151666, "<think>": 151667, "</think>": 151668}


@pytest.fixture(scope="module")
def folders(real_model_dir):
    # the session's seed-0 real-layout folders (tests/conftest.py), shared with other test files; read-only here
    return {arch: real_model_dir(arch) for arch in ARCHS}


def _json(folder, name):
    return json.loads((folder / name).read_text(encoding="utf-8"))


def _saved_tensors(folder) -> dict:
    files = sorted(folder.glob("model*.safetensors"))
    tensors = {}
    for f in files:
        with safe_open(str(f), "pt") as handle:
            tensors.update({k: handle.get_tensor(k) for k in handle.keys()})
    return tensors


@pytest.mark.parametrize("arch", ARCHS)
def test_autotokenizer_gives_the_published_ids(folders, arch):
    tok = AutoTokenizer.from_pretrained(folders[arch])
    for text, ids in TOKEN_FACTS:
        assert tok.encode(text, add_special_tokens=False) == ids, text
        assert tok.decode(ids) == text
    published = PUBLISHED_IDS | (QWEN3_ONLY_IDS if arch != "qwen2_5_vl" else {})
    assert {t: tok.convert_tokens_to_ids(t) for t in published} == published
    assert len(tok) == (151669 if arch != "qwen2_5_vl" else 151665)
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    # <think> is an added token but not a special one in the release: decoding keeps it
    if arch != "qwen2_5_vl":
        assert tok.decode([151667, 9707, 151668], skip_special_tokens=True) == "<think>Hello</think>"


def test_tokenizer_files_hold_the_full_bpe(folders):
    folder = folders["qwen3_vl"]
    vocab = _json(folder, "vocab.json")
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 151643 and sorted(vocab.values()) == list(range(151643))
    assert merges[0] == "#version: 0.2" and len(merges) - 1 == 151387  # one per multi-byte token
    assert vocab["Hello"] == 9707 and vocab["Ġworld"] == 1879
    added = _json(folder, "tokenizer.json")["added_tokens"]
    assert [t["id"] for t in added] == list(range(151643, 151669))
    assert [t["content"] for t in added if not t["special"]][0] == "<tool_call>"


def test_merge_loop_takes_the_lowest_rank_below_the_token():
    # "abc" (rank 5) is reachable as a+bc (bc rank 3) or ab+c (ab rank 4): the merge loop joins b,c first
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"bc": 3, b"ab": 4, b"abc": 5}
    assert real_layout._merge_of(b"abc", 5, ranks) == (b"a", b"bc")
    # a pair ranked above the token may not be used to build it
    with pytest.raises(RadscribeError, match="rank 4"):
        real_layout._merge_of(b"abc", 4, {b"a": 0, b"b": 1, b"c": 2, b"abc": 4, b"ab": 5, b"bc": 6})


@pytest.mark.parametrize("arch", ARCHS)
def test_folder_loads_with_the_stock_auto_classes_and_our_loader(folders, arch):
    folder = folders[arch]
    classes = {"qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"),
               "qwen3_vl_moe": ("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration", "Qwen3VLProcessor"),
               "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor")}[arch]
    assert type(AutoConfig.from_pretrained(folder)).__name__ == classes[0]
    assert type(AutoTokenizer.from_pretrained(folder)).__name__ == "Qwen2Tokenizer"
    assert type(AutoImageProcessor.from_pretrained(folder)).__name__.startswith("Qwen2VLImageProcessor")
    stock = AutoModelForImageTextToText.from_pretrained(folder)
    assert type(stock).__name__ == classes[1] and stock.dtype == torch.bfloat16
    model, processor = load_model(folder, device="cpu")
    assert type(model).__name__ == classes[1]
    assert classes[2] in [c.__name__ for c in type(processor).__mro__]
    assert type(load_processor(folder).tokenizer).__name__ == "Qwen2Tokenizer"
    # the tiny model generates through the real processor and template (mm_token_type_ids included)
    image = Image.new("RGB", (64, 64), (40, 90, 200))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, batch["input_ids"].shape[1] + 3)


@pytest.mark.parametrize("arch, section, theta, interleaved", [
    ("qwen3_vl", [4, 2, 2], 5000000, True),
    ("qwen3_vl_moe", [4, 2, 2], 5000000, True),
    ("qwen2_5_vl", [2, 3, 3], 1000000.0, None),
])
def test_config_is_in_the_published_key_layout_and_autoconfig_reads_mrope(folders, arch, section, theta,
                                                                          interleaved):
    raw = _json(folders[arch], "config.json")
    text_raw = raw.get("text_config", raw)  # Qwen2.5-VL's release is flat
    assert "rope_parameters" not in text_raw and text_raw["rope_scaling"]["mrope_section"] == section
    assert text_raw["rope_theta"] == theta
    text = AutoConfig.from_pretrained(folders[arch]).text_config
    assert text.rope_parameters["mrope_section"] == section
    assert text.rope_parameters["rope_theta"] == theta
    assert text.rope_parameters.get("mrope_interleaved") == interleaved
    assert text.num_hidden_layers == 4


def test_qwen3_configs_match_the_published_values(folders):
    dense, moe = _json(folders["qwen3_vl"], "config.json"), _json(folders["qwen3_vl_moe"], "config.json")
    assert list(dense) == sorted(dense) and dense["transformers_version"].startswith("4.57")
    assert dense["text_config"]["dtype"] == moe["text_config"]["dtype"] == "bfloat16"
    assert (dense["tie_word_embeddings"], moe["tie_word_embeddings"]) == (True, False)  # 2B/4B vs 30B-A3B
    assert dense["text_config"]["vocab_size"] == moe["text_config"]["vocab_size"] == 151936
    text = moe["text_config"]
    assert (text["num_experts"], text["num_experts_per_tok"], text["moe_intermediate_size"]) == (4, 2, 48)
    assert text["mlp_only_layers"] == [] and text["decoder_sparse_step"] == 1 and text["norm_topk_prob"] is True
    for config in (dense, moe):
        assert (config["image_token_id"], config["video_token_id"]) == (151655, 151656)
        assert (config["vision_start_token_id"], config["vision_end_token_id"]) == (151652, 151653)
        deepstack = config["vision_config"]["deepstack_visual_indexes"]
        # llama.cpp needs a text layer that is not a deepstack layer
        assert 0 < len(deepstack) < config["text_config"]["num_hidden_layers"]
        assert all(0 <= i < config["vision_config"]["depth"] for i in deepstack)
        assert config["vision_config"]["depth"] >= 2 and config["text_config"]["num_hidden_layers"] >= 4


@pytest.mark.parametrize("arch", ARCHS)
def test_weights_are_bf16_under_the_released_names_and_load_exactly(folders, arch):
    saved = _saved_tensors(folders[arch])
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    prefixes = {k.split(".")[0] + "." + k.split(".")[1] for k in saved if k != "lm_head.weight"}
    expected = {"qwen2_5_vl": {"model.embed_tokens", "model.layers", "model.norm", "visual.blocks",
                               "visual.merger", "visual.patch_embed"}}.get(arch)
    if expected is None:
        assert prefixes == {"model.language_model", "model.visual"}
    else:
        assert prefixes == expected
    assert ("lm_head.weight" in saved) == (arch != "qwen3_vl")  # a tied release stores only the embedding
    model = AutoModelForImageTextToText.from_pretrained(folders[arch])
    loaded = model.state_dict()
    renamed = {("model.language_model." + k[6:] if arch == "qwen2_5_vl" and k.startswith("model.") else
                "model." + k if k.startswith("visual.") else k): v for k, v in saved.items()}
    assert set(renamed) | ({"lm_head.weight"} if arch == "qwen3_vl" else set()) == set(loaded)
    for key, tensor in renamed.items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensor = tensor.transpose(1, 2)  # transformers' load transposes the hub layout
        assert torch.equal(loaded[key], tensor), key


def test_moe_is_sharded_with_experts_in_the_hub_layout(folders):
    folder = folders["qwen3_vl_moe"]
    index = _json(folder, "model.safetensors.index.json")
    shards = sorted(f.name for f in folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    saved = _saved_tensors(folder)
    assert set(index["weight_map"]) == set(saved)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in saved.values())
    prefix = "model.language_model.layers.0.mlp.experts."
    # hub: gate_up_proj [E, hidden, 2 * moe_inter], down_proj [E, moe_inter, hidden]; E=4, hidden 64, moe_inter 48
    assert list(saved[prefix + "gate_up_proj"].shape) == [4, 64, 96]
    assert list(saved[prefix + "down_proj"].shape) == [4, 48, 64]
    experts = AutoModelForImageTextToText.from_pretrained(folder).model.language_model.layers[0].mlp.experts
    assert torch.equal(experts.gate_up_proj.data, saved[prefix + "gate_up_proj"].transpose(1, 2))
    assert torch.equal(experts.down_proj.data, saved[prefix + "down_proj"].transpose(1, 2))


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen3_vl_moe"])
def test_generation_config_holds_the_published_sampling_defaults(folders, arch):
    g = GenerationConfig.from_pretrained(folders[arch])
    assert (g.do_sample, g.temperature, g.top_p, g.top_k, g.repetition_penalty) == (True, 0.7, 0.8, 20, 1.0)
    assert (g.eos_token_id, g.pad_token_id, g.bos_token_id) == ([151645, 151643], 151643, 151643)


def test_qwen2_5_vl_generation_config_is_its_own(folders):
    g = GenerationConfig.from_pretrained(folders["qwen2_5_vl"])
    assert (g.do_sample, g.temperature, g.repetition_penalty) == (True, 1e-06, 1.05)
    assert (g.eos_token_id, g.pad_token_id) == ([151645, 151643], 151643)


def _tokens_for(processor, side: int) -> int:
    grid = processor(images=[Image.new("RGB", (side, side), (128, 128, 128))], return_tensors="pt")["image_grid_thw"]
    return int(grid[0].prod()) // processor.merge_size ** 2


def _tokens_planned(processor, side: int) -> int:
    # the processor's own count (what vLLM asks it), without building 400 MB of pixel values for a 4096² image
    return processor.get_number_of_image_patches(side, side) // processor.merge_size ** 2


def test_processor_applies_the_published_limits(folders):
    raw = _json(folders["qwen3_vl"], "preprocessor_config.json")
    assert raw["size"] == {"longest_edge": 16777216, "shortest_edge": 65536}
    assert "min_pixels" not in raw and "max_pixels" not in raw
    assert (raw["patch_size"], raw["merge_size"], raw["temporal_patch_size"]) == (16, 2, 2)
    assert raw["image_mean"] == raw["image_std"] == [0.5, 0.5, 0.5]
    qwen3 = AutoImageProcessor.from_pretrained(folders["qwen3_vl"])
    # 16,777,216 px = 4096²: a 4096² scan passes whole, (4096 / 32)² tokens; a 1024² one is 32² tokens; the floor
    # 65,536 px = 256² makes even a 32² image 64 tokens
    assert _tokens_planned(qwen3, 4096) == 16384 and _tokens_planned(qwen3, 8192) == 16384
    assert _tokens_for(qwen3, 1024) == 1024
    assert _tokens_for(qwen3, 32) == 64
    qwen2_5 = AutoImageProcessor.from_pretrained(folders["qwen2_5_vl"])
    raw = _json(folders["qwen2_5_vl"], "preprocessor_config.json")
    assert (raw["min_pixels"], raw["max_pixels"], raw["patch_size"]) == (3136, 12845056, 14)
    assert raw["image_mean"] == [0.48145466, 0.4578275, 0.40821073]
    # 12,845,056 px = 3584² = (128 * 28)²; 3,136 px = 56² = 2 * 2 tokens
    assert _tokens_planned(qwen2_5, 3584) == 16384 and _tokens_planned(qwen2_5, 8192) <= 16384
    assert _tokens_for(qwen2_5, 28) == 4
    assert (folders["qwen3_vl"] / "video_preprocessor_config.json").is_file()
    assert not (folders["qwen2_5_vl"] / "video_preprocessor_config.json").exists()  # not in that release


def _image_turns(image):
    return [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": "图片中的诊断结果是怎样?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "这是一张脑部CT图像。"}]}]


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen3_vl_moe"])
def test_chat_template_renders_as_the_published_qwen3_vl_one(folders, arch):
    folder = folders[arch]
    template = _json(folder, "chat_template.json")["chat_template"]
    # the transcription of the published chat_template.json (5,292 characters)
    assert hashlib.sha256(template.encode()).hexdigest().startswith("3636d0f0bd6bef02")
    assert _json(folder, "tokenizer_config.json")["chat_template"] == template
    processor = load_processor(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    image = Image.new("RGB", (32, 32))
    # renderings read off the published template: no default system turn, the image as one
    # <|vision_start|><|image_pad|><|vision_end|> run, each turn closed by <|im_end|>\n
    expected = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>图片中的诊断结果是怎样?<|im_end|>\n"
                "<|im_start|>assistant\n这是一张脑部CT图像。<|im_end|>\n")
    assert processor.apply_chat_template(_image_turns(image), tokenize=False) == expected
    assert tokenizer.apply_chat_template(_image_turns(image), tokenize=False) == expected
    system = [{"role": "system", "content": "You are a radiologist."}, {"role": "user", "content": "hello"}]
    assert processor.apply_chat_template(system, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a radiologist.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
        "<|im_start|>assistant\n")
    two = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "image", "image": image},
                                        {"type": "text", "text": "compare"}]}]
    assert processor.apply_chat_template(two, tokenize=False, add_vision_id=True) == (
        "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>"
        "Picture 2: <|vision_start|><|image_pad|><|vision_end|>compare<|im_end|>\n")


def test_qwen2_5_vl_template_opens_with_its_default_system_turn(folders):
    processor = load_processor(folders["qwen2_5_vl"])
    assert processor.apply_chat_template(_image_turns(Image.new("RGB", (28, 28))), tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>图片中的诊断结果是怎样?<|im_end|>\n"
        "<|im_start|>assistant\n这是一张脑部CT图像。<|im_end|>\n")


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = build_real_layout_model("qwen3_vl_moe", tmp_path / "a", seed=3)
    b = build_real_layout_model("qwen3_vl_moe", tmp_path / "b", seed=3)
    c = build_real_layout_model("qwen3_vl_moe", tmp_path / "c", seed=4)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) == sorted(p.name for p in c.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    differs = {name for name in names if (a / name).read_bytes() != (c / name).read_bytes()}
    assert differs and all(name.endswith(".safetensors") for name in differs)


def test_a_rebuild_over_an_ours_folder_leaves_nothing_of_it(tmp_path, tiny_model_dir):
    import shutil

    out = shutil.copytree(tiny_model_dir("qwen3_vl"), tmp_path / "m")
    build_real_layout_model("qwen3_vl", out)
    assert not (out / "processor_config.json").exists() and not (out / "chat_template.jinja").exists()
    assert AutoTokenizer.from_pretrained(out).encode("Hello world") == [9707, 1879]


def test_conversion_is_cached_by_the_content_of_qwen_tiktoken(tmp_path, monkeypatch):
    monkeypatch.setenv("RADSCRIBE_CACHE_DIR", str(tmp_path / "cache"))
    tiktoken = real_layout.find_qwen_tiktoken()
    digest = hashlib.sha256(tiktoken.read_bytes()).hexdigest()
    cached = tmp_path / "cache" / f"qwen-bpe-v1-{digest[:16]}"
    cached.mkdir(parents=True)
    (cached / "vocab.json").write_text("{}")
    (cached / "merges.txt").write_text("#version: 0.2\n")
    assert real_layout.converted_bpe(tiktoken) == cached  # reused, not converted again
    assert (cached / "vocab.json").read_text() == "{}"


def test_a_missing_or_wrong_tiktoken_is_one_clear_error(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RadscribeError, match=r"pip install dashscope.*--tiktoken FILE"):
        real_layout.find_qwen_tiktoken()
    with pytest.raises(RadscribeError, match="no such file"):
        real_layout.find_qwen_tiktoken(tmp_path / "nope.tiktoken")
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(b"IQ== 0\nIg== 1\nIw==\n")
    with pytest.raises(RadscribeError, match=r"bad.tiktoken, line 3"):
        real_layout.read_ranks(bad)
    short = tmp_path / "short.tiktoken"
    short.write_bytes(b"IQ== 0\nIg== 1\n")
    with pytest.raises(RadscribeError, match="2 ranks, but Qwen's BPE has 151,643"):
        real_layout.read_ranks(short)


def test_cli_builds_the_real_layout_and_refuses_options_it_cannot_apply(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["tiny-model", "--layout", "real", "--arch", "qwen3_vl", str(out), "--text-layers", "6"]) == 0
    assert _json(out, "config.json")["text_config"]["num_hidden_layers"] == 6
    assert AutoTokenizer.from_pretrained(out).encode("Hello world") == [9707, 1879]
    assert main(["tiny-model", "--layout", "real", str(tmp_path / "x"), "--vocab-size", "400"]) == 2
    assert "--vocab-size cannot take effect with --layout real" in capsys.readouterr().err
    assert main(["tiny-model", str(tmp_path / "y"), "--tiktoken", "qwen.tiktoken"]) == 2
    assert "--tiktoken only applies to --layout real" in capsys.readouterr().err
    with pytest.raises(RadscribeError, match="--text-layers"):
        build_real_layout_model("qwen3_vl", tmp_path / "z", widths=Widths(text_layers=1))
