"""Merge a trained adapter into its base model and write a standalone Hugging Face model folder.

Run as: radscribe export --model BASE --adapter RUN OUT [--quantize 4bit] [--dtype bf16]

The folder holds the merged weights (safetensors shards), config.json, generation_config.json, the processor
(tokenizer, image processor, chat template) and nothing of PEFT, so `AutoModelForImageTextToText` and vLLM load
it like a released checkpoint. LoRA on MoE experts (PEFT `target_parameters`) is merged too, and the fused
expert tensors are written in the released layout, gate_up_proj (E, H, 2I) and down_proj (E, I, H):
transformers' `save_pretrained` writes its in-memory layout (E, 2I, H) / (E, H, I), which transformers' own
loader and DeepSpeed ZeRO-3 would then transpose a second time.

`--quantize 4bit` then reloads the merged folder through the one model loader with bitsandbytes nf4 (double
quant, bf16 compute) and saves it pre-quantised: config.json records the `quantization_config`, the linear
layers are stored packed, and the folder loads in 4-bit with a plain `from_pretrained`. bitsandbytes does not
quantise the 3-D MoE expert tensors, so they stay bf16 (docs/serving.md has what that means on a 24 GB card).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from radscribe.errors import RadscribeError
from radscribe.quiet import import_deepspeed_quietly

# Files of the base folder that describe the processor and must travel with the export when the processor
# object cannot write them itself (the video processor config, on machines without torchvision).
_PROCESSOR_EXTRAS = ("video_preprocessor_config.json", "preprocessor_config.json", "chat_template.jinja",
                     "chat_template.json")


@dataclass
class ExportConfig:
    """What `radscribe export` merges and where it writes (the fields are `export()`'s arguments)."""

    model_dir: str
    """Base model folder (as downloaded, or written by `radscribe tiny-model`)."""
    adapter: str
    """A `radscribe train` run folder or a PEFT adapter folder."""
    out_dir: str
    """New (or empty) folder for the merged model."""
    quantize: Literal["4bit"] | None = None
    """`4bit` saves the merged model pre-quantised in bitsandbytes nf4 (linear layers; experts stay bf16)."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Merge dtype; auto keeps the base checkpoint's."""
    device: str | None = "cpu"
    """Where to merge: cpu or cuda."""
    max_shard_size: str = "5GB"
    """Largest safetensors shard written."""


def export(model_dir: str | Path, adapter: str | Path, out_dir: str | Path, quantize: str | None = None,
           dtype: str = "auto", device: str | None = "cpu", max_shard_size: str = "5GB") -> Path:
    """Merge `adapter` into `model_dir` and write the standalone folder `out_dir`; returns its path."""

    from radscribe.config import save_config
    from radscribe.model.load import check_model_dir, load_model, quantization_config

    base = check_model_dir(model_dir)
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        raise RadscribeError(f"output folder {out} is not empty; choose a new folder")
    if quantize not in (None, "4bit"):
        raise RadscribeError(f"--quantize {quantize!r} is not supported; use 4bit or leave it out")
    if quantize:
        quantization_config(quantize)  # fails early, naming the extra, when bitsandbytes is missing

    print(f"radscribe export: loading {base} + adapter {adapter}")
    model, processor = load_model(base, adapter=adapter, dtype=dtype, device=device)
    merged = model.merge_and_unload()
    hidden = _text_config(merged.config).hidden_size
    out.mkdir(parents=True, exist_ok=True)
    import_deepspeed_quietly()  # save_pretrained imports it (through accelerate) whenever it is installed
    merged.save_pretrained(out, max_shard_size=max_shard_size)
    del model, merged
    processor.save_pretrained(out)
    for name in _PROCESSOR_EXTRAS:
        if (base / name).is_file() and not (out / name).exists():
            shutil.copy2(base / name, out / name)
    moved = to_released_expert_layout(out, hidden)
    if quantize:
        _quantize_in_place(out, quantize, device, max_shard_size)
        to_released_expert_layout(out, hidden)
    save_config(ExportConfig(str(model_dir), str(adapter), str(out_dir), quantize, dtype, device, max_shard_size),
                out / "export_config.yaml")
    print(f"radscribe export: wrote {out} ({moved} expert tensors in the released layout"
          f"{', linear layers nf4' if quantize else ''})")
    return out


def _quantize_in_place(out: Path, quantize: str, device: str | None, max_shard_size: str) -> None:
    """Reload the merged folder quantised by the one loader and replace its weights with the packed ones."""
    from radscribe.model.load import load_model

    # bf16 compute: the dtype a GPU user wants recorded; CPU bitsandbytes runs it too.
    quantized, _ = load_model(out, dtype="bf16", quantization=quantize, device=device)
    for shard in list(out.glob("*.safetensors")) + list(out.glob("*.safetensors.index.json")):
        shard.unlink()
    quantized.save_pretrained(out, max_shard_size=max_shard_size)


def _text_config(config):
    return getattr(config, "text_config", config)


def to_released_expert_layout(folder: str | Path, hidden_size: int) -> int:
    """Rewrite fused expert tensors of a saved folder into the released layout; returns how many were moved.

    The released layout has the hidden size as dim 1 of gate_up_proj and dim 2 of down_proj; a tensor already
    in that layout is left alone (so a transformers that saves the released layout needs no change here).
    Shards are rewritten one at a time, keeping memory to one shard.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    moved = 0
    shards = sorted(Path(folder).glob("*.safetensors"))
    for shard in tqdm(shards, desc="expert layout", unit="shard", disable=len(shards) < 2):
        with safe_open(str(shard), framework="pt") as f:
            keys = list(f.keys())
            metadata = f.metadata() or {"format": "pt"}
            if not any(_expert_kind(k) for k in keys):
                continue
            tensors = {k: f.get_tensor(k) for k in keys}
        for key, tensor in tensors.items():
            kind = _expert_kind(key)
            if kind == "gate_up_proj" and tensor.shape[1] != hidden_size:
                tensors[key] = tensor.transpose(1, 2).contiguous()  # (E, 2I, H) -> (E, H, 2I)
                moved += 1
            elif kind == "down_proj" and tensor.shape[2] != hidden_size:
                tensors[key] = tensor.transpose(1, 2).contiguous()  # (E, H, I) -> (E, I, H)
                moved += 1
        save_file(tensors, str(shard), metadata=metadata)
    return moved


def _expert_kind(key: str) -> str | None:
    for kind in ("gate_up_proj", "down_proj"):
        if key.endswith(f"mlp.experts.{kind}"):
            return kind
    return None
