"""The one model loader: base model + processor (+ PEFT adapter) from a local folder.

Used by train, eval, serve and export; nothing else calls `from_pretrained` on a model. `model_dir` is a folder
exactly as downloaded (Qwen3-VL, Qwen3-VL-MoE, Qwen2.5-VL) or written by `radscribe tiny-model`.

    from radscribe.model.load import load_model, load_processor, resolve_adapter
    model, processor = load_model("Qwen3-VL-4B-Instruct")                       # inference, eval mode
    model, processor = load_model(base, adapter="runs/r1")                      # RUN or RUN/adapter
    model, processor = load_model(base, quantization="4bit", trainable=True)    # QLoRA base, ready for LoRA

Training a new adapter: `load_model(base, trainable=True)` then `peft.get_peft_model(model,
radscribe.model.lora.build_lora_config(model, ...))`; continuing one: `load_model(base, adapter=RUN, trainable=True)`.
Full-parameter training: `load_model(base, dtype="fp32", trainable=True)` and train `model` itself.
Left padding for batched generation is the engine's job; the tokenizer here always has a pad token.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from radscribe.errors import RadscribeError
from radscribe.model.adapter_check import check_adapter
from radscribe.model.lora import quantization_config
from radscribe.quiet import peft_notices

DTYPES = ("auto", "bf16", "fp16", "fp32")
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "chat_template.json", "tokenizer_config.json")


def check_model_dir(model_dir: str | Path, weights: bool = True) -> Path:
    """The model folder as a Path, or a RadscribeError saying what is missing (`weights=False`: config and
    processor files are enough, as in a GGUF export's processor/ folder)."""
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise RadscribeError(f"model folder {path} does not exist (download the model, or build one with "
                             "`radscribe tiny-model --arch qwen3_vl DIR`)")
    if not (path / "config.json").is_file():
        raise RadscribeError(f"{path} is not a model folder: it has no config.json")
    if weights and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise RadscribeError(f"{path} is not a model folder: it has no *.safetensors weights")
    return path


def resolve_adapter(run_or_adapter_dir: str | Path) -> Path:
    """A run folder (RUN) or its adapter folder (RUN/adapter) -> the folder holding adapter_config.json."""
    path = Path(run_or_adapter_dir).expanduser()
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    _check_unfinished_run(path.parent if path.name == "adapter" else path)
    if not path.exists():
        raise RadscribeError(f"adapter {path} does not exist (pass a run folder or its adapter/ folder)")
    raise RadscribeError(f"{path} holds no adapter_config.json (nor does {path / 'adapter'}); "
                         "pass a `radscribe train` run folder or a PEFT adapter folder")


def _check_unfinished_run(run: Path) -> None:
    """A run folder whose training stopped before writing adapter/: say so, name its checkpoints and the fix."""
    from radscribe.runlog import checkpoint_step

    steps = sorted(n for n in map(checkpoint_step, (run / "checkpoints").glob("checkpoint-*")) if n is not None)
    if not steps:
        return
    last = run / "checkpoints" / f"checkpoint-{steps[-1]}"
    use_last = (f", or pass --adapter {last} to use its last checkpoint as it is"
                if (last / "adapter_config.json").is_file() else "")
    resume = (f"radscribe train --config {run / 'config.yaml'} --resume" if (run / "config.yaml").is_file()
              else "the same `radscribe train` command with --resume")
    raise RadscribeError(f"{run} has no adapter/: its training did not finish (checkpoints: "
                         f"{', '.join(f'checkpoint-{n}' for n in steps)}); continue it with `{resume}`{use_last}")


def processor_class_without_video(processor_class):
    """`processor_class` (Qwen3VLProcessor, Qwen2_5_VLProcessor) minus its video processor.

    transformers' Qwen video processors need torchvision, and PyPI's torchvision wheels do not import beside a
    CPU-only torch ("operator torchvision::nms does not exist"), so AutoProcessor fails on such machines. ProcessorMixin derives its
    sub-processors from `__init__`'s signature: a subclass whose `__init__` has no `video_processor` loads,
    saves and round-trips images and text unchanged. The class keeps the upstream name, so the folder it saves
    says `Qwen3VLProcessor` and loads with AutoProcessor where torchvision exists.
    """
    return _without_video(processor_class)


_NO_VIDEO_PREFIX = "_without_video_"


@functools.cache
def _without_video(processor_class):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        processor_class.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    # __name__ stays upstream's (it is what save_pretrained records); __module__/__qualname__ point here so the
    # processor pickles (DataLoader/datasets workers) and unpickles through the module __getattr__ below.
    return type(processor_class.__name__, (processor_class,), {
        "__init__": __init__, "__module__": __name__, "__qualname__": _NO_VIDEO_PREFIX + processor_class.__name__})


def __getattr__(name: str):
    if name.startswith(_NO_VIDEO_PREFIX):
        import transformers

        return _without_video(getattr(transformers, name[len(_NO_VIDEO_PREFIX):]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _torchvision_available() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401  (a CUDA-only wheel beside CPU torch fails at import)
    except Exception:
        return False
    return True


def _processor_class_name(path: Path) -> str:
    for name in _PROCESSOR_FILES:
        f = path / name
        if f.is_file():
            value = json.loads(f.read_text(encoding="utf-8")).get("processor_class")
            if value:
                return value
    model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type", "")
    return "Qwen2_5_VLProcessor" if model_type.startswith("qwen2_5_vl") else "Qwen3VLProcessor"


def load_processor(model_dir: str | Path):
    """The model's processor (tokenizer + image processor + chat template), with or without torchvision."""
    import transformers

    path = check_model_dir(model_dir, weights=False)
    if _torchvision_available():
        processor_class = transformers.AutoProcessor
    else:
        name = _processor_class_name(path)
        upstream = getattr(transformers, name, None)
        if upstream is None:
            raise RadscribeError(f"{path}: processor_class {name!r} is not known to transformers "
                                 f"{transformers.__version__}; upgrade transformers")
        processor_class = processor_class_without_video(upstream)
    try:
        processor = processor_class.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RadscribeError(f"{path}: cannot load the processor, are the tokenizer and preprocessor files there? "
                             f"({type(err).__name__}: {(str(err).splitlines() or [''])[0]})")
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        # Qwen's released tokenizers pad with <|endoftext|>; batching needs some pad token.
        tokenizer.pad_token = "<|endoftext|>" if "<|endoftext|>" in tokenizer.get_vocab() else tokenizer.eos_token
    return processor


def _torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise RadscribeError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return {"auto": "auto", "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


@dataclass(frozen=True)
class Placement:
    """Where `load_model` puts the weights, decided before anything is read."""

    path: str
    """"zero3-partitioned": under DeepSpeed ZeRO-3 transformers loads inside `deepspeed.zero.Init`, so each rank
    keeps only its 1/world share of every weight and the engine places the shards (a device_map is refused there);
    "device-map": `from_pretrained(device_map={"": device})`, each shard read straight onto `device`."""
    device: str
    """This process's device: `cuda:LOCAL_RANK` under torchrun on GPUs (radscribe.dist), else what was asked."""
    device_map: dict | None
    """What `from_pretrained` gets (None under ZeRO-3)."""


def placement(device: str | None = None) -> Placement:
    """How this rank loads: partitioned under ZeRO-3, else straight onto its own device (never a host copy first).

    On a node with several GPUs every rank asks for its local GPU (`{"": "cuda:LOCAL_RANK"}`), so under ZeRO-2 /
    DDP / QLoRA no rank builds the whole model in host memory and no two ranks share `cuda:0`."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if device is None:
        from radscribe import dist

        device = dist.device()  # this process's GPU (cuda:LOCAL_RANK) when there is one, else cpu
    if is_deepspeed_zero3_enabled():
        return Placement("zero3-partitioned", str(device), None)
    return Placement("device-map", str(device), {"": str(device)})


def load_model(model_dir: str | Path, adapter: str | Path | None = None, dtype: str = "auto",
               quantization: str | None = None, device: str | None = None, trainable: bool = False):
    """Load (model, processor) from a local folder; attach the PEFT adapter at `adapter` (RUN or RUN/adapter).

    dtype: "auto" keeps the checkpoint's dtype (bf16 for released models, fp32 for tiny ones).
    The processor sizes images as the adapter's training did (`radscribe.model.pixels`: the pixel limits of the
    processor saved beside the adapter), else as the base folder's processor does.
    quantization: None or "4bit" (bitsandbytes nf4; CPU and GPU). device: "cpu", "cuda", "cuda:1"…; None =
    this process's GPU when CUDA is available (cuda:LOCAL_RANK under torchrun, radscribe.dist), else cpu; the
    weights go there as they are read (`placement`). trainable: False returns the model in eval mode with
    gradients off; True returns it in train mode, its base frozen when quantised (`lora.prepare_qlora_base`),
    with an adapter left trainable.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    path = check_model_dir(model_dir)
    adapter_dir = resolve_adapter(adapter) if adapter is not None else None
    torch_dtype = _torch_dtype(dtype)
    where = placement(device)
    compute_dtype = torch_dtype if isinstance(torch_dtype, torch.dtype) else None
    if quantization and compute_dtype is None:
        compute_dtype = torch.bfloat16 if where.device.startswith("cuda") else torch.float32
    bnb = quantization_config(quantization, compute_dtype)  # checks bitsandbytes before any loading
    processor = load_processor(path)
    if adapter_dir is not None:  # before any weights are read: one line naming both folders if it does not fit
        check_adapter(path, adapter_dir, processor.tokenizer)
        from radscribe.model.pixels import apply_trained_limits

        apply_trained_limits(processor, adapter_dir)  # the image policy the adapter was trained with

    kwargs = {"dtype": torch_dtype}
    if where.device_map is not None:
        kwargs["device_map"] = where.device_map
    if bnb is not None:
        kwargs["quantization_config"] = bnb
        if torch_dtype == "auto":
            kwargs["dtype"] = compute_dtype
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        first_line = (str(err).splitlines() or [""])[0]
        raise RadscribeError(f"{path}: cannot load the model ({type(err).__name__}: {first_line})")
    if where.path != "zero3-partitioned":
        undo_unconverted_square_experts(model, path)
    if trainable and bnb is not None:
        from radscribe.model.lora import prepare_qlora_base

        model = prepare_qlora_base(model)
    if adapter_dir is not None:
        with peft_notices(quantization):
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
        if not trainable:
            model = merge_for_inference(model, quantized=bnb is not None)
    if trainable:
        model.train()
    else:
        model.eval()
        model.requires_grad_(False)
    return model, processor


EXPERT_TENSORS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
"""The fused MoE expert tensors, stored transposed to transformers' in-memory layout in released checkpoints."""


def undo_unconverted_square_experts(model, path: Path) -> int:
    """Transpose the fused expert tensors that transformers read from `path` without converting them; returns how many.

    Released Qwen3-VL-MoE checkpoints (and every folder radscribe writes) store gate_up_proj as (E, H, 2I) and
    down_proj as (E, I, H); in memory they are (E, 2I, H) / (E, H, I). transformers 5.24 converts on load with
    `Transpose(1, 2, check_dims=True)`, which keeps a tensor as it is whenever its shape already equals the
    in-memory one. With moe_intermediate_size == hidden_size (down_proj) or 2 * moe_intermediate_size ==
    hidden_size (gate_up_proj) both layouts have the same shape, so that tensor silently comes in transposed: the
    model computes with the wrong experts, while llama.cpp's converter (which transposes unconditionally) reads the
    file right. Only such square tensors are looked at, each against the file: one still equal to the stored tensor
    was not converted and is transposed here; one that transformers did convert differs and is left alone. (Under
    DeepSpeed ZeRO-3 transformers transposes unconditionally, so the caller skips this there.)"""
    import torch
    from safetensors import safe_open

    square = {name: param for name, param in model.named_parameters()
              if name.endswith(EXPERT_TENSORS) and param.dim() == 3 and param.shape[1] == param.shape[2]}
    fixed = 0
    for shard in sorted(path.glob("*.safetensors")) if square else ():
        with safe_open(str(shard), framework="pt") as f:
            for name in square.keys() & set(f.keys()):
                param = square[name]
                stored = f.get_tensor(name).to(device=param.device, dtype=param.dtype)
                if torch.equal(param.data, stored) and not torch.equal(stored, stored.transpose(1, 2)):
                    with torch.no_grad():
                        param.copy_(stored.transpose(1, 2))
                    fixed += 1
    return fixed


def merge_for_inference(model, quantized: bool):
    """Fold a PEFT LoRA adapter into the weights it adapts, so generating costs what the base costs.

    Unmerged, PEFT's `target_parameters` LoRA on the fused MoE experts rebuilds the whole (E, in, out) expert tensor
    of every layer on every forward pass, i.e. per generated token. A plain model comes back (`merge_and_unload`).
    On a 4-bit base only the expert LoRA is merged: bitsandbytes leaves the 3-D experts unquantised, so adding the
    delta there is exact, while merging into nf4 linears would re-quantise them (the low-rank linear LoRA left
    beside them costs little)."""
    if not quantized:
        return model.merge_and_unload()
    from peft.tuners.lora.layer import ParamWrapper

    for module in model.modules():
        if isinstance(module, ParamWrapper):
            module.merge()
    return model
