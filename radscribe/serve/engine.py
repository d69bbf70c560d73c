"""The one generation engine: batched greedy (or sampled) decoding with left padding and a KV cache, and streaming.

eval, chat, the API and the web page all generate through it:

    engine = Engine.from_pretrained("Qwen3-VL-4B-Instruct", adapter="runs/r1")
    texts = engine.generate([Request(messages=[{"role": "user", "content": [
        {"type": "image", "image": "scan.dcm"}, {"type": "text", "text": "图片中的诊断结果是怎样?"}]}])])
    for delta in engine.stream(request): print(delta, end="")

Image entries may hold a PIL image, a path or bytes; the latter two go through `radscribe.data.imaging.load_image`
(DICOM and NIfTI included). Requests with different sampling settings never share a batch; within a batch the
longest `max_new_tokens` runs and each answer is cut to its own budget.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from radscribe.errors import RadscribeError


@dataclass
class Request:
    """One generation request."""

    messages: list[dict]
    """Chat messages in the processor's format: content is a string or a list of {"type": "image"|"text", ...}."""
    max_new_tokens: int = 512
    """Most tokens to generate."""
    temperature: float = 0.0
    """0 = greedy decoding; above 0 samples."""
    top_p: float = 1.0
    """Nucleus sampling mass (only when sampling)."""
    seed: int | None = None
    """Sampling seed; requests sampled in one batch share the batch's random stream."""


@dataclass
class Generation:
    """One answer with what the API reports about it (OpenAI's `usage` and `finish_reason`)."""

    text: str
    """The decoded answer, special tokens removed."""
    prompt_tokens: int
    """Tokens of the prompt, image tokens included, padding excluded."""
    completion_tokens: int
    """Tokens generated, the end-of-turn token included when there was one."""
    finish_reason: str
    """`stop` when an end-of-turn token ended the answer, `length` when `max_new_tokens` did."""


def load_request_image(image):
    """A chat image entry (PIL image, path or bytes) -> an RGB PIL image, through the project's one image loader."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    from radscribe.data.imaging import load_image

    if isinstance(image, (str, Path, bytes, bytearray)):
        return load_image(bytes(image) if isinstance(image, bytearray) else image)
    raise RadscribeError(f"image entry of type {type(image).__name__} is not an image, a path or bytes")


class Engine:
    """Wraps (model, processor) from `radscribe.model.load.load_model`."""

    def __init__(self, model, processor, batch_size: int = 8):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.batch_size = batch_size
        # One generate call at a time: the API's worker thread and a streaming thread must not interleave on the
        # same model (generate is not re-entrant with respect to the KV cache it builds).
        self._lock = threading.Lock()
        stop = {self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids("<|im_end|>")}
        configured = getattr(model.generation_config, "eos_token_id", None)
        stop.update(configured if isinstance(configured, list) else [configured])
        self.eos_token_ids = sorted(t for t in stop if isinstance(t, int) and t >= 0)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, adapter: str | Path | None = None, dtype: str = "auto",
                        quantization: str | None = None, device: str | None = None, batch_size: int = 8) -> "Engine":
        from radscribe.model.load import load_model

        model, processor = load_model(model_dir, adapter=adapter, dtype=dtype, quantization=quantization,
                                      device=device)
        return cls(model, processor, batch_size=batch_size)

    def generate(self, requests: list[Request], batch_size: int | None = None, progress: bool = False) -> list[str]:
        """Answers in request order; requests are batched (`batch_size`) among those with equal sampling settings."""
        return [g.text for g in self.complete(requests, batch_size, progress)]

    def complete(self, requests: list[Request], batch_size: int | None = None,
                 progress: bool = False) -> list[Generation]:
        """As `generate`, with token counts and the finish reason of every answer."""
        from tqdm import tqdm

        batch_size = batch_size or self.batch_size
        for r in requests:
            _check(r)
        groups: dict[tuple, list[int]] = {}
        for index, r in enumerate(requests):
            key = (0.0, 1.0, None) if r.temperature == 0 else (r.temperature, r.top_p, r.seed)
            groups.setdefault(key, []).append(index)
        answers: list[Generation | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generating", unit="sample", disable=not progress)
        for indices in groups.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                for index, answer in zip(chunk, self._generate_batch([requests[i] for i in chunk])):
                    answers[index] = answer
                bar.update(len(chunk))
        bar.close()
        return answers

    def stream(self, request: Request) -> Iterator[str]:
        """Text deltas of one answer as they are generated. Closing the iterator stops generation."""
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        _check(request)
        inputs = self._encode([request])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancelled = threading.Event()
        failure: list[BaseException] = []

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return cancelled.is_set()

        def run():
            try:
                with self._lock:
                    self.model.generate(**inputs, **self._generation_kwargs(request), streamer=streamer,
                                        stopping_criteria=StoppingCriteriaList([_Cancelled()]))
            except BaseException as err:  # surfaced in the consumer's thread below
                failure.append(err)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            for delta in streamer:
                if delta:
                    yield delta
        finally:
            cancelled.set()
            thread.join()
        if failure:
            raise failure[0]

    # --- internals -------------------------------------------------------------------------------------------
    def _encode(self, requests: list[Request]):
        texts, images = [], []
        for r in requests:
            messages = [_with_loaded_images(m, images) for m in r.messages]
            texts.append(self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        # Left padding: every row's last prompt token sits at the same position, so one decoding step appends
        # to all rows; the attention mask (and, in Qwen-VL, the M-RoPE position ids built from it) skips the pads.
        inputs = self.processor(text=texts, images=images or None, padding=True, padding_side="left",
                                return_tensors="pt")
        inputs = inputs.to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def _generation_kwargs(self, request: Request) -> dict:
        kwargs = {"max_new_tokens": request.max_new_tokens, "eos_token_id": self.eos_token_ids,
                  "pad_token_id": self.tokenizer.pad_token_id, "use_cache": True}
        if request.temperature > 0:
            kwargs.update(do_sample=True, temperature=request.temperature, top_p=request.top_p, top_k=0)
        else:
            # Explicit: a checkpoint's generation_config may ask for sampling (Qwen's released ones do).
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    def _generate_batch(self, requests: list[Request]) -> list[Generation]:
        import torch

        longest = max(requests, key=lambda r: r.max_new_tokens)
        inputs = self._encode(requests)
        with self._lock, torch.inference_mode():
            if longest.temperature > 0 and longest.seed is not None:
                torch.manual_seed(longest.seed)
            output = self.model.generate(**inputs, **self._generation_kwargs(longest))
        new_tokens = output[:, inputs["input_ids"].shape[1]:].tolist()
        prompt_lengths = inputs["attention_mask"].sum(dim=1).tolist()
        stops = set(self.eos_token_ids)
        answers = []
        for r, tokens, prompt_length in zip(requests, new_tokens, prompt_lengths):
            tokens = tokens[:r.max_new_tokens]  # the batch ran to its longest budget
            end = next((i for i, t in enumerate(tokens) if t in stops), None)
            kept = tokens if end is None else tokens[:end + 1]  # rows that stopped early are padded after it
            answers.append(Generation(text=self.tokenizer.decode(kept, skip_special_tokens=True),
                                      prompt_tokens=int(prompt_length), completion_tokens=len(kept),
                                      finish_reason="length" if end is None else "stop"))
        return answers


def _with_loaded_images(message: dict, images: list) -> dict:
    content = message.get("content")
    if not isinstance(content, list):
        return message
    parts = []
    for part in content:
        if part.get("type") == "image":
            image = load_request_image(part.get("image"))
            images.append(image)
            part = {"type": "image", "image": image}
        parts.append(part)
    return {**message, "content": parts}


def _check(r: Request) -> None:
    if not r.messages:
        raise RadscribeError("request has no messages")
    if r.max_new_tokens < 1:
        raise RadscribeError(f"max_new_tokens must be at least 1, got {r.max_new_tokens}")
    if r.temperature < 0:
        raise RadscribeError(f"temperature must be 0 (greedy) or positive, got {r.temperature}")
    if not 0 < r.top_p <= 1:
        raise RadscribeError(f"top_p must be in (0, 1], got {r.top_p}")
