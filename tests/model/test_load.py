"""The one model loader: folders, processors without torchvision, dtypes, adapters and user errors."""

from __future__ import annotations

import importlib.util
import inspect
import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from peft import get_peft_model
from scratch_venv import TORCHVISION, ScratchVenv

from radscribe.errors import RadscribeError
from radscribe.model import load as loader
from radscribe.model import lora
from radscribe.model.load import load_model, load_processor, resolve_adapter


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


def _inputs(processor, kind="flat"):
    # Also run as it is in the torchvision venv (test_autoprocessor_...): keep its imports inside.
    from PIL import Image

    from radscribe.data.synth import render, sample_truth

    if kind == "flat":
        image = Image.new("RGB", (128, 128), (200, 80, 10))
    else:  # a phantom that fits both patch grids (Qwen3-VL: 32 px, Qwen2.5-VL: 28 px), or one that must be resized
        image = Image.fromarray(render(sample_truth(0, 3), 0, 3, 224 if kind == "phantom" else 160))
        image = image if kind == "phantom" else image.resize((150, 110), Image.BICUBIC)
    chat = [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": "图片中的诊断结果是怎样?"}]}]
    text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return processor(text=[text], images=[image], return_tensors="pt")


@pytest.fixture
def no_torchvision(monkeypatch):
    """The CPU-torch condition (torchvision absent or unimportable), forced, so GPU machines test this path too."""
    monkeypatch.setattr(loader, "_torchvision_available", lambda: False)


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen3_vl_moe", "qwen2_5_vl"])
def test_processor_without_torchvision_loads_and_round_trips(models, arch, tmp_path, no_torchvision):
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


GREY_LEVEL = 2 / 255
"""One 8-bit grey level in pixel_values (Qwen's mean/std 0.5 map 0..255 to -1..1)."""
AUTOPROCESSOR_RUN = """
import json, sys
import numpy as np
from radscribe.model import load

out, folders = sys.argv[1], dict(zip(sys.argv[2::2], sys.argv[3::2]))
result = {"torchvision": load._torchvision_available()}
for arch, folder in folders.items():
    processor = load.load_processor(folder)
    for kind in ("phantom", "resized"):
        np.savez(f"{out}/{arch}-{kind}.npz", **{k: v.numpy() for k, v in _inputs(processor, kind).items()})
    result[arch] = {"processor": type(processor).__module__ + "." + type(processor).__name__,
                    "video_processor": type(getattr(processor, "video_processor", None)).__name__,
                    "image_processor": type(processor.image_processor).__name__}
print(json.dumps(result))
"""


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the first build of the venv (cached afterwards) installs ~5.5 GB of wheels
def test_autoprocessor_with_torchvision_matches_the_path_without_it(models, real_model_dir, tmp_path, request):
    # Where torchvision imports (GPU machines: what real users have), load_processor takes AutoProcessor with its
    # video processor. Run that path for real in a venv that has torchvision, on the same folders (ours and the
    # published download's layout), and compare.
    venv = ScratchVenv(TORCHVISION).ensure()
    if venv.build_seconds is not None:
        print(f"built the torchvision venv {venv.path} in {venv.build_seconds:.0f} s")
    folders = {**{f"tiny-{arch}": folder for arch, folder in models.items()},
               **{f"real-{arch}": real_model_dir(arch) for arch in models}}
    args = [a for name, folder in folders.items() for a in (name, str(folder))]
    result = venv.run(inspect.getsource(_inputs) + AUTOPROCESSOR_RUN, str(tmp_path), *args)
    assert result["torchvision"] is True
    request.getfixturevalue("no_torchvision")  # here: the path without torchvision, whatever this machine has
    for arch, folder in folders.items():
        upstream = {"qwen2_5_vl": "Qwen2_5_VLProcessor"}.get(arch.split("-", 1)[1], "Qwen3VLProcessor")
        assert result[arch]["processor"].startswith("transformers.models.")  # AutoProcessor's own class
        assert result[arch]["processor"].endswith("." + upstream)
        assert result[arch]["video_processor"].endswith("VideoProcessor")
        processor = load_processor(folder)
        for kind in ("phantom", "resized"):
            ours, theirs = _inputs(processor, kind), np.load(tmp_path / f"{arch}-{kind}.npz")
            assert set(ours) == set(theirs.files), (arch, kind)
            for key in ours:
                if key != "pixel_values":  # the same tokens, image grid and token types
                    np.testing.assert_array_equal(ours[key].numpy(), theirs[key], err_msg=f"{arch} {kind} {key}")
            # Without a resize both image processors agree to float rounding. Resizing, PIL's and torchvision's
            # bicubic kernels differ (a = -0.5 vs -0.75) and each rounds to 8 bits: within 2 grey levels.
            tolerance = 1e-5 if kind == "phantom" else 2 * GREY_LEVEL
            np.testing.assert_allclose(ours["pixel_values"].numpy(), theirs["pixel_values"], rtol=0, atol=tolerance,
                                       err_msg=f"{arch} {kind}")


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
    assert processor.tokenizer.pad_token == "<|endoftext|>"
    trainable, _ = load_model(models["qwen3_vl"], device="cpu", trainable=True)
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())  # full fine-tuning
    # every dtype the CLI offers loads as that dtype; "auto" keeps the tiny checkpoint's fp32
    expected = {"auto": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for dtype in loader.DTYPES:
        loaded, _ = load_model(models["qwen3_vl"], dtype=dtype, device="cpu")
        assert {p.dtype for p in loaded.parameters()} == {expected[dtype]}, dtype
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
        load_model(tmp_path / "noweights")
    # the processor needs no weights (a GGUF export's processor/ folder has none), but its own files
    with pytest.raises(RadscribeError, match="cannot load the processor, are the tokenizer and preprocessor files"):
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


def _expert_adapter(models, tmp_path):
    """A MoE adapter with random non-zero LoRA B on q/v/o/down_proj and on the fused experts (target_parameters)."""
    from test_export import make_adapter

    return make_adapter(models["qwen3_vl_moe"], tmp_path / "adapter", experts=True)


def test_inference_merges_the_expert_adapter_and_matches_peft_unmerged(models, tmp_path):
    from peft import PeftModel

    adapter = _expert_adapter(models, tmp_path)
    merged, processor = load_model(models["qwen3_vl_moe"], adapter=adapter, device="cpu")
    # a plain transformers model: no LoRA layer is left to rebuild the (E, in, out) expert delta per forward
    assert type(merged).__name__ == "Qwen3VLMoeForConditionalGeneration"
    assert not [n for n, _ in merged.named_modules() if "lora" in n]
    plain, _ = load_model(models["qwen3_vl_moe"], device="cpu")
    unmerged = PeftModel.from_pretrained(load_model(models["qwen3_vl_moe"], device="cpu")[0], adapter).eval()
    experts = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    assert not torch.equal(merged.state_dict()[experts], plain.state_dict()[experts])  # the expert LoRA is in
    inputs = _inputs(processor)
    with torch.no_grad():
        logits = {name: m(**inputs).logits for name, m in
                  (("merged", merged), ("unmerged", unmerged), ("plain", plain))}
        tokens = {name: m.generate(**inputs, max_new_tokens=8, do_sample=False)
                  for name, m in (("merged", merged), ("unmerged", unmerged))}
    # fp32: merging changes only the order of float additions
    assert (logits["merged"] - logits["unmerged"]).abs().max() < 1e-5
    assert (logits["unmerged"] - logits["plain"]).abs().max() > 0.1  # ... and the adapter matters
    assert torch.equal(tokens["merged"], tokens["unmerged"])


def test_inference_on_a_4bit_base_merges_the_expert_lora_only(models, tmp_path):
    from peft import PeftModel
    from peft.tuners.lora.layer import ParamWrapper

    adapter = _expert_adapter(models, tmp_path)
    merged, processor = load_model(models["qwen3_vl_moe"], adapter=adapter, quantization="4bit", device="cpu")
    wrappers = [m for m in merged.modules() if isinstance(m, ParamWrapper)]
    assert wrappers and all(m.merged for m in wrappers)  # the bf16/fp32 experts: delta folded in once
    linear = [m for m in merged.modules() if hasattr(m, "lora_A") and not isinstance(m, ParamWrapper)]
    assert linear and not any(m.merged for m in linear)  # nf4 linears: left unmerged (no re-quantisation)
    base, _ = load_model(models["qwen3_vl_moe"], quantization="4bit", device="cpu")
    unmerged = PeftModel.from_pretrained(base, adapter).eval()
    inputs = _inputs(processor)
    with torch.no_grad():
        difference = (merged(**inputs).logits - unmerged(**inputs).logits).abs().max()
    assert difference < 1e-4


@pytest.mark.parametrize("moe_intermediate, square", [(64, "down_proj"), (32, "gate_up_proj")])
def test_square_experts_are_read_in_the_released_layout(tmp_path, moe_intermediate, square):
    """With moe_intermediate_size == hidden_size (down_proj) or twice it == hidden_size (gate_up_proj) a released
    expert tensor has its in-memory shape, and transformers 5.24's shape-checked Transpose keeps it untransposed;
    the one loader reads every expert tensor as the file's transpose, as llama.cpp's converter does."""
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    from radscribe.model.tiny import build_tiny_model

    base = build_tiny_model("qwen3_vl_moe", tmp_path / "base", seed=0, text_hidden=64,
                            moe_intermediate=moe_intermediate)
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys() if k.endswith(loader.EXPERT_TENSORS)}  # noqa: SIM118
    assert len(stored) == 4  # two layers, two fused tensors each
    model, _ = load_model(base, device="cpu", dtype="fp32")
    params = dict(model.named_parameters())
    for name, tensor in stored.items():
        assert torch.equal(params[name], tensor.transpose(1, 2)), name
    # what it corrects: plain transformers keeps the square one as stored (the other it transposes itself)
    plain = dict(AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32).named_parameters())
    for name, tensor in stored.items():
        assert torch.equal(plain[name], tensor if name.endswith(square) else tensor.transpose(1, 2)), name
