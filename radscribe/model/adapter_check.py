"""Does an adapter belong to this base model? The base's identity, recorded at train time, and the check.

Called by the one model loader (radscribe/model/load.py) whenever an adapter is attached (eval, chat, serve, export,
continuing training) and by `radscribe train --resume` on the checkpoint it resumes from (against the run's own
RECORD, written when the run starts), before any weights are read. A mismatch is one RadscribeError naming both folders and what differs.

- `radscribe train` writes `radscribe_base.json` (RECORD) into the run folder and the adapter folder: the base's model type,
  architectures, vocabulary size, text and vision hidden sizes, text layers, a fingerprint of its config.json and
  one of its tokenizer vocabulary, and the folder it was read from. PEFT's own `base_model_name_or_path` is only a
  path: another model can sit there later, and the same model can sit anywhere.
- An adapter with RECORD loads only on a base with the same identity (the folder may have moved).
- An adapter without it (trained elsewhere: LLaMA-Factory, plain PEFT, a Trainer checkpoint) is checked by shape:
  PEFT's own LoRA layers are built on the base's architecture on the meta device (config.json only, no weights) and
  every tensor name and shape they would load is compared with the adapter file's header (safetensors metadata;
  no tensor is read). Same shapes on another vocabulary cannot be told apart this way; RECORD can.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from radscribe.errors import RadscribeError

RECORD = "radscribe_base.json"
# config.json keys that say how a model is stored or run, not what it is: a bf16 copy, a 4-bit copy or a copy
# re-saved by another transformers release is the same base.
_NOT_IDENTITY = frozenset({"transformers_version", "dtype", "torch_dtype", "_name_or_path", "quantization_config",
                           "use_cache"})
_COMPARED = {"model_type": "model type", "architectures": "architectures", "vocab_size": "vocabulary size",
             "hidden_size": "hidden size", "num_hidden_layers": "text layers",
             "vision_hidden_size": "vision hidden size", "tokenizer_sha256": "tokenizer vocabulary",
             "config_sha256": "config.json"}
_EXAMPLES = 2  # names shown per kind of shape mismatch


def base_identity(model_dir: str | Path, tokenizer) -> dict:
    """What makes `model_dir` the base an adapter fits: read from config.json and the tokenizer's vocabulary."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config") or config  # Qwen2.5-VL's published config.json is flat
    return {
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "vocab_size": text.get("vocab_size", config.get("vocab_size")),
        "hidden_size": text.get("hidden_size", config.get("hidden_size")),
        "num_hidden_layers": text.get("num_hidden_layers", config.get("num_hidden_layers")),
        "vision_hidden_size": (config.get("vision_config") or {}).get("hidden_size"),
        "config_sha256": _fingerprint(_identity_part(config)),
        "tokenizer_sha256": _fingerprint(sorted(tokenizer.get_vocab().items())),
    }


def record_base(model_dir: str | Path, tokenizer, adapter_dir: str | Path) -> Path:
    """Write the base's identity into the adapter folder (RECORD); returns the file."""
    record = {**base_identity(model_dir, tokenizer), "model_dir": str(Path(model_dir).expanduser().resolve())}
    out = Path(adapter_dir) / RECORD
    out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return out


def check_adapter(model_dir: str | Path, adapter_dir: str | Path, tokenizer=None,
                  record: str | Path | None = None) -> None:
    """Raise a one-line RadscribeError when the adapter at `adapter_dir` was not made for the base at `model_dir`.

    `tokenizer`: the base's, when the caller has it loaded (the vocabulary fingerprint needs it); else it is loaded
    here, and only for an adapter that carries RECORD. `record`: the RECORD file to check against when it is not in
    the adapter folder (a Trainer checkpoint of a run: `RUN/radscribe_base.json`); its shapes are checked too."""
    base, adapter = Path(model_dir), Path(adapter_dir)
    record_file = Path(record) if record is not None else adapter / RECORD
    if record is not None:
        _check_shapes(base, adapter)
    if record_file.is_file():
        if tokenizer is None:
            from radscribe.model.load import load_processor

            tokenizer = load_processor(base).tokenizer
        _check_record(base, adapter, tokenizer, record_file)
    elif record is None:
        _check_shapes(base, adapter)


def _check_record(base: Path, adapter: Path, tokenizer, record_file: Path) -> None:
    try:
        recorded = json.loads(record_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RadscribeError(f"{record_file}: unreadable ({err}); restore it, or delete it to check the adapter "
                             "by tensor shapes only") from None
    here = base_identity(base, tokenizer)
    differs = [_difference(label, recorded.get(key), here[key]) for key, label in _COMPARED.items()
               if recorded.get(key) != here[key]]
    if not differs:
        return
    hint = (f"; if {base} is that model saved again, delete {record_file} to check tensor shapes only"
            if [key for key in _COMPARED if recorded.get(key) != here[key]] == ["config_sha256"] else "")
    raise RadscribeError(f"adapter {adapter} was trained on another base than {base}: {'; '.join(differs)}; "
                         f"pass the base it was trained on ({recorded.get('model_dir', 'see ' + str(record_file))})"
                         f"{hint}")


def _difference(label: str, recorded, here) -> str:
    if label in ("tokenizer vocabulary", "config.json"):
        return f"{label} differs (fingerprint {str(recorded)[:12]} at train time, {here[:12]} here)"
    return f"{label} {_show(recorded)} at train time, {_show(here)} here"


def _check_shapes(base: Path, adapter: Path) -> None:
    have = _adapter_shapes(adapter)
    want = _expected_shapes(base, adapter)
    unknown = [k for k in have if k not in want]
    missing = [k for k in want if k not in have]
    other = [k for k in have if k in want and have[k] != want[k]]
    problems = []
    if other:
        problems.append(f"{len(other)} tensor(s) of other shapes ("
                        + ", ".join(f"{_module(k)}: {list(have[k])} in the adapter, {list(want[k])} for this base"
                                    for k in other[:_EXAMPLES]) + ")")
    if unknown:
        problems.append(f"{len(unknown)} tensor(s) for modules this base lacks ("
                        + ", ".join(map(_module, unknown[:_EXAMPLES])) + ")")
    if missing:
        problems.append(f"{len(missing)} LoRA tensor(s) this base's matching modules need are not in the adapter ("
                        + ", ".join(map(_module, missing[:_EXAMPLES])) + ")")
    if problems:
        raise RadscribeError(f"adapter {adapter} does not fit base {base}: {'; '.join(problems)}; pass the base "
                             "it was trained on")


def _adapter_shapes(adapter: Path) -> dict[str, tuple]:
    """Tensor name -> shape from the adapter file's header: no tensor data is read."""
    weights = adapter / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(weights), framework="pt") as f:
                return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 (no __iter__)
        except (SafetensorError, OSError) as err:
            raise RadscribeError(f"{weights}: not a readable safetensors file ({err})") from None
    legacy = adapter / "adapter_model.bin"
    if legacy.is_file():
        import torch

        # mmap: the pickle's tensors stay on disk; only their metadata is touched
        state = torch.load(legacy, map_location="cpu", mmap=True, weights_only=True)
        return {key: tuple(value.shape) for key, value in state.items()}
    raise RadscribeError(f"adapter {adapter} has no adapter_model.safetensors (nor adapter_model.bin)")


def _expected_shapes(base: Path, adapter: Path) -> dict[str, tuple]:
    """The adapter tensors PEFT would load into this base, by name and shape, from config.json alone."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from radscribe.quiet import peft_notices

    with peft_notices():
        from peft import PeftConfig, get_peft_model
        from peft.utils import get_peft_model_state_dict

    try:
        peft_config = PeftConfig.from_pretrained(str(adapter))
    except (OSError, ValueError, TypeError) as err:
        raise RadscribeError(f"{adapter / 'adapter_config.json'}: not a PEFT adapter config ({err})") from None
    peft_config.base_model_name_or_path = None  # ours is a copy; PEFT warns when it differs from the model's
    if hasattr(peft_config, "init_lora_weights"):
        peft_config.init_lora_weights = True  # PiSSA/LoftQ-style inits read base weights; shapes do not depend on it
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(base))
        try:
            with peft_notices():
                wrapped = get_peft_model(model, peft_config)
        except ValueError as err:  # PEFT: "Target modules {...} not found in the base model"
            raise RadscribeError(f"adapter {adapter} does not fit base {base}: "
                                 f"{(str(err).splitlines() or [''])[0]}; pass the base it was trained on") from None
    return {key: tuple(value.shape) for key, value in get_peft_model_state_dict(wrapped).items()}


def _module(key: str) -> str:
    return key.removeprefix("base_model.model.")


def _identity_part(value):
    if isinstance(value, dict):
        return {k: _identity_part(v) for k, v in sorted(value.items()) if k not in _NOT_IDENTITY}
    if isinstance(value, list):
        return [_identity_part(v) for v in value]
    return value


def _fingerprint(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)
