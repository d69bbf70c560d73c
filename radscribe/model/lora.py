"""What LoRA targets: "all" resolved to module names, expert LoRA for MoE, and the 4-bit (QLoRA) settings.

    from peft import get_peft_model
    from radscribe.model import lora
    model, processor = load_model(base, quantization="4bit", trainable=True)       # or no quantization
    model = get_peft_model(model, lora.build_lora_config(model, rank=8, alpha=16, experts=True))
    print(lora.describe(model))     # what "all" resolved to + trainable parameter counts (train logs it)

`target="all"` follows LLaMA-Factory's `lora_target: all`: every `nn.Linear` of the language model except
`lm_head`; the vision tower and its merger stay frozen unless `vision=True` / `merger=True`. Targets are full
module names, not suffixes, because Qwen2.5-VL's vision blocks reuse the language model's names
(`mlp.gate_proj`, `mlp.up_proj`, `mlp.down_proj`): a suffix list would silently put LoRA on the tower too.
MoE experts are fused 3-D parameters, not Linears, so "all" never reaches them; `experts=True` adds them
through PEFT's `target_parameters`. The router (`mlp.gate`) is not a Linear and is never targeted.
PEFT cannot apply dropout to a fused parameter (its ParamWrapper refuses `lora_dropout != 0`), so with expert LoRA
`apply_lora` keeps the dropout on the Linear LoRA modules and 0 on the experts (`_dropout_on_linear_lora`).
QLoRA (`prepare_qlora_base`) freezes the 4-bit base without PEFT's blanket fp32 upcast, so the unquantised MoE
experts stay bf16.
"""

from __future__ import annotations

import importlib.util
from collections import defaultdict

from radscribe.errors import RadscribeError

# Where the parts of a Qwen-VL model live, as transformers 5 names them (Qwen3-VL, Qwen3-VL-MoE, Qwen2.5-VL).
VISION_PREFIX = "model.visual."
MERGER_KEYS = (".merger.", ".deepstack_merger_list.")
HEAD = "lm_head"


def _unwrap(model):
    # a PeftModel wraps the transformers model twice (PeftModel -> LoraModel -> model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _part(name: str) -> str:
    """"language_model", "merger", "vision" or "head" for a module name of the unwrapped model."""
    if name == HEAD or name.startswith(HEAD + "."):
        return "head"
    if name.startswith(VISION_PREFIX):
        return "merger" if any(k in name + "." for k in MERGER_KEYS) else "vision"
    return "language_model"


def _linear_names(model) -> dict[str, list[str]]:
    import torch

    parts: dict[str, list[str]] = defaultdict(list)
    for name, module in _unwrap(model).named_modules():
        # bitsandbytes' Linear4bit subclasses nn.Linear, so 4-bit bases resolve the same way
        if isinstance(module, torch.nn.Linear):
            parts[_part(name)].append(name)
    return parts


def lora_targets(model, target: str | list[str] = "all", vision: bool = False, merger: bool = False) -> list[str]:
    """Full names of the Linear modules that get LoRA.

    target: "all", or a list of module-name suffixes (e.g. ["q_proj", "v_proj"]) matched inside the parts
    that are enabled (the language model always; the vision tower / merger when asked).
    """
    parts = _linear_names(model)
    enabled = ["language_model"] + (["vision"] if vision else []) + (["merger"] if merger else [])
    candidates = [name for part in enabled for name in parts.get(part, [])]
    if target == "all":
        chosen = candidates
    else:
        if isinstance(target, str):
            target = [t.strip() for t in target.split(",") if t.strip()]
        unknown = [t for t in target if not any(n == t or n.endswith("." + t) for n in candidates)]
        if unknown:
            short = sorted({n.rsplit(".", 1)[-1] for n in candidates})
            raise RadscribeError(f"lora target(s) {', '.join(unknown)} match no Linear of the enabled parts "
                                 f"({', '.join(enabled)}); known names: {', '.join(short)}, or all")
        chosen = [n for n in candidates if any(n == t or n.endswith("." + t) for t in target)]
    return sorted(chosen)


def expert_parameters(model) -> list[str]:
    """Full names of the fused 3-D MoE expert weights of the language model (empty for dense models)."""
    names = []
    for module_name, module in _unwrap(model).named_modules():
        if not module_name.endswith(".experts") or _part(module_name) != "language_model":
            continue
        for param_name, param in module.named_parameters(recurse=False):
            # Under ZeRO-3 every parameter is a 1-D placeholder; the real shape is in `ds_shape`.
            if len(getattr(param, "ds_shape", param.shape)) == 3:
                names.append(f"{module_name}.{param_name}")
    return sorted(names)


def build_lora_config(model, rank: int = 8, alpha: int = 16, dropout: float = 0.0,
                      target: str | list[str] = "all", vision: bool = False, merger: bool = False,
                      experts: bool = False):
    """A peft LoraConfig for `model`: Linear targets as `lora_targets` resolves them, plus the MoE experts
    through `target_parameters` when `experts=True` (an error on a dense model, where there are none).

    With experts the config's `lora_dropout` is 0 whatever `dropout` says: PEFT refuses any other value for a
    fused parameter, at wrapping and again when the saved adapter is reloaded. `apply_lora` puts `dropout` back on
    the Linear LoRA modules for training."""
    from peft import LoraConfig

    modules = lora_targets(model, target, vision=vision, merger=merger)
    params = expert_parameters(model) if experts else []
    if experts and not params:
        raise RadscribeError("lora experts: true, but the model has no MoE expert weights "
                             "(use a Qwen3-VL-MoE model, or set lora.experts=false)")
    return LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0 if params else dropout, bias="none", task_type="CAUSAL_LM",
        target_modules=modules, target_parameters=params or None,
    )


def apply_lora(model, section):
    """Wrap `model` in a PEFT LoRA model per a `TrainConfig.lora` section, or leave every weight trainable
    (`enabled: false`, full fine-tuning)."""
    if not section.enabled:
        model.requires_grad_(True)
        return model
    from peft import get_peft_model

    from radscribe.quiet import peft_notices

    target = "all" if section.target == ["all"] else section.target
    config = build_lora_config(model, rank=section.rank, alpha=section.alpha, dropout=section.dropout, target=target,
                               vision=section.vision_tower, merger=section.merger, experts=section.experts)
    with peft_notices():
        peft_model = get_peft_model(model, config)
    if section.experts and section.dropout:
        count = _dropout_on_linear_lora(peft_model, section.dropout)
        from radscribe import dist

        dist.print0(f"lora.dropout {section.dropout} on the {count} Linear LoRA modules, 0 on the MoE expert "
                    "parameters (PEFT cannot apply dropout to a fused parameter); adapter_config.json records "
                    "lora_dropout 0, which is what reloading it needs", "radscribe train")
    return peft_model


def _dropout_on_linear_lora(peft_model, p: float) -> int:
    """Give every Linear LoRA module of the (single) adapter an `nn.Dropout(p)`; returns how many.

    PEFT's LoraConfig has one `lora_dropout` for the whole adapter and its ParamWrapper (LoRA on a fused expert
    parameter) raises for any value but 0, because the input cannot be factored out of the merged delta
    (peft/tuners/lora/layer.py, ParamWrapper.__init__; rank_pattern/alpha_pattern have no dropout counterpart).
    The adapter is therefore built with 0 and each Linear LoRA layer's dropout slot -- the `lora_dropout`
    ModuleDict PEFT itself fills with Identity for p == 0 -- gets the Dropout it would have built for p > 0.
    """
    import torch
    from peft.tuners.lora import Linear as LoraLinear

    count = 0
    for module in peft_model.modules():
        if isinstance(module, LoraLinear):
            for adapter in module.lora_dropout:
                module.lora_dropout[adapter] = torch.nn.Dropout(p=p)
            count += 1
    return count


def prepare_qlora_base(model):
    """Freeze a bitsandbytes 4-bit base for LoRA training, keeping every unquantised weight in its loaded dtype.

    This replaces peft's `prepare_model_for_kbit_training`, whose blanket cast of every non-4-bit parameter to fp32
    is wrong for the MoE: bitsandbytes quantises `nn.Linear` only, so the 3-D fused experts (93 % of
    Qwen3-VL-30B-A3B) stay unquantised and that cast doubles them (about 116 GB against 58 GB in bf16). Nothing
    of the frozen base needs fp32 here: the upcast guards fp16 activations against overflow, and bf16 has fp32's
    exponent range; RMSNorm already computes in fp32 internally; frozen weights receive no updates to lose to
    rounding; and fp32 norms alone would turn the residual stream fp32 and break the bf16 expert matmuls outside
    autocast. The LoRA weights are fp32 anyway (PEFT's adapter upcast), and LLaMA-Factory's QLoRA keeps the same
    default (`upcast_layernorm: false`). Gradient checkpointing's input gradients are the trainer's business
    (radscribe.train enables them with checkpointing).
    """
    model.requires_grad_(False)
    experts = [p for name, p in model.named_parameters() if ".experts." in name and p.ndim == 3]
    if experts:
        from radscribe import dist

        dtypes = sorted({str(p.dtype).replace("torch.", "") for p in experts})
        quantised = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")
        dist.print0(f"QLoRA: {quantised} Linear layers in 4-bit nf4; the fused MoE experts "
                    f"({sum(p.numel() for p in experts):,} parameters) stay {'/'.join(dtypes)}, unquantised "
                    "(bitsandbytes quantises nn.Linear only) and not upcast to fp32", "radscribe")
    return model


def _short(names) -> list[str]:
    # "model.language_model.layers.3.self_attn.q_proj" -> "self_attn.q_proj": the part that is the same per layer
    out = set()
    for name in names:
        pieces = name.split(".")
        digits = [i for i, p in enumerate(pieces) if p.isdigit()]
        out.add(".".join(pieces[digits[-1] + 1:]) if digits else name)
    return sorted(out)


def describe(model) -> dict:
    """What LoRA sits on (per model part, as per-layer names) and the trainable/total parameter counts.

    Works for a PeftModel (LoRA) and for a plain model (full-parameter training: what requires grad).
    """
    base = _unwrap(model)
    lora_modules: dict[str, list[str]] = defaultdict(list)
    lora_params: list[str] = []
    for name, module in base.named_modules():
        if hasattr(module, "lora_A") and len(module.lora_A):
            clean = name.replace(".base_layer", "")
            if hasattr(module, "parameter_name"):  # a PEFT ParamWrapper around a fused expert parameter
                lora_params.append(f"{clean}.{module.parameter_name}")
            else:
                lora_modules[_part(clean)].append(clean)
    if hasattr(model, "get_nb_trainable_parameters"):
        # counts 4-bit packed weights at their real size
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable = sum(p.numel() for p in base.parameters() if p.requires_grad)
        total = sum(p.numel() for p in base.parameters())
    return {
        "lora_modules": {part: _short(names) for part, names in sorted(lora_modules.items())},
        "lora_module_count": sum(len(v) for v in lora_modules.values()),
        "lora_expert_parameters": _short(lora_params),
        "trainable_parameters": int(trainable),
        "total_parameters": int(total),
        "trainable_percent": round(100.0 * trainable / max(total, 1), 4),
    }


def quantization_config(quantization: str | None, compute_dtype=None):
    """bitsandbytes settings for `quantization` ("4bit" = nf4 + double quantisation, as QLoRA), or None."""
    if quantization is None:
        return None
    if quantization != "4bit":
        raise RadscribeError(f"quantization {quantization!r} is not supported; use 4bit or leave it unset")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RadscribeError("quantization: 4bit needs bitsandbytes: pip install 'radscribe[qlora]'")
    import torch
    from transformers import BitsAndBytesConfig

    # The vision tower (with its merger) and lm_head stay in full precision, as QLoRA recipes for VLMs do: they
    # are a small share of the weights and quantising them costs the most quality. bitsandbytes cannot quantise
    # the 3-D MoE expert parameters at all (tests/model/test_lora.py), so an MoE base stays large in 4-bit mode.
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype or torch.float32,
        llm_int8_skip_modules=[HEAD, VISION_PREFIX.rstrip(".")],
    )
