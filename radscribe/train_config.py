"""What `radscribe train` is configured by: the sections of a training YAML (presets in radscribe/presets/), each
field documented where it is declared -- `radscribe train --help` prints these docstrings.

Kept apart from radscribe/train.py so that the CLI's help, the --dry-run plan and the LLaMA-Factory emitter read a
training config without importing the training stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SMALL_DATA_ROWS = 10_000
"""Training sets up to this size get `lora.small_data_dropout` (the recommended recipe's 0.05)."""


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
    """Images larger than this are downscaled (LLaMA-Factory's image_max_pixels); saved as the run's processor
    limit, so eval, chat, serve and export size images the same way."""
    image_min_pixels: int = 32 * 32
    """Images smaller are upscaled to it, and none is downscaled below it to fit `cutoff_len`; it replaces the
    processor's own floor (65,536 px in the published Qwen3-VL processor)."""
    max_samples: int | None = None
    """Use only the first N training rows (quick runs)."""
    encode_cache_mb: int = 1024
    """Encoded samples each data process (a DataLoader worker, or the training process) keeps in memory, in MiB, so
    that later epochs do not encode them again; 0 encodes every row every epoch. Nothing is encoded before step 1."""
    packing: bool = False
    """Pack each batch's samples into as few rows of at most cutoff_len tokens as fit (never splitting a sample),
    each sample with its own positions and attention; removes padding, changes no loss (same samples per step)."""


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
    """Recompute each decoder layer's activations in backward (non-reentrant) instead of keeping them: far less
    activation memory for about a third more compute. On in the presets (LLaMA-Factory's default too)."""
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
    """Processes per node to launch through torchrun, one per GPU (gloo on CPU, NCCL on GPUs)."""
    nnodes: int = 1
    """Machines in the run; with more than one, each runs the same command with its own node_rank."""
    node_rank: int = 0
    """This machine's index, from 0 to nnodes-1; node 0 hosts the rendezvous and writes the run files."""
    master_addr: str | None = None
    """Host name or address of node 0, reachable from every node (needed with nnodes > 1; one node: 127.0.0.1)."""
    master_port: int | None = None
    """Free TCP port on node 0 for torchrun's rendezvous (needed with nnodes > 1; one node: any free port)."""
    dataloader_workers: int = 2
    """DataLoader worker processes that read, decode and encode rows while the model trains (0 = in the training
    process)."""


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
