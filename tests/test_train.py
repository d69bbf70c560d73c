"""radscribe train: labels, image-safe cutoff, collation, and real runs on tiny Qwen3-VL models (dense, MoE, 4-bit).

Multi-process (torchrun + DeepSpeed) runs are in test_train_multiproc.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from radscribe.data.dataset import Sample, read_split
from radscribe.errors import RadscribeError
from radscribe.config import config_from_args
from radscribe.encode import Encoder, Rejected, pad_batch
from radscribe.interop.llamafactory import emit_llamafactory
from radscribe.runlog import read_log
from radscribe.train import TrainConfig, train

REPORT = "这是一张肺部CT图像。左上区域可见一小的高密度影,考虑结节。周围结构未见明显异常。"


def _sample(tmp_path: Path, report: str = REPORT, size: int = 64, text_only: bool = False) -> Sample:
    image = tmp_path / f"img-{size}.png"
    Image.new("RGB", (size, size), (120, 40, 200)).save(image)
    prompt = "描述这段文字。" if text_only else "<image>图片中的诊断结果是怎样?"
    return Sample(id="s", messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": report}],
                  images=[] if text_only else [image])


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from radscribe.model.load import load_processor

    return load_processor(tiny_model_dir("qwen3_vl"))


def _labelled_text(processor, encoded) -> str:
    return processor.tokenizer.decode(encoded["input_ids"][encoded["labels"] != -100])


def _image_run(processor, ids: torch.Tensor) -> tuple[int, int, int]:
    """(image pad count, position of <|vision_start|>, position of <|vision_end|>)."""
    tok = processor.tokenizer
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    start = (ids == tok.convert_tokens_to_ids("<|vision_start|>")).nonzero().flatten().tolist()
    end = (ids == tok.convert_tokens_to_ids("<|vision_end|>")).nonzero().flatten().tolist()
    assert len(start) == len(end) == 1
    return int((ids == pad).sum()), start[0], end[0]


# --- labels and cutoff -------------------------------------------------------------------------------------
def test_labels_are_exactly_the_report_and_end_of_turn(processor, tmp_path):
    encoded = Encoder(processor, 2048, 768 * 768, 32 * 32)(_sample(tmp_path))
    assert _labelled_text(processor, encoded) == REPORT + "<|im_end|>"
    # the labelled positions are one contiguous run at the end; everything before (image, prompt) is masked
    labelled = (encoded["labels"] != -100).nonzero().flatten()
    assert labelled.tolist() == list(range(int(labelled[0]), len(encoded["labels"])))
    n_pad, start, end = _image_run(processor, encoded["input_ids"])
    assert n_pad == 4 and end == start + 5  # 64x64 -> (64/16/2)^2 = 4 merged patches


def test_labels_with_a_default_system_turn_qwen2_5_vl(tiny_model_dir, tmp_path):
    from radscribe.model.load import load_processor

    processor = load_processor(tiny_model_dir("qwen2_5_vl"))  # its template adds "You are a helpful assistant."
    encoded = Encoder(processor, 2048, 768 * 768, 32 * 32)(_sample(tmp_path))
    assert _labelled_text(processor, encoded) == REPORT + "<|im_end|>"
    assert "You are a helpful assistant." in processor.tokenizer.decode(encoded["input_ids"])


def test_multi_turn_labels_every_assistant_turn(processor, tmp_path):
    sample = _sample(tmp_path)
    sample.messages += [{"role": "user", "content": "大小?"}, {"role": "assistant", "content": "小"}]
    encoded = Encoder(processor, 2048, 768 * 768, 32 * 32)(sample)
    assert _labelled_text(processor, encoded) == REPORT + "<|im_end|>" + "小<|im_end|>"


def test_cutoff_truncates_the_report_never_the_image_run_and_the_batch_trains(processor, tmp_path, tiny_model_dir):
    from radscribe.model.load import load_model

    long_report = REPORT * 20
    full = Encoder(processor, 100_000, 768 * 768, 32 * 32)(_sample(tmp_path, long_report, size=128))
    n_pad_full, _, _ = _image_run(processor, full["input_ids"])
    cutoff = 40
    cut = Encoder(processor, cutoff, 768 * 768, 32 * 32)(_sample(tmp_path, long_report, size=128))
    assert len(cut["input_ids"]) == cutoff < len(full["input_ids"])
    n_pad, start, end = _image_run(processor, cut["input_ids"])
    assert n_pad == n_pad_full == 16 and end == start + n_pad + 1  # image run intact, not downscaled
    assert torch.equal(cut["input_ids"], full["input_ids"][:cutoff])
    labelled = _labelled_text(processor, cut)
    assert labelled and long_report.startswith(labelled)
    assert cut["pixel_values"].shape == full["pixel_values"].shape
    assert len(cut["mm_token_type_ids"]) == cutoff

    model, _ = load_model(tiny_model_dir("qwen3_vl"), dtype="fp32", trainable=True)
    batch = pad_batch([cut, full], processor.tokenizer.pad_token_id)
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and model.lm_head.weight.grad.abs().sum() > 0


def test_image_tokens_over_budget_downscale_the_image_or_reject(processor, tmp_path):
    sample = _sample(tmp_path, size=256)  # 64 image tokens
    big = Encoder(processor, 2048, 768 * 768, 32 * 32)(sample)
    assert _image_run(processor, big["input_ids"])[0] == 64
    small = Encoder(processor, 40, 768 * 768, 32 * 32)(sample)
    n_pad, start, end = _image_run(processor, small["input_ids"])
    assert n_pad < 64 and end == start + n_pad + 1 and len(small["input_ids"]) <= 40
    assert (small["labels"] != -100).sum() >= 1
    with pytest.raises(Rejected, match="image tokens exceed cutoff_len even at image_min_pixels"):
        Encoder(processor, 40, 768 * 768, 200 * 200)(sample)
    with pytest.raises(Rejected, match="prompt text longer than cutoff_len"):
        Encoder(processor, 8, 768 * 768, 32 * 32)(_sample(tmp_path, text_only=True))


def test_image_max_pixels_caps_image_size(processor, tmp_path):
    encoded = Encoder(processor, 4096, 128 * 128, 32 * 32)(_sample(tmp_path, size=512))
    assert _image_run(processor, encoded["input_ids"])[0] == 16  # 512^2 capped to 128^2 -> 16 tokens


def test_collator_keeps_every_processor_key_and_mixes_text_only_rows(processor, tmp_path, tiny_model_dir):
    from radscribe.model.load import load_model

    enc = Encoder(processor, 2048, 768 * 768, 32 * 32)
    with_image, text_only = enc(_sample(tmp_path)), enc(_sample(tmp_path, report="肺", text_only=True))
    assert "pixel_values" not in text_only and "mm_token_type_ids" in text_only
    batch = pad_batch([text_only, with_image], processor.tokenizer.pad_token_id)
    assert set(batch) == set(with_image)
    assert batch["input_ids"].shape == batch["mm_token_type_ids"].shape == batch["labels"].shape
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]]
    short = len(text_only["input_ids"])
    assert (batch["labels"][0, short:] == -100).all() and (batch["attention_mask"][0, short:] == 0).all()
    assert (batch["input_ids"][0, short:] == processor.tokenizer.pad_token_id).all()
    model, _ = load_model(tiny_model_dir("qwen3_vl"), dtype="fp32")
    assert torch.isfinite(model(**batch).loss)


# --- config, presets, interop ------------------------------------------------------------------------------
# The article's recipe (docs: the brief): LoRA r8/a16 on every language-model Linear; lr 5e-5 cosine, 2 epochs,
# bf16, cutoff 2048; per-device batch 4 x accumulation 8 under ZeRO-2 (ZeRO-3 as the contrast run).
@pytest.mark.parametrize("preset, batch, stage", [("reference-z2", 4, 2), ("reference-z3", 32, 3)])
def test_reference_presets_give_the_trainer_the_article_recipe(preset, batch, stage, tiny_model_dir, tmp_path):
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from radscribe.model.load import load_model
    from radscribe.model.lora import apply_lora, lora_targets
    from radscribe.train import _training_arguments, resolve_config

    cfg = resolve_config(config_from_args(TrainConfig, preset, ["model.path=."]), 16_000)
    model, _ = load_model(tiny_model_dir("qwen3_vl"), device="cpu", trainable=True)
    every_linear = lora_targets(model, "all")
    lora = apply_lora(model, cfg.lora).peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (8, 16, 0.0)
    assert sorted(lora.target_modules) == every_linear
    assert cfg.data.cutoff_len == 2048
    args = _training_arguments(cfg, tmp_path / "checkpoints", has_val=True)
    unset_hf_deepspeed_config()  # the DeepSpeed config would otherwise apply to later model loads in this process
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (batch, 8)
    assert (args.learning_rate, args.lr_scheduler_type.value, args.num_train_epochs) == (5e-5, "cosine", 2)
    assert args.bf16 and args.max_grad_norm == 1.0 and args.get_warmup_steps(1000) == 0
    assert args.hf_deepspeed_config.config["zero_optimization"]["stage"] == stage  # the JSON DeepSpeed gets


def test_recommended_preset_warms_up_and_drops_out_on_small_data(tiny_model_dir, tmp_path):
    from radscribe.model.load import load_model
    from radscribe.model.lora import apply_lora
    from radscribe.train import _training_arguments, resolve_config

    small = resolve_config(config_from_args(TrainConfig, "recommended", ["model.path=."]), 10_000)
    model, _ = load_model(tiny_model_dir("qwen3_vl"), device="cpu", trainable=True)
    lora = apply_lora(model, small.lora).peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (32, 64, 0.05)
    args = _training_arguments(small, tmp_path / "checkpoints", has_val=True)
    assert args.get_warmup_steps(1000) == 100 and args.num_train_epochs == 3 and args.deepspeed is None
    assert resolve_config(config_from_args(TrainConfig, "recommended", ["model.path=."]), 10_001).lora.dropout == 0.0


def test_cli_flags_stay_strings_and_overrides_apply():
    cfg = config_from_args(TrainConfig, "recommended", ["lora.rank=4", "train.lr=1e-3"],
                           **{"model.path": "true", "output.dir": Path("runs/a: b #1"), "train.nproc": 2,
                              "output.resume": True})
    assert (cfg.model.path, cfg.output.dir, cfg.train.nproc, cfg.output.resume) == ("true", "runs/a: b #1", 2, True)
    assert (cfg.lora.rank, cfg.train.lr, cfg.lora.alpha) == (4, 1e-3, 64)
    with pytest.raises(RadscribeError, match="lora: unknown field"):
        config_from_args(TrainConfig, None, ["lora.rnak=4"])


def test_emit_llamafactory_writes_the_equivalent_recipe(tiny_model_dir, tiny_dataset, tmp_path):
    cfg = config_from_args(TrainConfig, "reference-z2", [], **{"model.path": tiny_model_dir("qwen3_vl"),
                                                               "data.dataset": tiny_dataset,
                                                               "output.dir": tmp_path / "run"})
    recipe = yaml.safe_load(emit_llamafactory(cfg).read_text())
    assert recipe["template"] == "qwen3_vl_nothink" and recipe["lora_target"] == "all"
    assert (recipe["lora_rank"], recipe["lora_alpha"], recipe["learning_rate"]) == (8, 16, 5e-5)
    assert (recipe["per_device_train_batch_size"], recipe["gradient_accumulation_steps"]) == (4, 8)
    assert recipe["cutoff_len"] == 2048 and recipe["image_max_pixels"] == 589824
    assert recipe["dataset"] == "radscribe_train" and recipe["eval_dataset"] == "radscribe_val"
    assert recipe["deepspeed"].endswith("presets/deepspeed/z2.json") and recipe["freeze_vision_tower"] is True
    info = json.loads((tmp_path / "run" / "dataset_info.json").read_text())
    assert recipe["dataset_dir"] == str((tmp_path / "run").resolve()) and recipe["media_dir"] == str(tiny_dataset)
    assert info["radscribe_train"]["file_name"] == str(tiny_dataset / "train.json")
    assert info["radscribe_train"]["formatting"] == "sharegpt"
    assert info["radscribe_train"]["columns"] == {"messages": "messages", "images": "images"}
    assert not (tmp_path / "run" / "adapter").exists()


def test_cli_user_mistakes_are_one_line(tmp_path, capsys):
    from radscribe.cli import main

    assert main(["train", "--model", str(tmp_path / "nope"), "--data", str(tmp_path), "--out",
                 str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.path" in err and "nope" in err
    assert main(["train", "--config", "no-such-preset"]) == 2
    assert "unknown preset" in capsys.readouterr().err


# --- real runs on tiny models ------------------------------------------------------------------------------
def _cfg(model_dir, dataset, out, *overrides) -> TrainConfig:
    base = ["train.precision=fp32", "train.epochs=1", "train.per_device_batch=8", "train.grad_accum=1",
            "train.lr=2e-3", "train.logging_steps=5", "train.save_steps=1000", "lora.rank=16", "lora.alpha=32"]
    return config_from_args(TrainConfig, None, base + list(overrides),
                            **{"model.path": str(model_dir), "data.dataset": str(dataset), "output.dir": str(out)})


def _greedy(model, processor, sample: Sample) -> list[int]:
    from radscribe.data.dataset import to_chat
    from radscribe.data.imaging import load_image

    chat = to_chat(sample.messages[:1], [load_image(p) for p in sample.images])
    inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("arch,extra", [("qwen3_vl", []), ("qwen3_vl_moe", ["lora.experts=true"])])
def test_one_epoch_of_lora_lowers_losses_and_the_adapter_changes_generations(arch, extra, tiny_model_dir,
                                                                             tiny_dataset, tmp_path):
    from peft import PeftModel

    from radscribe.model.load import load_model

    run = train(_cfg(tiny_model_dir(arch), tiny_dataset, tmp_path / "run", *extra))
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["train_samples"] == 200 and summary["val_samples"] == 46 and summary["rejected"] == 0
    assert summary["steps"] == 25 and summary["epochs"] == pytest.approx(1.0)
    assert summary["last_logged_loss"] < summary["first_logged_loss"] - 0.3
    assert summary["eval_loss"] < summary["eval_loss_start"] - 0.3
    attention = ["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
    dense_mlp = ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]  # MoE layers have fused experts instead
    assert summary["lora_targets"]["language_model"] == (dense_mlp if arch == "qwen3_vl" else []) + attention
    assert summary["lora_expert_parameters"] == (["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
                                                 if arch == "qwen3_vl_moe" else [])
    records = read_log(run)
    steps = [r for r in records if "loss" in r]
    assert {"step", "epoch", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s"} <= set(steps[-1])
    assert steps[-1]["tokens_per_s"] > 0 and (run / "loss.png").stat().st_size > 1000
    assert list((run / "tb").glob("events.out.tfevents.*"))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["path"] == str(tiny_model_dir(arch)) and saved["lora"]["rank"] == 16

    base, processor = load_model(tiny_model_dir(arch), dtype="fp32")
    sample = next(read_split(tiny_dataset, "val"))
    before = _greedy(base, processor, sample)
    tuned = PeftModel.from_pretrained(base, run / "adapter")
    assert any("lora_A" in n for n, _ in tuned.named_parameters())
    assert _greedy(tuned, processor, sample) != before
    assert (run / "adapter" / "tokenizer.json").is_file()  # the processor travels with the adapter


def test_vision_tower_lora_and_full_finetuning_with_text_only_rows(tiny_model_dir, tiny_dataset, tmp_path):
    from safetensors.torch import load_file

    from radscribe.model.load import load_model

    model_dir = tiny_model_dir("qwen3_vl")
    run = train(_cfg(model_dir, tiny_dataset, tmp_path / "vis", "lora.vision_tower=true", "lora.merger=true",
                     "train.max_steps=2", "data.val_split=null"))
    keys = load_file(run / "adapter" / "adapter_model.safetensors")
    assert any(".visual.blocks." in k for k in keys) and any(".visual.merger." in k for k in keys)

    # a dataset mixing text-only rows (no image) into image rows, as the demo's stage 1 does
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    rows = json.loads((tiny_dataset / "train.json").read_text())[:24]
    for row in rows[::2]:
        row["messages"][0]["content"] = "复述报告。"
        row["images"] = []
    for row in rows[1::2]:
        row["images"] = [str(tiny_dataset / p) for p in row["images"]]
    (mixed / "train.json").write_text(json.dumps(rows, ensure_ascii=False))
    run = train(_cfg(model_dir, mixed, tmp_path / "full", "lora.enabled=false", "train.lr=1e-3",
                     "train.logging_steps=1"))
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["trainable_parameters"] == summary["total_parameters"] and summary["output"] == "model"
    base, _ = load_model(model_dir, dtype="fp32")
    tuned, _ = load_model(run / "model", dtype="fp32")
    changed = {n for (n, a), (_, b) in zip(base.named_parameters(), tuned.named_parameters()) if not torch.equal(a, b)}
    assert any("visual" in n for n in changed) and any("language_model" in n for n in changed)
    assert "lm_head.weight" in changed and summary["last_logged_loss"] < summary["first_logged_loss"]


def test_qlora_4bit_trains_on_cpu(tiny_model_dir, tiny_dataset, tmp_path):
    from peft import PeftModel

    from radscribe.model.load import load_model

    run = train(_cfg(tiny_model_dir("qwen3_vl"), tiny_dataset, tmp_path / "q", "model.quantization=4bit",
                     "train.max_steps=8", "train.logging_steps=1"))
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 8 and summary["last_logged_loss"] < summary["first_logged_loss"]
    base, _ = load_model(tiny_model_dir("qwen3_vl"), quantization="4bit")
    assert type(base.model.language_model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    tuned = PeftModel.from_pretrained(base, run / "adapter")
    lora_b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: nonzero means it trained


def test_existing_checkpoints_need_resume(tiny_model_dir, tiny_dataset, tmp_path):
    (tmp_path / "run" / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "checkpoint-4" / "trainer_state.json").write_text("{}")
    with pytest.raises(RadscribeError, match="pass --resume"):
        train(_cfg(tiny_model_dir("qwen3_vl"), tiny_dataset, tmp_path / "run"))


def _train_command(model_dir, dataset, out, *extra) -> list[str]:
    return [sys.executable, "-m", "radscribe.cli", "train", "--model", str(model_dir), "--data", str(dataset),
            "--out", str(out), "train.precision=fp32", "train.epochs=2", "train.per_device_batch=4",
            "train.grad_accum=1", "train.lr=1e-3", "train.save_steps=10", "train.logging_steps=10",
            "data.val_split=null", *extra]


def test_resume_after_sigkill_gives_the_same_adapter(tiny_model_dir, tiny_dataset, tmp_path):
    from safetensors.torch import load_file

    model_dir = tiny_model_dir("qwen3_vl")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.Popen(_train_command(model_dir, tiny_dataset, tmp_path / "killed"), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / "checkpoints" / "checkpoint-20"
    deadline = time.time() + 300
    while not (checkpoint / "trainer_state.json").is_file() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "adapter").exists()
    done = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "killed" / "checkpoints").glob("checkpoint-*"))
    assert done and max(done) < 100  # killed mid-run: 2 epochs of 50 steps

    subprocess.run(_train_command(model_dir, tiny_dataset, tmp_path / "killed", "--resume"), env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(_train_command(model_dir, tiny_dataset, tmp_path / "straight"), env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resumed = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    straight = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == straight.keys() and resumed
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-4, atol=1e-6)
    assert json.loads((tmp_path / "killed" / "train_summary.json").read_text())["steps"] == 100
    logged = [r["step"] for r in read_log(tmp_path / "killed") if "loss" in r]
    assert logged == [r["step"] for r in read_log(tmp_path / "straight") if "loss" in r]  # no step twice


# --- what used to be silent or misleading ------------------------------------------------------------------
def _copy_dataset(src: Path, dst: Path, val: str | None) -> Path:
    dst.mkdir()
    (dst / "images").symlink_to(src / "images")
    (dst / "train.json").write_text((src / "train.json").read_text())
    if val is not None:
        (dst / "val.json").write_text(val)
    return dst


def test_a_broken_val_split_fails_in_one_line_and_only_a_missing_one_is_skipped(tiny_model_dir, tiny_dataset,
                                                                                tmp_path, capsys):
    from radscribe.cli import main
    from radscribe.train import read_rows

    tiny_model_dir("qwen3_vl")
    capsys.readouterr()  # the fixtures' own progress output
    rows = json.loads((tiny_dataset / "val.json").read_text())
    rows[3]["images"] = []  # its <image> placeholder now has no image
    broken = _copy_dataset(tiny_dataset, tmp_path / "broken", json.dumps(rows, ensure_ascii=False))
    assert main(["train", "--model", str(tiny_model_dir("qwen3_vl")), "--data", str(broken), "--out",
                 str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "val.json: row 3 has 1 <image> placeholders but 0 images" in err
    assert not (tmp_path / "run").exists()

    no_val = _copy_dataset(tiny_dataset, tmp_path / "no-val", None)
    train_rows, val_rows = read_rows(_cfg(tiny_model_dir("qwen3_vl"), no_val, tmp_path / "r"))
    assert (len(train_rows), val_rows) == (200, [])
    assert f"{no_val} has no 'val' split: training without evaluation" in capsys.readouterr().err


def test_data_that_is_not_a_prepared_dataset_folder_says_run_prepare(tiny_model_dir, tmp_path, capsys):
    from radscribe.cli import main

    tiny_model_dir("qwen3_vl")
    capsys.readouterr()
    parquet = tmp_path / "x.parquet"
    parquet.write_bytes(b"PAR1")
    for data in (parquet, tmp_path):  # a parquet file, and a folder of parquet files
        assert main(["train", "--model", str(tiny_model_dir("qwen3_vl")), "--data", str(data), "--out",
                     str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0
        assert f"{data} is not a prepared dataset folder; run `radscribe prepare {data} --out DATASET`" in err


def test_resume_on_a_finished_run_is_a_no_op_that_says_so(tiny_model_dir, tiny_dataset, tmp_path, capsys):
    run = train(_cfg(tiny_model_dir("qwen3_vl"), tiny_dataset, tmp_path / "run", "train.max_steps=2",
                     "train.save_steps=1", "data.val_split=null"))
    adapter = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    capsys.readouterr()
    again = _cfg(tiny_model_dir("qwen3_vl"), tiny_dataset, tmp_path / "run", "train.max_steps=2",
                 "train.save_steps=1", "data.val_split=null", "output.resume=true")
    assert train(again) == run
    assert f"{run} already finished (2 steps, train_summary.json): nothing to resume" in capsys.readouterr().err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints == ["checkpoint-1", "checkpoint-2"]
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    with pytest.raises(RadscribeError, match=r"finished run with other settings \(train.max_steps: 2 -> 4\)"):
        train(_cfg(tiny_model_dir("qwen3_vl"), tiny_dataset, tmp_path / "run", "train.max_steps=4",
                   "train.save_steps=1", "data.val_split=null", "output.resume=true"))


def test_ctrl_c_says_how_to_resume_and_that_command_finishes_the_run(tiny_model_dir, tiny_dataset, tmp_path,
                                                                     capsys, monkeypatch):
    from radscribe import runlog
    from radscribe.cli import main

    real_on_log = runlog.RunLog.on_log

    def interrupt_at_step_3(self, args, state, control, logs=None, **kwargs):
        real_on_log(self, args, state, control, logs=logs, **kwargs)
        if state.global_step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(runlog.RunLog, "on_log", interrupt_at_step_3)
    run = tmp_path / "run"
    command = ["train", "--model", str(tiny_model_dir("qwen3_vl")), "--data", str(tiny_dataset), "--out", str(run),
               "train.precision=fp32", "train.max_steps=5", "train.per_device_batch=4", "train.grad_accum=1",
               "train.save_steps=1", "train.logging_steps=1", "data.val_split=null"]
    assert main(command) == 130
    err = capsys.readouterr().err
    hint = f"continue with `radscribe train --config {run / 'config.yaml'} --resume`"
    assert "interrupted at step 3; checkpoint-2 is saved: " + hint in err  # step 3 logs before it saves
    monkeypatch.setattr(runlog.RunLog, "on_log", real_on_log)
    assert main(["train", "--config", str(run / "config.yaml"), "--resume"]) == 0
    assert json.loads((run / "train_summary.json").read_text())["steps"] == 5
    assert [r["step"] for r in read_log(run) if "loss" in r] == [1, 2, 3, 4, 5]
