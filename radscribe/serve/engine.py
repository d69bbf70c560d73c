"""The one generation engine: batched greedy (or sampled) decoding with left padding and a KV cache, and streaming.

eval, chat, the API and the web page all generate through it:

    engine = Engine.from_pretrained("Qwen3-VL-4B-Instruct", adapter="runs/r1")
    texts = engine.generate([Request(messages=[{"role": "user", "content": [
        {"type": "image", "image": "scan.dcm"}, {"type": "text", "text": "图片中的诊断结果是怎样?"}]}])])
    for delta in engine.stream(request): print(delta, end="")

Image entries may hold a PIL image, a path or bytes; the latter two go through `radscribe.data.imaging.load_image`
(DICOM and NIfTI included), and the processor sizes them under the run's image policy (radscribe.model.pixels).
`complete_steps` does the work of `complete` a slice at a time (radscribe.serve.api.Batcher runs other requests
between the slices of a long one). Requests with different sampling settings never share a batch; within a batch
each row stops at its own `max_new_tokens` (or end of turn, or cancel), the batch ends when its last row does, and
a request's `answered` hook hears its answer at the step its row stops, not when the whole batch has.

Sampling settings a request leaves unset (None) are the model's own `generation_config.json`
(`sampling_defaults`): the published Qwen3-VL Instruct folders sample with temperature 0.7, top_p 0.8, top_k 20.
The same resolved values are what the vLLM backend is started with (radscribe/serve/vllm.py), so both answer a
request alike. Eval asks for greedy decoding explicitly (temperature 0).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from radscribe.errors import RadscribeError

MIN_TEMPERATURE = 0.01
"""Lowest sampling temperature: below it logits / temperature overflow to inf and sampling fails (vLLM clamps
to the same value); 0 means greedy decoding."""
SEED_RANGE = (-2**63, 2**64)
"""Seeds torch.manual_seed accepts (a signed or unsigned 64-bit integer)."""
VISION_SLICE_PATCHES = 4096
"""Most image patches `Engine.complete_steps` runs through the vision tower in one slice (one image more if a
single image is larger): 4096 patches of 16x16 pixels are a 1024x1024 image. A 768x768 one (the tiny test model's
largest) takes 0.08 s on one core, processor and vision tower. Images batched from several requests are cut the
same way."""


@dataclass
class Request:
    """One generation request."""

    messages: list[dict]
    """Chat messages in the processor's format: content is a string or a list of {"type": "image"|"text", ...}."""
    max_new_tokens: int = 512
    """Most tokens to generate."""
    temperature: float | None = None
    """0 = greedy decoding; above 0 samples; None = the model's generation_config.json."""
    top_p: float | None = None
    """Nucleus sampling mass (only when sampling); None = the model's."""
    top_k: int | None = None
    """Sample among the k likeliest tokens, 0 = all (only when sampling); None = the model's."""
    repetition_penalty: float | None = None
    """Divides the logits of tokens already in the sequence (1 = none; greedy too); None = the model's."""
    seed: int | None = None
    """Sampling seed (torch's range, -2**63 .. 2**64-1); requests sampled in one batch share the batch's stream."""
    cancel: threading.Event | None = None
    """Set it to stop generating this request (its client has gone); the answer is cut where it stopped."""
    answered: Callable[[Generation], None] | None = None
    """Called with this request's answer as soon as its row stops, while longer rows of its batch go on (the
    API answers a 32-token request grouped with a 512-token one after 32 steps, not 512). Runs in the generating
    thread: it must only hand the answer over. `complete` still returns every answer."""


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
    """`stop` when an end-of-turn token ended the answer, `length` when `max_new_tokens` did, `cancelled` when
    the request's `cancel` event did."""


@dataclass(frozen=True)
class Sampling:
    """Resolved sampling settings: what a request gets for every field it leaves unset."""

    temperature: float
    """0 = greedy."""
    top_p: float
    top_k: int
    """0 = off."""
    repetition_penalty: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def sampling_defaults(generation_config: dict) -> Sampling:
    """A model's generation_config.json (as a dict) -> the settings a request gets by default.

    Spelled out for both backends (ours passes them to `generate`, vLLM gets them with `--generation-config vllm
    --override-generation-config`), so neither falls back on its own defaults: a key the file lacks means what it
    means to transformers 5 (top_p 1, top_k off, no penalty). `do_sample` false, or a temperature below
    MIN_TEMPERATURE (Qwen2.5-VL ships 1e-06, greedy in effect and in vLLM), is greedy decoding."""
    temperature = float(generation_config.get("temperature") or 1.0)
    sample = bool(generation_config.get("do_sample")) and temperature >= MIN_TEMPERATURE
    return Sampling(temperature=temperature if sample else 0.0,
                    top_p=float(generation_config.get("top_p") or 1.0),
                    top_k=int(generation_config.get("top_k") or 0),
                    repetition_penalty=float(generation_config.get("repetition_penalty") or 1.0))


def image_placeholders(messages: list[dict]) -> list[dict]:
    """`messages` with every image part a bare `{"type": "image"}`: what the chat template needs to place its image
    tokens, without the image itself (which may not be decoded yet, or be anything)."""
    return [{**m, "content": [{"type": "image"} if p.get("type") == "image" else p for p in m["content"]]}
            if isinstance(m.get("content"), list) else m for m in messages]


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

    def __init__(self, model, processor, batch_size: int = 8, image_policy=None):
        self.model = model
        self.processor = processor
        self.defaults = sampling_defaults(model.generation_config.to_dict())
        """What a request gets for the sampling fields it leaves unset (the model's generation_config.json)."""
        self.image_policy = image_policy
        """radscribe.model.pixels.PixelLimits in force (from_pretrained says where they came from)."""
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
        from radscribe.model import pixels
        from radscribe.model.load import load_model, resolve_adapter

        model, processor = load_model(model_dir, adapter=adapter, dtype=dtype, quantization=quantization,
                                      device=device)
        policy = pixels.policy(processor, model_dir, resolve_adapter(adapter) if adapter is not None else None)
        engine = cls(model, processor, batch_size=batch_size, image_policy=policy)
        # Said once at start (stderr: stdout carries answers): which image policy and sampling defaults apply.
        print(f"radscribe: {pixels.describe(processor, policy)}", file=sys.stderr, flush=True)
        print(f"radscribe: sampling defaults (from {model_dir}/generation_config.json; a request's own settings "
              f"win): {engine.defaults.as_dict()}", file=sys.stderr, flush=True)
        return engine

    def resolve(self, request: Request) -> Request:
        """`request` with every unset sampling field filled from the model's defaults, and checked."""
        d = self.defaults
        resolved = dataclasses.replace(
            request, temperature=d.temperature if request.temperature is None else request.temperature,
            top_p=d.top_p if request.top_p is None else request.top_p,
            top_k=d.top_k if request.top_k is None else request.top_k,
            repetition_penalty=d.repetition_penalty if request.repetition_penalty is None
            else request.repetition_penalty)
        _check(resolved)
        return resolved

    def generate(self, requests: list[Request], batch_size: int | None = None, progress: bool = False) -> list[str]:
        """Answers in request order; requests are batched (`batch_size`) among those with equal sampling settings."""
        return [g.text for g in self.complete(requests, batch_size, progress)]

    def complete(self, requests: list[Request], batch_size: int | None = None,
                 progress: bool = False) -> list[Generation]:
        """As `generate`, with token counts and the finish reason of every answer."""
        steps = self._complete_steps(requests, batch_size, progress, slices=False)
        try:
            next(steps)  # unsliced: the first step is the whole work
        except StopIteration as done:
            return done.value
        raise AssertionError("an unsliced completion yielded")

    def complete_steps(self, requests: list[Request], batch_size: int | None = None):
        """`complete` a slice of work at a time: a generator that yields after each slice (each run of images
        processed and through the vision tower; then the prompts' text and the generation) and returns the answers,
        so that the caller can run other work between slices. Why: a request of four 4096x4096 uploads held the
        model 0.4 s on an idle 2-core machine, 0.6-1.1 s under bench/serve_hostile.py, and every request behind it
        waited as long (radscribe.serve.api.Batcher now runs short requests between its slices). A batch whose rows
        are all cancelled between slices is not generated."""
        return self._complete_steps(requests, batch_size, progress=False, slices=True)

    def _complete_steps(self, requests: list[Request], batch_size: int | None, progress: bool, slices: bool):
        from tqdm import tqdm

        batch_size = batch_size or self.batch_size
        requests = [self.resolve(r) for r in requests]
        groups: dict[tuple, list[int]] = {}
        for index, r in enumerate(requests):
            key = ((0.0, 1.0, 0, r.repetition_penalty, None) if r.temperature == 0 else
                   (r.temperature, r.top_p, r.top_k, r.repetition_penalty, r.seed))
            groups.setdefault(key, []).append(index)
        answers: list[Generation | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generating", unit="sample", disable=not progress)
        for indices in groups.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                generations = yield from self._batch_steps([requests[i] for i in chunk], slices)
                for index, answer in zip(chunk, generations):
                    answers[index] = answer
                bar.update(len(chunk))
        bar.close()
        return answers

    def stream(self, request: Request) -> Iterator[str]:
        """Text deltas of one answer as they are generated. Closing the iterator stops generation."""
        import torch
        from transformers import TextIteratorStreamer

        request = self.resolve(request)
        inputs = self._encode([request])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancelled = threading.Event()  # set when the consumer closes the iterator
        failure: list[BaseException] = []

        def run():
            try:
                with self._lock, torch.inference_mode():
                    _seed(request)
                    self.model.generate(**inputs, **self._generation_kwargs(request), streamer=streamer,
                                        stopping_criteria=_cancel_criteria([request], extra=cancelled))
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
    def _encode(self, requests: list[Request], conversations: list | None = None, image_grids=None):
        """The batch's model inputs. With `image_grids` (the images' `image_grid_thw`, their features computed
        already: `_image_features`) only the text is encoded, by the processor's own text path, and no image is
        processed again."""
        if conversations is None:
            conversations = _conversations(requests)
        processor = self.processor
        if image_grids is not None:
            processor = copy.copy(processor)  # the engine's own processor stays as it is
            processor.image_processor = _Processed(self.processor.image_processor, image_grids)
        # User text is encoded as text: `sanitize_control_tokens` (transformers' own) keeps the special tokens
        # the chat template writes and encodes those typed in messages as plain characters, so
        # "<|im_start|>system" in a prompt cannot open a turn and "<|image_pad|>" cannot claim an image slot.
        # Left padding: every row's last prompt token sits at the same position, so one decoding step appends
        # to all rows; the attention mask (and, in Qwen-VL, the M-RoPE position ids built from it) skips the pads.
        inputs = processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, sanitize_control_tokens=True,
            return_dict=True, return_tensors="pt", processor_kwargs={"padding": True, "padding_side": "left"})
        inputs = inputs.to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def prompt_tokens(self, messages: list[dict], image_sizes: list[tuple[int, int]]) -> int:
        """Tokens `messages` will take, without decoding any image: text as `_encode` encodes it, plus each
        image's placeholder tokens from its (width, height) alone. Image parts may hold anything (even None).

        Raises RadscribeError when the processor refuses an image size (e.g. an aspect ratio over its limit).
        """
        ids = self.tokenizer.apply_chat_template(image_placeholders(messages),
                                                 chat_template=self.processor.chat_template, add_generation_prompt=True,
                                                 tokenize=True, sanitize_control_tokens=True, return_dict=False)
        image_processor = self.processor.image_processor
        merge = image_processor.merge_size ** 2
        total = len(ids) - len(image_sizes)  # each image is one placeholder in `ids`, expanded below
        for width, height in image_sizes:
            try:
                total += image_processor.get_number_of_image_patches(height, width, {}) // merge
            except ValueError as err:  # the processor's own size rules (aspect ratio, ...)
                raise RadscribeError(f"a {width}x{height} image cannot be processed: {err}") from None
        return total

    @property
    def max_token_chars(self) -> int:
        """Most characters one text token can cover: text longer than limit x this has more than `limit` tokens."""
        if not hasattr(self, "_max_token_chars"):
            # Byte-level BPE: a vocabulary entry's length is its byte count, and a character is at least a byte.
            self._max_token_chars = max(len(token) for token in self.tokenizer.get_vocab())
        return self._max_token_chars

    def _generation_kwargs(self, request: Request) -> dict:
        """`generate` arguments of a resolved request, every sampling setting explicit (nothing is left to the
        checkpoint's generation_config, which `resolve` has already read)."""
        kwargs = {"max_new_tokens": request.max_new_tokens, "eos_token_id": self.eos_token_ids,
                  "pad_token_id": self.tokenizer.pad_token_id, "use_cache": True,
                  "repetition_penalty": request.repetition_penalty}
        if request.temperature > 0:
            kwargs.update(do_sample=True, temperature=request.temperature, top_p=request.top_p, top_k=request.top_k)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    def _batch_steps(self, requests: list[Request], slices: bool):
        """One batch's generation (a generator returning its answers); with `slices`, its images are processed
        and run through the vision tower a run at a time, with a yield after each (`_image_features`)."""
        import torch
        from transformers import StoppingCriteriaList

        longest = max(requests, key=lambda r: r.max_new_tokens)
        if slices:
            conversations = _conversations(requests)
            images = [part["image"] for conversation in conversations for m in conversation
                      if isinstance(m.get("content"), list) for part in m["content"] if part.get("type") == "image"]
            features, grids = (yield from self._image_features(images)) if images else (None, None)
            inputs = self._encode(requests, conversations, grids)
            if features is not None:
                inputs["mm_encoder_outputs"] = {"image": features}
        else:
            inputs = self._encode(requests)
        prompt_lengths = inputs["attention_mask"].sum(dim=1).tolist()
        rows = _Rows(self, requests, inputs["input_ids"].shape[1], prompt_lengths)
        if all(r.cancel is not None and r.cancel.is_set() for r in requests):
            return [rows.finish(index, []) for index in range(len(requests))]  # nobody waits: no prefill
        with self._lock, torch.inference_mode():
            _seed(longest)
            output = self.model.generate(**inputs, **self._generation_kwargs(longest),
                                         stopping_criteria=StoppingCriteriaList([rows]))
        return [rows.finish(index, tokens) for index, tokens in enumerate(output[:, rows.start:].tolist())]

    def _image_features(self, images: list):
        """The vision-tower outputs of `images` (PIL, in prompt order) as one `mm_encoder_outputs["image"]`,
        which transformers' generate takes in place of `pixel_values`, and their `image_grid_thw`: processed and
        encoded a run of images at a time, yielding after each run. A run holds whole images, up to
        VISION_SLICE_PATCHES patches (at least one image); each image is processed alone and attends only to
        itself, so its features are the same whichever run computes it, and no buffer of all the images'
        pixels is ever built (in the server's model process the processor's fresh 56 MB one for four 768x768 images
        took 0.2-0.4 s more than processing them did)."""
        import torch

        image_processor = self.processor.image_processor
        patches = [image_processor.get_number_of_image_patches(im.height, im.width, {}) for im in images]
        outputs, grids, first = [], [], 0
        while first < len(images):
            end = first + 1
            while end < len(images) and sum(patches[first:end + 1]) <= VISION_SLICE_PATCHES:
                end += 1
            run = image_processor(images=images[first:end], return_tensors="pt").to(self.model.device)
            with self._lock, torch.inference_mode():
                outputs.append(self.model.get_image_features(run["pixel_values"].to(self.model.dtype),
                                                             run["image_grid_thw"], return_dict=True))
            grids.append(run["image_grid_thw"])
            first, run = end, None
            yield
        return _joined(outputs), torch.cat(grids)

    def _generation(self, request: Request, tokens: list[int], prompt_length: int, cancelled: bool) -> Generation:
        """The answer in a row's generated `tokens` (padding after its end included)."""
        tokens = tokens[:request.max_new_tokens]
        stops = set(self.eos_token_ids)
        if cancelled:
            # Padded from the step that saw the cancel on: cut there (nobody waits for this answer).
            end = next((i for i, t in enumerate(tokens) if t in stops or t == self.tokenizer.pad_token_id),
                       len(tokens))
            return Generation(text=self.tokenizer.decode(tokens[:end], skip_special_tokens=True),
                              prompt_tokens=int(prompt_length), completion_tokens=end, finish_reason="cancelled")
        end = next((i for i, t in enumerate(tokens) if t in stops), None)
        kept = tokens if end is None else tokens[:end + 1]  # rows that stopped early are padded after it
        return Generation(text=self.tokenizer.decode(kept, skip_special_tokens=True),
                          prompt_tokens=int(prompt_length), completion_tokens=len(kept),
                          finish_reason="length" if end is None else "stop")


class _Rows:
    """The rows of one batched generate call, watched at every step: a row stops at its own budget, at an
    end-of-turn token or at a cancel, and its request's `answered` hook hears the answer then. transformers
    pads a stopped row until the batch's last row stops; without this a row ran on to the longest budget in its
    batch and its answer waited for the batch (an abandoned 64-token request made its 32-token neighbours wait
    64 steps: bench/serve_hostile.py)."""

    def __init__(self, engine: Engine, requests: list[Request], start: int, prompt_lengths: list[int]):
        self.engine, self.requests, self.start, self.prompt_lengths = engine, requests, start, prompt_lengths
        self.stops = set(engine.eos_token_ids)
        self.answers: list[Generation | None] = [None] * len(requests)

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        steps = input_ids.shape[1] - self.start
        last = input_ids[:, -1].tolist()
        done = []
        for index, r in enumerate(self.requests):
            cancelled = r.cancel is not None and r.cancel.is_set()
            stopped = (self.answers[index] is not None or cancelled or steps >= r.max_new_tokens
                       or last[index] in self.stops)
            if stopped and self.answers[index] is None:
                self._answer(index, input_ids[index, self.start:].tolist(), cancelled)
            done.append(stopped)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def finish(self, index: int, tokens: list[int]) -> Generation:
        """Row `index`'s answer: the one given when it stopped, else (a row the generate call ended) from `tokens`."""
        if self.answers[index] is None:
            r = self.requests[index]
            self._answer(index, tokens, r.cancel is not None and r.cancel.is_set())
        return self.answers[index]

    def _answer(self, index: int, tokens: list[int], cancelled: bool) -> None:
        r = self.requests[index]
        answer = self.engine._generation(r, tokens, self.prompt_lengths[index], cancelled)
        self.answers[index] = answer
        if r.answered is not None:
            r.answered(answer)


def _joined(outputs: list):
    """The vision-tower outputs of several runs of images as one, as one call over all the images returns it:
    per-image splits (tuples, as `get_image_features` splits its pooled output, and lists of them per layer, as
    Qwen3-VL's deepstack features) are chained, per-patch tensors concatenated."""
    import torch

    def join(values):
        if isinstance(values[0], tuple):
            return tuple(part for value in values for part in value)
        if isinstance(values[0], list):
            return [join(list(layer)) for layer in zip(*values)]
        return torch.cat(values, dim=0)

    return type(outputs[0])(**{key: join([o[key] for o in outputs]) for key in outputs[0].keys()})


class _Processed:
    """An image processor that answers with the image inputs of images processed already (their grids, which
    the processor's text path reads to place each image's tokens), so that a processor holding it encodes the
    text alone. Everything else is the processor's own (`fetch_images`, the sizes, ...)."""

    def __init__(self, image_processor, image_grids):
        self.image_processor, self.image_grids = image_processor, image_grids

    def __getattr__(self, name):
        return getattr(self.image_processor, name)

    def __call__(self, images=None, **kwargs):
        from transformers import BatchFeature

        return BatchFeature({"image_grid_thw": self.image_grids})


def _conversations(requests: list[Request]) -> list:
    return [[_with_loaded_images(m) for m in r.messages] for r in requests]


def _with_loaded_images(message: dict) -> dict:
    content = message.get("content")
    if not isinstance(content, list):
        return message
    return {**message, "content": [{"type": "image", "image": load_request_image(part.get("image"))}
                                   if part.get("type") == "image" else part for part in content]}


def _seed(request: Request) -> None:
    """Seed torch's generator for a sampled request (under the engine lock: the generator is global)."""
    import torch

    if request.temperature > 0 and request.seed is not None:
        torch.manual_seed(request.seed)


def _cancel_criteria(requests: list[Request], extra: threading.Event | None = None):
    """A stopping criterion ending each row whose request was cancelled (per row: its batch neighbours go on)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    events = [r.cancel for r in requests]

    class _Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stop_all = extra is not None and extra.is_set()
            return torch.tensor([stop_all or (e is not None and e.is_set()) for e in events],
                                dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_Cancelled()])


def _check(r: Request) -> None:
    if not r.messages:
        raise RadscribeError("request has no messages")
    if r.max_new_tokens < 1:
        raise RadscribeError(f"max_new_tokens must be at least 1, got {r.max_new_tokens}")
    if not (r.temperature == 0 or MIN_TEMPERATURE <= r.temperature < float("inf")):
        raise RadscribeError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {r.temperature}")
    if r.seed is not None and not SEED_RANGE[0] <= r.seed < SEED_RANGE[1]:
        raise RadscribeError(f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1] - 1}], got {r.seed}")
    if not 0 < r.top_p <= 1:
        raise RadscribeError(f"top_p must be in (0, 1], got {r.top_p}")
    if not (isinstance(r.top_k, int) and r.top_k >= 0):
        raise RadscribeError(f"top_k must be a whole number, 0 (off) or more, got {r.top_k}")
    if not 0 < r.repetition_penalty < float("inf"):
        raise RadscribeError(f"repetition_penalty must be positive, got {r.repetition_penalty}")
