"""GGUF export through llama.cpp's own tools, and the memory arithmetic of a GGUF deployment.

Run as: radscribe export --format gguf --model BASE --adapter RUN OUT [--quantize f16|q8_0|q4_k_m]
        radscribe export --format gguf-lora --model BASE --adapter RUN OUT
        radscribe export --dry-run --format gguf --quantize q4_k_m --model DIR [--ctx 8192] [--gpu-mem 24]

`--format gguf` merges the adapter (MoE experts included) through `radscribe.export`, which writes the released
expert layout that llama.cpp's converter expects, then runs llama.cpp's `convert_hf_to_gguf.py` twice (the text
model, and `--mmproj` for the vision tower and its mergers, both f16) and `llama-quantize` for q8_0 / q4_k_m.
The folder gets `model-<quant>.gguf`, `mmproj-f16.gguf`, a README with the run commands, an Ollama Modelfile,
`gguf.json` (what was written, with the bits per weight of every tensor class as measured in the files) and
`llama.cpp.log`. `--format gguf-lora` converts the adapter alone (`convert_lora_to_gguf.py`) for users who keep a
base GGUF; llama.cpp applies LoRA to the text model only and its converter cannot map PEFT's fused-expert
LoRA, so adapters with expert or vision-tower LoRA are refused (export them merged).

The dry run needs only the model's config.json: the model is built on the meta device for its parameter shapes,
each tensor is given the GGUF name llama.cpp's own name map (the `gguf` package) gives it, and the bits per
weight of its tensor class are the ones measured on a tiny export's files (`gguf_bits.json`, written by
`bench/gguf_export.py`; `--bits-from EXPORT` uses another export's gguf.json). llama-quantize keeps some tensors at
higher precision (output Q6_K, half the attn_v/ffn_down layers Q6_K in q4_k_m, norms and the router F32), so one
bits-per-weight number per quantisation would be wrong; a class measured in a file carries its real mix.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from radscribe.errors import RadscribeError
from radscribe.interop import llamacpp

# --quantize value -> llama-quantize's type name
QUANTS = {"f16": "F16", "q8_0": "Q8_0", "q4_k_m": "Q4_K_M"}
MMPROJ_FILE = "mmproj-f16.gguf"
LORA_FILE = "lora-f16.gguf"
MANIFEST = "gguf.json"
LOG = "llama.cpp.log"
PROCESSOR_DIR = "processor"
BITS_TABLE = Path(__file__).with_name("gguf_bits.json")
_GIB = 1024 ** 3


def model_file(quantize: str) -> str:
    return f"model-{quantize}.gguf"


def _check_quantize(quantize: str) -> None:
    if quantize not in QUANTS:
        raise RadscribeError(f"--quantize {quantize!r} is not a GGUF type radscribe exports; "
                             f"choose one of {', '.join(QUANTS)}")


def _require_python_deps() -> None:
    # llama.cpp's converter imports sentencepiece even for BPE vocabularies; `gguf` reads the files back.
    missing = [m for m in ("sentencepiece", "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        raise RadscribeError(f"GGUF export needs {' and '.join(missing)}: pip install 'radscribe[gguf]'")


def _new_folder(out_dir: str | Path) -> Path:
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        raise RadscribeError(f"output folder {out} is not empty; choose a new folder")
    return out


# --- export --------------------------------------------------------------------------------------------------

def export_gguf(model_dir: str | Path, adapter: str | Path | None, out_dir: str | Path, quantize: str = "q4_k_m",
                dtype: str = "auto", device: str | None = "cpu") -> Path:
    """Merge `adapter` into `model_dir` (or take the base as it is when `adapter` is None) and write the GGUF
    pair, README, Modelfile and gguf.json into `out_dir`; returns the folder."""
    from radscribe.export import export
    from radscribe.model.load import check_model_dir

    _check_quantize(quantize)
    base = check_model_dir(model_dir)
    out = _new_folder(out_dir)
    tools = llamacpp.find()  # fail before an hour of merging, not after
    _require_python_deps()
    out.mkdir(parents=True, exist_ok=True)
    merged_tmp = None
    try:
        if adapter is not None:
            merged_tmp = Path(tempfile.mkdtemp(prefix=".merged-", dir=out))
            merged = export(base, adapter, merged_tmp / "hf", dtype=dtype, device=device)
        else:
            merged = base
        files = convert(merged, out, quantize, tools)
        copy_processor(merged, out / PROCESSOR_DIR)
    finally:
        if merged_tmp is not None:
            shutil.rmtree(merged_tmp, ignore_errors=True)
    _write_manifest(out, base, adapter, quantize, files)
    _write_readme(out, merged if adapter is None else base, quantize, files)
    _save_config(out, model_dir, adapter, format="gguf", quantize=quantize, dtype=dtype, device=device)
    print(f"radscribe export: wrote {out}: " + ", ".join(f"{p.name} ({p.stat().st_size / _GIB:.2f} GiB)"
                                                       for p in files.values()))
    return out


def convert(hf_dir: str | Path, out: Path, quantize: str, tools: llamacpp.LlamaCpp | None = None) -> dict[str, Path]:
    """A merged Hugging Face folder -> {"model": model-<quant>.gguf, "mmproj": mmproj-f16.gguf} in `out`."""
    tools = tools or llamacpp.find()
    hf_dir = Path(hf_dir)
    log = out / LOG
    f16 = out / model_file("f16")
    mmproj = out / MMPROJ_FILE
    print(f"radscribe export: converting {hf_dir} with llama.cpp {llamacpp.LLAMA_CPP_PYTHON} (log: {log})")
    _run([sys.executable, str(tools.convert_hf), str(hf_dir), "--outtype", "f16", "--outfile", str(f16)], log)
    _run([sys.executable, str(tools.convert_hf), str(hf_dir), "--mmproj", "--outtype", "f16",
          "--outfile", str(mmproj)], log)
    model = f16
    if quantize != "f16":
        model = quantize_gguf(f16, out / model_file(quantize), quantize, tools, log)
        f16.unlink()
    return {"model": model, "mmproj": mmproj}


def copy_processor(hf_dir: Path, dest: Path) -> Path:
    """The model folder's small files (config, tokenizer, image processor, chat template), no weights: what
    `radscribe serve --backend llamacpp` counts prompt tokens and sizes images with, as the hf backend does."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(hf_dir.iterdir()):
        if path.is_file() and path.suffix in (".json", ".jinja", ".txt") and not path.name.endswith(".index.json"):
            shutil.copy2(path, dest / path.name)
    return dest


def quantize_gguf(f16: str | Path, dest: str | Path, quantize: str, tools: llamacpp.LlamaCpp | None = None,
                  log: Path | None = None) -> Path:
    """`llama-quantize F16 DEST TYPE`: llama.cpp's own per-tensor choice of types for `quantize`."""
    _check_quantize(quantize)
    tools = tools or llamacpp.find()
    dest = Path(dest)
    _run([str(tools.tool("llama-quantize")), str(f16), str(dest), QUANTS[quantize], str(os.cpu_count() or 1)],
         log or dest.with_suffix(".log"))
    return dest


def export_gguf_lora(model_dir: str | Path, adapter: str | Path, out_dir: str | Path) -> Path:
    """Convert the adapter alone into `out_dir`/lora-f16.gguf (applied on a base GGUF with `--lora`)."""
    from radscribe.model.load import check_model_dir, resolve_adapter

    base = check_model_dir(model_dir)
    adapter_dir = resolve_adapter(adapter)
    check_lora_convertible(adapter_dir)
    out = _new_folder(out_dir)
    tools = llamacpp.find()
    _require_python_deps()
    out.mkdir(parents=True, exist_ok=True)
    lora = out / LORA_FILE
    _run([sys.executable, str(tools.convert_lora), str(adapter_dir), "--base", str(base), "--outtype", "f16",
          "--outfile", str(lora)], out / LOG)
    manifest = {"llama_cpp_python": llamacpp.LLAMA_CPP_PYTHON, "base": str(base), "adapter": str(adapter_dir),
                "files": {"lora": lora.name}}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    _write_lora_readme(out, base)
    _save_config(out, model_dir, adapter, format="gguf-lora")
    print(f"radscribe export: wrote {lora} ({lora.stat().st_size / 1024 ** 2:.1f} MiB)")
    return out


def check_lora_convertible(adapter_dir: Path) -> None:
    """Refuse, in one line, an adapter that llama.cpp's LoRA converter or loader would drop or mistranslate."""
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    hint = "; export it merged instead: radscribe export --format gguf"
    if config.get("target_parameters"):
        # convert_lora_to_gguf.py fails with "Unprocessed experts" on PEFT's ParamWrapper keys (checked on 0.3.36)
        raise RadscribeError(f"{config_path}: LoRA on MoE experts (target_parameters "
                             f"{config['target_parameters']}) cannot be converted to a GGUF LoRA by llama.cpp{hint}")
    targets = config.get("target_modules") or []
    if isinstance(targets, str) or any("visual" in t for t in targets):
        # the text-model converter skips every "visual." tensor and mtmd applies no LoRA: it would vanish silently
        raise RadscribeError(f"{config_path}: LoRA on the vision tower (target_modules {targets!r}) is not applied "
                             f"by llama.cpp, which puts LoRA on the text model only{hint}")
    unsupported = {"use_rslora": config.get("use_rslora"), "use_dora": config.get("use_dora"),
                   "rank_pattern": config.get("rank_pattern"), "alpha_pattern": config.get("alpha_pattern"),
                   "modules_to_save": config.get("modules_to_save")}
    used = [k for k, v in unsupported.items() if v]
    if used:
        # llama.cpp scales every LoRA by one alpha / rank; none of these survive the conversion
        raise RadscribeError(f"{config_path}: {', '.join(used)} cannot be expressed in a GGUF LoRA{hint}")


def _save_config(out: Path, model_dir, adapter, **fields) -> None:
    from radscribe.config import save_config
    from radscribe.export import ExportConfig

    save_config(ExportConfig(str(model_dir), None if adapter is None else str(adapter), str(out), **fields),
                out / "export_config.yaml")


def _run(cmd: list[str], log: Path) -> None:
    with log.open("a") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-2:]
        raise RadscribeError(f"`{Path(cmd[1] if cmd[0] == sys.executable else cmd[0]).name}` failed "
                             f"(exit {result.returncode}; log {log}): {' | '.join(tail)}")


def _write_manifest(out: Path, base: Path, adapter, quantize: str, files: dict[str, Path]) -> None:
    manifest = {
        "llama_cpp_python": llamacpp.LLAMA_CPP_PYTHON, "base": str(base),
        "adapter": None if adapter is None else str(adapter), "quantize": quantize,
        "files": {k: p.name for k, p in files.items()},
        "bytes": {k: p.stat().st_size for k, p in files.items()},
        "measured": {k: measure(p) for k, p in files.items()},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


# --- README / Modelfile --------------------------------------------------------------------------------------

def _generation_defaults(model_dir: Path) -> dict:
    path = model_dir / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    return {k: config[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty") if k in config}


def _write_readme(out: Path, model_dir: Path, quantize: str, files: dict[str, Path]) -> None:
    model, mmproj = files["model"].name, files["mmproj"].name
    sampling = _generation_defaults(model_dir)
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                     (("temp", sampling.get("temperature")), ("top_p", sampling.get("top_p")),
                      ("top_k", sampling.get("top_k"))) if v is not None)
    params = "\n".join(f"PARAMETER {k} {v}" for k, v in sampling.items() if k != "repetition_penalty")
    (out / "Modelfile").write_text(
        f"# Ollama: ollama create radscribe -f Modelfile  (run in this folder)\n"
        f"# Ollama documents single-file GGUF import; the second FROM (the vision projector) follows community\n"
        f"# practice for mmproj files and was not tested by radscribe. Its documented route for a vision model is\n"
        f"# importing the merged safetensors folder (radscribe export without --format gguf) with FROM DIR.\n"
        f"FROM ./{model}\nFROM ./{mmproj}\n"
        'TEMPLATE """{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
        '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
        '<|im_start|>assistant\n"""\n'
        f'PARAMETER stop "<|im_end|>"\n{params}\n')
    (out / "README.md").write_text(f"""# GGUF export (llama.cpp {llamacpp.LLAMA_CPP_PYTHON} via llama-cpp-python's vendored copy)

Files: `{model}` (text model, {quantize}), `{mmproj}` (vision tower + mergers, f16), `gguf.json` (what was written,
bits per weight per tensor class as measured in these files), `llama.cpp.log` (the converter and quantizer output),
`processor/` (config, tokenizer, image processor and chat template: `radscribe serve --backend llamacpp` reads them).

With radscribe's own safety rules in front (loopback bind, API key from $RADSCRIBE_API_KEY, data-URI images only
unless allow-listed, size and queue limits), in this folder:

```bash
radscribe serve --backend llamacpp --model . --port 8000
```
The binaries are in `$(radscribe llamacpp path)` after `radscribe llamacpp install`.
Sampling defaults below come from the model's generation_config.json ({sampling or 'none found'}).

llama.cpp's own OpenAI-compatible server (loopback only; the API key comes from the environment). It fetches any
http(s) image URL a client sends (no allow-list), so put it in front of trusted clients only:

```bash
export LLAMA_API_KEY=...   # llama-server reads it from the environment (an --api-key argument shows in `ps`)
llama-server -m {model} --mmproj {mmproj} --host 127.0.0.1 --port 8080 -c 8192 -ngl 99 {flags}
```

`-ngl 99` puts every layer on the GPU; lower it (or `--n-cpu-moe N` for the MoE) to keep part of the model in
RAM, or leave it out on a CPU-only machine. `radscribe export --dry-run --format gguf --model BASE --quantize
{quantize}` prints what this costs in GPU memory for the full-size model.

One report from the terminal:

```bash
llama-mtmd-cli -m {model} --mmproj {mmproj} --image scan.png -p "图片中的诊断结果是怎样?" -n 512 {flags}
```

Ollama (`Modelfile` in this folder; see its comments): `ollama create radscribe -f Modelfile && ollama run radscribe`.
""")


def _write_lora_readme(out: Path, base: Path) -> None:
    (out / "README.md").write_text(f"""# GGUF LoRA (llama.cpp {llamacpp.LLAMA_CPP_PYTHON})

`{LORA_FILE}` is the adapter alone, for the text model of `{base.name}`. Apply it on that base's GGUF
(the one converted from exactly this base folder, e.g. `radscribe export --format gguf --model {base} OUT` without
--adapter):

```bash
llama-server -m BASE-MODEL.gguf --mmproj BASE-mmproj-f16.gguf --lora {LORA_FILE} --host 127.0.0.1 --port 8080
```

Ollama: `FROM <base model>` + `ADAPTER ./{LORA_FILE}` in a Modelfile.
""")


# --- measuring the files -------------------------------------------------------------------------------------

def tensor_class(gguf_name: str) -> str:
    """'blk.3.attn_v.weight' -> 'blk.*.attn_v.weight': one class per tensor role, layers pooled."""
    return re.sub(r"\.\d+\.", ".*.", gguf_name)


TOKEN_EMBD = "token_embd.weight"
OUTPUT = "output.weight"
# A tied embedding is also the output: llama-quantize then gives it the output tensor's type
# (llama_tensor_get_type_impl), so it is a class of its own.
TIED_EMBD = "token_embd.weight (tied)"
POSITION_EMBD = "vision.position_embd"


def _mmproj_class(gguf_or_hf_name: str, n_dims: int) -> str:
    # The projector is written f16 and not quantised; the converter keeps 1-D tensors (norms, biases) and the
    # learned position embedding in f32.
    if gguf_or_hf_name in ("v.position_embd.weight", "model.visual.pos_embed.weight"):
        return POSITION_EMBD
    return "vision.1d" if n_dims == 1 else "vision.nd"


def measure(path: str | Path) -> dict:
    """Per tensor class of one GGUF file: parameters, bytes and the ggml types used; plus the bytes outside the
    tensors (header, vocabulary, chat template, alignment)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    is_mmproj = any(n.startswith("v.") for n in names)
    tied = "output.weight" not in names
    classes: dict[str, dict] = {}
    for tensor in reader.tensors:
        if is_mmproj:
            name = _mmproj_class(tensor.name, len(tensor.shape))
        else:
            name = tensor_class(tensor.name)
            if tied and name == TOKEN_EMBD:
                name = TIED_EMBD
        entry = classes.setdefault(name, {"params": 0, "bytes": 0, "types": {}})
        entry["params"] += int(tensor.n_elements)
        entry["bytes"] += int(tensor.n_bytes)
        type_name = tensor.tensor_type.name
        entry["types"][type_name] = entry["types"].get(type_name, 0) + int(tensor.n_elements)
    size = Path(path).stat().st_size
    return {"arch": reader.fields["general.architecture"].contents(), "file_bytes": size,
            "other_bytes": size - sum(c["bytes"] for c in classes.values()), "classes": dict(sorted(classes.items()))}


def bits_table(measured: dict) -> dict:
    """{"model": {class: bits per weight}, "mmproj": {...}, "other_bytes": {...}} from `measure` results."""
    return {
        "bits": {part: {name: round(8 * c["bytes"] / c["params"], 4) for name, c in m["classes"].items()}
                 for part, m in measured.items()},
        "other_bytes": {part: m["other_bytes"] for part, m in measured.items()},
    }


# --- the dry run ---------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """What a GGUF deployment of one model costs, from its config and measured bits per weight."""

    model: str
    arch: str
    quantize: str
    params: dict[str, int]                 # "model" / "mmproj" -> parameters written into that file
    bytes: dict[str, int]                  # predicted file sizes
    classes: dict[str, dict] = field(default_factory=dict)   # class -> params, bits, bytes (text model)
    ctx: int = 8192
    kv_bytes: int = 0
    gpu_mem_gib: float | None = None
    bits_source: str = ""

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values()) + self.kv_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_mem_gib is None else self.total_bytes <= self.gpu_mem_gib * _GIB


def load_bits(source: str | Path | None = None) -> tuple[dict, str]:
    """The measured bits-per-weight table: the packaged one, or an export folder's gguf.json."""
    if source is None:
        return json.loads(BITS_TABLE.read_text()), str(BITS_TABLE.name)
    path = Path(source).expanduser()
    manifest_path = path / MANIFEST if path.is_dir() else path
    if not manifest_path.is_file():
        raise RadscribeError(f"--bits-from {source}: no {MANIFEST} there (pass a `radscribe export --format gguf` "
                             "folder)")
    manifest = json.loads(manifest_path.read_text())
    if "measured" not in manifest:
        raise RadscribeError(f"{manifest_path} holds no measured tensor classes (a GGUF LoRA export?)")
    table = {"llama_cpp_python": manifest["llama_cpp_python"],
             manifest["measured"]["model"]["arch"]: {manifest["quantize"]: bits_table(manifest["measured"])}}
    return table, str(manifest_path)


def plan(model_dir: str | Path, quantize: str = "q4_k_m", ctx: int = 8192, gpu_mem_gib: float | None = None,
         bits_from: str | Path | None = None) -> Plan:
    """Predict the GGUF pair's sizes and the KV cache for the model whose config.json is in `model_dir`."""
    _check_quantize(quantize)
    if ctx <= 0:
        raise RadscribeError(f"--ctx {ctx}: the context must be a positive number of tokens")
    config_path = Path(model_dir).expanduser() / "config.json"
    if not config_path.is_file():
        raise RadscribeError(f"{config_path} does not exist: --model must be a folder holding the model's "
                             "config.json (the weights are not needed for --dry-run)")
    table, source = load_bits(bits_from)
    config, shapes = _meta_shapes(config_path.parent)
    text = getattr(config, "text_config", config)
    arch = _gguf_arch(config)
    measured = table.get(arch, {}).get(quantize)
    if measured is None:
        raise RadscribeError(f"{source} has no bits per weight measured for {arch} at {quantize}; export a tiny "
                             f"model of this architecture with --quantize {quantize} and pass it with --bits-from")
    params = {"model": 0, "mmproj": 0}
    sizes = {"model": measured["other_bytes"]["model"], "mmproj": measured["other_bytes"]["mmproj"]}
    classes: dict[str, dict] = {}
    # named_parameters() lists a tied lm_head once, as the embedding
    tied = "lm_head.weight" not in shapes
    for part, cls, n in _gguf_tensors(arch, shapes, text.num_hidden_layers):
        if cls == TOKEN_EMBD and tied:
            cls = TIED_EMBD
        # a tied embedding takes the output's type, so either measurement stands for the other
        candidates = {TIED_EMBD: (TIED_EMBD, OUTPUT), OUTPUT: (OUTPUT, TIED_EMBD)}.get(cls, (cls,))
        bits = next((measured["bits"][part][c] for c in candidates if c in measured["bits"][part]), None)
        if bits is None:
            raise RadscribeError(f"{source} has no measurement for tensor class {cls} ({arch}, {quantize}): "
                                 "measure an export with the same kind of tensors (--bits-from)")
        params[part] += n
        sizes[part] += n * bits / 8
        if part == "model":
            entry = classes.setdefault(cls, {"params": 0, "bits": bits, "bytes": 0.0})
            entry["params"] += n
            entry["bytes"] += n * bits / 8
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    # llama.cpp's default KV cache: K and V in f16 for every layer and KV head
    kv = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2 * ctx
    return Plan(model=str(config_path.parent), arch=arch, quantize=quantize, params=params,
                bytes={k: int(round(v)) for k, v in sizes.items()}, classes=classes, ctx=ctx, kv_bytes=kv,
                gpu_mem_gib=gpu_mem_gib, bits_source=source)


def _meta_shapes(model_dir: Path):
    """(config, {parameter name: shape}) of the model built on the meta device: no weights read or allocated."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise RadscribeError(f"{model_dir / 'config.json'}: transformers cannot read it ({err})") from err
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return config, {name: tuple(p.shape) for name, p in model.named_parameters()}


def _gguf_arch(config) -> str:
    import gguf

    names = {"qwen3_vl": gguf.MODEL_ARCH.QWEN3VL, "qwen3_vl_moe": gguf.MODEL_ARCH.QWEN3VLMOE}
    if config.model_type not in names:
        raise RadscribeError(f"--dry-run --format gguf knows Qwen3-VL and Qwen3-VL-MoE; this config is "
                             f"{config.model_type!r}")
    return gguf.MODEL_ARCH_NAMES[names[config.model_type]]


def _gguf_tensors(arch: str, shapes: dict[str, tuple], n_layers: int):
    """(file, tensor class, parameters) for every tensor the converter writes, named by llama.cpp's name map.

    The fused experts are split the way the converter splits them: gate_up_proj becomes ffn_gate_exps and
    ffn_up_exps (half each), down_proj becomes ffn_down_exps.
    """
    import math

    import gguf

    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(arch_enum, n_layers)
    for name, shape in shapes.items():
        n = math.prod(shape)
        if name.startswith("model.visual."):
            yield "mmproj", _mmproj_class(name, len(shape)), n
            continue
        hf = name.replace("language_model.", "")
        if hf.endswith("mlp.experts.gate_up_proj"):
            pieces = [(hf.replace("gate_up_proj", "gate_proj"), n // 2), (hf.replace("gate_up_proj", "up_proj"), n // 2)]
        else:
            pieces = [(hf, n)]
        for piece, count in pieces:
            mapped = name_map.get_name(piece if piece.endswith((".weight", ".bias")) else piece + ".weight",
                                       try_suffixes=(".weight", ".bias"))
            if mapped is None:
                raise RadscribeError(f"parameter {name} has no GGUF name in llama.cpp's map for {arch}")
            yield "model", tensor_class(mapped), count


def format_plan(p: Plan) -> str:
    gib = lambda b: f"{b / _GIB:6.2f} GiB"  # noqa: E731
    lines = [f"GGUF plan for {p.model} ({p.arch}, --quantize {p.quantize}; bits per weight measured on tiny "
             f"exports, {p.bits_source})",
             f"  {'tensor class':28s} {'params':>14s} {'bits/w':>7s} {'size':>10s}"]
    for name, c in sorted(p.classes.items(), key=lambda kv: -kv[1]["bytes"]):
        lines.append(f"  {name:28s} {c['params']:14,d} {c['bits']:7.3f} {gib(c['bytes'])}")
    lines += [
        f"  {model_file(p.quantize):28s} {p.params['model']:14,d} "
        f"{8 * p.bytes['model'] / max(p.params['model'], 1):7.3f} {gib(p.bytes['model'])}",
        f"  {MMPROJ_FILE:28s} {p.params['mmproj']:14,d} "
        f"{8 * p.bytes['mmproj'] / max(p.params['mmproj'], 1):7.3f} {gib(p.bytes['mmproj'])}",
        f"  KV cache at --ctx {p.ctx} (f16 K and V){'':9s} {gib(p.kv_bytes)}",
        f"  total{'':42s} {gib(p.total_bytes)}",
    ]
    if p.gpu_mem_gib is not None:
        left = p.gpu_mem_gib * _GIB - p.total_bytes
        verdict = "fits" if p.fits else "does NOT fit"
        lines.append(f"  on a {p.gpu_mem_gib:g} GiB card: {verdict} ({left / _GIB:+.2f} GiB left for llama.cpp's "
                     f"compute buffers and the CUDA context, which come on top)")
    return "\n".join(lines)


# --- parity with transformers --------------------------------------------------------------------------------

def chat_inputs(processor, text: str, image=None):
    """(transformers inputs, llama-server prompt) for one user turn with the model's own chat template.

    Text-only: the llama-server prompt is the token ids themselves, so both sides start from identical tokens.
    With an image: the prompt string with llama.cpp's media marker where the processor put
    <|vision_start|><|image_pad|>...<|vision_end|> (mtmd adds the vision start/end tokens itself).
    """
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    if image is None:
        return inputs, inputs["input_ids"][0].tolist()
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = vision_blocks_to_marker(rendered, 1, llamacpp.LlamaServer.MEDIA_MARKER)
    return inputs, prompt


def vision_blocks_to_marker(rendered: str, images: int, marker: str) -> str:
    """A rendered Qwen-VL chat with its <|vision_start|><|image_pad|>...<|vision_end|> blocks replaced by
    llama.cpp's media marker (mtmd writes the vision start/end tokens and the image tokens itself)."""
    prompt, found = re.subn(r"<\|vision_start\|>(<\|image_pad\|>)+<\|vision_end\|>", lambda _: marker, rendered)
    if found != images:
        raise RadscribeError(f"the chat template rendered {found} <|vision_start|><|image_pad|><|vision_end|> "
                             f"block(s) for {images} image(s)")
    return prompt


def hf_greedy(model, inputs, n: int = 32) -> tuple[list[int], list[float]]:
    """transformers' greedy continuation (token ids) of `inputs`, and at each step the log-probability gap
    between the chosen token and the runner-up (how close the greedy choice was to a tie)."""
    import torch

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, top_k=None, top_p=None,
                             temperature=None, repetition_penalty=None, output_scores=True,
                             return_dict_in_generate=True)
    gaps = []
    for scores in out.scores:
        top = scores[0].float().log_softmax(-1).topk(2).values
        gaps.append(float(top[0] - top[1]))
    return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), gaps


def agreement(reference: list[int], candidate: list[int], n: int = 32) -> dict:
    """How far `candidate` follows `reference` over the first n tokens: the common prefix, and the share of
    positions holding the same token (a missing token counts as a disagreement)."""
    ref, cand = reference[:n], candidate[:n]
    prefix = next((i for i, (a, b) in enumerate(zip(ref, cand)) if a != b), min(len(ref), len(cand)))
    same = sum(a == b for a, b in zip(ref, cand))
    return {"tokens": len(ref), "common_prefix": prefix, "agreement": same / max(len(ref), 1)}
