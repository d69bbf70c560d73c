"""GGUF export through llama.cpp's own converter and quantizer, checked against transformers by running llama.cpp.

The llama.cpp tools are built once per machine by the `llamacpp_tools` fixture (`radscribe llamacpp install`, cached
in ~/.cache/radscribe): on a clean CI machine that build is part of the run (about 10 min on 2 idle cores), and a
failed build fails these tests. The models are real-layout tiny folders (Qwen's real vocabulary, which llama.cpp's
converter requires, 4 text layers, one deepstack tap) widened to 256 so llama-quantize's 256-wide k-quant blocks
apply as they do on the released models, with an adapter whose B matrices are random (it changes outputs from the
first token); MoE adapters include expert LoRA.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from radscribe.cli import main
from radscribe.errors import RadscribeError
from radscribe.interop import gguf, llamacpp
from radscribe.interop.llamacpp import LlamaServer
from radscribe.model.load import load_model, load_processor

ARCHS = ["qwen3_vl", "qwen3_vl_moe"]
ASSETS = Path(__file__).parent / "assets"
# A random model's greedy decoding runs close to ties (its logits are nearly flat over 151,936 tokens: top-1/top-2
# log-probability gaps below 1e-3, while llama.cpp's f16 weights and activations move log-probabilities by ~5e-4),
# so token equality would test rounding, not the conversion. The adapter is therefore trained (in code, a few
# hundred steps) to answer each case with a synthetic report: outputs are real sentences with real margins. Two
# cases share the prompt and differ only in the image, so only a working vision tower gives both answers.
PROMPT_ZH = "图片中的诊断结果是怎样?"
CASES = [("Write a radiology report.", None), (PROMPT_ZH, None), (PROMPT_ZH, 1), (PROMPT_ZH, 2)]
TOKENS = 32


def case_reports() -> list[str]:
    """One synthetic report per case, long enough (40+ tokens in Qwen's vocabulary) for 32 greedy tokens."""
    from radscribe.data.synth import synth_reports

    english = [r for r in synth_reports(40, lang="en") if "lesion" in r]
    chinese = [r for r in synth_reports(40, lang="zh") if "病灶，" in r]
    return [english[0], chinese[0], chinese[1], chinese[2]]


@pytest.fixture(scope="session")
def llamacpp_tools():
    return llamacpp.install()


def measurement_widths():
    """The widths the packaged bits-per-weight table was measured at (bench/gguf.py records them)."""
    from radscribe.model.real_layout import Widths

    return Widths(**json.loads(gguf.BITS_TABLE.read_text())["measured_on"]["widths"])


def make_adapter(base, out, experts: bool, vision: bool = False):
    """An untrained LoRA with random B (it changes outputs from the first token): enough for the refusal tests."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_model(base, device="cpu")
    torch.manual_seed(1)
    targets = ["q_proj", "v_proj"]
    if vision:
        targets = [n for n, _ in model.named_modules() if n.startswith("model.visual.") and n.endswith(".qkv")]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if experts else None)
    get_peft_model(model, config).save_pretrained(out)
    return out


def case_inputs(processor, text: str, seed, target: str | None = None):
    """(transformers inputs, llama-server prompt, images) for a case; with `target`, the inputs end with the
    target's first TOKENS tokens (the answer to learn)."""
    image = None if seed is None else scan(seed)
    inputs, prompt = gguf.chat_inputs(processor, text, image)
    if target is not None:
        answer = torch.tensor([processor.tokenizer(target)["input_ids"][:TOKENS]])
        assert answer.shape[1] == TOKENS
        ids = torch.cat([inputs["input_ids"], answer], 1)
        inputs = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids))
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(answer)], 1)
    return inputs, prompt, [] if image is None else [png(image)]


def train_adapter(base, out, experts: bool, max_steps: int = 300):
    """LoRA r8 on every linear layer of the language model (+ the MoE experts), trained until the merged-to-be
    model answers every case with its report; returns the adapter folder."""
    from peft import get_peft_model

    from radscribe.model.lora import build_lora_config

    torch.manual_seed(0)
    model, processor = load_model(base, dtype="fp32", device="cpu", trainable=True)
    model = get_peft_model(model, build_lora_config(model, rank=8, alpha=16, experts=experts))
    batch = [case_inputs(processor, text, seed, target)[0] for (text, seed), target in zip(CASES, case_reports())]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def case_loss(inputs):
        # logits for the answer positions only: the 151,936-wide head is most of the cost
        out = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=TOKENS + 1)
        return torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), inputs["input_ids"][0, -TOKENS:])

    for step in range(max_steps):
        loss = sum(case_loss(inputs) for inputs in batch) / len(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            print(f"train_adapter: step {step} loss {loss.item():.4f}", flush=True)
        if loss.item() < 0.02:
            break
    assert loss.item() < 0.05, f"the adapter did not learn the cases (loss {loss.item():.3f} after {step + 1} steps)"
    model.save_pretrained(out)
    return out


def scan(seed: int, size: int = 256):
    """A size x size noise image: at 256, 16x16 patches and 8x8 = 64 merged tokens in both transformers (its floor
    is 65,536 px) and llama.cpp, so neither resizes it."""
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8"))


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def built(tmp_path_factory, llamacpp_tools):
    """arch -> {"base", "adapter", "hf" (merged safetensors), "f16" (GGUF export folder)}, built once per module."""
    from radscribe.export import export
    from radscribe.model.real_layout import build_real_layout_model

    cache: dict[str, dict] = {}

    def make(arch: str) -> dict:
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"gguf-{arch}")
            base = build_real_layout_model(arch, root / "base", seed=0, widths=measurement_widths())
            adapter = train_adapter(base, root / "adapter", experts=arch.endswith("moe"))
            hf = export(base, adapter, root / "hf")
            assert main(["export", "--format", "gguf", "--quantize", "f16", "--model", str(base), "--adapter",
                         str(adapter), str(root / "f16")]) == 0
            cache[arch] = {"root": root, "base": base, "adapter": adapter, "hf": hf, "f16": root / "f16"}
        return cache[arch]

    return make


def quantized(entry: dict, quant: str):
    """The export's f16 model quantised by llama-quantize (what `--quantize quant` runs after the converter)."""
    path = entry["root"] / f"model-{quant}.gguf"
    if not path.exists():
        gguf.quantize_gguf(entry["f16"] / gguf.model_file("f16"), path, quant)
    return path


def references(entry: dict, n: int = TOKENS):
    """[(llama-server prompt, images, transformers' greedy tokens of the merged model)] per case."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(entry["hf"], dtype=torch.float32).eval()
    processor = load_processor(entry["hf"])
    out = []
    for text, seed in CASES:
        inputs, prompt, images = case_inputs(processor, text, seed)
        tokens, _ = gguf.hf_greedy(model, inputs, n)
        out.append((prompt, images, tokens))
    return out


@pytest.fixture(scope="module")
def greedy_refs(built):
    cache = {}

    def make(arch):
        if arch not in cache:
            cache[arch] = references(built(arch))
        return cache[arch]

    return make


# --- the tool -------------------------------------------------------------------------------------------------

def test_install_is_a_noop_once_built(llamacpp_tools, capsys):
    marker = llamacpp.install_dir() / "radscribe-build.json"
    before = marker.stat().st_mtime_ns
    again = llamacpp.install()
    assert again == llamacpp_tools and marker.stat().st_mtime_ns == before
    assert "already built" in capsys.readouterr().out
    for name in llamacpp.TARGETS:
        assert (again.bin / name).is_file()
    assert llamacpp.llama_server() == again.bin / "llama-server"


def test_missing_or_wrong_llamacpp_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RADSCRIBE_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv(llamacpp.ENV_VAR, raising=False)
    with pytest.raises(RadscribeError, match="radscribe llamacpp install"):
        llamacpp.find()
    monkeypatch.setenv(llamacpp.ENV_VAR, str(tmp_path))
    assert main(["llamacpp", "path"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "convert_hf_to_gguf.py is missing" in err


def test_env_var_points_at_an_existing_build(llamacpp_tools, monkeypatch):
    monkeypatch.setenv(llamacpp.ENV_VAR, str(llamacpp_tools.root))
    assert llamacpp.find() == llamacpp_tools


def test_sdist_extraction_takes_only_the_vendored_llamacpp(tmp_path):
    def sdist(path, members):
        with tarfile.open(path, "w:gz") as tar:
            for name in members:
                data = b"x"
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return path

    prefix = f"llama_cpp_python-{llamacpp.LLAMA_CPP_PYTHON}/"
    good = sdist(tmp_path / "good.tar.gz", [prefix + "llama_cpp/llama.py", prefix + "vendor/llama.cpp/.git",
                                            prefix + "vendor/llama.cpp/convert_hf_to_gguf.py",
                                            prefix + "vendor/llama.cpp/src/llama.cpp"])
    out = llamacpp._extract_vendored(good, tmp_path / "src")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["convert_hf_to_gguf.py", "src/llama.cpp"]
    bad = sdist(tmp_path / "bad.tar.gz", [prefix + "README.md"])
    with pytest.raises(RadscribeError, match="holds no"):
        llamacpp._extract_vendored(bad, tmp_path / "src2")


# --- export ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_export_writes_the_pair_with_the_published_vocabulary(built, arch):
    from gguf import GGUFReader

    entry = built(arch)
    out = entry["f16"]
    assert {"model-f16.gguf", "mmproj-f16.gguf", "README.md", "Modelfile", "gguf.json", "llama.cpp.log"} <= \
        {p.name for p in out.iterdir()}
    assert not any(p.name.startswith(".merged") for p in out.iterdir())  # the merged safetensors are removed
    text = GGUFReader(str(out / "model-f16.gguf"))
    fields = {k: f.contents() for k, f in text.fields.items() if k.startswith(("general.a", "tokenizer.ggml.pre",
                                                                                "tokenizer.chat", "tokenizer.ggml.eos"))}
    assert fields["general.architecture"] == ("qwen3vlmoe" if arch.endswith("moe") else "qwen3vl")
    assert fields["tokenizer.ggml.pre"] == "qwen2"  # llama.cpp recognised Qwen's real pre-tokenizer
    assert fields["tokenizer.ggml.eos_token_id"] == 151645
    published = json.loads((entry["base"] / "chat_template.json").read_text())["chat_template"]
    assert fields["tokenizer.chat_template"] == published
    mmproj = GGUFReader(str(out / "mmproj-f16.gguf"))
    assert mmproj.fields["clip.projector_type"].contents() == "qwen3vl_merger"
    assert any(t.name.startswith("v.deepstack.") for t in mmproj.tensors)
    readme = (out / "README.md").read_text()
    assert "llama-server -m model-f16.gguf --mmproj mmproj-f16.gguf --host 127.0.0.1" in readme
    assert "llama-mtmd-cli -m model-f16.gguf --mmproj mmproj-f16.gguf --image" in readme
    # sampling defaults from the published generation_config.json, not invented
    generation = json.loads((entry["base"] / "generation_config.json").read_text())
    assert f"--temp {generation['temperature']}" in readme
    assert f"PARAMETER top_k {generation['top_k']}" in (out / "Modelfile").read_text()
    manifest = json.loads((out / "gguf.json").read_text())
    assert manifest["files"] == {"model": "model-f16.gguf", "mmproj": "mmproj-f16.gguf"}
    assert manifest["bytes"]["model"] == (out / "model-f16.gguf").stat().st_size


def test_moe_expert_lora_is_merged_into_the_gguf_experts(built):
    """The fused experts arrive merged and in llama.cpp's layout: ffn_down_exps equals the merged down_proj."""
    from gguf import GGUFReader
    from safetensors import safe_open

    entry = built("qwen3_vl_moe")
    tensors = {t.name: t for t in GGUFReader(str(entry["f16"] / "model-f16.gguf")).tensors}
    down = np.asarray(tensors["blk.0.ffn_down_exps.weight"].data, dtype=np.float32)   # (E, H, I) in numpy order
    key = "model.language_model.layers.0.mlp.experts.down_proj"

    def released(folder):
        for shard in sorted(folder.glob("*.safetensors")):
            with safe_open(str(shard), "pt") as f:
                if key in f.keys():
                    return f.get_tensor(key).float()                                   # (E, I, H)

    merged, base = released(entry["hf"]), released(entry["base"])
    expected = merged.transpose(1, 2).numpy()
    assert down.shape == expected.shape
    assert np.abs(down - expected).max() <= 1e-3 * np.abs(expected).max()  # f16 rounding only
    assert (merged - base).abs().max() > 1e-3  # and the expert LoRA did change them


@pytest.mark.parametrize("arch", ARCHS)
def test_f16_gguf_greedy_equals_transformers(built, greedy_refs, arch):
    entry = built(arch)
    out = entry["f16"]
    cases = greedy_refs(arch)
    processor = load_processor(entry["hf"])
    for (_, _, expected), report in zip(cases, case_reports()):  # transformers answers with the learned reports
        assert expected == processor.tokenizer(report)["input_ids"][:TOKENS]
    assert cases[2][2] != cases[3][2]  # same prompt, other image, other answer
    with LlamaServer(out / "model-f16.gguf", mmproj=out / "mmproj-f16.gguf") as server:
        for prompt, images, expected in cases:
            assert server.complete(prompt, TOKENS, images) == expected


@pytest.mark.parametrize("arch", ARCHS)
def test_q8_0_gguf_agrees_on_90_percent_of_32_tokens(built, greedy_refs, arch):
    entry = built(arch)
    with LlamaServer(quantized(entry, "q8_0"), mmproj=entry["f16"] / "mmproj-f16.gguf") as server:
        for prompt, images, expected in greedy_refs(arch):
            assert gguf.agreement(expected, server.complete(prompt, TOKENS, images))["agreement"] >= 0.9


def test_gguf_export_needs_a_gguf_quantization(built, tmp_path, capsys):
    entry = built("qwen3_vl")
    code = main(["export", "--format", "gguf", "--quantize", "4bit", "--model", str(entry["base"]), "--adapter",
                 str(entry["adapter"]), str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "f16, q8_0, q4_k_m" in err
    assert not (tmp_path / "x").exists()


# --- GGUF LoRA ------------------------------------------------------------------------------------------------

def test_gguf_lora_on_the_base_gguf_generates_like_the_merged_model(built, greedy_refs, tmp_path):
    entry = built("qwen3_vl")
    assert main(["export", "--format", "gguf", "--quantize", "f16", "--model", str(entry["base"]),
                 str(tmp_path / "base")]) == 0
    assert main(["export", "--format", "gguf-lora", "--model", str(entry["base"]), "--adapter",
                 str(entry["adapter"]), str(tmp_path / "lora")]) == 0
    assert "--lora lora-f16.gguf" in (tmp_path / "lora" / "README.md").read_text()
    prompt, _, expected = greedy_refs("qwen3_vl")[0]
    with LlamaServer(tmp_path / "base" / "model-f16.gguf") as server:
        base_tokens = server.complete(prompt, 32)
    with LlamaServer(tmp_path / "base" / "model-f16.gguf", lora=tmp_path / "lora" / "lora-f16.gguf") as server:
        lora_tokens = server.complete(prompt, 32)
    assert base_tokens != expected  # the base alone answers differently ...
    assert gguf.agreement(expected, lora_tokens)["agreement"] >= 0.9  # ... the LoRA brings the merged answer back


@pytest.mark.parametrize("kind", ["experts", "vision"])
def test_gguf_lora_refuses_what_llamacpp_would_drop(real_model_dir, llamacpp_tools, tmp_path, capsys, kind):
    arch = "qwen3_vl_moe" if kind == "experts" else "qwen3_vl"
    adapter = make_adapter(real_model_dir(arch), tmp_path / "adapter", experts=kind == "experts",
                           vision=kind == "vision")
    code = main(["export", "--format", "gguf-lora", "--model", str(real_model_dir(arch)), "--adapter", str(adapter),
                 str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--format gguf" in err
    assert ("MoE experts" if kind == "experts" else "vision tower") in err
    assert not (tmp_path / "out").exists()


# --- the memory arithmetic ------------------------------------------------------------------------------------

def test_size_prediction_matches_a_real_export_of_another_shape(built, tmp_path):
    """Bits per class measured on the 4-layer MoE export predict a 6-layer, 6-expert, wider one within 3 %."""
    import dataclasses

    from radscribe.model.real_layout import build_real_layout_model

    entry = built("qwen3_vl_moe")
    assert main(["export", "--format", "gguf", "--quantize", "q4_k_m", "--model", str(entry["base"]), "--adapter",
                 str(entry["adapter"]), str(tmp_path / "measured")]) == 0
    other = build_real_layout_model("qwen3_vl_moe", tmp_path / "other", seed=1, widths=dataclasses.replace(
        measurement_widths(), text_hidden=512, text_layers=6, experts=6, moe_intermediate=512))
    assert main(["export", "--format", "gguf", "--quantize", "q4_k_m", "--model", str(other),
                 str(tmp_path / "actual")]) == 0
    predicted = gguf.plan(other, "q4_k_m", bits_from=tmp_path / "measured")
    actual = json.loads((tmp_path / "actual" / "gguf.json").read_text())["bytes"]
    for part in ("model", "mmproj"):
        assert abs(predicted.bytes[part] / actual[part] - 1) < 0.03, (part, predicted.bytes[part], actual[part])


def test_packaged_bits_table_is_what_the_tiny_exports_measure(built):
    """gguf_bits.json (written by bench/gguf.py) holds exactly what llama.cpp's files measure today."""
    table = json.loads(gguf.BITS_TABLE.read_text())
    assert table["llama_cpp_python"] == llamacpp.LLAMA_CPP_PYTHON
    for arch in ARCHS:
        entry = built(arch)
        name = "qwen3vlmoe" if arch.endswith("moe") else "qwen3vl"
        mmproj = entry["f16"] / gguf.MMPROJ_FILE
        for quant in gguf.QUANTS:
            model = entry["f16"] / gguf.model_file("f16") if quant == "f16" else quantized(entry, quant)
            fresh = gguf.bits_table({"model": gguf.measure(model), "mmproj": gguf.measure(mmproj)})
            assert table[name][quant]["bits"] == fresh["bits"], (name, quant)
            # header bytes differ with the folder name the converter records; the vocabulary dominates them
            for part, size in fresh["other_bytes"].items():
                assert abs(table[name][quant]["other_bytes"][part] - size) < 4096, (name, quant, part)


def test_dry_run_for_the_published_30b_a3b_config(tmp_path, capsys):
    """From the published config.json alone: all 31.07 B parameters placed in one of the two files, the KV cache
    from the config, a verdict that follows the numbers, and llama-quantize's higher-precision tensors."""
    config_dir = tmp_path / "Qwen3-VL-30B-A3B-Instruct"
    config_dir.mkdir()
    shutil.copy(ASSETS / "Qwen3-VL-30B-A3B-Instruct" / "config.json", config_dir)
    p = gguf.plan(config_dir, "q4_k_m", ctx=8192, gpu_mem_gib=24)

    _, shapes = gguf._meta_shapes(config_dir)
    assert sum(p.params.values()) == sum(math.prod(s) for s in shapes.values()) == 31_070_754_032
    assert p.params["mmproj"] == sum(math.prod(s) for n, s in shapes.items() if n.startswith("model.visual."))
    text = json.loads((config_dir / "config.json").read_text())["text_config"]
    assert p.kv_bytes == 2 * text["num_hidden_layers"] * text["num_key_value_heads"] * text["head_dim"] * 2 * 8192
    assert p.fits == (p.total_bytes <= 24 * 1024 ** 3)
    c = p.classes
    assert c["blk.*.ffn_gate_inp.weight"]["bits"] == 32  # the router stays f32
    assert c["output.weight"]["bits"] > c["token_embd.weight"]["bits"]  # output kept at Q6_K
    assert c["blk.*.ffn_up_exps.weight"]["bits"] < c["blk.*.ffn_down_exps.weight"]["bits"]  # half the down layers Q6_K
    assert 8 * p.bytes["model"] / p.params["model"] < 6  # a 4-bit-class file, not 16-bit

    assert main(["export", "--dry-run", "--format", "gguf", "--quantize", "q4_k_m", "--model", str(config_dir),
                 "--gpu-mem", f"{p.total_bytes / 1024 ** 3 - 0.5:.2f}"]) == 0
    out = capsys.readouterr().out
    assert "model-q4_k_m.gguf" in out and "mmproj-f16.gguf" in out and "KV cache at --ctx 8192" in out
    assert "does NOT fit" in out


@pytest.mark.parametrize("argv, message", [
    (["--dry-run", "--format", "hf"], "add --format gguf"),
    (["--dry-run", "--format", "gguf", "--adapter", "x"], "--adapter would have no effect"),
    (["--format", "gguf", "--ctx", "4096", "OUT"], "only apply with --dry-run"),
    (["--dry-run", "--format", "gguf", "--quantize", "4bit"], "f16, q8_0, q4_k_m"),
    (["--format", "gguf-lora", "--dtype", "bf16", "OUT"], "merges nothing"),
    (["--dry-run", "--format", "gguf", "--ctx", "0"], "positive"),
])
def test_export_flags_that_cannot_take_effect_are_refused(tmp_path, capsys, argv, message):
    shutil.copytree(ASSETS / "Qwen3-VL-30B-A3B-Instruct", tmp_path / "m")
    assert main(["export", "--model", str(tmp_path / "m"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
