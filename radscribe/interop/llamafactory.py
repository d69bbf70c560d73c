"""The same recipe for LLaMA-Factory (0.9.x): RUN/llamafactory.yaml and RUN/dataset_info.json.

Run as: radscribe train --config PRESET --model MODEL_DIR --data DATASET --out RUN --emit-llamafactory
        (then: llamafactory-cli train RUN/llamafactory.yaml)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from radscribe.config import deepspeed_config
from radscribe.errors import RadscribeError

if TYPE_CHECKING:
    from radscribe.train_config import TrainConfig

# Template per base-model family: Qwen3-VL Instruct must use the no-think template, else an empty think block
# lands in the labels. The only per-architecture table of the training path.
LLAMAFACTORY_TEMPLATES = {"qwen3_vl": "qwen3_vl_nothink", "qwen3_vl_moe": "qwen3_vl_nothink",
                          "qwen2_5_vl": "qwen2_vl"}


def emit_llamafactory(cfg: TrainConfig) -> Path:
    """Write RUN/llamafactory.yaml and RUN/dataset_info.json: the same recipe for LLaMA-Factory (0.9.x)."""
    import yaml

    run = Path(cfg.output.dir)
    if not (Path(cfg.model.path) / "config.json").is_file():
        raise RadscribeError(f"model.path: {cfg.model.path!r} is not a model folder (no config.json); pass --model DIR")
    model_type = json.loads((Path(cfg.model.path) / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type not in LLAMAFACTORY_TEMPLATES:
        raise RadscribeError(f"{cfg.model.path}/config.json: model_type {model_type!r} has no LLaMA-Factory "
                             f"template here; known: {', '.join(LLAMAFACTORY_TEMPLATES)}")
    from radscribe.data.dataset import split_file

    dataset = Path(cfg.data.dataset).resolve()
    info = {}
    for key, split in (("radscribe_train", cfg.data.train_split), ("radscribe_val", cfg.data.val_split)):
        path = split_file(dataset, split, missing_ok=key == "radscribe_val") if split else None
        if path:
            info[key] = {"file_name": str(path), "formatting": "sharegpt",
                         "columns": {"messages": "messages", "images": "images"},
                         "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                  "assistant_tag": "assistant", "system_tag": "system"}}
    t, lora = cfg.train, cfg.lora
    recipe = {
        "model_name_or_path": str(Path(cfg.model.path).resolve()),
        "image_max_pixels": cfg.data.image_max_pixels, "image_min_pixels": cfg.data.image_min_pixels,
        "trust_remote_code": True,
        "stage": "sft", "do_train": True,
        "finetuning_type": "lora" if lora.enabled else "full",
        # LLaMA-Factory's `lora_target: all` reaches the tower/merger only when they are not frozen
        "freeze_vision_tower": lora.enabled and not lora.vision_tower,
        "freeze_multi_modal_projector": lora.enabled and not lora.merger,
        # dataset_info.json sits in the run folder and names the split files by absolute path; image paths in
        # the rows are relative to the dataset folder, which LLaMA-Factory calls media_dir
        "dataset_dir": str(run.resolve()), "media_dir": str(dataset), "dataset": "radscribe_train",
        "template": LLAMAFACTORY_TEMPLATES[model_type], "cutoff_len": cfg.data.cutoff_len,
        "overwrite_cache": True, "preprocessing_num_workers": 16,
        "output_dir": str((run / "llamafactory").resolve()), "logging_steps": t.logging_steps,
        "save_steps": t.save_steps, "plot_loss": True, "overwrite_output_dir": True,
        "per_device_train_batch_size": t.per_device_batch, "gradient_accumulation_steps": t.grad_accum,
        "learning_rate": t.lr, "num_train_epochs": t.epochs, "lr_scheduler_type": t.scheduler,
        "warmup_ratio": t.warmup_ratio, "max_grad_norm": t.max_grad_norm, "weight_decay": t.weight_decay,
        "bf16": t.precision == "bf16", "seed": t.seed, "ddp_timeout": 180000000,
    }
    if lora.enabled:
        recipe.update({"lora_rank": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
                       "lora_target": ",".join(lora.target)})
    if cfg.model.quantization == "4bit":
        recipe.update({"quantization_bit": 4, "quantization_method": "bnb"})
    if t.max_steps > 0:
        recipe["max_steps"] = t.max_steps
    # LLaMA-Factory checkpoints by default, reentrant (use_reentrant_gc: true); ours is non-reentrant
    if t.gradient_checkpointing:
        recipe["use_reentrant_gc"] = False
    else:
        recipe["disable_gradient_checkpointing"] = True
    if t.deepspeed:
        recipe["deepspeed"] = deepspeed_config(t.deepspeed)
    if "radscribe_val" in info:
        recipe.update({"eval_dataset": "radscribe_val", "per_device_eval_batch_size": t.per_device_batch,
                       "eval_strategy": "steps" if t.eval_steps else "epoch"})
        if t.eval_steps:
            recipe["eval_steps"] = t.eval_steps
    notes = [] if lora.target == ["all"] else ["lora_target names modules by their LLaMA-Factory meaning"]
    if lora.experts:
        notes.append("lora.experts has no LLaMA-Factory equivalent: its LoRA never reaches fused MoE experts")
    run.mkdir(parents=True, exist_ok=True)
    header = "# Written by `radscribe train --emit-llamafactory`; run: llamafactory-cli train llamafactory.yaml\n"
    header += "".join(f"# NOTE: {n}\n" for n in notes)
    (run / "llamafactory.yaml").write_text(header + yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True),
                                           encoding="utf-8")
    (run / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return run / "llamafactory.yaml"
