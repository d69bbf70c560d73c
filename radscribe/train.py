"""Fine-tune a local Qwen-VL model on a prepared dataset: LoRA / QLoRA / full, one process or many.

Run as: radscribe train --config recommended --model MODEL_DIR --data DATASET --out RUN [section.field=value ...]
        [--resume] [--deepspeed z2|z3] [--nproc N] [--emit-llamafactory]

`train(cfg)` reads top to bottom: setup (config, model, LoRA, data) -> fit (HF Trainer) -> save (adapter,
processor, summary, loss curve). Collation is ours because two things must hold that LLaMA-Factory's does not
guarantee: the loss sees only assistant tokens (the report and its end-of-turn token), and `cutoff_len` never
cuts through an image's token run (their issue #5964) - text is truncated, images are downscaled or the sample
is rejected with a counted reason.

With `--nproc N` this process re-launches itself through torchrun (`python -m radscribe.train RUN/config.yaml`
in every worker); multi-node users can run that same command under their own torchrun.
"""

from __future__ import annotations

import functools
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from radscribe.config import PRESETS_DIR, load_config, save_config, to_dict
from radscribe.errors import RadscribeError

SMALL_DATA_ROWS = 10_000
"""Training sets up to this size get `lora.small_data_dropout` (the recommended recipe's 0.05)."""

IGNORE_INDEX = -100
# Per-token keys are padded along the sequence; every other key the processor returns (pixel_values,
# image_grid_thw, ...) is concatenated along dim 0, so nothing it returns is dropped (Qwen3-VL's forward
# raises without mm_token_type_ids when images are present).
SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids", "labels")
PAD_VALUES = {"labels": IGNORE_INDEX}
MAX_IMAGE_SHRINKS = 4
IMAGE_PAD = "<|image_pad|>"


# --- config ------------------------------------------------------------------------------------------------
@dataclass
class ModelSection:
    path: str = ""
    """Base model folder as downloaded (Qwen3-VL, Qwen3-VL-MoE, Qwen2.5-VL) or written by `radscribe tiny-model`."""
    quantization: Literal["4bit"] | None = None
    """`4bit` loads the base in bitsandbytes nf4 (QLoRA); the adapter stays in full precision."""


@dataclass
class DataSection:
    dataset: str = ""
    """A `radscribe prepare` folder or any LLaMA-Factory sharegpt dataset folder with images."""
    train_split: str = "train"
    """Split trained on."""
    val_split: str | None = "val"
    """Split evaluated on (loss) before and after training; null or a missing split skips evaluation."""
    cutoff_len: int = 2048
    """Most tokens per sample; text is truncated, image token runs are never cut."""
    image_max_pixels: int = 768 * 768
    """Images larger than this are downscaled before encoding (LLaMA-Factory's image_max_pixels)."""
    image_min_pixels: int = 32 * 32
    """Images are never downscaled below this, neither by the cap above nor to fit `cutoff_len`."""
    max_samples: int | None = None
    """Use only the first N training rows (quick runs)."""
    cache_mib: int = 1024
    """Keep encoded samples (token ids, pixel values) in memory up to this size; the rest are re-encoded on access."""


@dataclass
class LoraSection:
    enabled: bool = True
    """false = full-parameter fine-tuning of the whole model (the demo's stage 1)."""
    rank: int = 8
    """LoRA rank r."""
    alpha: int = 16
    """LoRA alpha (scale alpha/r)."""
    dropout: float = 0.0
    """LoRA dropout."""
    small_data_dropout: float | None = None
    """When set, replaces `dropout` for training sets of at most 10,000 samples (recommended recipe: 0.05)."""
    target: list[str] = field(default_factory=lambda: ["all"])
    """`all` = every Linear of the language model except lm_head, or explicit module names."""
    vision_tower: bool = False
    """Also put LoRA on the vision tower's Linears (the demo's stage 2 needs it to learn lesion position)."""
    merger: bool = False
    """Also put LoRA on the vision-to-language merger."""
    experts: bool = False
    """MoE: also put LoRA on the fused expert weights (PEFT target_parameters)."""


@dataclass
class OptimSection:
    epochs: float = 2.0
    """Training epochs."""
    max_steps: int = -1
    """Stop after this many optimizer steps (overrides epochs when > 0)."""
    per_device_batch: int = 4
    """Samples per device per forward pass."""
    grad_accum: int = 8
    """Forward passes per optimizer step; global batch = per_device_batch * grad_accum * processes."""
    lr: float = 5e-5
    """Peak learning rate (AdamW)."""
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_ratio: float = 0.0
    """Fraction of optimizer steps spent warming up linearly."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """bf16 mixed precision or plain fp32 (CPU tests use fp32 for exact comparisons)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    save_steps: int = 200
    """Checkpoint every N optimizer steps (what --resume continues from)."""
    save_total_limit: int | None = None
    """Keep only the newest N checkpoints."""
    logging_steps: int = 10
    """Log loss, lr, grad norm and throughput every N optimizer steps."""
    eval_steps: int | None = None
    """Evaluate every N steps; null = at the start and the end only."""
    seed: int = 42
    """Seed for initialisation and data order."""
    deepspeed: str | None = None
    """`z2`, `z3` (shipped configs in radscribe/presets/deepspeed) or a path to a DeepSpeed JSON."""
    nproc: int = 1
    """Processes to launch through torchrun (gloo on CPU, NCCL on GPUs)."""
    dataloader_workers: int = 0
    """DataLoader worker processes for image decoding and encoding."""


@dataclass
class OutputSection:
    dir: str = ""
    """The run folder (layout in docs/architecture.md)."""
    resume: bool = False
    """Continue from the newest checkpoint in RUN/checkpoints."""


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    """The base model."""
    data: DataSection = field(default_factory=DataSection)
    """The dataset and how samples are encoded."""
    lora: LoraSection = field(default_factory=LoraSection)
    """Which weights train."""
    train: OptimSection = field(default_factory=OptimSection)
    """The optimisation loop."""
    output: OutputSection = field(default_factory=OutputSection)
    """Where the run goes."""


# --- encoding: assistant-only labels, image-safe cutoff ------------------------------------------------------
class Rejected(Exception):
    """A sample that cannot be trained on; the reason is counted in the run's rejects."""


def fit_pixels(image, max_pixels: int, min_pixels: int):
    """Scale an image (keeping aspect) into [min_pixels, max_pixels], as LLaMA-Factory's image_max/min_pixels."""
    w, h = image.size
    if w * h > max_pixels:
        scale = math.sqrt(max_pixels / (w * h))
    elif w * h < min_pixels:
        scale = math.sqrt(min_pixels / (w * h))
    else:
        return image
    return image.resize((max(1, int(w * scale)), max(1, int(h * scale))))


def chat_segments(processor, messages: list[dict], n_images: int) -> list[tuple[str, bool]]:
    """Render the conversation with the model's own chat template and split it into (text, is_label) pieces.

    The label pieces are exactly each assistant message's content plus the end-of-turn token; whatever the
    template puts before the content (a role header, an empty think block) or after the end-of-turn token
    stays unlabelled.
    """
    from radscribe.data.dataset import to_chat

    chat = to_chat(messages, [None] * n_images)
    eos = processor.tokenizer.eos_token
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if "<image>" in message["content"]:
            raise Rejected("image inside an assistant message")
        prefix = processor.apply_chat_template(chat[:i], add_generation_prompt=True, tokenize=False)
        full = processor.apply_chat_template(chat[:i + 1], tokenize=False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise RadscribeError("the model's chat template does not render conversations incrementally; "
                                 "assistant-only labels cannot be located")
        reply = full[len(prefix):]
        start = reply.find(message["content"])
        end = reply.find(eos, start + len(message["content"]))
        if start < 0 or end < 0:
            raise RadscribeError(f"the chat template does not end assistant turns with {eos}")
        end += len(eos)
        pieces.append((prefix[len(done):] + reply[:start], False))
        pieces.append((reply[start:end], True))
        done = prefix + reply[:end]
    if not pieces:
        raise Rejected("no assistant message")
    return [(text, label) for text, label in pieces if text]


@dataclass
class Encoder:
    """One sample -> model inputs + labels, within `cutoff_len` and without cutting an image token run."""

    processor: object
    cutoff_len: int
    image_max_pixels: int
    image_min_pixels: int

    def __call__(self, sample) -> dict:
        from radscribe.data.imaging import load_image

        images = [fit_pixels(load_image(p), self.image_max_pixels, self.image_min_pixels) for p in sample.images]
        pieces = chat_segments(self.processor, sample.messages, len(images))
        for _ in range(MAX_IMAGE_SHRINKS + 1):
            queue = list(images)
            encoded = [self._encode_piece(text, label, queue) for text, label in pieces]
            kept, budget = [], self.cutoff_len
            for enc in encoded:
                n = enc["input_ids"].shape[-1]
                if n <= budget:
                    kept.append(enc)
                    budget -= n
                    continue
                if enc["is_label"] and budget > 0:  # truncate report text, never a prompt with images
                    kept.append({k: (v[..., :budget] if k in SEQUENCE_KEYS else v) for k, v in enc.items()})
                break
            if any(e["is_label"] for e in kept):
                return _concat(kept)
            images = self._shrunk(images, encoded[0])
        raise Rejected("image tokens exceed cutoff_len after downscaling")

    def _encode_piece(self, text: str, label: bool, queue: list) -> dict:
        import torch

        count = text.count(IMAGE_PAD)
        taken = queue[:count]
        del queue[:count]
        if taken:
            enc = dict(self.processor(text=[text], images=taken, return_tensors="pt"))
        else:
            # Text-only pieces skip the processor (its per-call overhead was half the encoding time); the
            # per-token keys it would add are constant for text: mask 1, token type 0 (not an image token).
            ids = self.processor.tokenizer([text], add_special_tokens=False, return_tensors="pt")["input_ids"]
            enc = {key: torch.ones_like(ids) if key == "attention_mask" else torch.zeros_like(ids)
                   for key in self.sequence_keys}
            enc["input_ids"] = ids
        ids = enc["input_ids"]
        enc["labels"] = ids.clone() if label else torch.full_like(ids, IGNORE_INDEX)
        enc["is_label"] = label
        return enc

    @functools.cached_property
    def sequence_keys(self) -> list[str]:
        """The per-token keys this processor returns for text (input_ids, attention_mask, mm_token_type_ids...)."""
        return [k for k in self.processor(text=["x"], return_tensors="pt") if k in SEQUENCE_KEYS]

    def _shrunk(self, images: list, first: dict) -> list:
        """Downscale the images so that the first prompt + one report token fit, or reject the sample."""
        image_id = self.processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        ids = first["input_ids"][0]
        image_tokens = int((ids == image_id).sum())
        if not image_tokens:
            raise Rejected("prompt text longer than cutoff_len")
        room = self.cutoff_len - (ids.shape[-1] - image_tokens) - 1
        if room <= 0:
            raise Rejected("prompt text longer than cutoff_len")
        # image tokens grow with pixel area, so scale each side by sqrt(room / tokens), with a margin for the
        # processor rounding sides up to a multiple of patch * merge
        scale = math.sqrt(room / image_tokens) * 0.9
        smaller = []
        for im in images:
            w, h = im.size
            if w * h * scale * scale < self.image_min_pixels:
                raise Rejected("image tokens exceed cutoff_len even at image_min_pixels")
            smaller.append(im.resize((max(1, int(w * scale)), max(1, int(h * scale)))))
        return smaller


def _concat(pieces: list[dict]) -> dict:
    import torch

    out: dict = {}
    for key in pieces[0]:
        if key == "is_label":
            continue
        values = [p[key] for p in pieces if key in p]
        out[key] = torch.cat(values, dim=-1 if key in SEQUENCE_KEYS else 0)
    for key in SEQUENCE_KEYS:
        if key in out:
            out[key] = out[key][0]
    return out


def collate(features: list[dict], pad_token_id: int) -> dict:
    """Right-pad the per-token keys; concatenate every other key (images of all samples, in order)."""
    import torch

    longest = max(f["input_ids"].shape[-1] for f in features)
    batch: dict = {}
    keys = dict.fromkeys(k for f in features for k in f)
    for key in keys:
        if key in SEQUENCE_KEYS:
            pad = pad_token_id if key == "input_ids" else PAD_VALUES.get(key, 0)
            rows = [torch.nn.functional.pad(f[key], (0, longest - f[key].shape[-1]), value=pad) for f in features]
            batch[key] = torch.stack(rows)
        else:
            batch[key] = torch.cat([f[key] for f in features if key in f], dim=0)
    return batch


class EncodedDataset:
    """Training samples: encoded once by `plan_split` and kept while they fit the memory budget, else re-encoded
    on access (images decoded lazily), so memory stays bounded on large datasets."""

    def __init__(self, samples: list, encoded: list, encoder: Encoder):
        self.samples, self.encoded, self.encoder = samples, encoded, encoder

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        cached = self.encoded[index]
        return cached if cached is not None else self.encoder(self.samples[index])


def plan_split(samples: list, encoder: Encoder, desc: str, cache_bytes: int) -> tuple[EncodedDataset, list[dict]]:
    """Encode every sample once: keep the trainable ones, count the rest by reason (nothing is dropped silently).

    Encoded samples are kept in memory up to `cache_bytes`: the encoding (processor call per row) costs more than a
    tiny model's step, and this pass pays it anyway.
    """
    from tqdm import tqdm

    kept, encoded, rejects, used = [], [], [], 0
    for sample in tqdm(samples, desc=f"encoding {desc}", unit="row", disable=not _is_main()):
        try:
            features = encoder(sample)
        except Rejected as err:
            rejects.append({"id": sample.id, "split": desc, "reason": str(err)})
            continue
        size = sum(v.numel() * v.element_size() for v in features.values())
        keep = used + size <= cache_bytes
        used += size if keep else 0
        kept.append(sample)
        encoded.append(features if keep else None)
    return EncodedDataset(kept, encoded, encoder), rejects


# --- setup -------------------------------------------------------------------------------------------------
def resolve_config(cfg: TrainConfig, n_train: int) -> TrainConfig:
    """Fill what depends on the data (the recipe's dropout rule) and check the combination; the result is saved."""
    if cfg.lora.small_data_dropout is not None and n_train <= SMALL_DATA_ROWS:
        cfg.lora.dropout = cfg.lora.small_data_dropout
    if cfg.train.deepspeed and cfg.model.quantization:
        raise RadscribeError("train.deepspeed and model.quantization=4bit cannot be combined; drop one")
    if cfg.model.quantization and not cfg.lora.enabled:
        raise RadscribeError("model.quantization=4bit needs lora.enabled=true (a 4-bit base cannot be trained)")
    return cfg


def deepspeed_config(name: str | None) -> str | None:
    if not name:
        return None
    path = PRESETS_DIR / "deepspeed" / f"{name}.json" if name in ("z2", "z3") else Path(name)
    if not path.is_file():
        raise RadscribeError(f"train.deepspeed: {name!r} is neither z2, z3 nor an existing DeepSpeed JSON file")
    return str(path)


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _init_distributed(cfg: TrainConfig) -> list[str]:
    """Start the process group before TrainingArguments (and the model load), as ZeRO-3 on CPU requires.

    Returns the environment variables it set itself (for a launcher-less DeepSpeed run), to unset afterwards.
    """
    added: list[str] = []
    if cfg.train.deepspeed and "RANK" not in os.environ:
        # DeepSpeed needs a process group even for one process; without a launcher it goes looking for MPI
        single = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        added = [k for k in single if k not in os.environ]
        os.environ.update({k: single[k] for k in added})
    elif int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return added
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if cfg.train.deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
    elif not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return added


def apply_lora(model, cfg: TrainConfig):
    """Wrap the base in a PEFT LoRA model per `cfg.lora`, or leave every weight trainable (full fine-tuning)."""
    if not cfg.lora.enabled:
        model.requires_grad_(True)
        return model
    from peft import get_peft_model

    from radscribe.model.lora import build_lora_config

    target = "all" if cfg.lora.target == ["all"] else cfg.lora.target
    config = build_lora_config(
        model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, target=target,
        vision=cfg.lora.vision_tower, merger=cfg.lora.merger, experts=cfg.lora.experts)
    return get_peft_model(model, config)


# --- logging -----------------------------------------------------------------------------------------------
def _trainer_callback_class():
    from transformers import TrainerCallback

    class RunLog(TrainerCallback):
        """log.jsonl + TensorBoard with throughput; only the main process writes."""

        def __init__(self, run: Path, samples_per_step: int):
            self.run, self.samples_per_step = run, samples_per_step
            self.writer = None
            self.last = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.run / "tb"))
            self.last = (time.perf_counter(), state.global_step, state.num_input_tokens_seen)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            now, step, tokens = time.perf_counter(), state.global_step, state.num_input_tokens_seen
            record = {"step": step, "epoch": round(state.epoch or 0.0, 4)}
            names = {"learning_rate": "lr"}
            for key, value in logs.items():
                if isinstance(value, (int, float)):
                    record[names.get(key, key)] = value
            if "loss" in logs and self.last is not None:
                seconds = max(now - self.last[0], 1e-9)
                record["samples_per_s"] = round((step - self.last[1]) * self.samples_per_step / seconds, 3)
                record["tokens_per_s"] = round((tokens - self.last[2]) / seconds, 1)
                self.last = (now, step, tokens)
            with (self.run / "log.jsonl").open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if self.writer:
                for key, value in record.items():
                    if key not in ("step", "epoch"):
                        self.writer.add_scalar(("eval/" if key.startswith("eval_") else "train/") + key, value, step)
                self.writer.flush()

        def on_train_end(self, args, state, control, **kwargs):
            if self.writer:
                self.writer.close()

    return RunLog


def plot_loss(run: Path) -> Path:
    """loss.png from log.jsonl: training loss per step, eval loss as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(run)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run / "loss.png", dpi=100)
    plt.close(fig)
    return run / "loss.png"


def read_log(run: str | Path) -> list[dict]:
    path = Path(run) / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- the stage ---------------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> Path:
    """Train per `cfg` and return the run folder."""
    run = Path(cfg.output.dir)
    if not cfg.output.dir:
        raise RadscribeError("output.dir: pass --out RUN")
    if cfg.train.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return launch(cfg)
    # -- setup
    from radscribe.data.dataset import read_split
    from radscribe.model.load import load_model

    if not cfg.model.path or not Path(cfg.model.path).is_dir():
        raise RadscribeError(f"model.path: base model folder {cfg.model.path!r} does not exist (pass --model DIR)")
    checkpoints = run / "checkpoints"
    last = _last_checkpoint(checkpoints)
    if last and not cfg.output.resume:
        raise RadscribeError(f"{run} already holds checkpoints; pass --resume to continue or choose another --out")
    train_rows = _read(read_split, cfg.data.dataset, cfg.data.train_split, required=True)
    if cfg.data.max_samples:
        train_rows = train_rows[:cfg.data.max_samples]
    val_rows = _read(read_split, cfg.data.dataset, cfg.data.val_split, required=False)
    cfg = resolve_config(cfg, len(train_rows))
    launcher_env = _init_distributed(cfg)
    run.mkdir(parents=True, exist_ok=True)
    if _is_main():
        save_config(cfg, run / "config.yaml")
        if not cfg.output.resume or last is None:
            (run / "log.jsonl").unlink(missing_ok=True)
        else:  # drop what the interrupted process logged after its last checkpoint: those steps are redone
            resumed_at = int(last.name.split("-")[-1])
            kept = [r for r in read_log(run) if r.get("step", 0) <= resumed_at]
            (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

    args = _training_arguments(cfg, checkpoints, has_val=bool(val_rows))  # before the model load: ZeRO-3 Init
    from transformers import set_seed

    set_seed(cfg.train.seed)  # LoRA's A matrices are drawn at wrapping time, before the Trainer seeds anything
    model, processor = load_model(cfg.model.path, dtype=_load_dtype(cfg), quantization=cfg.model.quantization,
                                  device="cpu" if cfg.model.quantization is None else None, trainable=True)
    model = apply_lora(model, cfg)
    from radscribe.model.lora import describe

    described = describe(model)
    trainable, total = described["trainable_parameters"], described["total_parameters"]
    if cfg.lora.enabled:
        _say(f"LoRA target {cfg.lora.target} resolved to: {json.dumps(described['lora_modules'])}"
             f" ({described['lora_module_count']} modules)"
             + (f", experts: {described['lora_expert_parameters']}" if described["lora_expert_parameters"] else ""))
    else:
        _say("full-parameter fine-tuning")
    _say(f"trainable parameters: {trainable:,} of {total:,} ({described['trainable_percent']} %)")

    encoder = Encoder(processor, cfg.data.cutoff_len, cfg.data.image_max_pixels, cfg.data.image_min_pixels)
    encode_started = time.perf_counter()
    cache = cfg.data.cache_mib * 2**20
    train_set, rejects = plan_split(train_rows, encoder, "train", cache)
    val_set, val_rejects = plan_split(val_rows, encoder, "val", cache - _cached_bytes(train_set))
    encode_seconds = time.perf_counter() - encode_started
    train_rows, val_rows = train_set.samples, val_set.samples
    rejects += val_rejects
    if not train_rows:
        reasons = dict(Counter(r["reason"] for r in rejects))
        raise RadscribeError(f"{cfg.data.dataset}: no trainable samples (rejected: {reasons}); raise data.cutoff_len")
    if rejects:
        _say(f"rejected {len(rejects)} sample(s): {dict(Counter(r['reason'] for r in rejects))}")
    if _is_main():
        with (run / "rejects.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects)

    # -- fit
    from transformers import Trainer

    pad_id = processor.tokenizer.pad_token_id
    world = int(os.environ.get("WORLD_SIZE", "1"))
    samples_per_step = cfg.train.per_device_batch * cfg.train.grad_accum * world
    trainer = Trainer(
        model=model, args=args,
        train_dataset=train_set, eval_dataset=val_set if val_rows else None,
        data_collator=lambda features: collate(features, pad_id),
        callbacks=[_trainer_callback_class()(run, samples_per_step)],
    )
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(last) if (last and cfg.output.resume) else None)
    runtime = time.perf_counter() - started
    final_eval = trainer.evaluate() if val_rows else {}

    # -- save
    out_dir = run / ("adapter" if cfg.lora.enabled else "model")
    trainer.save_model(str(out_dir))
    if _is_main():
        processor.save_pretrained(out_dir)
        records = read_log(run)
        losses = [r["loss"] for r in records if "loss" in r]
        evals = [r["eval_loss"] for r in records if "eval_loss" in r]
        summary = {
            "steps": trainer.state.global_step, "epochs": trainer.state.epoch,
            "train_samples": len(train_rows), "val_samples": len(val_rows), "rejected": len(rejects),
            "rejected_by_reason": dict(Counter(r["reason"] for r in rejects)),
            "global_batch": samples_per_step, "processes": world,
            "train_loss": result.training_loss, "first_logged_loss": losses[0] if losses else None,
            "last_logged_loss": losses[-1] if losses else None,
            "eval_loss_start": evals[0] if evals else None, "eval_loss": final_eval.get("eval_loss"),
            "runtime_s": round(runtime, 2), "encode_s": round(encode_seconds, 2),
            "tokens_seen": trainer.state.num_input_tokens_seen,
            "trainable_parameters": trainable, "total_parameters": total,
            "lora_targets": described["lora_modules"], "lora_module_count": described["lora_module_count"],
            "lora_expert_parameters": described["lora_expert_parameters"],
            "lora_dropout": cfg.lora.dropout if cfg.lora.enabled else None, "output": out_dir.name,
        }
        (run / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        plot_loss(run)
    _barrier()
    for key in launcher_env:  # a later train() in this process must not mistake itself for a torchrun worker
        os.environ.pop(key, None)
    return run


def _cached_bytes(dataset: EncodedDataset) -> int:
    return sum(v.numel() * v.element_size() for f in dataset.encoded if f is not None for v in f.values())


def _read(read_split, dataset: str, split: str | None, required: bool) -> list:
    if not dataset:
        raise RadscribeError("data.dataset: pass --data DATASET")
    if not split:
        return []
    try:
        return list(read_split(dataset, split))
    except RadscribeError:
        if required:
            raise
        return []


def _last_checkpoint(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    found = [p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
             and (p / "trainer_state.json").is_file()]
    return max(found, key=lambda p: int(p.name.split("-")[-1])) if found else None


def _load_dtype(cfg: TrainConfig) -> str:
    # LoRA: a bf16 base with fp32 adapters (PEFT upcasts them); full fine-tuning keeps fp32 master weights and
    # lets autocast do bf16 math, so small updates are not lost to bf16 rounding.
    if cfg.train.precision == "bf16" and cfg.lora.enabled:
        return "bf16"
    return "fp32"


def _training_arguments(cfg: TrainConfig, checkpoints: Path, has_val: bool):
    import torch
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
        deepspeed=deepspeed_config(t.deepspeed), use_cpu=on_cpu,
        ddp_backend="gloo" if on_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        disable_tqdm=not _is_main(),
    )


def _say(message: str) -> None:
    if _is_main():
        print(f"[radscribe train] {message}", file=sys.stderr, flush=True)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# --- multi-process launch ----------------------------------------------------------------------------------
def launch(cfg: TrainConfig) -> Path:
    """Re-run this training in `nproc` processes through torchrun; every worker reads RUN/config.yaml."""
    run = Path(cfg.output.dir)
    run.mkdir(parents=True, exist_ok=True)
    config_file = save_config(cfg, run / "launch_config.yaml")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cfg.train.nproc}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "radscribe.train", str(config_file)]
    _say(" ".join(command))
    done = subprocess.run(command)
    if done.returncode != 0:
        raise RadscribeError(f"torchrun with {cfg.train.nproc} processes failed (exit {done.returncode}); "
                             "see the worker output above")
    return run


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- LLaMA-Factory interop ---------------------------------------------------------------------------------
# Template per base-model family: Qwen3-VL Instruct must use the no-think template, else an empty think block
# lands in the labels. The only per-architecture table in this module.
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
        try:
            path = split_file(dataset, split) if split else None
        except RadscribeError:
            if key == "radscribe_train":
                raise
            path = None
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
    if t.gradient_checkpointing is False:
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


def config_from_args(preset: str | None, overrides: list[str], **flags) -> TrainConfig:
    """The CLI's flags are shorthands for config fields (--model -> model.path, ...), applied last."""
    # JSON-quoted so that a path like "runs/true" or "a: b" stays a string (JSON is YAML)
    extra = [f"{key}={json.dumps(str(value) if isinstance(value, Path) else value, ensure_ascii=False)}"
             for key, value in flags.items() if value is not None]
    return load_config(TrainConfig, preset, list(overrides) + extra)


if __name__ == "__main__":  # a torchrun worker: python -m radscribe.train RUN/launch_config.yaml
    if len(sys.argv) != 2:
        sys.exit("usage: [torchrun ...] python -m radscribe.train CONFIG.yaml  (see `radscribe train --help`)")
    try:
        train(load_config(TrainConfig, sys.argv[1]))
    except RadscribeError as err:
        print(f"radscribe train: error: {err}", file=sys.stderr)
        sys.exit(2)
