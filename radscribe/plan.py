"""The memory plan of a training run, before a single weight is read: `radscribe train --dry-run`.

Run as: radscribe train --config reference-z2 --model MODEL_DIR --dry-run [--nproc 4] [--nnodes 1] [--gpu-mem 80]
        [--data DATASET]

The model is built from MODEL_DIR/config.json alone on the meta device (accelerate's `init_empty_weights`: shapes,
no storage), wrapped in LoRA by the code training uses (`radscribe.model.lora.apply_lora`), and counted. A folder
holding only the published config.json is enough (Qwen3-VL-30B-A3B-Instruct: 31.07 B parameters, seconds on a CPU).
Per GPU it prints the frozen weights, the trainable parameters with their gradients and optimizer states (under
DeepSpeed from DeepSpeed's own ZeRO-2/3 estimators), and an activation estimate at per-device batch x cutoff with and
without gradient checkpointing; then tokens per optimizer step and steps per epoch. `--gpu-mem GB` turns a plan
that does not fit into a one-line error. GB here is 10^9 bytes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from radscribe.errors import RadscribeError

if TYPE_CHECKING:
    from radscribe.train_config import TrainConfig

GB = 1e9
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
"""bitsandbytes nf4 with double quantisation: 4 bits per weight, one 8-bit absmax per 64-weight block, one fp32
absmax per 256 of those (≈ 4.13 bits)."""
LOGIT_BYTES_FP32 = 4 + 4
"""Per token and vocabulary entry, beside the compute-dtype logits: the fp32 copy the loss takes and the fp32
log-softmax it keeps for backward."""
ADAM_LORA_BYTES = 4 + 4 + 8
"""Per trainable parameter without DeepSpeed: fp32 weight (PEFT keeps LoRA in fp32), fp32 gradient, Adam m and v."""


@dataclass
class Plan:
    """What `plan` found; every byte count is per GPU."""

    model_type: str
    total_parameters: int
    by_class: dict[str, int]
    """Parameter counts per class: experts, attention, dense_mlp, embedding, lm_head, vision, router_and_norms."""
    trainable_parameters: int
    lora_modules: int
    lora_expert_parameters: int
    largest_layer_parameters: int
    """The most parameters held directly by one module (ZeRO-3 gathers one such layer at a time)."""
    gpus: int
    nodes: int
    zero_stage: int | None
    weights_bytes: float
    """Frozen (base) weights held by each GPU."""
    trainable_states_bytes: float
    """Trainable weights + gradients + optimizer states held by each GPU."""
    model_states_bytes: float
    activations_bytes: dict[bool, float]
    """Keyed by gradient checkpointing on (True) / off (False)."""
    checkpointing: bool
    tokens_per_device_step: int
    tokens_per_optimizer_step: int
    steps_per_epoch: int | None
    train_rows: int | None
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> float:
        """What one GPU needs as configured (with the run's own checkpointing setting)."""
        return self.model_states_bytes + self.activations_bytes[self.checkpointing]


def plan(cfg: TrainConfig, gpu_mem_gb: float | None = None) -> Plan:
    """The plan for `cfg` on `cfg.train.nproc` processes per node x `cfg.train.nnodes` nodes; with `gpu_mem_gb`,
    a RadscribeError when the total per GPU is larger."""
    config = _read_config(cfg.model.path)
    model = _meta_model(cfg, config)
    counts = _parameter_counts(model, cfg)
    frozen_bytes = counts.pop("frozen_bytes")
    p = Plan(model_type=config.model_type, gpus=cfg.train.nproc * cfg.train.nnodes, nodes=cfg.train.nnodes,
             zero_stage=_zero_stage(cfg.train.deepspeed), checkpointing=cfg.train.gradient_checkpointing,
             weights_bytes=0.0, trainable_states_bytes=0.0, model_states_bytes=0.0, activations_bytes={},
             tokens_per_device_step=0, tokens_per_optimizer_step=0, steps_per_epoch=None, train_rows=None,
             **counts)
    _model_states(p, cfg, frozen_bytes)
    _activations(p, cfg, config)
    _steps(p, cfg)
    if gpu_mem_gb is not None and p.total_bytes > gpu_mem_gb * GB:
        raise RadscribeError(
            f"--gpu-mem {gpu_mem_gb:g}: the plan needs {p.total_bytes / GB:.1f} GB per GPU (model states "
            f"{p.model_states_bytes / GB:.1f} + activations {p.activations_bytes[p.checkpointing] / GB:.1f}, "
            f"gradient checkpointing {'on' if p.checkpointing else 'off'}) on {p.gpus} GPU(s); use more GPUs "
            "(--nproc/--nnodes), ZeRO-3, a smaller train.per_device_batch or data.cutoff_len, or model.quantization")
    return p


def _read_config(model_dir: str):
    from transformers import AutoConfig

    path = Path(model_dir).expanduser()
    if not (path / "config.json").is_file():
        raise RadscribeError(f"model.path: {path} has no config.json (pass --model DIR, a model folder; for the "
                             "plan, config.json alone is enough)")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise RadscribeError(f"{path}/config.json: not a config transformers can read ({(str(err).splitlines() or [''])[0]})")


def _meta_model(cfg: TrainConfig, config):
    """The model on the meta device (no storage), LoRA applied exactly as training applies it."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText

    from radscribe.model.lora import apply_lora

    with init_empty_weights():  # LoRA's new layers land on the meta device too
        model = AutoModelForImageTextToText.from_config(config)
        model.requires_grad_(False)
        return apply_lora(model, cfg.lora)


def _parameter_class(name: str) -> str:
    from radscribe.model.lora import HEAD, VISION_PREFIX

    if ".experts." in name:
        return "experts"
    if name.startswith(VISION_PREFIX):
        return "vision"
    if name.startswith(HEAD):
        return "lm_head"
    if "embed_tokens" in name:
        return "embedding"
    if ".self_attn." in name and name.endswith("proj.weight"):
        return "attention"
    if ".mlp." in name and name.endswith("proj.weight"):
        return "dense_mlp"
    return "router_and_norms"


def _parameter_counts(model, cfg: TrainConfig) -> dict:
    import torch

    from radscribe.model.lora import describe

    d = describe(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    by_class: dict[str, int] = {}
    frozen_bytes = 0.0
    weight_bytes = 2 if cfg.train.precision == "bf16" and cfg.lora.enabled else 4  # as radscribe.train loads
    # bitsandbytes turns the language model's Linears into Linear4bit (lora.quantization_config skips the rest)
    quantised = ("attention", "dense_mlp") if cfg.model.quantization else ()
    for name, param in base.named_parameters():
        clean = name.replace(".base_layer", "")
        if "lora_" in clean:
            continue
        kind = _parameter_class(clean)
        by_class[kind] = by_class.get(kind, 0) + param.numel()
        if not param.requires_grad:
            frozen_bytes += param.numel() * (NF4_BYTES if kind in quantised else weight_bytes)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in base.modules()
                  if not isinstance(m, torch.nn.Dropout))
    total = sum(by_class.values())
    return {"total_parameters": total, "by_class": dict(sorted(by_class.items(), key=lambda kv: -kv[1])),
            "trainable_parameters": d["trainable_parameters"], "lora_modules": d["lora_module_count"],
            "lora_expert_parameters": sum(1 for m in base.modules() if hasattr(m, "parameter_name")),  # ParamWrapper
            "largest_layer_parameters": largest,
            "frozen_bytes": frozen_bytes}


def _zero_stage(deepspeed: str | None) -> int | None:
    from radscribe.config import deepspeed_config

    path = deepspeed_config(deepspeed)
    if path is None:
        return None
    stage = json.loads(Path(path).read_text(encoding="utf-8")).get("zero_optimization", {}).get("stage", 0)
    return int(stage)


def _offload(deepspeed: str | None, key: str) -> bool:
    from radscribe.config import deepspeed_config

    zero = json.loads(Path(deepspeed_config(deepspeed)).read_text(encoding="utf-8")).get("zero_optimization", {})
    return (zero.get(key) or {}).get("device", "none") in ("cpu", "nvme")


def _model_states(p: Plan, cfg: TrainConfig, frozen_bytes: float) -> None:
    """Frozen weights, plus trainable weights + gradients + optimizer states, per GPU."""
    t = p.trainable_parameters
    per_node = cfg.train.nproc
    if p.zero_stage in (2, 3):
        from radscribe.quiet import import_deepspeed_quietly

        import_deepspeed_quietly()  # its "Setting accelerator to CPU" banner says nothing about a plan
        offload = _offload(cfg.train.deepspeed, "offload_optimizer")
        if p.zero_stage == 2:
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

            _, gpu = estimate_zero2_model_states_mem_needs(t, num_gpus_per_node=per_node, num_nodes=p.nodes,
                                                           cpu_offload=offload)
            p.weights_bytes = frozen_bytes
            p.notes.append(f"trainable states: DeepSpeed estimate_zero2_model_states_mem_needs({t:,} parameters, "
                           f"{per_node} GPU(s)/node, {p.nodes} node(s), offload_optimizer={offload}) = "
                           "2 B/param bf16 weights + 18 B/param / GPUs (bf16 + fp32 gradients, fp32 master "
                           "weights, Adam m and v); ZeRO-2 keeps the frozen weights whole on every GPU")
        else:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

            offload_params = _offload(cfg.train.deepspeed, "offload_param")
            _, gpu, largest = estimate_zero3_model_states_mem_needs(
                t, p.largest_layer_parameters, num_gpus_per_node=per_node, num_nodes=p.nodes, cpu_offload=offload,
                cpu_offload_params=offload_params, zero_init=True)
            p.weights_bytes = 0.0 if offload_params else frozen_bytes / p.gpus
            p.notes.append(f"trainable states: DeepSpeed estimate_zero3_model_states_mem_needs({t:,} parameters, "
                           f"largest layer {p.largest_layer_parameters:,}, {per_node} GPU(s)/node, {p.nodes} "
                           f"node(s), offload_optimizer={offload}, offload_param={offload_params}) = 4 B x the "
                           "largest layer (gathered for its forward/backward) + 18 B/param / GPUs; ZeRO-3 also "
                           "partitions the frozen weights (1/GPUs each)")
        p.trainable_states_bytes = float(gpu)
        p.notes.append("DeepSpeed's estimators count every parameter they are given as trained with mixed-precision "
                       "Adam; their *_all_live helpers count all of a model's parameters, frozen ones included (a "
                       "full fine-tuning estimate), and on a meta-device model their de-duplication by data_ptr() "
                       "sees a single parameter. So the plan gives them the trainable count and adds the frozen "
                       "weights itself")
    else:
        p.weights_bytes = frozen_bytes
        p.trainable_states_bytes = float(t * ADAM_LORA_BYTES)
        p.notes.append("trainable states without DeepSpeed: 16 B/param (fp32 weight, fp32 gradient, Adam m and v), "
                       "on every GPU" + ("; DDP adds gradient buckets of about 4 B/param" if p.gpus > 1 else ""))
    p.model_states_bytes = p.weights_bytes + p.trainable_states_bytes
    if cfg.model.quantization:
        p.notes.append(f"4-bit: the language model's Linears at {NF4_BYTES:.3f} B/param (nf4 + double "
                       "quantisation); the fused MoE experts, embeddings, lm_head and vision tower stay bf16")


def activation_elements_per_token_layer(text) -> int:
    """Compute-dtype elements one decoder layer keeps per token for backward, without checkpointing.

    Attention (SDPA/flash, so no seq² scores): the two norm inputs, the q/k/v input, the MLP input (4·h); q and k
    before and after their norm + rope (2·q + 2·kv), v (kv), the attention output (q) -- 4h + 3q + 3kv.
    Dense MLP: gate/up output (2·I) and the activation output (I). MoE: the router logits with their fp32 softmax
    (3·E) and, for each of the top-k routed copies, its input (h), gate/up output (2·I) and activation (I).
    """
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    h, q, kv = text.hidden_size, text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim
    attention = 4 * h + 3 * q + 3 * kv
    experts = getattr(text, "num_experts", 0) or 0
    if experts:
        top_k, width = text.num_experts_per_tok, text.moe_intermediate_size
        return attention + 3 * experts + top_k * (h + 3 * width)
    return attention + 3 * text.intermediate_size


def _activations(p: Plan, cfg: TrainConfig, config) -> None:
    text = getattr(config, "text_config", config)
    layers, h, vocab = text.num_hidden_layers, text.hidden_size, text.vocab_size
    tokens = cfg.train.per_device_batch * cfg.data.cutoff_len
    b = 2 if cfg.train.precision == "bf16" else 4
    per_layer = activation_elements_per_token_layer(text) * b
    logits = vocab * (b + LOGIT_BYTES_FP32)
    p.tokens_per_device_step = tokens
    p.activations_bytes = {False: tokens * (layers * per_layer + logits),
                           True: tokens * (layers * h * b + per_layer + logits)}
    p.notes.append(f"activations at {cfg.train.per_device_batch} x {cfg.data.cutoff_len} = {tokens:,} tokens per GPU "
                   "(an upper bound: every sample at cutoff_len): without checkpointing tokens x (layers x "
                   f"{per_layer:,} B + logits {logits:,} B); with it tokens x (layers x hidden x {b} B + one layer "
                   f"recomputed, {per_layer:,} B + logits); per layer and token {per_layer // b:,} elements = "
                   "4h + 3q + 3kv (+ 3I dense | 3E + top_k (h + 3I) MoE), logits = vocab x "
                   f"({b} + {LOGIT_BYTES_FP32}) B; the frozen vision tower keeps none")


def _steps(p: Plan, cfg: TrainConfig) -> None:
    t = cfg.train
    p.tokens_per_optimizer_step = p.tokens_per_device_step * t.grad_accum * p.gpus
    if not cfg.data.dataset:
        return
    from radscribe.data.dataset import read_split

    rows = sum(1 for _ in read_split(cfg.data.dataset, cfg.data.train_split))
    rows = min(rows, cfg.data.max_samples) if cfg.data.max_samples else rows
    p.train_rows = rows
    # the HF Trainer's count: DistributedSampler pads each rank to ceil(rows / world), batches keep the remainder,
    # and a last partial accumulation still steps
    batches = math.ceil(math.ceil(rows / p.gpus) / t.per_device_batch)
    p.steps_per_epoch = max(math.ceil(batches / t.grad_accum), 1)


def format_plan(p: Plan, cfg: TrainConfig) -> str:
    setup = (f"DeepSpeed ZeRO-{p.zero_stage} ({cfg.train.deepspeed})" if p.zero_stage is not None
             else ("DDP" if p.gpus > 1 else "one process"))
    lora = (f"LoRA r {cfg.lora.rank} on {p.lora_modules} Linear modules"
            + (f" and {p.lora_expert_parameters} fused expert parameters" if p.lora_expert_parameters else "")
            if cfg.lora.enabled else "full fine-tuning")
    classes = ", ".join(f"{k} {v / 1e9:.3f} B" for k, v in p.by_class.items())
    steps = (f"{p.steps_per_epoch:,} ({p.train_rows:,} training rows before rejects)" if p.steps_per_epoch
             else "unknown (pass --data DATASET to count its rows)")
    rows = [
        ("frozen weights", p.weights_bytes),
        ("trainable weights + gradients + optimizer states", p.trainable_states_bytes),
        ("model states", p.model_states_bytes),
        ("activations, gradient checkpointing on", p.activations_bytes[True]),
        ("activations, gradient checkpointing off", p.activations_bytes[False]),
        (f"total as configured (checkpointing {'on' if p.checkpointing else 'off'})", p.total_bytes),
    ]
    lines = [
        f"plan for {cfg.model.path} ({p.model_type}, config.json only, nothing loaded): "
        f"{p.total_parameters:,} parameters ({classes})",
        f"{lora}: {p.trainable_parameters:,} trainable ({100 * p.trainable_parameters / p.total_parameters:.4f} %)",
        f"{p.gpus} GPU(s) ({p.nodes} node(s) x {cfg.train.nproc}), {setup}, {cfg.train.precision}, per-device batch "
        f"{cfg.train.per_device_batch} x accumulation {cfg.train.grad_accum}, cutoff {cfg.data.cutoff_len}"
        + (f", model.quantization={cfg.model.quantization}" if cfg.model.quantization else ""),
        "per GPU (GB = 1e9 bytes):",
        *(f"  {label:<52} {value / GB:9.2f}" for label, value in rows),
        f"tokens per optimizer step: up to {p.tokens_per_optimizer_step:,} ({cfg.train.per_device_batch} x "
        f"{cfg.data.cutoff_len} x {cfg.train.grad_accum} x {p.gpus} GPUs); steps per epoch: {steps}",
        *(f"note: {n}" for n in p.notes),
    ]
    return "\n".join(lines)
