"""One sample -> model inputs: assistant-only labels, the one image policy, an image-safe cutoff, collation.

Used by `radscribe train` (radscribe/train.py). Two things hold here that LLaMA-Factory's collation does not
guarantee: the loss sees only assistant tokens (the report and its end-of-turn token), and `cutoff_len` never cuts
through an image's token run (their issue #5964) - text is truncated, images are downscaled or the sample is
rejected with a counted reason.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass

from radscribe import dist
from radscribe.errors import RadscribeError

IGNORE_INDEX = -100
# Per-token keys are padded along the sequence; every other key the processor returns (pixel_values,
# image_grid_thw, ...) is concatenated along dim 0, so nothing it returns is dropped (Qwen3-VL's forward
# raises without mm_token_type_ids when images are present).
SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids", "labels")
PAD_VALUES = {"labels": IGNORE_INDEX}
MAX_IMAGE_SHRINKS = 4
IMAGE_PAD = "<|image_pad|>"


class Rejected(Exception):
    """A sample that cannot be trained on; the reason is counted in the run's rejects."""


def fit_pixels(image, max_pixels: int, min_pixels: int):
    """Scale an image (keeping aspect) into [min_pixels, max_pixels], as LLaMA-Factory's image_max/min_pixels."""
    w, h = image.size
    if w * h > max_pixels:
        scale = math.sqrt(max_pixels / (w * h))
    elif w * h < min_pixels:
        scale = math.sqrt(min_pixels / (w * h))
    else:
        return image
    return image.resize((max(1, int(w * scale)), max(1, int(h * scale))))


def chat_segments(processor, messages: list[dict], n_images: int) -> list[tuple[str, bool]]:
    """Render the conversation with the model's own chat template and split it into (text, is_label) pieces.

    The label pieces are exactly each assistant message's content plus the end-of-turn token; whatever the
    template puts before the content (a role header, an empty think block) or after the end-of-turn token
    stays unlabelled.
    """
    from radscribe.data.dataset import to_chat

    chat = to_chat(messages, [None] * n_images)
    eos = processor.tokenizer.eos_token
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if "<image>" in message["content"]:
            raise Rejected("image inside an assistant message")
        prefix = processor.apply_chat_template(chat[:i], add_generation_prompt=True, tokenize=False)
        full = processor.apply_chat_template(chat[:i + 1], tokenize=False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise RadscribeError("the model's chat template does not render conversations incrementally; "
                                 "assistant-only labels cannot be located")
        reply = full[len(prefix):]
        start = reply.find(message["content"])
        end = reply.find(eos, start + len(message["content"]))
        if start < 0 or end < 0:
            raise RadscribeError(f"the chat template does not end assistant turns with {eos}")
        end += len(eos)
        pieces.append((prefix[len(done):] + reply[:start], False))
        pieces.append((reply[start:end], True))
        done = prefix + reply[:end]
    if not pieces:
        raise Rejected("no assistant message")
    return [(text, label) for text, label in pieces if text]


@dataclass
class Encoder:
    """One sample -> model inputs + labels, within `cutoff_len` and without cutting an image token run."""

    processor: object
    cutoff_len: int
    image_max_pixels: int
    image_min_pixels: int

    def __call__(self, sample) -> dict:
        from radscribe.data.imaging import load_image

        images = [fit_pixels(load_image(p), self.image_max_pixels, self.image_min_pixels) for p in sample.images]
        pieces = chat_segments(self.processor, sample.messages, len(images))
        for _ in range(MAX_IMAGE_SHRINKS + 1):
            queue = list(images)
            encoded = [self._encode_piece(text, label, queue) for text, label in pieces]
            kept, budget = [], self.cutoff_len
            for enc in encoded:
                n = enc["input_ids"].shape[-1]
                if n <= budget:
                    kept.append(enc)
                    budget -= n
                    continue
                if enc["is_label"] and budget > 0:  # truncate report text, never a prompt with images
                    kept.append({k: (v[..., :budget] if k in SEQUENCE_KEYS else v) for k, v in enc.items()})
                break
            if any(e["is_label"] for e in kept):
                return _concat(kept)
            images = self._shrunk(images, encoded[0])
        raise Rejected("image tokens exceed cutoff_len after downscaling")

    def _encode_piece(self, text: str, label: bool, queue: list) -> dict:
        import torch

        count = text.count(IMAGE_PAD)
        taken = queue[:count]
        del queue[:count]
        if taken:
            enc = dict(self.processor(text=[text], images=taken, return_tensors="pt"))
        else:
            # Text-only pieces skip the processor (its per-call overhead was half the encoding time); the
            # per-token keys it would add are constant for text: mask 1, token type 0 (not an image token).
            ids = self.processor.tokenizer([text], add_special_tokens=False, return_tensors="pt")["input_ids"]
            enc = {key: torch.ones_like(ids) if key == "attention_mask" else torch.zeros_like(ids)
                   for key in self.sequence_keys}
            enc["input_ids"] = ids
        ids = enc["input_ids"]
        enc["labels"] = ids.clone() if label else torch.full_like(ids, IGNORE_INDEX)
        enc["is_label"] = label
        return enc

    @functools.cached_property
    def sequence_keys(self) -> list[str]:
        """The per-token keys this processor returns for text (input_ids, attention_mask, mm_token_type_ids...)."""
        return [k for k in self.processor(text=["x"], return_tensors="pt") if k in SEQUENCE_KEYS]

    def _shrunk(self, images: list, first: dict) -> list:
        """Downscale the images so that the first prompt + one report token fit, or reject the sample."""
        image_id = self.processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        ids = first["input_ids"][0]
        image_tokens = int((ids == image_id).sum())
        if not image_tokens:
            raise Rejected("prompt text longer than cutoff_len")
        room = self.cutoff_len - (ids.shape[-1] - image_tokens) - 1
        if room <= 0:
            raise Rejected("prompt text longer than cutoff_len")
        # image tokens grow with pixel area, so scale each side by sqrt(room / tokens), with a margin for the
        # processor rounding sides up to a multiple of patch * merge
        scale = math.sqrt(room / image_tokens) * 0.9
        smaller = []
        for im in images:
            w, h = im.size
            if w * h * scale * scale < self.image_min_pixels:
                raise Rejected("image tokens exceed cutoff_len even at image_min_pixels")
            smaller.append(im.resize((max(1, int(w * scale)), max(1, int(h * scale)))))
        return smaller


def _concat(pieces: list[dict]) -> dict:
    import torch

    out: dict = {}
    for key in pieces[0]:
        if key == "is_label":
            continue
        values = [p[key] for p in pieces if key in p]
        out[key] = torch.cat(values, dim=-1 if key in SEQUENCE_KEYS else 0)
    for key in SEQUENCE_KEYS:
        if key in out:
            out[key] = out[key][0]
    return out


def collate(features: list[dict], pad_token_id: int) -> dict:
    """Right-pad the per-token keys; concatenate every other key (images of all samples, in order)."""
    import torch

    longest = max(f["input_ids"].shape[-1] for f in features)
    batch: dict = {}
    keys = dict.fromkeys(k for f in features for k in f)
    for key in keys:
        if key in SEQUENCE_KEYS:
            pad = pad_token_id if key == "input_ids" else PAD_VALUES.get(key, 0)
            rows = [torch.nn.functional.pad(f[key], (0, longest - f[key].shape[-1]), value=pad) for f in features]
            batch[key] = torch.stack(rows)
        else:
            batch[key] = torch.cat([f[key] for f in features if key in f], dim=0)
    return batch


class EncodedDataset:
    """Training samples: encoded once by `plan_split` and kept while they fit the memory budget, else re-encoded
    on access (images decoded lazily), so memory stays bounded on large datasets."""

    def __init__(self, samples: list, encoded: list, encoder: Encoder):
        self.samples, self.encoded, self.encoder = samples, encoded, encoder

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        cached = self.encoded[index]
        return cached if cached is not None else self.encoder(self.samples[index])


def plan_split(samples: list, encoder: Encoder, desc: str, cache_bytes: int) -> tuple[EncodedDataset, list[dict]]:
    """Encode every sample once: keep the trainable ones, count the rest by reason (nothing is dropped silently).

    Encoded samples are kept in memory up to `cache_bytes`: the encoding (processor call per row) costs more than a
    tiny model's step, and this pass pays it anyway.
    """
    from tqdm import tqdm

    kept, encoded, rejects, used = [], [], [], 0
    for sample in tqdm(samples, desc=f"encoding {desc}", unit="row", disable=not dist.is_main()):
        try:
            features = encoder(sample)
        except Rejected as err:
            rejects.append({"id": sample.id, "split": desc, "reason": str(err)})
            continue
        size = sum(v.numel() * v.element_size() for v in features.values())
        keep = used + size <= cache_bytes
        used += size if keep else 0
        kept.append(sample)
        encoded.append(features if keep else None)
    return EncodedDataset(kept, encoded, encoder), rejects


def cached_bytes(dataset: EncodedDataset) -> int:
    """Memory held by the samples `plan_split` kept encoded."""
    return sum(v.numel() * v.element_size() for f in dataset.encoded if f is not None for v in f.values())


def encode_splits(processor, data, train_rows: list, val_rows: list) -> tuple[EncodedDataset, EncodedDataset, list]:
    """Encode both splits per a `TrainConfig.data` section: (train set, val set, rejected rows with reasons).

    One memory budget (`data.cache_mib`) covers both; a training split left with nothing to train on fails.
    """
    encoder = Encoder(processor, data.cutoff_len, data.image_max_pixels, data.image_min_pixels)
    cache = data.cache_mib * 2**20
    train_set, rejects = plan_split(train_rows, encoder, "train", cache)
    val_set, val_rejects = plan_split(val_rows, encoder, "val", cache - cached_bytes(train_set))
    if not train_set.samples:
        reasons = dict(Counter(r["reason"] for r in rejects))
        raise RadscribeError(f"{data.dataset}: no trainable samples (rejected: {reasons}); raise data.cutoff_len")
    return train_set, val_set, rejects + val_rejects
