"""Load a radscribe dataset folder through LLaMA-Factory's own data pipeline (acceptance 2 of issue #2).

Run as (in a scratch venv, llamafactory is never a dependency of radscribe):
    python3 -m venv /tmp/lf && /tmp/lf/bin/pip install torch==2.13.0 llamafactory
    /tmp/lf/bin/pip uninstall -y torchvision torchaudio   # PyPI's CUDA-linked wheels do not load beside torch+cpu
    /tmp/lf/bin/python bench/llamafactory_check.py DATASET [--json OUT.json]

Two levels, both LLaMA-Factory's code, unchanged:
1. `get_dataset_list` + `_get_merged_dataset`: dataset_info.json is parsed, the sharegpt converter aligns every row
   (`_prompt`, `_response`, `_images` resolved against the dataset folder);
2. `get_dataset(stage="sft")` with template `qwen3_vl_nothink`: the Qwen3-VL multimodal plugin validates that
   `<image>` placeholders match images, opens every image and tokenizes the row. No model can be downloaded here,
   so the tokenizer is a byte-level BPE trained on the dataset's own text and the image processor is the real
   Qwen2-VL one (patch 16, merge 2, as Qwen3-VL); only the token ids are ours, the pipeline is theirs.
Prints one JSON object; exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import types
from pathlib import Path

import transformers  # noqa: E402,F401  (before the stand-in below, so transformers sees no torchaudio)

# LLaMA-Factory's mm_plugin imports torchaudio at module level but uses it only for audio inputs; no CPU wheel of
# torchaudio exists for torch 2.13, so an empty module stands in for it in this check script only.
sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
           "<|image_pad|>", "<|video_pad|>"]


def texts(dataset: Path):
    for name in ("train.json", "val.json"):
        path = dataset / name
        if path.is_file():
            for row in json.loads(path.read_text(encoding="utf-8")):
                for m in row["messages"]:
                    yield m["content"]


def tiny_tokenizer(dataset: Path, folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts(dataset), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL[3:])
    fast.save_pretrained(folder)
    return fast


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    dataset = Path(args.dataset).resolve()

    import llamafactory
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.data.loader import _get_merged_dataset
    from llamafactory.hparams import DataArguments, ModelArguments
    from transformers import Qwen2VLImageProcessor, Seq2SeqTrainingArguments

    result = {"llamafactory": llamafactory.__version__, "dataset": str(dataset), "checks": {}}
    checks = result["checks"]
    summary = json.loads((dataset / "summary.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="lfcheck-"))
    model_args = ModelArguments(model_name_or_path=str(work))
    data_args = DataArguments(dataset="radscribe_train", eval_dataset="radscribe_val", dataset_dir=str(dataset),
                              template="qwen3_vl_nothink", cutoff_len=2048, overwrite_cache=True)
    training_args = Seq2SeqTrainingArguments(output_dir=str(work / "out"), do_train=True, report_to=[])

    # Level 1: dataset_info.json + the sharegpt converter.
    aligned = {split: _get_merged_dataset([f"radscribe_{split}"], model_args, data_args, training_args, "sft")
               for split in ("train", "val")}
    checks["aligned_rows"] = {s: len(d) for s, d in aligned.items()}
    checks["aligned_rows_match_summary"] = all(len(aligned[s]) == summary[s] for s in aligned)
    missing = [p for d in aligned.values() for row in d for p in (row["_images"] or []) if not os.path.isfile(p)]
    checks["images_resolved"] = not missing and all(row["_images"] for d in aligned.values() for row in d)
    first = aligned["train"][0]
    checks["first_row"] = {"prompt": first["_prompt"], "response": first["_response"], "images": first["_images"]}

    # Level 2: the full sft preprocessing with the Qwen3-VL plugin.
    tokenizer = tiny_tokenizer(dataset, work)
    image_processor = Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2,
                                            min_pixels=32 * 32, max_pixels=512 * 512)
    # The plugin reads only these attributes; it requires a `video_processor` but never calls it for images.
    processor = types.SimpleNamespace(image_processor=image_processor, video_processor=image_processor,
                                      image_max_pixels=512 * 512, image_min_pixels=32 * 32)
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    module = get_dataset(template, model_args, data_args, training_args, "sft", tokenizer, processor)
    train, val = module["train_dataset"], module["eval_dataset"]
    checks["tokenized_rows"] = {"train": len(train), "val": len(val)}
    checks["tokenized_rows_match_summary"] = len(train) == summary["train"] and len(val) == summary["val"]
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    row = train[0]
    image_tokens = row["input_ids"].count(pad)
    labelled = [t for t in row["labels"] if t != -100]
    checks["image_tokens_first_row"] = image_tokens
    checks["labels_decode_to_report"] = tokenizer.decode(labelled).replace("<|im_end|>", "").strip() == \
        first["_response"][0]["content"]
    checks["prompt_masked"] = all(t == -100 for t in row["labels"][: row["input_ids"].index(pad)])
    ok = (checks["aligned_rows_match_summary"] and checks["images_resolved"] and image_tokens > 0
          and checks["tokenized_rows_match_summary"] and checks["labels_decode_to_report"] and checks["prompt_masked"])
    result["ok"] = bool(ok)
    text = json.dumps(result, ensure_ascii=False, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
