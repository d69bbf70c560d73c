"""Model folders laid out exactly like the published Qwen downloads, differing only in widths and random weights.

Run as: radscribe tiny-model --layout real --arch qwen3_vl|qwen3_vl_moe|qwen2_5_vl OUT [--seed N] [--tiktoken FILE]

`radscribe.model.tiny` (`--layout ours`, the default) writes a fast self-trained small-vocabulary model for tests that
must learn in seconds. This module writes what a user who downloaded `Qwen/Qwen3-VL-2B-Instruct`,
`Qwen/Qwen3-VL-30B-A3B-Instruct` or `Qwen/Qwen2.5-VL-7B-Instruct` has on disk, so every test of the user's path runs on
the files that path really meets: Qwen's real byte-level BPE (151,643 ranks + the added tokens at their real ids), the
published chat template, processor limits and sampling defaults, a `config.json` in the key layout transformers 4.57
wrote (`rope_scaling` + `rope_theta`, `num_experts`, text `dtype`), bf16 safetensors under the released key names,
the MoE sharded with an index and its fused experts in the hub layout.

Where each published value comes from (read with the project's code-search tools; nothing here is copied code):
- Tokenizer: the ranks are `dashscope/resources/qwen.tiktoken` from the `dashscope` wheel on PyPI (2.0.2: 151,643
  lines `base64 rank`, sha256 b2b1b8df...). One merge per multi-byte token, found by tiktoken's merge loop over the
  token's bytes restricted to lower ranks (151,387 merges, as the published merges.txt); Qwen2's pre-tokenizer regex
  (`transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX`), NFC, byte level (FIELD_NOTES 2026-12-01).
  Added tokens 151643-151668 and the `tokenizer_config.json` keys: the Qwen2.5/Qwen3 tokenizer_config.json mirrors
  (e.g. NexaAI/Qwen3-4B-4bit-MLX); `<tool_call>` ... `</think>` are not special there. model_max_length 262144
  (Qwen3-VL) / 131072 (Qwen2.5-VL). Qwen2.5-VL has 22 added tokens (up to `<|file_sep|>` 151664), Qwen3 26.
- Qwen3-VL `chat_template.json`: the Instruct template vendored by sophgo/LLM-TPU (models/Qwen3_VL/config/
  chat_template.json, a Qwen3-VL-4B-Instruct download), character for character. Putting it into
  tokenizer_config.json as well follows the Qwen2-VL/2.5-VL folders; for Qwen3-VL that placement is an assumption.
- Qwen3-VL `generation_config.json`: sophgo/LLM-TPU models/Qwen3_VL/config/generation_config.json (do_sample true,
  temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.0, eos [151645, 151643], pad/bos 151643).
- Qwen3-VL `preprocessor_config.json` / `video_preprocessor_config.json`: transcriptions of Qwen3-VL-8B-Instruct and
  the Qwen3.5 folders (same processor) in public tests, and FIELD_NOTES: size {shortest_edge 65536, longest_edge
  16777216} (video 4096 / 25165824), patch 16, temporal 2, merge 2, mean/std 0.5, `Qwen2VLImageProcessorFast`,
  no min_pixels/max_pixels keys.
- Qwen3-VL `config.json`: transcriptions of the Qwen3-VL-2B/4B-Instruct files (transformers_version 4.57.0.dev0;
  text dtype bfloat16, rope_scaling {mrope_interleaved, mrope_section [24, 20, 20], rope_type default}, rope_theta
  5000000, tie_word_embeddings true, vocab 151936, vision num_position_embeddings 2304, deepstack [5, 11, 17]) and of
  Qwen3-VL-30B-A3B-Instruct (a parser test "transcribed byte-for-byte from commit 1fc78ad": num_experts 128,
  num_experts_per_tok 8, moe_intermediate_size 768, decoder_sparse_step 1, mlp_only_layers [], norm_topk_prob true,
  tie_word_embeddings false, deepstack [8, 16, 24]).
- Released key names: transformers 5.24's conversion_mapping.py maps only the MoE experts for qwen3_vl_moe
  (Transpose(1, 2): hub gate_up_proj (E, H, 2I), down_proj (E, I, H)) and, for Qwen2-VL/2.5-VL, the legacy
  `model.*` / `visual.*` prefixes onto `model.language_model.*` / `model.visual.*`.
- Qwen2.5-VL: the flat Qwen2.5-VL-7B-Instruct config.json (transformers_version 4.41.2, rope_scaling {type mrope,
  mrope_section [16, 24, 24]}, vision in_chans/spatial_patch_size/window_size 112/fullatt_block_indexes every 8th/
  tokens_per_second 2, vocab 152064, untied) as transcribed in TensorRT-LLM's and others' tests; its
  preprocessor_config.json (min_pixels 3136, max_pixels 12845056, patch 14, CLIP mean/std,
  `Qwen2VLImageProcessor`, `Qwen2_5_VLProcessor`); its chat template (Qwen2-VL's, with the default system turn);
  generation_config.json (do_sample, repetition_penalty 1.05, temperature 1e-06) as kept by derived checkpoints
  (stanford-oval/churro-3B); it ships no video_preprocessor_config.json.

Widths are tiny (text hidden 64, 4 text layers, vision hidden 32, depth 2) and scaled consistently (head_dim 16,
mrope_section [4, 2, 2] / [2, 3, 3]); there are 4 text layers and one deepstack tap, because llama.cpp and some
transformers code assume a text layer that is not a deepstack layer. The converted tokenizer files are cached per
sha256 of qwen.tiktoken under `$RADSCRIBE_CACHE_DIR`, else `$XDG_CACHE_HOME/radscribe`, else `~/.cache/radscribe`;
the first conversion takes 10-40 s (2 shared cores), every later build seconds. Same arguments -> same bytes.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from radscribe.errors import RadscribeError

ARCHS = ("qwen3_vl", "qwen3_vl_moe", "qwen2_5_vl")
QWEN_BPE_RANKS = 151643  # Qwen2/2.5/3 share these ranks; the added tokens start right after them

# The added tokens at ids 151643-151668, in id order, with the `special` flag the published files give them.
ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
]
TOKEN_ID = {content: QWEN_BPE_RANKS + i for i, (content, _) in enumerate(ADDED_TOKENS)}

_VOCAB, _MERGES = "vocab.json", "merges.txt"


# --- Qwen's BPE from qwen.tiktoken -------------------------------------------------------------------------------

def find_qwen_tiktoken(path: str | Path | None = None) -> Path:
    """`path`, or `qwen.tiktoken` inside the installed `dashscope` package (located without importing it)."""
    if path is not None:
        found = Path(path).expanduser()
        if not found.is_file():
            raise RadscribeError(f"--tiktoken {found}: no such file (use dashscope/resources/qwen.tiktoken from "
                                 "`pip download --no-deps dashscope`)")
        return found
    import importlib.util

    spec = importlib.util.find_spec("dashscope")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(root) / "resources" / "qwen.tiktoken"
        if candidate.is_file():
            return candidate
    raise RadscribeError("Qwen's BPE ranks (qwen.tiktoken) were not found: install them with `pip install dashscope` "
                         "(part of radscribe's [test] extra), or pass --tiktoken FILE with "
                         "dashscope/resources/qwen.tiktoken from `pip download --no-deps dashscope`")


def read_ranks(path: Path) -> dict[bytes, int]:
    """qwen.tiktoken -> {token bytes: rank}; one `base64 rank` per line, ranks 0..151642 in order."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            fields = line.split()
            try:
                token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
                if len(fields) != 2 or rank != line_no - 1:
                    raise ValueError
            except (IndexError, ValueError):
                raise RadscribeError(f"{path}, line {line_no}: expected `base64-token rank` with rank {line_no - 1}; "
                                     "is this dashscope's qwen.tiktoken?") from None
            ranks[token] = rank
    if len(ranks) != QWEN_BPE_RANKS:
        raise RadscribeError(f"{path}: {len(ranks):,} ranks, but Qwen's BPE has {QWEN_BPE_RANKS:,}; "
                             "pass dashscope's qwen.tiktoken")
    return ranks


def _merge_of(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    # tiktoken's encoder on the token's own bytes, allowed only merges ranked below the token: the two parts left
    # are the merge that creates it, so HF's merge-priority BPE reproduces tiktoken's ids exactly.
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best = None
        for i in range(len(parts) - 1):
            pair_rank = ranks.get(parts[i] + parts[i + 1])
            if pair_rank is not None and pair_rank < rank and (best is None or pair_rank < best[0]):
                best = (pair_rank, i)
        if best is None:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise RadscribeError(f"qwen.tiktoken: token of rank {rank} cannot be built from lower-ranked merges")
    return parts[0], parts[1]


@functools.cache
def _byte_to_char() -> dict[int, str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def _byte_level(token: bytes) -> str:
    """GPT-2's printable byte-level spelling of `token`, as vocab.json and merges.txt store it."""
    table = _byte_to_char()
    return "".join(table[b] for b in token)


def cache_root() -> Path:
    """Where converted tokenizer files live: $RADSCRIBE_CACHE_DIR, $XDG_CACHE_HOME/radscribe or ~/.cache/radscribe."""
    if os.environ.get("RADSCRIBE_CACHE_DIR"):
        return Path(os.environ["RADSCRIBE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "radscribe"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def converted_bpe(tiktoken: Path) -> Path:
    """The folder holding vocab.json + merges.txt converted from `tiktoken`, converting once per file content."""
    folder = cache_root() / f"qwen-bpe-v1-{_sha256(tiktoken)[:16]}"
    if (folder / _VOCAB).is_file() and (folder / _MERGES).is_file():
        return folder
    ranks = read_ranks(tiktoken)
    vocab = {_byte_level(token): rank for token, rank in ranks.items()}
    merges = [_merge_of(token, rank, ranks) for token, rank in ranks.items() if len(token) > 1]
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed into place, so a concurrent or interrupted conversion never leaves half a cache.
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    (staging / _VOCAB).write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (staging / _MERGES).write_text("#version: 0.2\n" + "".join(f"{_byte_level(a)} {_byte_level(b)}\n"
                                                            for a, b in merges), encoding="utf-8")
    try:
        staging.rename(folder)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _tokenizer_json(bpe_folder: Path, n_added: int) -> Path:
    """tokenizer.json for the BPE in `bpe_folder` plus the first `n_added` added tokens, cached beside it."""
    path = bpe_folder / f"tokenizer-{n_added}.json"
    if path.is_file():
        return path
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(models.BPE.from_file(str(bpe_folder / _VOCAB), str(bpe_folder / _MERGES)))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    for content, special in ADDED_TOKENS[:n_added]:  # one at a time: ids follow the ranks in this order
        token = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        (tokenizer.add_special_tokens if special else tokenizer.add_tokens)([token])
    staging = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tokenizer.save(str(staging))
    os.replace(staging, path)
    return path


def _tokenizer_config(n_added: int, model_max_length: int, chat_template: str) -> dict:
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    specials = [content for content, special in ADDED_TOKENS[:n_added] if special]
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(TOKEN_ID[content]): {"content": content, **entry, "special": special}
                                 for content, special in ADDED_TOKENS[:n_added]},
        "additional_special_tokens": specials[1:],
        "bos_token": None,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


# --- the published files, per family ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Widths:
    """The only thing that differs from the published model: its sizes."""
    text_hidden: int = 64
    """Language model hidden size (a multiple of 16: 16-wide heads)."""
    text_layers: int = 4
    """Language model layers; more than the deepstack taps (one), which llama.cpp needs."""
    vision_hidden: int = 32
    """Vision tower hidden size (a multiple of 16)."""
    vision_depth: int = 2
    """Vision tower blocks."""
    experts: int = 4
    """MoE only: experts per layer."""
    experts_per_token: int = 2
    """MoE only: top-k."""
    moe_intermediate: int = 48
    """MoE only: expert width; not the hidden size, so a transposed expert cannot pass for the right one."""


_HEAD_DIM = 16  # published 128; M-RoPE splits head_dim/2 = 8 frequencies over (t, h, w) in the published proportions
_MROPE_QWEN3 = [4, 2, 2]  # published [24, 20, 20], interleaved
_MROPE_QWEN2_5 = [2, 3, 3]  # published [16, 24, 24]
_QWEN3_MEAN_STD = [0.5, 0.5, 0.5]
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _heads(w: Widths) -> tuple[int, int]:
    heads = w.text_hidden // _HEAD_DIM
    return heads, max(heads // 2, 1)


def _qwen3_vl_config(w: Widths, moe: bool) -> dict:
    heads, kv_heads = _heads(w)
    text = {
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": TOKEN_ID["<|endoftext|>"],
        "dtype": "bfloat16", "eos_token_id": TOKEN_ID["<|im_end|>"], "head_dim": _HEAD_DIM, "hidden_act": "silu",
        "hidden_size": w.text_hidden, "initializer_range": 0.02, "intermediate_size": 3 * w.text_hidden,
        "max_position_embeddings": 262144, "model_type": "qwen3_vl_moe_text" if moe else "qwen3_vl_text",
        "num_attention_heads": heads, "num_hidden_layers": w.text_layers, "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": _MROPE_QWEN3, "rope_type": "default"},
        "rope_theta": 5000000, "use_cache": True, "vocab_size": 151936,
    }
    if moe:
        text.update(decoder_sparse_step=1, mlp_only_layers=[], moe_intermediate_size=w.moe_intermediate,
                    norm_topk_prob=True, num_experts=w.experts, num_experts_per_tok=w.experts_per_token)
    else:
        text["tie_word_embeddings"] = True
    vision = {
        # published [5, 11, 17] of 24 / [8, 16, 24] of 27; one tap here, so text layers outnumber the taps
        "deepstack_visual_indexes": [0], "depth": w.vision_depth, "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": w.vision_hidden, "in_channels": 3, "initializer_range": 0.02,
        "intermediate_size": 4 * w.vision_hidden, "model_type": "qwen3_vl_moe" if moe else "qwen3_vl",
        "num_heads": w.vision_hidden // 16, "num_position_embeddings": 2304, "out_hidden_size": w.text_hidden,
        "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
    }
    return {
        "architectures": ["Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration"],
        "image_token_id": TOKEN_ID["<|image_pad|>"], "model_type": "qwen3_vl_moe" if moe else "qwen3_vl",
        "text_config": text, "tie_word_embeddings": not moe, "transformers_version": "4.57.0.dev0",
        "video_token_id": TOKEN_ID["<|video_pad|>"], "vision_config": vision,
        "vision_end_token_id": TOKEN_ID["<|vision_end|>"], "vision_start_token_id": TOKEN_ID["<|vision_start|>"],
    }


def _qwen2_5_vl_config(w: Widths) -> dict:
    heads, kv_heads = _heads(w)
    # The release's flat layout and key order (written by hand, not by save_pretrained).
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0,
        "bos_token_id": TOKEN_ID["<|endoftext|>"], "eos_token_id": TOKEN_ID["<|im_end|>"],
        "vision_start_token_id": TOKEN_ID["<|vision_start|>"], "vision_end_token_id": TOKEN_ID["<|vision_end|>"],
        "vision_token_id": TOKEN_ID["<|vision_pad|>"], "image_token_id": TOKEN_ID["<|image_pad|>"],
        "video_token_id": TOKEN_ID["<|video_pad|>"], "hidden_act": "silu", "hidden_size": w.text_hidden,
        "initializer_range": 0.02, "intermediate_size": 3 * w.text_hidden, "max_position_embeddings": 128000,
        "max_window_layers": w.text_layers, "model_type": "qwen2_5_vl", "num_attention_heads": heads,
        "num_hidden_layers": w.text_layers, "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False,
        "vision_config": {
            "depth": w.vision_depth, "hidden_act": "silu", "hidden_size": w.vision_hidden,
            "intermediate_size": 4 * w.vision_hidden, "num_heads": w.vision_hidden // 16, "in_chans": 3,
            "out_hidden_size": w.text_hidden, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
            "window_size": 112, "fullatt_block_indexes": [w.vision_depth - 1],  # published: every 8th of 32
            "tokens_per_second": 2, "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": _MROPE_QWEN2_5},
        "vocab_size": 152064,
    }


def _released_qwen3_name(key: str) -> str:
    return key  # Qwen3-VL checkpoints already use model.language_model.* / model.visual.* / lm_head


def _released_qwen2_5_name(key: str) -> str:
    for in_memory, released in (("model.language_model.", "model."), ("model.visual.", "visual.")):
        if key.startswith(in_memory):
            return released + key[len(in_memory):]
    return key


@dataclass(frozen=True)
class _Published:
    config: Callable[[Widths], dict]
    sort_config_keys: bool  # transformers 4.57 writes sorted keys; the Qwen2.5-VL release was hand-ordered
    chat_template: str
    preprocessor: dict
    video_preprocessor: dict | None
    generation: dict
    model_max_length: int
    added_tokens: int
    shards: int  # 2B: one file; 30B-A3B and 7B: sharded with an index
    released_name: Callable[[str], str]


_QWEN3_GENERATION = {
    "bos_token_id": TOKEN_ID["<|endoftext|>"], "pad_token_id": TOKEN_ID["<|endoftext|>"], "do_sample": True,
    "eos_token_id": [TOKEN_ID["<|im_end|>"], TOKEN_ID["<|endoftext|>"]], "top_k": 20, "top_p": 0.8,
    "repetition_penalty": 1.0, "temperature": 0.7, "transformers_version": "4.56.0",
}
_QWEN3_PREPROCESSOR = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": _QWEN3_MEAN_STD, "image_std": _QWEN3_MEAN_STD,
    "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast",
}
_QWEN3_VIDEO_PREPROCESSOR = {
    "size": {"longest_edge": 25165824, "shortest_edge": 4096}, "patch_size": 16, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": _QWEN3_MEAN_STD, "image_std": _QWEN3_MEAN_STD,
    "processor_class": "Qwen3VLProcessor", "video_processor_type": "Qwen3VLVideoProcessor",
}


def _published(arch: str) -> _Published:
    # a table, not an if-chain: the two Qwen3-VL entries differ only in the MoE switch and the sharding
    return {
        "qwen3_vl": _Published(lambda w: _qwen3_vl_config(w, moe=False), True, QWEN3_VL_CHAT_TEMPLATE,
                               _QWEN3_PREPROCESSOR, _QWEN3_VIDEO_PREPROCESSOR, _QWEN3_GENERATION, 262144, 26, 1,
                               _released_qwen3_name),
        "qwen3_vl_moe": _Published(lambda w: _qwen3_vl_config(w, moe=True), True, QWEN3_VL_CHAT_TEMPLATE,
                                   _QWEN3_PREPROCESSOR, _QWEN3_VIDEO_PREPROCESSOR, _QWEN3_GENERATION, 262144, 26, 3,
                                   _released_qwen3_name),
        "qwen2_5_vl": _Published(
            _qwen2_5_vl_config, False, QWEN2_5_VL_CHAT_TEMPLATE,
            {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
             "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD, "image_processor_type": "Qwen2VLImageProcessor",
             "processor_class": "Qwen2_5_VLProcessor"},
            None,
            {"bos_token_id": TOKEN_ID["<|endoftext|>"], "pad_token_id": TOKEN_ID["<|endoftext|>"], "do_sample": True,
             "eos_token_id": [TOKEN_ID["<|im_end|>"], TOKEN_ID["<|endoftext|>"]], "repetition_penalty": 1.05,
             "temperature": 1e-06, "transformers_version": "4.49.0"},
            131072, 22, 2, _released_qwen2_5_name),
    }[arch]


# --- writing the folder -----------------------------------------------------------------------------------------

# Files radscribe's builders write; cleared first, so an earlier build in OUT (e.g. --layout ours, whose
# processor_config.json and chat_template.jinja would take precedence) cannot leak into this one.
_BUILT_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                "chat_template.json", "chat_template.jinja", "processor_config.json", "preprocessor_config.json",
                "video_preprocessor_config.json")


def _write_json(path: Path, data: dict, sort_keys: bool = False, indent: int = 2) -> None:
    path.write_text(json.dumps(data, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n", encoding="utf-8")


def _save_weights(tensors: dict, out: Path, shards: int) -> None:
    from safetensors.torch import save_file

    keys = sorted(tensors)
    if shards == 1:
        save_file({k: tensors[k] for k in keys}, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i in range(shards):  # equal key counts per shard: deterministic, none empty
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i * len(keys) // shards:(i + 1) * len(keys) // shards]
        save_file({k: tensors[k] for k in part}, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map},
                sort_keys=True)


def _write_weights(out: Path, published: _Published, tied: bool, seed: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    # The model is built from the config.json just written, so the weights are exactly what that file describes.
    config = AutoConfig.from_pretrained(out)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    tensors = {}
    for key, tensor in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue  # a tied release stores only the embedding
        tensor = tensor.detach().to(torch.bfloat16)
        if key.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            tensor = tensor.transpose(1, 2)  # in memory (E, 2I, H) / (E, H, I); hub (E, H, 2I) / (E, I, H)
        tensors[published.released_name(key)] = tensor.contiguous()
    _save_weights(tensors, out, published.shards)


def build_real_layout_model(arch: str, out_dir: str | Path, seed: int = 0, *, widths: Widths = Widths(),
                            tiktoken: str | Path | None = None) -> Path:
    """Write a folder laid out like the published `arch` download, with tiny widths and seeded random weights."""
    if arch not in ARCHS:
        raise RadscribeError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if widths.text_hidden % 16 or widths.vision_hidden % 16 or widths.text_hidden < 32 or widths.vision_hidden < 16:
        raise RadscribeError(f"--text-hidden ({widths.text_hidden}) and --vision-hidden ({widths.vision_hidden}) "
                             "must be multiples of 16 (the head size), text at least 32")
    if widths.text_layers < 2 or widths.vision_depth < 1:
        raise RadscribeError(f"--text-layers ({widths.text_layers}) must be at least 2 (one more than the deepstack "
                             f"taps) and --vision-depth ({widths.vision_depth}) at least 1")
    published = _published(arch)
    bpe = converted_bpe(find_qwen_tiktoken(tiktoken))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*(out / name for name in _BUILT_FILES), *out.glob("model*.safetensors")]:
        stale.unlink(missing_ok=True)

    config = published.config(widths)
    _write_json(out / "config.json", config, sort_keys=published.sort_config_keys)
    shutil.copyfile(bpe / _VOCAB, out / _VOCAB)
    shutil.copyfile(bpe / _MERGES, out / _MERGES)
    shutil.copyfile(_tokenizer_json(bpe, published.added_tokens), out / "tokenizer.json")
    _write_json(out / "tokenizer_config.json", _tokenizer_config(published.added_tokens, published.model_max_length,
                                                                 published.chat_template))
    _write_json(out / "chat_template.json", {"chat_template": published.chat_template}, indent=4)
    _write_json(out / "preprocessor_config.json", published.preprocessor)
    if published.video_preprocessor is not None:
        _write_json(out / "video_preprocessor_config.json", published.video_preprocessor)
    _write_json(out / "generation_config.json", published.generation)
    _write_weights(out, published, config["tie_word_embeddings"], seed)
    return out


# --- the published chat templates, character for character ----------------------------------------------------

# Qwen2-VL's template, which Qwen2.5-VL ships: a default system turn when the first message is not one.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL Instruct (dense and MoE); a raw string, so its `\n` escapes stay Jinja's.
QWEN3_VL_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
