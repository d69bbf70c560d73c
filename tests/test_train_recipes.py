"""The presets at scale: gradient checkpointing as set up and as emitted for LLaMA-Factory, where each rank's
weights are placed, and the recommended recipe with expert LoRA on a real-layout MoE folder (dropout on the Linear
LoRA modules, 0 on the fused experts, an adapter PEFT reloads)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from radscribe.cli import stage_config
from radscribe.config import config_from_args
from radscribe.interop.llamafactory import emit_llamafactory
from radscribe.train import TrainConfig

PRESETS = ("reference-z2", "reference-z3", "recommended")


def test_presets_checkpoint_non_reentrant_and_the_emitted_recipe_says_the_same(tiny_model_dir, tiny_dataset,
                                                                              tmp_path):
    from radscribe.train import _training_arguments

    for preset in PRESETS:
        cfg = config_from_args(TrainConfig, preset, [], **{"model.path": tiny_model_dir("qwen3_vl"),
                                                           "data.dataset": tiny_dataset,
                                                           "output.dir": tmp_path / preset})
        assert cfg.train.gradient_checkpointing is True
        recipe = yaml.safe_load(emit_llamafactory(cfg).read_text())
        # LLaMA-Factory checkpoints unless told not to, reentrant by default: ours is on and non-reentrant
        assert "disable_gradient_checkpointing" not in recipe and recipe["use_reentrant_gc"] is False
    off = config_from_args(TrainConfig, "reference-z2", ["train.gradient_checkpointing=false"],
                           **{"model.path": tiny_model_dir("qwen3_vl"), "data.dataset": tiny_dataset,
                              "output.dir": tmp_path / "off"})
    recipe = yaml.safe_load(emit_llamafactory(off).read_text())
    assert recipe["disable_gradient_checkpointing"] is True and "use_reentrant_gc" not in recipe
    # the TrainingArguments the recommended preset resolves to (the reference presets add DeepSpeed, which the
    # multi-process tests run)
    cfg = config_from_args(TrainConfig, "recommended", [], **{"output.dir": tmp_path / "args"})
    args = _training_arguments(cfg, tmp_path / "args" / "checkpoints", has_val=False)
    assert args.activation_checkpointing is True and args.activation_checkpointing_kwargs == {"use_reentrant": False}


def test_each_rank_asks_for_its_own_gpu_and_zero3_loads_without_a_device_map(tiny_model_dir, monkeypatch):
    # What from_pretrained is asked for on a 2-GPU node, rank 1, for plain LoRA (ZeRO-2/DDP) and QLoRA;
    # CUDA is simulated, from_pretrained is stopped after it has been called.
    import transformers
    import transformers.integrations.deepspeed as hf_deepspeed

    from radscribe.model import load
    from radscribe.train import _build_model

    asked = []

    class Stop(Exception):
        pass

    def from_pretrained(path, **kwargs):
        asked.append(kwargs)
        raise Stop

    # import what the build needs now: transformers' lazy imports probe CUDA, which is about to be faked
    from transformers import BitsAndBytesConfig, set_seed  # noqa: F401

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", from_pretrained)
    assert load.placement() == load.Placement("device-map", "cuda:1", {"": "cuda:1"})
    for quantization in (None, "4bit"):  # the training path: radscribe.train's model build
        cfg = config_from_args(TrainConfig, "recommended", [f"model.quantization={quantization or 'null'}"],
                               **{"model.path": tiny_model_dir("qwen3_vl")})
        with pytest.raises(Stop):
            _build_model(cfg)
    assert [a["device_map"] for a in asked] == [{"": "cuda:1"}, {"": "cuda:1"}]
    assert "quantization_config" not in asked[0] and asked[1]["quantization_config"].load_in_4bit

    monkeypatch.setattr(hf_deepspeed, "is_deepspeed_zero3_enabled", lambda: True)
    assert load.placement().path == "zero3-partitioned"
    with pytest.raises(Stop):
        _build_model(config_from_args(TrainConfig, "reference-z3", [], **{"model.path": tiny_model_dir("qwen3_vl")}))
    assert "device_map" not in asked[2]  # transformers partitions inside zero.Init and refuses a device_map


def test_recommended_with_expert_lora_trains_a_real_layout_moe_with_checkpointing(real_model_dir, tiny_dataset,
                                                                                 tmp_path, capsys):
    from peft import PeftModel
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import ParamWrapper

    from radscribe.data.dataset import read_split
    from radscribe.model.load import load_model
    from radscribe.train import fit, save, set_up

    folder = real_model_dir("qwen3_vl_moe")
    cfg = stage_config(["train", "--config", "recommended", "--model", str(folder), "--data", str(tiny_dataset),
                        "--out", str(tmp_path / "run"), "lora.experts=true", "train.max_steps=3",
                        "train.per_device_batch=2", "train.grad_accum=1", "train.logging_steps=1",
                        "data.max_samples=16", "data.val_split=null", "train.lr=1e-3"])
    run = set_up(cfg)
    # the preset's dropout reaches every Linear LoRA module and none of the expert parameters
    assert cfg.lora.dropout == 0.05
    linear = [m for m in run.model.modules() if isinstance(m, LoraLinear)]
    experts = [m for m in run.model.modules() if isinstance(m, ParamWrapper)]
    assert linear and all(m.lora_dropout["default"].p == 0.05 for m in linear)
    assert len(experts) == 2 * 4 and all(isinstance(m.lora_dropout["default"], torch.nn.Identity) for m in experts)
    assert capsys.readouterr().err.count("0 on the MoE expert parameters") == 1  # said once
    # checkpointing is on after set-up, with the input hook that carries gradients past the frozen base
    base = run.model.get_base_model()
    assert base.is_activation_checkpointing and base._require_grads_hooks
    assert run.args.activation_checkpointing and run.args.activation_checkpointing_kwargs == {"use_reentrant": False}

    trainer, result, runtime = fit(cfg, run)
    save(cfg, run, trainer, result, runtime)
    summary = json.loads((run.dir / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["lora_dropout"] == 0.05
    assert summary["lora_expert_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    saved = json.loads((run.dir / "adapter" / "adapter_config.json").read_text())
    assert saved["lora_dropout"] == 0.0 and saved["target_parameters"]  # what reloading a ParamWrapper needs

    from radscribe.data.dataset import to_chat
    from radscribe.data.imaging import load_image

    model, processor = load_model(folder, dtype="fp32", device="cpu")
    sample = next(read_split(tiny_dataset, "train"))
    inputs = processor.apply_chat_template(to_chat(sample.messages, [load_image(p) for p in sample.images]),
                                           tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        before = model(**inputs).logits
        tuned = PeftModel.from_pretrained(model, run.dir / "adapter")
        assert sum(p.abs().sum() for n, p in tuned.named_parameters() if "lora_B" in n and "experts" in n) > 0
        assert not torch.allclose(tuned(**inputs).logits, before, atol=1e-4)


@pytest.mark.slow
def test_gpu_cli_check_smoke_runs_dry_run_train_and_eval(tmp_path):
    # bench/gpu/train_cli.py is prepared for a lent GPU; its --smoke form (tiny widths, CPU) keeps it from rotting
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu" / "train_cli.py"
    done = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "train_cli_smoke.json").read_text())
    assert list(result["stages"]) == ["build model", "synth", "prepare", "train --dry-run", "train", "eval"]
    assert result["steps"] == 3 and result["tokens_per_s"] > 0 and result["plan_total_gb"] > 0
    assert result["train_peak_host_rss_mib"] > 0 and result["predict_samples_per_second"] > 0
    assert "| tokens/s | MFU % |" in (tmp_path / "train_cli_smoke.md").read_text()
