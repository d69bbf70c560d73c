"""The one model loader: folders, processors without torchvision, dtypes, adapters and user errors."""

from __future__ import annotations

import importlib.util
import json
import pickle
import shutil

import pytest
import torch
from peft import get_peft_model
from PIL import Image

from radscribe.errors import RadscribeError
from radscribe.model import load as loader
from radscribe.model import lora
from radscribe.model.load import load_model, load_processor, resolve_adapter


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    # the session's seed-0 tiny models (tests/conftest.py), shared with other test files; read-only here
    return {arch: tiny_model_dir(arch) for arch in ("qwen3_vl", "qwen3_vl_moe", "qwen2_5_vl")}


@pytest.fixture(scope="module")
def run_dir(models, tmp_path_factory):
    """A run folder whose adapter has non-zero LoRA B weights (so it changes the model)."""
    torch.manual_seed(1)
    model, processor = load_model(models["qwen3_vl"], device="cpu", trainable=True)
    peft_model = get_peft_model(model, lora.build_lora_config(model, rank=4, alpha=8))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    run = tmp_path_factory.mktemp("run")
    peft_model.save_pretrained(run / "adapter")
    processor.save_pretrained(run / "adapter")
    return run


def _inputs(processor, size=128):
    image = Image.new("RGB", (size, size), (200, 80, 10))
    chat = [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": "图片中的诊断结果是怎样?"}]}]
    text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return processor(text=[text], images=[image], return_tensors="pt")


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen3_vl_moe", "qwen2_5_vl"])
def test_processor_loads_without_torchvision_and_round_trips(models, arch, tmp_path):
    assert importlib.util.find_spec("torchvision") is None  # this machine's condition (FIELD_NOTES)
    processor = load_processor(models[arch])
    assert type(processor).__name__ == {"qwen2_5_vl": "Qwen2_5_VLProcessor"}.get(arch, "Qwen3VLProcessor")
    assert getattr(processor, "video_processor", None) is None
    unpickled = pickle.loads(pickle.dumps(processor))  # DataLoader / datasets workers pickle it
    assert type(unpickled) is type(processor)
    processor.save_pretrained(tmp_path / "p")
    shutil.copy(models[arch] / "config.json", tmp_path / "p")
    shutil.copy(models[arch] / "model.safetensors", tmp_path / "p")
    again = load_processor(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "processor_config.json").read_text())["processor_class"] == type(
        processor).__name__  # the upstream name, so AutoProcessor loads it where torchvision exists
    a, b, c = _inputs(processor), _inputs(again), _inputs(unpickled)
    assert a.keys() == b.keys() and "mm_token_type_ids" in a
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)


def test_processor_loads_a_released_style_folder(models, tmp_path):
    # Released Qwen3-VL folders keep the image processor in preprocessor_config.json, typed as the fast one
    folder = tmp_path / "released"
    shutil.copytree(models["qwen3_vl"], folder)
    nested = json.loads((folder / "processor_config.json").read_text())
    image = nested.pop("image_processor")
    image.update(image_processor_type="Qwen2VLImageProcessorFast", processor_class="Qwen3VLProcessor")
    (folder / "preprocessor_config.json").write_text(json.dumps(image))
    (folder / "processor_config.json").unlink()
    processor = load_processor(folder)
    reference = load_processor(models["qwen3_vl"])
    a, b = _inputs(processor), _inputs(reference)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_load_model_modes_and_dtypes(models):
    model, processor = load_model(models["qwen3_vl"], device="cpu")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32  # "auto" keeps the tiny checkpoint's fp32
    assert processor.tokenizer.pad_token == "<|endoftext|>"
    trainable, _ = load_model(models["qwen3_vl"], device="cpu", trainable=True)
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())  # full fine-tuning
    bf16, _ = load_model(models["qwen3_vl"], dtype="bf16", device="cpu")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    with pytest.raises(RadscribeError, match="dtype 'half'"):
        load_model(models["qwen3_vl"], dtype="half")


def test_adapter_from_run_or_adapter_folder_changes_generations(models, run_dir):
    assert resolve_adapter(run_dir) == run_dir / "adapter"
    assert resolve_adapter(run_dir / "adapter") == run_dir / "adapter"
    base, processor = load_model(models["qwen3_vl"], device="cpu")
    tuned, _ = load_model(models["qwen3_vl"], adapter=run_dir, device="cpu")
    assert not tuned.training and not any(p.requires_grad for p in tuned.parameters())
    inputs = _inputs(processor)
    with torch.no_grad():
        a = base.generate(**inputs, max_new_tokens=8, do_sample=False)
        b = tuned.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert a.shape[1] > inputs["input_ids"].shape[1]
    assert not torch.equal(a, b)
    again, _ = load_model(models["qwen3_vl"], adapter=run_dir / "adapter", device="cpu", trainable=True)
    trainable = [n for n, p in again.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_user_mistakes_are_one_line_errors(models, run_dir, tmp_path, monkeypatch):
    with pytest.raises(RadscribeError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RadscribeError, match="no config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "noweights").mkdir()
    shutil.copy(models["qwen3_vl"] / "config.json", tmp_path / "noweights")
    with pytest.raises(RadscribeError, match="no \\*.safetensors"):
        load_processor(tmp_path / "noweights")
    (tmp_path / "text-only").mkdir()
    (tmp_path / "text-only" / "config.json").write_text('{"model_type": "gpt2"}')
    shutil.copy(models["qwen3_vl"] / "model.safetensors", tmp_path / "text-only")
    with pytest.raises(RadscribeError, match="cannot load the processor"):
        load_model(tmp_path / "text-only")
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        shutil.copy(models["qwen3_vl"] / name, tmp_path / "text-only")
    with pytest.raises(RadscribeError, match="cannot load the model"):
        load_model(tmp_path / "text-only")
    with pytest.raises(RadscribeError, match="adapter .* does not exist"):
        resolve_adapter(tmp_path / "missing-run")
    with pytest.raises(RadscribeError, match="holds no adapter_config.json"):
        load_model(models["qwen3_vl"], adapter=tmp_path / "empty")
    with pytest.raises(RadscribeError, match="not supported"):
        load_model(models["qwen3_vl"], quantization="8bit")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(RadscribeError, match=r"pip install 'radscribe\[qlora\]'"):
        load_model(models["qwen3_vl"], quantization="4bit")
    assert loader.DTYPES == ("auto", "bf16", "fp16", "fp32")
