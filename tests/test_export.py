"""`radscribe export`: the merged folder is standalone, keeps the released expert layout, and generates exactly
what base + adapter generates (tiny dense and MoE models, a LoRA with non-zero B made directly with peft)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from radscribe.errors import RadscribeError
from radscribe.export import export
from radscribe.model.load import load_model, load_processor
from radscribe.model.tiny import build_tiny_model


def make_adapter(base, out, experts: bool):
    from peft import LoraConfig, get_peft_model

    model, _ = load_model(base, device="cpu")
    torch.manual_seed(1)
    # init_lora_weights=False gives random, non-zero B: the adapter changes outputs from the first token.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if experts else None,
                        init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


def greedy(model, processor, n=12):
    image = Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8"))
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "图片中的诊断结果是怎样?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return tokens[0, inputs["input_ids"].shape[1]:].tolist(), logits


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen3_vl_moe"])
def test_export_matches_base_plus_adapter(tmp_path, arch):
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    base = build_tiny_model(arch, tmp_path / "base", seed=0)
    adapter = make_adapter(base, tmp_path / "adapter", experts=arch.endswith("moe"))
    out = export(base, adapter, tmp_path / "export")

    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(n.startswith("adapter") for n in names)
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text()

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    experts = {k: v for k, v in shapes.items() if ".mlp.experts." in k}
    if arch.endswith("moe"):
        # released layout: gate_up_proj (E, H, 2I), down_proj (E, I, H) with H=64, I=48, E=4
        assert experts and all(v == ((4, 64, 96) if k.endswith("gate_up_proj") else (4, 48, 64))
                               for k, v in experts.items())
    else:
        assert not experts

    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = load_processor(out)
    with_adapter, processor_base = load_model(base, adapter=adapter, device="cpu")
    plain, _ = load_model(base, device="cpu")
    tokens_export, logits_export = greedy(merged, processor)
    tokens_adapter, logits_adapter = greedy(with_adapter, processor_base)
    tokens_plain, logits_plain = greedy(plain, processor_base)
    assert tokens_export == tokens_adapter
    assert torch.allclose(logits_export, logits_adapter, atol=1e-4)
    assert (logits_plain - logits_adapter).abs().max() > 0.1  # the adapter really changes the model


@pytest.mark.parametrize("moe_intermediate", [64, 32])  # hidden 64: down_proj, then gate_up_proj square
def test_export_writes_square_experts_in_the_released_layout(tmp_path, moe_intermediate):
    """A square expert tensor has the same shape in both layouts: the export still writes the merged experts
    transposed (the released layout llama.cpp's converter and the loader read), and loads back as base + adapter."""
    from safetensors import safe_open

    from radscribe.model.load import EXPERT_TENSORS

    base = build_tiny_model("qwen3_vl_moe", tmp_path / "base", seed=0, text_hidden=64,
                            moe_intermediate=moe_intermediate)
    adapter = make_adapter(base, tmp_path / "adapter", experts=True)
    out = export(base, adapter, tmp_path / "export")
    with_adapter, processor = load_model(base, adapter=adapter, device="cpu")
    in_memory = {k: v for k, v in with_adapter.state_dict().items() if k.endswith(EXPERT_TENSORS)}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys() if k.endswith(EXPERT_TENSORS)}  # noqa: SIM118
    assert stored.keys() == in_memory.keys() and len(stored) == 4
    for name, tensor in stored.items():
        assert torch.equal(tensor, in_memory[name].transpose(1, 2)), name
    exported, _ = load_model(out, device="cpu")
    (tokens_export, logits_export), (tokens_adapter, logits_adapter) = (greedy(m, processor)
                                                                        for m in (exported, with_adapter))
    assert tokens_export == tokens_adapter and torch.allclose(logits_export, logits_adapter, atol=1e-4)


def test_export_4bit_is_prequantised_and_matches_quantised_load(tmp_path):
    from transformers import AutoModelForImageTextToText

    base = build_tiny_model("qwen3_vl_moe", tmp_path / "base", seed=0)
    adapter = make_adapter(base, tmp_path / "adapter", experts=True)
    full = export(base, adapter, tmp_path / "full")
    q4 = export(base, adapter, tmp_path / "q4", quantize="4bit")

    config = json.loads((q4 / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["load_in_4bit"]
    assert config["bnb_4bit_quant_type"] == "nf4" and config["bnb_4bit_compute_dtype"] == "bfloat16"
    assert (q4 / "model.safetensors").stat().st_size < (full / "model.safetensors").stat().st_size

    loaded = AutoModelForImageTextToText.from_pretrained(q4, device_map={"": "cpu"}).eval()
    kinds = {name: type(m).__name__ for name, m in loaded.named_modules()}
    assert kinds["model.language_model.layers.0.self_attn.q_proj"] == "Linear4bit"
    assert kinds["lm_head"] == "Linear"
    assert not any(kind == "Linear4bit" for name, kind in kinds.items() if name.startswith("model.visual"))
    # bitsandbytes leaves the 3-D expert tensors alone: they load back unquantised, in the merge's values.
    merged = AutoModelForImageTextToText.from_pretrained(full)
    for layer, merged_layer in zip(loaded.model.language_model.layers, merged.model.language_model.layers):
        for name in ("gate_up_proj", "down_proj"):
            ours, reference = getattr(layer.mlp.experts, name), getattr(merged_layer.mlp.experts, name)
            assert ours.dtype == torch.bfloat16 and torch.equal(ours, reference.to(torch.bfloat16))
    reference, processor = load_model(full, dtype="bf16", quantization="4bit", device="cpu")
    assert greedy(loaded, processor)[0] == greedy(reference, processor)[0]


def test_export_refuses_a_non_empty_folder_and_unknown_quantization(tmp_path):
    base = build_tiny_model("qwen3_vl", tmp_path / "base", seed=0)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(RadscribeError, match="not empty"):
        export(base, tmp_path / "nope", tmp_path / "busy")
    with pytest.raises(RadscribeError, match="8bit"):
        export(base, tmp_path / "nope", tmp_path / "new", quantize="8bit")
    with pytest.raises(RadscribeError, match="adapter"):
        export(base, tmp_path / "nope", tmp_path / "new")


def test_cli_export_reports_user_mistakes_in_one_line(tmp_path, capsys):
    from radscribe.cli import main

    base = build_tiny_model("qwen3_vl", tmp_path / "base", seed=0)
    assert main(["export", "--model", str(base), "--adapter", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("radscribe export: error: adapter") and "does not exist" in last
