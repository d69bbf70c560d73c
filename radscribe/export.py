"""Merge a trained adapter into its base model and write a standalone Hugging Face model folder.

Run as: radscribe export --model BASE --adapter RUN OUT [--quantize 4bit] [--dtype bf16]
        radscribe export --format gguf|gguf-lora ... / --dry-run --format gguf   (llama.cpp: radscribe/interop/gguf.py)

The folder is the base folder with its weights replaced by the merged ones: every other file of the base
(config.json, generation_config.json, tokenizer files, preprocessor and video preprocessor configs, chat template,
licence) is copied byte for byte, and config.json changes only where the merge changes something (the stored
dtype, and the `quantization_config` of a 4-bit export); the image processor's `size` is set to the pixel limits
the run was trained with (radscribe.model.pixels), so every loader sizes images as training did. So an export of a downloaded Qwen3-VL folder is laid out
as that download is and loads wherever the download loads (transformers 4.57, the transformers 5.16-5.20 that
vLLM 0.33 pins, our 5.24; tests/test_export_compat.py). transformers 5.24's own serialisation of those files
does not: it writes `rope_parameters` where 4.57 reads `rope_scaling` (the mrope settings are lost there) and a
list-form `extra_special_tokens` that 4.57's tokenizer cannot read. Nothing of PEFT is left in the folder.

LoRA on MoE experts (PEFT `target_parameters`) is merged too, and the fused expert tensors are written in the
released layout, gate_up_proj (E, H, 2I) and down_proj (E, I, H): transformers' `save_pretrained` writes its
in-memory layout (E, 2I, H) / (E, H, I), which transformers' own loader and DeepSpeed ZeRO-3 would then
transpose a second time. When moe_intermediate_size equals the hidden size (or half of it), the two layouts have
the same shape: the export still writes the released one, radscribe's loader reads it right, but a plain
transformers 5.24 `from_pretrained` keeps such a tensor untransposed (no published Qwen3-VL-MoE has that shape;
radscribe.model.load.undo_unconverted_square_experts).

`--quantize 4bit` then reloads the merged folder through the one model loader with bitsandbytes nf4 (double
quant, bf16 compute) and saves it pre-quantised: config.json records the `quantization_config`, the linear
layers are stored packed, and the folder loads in 4-bit with a plain `from_pretrained`. bitsandbytes does not
quantise the 3-D MoE expert tensors, so they stay bf16 (docs/serving.md has what that means on a 24 GB card).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from radscribe.errors import RadscribeError
from radscribe.quiet import import_deepspeed_quietly

WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")
"""The files a merge replaces; every other file of the base folder is copied into the export unchanged."""


FORMATS = ("hf", "gguf", "gguf-lora")


@dataclass
class ExportConfig:
    """What `radscribe export` merges and where it writes (`run_export(cfg)` checks the combination)."""

    model_dir: str
    """Base model folder (as downloaded, or written by `radscribe tiny-model`); with dry_run, a folder holding
    just its config.json is enough."""
    adapter: str | None = None
    """A `radscribe train` run folder or a PEFT adapter folder (format gguf without it converts the base alone)."""
    out_dir: str | None = None
    """New (or empty) folder for the export (not with dry_run)."""
    format: Literal["hf", "gguf", "gguf-lora"] = "hf"
    """hf: merged safetensors folder; gguf: llama.cpp text GGUF + mmproj; gguf-lora: the adapter alone as GGUF."""
    quantize: Literal["4bit", "f16", "q8_0", "q4_k_m"] | None = None
    """hf: 4bit = bitsandbytes nf4, pre-quantised (linear layers; experts stay bf16); gguf: f16, q8_0 or q4_k_m
    by llama-quantize (unset: q4_k_m)."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] | None = None
    """Merge dtype (unset: auto, the base checkpoint's)."""
    device: str | None = None
    """Where to merge: cpu or cuda (unset: cpu)."""
    max_shard_size: str = "5GB"
    """Largest safetensors shard written (format hf)."""
    dry_run: bool = False
    """format gguf: print the GGUF file sizes, the KV cache and the GPU fit from config.json alone; writes nothing."""
    ctx: int | None = None
    """dry_run: context length whose KV cache is counted (unset: 8192)."""
    gpu_mem: float | None = None
    """dry_run: GPU memory in GiB to check the fit against."""
    bits_from: str | None = None
    """dry_run: a format gguf export folder whose measured bits per weight replace the packaged measurements."""


def run_export(cfg: ExportConfig) -> Path | None:
    """The `radscribe export` stage: refuse settings that cannot take effect, then export (or print the plan)."""
    _check(cfg)
    if cfg.dry_run:
        from radscribe.interop.gguf import format_plan, plan

        print(format_plan(plan(cfg.model_dir, cfg.quantize or "q4_k_m", ctx=8192 if cfg.ctx is None else cfg.ctx,
                               gpu_mem_gib=cfg.gpu_mem, bits_from=cfg.bits_from)))
        return None
    return export(cfg.model_dir, cfg.adapter, cfg.out_dir, quantize=cfg.quantize, dtype=cfg.dtype or "auto",
                  device=cfg.device or "cpu", max_shard_size=cfg.max_shard_size, format=cfg.format)


def _check(cfg: ExportConfig) -> None:
    plan_only = {"ctx": cfg.ctx, "gpu_mem": cfg.gpu_mem, "bits_from": cfg.bits_from}
    if not cfg.dry_run:
        given = [f"--{k.replace('_', '-')}" for k, v in plan_only.items() if v is not None]
        if given:
            raise RadscribeError(f"{', '.join(given)} only apply with --dry-run")
        if not cfg.out_dir:
            raise RadscribeError("OUT is required (out_dir): the new folder for the export")
        if (cfg.format == "gguf-lora" or cfg.adapter is None) and (cfg.dtype or cfg.device):
            raise RadscribeError("--dtype/--device set how an adapter is merged; "
                                 f"{'--format gguf-lora' if cfg.format == 'gguf-lora' else 'without --adapter'} "
                                 "merges nothing")
        return
    if cfg.format != "gguf":
        raise RadscribeError(f"--dry-run plans a --format gguf export (not {cfg.format}); add --format gguf")
    extra = [name for name, value in (("OUT", cfg.out_dir), ("--adapter", cfg.adapter), ("--dtype", cfg.dtype),
                                      ("--device", cfg.device)) if value is not None]
    if extra:
        raise RadscribeError(f"--dry-run reads only --model's config.json; {', '.join(extra)} would have no effect "
                             "(leave it out)")


def export(model_dir: str | Path, adapter: str | Path | None, out_dir: str | Path, quantize: str | None = None,
           dtype: str = "auto", device: str | None = "cpu", max_shard_size: str = "5GB", format: str = "hf") -> Path:
    """Merge `adapter` into `model_dir` and write the standalone folder `out_dir`; returns its path.

    format "gguf" writes llama.cpp's GGUF pair instead (`quantize` f16, q8_0 or q4_k_m, default q4_k_m; the base
    alone when `adapter` is None), "gguf-lora" the adapter alone as a GGUF LoRA.
    """
    if format not in FORMATS:
        raise RadscribeError(f"--format {format!r} is not an export format; choose one of {', '.join(FORMATS)}")
    if format == "gguf":
        from radscribe.interop.gguf import export_gguf

        return export_gguf(model_dir, adapter, out_dir, quantize or "q4_k_m", dtype=dtype, device=device)
    if adapter is None:
        raise RadscribeError(f"--adapter is required for --format {format} (only --format gguf converts a base "
                             "model alone)")
    if format == "gguf-lora":
        if quantize is not None:
            raise RadscribeError(f"--quantize {quantize} has no effect on --format gguf-lora (the LoRA is written "
                                 "in f16); leave it out")
        from radscribe.interop.gguf import export_gguf_lora

        return export_gguf_lora(model_dir, adapter, out_dir)
    return _export_hf(model_dir, adapter, out_dir, quantize, dtype, device, max_shard_size)


def _export_hf(model_dir, adapter, out_dir, quantize, dtype, device, max_shard_size) -> Path:
    from radscribe.config import save_config
    from radscribe.model.load import check_model_dir, load_model, quantization_config
    from radscribe.model.pixels import pixel_limits, write_limits

    base = check_model_dir(model_dir)
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        raise RadscribeError(f"output folder {out} is not empty; choose a new folder")
    if quantize not in (None, "4bit"):
        raise RadscribeError(f"--quantize {quantize!r} is a GGUF type (add --format gguf); the merged safetensors "
                             "export takes 4bit or nothing")
    if quantize:
        quantization_config(quantize)  # fails early, naming the extra, when bitsandbytes is missing

    print(f"radscribe export: loading {base} + adapter {adapter}")
    merged, processor = load_model(base, adapter=adapter, dtype=dtype, device=device)  # merged at inference
    hidden = _text_config(merged.config).hidden_size
    out.mkdir(parents=True, exist_ok=True)
    copy_published_files(base, out)
    _write_weights(merged, out, max_shard_size)
    set_stored_dtype(out / "config.json", merged.dtype)
    del merged
    write_limits(out, *pixel_limits(processor))  # the run's image policy, in every processor file
    moved = to_released_expert_layout(out, hidden)
    if quantize:
        _quantize_in_place(out, quantize, device, max_shard_size)
        to_released_expert_layout(out, hidden)
    save_config(ExportConfig(str(model_dir), str(adapter), str(out_dir), quantize=quantize, dtype=dtype,
                             device=device, max_shard_size=max_shard_size), out / "export_config.yaml")
    print(f"radscribe export: wrote {out} ({moved} expert tensors in the released layout"
          f"{', linear layers nf4' if quantize else ''})")
    return out


def copy_published_files(base: Path, out: Path) -> list[str]:
    """Copy every file of the base folder except its weights into `out`, byte for byte; returns their names.

    Hidden entries (`.cache/` of a hub download, `.gitattributes`) and sub-folders are not part of the model."""
    copied = []
    for source in sorted(base.iterdir()):
        if source.is_file() and not source.name.startswith(".") and not _is_weight_file(source.name):
            shutil.copy2(source, out / source.name)
            copied.append(source.name)
    return copied


def _is_weight_file(name: str) -> bool:
    return any(Path(name).match(pattern) for pattern in WEIGHT_FILES)


def _write_weights(model, out: Path, max_shard_size: str) -> dict:
    """Save `model`'s weights into `out` (shards + index) and return the config.json transformers wrote with them.

    `save_pretrained` also writes its own config.json and generation_config.json; those stay in a staging folder
    that is removed, so the base's published files are not replaced by this transformers' serialisation."""
    staging = out / ".merge-staging"
    shutil.rmtree(staging, ignore_errors=True)
    for old in out.iterdir():
        if old.is_file() and _is_weight_file(old.name):
            old.unlink()
    import_deepspeed_quietly()  # save_pretrained imports it (through accelerate) whenever it is installed
    model.save_pretrained(staging, max_shard_size=max_shard_size)
    for written in staging.iterdir():
        if _is_weight_file(written.name):
            written.rename(out / written.name)
    saved_config = json.loads((staging / "config.json").read_text(encoding="utf-8"))
    shutil.rmtree(staging)
    return saved_config


def set_stored_dtype(config_file: Path, dtype, quantization_config: dict | None = None) -> bool:
    """Make config.json say the dtype the weights are stored in (and their quantisation); returns whether it changed.

    Only the values change: every `dtype` / `torch_dtype` key the file already has (top level or a sub-config, as
    the base wrote it), and `quantization_config` at the top level. The file is rewritten only when a value
    differs, so a bf16 merge of a bf16 base leaves the base's config.json byte for byte."""
    name = str(dtype).removeprefix("torch.")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    changed = False
    for section in [config, *(v for v in config.values() if isinstance(v, dict))]:
        for key in ("dtype", "torch_dtype"):
            if isinstance(section.get(key), str) and section[key] != name:
                section[key], changed = name, True
    if quantization_config is not None and config.get("quantization_config") != quantization_config:
        config["quantization_config"], changed = quantization_config, True
    if changed:
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return changed


def _quantize_in_place(out: Path, quantize: str, device: str | None, max_shard_size: str) -> None:
    """Reload the merged folder quantised by the one loader and replace its weights with the packed ones."""
    from radscribe.model.load import load_model

    # bf16 compute: the dtype a GPU user wants recorded; CPU bitsandbytes runs it too.
    quantized, _ = load_model(out, dtype="bf16", quantization=quantize, device=device)
    saved_config = _write_weights(quantized, out, max_shard_size)
    set_stored_dtype(out / "config.json", quantized.dtype, saved_config["quantization_config"])


def _text_config(config):
    return getattr(config, "text_config", config)


def to_released_expert_layout(folder: str | Path, hidden_size: int) -> int:
    """Rewrite fused expert tensors of a saved folder into the released layout; returns how many were moved.

    `folder` was just written by transformers' `save_pretrained`, i.e. in its in-memory layout. The released
    layout has the hidden size as dim 1 of gate_up_proj and dim 2 of down_proj; a tensor already in that layout is
    left alone (so a transformers that saves the released layout needs no change here). A square tensor (dims 1
    and 2 both the hidden size: moe_intermediate_size == hidden_size for down_proj, twice it for gate_up_proj)
    looks the same in both layouts, so it is taken as what save_pretrained wrote and transposed: leaving it would
    store the in-memory layout under the released one's name, which llama.cpp's converter then transposes into
    the wrong experts. Shards are rewritten one at a time, keeping memory to one shard.
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
            if kind is None:
                continue
            hidden_dim = 1 if kind == "gate_up_proj" else 2  # released (E, H, 2I) / (E, I, H)
            if tensor.shape[hidden_dim] != hidden_size or tensor.shape[1] == tensor.shape[2]:
                tensors[key] = tensor.transpose(1, 2).contiguous()  # (E, 2I, H) / (E, H, I) -> released
                moved += 1
        save_file(tensors, str(shard), metadata=metadata)
    return moved


def _expert_kind(key: str) -> str | None:
    for kind in ("gate_up_proj", "down_proj"):
        if key.endswith(f"mlp.experts.{kind}"):
            return kind
    return None
