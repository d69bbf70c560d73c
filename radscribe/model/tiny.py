"""Tiny, randomly initialised Qwen-VL models of the real transformers classes, built offline in seconds.

Run as: radscribe tiny-model --arch qwen3_vl|qwen3_vl_moe|qwen2_5_vl OUT [--seed N] [--text-hidden 128 ...]
(this is `--layout ours`, the default; `--layout real`, the published download's files: radscribe.model.real_layout)

The folder it writes looks like a released checkpoint (config.json, generation_config.json, model.safetensors,
tokenizer files with a Qwen-style chat template, preprocessor_config.json, processor_config.json), so tests and
the demo load it through `radscribe.model.load` exactly as they would load Qwen3-VL from disk. MoE experts are
written in the released layout (gate_up_proj (E, H, 2I), down_proj (E, I, H)): transformers transposes them on
load, and DeepSpeed ZeRO-3's load path transposes unconditionally, so the in-memory layout would not load there.

The tokenizer is a byte-level BPE trained with `tokenizers` on report texts (the Chinese and English reports of
`radscribe.data.synth` by default, or the prompts and reports of a prepared dataset), wrapped as `Qwen2Tokenizer`
with the Qwen special tokens; the Qwen pre-tokenizer regex makes whole Chinese clauses single tokens, so a few
hundred merges cover a templated report corpus.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from radscribe.errors import RadscribeError
from radscribe.model.load import processor_class_without_video
from radscribe.quiet import import_deepspeed_quietly

ARCHS = ("qwen3_vl", "qwen3_vl_moe", "qwen2_5_vl")

# The Qwen special tokens, in the order the released tokenizers number them (after the BPE vocabulary).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

PROMPTS = ["<image>图片中的诊断结果是怎样?", "<image>What are the findings in this image?"]

# A Qwen-style chat template: image/video parts become <|vision_start|><|image_pad|><|vision_end|>, which the
# processor expands to one pad per merged patch; plain-string content (text-only messages) passes through.
# No whitespace control and no newline right after a block tag: HF renders with trim_blocks, which would eat it.
_TURNS = (
    "{% for message in messages %}"
    "<|im_start|>{{ message.role }}\n"
    "{% if message.content is string %}{{ message.content }}"
    "{% else %}{% for part in message.content %}"
    "{% if part.type == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part.type == 'video' or 'video' in part %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part.text }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_template(default_system: str = "") -> str:
    """The Jinja chat template; Qwen2.5-VL's released one opens with a default system turn, Qwen3-VL's does not."""
    if not default_system:
        return _TURNS
    return ("{% if messages[0].role != 'system' %}<|im_start|>system\n" + default_system + "<|im_end|>\n{% endif %}"
            + _TURNS)


@dataclass(frozen=True)
class _ArchSpec:
    """What differs between the three families, as data (the model classes carry the rest)."""
    config_class: str
    processor_class: str
    patch_size: int
    image_mean: tuple
    image_std: tuple
    default_system: str


_SPECS = {
    "qwen3_vl": _ArchSpec("Qwen3VLConfig", "Qwen3VLProcessor", 16, (0.5,) * 3, (0.5,) * 3, ""),
    "qwen3_vl_moe": _ArchSpec("Qwen3VLMoeConfig", "Qwen3VLProcessor", 16, (0.5,) * 3, (0.5,) * 3, ""),
    "qwen2_5_vl": _ArchSpec("Qwen2_5_VLConfig", "Qwen2_5_VLProcessor", 14,
                            (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711),
                            "You are a helpful assistant."),
}


def builtin_corpus(n: int = 2000) -> list[str]:
    """The default tokenizer corpus: the prompts plus `n` Chinese and `n` English synthetic reports."""
    from radscribe.data.synth import synth_reports

    return PROMPTS + list(synth_reports(n, lang="zh")) + list(synth_reports(n, lang="en"))


def dataset_corpus(dataset_dir: str | Path) -> list[str]:
    """Every prompt and report text of a prepared dataset folder (train and, when present, val)."""
    from radscribe.data.dataset import read_split, split_file

    texts: list[str] = []
    for split in ("train", "val"):
        if split_file(dataset_dir, split, missing_ok=split == "val") is None:
            continue
        for sample in read_split(dataset_dir, split):
            texts.extend(m["content"] for m in sample.messages)
    return texts


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 1000, default_system: str = ""):
    """Byte-level BPE trained on `corpus`, wrapped as a Qwen2Tokenizer with the Qwen special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    texts = [t.replace("<image>", "") for t in corpus]
    if not any(texts):
        raise RadscribeError("the tokenizer corpus is empty: pass report texts (or a prepared dataset folder)")
    # The same normaliser and pre-tokeniser as Qwen2Tokenizer, so the merges learned here are the ones it applies.
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=max(vocab_size - len(SPECIAL_TOKENS), 257), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    bpe.train_from_iterator(texts, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:], errors="replace", model_max_length=32768,
        chat_template=chat_template(default_system),
    )
    return tokenizer


def _image_processor(spec: _ArchSpec, min_pixels: int, max_pixels: int):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # The PIL processor needs no torchvision; its preprocessing matches the torchvision one to ~6e-8, and
    # AutoProcessor picks whichever backend is installed when it loads the saved folder.
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, patch_size=spec.patch_size,
        temporal_patch_size=2, merge_size=2, image_mean=list(spec.image_mean), image_std=list(spec.image_std),
    )


def _model_config(arch: str, spec: _ArchSpec, tokenizer, *, text_hidden: int, text_layers: int,
                  vision_hidden: int, vision_depth: int, vocab_size: int, experts: int, experts_per_token: int,
                  moe_intermediate: int):
    import transformers

    heads = max(text_hidden // 16, 2)
    head_dim = text_hidden // heads
    # M-RoPE splits head_dim/2 rotary frequencies over (time, height, width); the released 4:3:3-ish split
    # scaled down, e.g. [4, 2, 2] for head_dim 16.
    half = head_dim // 2
    mrope = [half - 2 * (half // 4), half // 4, half // 4]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(
        vocab_size=vocab_size, hidden_size=text_hidden, intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
        max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                  num_heads=max(vision_hidden // 16, 1), patch_size=spec.patch_size, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=text_hidden)
    if arch == "qwen2_5_vl":
        text["use_sliding_window"] = False
        vision.update(hidden_act="silu", window_size=112, fullatt_block_indexes=[vision_depth - 1])
    else:
        text["head_dim"] = head_dim
        text["rope_parameters"]["mrope_interleaved"] = True  # Qwen3-VL interleaves t/h/w frequencies
        # Deepstack taps the vision tower at a few depths (8/16/24 of 27 in the release); scaled to this depth.
        taps = sorted({vision_depth // 3, (2 * vision_depth) // 3, vision_depth - 1})
        vision.update(hidden_act="gelu_pytorch_tanh", num_position_embeddings=256, deepstack_visual_indexes=taps)
    if arch == "qwen3_vl_moe":
        text.update(num_experts=experts, num_experts_per_tok=experts_per_token,
                    moe_intermediate_size=moe_intermediate, decoder_sparse_step=1, mlp_only_layers=[],
                    norm_topk_prob=True)
    config_class = getattr(transformers, spec.config_class)
    return config_class(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )


def build_tiny_model(
    arch: str,
    out_dir: str | Path,
    seed: int = 0,
    *,
    text_hidden: int = 64,
    text_layers: int = 2,
    vision_hidden: int = 32,
    vision_depth: int = 2,
    experts: int = 4,
    experts_per_token: int = 2,
    moe_intermediate: int = 48,
    min_pixels: int = 64 * 64,
    max_pixels: int = 768 * 768,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 1000,
) -> Path:
    """Write a tiny random `arch` model folder to `out_dir` and return its path.

    `vocab_size` is the BPE target (it stops earlier on a small corpus); the embedding is padded to a
    multiple of 16. `min_pixels`/`max_pixels` bound the processor's resize. Same arguments -> same bytes.
    """
    if arch not in ARCHS:
        raise RadscribeError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if text_hidden % 16 or vision_hidden % 16:
        raise RadscribeError(f"--text-hidden ({text_hidden}) and --vision-hidden ({vision_hidden}) must be "
                             "multiples of 16 (the head size)")
    import torch
    import transformers
    from transformers import AutoModelForImageTextToText, GenerationConfig

    spec = _SPECS[arch]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(builtin_corpus() if corpus is None else corpus, vocab_size, spec.default_system)
    padded_vocab = -(-len(tokenizer) // 16) * 16
    config = _model_config(arch, spec, tokenizer, text_hidden=text_hidden, text_layers=text_layers,
                           vision_hidden=vision_hidden, vision_depth=vision_depth, vocab_size=padded_vocab,
                           experts=experts, experts_per_token=experts_per_token,
                           moe_intermediate=moe_intermediate)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id, pad_token_id=config.text_config.pad_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        do_sample=False,
    )
    import_deepspeed_quietly()  # save_pretrained imports it (through accelerate) whenever it is installed
    model.save_pretrained(out)
    _write_released_layout(model, out)

    # saved without a video processor (it needs torchvision); the folder still names the upstream class
    processor = processor_class_without_video(getattr(transformers, spec.processor_class))(
        image_processor=_image_processor(spec, min_pixels, max_pixels), tokenizer=tokenizer,
        chat_template=tokenizer.chat_template)
    processor.save_pretrained(out)
    _write_video_processor_config(out, spec, min_pixels, max_pixels)
    return out


def _write_released_layout(model, out: Path) -> None:
    """Rewrite model.safetensors with MoE experts transposed to the released layout (no-op for dense models)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if not any(".mlp.experts." in k for k in state):
        return
    for key in state:
        if key.endswith("mlp.experts.gate_up_proj") or key.endswith("mlp.experts.down_proj"):
            # in memory (E, 2I, H) / (E, H, I); released (E, H, 2I) / (E, I, H)
            state[key] = state[key].transpose(1, 2).contiguous()
    files = sorted(out.glob("model*.safetensors"))
    for f in files:
        f.unlink()
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


def _write_video_processor_config(out: Path, spec: _ArchSpec, min_pixels: int, max_pixels: int) -> None:
    # Released folders ship one; writing it lets AutoProcessor build the full processor where torchvision exists.
    video_class = "Qwen3VLVideoProcessor" if spec.processor_class == "Qwen3VLProcessor" else "Qwen2VLVideoProcessor"
    settings = {
        "video_processor_type": video_class, "processor_class": spec.processor_class,
        "patch_size": spec.patch_size, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": list(spec.image_mean), "image_std": list(spec.image_std),
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
    }
    (out / "video_preprocessor_config.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
