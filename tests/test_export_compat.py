"""A merged export loads and generates the same tokens in the transformers releases users serve with.

transformers 4.57 (what older vLLM releases and many tools run on) and 5.20 (the newest release inside vLLM 0.33's
pin, `transformers>=5.16.1,<5.21`) each run in a scratch venv layered on the torch + torchvision venv
(tests/scratch_venv.py), loading exports of the published-download fixtures (`real_model_dir`, dense and MoE) with
the stock Auto classes only: no radscribe code runs there. Two exports per architecture: the default one (the
base's bf16) and an fp32 one. The fp32 export must generate what base + adapter generates here (the merge in fp32
is exact up to float rounding); the bf16 export must generate the same tokens in every release as here (the same
weights, so any difference is in how a release reads the folder: a lost mrope setting, another tokenizer).
"""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import transformers
from peft import PeftModel
from PIL import Image
from scratch_venv import TORCHVISION, ScratchVenv
from test_export import make_adapter

from radscribe.export import export
from radscribe.model.load import load_model

RELEASES = ["4.57.6", "5.20.2"]
"""The newest 4.57.x, and the newest 5.x vLLM 0.33 accepts."""
NEW_TOKENS = 8
ARCHS = ["qwen3_vl", "qwen3_vl_moe"]
CASES = [(arch, dtype) for arch in ARCHS for dtype in ("bf16", "fp32")]


# The three functions below run both here and, as source text, inside the scratch venvs: stdlib, torch,
# transformers and PIL only.
def prompts(image_file):
    """A text-only and an image prompt, as chat messages."""
    from PIL import Image

    image = Image.open(image_file).convert("RGB")
    return {"text": [{"role": "user", "content": [{"type": "text", "text": "What is 2 plus 2?"}]}],
            "image": [{"role": "user", "content": [{"type": "image", "image": image},
                                                   {"type": "text", "text": "图片中的诊断结果是怎样?"}]}]}


def greedy(model, processor, image_file, n, logits_prefix):
    """Prompt ids and `n` greedily generated ids per prompt; the next-token logits go to LOGITS_PREFIX-KIND.npy."""
    import numpy as np
    import torch

    out = {}
    for kind, messages in prompts(image_file).items():
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
            ids = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        np.save(f"{logits_prefix}-{kind}.npy", logits.float().numpy())
        out[kind] = {"prompt": inputs["input_ids"][0].tolist(), "new": ids[0, inputs["input_ids"].shape[1]:].tolist()}
    return out


def describe(folder):
    """What the stock Auto classes of this transformers read from `folder`, and the model they load."""
    import transformers
    from transformers import (
        AutoConfig,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    config = AutoConfig.from_pretrained(folder)
    text = config.text_config
    rope = dict(getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {})
    tokenizer = AutoTokenizer.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    dtype_argument = "torch_dtype" if transformers.__version__.startswith("4.") else "dtype"
    model = AutoModelForImageTextToText.from_pretrained(folder, **{dtype_argument: "auto"}).eval()
    stored_dtype = str(model.dtype)
    facts = {
        "model_class": type(model).__name__, "stored_dtype": stored_dtype,
        "mrope_section": rope.get("mrope_section"), "mrope_interleaved": rope.get("mrope_interleaved"),
        "rope_theta": rope.get("rope_theta", getattr(text, "rope_theta", None)),
        "vocab_size": text.vocab_size, "tie_word_embeddings": config.tie_word_embeddings,
        "hello": tokenizer("Hello world")["input_ids"],
        "chat_ids": tokenizer("<|im_start|>user\n你好<|im_end|>\n")["input_ids"],
        "image_pad": tokenizer.convert_tokens_to_ids("<|image_pad|>"), "eos": tokenizer.eos_token,
        "pad": tokenizer.pad_token, "processor": type(processor).__name__,
        "image_processor": type(processor.image_processor).__name__,
        "video_processor": type(getattr(processor, "video_processor", None)).__name__,
    }
    return facts, model.float(), processor


IN_VENV = """
import json, sys
import transformers
image_file, n, out_dir, *folders = sys.argv[1:]
result = {"transformers": transformers.__version__}
for i, folder in enumerate(folders):
    facts, model, processor = describe(folder)
    result[folder] = {**facts, "greedy": greedy(model, processor, image_file, int(n), f"{out_dir}/{i}")}
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def exported(real_model_dir, tmp_path_factory):
    """arch -> {"base", "adapter", "bf16", "fp32"} folders, plus the image the prompts show."""
    root = tmp_path_factory.mktemp("compat")
    image = root / "scan.png"
    # 256 x 256 = the published processor's floor (65,536 px) on its 32 px grid: no resize. Resized, torchvision's
    # and PIL's bicubic differ (~1e-3 in these logits), and only PIL's runs here (CPU torch, no torchvision).
    Image.fromarray((np.random.RandomState(0).rand(256, 256, 3) * 255).astype("uint8")).save(image)
    folders = {"image": image}
    for arch in ARCHS:
        base = real_model_dir(arch)
        adapter = make_adapter(base, root / f"{arch}-adapter", experts=arch.endswith("moe"))
        folders[arch] = {"base": base, "adapter": adapter, "bf16": export(base, adapter, root / f"{arch}-bf16"),
                         "fp32": export(base, adapter, root / f"{arch}-fp32", dtype="fp32")}
    return folders


def run_in(venv: ScratchVenv, exported, out_dir):
    """Facts and greedy tokens of every export, read by the stock Auto classes of `venv`'s transformers."""
    venv.ensure()
    if venv.build_seconds is not None:
        print(f"built {venv.requirements} in {venv.path} in {venv.build_seconds:.0f} s")
    code = "\n\n".join(inspect.getsource(f) for f in (prompts, greedy, describe)) + IN_VENV
    folders = [str(exported[arch][dtype]) for arch, dtype in CASES]
    return venv.run(code, str(exported["image"]), str(NEW_TOKENS), str(out_dir), *folders, timeout=1800)


@pytest.fixture(scope="module")
def here(exported, tmp_path_factory):
    """This transformers (5.24) reading the exports, and base + adapter (PEFT's unmerged LoRA) in this environment.

    The Auto-class reading runs in the torch + torchvision venv, which holds this environment's transformers:
    `AutoProcessor` for Qwen3-VL needs torchvision for its video processor, and the CPU torch here has none."""
    out = tmp_path_factory.mktemp("here")
    result = {"auto": run_in(ScratchVenv(TORCHVISION), exported, out)}
    assert result["auto"]["transformers"] == transformers.__version__
    for arch in ARCHS:
        f = exported[arch]
        plain, processor = load_model(f["base"], dtype="fp32", device="cpu")
        # PEFT's own forward (the loader would merge): the reference a merge must reproduce
        with_adapter = PeftModel.from_pretrained(load_model(f["base"], dtype="fp32", device="cpu")[0], f["adapter"])
        result[arch] = {"adapter": greedy(with_adapter, processor, exported["image"], NEW_TOKENS, out / f"{arch}-a"),
                        "plain": greedy(plain, processor, exported["image"], NEW_TOKENS, out / f"{arch}-p")}
    return result, out


@pytest.mark.slow
@pytest.mark.timeout(3600)  # a clean machine builds the torch + torchvision venv first (minutes; see the README)
@pytest.mark.parametrize("release", RELEASES)
def test_export_loads_and_generates_the_same_tokens_in_another_transformers(release, exported, here, real_model_dir,
                                                                           tmp_path):
    there = run_in(ScratchVenv([f"transformers=={release}"], base=ScratchVenv(TORCHVISION)), exported, tmp_path)
    assert there["transformers"] == release
    ours, ours_dir = here
    folders = [str(exported[arch][dtype]) for arch, dtype in CASES]

    for i, ((arch, dtype), folder) in enumerate(zip(CASES, folders)):
        theirs, mine = there[folder], ours["auto"][folder]
        base_config = json.loads((real_model_dir(arch) / "config.json").read_text())["text_config"]
        # the published settings read back: mrope as the base has it, Qwen's real ids, the Auto classes' own types
        assert theirs["mrope_section"] == base_config["rope_scaling"]["mrope_section"] == [4, 2, 2], folder
        assert theirs["mrope_interleaved"] is True and theirs["rope_theta"] == base_config["rope_theta"], folder
        assert theirs["stored_dtype"] == {"bf16": "torch.bfloat16", "fp32": "torch.float32"}[dtype], folder
        assert theirs["hello"] == [9707, 1879] and theirs["chat_ids"] == [151644, 872, 198, 108386, 151645, 198]
        assert (theirs["image_pad"], theirs["eos"], theirs["pad"]) == (151655, "<|im_end|>", "<|endoftext|>")
        assert theirs["processor"] == "Qwen3VLProcessor"  # the MoE folders name the same processor
        assert theirs["video_processor"] == "Qwen3VLVideoProcessor"
        assert theirs["model_class"] == mine["model_class"] and theirs["vocab_size"] == 151936
        # the same prompt ids, the same generated ids, the same next-token logits as this environment
        for kind in ("text", "image"):
            assert theirs["greedy"][kind] == mine["greedy"][kind], (folder, kind)
            np.testing.assert_allclose(np.load(tmp_path / f"{i}-{kind}.npy"),
                                       np.load(ours_dir / f"{i}-{kind}.npy"), rtol=0, atol=1e-4,
                                       err_msg=f"{folder} {kind}")
        if dtype == "fp32":  # ... and what base + adapter generates here, which differs from the base alone
            for kind in ("text", "image"):
                assert theirs["greedy"][kind] == ours[arch]["adapter"][kind], (folder, kind)
                adapter, plain = (np.load(ours_dir / f"{arch}-{who}-{kind}.npy") for who in ("a", "p"))
                np.testing.assert_allclose(np.load(tmp_path / f"{i}-{kind}.npy"), adapter, rtol=0, atol=1e-4)
                assert np.abs(adapter - plain).max() > 0.1, (arch, kind)
