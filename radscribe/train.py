"""Fine-tune a local Qwen-VL model on a prepared dataset: LoRA / QLoRA / full, one process or many.

Run as: radscribe train --config recommended --model MODEL_DIR --data DATASET --out RUN [section.field=value ...]
        [--resume] [--deepspeed z2|z3] [--nproc N] [--emit-llamafactory]
        [--nnodes N --node-rank R --master-addr HOST --master-port PORT]   (the same command on every node)
The memory plan first, nothing loaded: radscribe train --config reference-z2 --model MODEL_DIR --dry-run --nproc 4
A short run on the tiny model: add train.max_steps=20 data.max_samples=64 (`radscribe train --help` lists fields).

`train(cfg)` reads top to bottom: set_up (run folder, row index, model, LoRA, streaming splits) -> fit (the HF
Trainer; rows are encoded in its DataLoader workers) -> save (adapter or model, processor, rejects, summary, loss
curve). Encoding lives in radscribe/encode.py, the run log in radscribe/runlog.py, rank and device in
radscribe/dist.py, the LLaMA-Factory recipe in radscribe/interop/, the config sections in radscribe/train_config.py.

With `--nproc N` (and/or `--nnodes N`) this process re-launches itself through torchrun (`python -m radscribe.train
RUN/launch_config.yaml` in every worker; `launch_config.nodeR.yaml` per node when there are several); users with their
own launcher can run that worker command under their own torchrun. `--dry-run` is radscribe/plan.py.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from radscribe import dist
from radscribe.config import changed_fields, deepspeed_config, load_config, save_config
from radscribe.errors import RadscribeError
from radscribe.runlog import checkpoint_step, last_checkpoint, truncate_log
from radscribe.train_config import SMALL_DATA_ROWS, TrainConfig

# --- the stage ---------------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> Path:
    """Train per `cfg` and return the run folder."""
    if not cfg.output.dir:
        raise RadscribeError("output.dir: pass --out RUN")
    if (cfg.train.nproc > 1 or cfg.train.nnodes > 1) and not dist.get_dist_info().launched:
        return launch(cfg)
    run = set_up(cfg)
    if run.finished:
        return run.dir
    try:
        trainer, result, runtime = fit(cfg, run)
        save(cfg, run, trainer, result, runtime)
    finally:
        dist.forget_launcher_env(run.launcher_env)
    return run.dir


@dataclass
class Run:
    """What set-up hands to fit and save."""

    dir: Path
    finished: bool = False
    last_checkpoint: Path | None = None
    launcher_env: list[str] = field(default_factory=list)
    args: object = None
    model: object = None
    processor: object = None
    described: dict = field(default_factory=dict)
    train_set: object = None
    val_set: object = None
    started: float = field(default_factory=time.perf_counter)
    first_step_s: float | None = None


# --- set-up ------------------------------------------------------------------------------------------------
def set_up(cfg: TrainConfig) -> Run:
    """Check the run folder, index the rows, start the process group, load and wrap the model, stream the splits."""
    from radscribe.encode import streaming_splits
    from radscribe.model.adapter_check import RECORD, check_adapter, record_base

    run = Run(Path(cfg.output.dir))
    if not cfg.model.path or not Path(cfg.model.path).is_dir():
        raise RadscribeError(f"model.path: base model folder {cfg.model.path!r} does not exist (pass --model DIR)")
    run.last_checkpoint = last_checkpoint(run.dir / "checkpoints")
    if run.last_checkpoint and not cfg.output.resume:
        raise RadscribeError(f"{run.dir} already holds checkpoints; pass --resume to continue or choose another --out")
    train_rows, val_rows = read_rows(cfg)
    cfg = resolve_config(cfg, len(train_rows))
    if cfg.output.resume and _finished(cfg, run.dir):
        run.finished = True
        return run
    if run.last_checkpoint and cfg.output.resume and cfg.lora.enabled:  # the Trainer would load it onto any base
        check_adapter(cfg.model.path, run.last_checkpoint, record=run.dir / RECORD)
    run.launcher_env = dist.init_process_group(deepspeed=bool(cfg.train.deepspeed))
    run.dir.mkdir(parents=True, exist_ok=True)
    if dist.is_main():
        save_config(cfg, run.dir / "config.yaml")
        if run.last_checkpoint and cfg.output.resume:  # the steps logged after the checkpoint are redone
            truncate_log(run.dir, checkpoint_step(run.last_checkpoint))
        else:
            (run.dir / "log.jsonl").unlink(missing_ok=True)
    # TrainingArguments before the model load: under ZeRO-3 they make from_pretrained load partitioned
    run.args = _training_arguments(cfg, run.dir / "checkpoints", has_val=bool(val_rows))
    run.model, run.processor = _build_model(cfg)
    if dist.is_main() and cfg.lora.enabled:  # what a --resume checks its checkpoint against
        record_base(cfg.model.path, run.processor.tokenizer, run.dir)
    from radscribe.model import pixels
    from radscribe.model.lora import describe

    # The one image policy: the processor saved with the run carries these limits, and eval/chat/serve/export read
    # them back from it (radscribe.model.pixels), so an image costs the same tokens there as here.
    pixels.set_pixel_limits(run.processor, cfg.data.image_min_pixels, cfg.data.image_max_pixels)
    _say(pixels.describe(run.processor, pixels.PixelLimits(cfg.data.image_min_pixels, cfg.data.image_max_pixels,
                                                           "data.image_min_pixels / data.image_max_pixels")))

    run.described = describe(run.model)
    _say_what_trains(cfg, run.described)
    run.train_set, run.val_set = streaming_splits(run.processor, cfg.data, run.dir, train_rows, val_rows,
                                                  fresh=not (run.last_checkpoint and cfg.output.resume))
    return run


def read_rows(cfg: TrainConfig) -> tuple:
    """The training rows (required) and the validation rows, as row indexes (`SplitRows`: offsets, not rows);
    only a *missing* validation split is skipped."""
    from radscribe.data.dataset import SplitRows, split_file

    if not cfg.data.dataset:
        raise RadscribeError("data.dataset: pass --data DATASET")
    train_rows = SplitRows(cfg.data.dataset, cfg.data.train_split, limit=cfg.data.max_samples or None)
    if not cfg.data.val_split:
        return train_rows, []
    if split_file(cfg.data.dataset, cfg.data.val_split, missing_ok=True) is None:
        _say(f"{cfg.data.dataset} has no {cfg.data.val_split!r} split: training without evaluation")
        return train_rows, []
    return train_rows, SplitRows(cfg.data.dataset, cfg.data.val_split)


def resolve_config(cfg: TrainConfig, n_train: int) -> TrainConfig:
    """Fill what depends on the data (the recipe's dropout rule) and check the combination; the result is saved."""
    if cfg.lora.small_data_dropout is not None and n_train <= SMALL_DATA_ROWS:
        cfg.lora.dropout = cfg.lora.small_data_dropout
    if cfg.train.deepspeed and cfg.model.quantization:
        raise RadscribeError("train.deepspeed and model.quantization=4bit cannot be combined; drop one")
    if cfg.model.quantization and not cfg.lora.enabled:
        raise RadscribeError("model.quantization=4bit needs lora.enabled=true (a 4-bit base cannot be trained)")
    return cfg


# where and how this process was started, not what is trained: a finished run may be resumed from elsewhere
_NOT_THE_RECIPE = ("output.resume", "train.node_rank", "train.master_addr", "train.master_port")


def _finished(cfg: TrainConfig, run: Path) -> bool:
    """A finished run (train_summary.json is written last) resumes as a no-op, if it ran with these settings."""
    summary = run / "train_summary.json"
    if not summary.is_file():
        return False
    changed = changed_fields(load_config(TrainConfig, str(run / "config.yaml")), cfg, ignore=_NOT_THE_RECIPE)
    if changed:
        raise RadscribeError(f"{run} is a finished run with other settings ({'; '.join(changed)}); a finished run "
                             "is not extended: choose another --out")
    steps = json.loads(summary.read_text(encoding="utf-8"))["steps"]
    _say(f"{run} already finished ({steps} steps, train_summary.json): nothing to resume")
    return True


def _build_model(cfg: TrainConfig):
    from transformers import set_seed

    from radscribe.model.load import load_model, placement
    from radscribe.model.lora import apply_lora

    # LoRA: a bf16 base with fp32 adapters (PEFT upcasts them); full fine-tuning keeps fp32 master weights and
    # lets autocast do bf16 math, so small updates are not lost to bf16 rounding.
    dtype = "bf16" if cfg.train.precision == "bf16" and cfg.lora.enabled else "fp32"
    set_seed(cfg.train.seed)  # LoRA's A matrices are drawn at wrapping time, before the Trainer seeds anything
    # every rank loads onto its own device (cuda:LOCAL_RANK, or cpu), or partitioned under ZeRO-3: never a
    # whole host copy per rank first
    where = placement()
    model, processor = load_model(cfg.model.path, dtype=dtype, quantization=cfg.model.quantization,
                                  device=where.device, trainable=True)
    _say_placement(where, model)
    if cfg.train.gradient_checkpointing:
        # Non-reentrant, so it needs no input that requires grad; transformers also hooks the input embeddings
        # (enable_input_require_grads) so a frozen base still carries gradients to the LoRA weights. Set here, before
        # LoRA wraps the model, so the state after set-up is the trained one (the Trainer sets it again, the same).
        model.activation_checkpointing_enable({"use_reentrant": False})
    return apply_lora(model, cfg.lora), processor


def _say_placement(where, model) -> None:
    if where.path == "zero3-partitioned":  # zero.Init keeps each weight's 1/world slice in `ds_tensor`
        local = sum(p.ds_tensor.numel() for p in model.parameters())
        full = sum(p.ds_numel for p in model.parameters())
        detail = f"this rank holds {local:,} of {full:,} weight elements"
    else:
        detail = f"device_map {where.device_map}"
    dist.print_each(f"weights loaded via {where.path} onto {where.device}: {detail}", "radscribe train")


def _say_what_trains(cfg: TrainConfig, d: dict) -> None:
    experts = f", experts: {d['lora_expert_parameters']}" if d["lora_expert_parameters"] else ""
    _say(f"LoRA target {cfg.lora.target} resolved to: {json.dumps(d['lora_modules'])} ({d['lora_module_count']} "
         f"modules){experts}" if cfg.lora.enabled else "full-parameter fine-tuning")
    _say(f"trainable parameters: {d['trainable_parameters']:,} of {d['total_parameters']:,} "
         f"({d['trainable_percent']} %)")


def _training_arguments(cfg: TrainConfig, checkpoints: Path, has_val: bool):
    import torch

    from radscribe.quiet import peft_notices

    with peft_notices(cfg.model.quantization):  # transformers' trainer modules import peft
        from transformers import TrainingArguments

    t = cfg.train
    on_cpu = not torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=t.per_device_batch, per_device_eval_batch_size=t.per_device_batch,
        gradient_accumulation_steps=t.grad_accum, num_train_epochs=t.epochs, max_steps=t.max_steps,
        learning_rate=t.lr, lr_scheduler_type=t.scheduler, warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, optim="adamw_torch",
        bf16=t.precision == "bf16", activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps, logging_first_step=True,
        eval_strategy=("steps" if t.eval_steps else "no") if has_val else "no",
        eval_steps=t.eval_steps, eval_on_start=has_val,
        seed=t.seed, data_seed=t.seed, report_to="none", remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding", dataloader_num_workers=t.dataloader_workers,
        dataloader_persistent_workers=t.dataloader_workers > 0,  # their encode caches live across epochs
        deepspeed=deepspeed_config(t.deepspeed), use_cpu=on_cpu,
        ddp_backend=dist.backend() if on_cpu and dist.world_size() > 1 else None,
        disable_tqdm=not dist.is_main(),
    )


# --- fit ---------------------------------------------------------------------------------------------------
def fit(cfg: TrainConfig, run: Run):
    """The HF Trainer loop (resuming from the newest checkpoint with --resume); returns (trainer, result, s)."""
    from radscribe.encode import Collator, rope_index_of, trainer_class, worker_error
    from radscribe.quiet import import_deepspeed_quietly
    from radscribe.runlog import RunLog

    if not cfg.train.deepspeed:
        import_deepspeed_quietly()  # the Trainer's set-up imports it (through accelerate) whenever it is installed

    # the collator runs in the DataLoader workers; packing asks the model for each sample's positions there
    collator = Collator(run.processor.tokenizer.pad_token_id, cfg.data.cutoff_len if cfg.data.packing else None,
                        rope_index_of(run.model) if cfg.data.packing else None)
    trainer = trainer_class()(
        model=run.model, args=run.args, train_dataset=run.train_set, eval_dataset=run.val_set,
        data_collator=collator, callbacks=[RunLog(run.dir, _samples_per_step(cfg)), FirstStepClock(run)],
    )
    resume = str(run.last_checkpoint) if (run.last_checkpoint and cfg.output.resume) else None
    started = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except RadscribeError as err:  # raised while a DataLoader worker encoded a row
        raise worker_error(err) from None
    except KeyboardInterrupt:
        newest = last_checkpoint(run.dir / "checkpoints")
        _say(f"interrupted at step {trainer.state.global_step}; "
             + (f"{newest.name} is saved: continue with `radscribe train --config {run.dir / 'config.yaml'} "
                "--resume`" if newest else "no checkpoint was saved yet (train.save_steps): a rerun starts over"))
        raise
    return trainer, result, time.perf_counter() - started


def _samples_per_step(cfg: TrainConfig) -> int:
    return cfg.train.per_device_batch * cfg.train.grad_accum * dist.world_size()


class FirstStepClock:
    """Records seconds from the start of `train` to the end of the first optimizer step (a TrainerCallback by
    interface, like RunLog)."""

    def __init__(self, run: Run):
        self.run = run

    def on_step_end(self, args, state, control, **kwargs):
        if self.run.first_step_s is None:
            self.run.first_step_s = round(time.perf_counter() - self.run.started, 2)

    def __getattr__(self, name: str):
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


# --- save --------------------------------------------------------------------------------------------------
def save(cfg: TrainConfig, run: Run, trainer, result, runtime: float) -> None:
    """The adapter (or full model) with its processor, RUN/rejects.jsonl, train_summary.json (written last) and
    loss.png."""
    from radscribe.encode import account
    from radscribe.model.adapter_check import record_base
    from radscribe.runlog import loss_summary, plot_loss

    final_eval = trainer.evaluate() if run.val_set else {}
    out_dir = run.dir / ("adapter" if cfg.lora.enabled else "model")
    trainer.save_model(str(out_dir))
    rows = account(run.dir, [s for s in (run.train_set, run.val_set) if s])
    if rows["rejected"]:
        _say(f"rejected {rows['rejected']} row(s): {rows['rejected_by_reason']} (RUN/rejects.jsonl)")
    if dist.is_main():
        run.processor.save_pretrained(out_dir)
        record_base(cfg.model.path, run.processor.tokenizer, out_dir)  # what eval/serve/export check it against
        d = run.described
        summary = {
            "steps": trainer.state.global_step, "epochs": trainer.state.epoch,
            "train_samples": rows["rows"]["train"]["used"], "val_samples": rows["rows"].get("val", {}).get("used", 0),
            **rows,
            "global_batch": _samples_per_step(cfg), "processes": dist.world_size(),
            "train_loss": result.training_loss, **loss_summary(run.dir), "eval_loss": final_eval.get("eval_loss"),
            "runtime_s": round(runtime, 2), "first_step_s": run.first_step_s,
            "tokens_seen": trainer.state.num_input_tokens_seen,
            "trainable_parameters": d["trainable_parameters"], "total_parameters": d["total_parameters"],
            "lora_targets": d["lora_modules"], "lora_module_count": d["lora_module_count"],
            "lora_expert_parameters": d["lora_expert_parameters"],
            "lora_dropout": cfg.lora.dropout if cfg.lora.enabled else None, "output": out_dir.name,
        }
        plot_loss(run.dir)
        (run.dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    dist.barrier()


def _say(message: str) -> None:
    dist.print0(message, "radscribe train")


# --- multi-process launch ----------------------------------------------------------------------------------
def launch(cfg: TrainConfig) -> Path:
    """Re-run this training in `nproc` processes on this node through torchrun (the rendezvous of `nnodes` nodes
    when there are several); every worker of this node reads RUN/launch_config[.nodeR].yaml."""
    t = cfg.train
    rendezvous = dist.Rendezvous(nnodes=t.nnodes, node_rank=t.node_rank, master_addr=t.master_addr,
                                 master_port=t.master_port)
    rendezvous.check()  # before anything is written
    # one file per node: on a shared file system the nodes' launchers write at the same time
    name = "launch_config.yaml" if t.nnodes == 1 else f"launch_config.node{t.node_rank}.yaml"
    config_file = save_config(cfg, Path(cfg.output.dir) / name)
    dist.launch(t.nproc, "radscribe.train", str(config_file), prefix="radscribe train", rendezvous=rendezvous)
    return Path(cfg.output.dir)


if __name__ == "__main__":  # a torchrun worker: python -m radscribe.train RUN/launch_config.yaml
    if len(sys.argv) != 2:
        sys.exit("usage: [torchrun ...] python -m radscribe.train CONFIG.yaml  (see `radscribe train --help`)")
    try:
        train(load_config(TrainConfig, sys.argv[1]))
    except RadscribeError as err:
        print(f"radscribe train: error: {err}", file=sys.stderr)
        sys.exit(2)
