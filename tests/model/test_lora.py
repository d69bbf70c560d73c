"""LoRA targets ("all" as LLaMA-Factory resolves it), expert LoRA on fused MoE weights, and 4-bit QLoRA on CPU."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from PIL import Image

from radscribe.errors import RadscribeError
from radscribe.model import lora
from radscribe.model.load import load_model

LM = "model.language_model."


def _batch(processor, report="这是一张肺CT图像。右下区域可见一小病灶。"):
    image = Image.new("RGB", (96, 96), (30, 160, 90))
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "描述"}]},
            {"role": "assistant", "content": [{"type": "text", "text": report}]}]
    batch = processor(text=[processor.apply_chat_template(chat, tokenize=False)], images=[image],
                      return_tensors="pt")
    batch["labels"] = batch["input_ids"].clone()
    return batch


def _lora_param_count(model, names, rank):
    modules = dict(model.named_modules())
    return sum(rank * (modules[n].in_features + modules[n].out_features) for n in names)


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl", "qwen3_vl_moe"])
def test_all_is_every_language_model_linear_except_lm_head(models, arch):
    model, _ = load_model(models[arch], device="cpu")
    targets = lora.lora_targets(model, "all")
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert targets == sorted(n for n in linears if n.startswith(LM))
    assert "lm_head" not in targets and not any("visual" in t for t in targets)
    per_layer = {"qwen3_vl": 7, "qwen2_5_vl": 7, "qwen3_vl_moe": 4}[arch]  # MoE: attention only (experts fused)
    assert len(targets) == 2 * per_layer


def test_vision_and_merger_are_opt_in(models):
    model, _ = load_model(models["qwen2_5_vl"], device="cpu")
    base = set(lora.lora_targets(model))
    with_vision = set(lora.lora_targets(model, vision=True)) - base
    with_merger = set(lora.lora_targets(model, merger=True)) - base
    # Qwen2.5-VL vision blocks reuse mlp.gate_proj/up_proj/down_proj: full names keep them apart
    assert with_vision == {f"model.visual.blocks.{i}.{n}" for i in range(2)
                           for n in ("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert with_merger == {"model.visual.merger.mlp.0", "model.visual.merger.mlp.2"}
    model3, _ = load_model(models["qwen3_vl"], device="cpu")
    merger3 = set(lora.lora_targets(model3, merger=True)) - set(lora.lora_targets(model3))
    assert merger3 == {f"model.visual.merger.linear_fc{j}" for j in (1, 2)} | {
        f"model.visual.deepstack_merger_list.{i}.linear_fc{j}" for i in range(2) for j in (1, 2)}


def test_a_target_list_selects_by_suffix_and_unknown_names_fail(models):
    model, _ = load_model(models["qwen2_5_vl"], device="cpu")
    assert lora.lora_targets(model, ["q_proj", "v_proj"]) == sorted(
        f"{LM}layers.{i}.self_attn.{n}" for i in range(2) for n in ("q_proj", "v_proj"))
    assert lora.lora_targets(model, "down_proj") == [f"{LM}layers.{i}.mlp.down_proj" for i in range(2)]
    with pytest.raises(RadscribeError, match="qkv"):  # a vision name, while the tower is frozen
        lora.lora_targets(model, ["qkv"])


def test_describe_reports_targets_and_exact_counts(models):
    model, _ = load_model(models["qwen3_vl"], device="cpu", trainable=True)
    targets = lora.lora_targets(model)
    expected = _lora_param_count(model, targets, rank=8)
    total = sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, lora.build_lora_config(model, rank=8, alpha=16))
    info = lora.describe(peft_model)
    assert info["lora_modules"] == {"language_model": ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj",
                                                       "self_attn.k_proj", "self_attn.o_proj",
                                                       "self_attn.q_proj", "self_attn.v_proj"]}
    assert info["lora_module_count"] == 14 and info["lora_expert_parameters"] == []
    assert info["trainable_parameters"] == expected == 16384
    assert info["total_parameters"] == total + expected


def test_expert_lora_trains_the_fused_experts_and_reloads_exactly(models, tmp_path):
    torch.manual_seed(0)
    model, processor = load_model(models["qwen3_vl_moe"], device="cpu", trainable=True)
    config = lora.build_lora_config(model, rank=4, alpha=8, experts=True)
    assert sorted(config.target_parameters) == sorted(
        f"{LM}layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj"))
    peft_model = get_peft_model(model, config)
    info = lora.describe(peft_model)
    assert info["lora_expert_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    expert_lora = {n: p for n, p in peft_model.named_parameters() if p.requires_grad and ".experts." in n}
    assert len(expert_lora) == 8  # A and B for two parameters in two layers
    without = sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad) - sum(
        p.numel() for p in expert_lora.values())
    assert info["trainable_parameters"] == without + sum(p.numel() for p in expert_lora.values())

    batch = _batch(processor)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in expert_lora.items()}
    for _ in range(3):
        loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.equal(before[n], p) for n, p in expert_lora.items())

    peft_model.eval()
    with torch.no_grad():
        logits = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path / "run" / "adapter")
    reloaded, _ = load_model(models["qwen3_vl_moe"], adapter=tmp_path / "run", device="cpu")
    base, _ = load_model(models["qwen3_vl_moe"], device="cpu")
    with torch.no_grad():
        assert (reloaded(**batch).logits - logits).abs().max() < 1e-5  # merged at load: float rounding only
        assert not torch.allclose(base(**batch).logits, logits, atol=1e-4)


def test_expert_lora_on_a_dense_model_is_a_clear_error(models):
    model, _ = load_model(models["qwen3_vl"], device="cpu")
    with pytest.raises(RadscribeError, match="no MoE expert weights"):
        lora.build_lora_config(model, experts=True)


def test_qlora_4bit_dense_loads_and_lora_learns_on_cpu(models):
    torch.manual_seed(0)
    model, processor = load_model(models["qwen3_vl"], quantization="4bit", device="cpu", trainable=True)
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert kinds[f"{LM}layers.0.self_attn.q_proj"] == "Linear4bit"
    assert kinds[f"{LM}layers.1.mlp.down_proj"] == "Linear4bit"
    assert kinds["model.visual.blocks.0.attn.qkv"] == "Linear" and kinds["lm_head"] == "Linear"
    peft_model = get_peft_model(model, lora.build_lora_config(model, rank=8, alpha=16))
    assert lora.describe(peft_model)["lora_module_count"] == 14
    batch = _batch(processor)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=5e-3)
    losses = []
    for _ in range(8):
        loss = peft_model(**batch).loss
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in trainable if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_qlora_4bit_moe_keeps_experts_bf16_never_fp32_and_trains_expert_lora(real_model_dir, capsys):
    # the downloaded MoE is bf16; bitsandbytes quantises nn.Linear only, so the fused experts stay unquantised --
    # and must stay bf16 (PEFT's prepare_model_for_kbit_training would double them to fp32)
    import json

    folder = real_model_dir("qwen3_vl_moe")
    text = json.loads((folder / "config.json").read_text())["text_config"]
    layers, experts_n, hidden, width = (text["num_hidden_layers"], text["num_experts"], text["hidden_size"],
                                        text["moe_intermediate_size"])
    model, processor = load_model(folder, dtype="bf16", quantization="4bit", device="cpu", trainable=True)
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert kinds[f"{LM}layers.0.self_attn.q_proj"] == "Linear4bit"
    experts = model.model.language_model.layers[0].mlp.experts
    assert experts.gate_up_proj.dtype == torch.bfloat16 and experts.gate_up_proj.shape == (experts_n, 2 * width,
                                                                                          hidden)
    expert_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    assert expert_bytes == layers * experts_n * 3 * hidden * width * 2  # bf16, counted from config.json
    unquantised = [p for p in model.parameters() if type(p).__name__ != "Params4bit"]
    assert {p.dtype for p in unquantised} == {torch.bfloat16} and not any(p.requires_grad for p in model.parameters())
    assert "fused MoE experts" in capsys.readouterr().err  # said once, in one line
    peft_model = get_peft_model(model, lora.build_lora_config(model, experts=True))
    assert experts.gate_up_proj.dtype == torch.bfloat16  # wrapping keeps the base as it is; LoRA itself is fp32
    assert {p.dtype for p in peft_model.parameters() if p.requires_grad} == {torch.float32}
    loss = peft_model(**_batch(processor)).loss
    loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad and ".experts." in n}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def test_gpu_bench_smoke_path_runs_and_expert_lora_adds_parameters(tmp_path, monkeypatch):
    # bench/gpu/train_real_dims.py is meant for a lent GPU; its --smoke path keeps it from rotting in between
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "bench" / "gpu" / "train_real_dims.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--smoke", "--out", str(tmp_path)])
    runpy.run_path(str(script), run_name="__main__")
    import json

    results = json.loads((tmp_path / "train_real_dims_smoke.json").read_text())["results"]
    plain, experts = results
    assert (plain["expert_lora"], experts["expert_lora"]) == (False, True)
    assert experts["trainable_parameters"] > plain["trainable_parameters"]
    assert all(r["tokens_per_s"] > 0 and r["losses"][-1] < r["losses"][0] for r in results)
    assert "| yes |" in (tmp_path / "train_real_dims_smoke.md").read_text()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_4bit_and_bf16_lora_on_gpu(models):
    for quantization in (None, "4bit"):
        model, processor = load_model(models["qwen3_vl_moe"], dtype="bf16", quantization=quantization,
                                      device="cuda", trainable=True)
        peft_model = get_peft_model(model, lora.build_lora_config(model, experts=True))
        batch = {k: v.to("cuda") for k, v in _batch(processor).items()}
        loss = peft_model(**batch).loss
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad and "lora_B" in n)
