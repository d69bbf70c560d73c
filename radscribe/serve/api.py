"""The OpenAI-compatible API and the web page: `/v1/models`, `/v1/chat/completions` (plain and SSE), `/health`, `/`.

Run as: radscribe serve --model BASE [--adapter RUN] [--host 127.0.0.1] [--port 8000] [--api-key KEY]

`create_app(engine, cfg)` builds the FastAPI app around one `radscribe.serve.engine.Engine`. A request passes,
in order: the HTTP guard (radscribe/serve/safety.py `HttpGuard`: Host allow-list, JSON-only POSTs, a cap on
requests in flight, security headers), a bounded body read, field checks, image checks from headers alone
(safety.py), the prompt-token cap (counted before any image is decoded), and admission (`Admission`: a bounded
queue, a share of it per client address, and a budget of decoded pixels); only then are its images decoded by
the one image loader, `radscribe.data.imaging.load_image` (DICOM is windowed server-side), and sized for the
model's processor. Non-streaming requests go through a `Batcher`: one worker thread takes the waiting request
that is due (`FairQueue`: weighted fair queuing by prompt tokens per client address), gathers whatever else of a
similar prompt length arrives within `batch_wait_ms` (up to `max_batch`), and calls `engine.complete` once for
the group; a group of long prompts (four large images) goes a slice at a time (`engine.complete_steps`), with a
group of short requests run between two slices. Everything a request costs before the model runs at a lower CPU
priority than generation (`INTAKE_NICE`). Streaming requests run on the same worker, one at a time, so the
model is never driven by two threads at once. A client that goes away cancels its request, queued or
generating. Every refusal is an OpenAI-shaped JSON error with a 4xx status; the server keeps serving after it.
docs/serving.md lists every limit and its default.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import math
import os
import queue
import re
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import Request as HttpRequest  # module level: FastAPI resolves route annotations by name

from radscribe.errors import RadscribeError
from radscribe.serve.safety import (LOOPBACK_NAMES, HttpGuard, ImagePolicy, RequestRejected, check_pixels,
                                    header_timeout_protocol, image_bytes)
from radscribe.serve.vllm import VllmOptions

WEB_DIR = Path(__file__).parent / "web"
MAX_NUMBER_DIGITS = 40
"""Longest integer literal a request body may hold (Python refuses to parse past 4,300 digits, with a 500)."""


@dataclass
class ServeConfig:
    """What `radscribe serve` loads, how it listens, what it accepts, how much work it admits and how it batches."""

    model: str = ""
    """Base model folder, or a `radscribe export` folder (the vllm backend needs one)."""
    adapter: str | None = None
    """A `radscribe train` run folder or a PEFT adapter folder (hf backend only)."""
    backend: Literal["hf", "vllm", "llamacpp"] = "hf"
    """hf: transformers + our batching (CPU or GPU); vllm: vLLM's server on a merged export (GPU); llamacpp:
    llama-server on a `radscribe export --format gguf` folder behind this API's checks (radscribe/serve/llamacpp.py)."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Model dtype (hf backend); auto keeps the checkpoint's."""
    quantization: Literal["4bit"] | None = None
    """`4bit` loads the hf backend in bitsandbytes nf4."""
    device: str | None = None
    """cpu, cuda, cuda:1 (default: cuda when available)."""
    host: str = "127.0.0.1"
    """Address to bind. Loopback by default; anything else exposes the model to the network."""
    port: int = 8000
    """TCP port."""
    api_key: str | None = None
    """If set, every /v1 request needs `Authorization: Bearer <key>` (env RADSCRIBE_API_KEY also sets it)."""
    model_name: str = "radscribe"
    """The model id reported by /v1/models and expected in requests' `model` field."""
    allow_origins: list[str] = field(default_factory=list)
    """Host names the server answers to besides the loopback names and the bind address (the `Host` header and
    any `Origin` must name one of them: DNS rebinding and cross-site requests are refused)."""
    max_body_bytes: int = 16 * 1024 * 1024
    """Largest request body; a bigger one gets 413 before it is parsed."""
    max_tokens_limit: int = 1024
    """Largest `max_tokens` a request may ask for."""
    default_max_tokens: int = 512
    """`max_tokens` when a request does not say."""
    max_prompt_tokens: int = 8192
    """Most prompt tokens (text and image tokens) one request may bring: four 1024x1024 images (1,024 tokens
    each with patch 16 and merge 2) plus a 4,096-token question and conversation. Counted before decoding."""
    max_images: int = 4
    """Most images in one request."""
    images: ImagePolicy = field(default_factory=ImagePolicy)
    """Where images may come from (data URIs only by default) and their byte and pixel limits."""
    max_batch: int = 8
    """Most non-streaming requests generated together; 1 turns batching off."""
    batch_wait_ms: float = 5.0
    """How long the batcher waits for more requests after the first one of a group arrives."""
    vllm: VllmOptions = field(default_factory=VllmOptions)
    """vLLM settings (vllm backend)."""
    max_queue: int = 32
    """Most admitted requests waiting for the model (decoding or queued; the batch generating not counted);
    past it requests get 429 with Retry-After."""
    max_queue_per_client: int = 16
    """Most of the queue one client address may hold (a flood from one host cannot starve the others; behind a
    reverse proxy every client shares the proxy's address, so set it to max_queue there)."""
    max_queued_pixels: int = 2 * 4 * 4096 * 4096
    """Decoded image pixels that admitted requests may hold at once (two requests of four 4096x4096 images);
    past it requests get 429."""
    client_mb_per_s: float = 4.0
    """Request-body megabytes one client address may send per second, sustained (a burst may reach
    max_body_bytes); past it 429 with Retry-After before the body is read. Behind a reverse proxy every client
    shares the proxy's address: raise it there."""
    client_pixels_per_s: int = 4 * 1024 * 1024
    """Image pixels one client address may have decoded per second, sustained (a burst may reach max_images x
    images.max_pixels); past it 429 with Retry-After before anything is decoded."""
    max_in_flight: int = 128
    """Most HTTP requests being handled at once (reading, checking, waiting); past it 503 with Retry-After."""
    header_timeout_s: float = 10.0
    """A request's headers must arrive within this many seconds, else the connection is closed."""
    body_timeout_s: float = 30.0
    """A request's body must arrive within this many seconds, else 408."""


def check_config(cfg: ServeConfig) -> None:
    """Limits that could never let a request through are mistakes: one line naming the setting and the fix."""
    positive = {"max_body_bytes": cfg.max_body_bytes, "max_tokens_limit": cfg.max_tokens_limit,
                "default_max_tokens": cfg.default_max_tokens, "max_prompt_tokens": cfg.max_prompt_tokens,
                "max_images": cfg.max_images, "max_batch": cfg.max_batch, "max_queue": cfg.max_queue,
                "max_queue_per_client": cfg.max_queue_per_client, "max_queued_pixels": cfg.max_queued_pixels,
                "max_in_flight": cfg.max_in_flight, "header_timeout_s": cfg.header_timeout_s,
                "body_timeout_s": cfg.body_timeout_s, "images.max_image_bytes": cfg.images.max_image_bytes,
                "images.max_pixels": cfg.images.max_pixels, "images.fetch_timeout_s": cfg.images.fetch_timeout_s,
                "client_mb_per_s": cfg.client_mb_per_s, "client_pixels_per_s": cfg.client_pixels_per_s}
    for name, value in positive.items():
        if not value > 0:
            raise RadscribeError(f"serve: {name} must be positive, got {value}")
    largest = cfg.max_images * cfg.images.max_pixels
    shared = cfg.max_queued_pixels - cfg.max_queued_pixels // Admission.RESERVED_PART
    if shared < largest:
        need = math.ceil(largest * Admission.RESERVED_PART / (Admission.RESERVED_PART - 1))
        raise RadscribeError(f"serve: max_queued_pixels {cfg.max_queued_pixels} leaves {shared} pixels for large "
                             f"requests, less than one request may bring ({cfg.max_images} images x "
                             f"{cfg.images.max_pixels} pixels); raise --max-queued-pixels to at least {need} or "
                             "lower --max-pixels")


class Admission:
    """Who may enter the queue: bounded waiting requests (in all and per client) and decoded pixels held.

    The pixel budget is split so that large uploads cannot lock small ones out (bench/serve_hostile.py found four
    clients sending four 4096x4096 images each holding it whole, and honest clients with one 128x128 scan at 429):
    a quarter of it is reserved in equal slots, one per queue place, and a request whose images fit one slot
    (1,048,576 pixels by default: a 1024x1024 scan) is never refused for pixels; a larger one is charged what it
    holds beyond its slot against the other three quarters. The total held stays within the budget."""

    RESERVED_PART = 4
    """1/RESERVED_PART of the pixel budget is the slots' reserve."""

    def __init__(self, max_queue: int, max_per_client: int, max_pixels: int):
        self.max_queue, self.max_per_client, self.max_pixels = max_queue, max_per_client, max_pixels
        self.slot = max_pixels // self.RESERVED_PART // max_queue
        self.shared = max_pixels - self.slot * max_queue
        self.waiting = 0
        self.running = 0
        self.pixels = 0
        self.shared_used = 0
        self.by_client: dict[str, int] = {}
        self._lock = threading.Lock()

    def admit(self, client: str, pixels: int, retry_after: int) -> "Ticket":
        with self._lock:
            mine = self.by_client.get(client, 0)
            if self.waiting >= self.max_queue:
                why = f"the queue is full ({self.waiting} requests waiting)"
            elif mine >= self.max_per_client:
                why = f"this client already has {mine} requests waiting, its share of the queue"
            elif self.shared_used + max(0, pixels - self.slot) > self.shared:
                why = (f"large queued requests already hold {self.shared_used} decoded pixels beyond their slots, "
                       f"the limit is {self.shared}")
            else:
                self.waiting += 1
                self.pixels += pixels
                self.shared_used += max(0, pixels - self.slot)
                self.by_client[client] = mine + 1
                return Ticket(self, client, pixels)
        raise RequestRejected(f"server busy: {why}; retry after {retry_after} s", status=429, code="queue_full",
                              headers={"Retry-After": str(retry_after)})

    def _start(self, ticket: "Ticket") -> None:
        with self._lock:
            self.waiting -= 1
            self.running += 1
            self._leave_client(ticket.client)

    def _release(self, ticket: "Ticket", started: bool) -> None:
        with self._lock:
            self.pixels -= ticket.pixels
            self.shared_used -= max(0, ticket.pixels - self.slot)
            if started:
                self.running -= 1
            else:
                self.waiting -= 1
                self._leave_client(ticket.client)

    def _leave_client(self, client: str) -> None:
        left = self.by_client[client] - 1
        if left:
            self.by_client[client] = left
        else:
            del self.by_client[client]

    @property
    def saturated(self) -> bool:
        return self.waiting >= self.max_queue or self.shared_used >= self.shared


class ClientRate:
    """A credit per client address that refills at `per_s` up to `burst` (a token bucket): what one client may
    make the server read or decode, sustained. Requests that never reach the model cost too: 11 MB deflate bombs
    are refused one by one, but reading, base64-decoding and inflating them within bounds, back to back, takes
    the server process's cores and GIL from the model's thread (bench/serve_hostile.py); the fair queue cannot
    see that work, this can."""

    def __init__(self, per_s: float, burst: float, what: str, option: str):
        self.per_s, self.burst, self.what, self.option = per_s, burst, what, option
        self._credit: dict[str, tuple[float, float]] = {}  # client -> (credit, when)
        self._lock = threading.Lock()

    def take(self, client: str, amount: float, debt: bool = False) -> None:
        """Charge `amount`, or 429 when the client's credit does not cover it (`debt`: charge what was already
        read, even into debt, which then holds the client's next requests back)."""
        with self._lock:
            now = time.monotonic()
            credit, then = self._credit.get(client, (self.burst, now))
            credit = min(self.burst, credit + (now - then) * self.per_s)
            if not debt and credit < amount:
                wait = math.ceil((amount - credit) / self.per_s)
                self._credit[client] = (credit, now)
                raise RequestRejected(f"this client has sent more {self.what} than this server takes from one "
                                      f"address ({self.option}); retry after {wait} s", status=429,
                                      code="rate_limited", headers={"Retry-After": str(wait)})
            self._credit[client] = (credit - amount, now)
            if len(self._credit) > 4096:  # forget the clients whose credit has refilled: they start full anyway
                self._credit = {c: (k, t) for c, (k, t) in self._credit.items()
                                if k + (now - t) * self.per_s < self.burst}


class Ticket:
    """One admitted request: `start()` when it begins generating, `release()` when it is over (idempotent)."""

    def __init__(self, admission: Admission, client: str, pixels: int):
        self.admission, self.client, self.pixels = admission, client, pixels
        self.started = self.released = False
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if not self.started and not self.released:
                self.started = True
                self.admission._start(self)

    def release(self) -> None:
        with self._lock:
            if not self.released:
                self.released = True
                self.admission._release(self, self.started)

    def __del__(self):
        # A safety net: a stream whose client left before its first byte never runs the generator that would
        # release it; the ticket then goes with the generator, and its place in the queue with it.
        self.release()


class FairQueue:
    """Waiting jobs served fairly across client addresses, by the prompt tokens each has had served (weighted fair
    queuing; first in, first out within one client): the client served least goes next, so a host that floods the
    queue, or sends one 2,000-token upload after another, waits behind its own work, not in front of everyone
    else's. A client joining the queue starts level with the least-served one waiting: idle time earns no credit,
    work already done is not forgotten. `get` mimics queue.Queue."""

    def __init__(self):
        self._by_client: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()
        self._served: dict[str, int] = {}
        self._clock = 0  # the served count of the last client to go: where a client coming back starts at least
        self._ready = threading.Condition()

    def put(self, job, client: str = "", cost: int = 1) -> None:
        with self._ready:
            if client not in self._by_client:
                self._served[client] = max(self._served.get(client, 0), self._level())
            self._by_client.setdefault(client, collections.deque()).append((job, max(1, cost)))
            self._ready.notify()

    def get(self, timeout: float | None = None, accept=None):
        """The next job due; with `accept`, the next due one it takes (the others keep their places)."""
        with self._ready:
            if not self._ready.wait_for(lambda: self._first(accept) is not None, timeout):
                raise queue.Empty
            client, index = self._first(accept)
            jobs = self._by_client[client]
            job, cost = jobs[index]
            del jobs[index]
            if not jobs:
                del self._by_client[client]
            self._clock = self._served[client]
            self._served[client] += cost
            level = self._level()  # forget whoever is behind the level and not waiting: they would start there
            self._served = {c: n for c, n in self._served.items() if c in self._by_client or n > level}
            return job

    def _level(self) -> int:
        return min((self._served[c] for c in self._by_client), default=self._clock)

    def _first(self, accept):
        for client in sorted(self._by_client, key=self._served.__getitem__):  # stable: ties in arrival order
            for index, (job, _) in enumerate(self._by_client[client]):
                if accept is None or accept(job):
                    return client, index
        return None

    def qsize(self) -> int:
        with self._ready:
            return sum(len(jobs) for jobs in self._by_client.values())


INTAKE_NICE = 10
"""How much lower than generation the CPU priority of request intake runs: the pool threads that parse bodies,
check and decode images and count tokens. On a saturated machine the kernel then gives the model (its own
process, at the server's priority) and the event loop the cores first, and what attackers make the server parse,
inflate and refuse waits for them, not the other way round (bench/results/serve.md: attacked/quiet p99 from
3.1-3.7x to 2.8-3.1x in long runs, more honest answers under attack). Linux only: there a thread has a priority
of its own."""

_intake_thread = threading.local()


def at_intake_priority(fn, *args):
    """`fn(*args)` in this thread at the intake's lower CPU priority (lowered once per thread, for good: an
    unprivileged process may lower a thread's priority but never raise it back)."""
    if not getattr(_intake_thread, "lowered", False):
        _intake_thread.lowered = True
        if sys.platform == "linux" and INTAKE_NICE:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + INTAKE_NICE))
    return fn(*args)


class Batcher:
    """One worker thread between the API and the engine: groups plain requests of similar prompt length, runs
    streams one at a time, and a group of long prompts (SLICED_TOKENS) a slice at a time with one group of short
    ones between two slices. Waiting requests are taken fairly across client addresses (`FairQueue`)."""

    def __init__(self, engine, max_batch: int = 8, wait_ms: float = 5.0):
        self.engine = engine
        self.max_batch = max(1, max_batch)
        self.wait_s = max(0.0, wait_ms) / 1000
        self.generate_calls = 0  # with `batched_requests`, reported by /health (the bench reads the mean batch)
        self.batched_requests = 0
        self.mean_batch_s = 1.0  # running mean of one generate call's seconds: the Retry-After estimate
        self._queue = FairQueue()
        self._worker = threading.Thread(target=self._run, name="radscribe-batcher", daemon=True)
        self._worker.start()

    def submit(self, request, ticket: Ticket | None = None, tokens: int | None = None) -> "_Job":
        """Queue a non-streaming request (`tokens`: its prompt tokens, if known); `job.future` resolves to the
        engine's `Generation`."""
        job = _Job(request, concurrent.futures.Future(), ticket, tokens)
        self._queue.put(job, ticket.client if ticket else "", tokens or 1)
        return job

    def submit_stream(self, request, push, ticket: Ticket | None = None, tokens: int | None = None) -> "_StreamJob":
        """Queue a streaming request; `push(delta)` is called per text piece, then `push(None)` (or an exception)."""
        job = _StreamJob(request, push, ticket)
        self._queue.put(job, ticket.client if ticket else "", tokens or 1)
        return job

    def retry_after(self, waiting: int) -> int:
        """Seconds until the queue ahead of a new request has probably drained (at least 1, at most 60)."""
        return max(1, min(60, math.ceil((waiting / self.max_batch + 1) * self.mean_batch_s)))

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=5)

    def _run(self) -> None:
        sliced = None  # a group of long prompts under way a slice at a time (_Sliced), if any
        while True:
            if sliced is None:
                job = self._queue.get()
                if job is None:
                    return
            else:
                # Between two slices of a long group, one group of short requests runs whole: a short request
                # waits for a slice, not for the long group's whole length, and the long group still moves on.
                try:
                    job = self._queue.get(timeout=0, accept=lambda other: other is not None and not _long(other))
                except queue.Empty:
                    job = None
            if isinstance(job, _StreamJob):
                self._run_stream(job)
            elif job is not None:
                group = self._gathered(job)
                # Engines that schedule their own work (llama.cpp's) have no complete_steps: whole, as before.
                if sliced is None and _long(job) and hasattr(self.engine, "complete_steps"):
                    sliced = self._sliced(group)
                else:
                    self._run_group(group)
                group = None
            if sliced is not None and not sliced.step():
                sliced = None
            job = None  # nothing of a finished group outlives it while the worker waits (its images)

    def _gathered(self, job: "_Job") -> list["_Job"]:
        """`job` and the plain requests of a similar prompt length that join it: those that queued while the last
        group ran are taken at once, then the batching window is waited out. Left padding makes every row of a
        batch as long as its longest prompt, so a 2,000-token upload would cost its neighbours 10x."""
        group = [job]
        deadline = time.monotonic() + self.wait_s
        while len(group) < self.max_batch:
            try:
                group.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic()),
                                             accept=lambda other: isinstance(other, _Job) and _similar(job, other)))
            except queue.Empty:
                break
        return group

    def _started(self, group: list["_Job"]) -> list["_Job"]:
        """The group less the requests whose client left while they queued (cancelled: they never reach the
        model), the others' tickets started."""
        group = [j for j in group if j.future.set_running_or_notify_cancel()]
        for j in group:
            if j.ticket is not None:
                j.ticket.start()
        self.generate_calls += bool(group)
        self.batched_requests += len(group)
        return group

    def _run_group(self, group: list["_Job"], retry: bool = False) -> None:
        if not retry:
            group = self._started(group)
        if not group:
            return
        started = time.monotonic()
        try:
            # Each answer goes out as soon as its row stops (`answered`), not when the group's longest row has.
            answers = self.engine.complete(_answerable(group))
        except Exception as err:
            self._failed(group, err)
            return
        self._finished(group, answers, started)

    def _sliced(self, group: list["_Job"]) -> "_Sliced":
        group = self._started(group)
        return _Sliced(self, group, self.engine.complete_steps(_answerable(group)) if group else iter(()))

    def _finished(self, group: list["_Job"], answers: list, started: float | None = None) -> None:
        if started is not None:  # a sliced group's time has other groups in it: not an estimate of one call
            self.mean_batch_s = 0.8 * self.mean_batch_s + 0.2 * (time.monotonic() - started)
        for j, answer in zip(group, answers):
            j.finish(answer)

    def _failed(self, group: list["_Job"], err: Exception) -> None:
        if len(group) == 1:
            group[0].finish(error=err)
            return
        # One bad request must not fail its neighbours: retry each alone, so only the culprit gets the error.
        for j in group:
            if not j.future.done():
                self._run_group([j], retry=True)

    def _run_stream(self, job: "_StreamJob") -> None:
        if job.cancelled:
            job.request = None
            return
        if job.ticket is not None:
            job.ticket.start()
        deltas = None
        try:
            deltas = self.engine.stream(job.request)
            for delta in deltas:
                if job.cancelled:
                    break
                if delta:
                    job.push(delta)
            job.push(None)
        except Exception as err:
            job.push(err)
        finally:
            if hasattr(deltas, "close"):
                deltas.close()  # the engine stops generating when its iterator is closed
            job.request = None


SLICED_TOKENS = 1024
"""Prompts of at least this many tokens (images included) are generated a slice at a time
(`Engine.complete_steps`), with groups of shorter ones run between the slices (`Batcher`)."""


def _long(job) -> bool:
    return isinstance(job, _Job) and job.tokens is not None and job.tokens >= SLICED_TOKENS


def _answerable(group: list["_Job"]) -> list:
    """The group's requests, each answering its job as soon as its row stops."""
    return [dataclasses.replace(j.request, answered=j.finish) for j in group]


class _Sliced:
    """A group under way a slice at a time: `step()` runs the next slice, and answers the group (False) once the
    last one is done."""

    def __init__(self, batcher: Batcher, group: list["_Job"], steps):
        self.batcher, self.group, self.steps = batcher, group, steps

    def step(self) -> bool:
        try:
            next(self.steps)
            return True
        except StopIteration as done:
            if self.group:
                self.batcher._finished(self.group, done.value)
        except Exception as err:  # noqa: BLE001 - answered to the requests, as an unsliced group's failure is
            self.batcher._failed(self.group, err)
        self.group = self.steps = None
        return False


def _similar(a: "_Job", b: "_Job") -> bool:
    """Prompt lengths within 2x of each other (plus a little), or unknown."""
    if a.tokens is None or b.tokens is None:
        return True
    return max(a.tokens, b.tokens) <= 2 * min(a.tokens, b.tokens) + 32


@dataclass
class _Job:
    request: Any
    future: concurrent.futures.Future
    ticket: Ticket | None = None
    tokens: int | None = None
    """Prompt tokens, as counted at admission (None: unknown, batches with anything)."""

    def finish(self, answer=None, error: BaseException | None = None) -> None:
        self.request = None  # the decoded images go with it, as soon as the answer exists
        if not self.future.done():
            self.future.set_exception(error) if error is not None else self.future.set_result(answer)


@dataclass
class _StreamJob:
    request: Any
    push: Any
    ticket: Ticket | None = None
    cancelled: bool = False


@dataclass
class _PendingImage:
    """An image checked from its header, not decoded yet (decoding waits for admission)."""

    data: bytes
    window: str | None
    width: int
    height: int
    pixels: int
    param: str


def create_app(engine, cfg: ServeConfig | None = None):
    """The FastAPI app serving `engine`: anything with `complete(list[Request])`, `stream(Request)`,
    `prompt_tokens(messages, image_sizes)` and `max_token_chars` (radscribe.serve.engine.Engine has them)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool as _in_pool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def run_in_threadpool(fn, *args):  # a request's intake, off the event loop and below the model
        return await _in_pool(at_intake_priority, fn, *args)

    cfg = cfg or ServeConfig()
    check_config(cfg)
    batcher = Batcher(engine, cfg.max_batch, cfg.batch_wait_ms)
    admission = Admission(cfg.max_queue, cfg.max_queue_per_client, cfg.max_queued_pixels)
    body_rate = ClientRate(cfg.client_mb_per_s * 1024 * 1024, cfg.max_body_bytes, "request-body bytes",
                           "--client-mb-per-s")
    pixel_rate = ClientRate(cfg.client_pixels_per_s, cfg.max_images * cfg.images.max_pixels, "image pixels",
                            "--client-pixels-per-s")

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        batcher.close()

    app = FastAPI(title="radscribe", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.batcher = batcher
    app.state.admission = admission
    app.state.cfg = cfg

    def error(status: int, message: str, param: str | None = None, code: str | None = None,
              kind: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                            status_code=status, headers=headers)

    @app.exception_handler(RequestRejected)
    async def _rejected(_req, err: RequestRejected):
        return error(err.status, str(err), err.param, err.code, headers=err.headers)

    @app.exception_handler(RadscribeError)
    async def _radscribe(_req, err: RadscribeError):  # e.g. load_image refusing an unknown window
        return error(400, str(err), code="invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req, err: StarletteHTTPException):
        return error(err.status_code, str(err.detail), code="not_found" if err.status_code == 404 else None)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req, err: RequestValidationError):
        return error(400, f"malformed request: {err.errors()[:1]}")

    @app.exception_handler(Exception)
    async def _crash(_req, err: Exception):
        return error(500, f"internal error ({type(err).__name__}); the server is still up", kind="server_error")

    @app.get("/health")
    async def health():
        calls = batcher.generate_calls
        saturated = admission.saturated
        defaults, policy = getattr(engine, "defaults", None), getattr(engine, "image_policy", None)
        return {"status": "saturated" if saturated else "ok", "model": cfg.model_name,
                "sampling_defaults": defaults.as_dict() if defaults is not None else None,
                "image_pixels": [policy.min_pixels, policy.max_pixels] if policy is not None else None,
                "queued": admission.waiting, "generating": admission.running, "max_queue": cfg.max_queue,
                "queued_pixels": admission.pixels, "max_queued_pixels": cfg.max_queued_pixels,
                "saturated": saturated, "in_flight": guard.in_flight, "generate_calls": calls,
                "mean_batch": round(batcher.batched_requests / calls, 3) if calls else None}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "radscribe"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        body = await _read_json(request, cfg, run_in_threadpool, body_rate)
        params = _completion_params(body, cfg)
        messages, pending = await run_in_threadpool(_checked_messages, body["messages"], cfg)
        del body  # the parsed JSON holds the base64 images: gone before anything is decoded
        tokens = await run_in_threadpool(_check_prompt_tokens, engine, messages, pending, cfg)
        ticket = _admit(request, pending)
        try:
            messages = await run_in_threadpool(_decoded, engine, messages, pending)
            del pending
            gen = _engine_request(messages, params)
            del messages
        except BaseException:
            ticket.release()
            raise
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if params["stream"]:
            return StreamingResponse(_sse(batcher, gen, ticket, tokens, completion_id, created, cfg.model_name,
                                          params),
                                     media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})
        try:
            job = batcher.submit(gen, ticket, tokens)
            del gen
            answer = await _answer_or_disconnect(request, job)
        except _ClientGone:
            return error(499, "client closed the request")  # nobody reads it; the generation was cancelled
        except RadscribeError as err:  # the engine refused the request itself
            return error(400, str(err), code="invalid_request")
        except Exception as err:  # the engine failed (e.g. out of memory): answer, log one line, keep serving
            print(f"radscribe serve: generation failed: {type(err).__name__}: {err}", flush=True)
            return error(500, f"generation failed ({type(err).__name__}); the server is still up",
                         kind="server_error")
        finally:
            ticket.release()
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": cfg.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                         "finish_reason": answer.finish_reason}],
            "usage": {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                      "total_tokens": answer.prompt_tokens + answer.completion_tokens},
        }

    @app.post("/v1/preview")
    async def preview(request: HttpRequest):
        """The image as the model will see it (DICOM windowed server-side), as PNG, for the web page."""
        body = await _read_json(request, cfg, run_in_threadpool, body_rate)
        url, window = body.get("image_url"), body.get("window")
        if isinstance(url, dict):
            url, window = url.get("url"), url.get("window", window)
        image = await run_in_threadpool(_pending_image, url, window, cfg.images, "image_url")
        del body
        ticket = _admit(request, [image])  # decoding costs the same memory as for a completion
        try:
            png, size = await run_in_threadpool(_preview_png, engine, image)
        finally:
            ticket.release()
        headers = {"X-Image-Size": f"{size[0]}x{size[1]}"}
        processor = getattr(engine, "processor", None)
        if processor is not None:
            from radscribe.model.pixels import image_tokens

            headers["X-Image-Tokens"] = str(image_tokens(processor, *size))
        return Response(png, media_type="image/png", headers=headers)

    @app.get("/")
    async def index():
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    @app.get("/web/{name}")
    async def web_asset(name: str):
        # Only the files shipped in the package folder, by exact name (no paths).
        assets = {p.name: p for p in WEB_DIR.iterdir() if p.is_file()}
        if name not in assets:
            return error(404, f"no web asset {name!r}", code="not_found")
        return FileResponse(assets[name])

    def _admit(request: HttpRequest, pending: list[_PendingImage]) -> Ticket:
        client = _client(request)
        pixels = sum(p.pixels for p in pending)
        ticket = admission.admit(client, pixels, batcher.retry_after(admission.waiting))
        try:
            pixel_rate.take(client, pixels)
        except RequestRejected:
            ticket.release()
            raise
        return ticket

    allowed_hosts = [*LOOPBACK_NAMES, *cfg.allow_origins]
    if cfg.host not in ("0.0.0.0", "::", ""):
        allowed_hosts.append(cfg.host)  # a concrete bind address is a name clients use
    guard = HttpGuard(app, allowed_hosts, cfg.max_in_flight,
                      lambda status, message, code, headers: error(status, message, code=code, headers=headers),
                      api_key=cfg.api_key)
    guard.state = app.state  # tests and the bench reach the app's state through the guard too
    return guard


class _ClientGone(Exception):
    pass


async def _answer_or_disconnect(request: HttpRequest, job: _Job):
    """The job's answer, or `_ClientGone` (with the job cancelled) as soon as the client disconnects."""
    answer = asyncio.wrap_future(job.future)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if answer in done:
        return answer.result()
    # Queued: the batcher skips a cancelled future. Generating: the engine stops the row at its next step.
    job.future.cancel()
    request_obj = job.request
    if request_obj is not None and request_obj.cancel is not None:
        request_obj.cancel.set()
    answer.cancel()
    raise _ClientGone


async def _disconnected(request: HttpRequest) -> None:
    # The body has been read, so the next ASGI message is the disconnect (uvicorn sends it when the socket goes).
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _client(request) -> str:
    return request.client.host if request.client else "unknown"


async def _read_json(request, cfg: ServeConfig, run_in_threadpool, rate: ClientRate) -> dict:
    """The request body as a JSON object: bounded in size, time and the client's byte rate, parsed off the event
    loop, strictly."""
    limit = cfg.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestRejected("Content-Length is not a number")
        if int(declared) > limit:
            raise RequestRejected(f"request body of {declared} bytes is over the limit of {limit}", status=413,
                                  code="body_too_large")
    rate.take(_client(request), int(declared) if declared is not None else 0)  # refused before a byte is read
    chunks, size = [], 0
    try:
        async with asyncio.timeout(cfg.body_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestRejected(f"request body is over the limit of {limit} bytes", status=413,
                                          code="body_too_large")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestRejected(f"the request body did not arrive within {cfg.body_timeout_s:g} s", status=408,
                              code="body_timeout") from None
    if declared is None:
        rate.take(_client(request), size, debt=True)  # chunked: charged as read
    return await run_in_threadpool(parse_json_body, b"".join(chunks))


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def parse_json_body(raw: bytes) -> dict:
    """Strict JSON: no NaN/Infinity, integers of at most MAX_NUMBER_DIGITS digits, bounded nesting, and no
    unpaired UTF-16 surrogate (an escape like \\ud800 decodes to a string nothing downstream can encode)."""

    def bounded_int(text: str) -> int:
        if len(text.lstrip("-")) > MAX_NUMBER_DIGITS:
            raise RequestRejected(f"the body holds a {len(text.lstrip('-'))}-digit number; at most "
                                  f"{MAX_NUMBER_DIGITS} digits are accepted", code="invalid_json")
        return int(text)

    def no_constant(name: str):
        raise RequestRejected(f"the body holds {name}, which is not JSON", code="invalid_json")

    try:
        body = json.loads(raw, parse_int=bounded_int, parse_constant=no_constant)
    except RecursionError:
        raise RequestRejected("the body nests arrays or objects too deeply", code="invalid_json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestRejected(f"the body is not valid JSON ({getattr(err, 'msg', err)})",
                              code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestRejected("the body must be a JSON object", code="invalid_json")
    if _SURROGATE_ESCAPE.search(raw):  # cheap test first: emoji arrive as valid surrogate pairs, too
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise RequestRejected("the body holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff); send "
                                  "valid Unicode text", code="invalid_json") from None
    return body


def _completion_params(body: dict, cfg: ServeConfig) -> dict:
    """Validate the OpenAI fields we honour; unknown fields are ignored as OpenAI-compatible servers do."""
    from radscribe.serve.engine import MIN_TEMPERATURE, SEED_RANGE

    model = body.get("model")
    if model is not None and model != cfg.model_name:
        raise RequestRejected(f"model {model!r} is not served here; use {cfg.model_name!r} (see /v1/models)",
                              status=404, param="model", code="model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestRejected("`messages` must be a non-empty list", param="messages")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = min(cfg.default_max_tokens, cfg.max_tokens_limit) if max_tokens is None else max_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise RequestRejected("`max_tokens` must be a positive integer", param="max_tokens")
    if max_tokens > cfg.max_tokens_limit:
        raise RequestRejected(f"`max_tokens` {max_tokens} is over this server's limit of {cfg.max_tokens_limit}",
                              param="max_tokens")
    # Unset sampling fields stay None: the engine fills them from the model's generation_config.json.
    temperature = _number(body, "temperature", 0.0, 2.0)
    if temperature is not None and 0 < temperature < MIN_TEMPERATURE:
        raise RequestRejected(f"`temperature` must be 0 (greedy) or at least {MIN_TEMPERATURE}; {temperature} "
                              "overflows the logits", param="temperature")
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p == 0.0:
        raise RequestRejected("`top_p` must be greater than 0", param="top_p")
    top_k = body.get("top_k")  # vLLM's extension of the OpenAI fields, honoured by both backends
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < -1):
        raise RequestRejected("`top_k` must be a whole number: -1 or 0 (off), or the tokens to sample among",
                              param="top_k")
    top_k = 0 if top_k == -1 else top_k  # vLLM spells "off" -1
    repetition_penalty = _number(body, "repetition_penalty", 0.0, 2.0)
    if repetition_penalty == 0.0:
        raise RequestRejected("`repetition_penalty` must be greater than 0", param="repetition_penalty")
    if body.get("n", 1) != 1:
        raise RequestRejected("only `n` = 1 is supported", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestRejected("`stream` must be true or false", param="stream")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise RequestRejected("`seed` must be an integer", param="seed")
    if seed is not None and not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise RequestRejected(f"`seed` must be in [{SEED_RANGE[0]}, {SEED_RANGE[1] - 1}]", param="seed")
    return {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
            "repetition_penalty": repetition_penalty, "stream": stream, "seed": seed}


def _number(body: dict, name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise RequestRejected(f"`{name}` must be a number in [{low}, {high}]", param=name)
    return float(value)


def _checked_messages(messages: list, cfg: ServeConfig) -> tuple[list[dict], list[_PendingImage]]:
    """OpenAI messages -> the processor's chat format with images checked from their headers (not decoded)."""
    out, pending = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RequestRejected(f"{where} needs a role of system, user or assistant", param=where)
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list):
            raise RequestRejected(f"{where}.content must be a string or a list of parts", param=f"{where}.content")
        parts = []
        for j, part in enumerate(content):
            pwhere = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                if len(pending) >= cfg.max_images:
                    raise RequestRejected(f"more than {cfg.max_images} images in one request", param=pwhere)
                spec = part.get("image_url")
                url, window = (spec.get("url"), spec.get("window")) if isinstance(spec, dict) else (spec, None)
                pending.append(_pending_image(url, window, cfg.images, f"{pwhere}.image_url"))
                parts.append({"type": "image", "image": len(pending) - 1})  # index into `pending` until decoded
            else:
                raise RequestRejected(f"{pwhere} must be {{'type': 'text', 'text': ...}} or "
                                      "{'type': 'image_url', 'image_url': {'url': 'data:...'}}", param=pwhere)
        out.append({"role": m["role"], "content": parts})
    return out, pending


def _pending_image(url, window, policy: ImagePolicy, param: str) -> _PendingImage:
    if window is not None and not isinstance(window, str):
        raise RequestRejected(f"{param}.window must be a preset name", param=f"{param}.window")
    data = image_bytes(url, policy, param)
    header = check_pixels(data, policy, param)
    return _PendingImage(data, window, header.width, header.height, header.pixels, param)


def _check_prompt_tokens(engine, messages: list[dict], pending: list[_PendingImage], cfg: ServeConfig) -> int:
    """The prompt's tokens; a prompt over `max_prompt_tokens` is refused before any image is decoded (the count
    needs only image sizes)."""
    limit = cfg.max_prompt_tokens
    chars = sum(len(p["text"]) for m in messages for p in m["content"] if p["type"] == "text")
    if chars > limit * engine.max_token_chars:  # so many characters cannot fit in `limit` tokens: don't tokenize
        raise RequestRejected(f"the prompt's {chars} characters are more than {limit} tokens, this server's "
                              "limit (--max-prompt-tokens)", param="messages", code="context_length_exceeded")
    try:
        tokens = engine.prompt_tokens(messages, [(p.width, p.height) for p in pending])
    except RadscribeError as err:  # an image size the processor refuses (aspect ratio)
        raise RequestRejected(str(err), param="messages", code="invalid_image") from None
    if tokens > limit:
        raise RequestRejected(f"the prompt is {tokens} tokens (images included), over this server's limit of "
                              f"{limit} (--max-prompt-tokens); send fewer or smaller images or less text",
                              param="messages", code="context_length_exceeded")
    return tokens


def _decoded(engine, messages: list[dict], pending: list[_PendingImage]) -> list[dict]:
    """Replace each image index by its decoded image, sized as the model's processor will size it (after
    admission: decoding is what costs memory)."""
    return [{**m, "content": [{"type": "image", "image": processor_sized(engine, decode_image(pending[p["image"]]))}
                              if p["type"] == "image" else p for p in m["content"]]} for m in messages]


def processor_sized(engine, image):
    """`image` resized, here in the request's own thread, to the size the engine's image processor would resize it
    to under its pixel limits (radscribe.model.pixels.sized: the run's image policy): the pixels the processor sees
    are the same, but the seconds a 4096x4096 upload costs are spent in parallel rather than in the one worker
    thread every request waits for, and a queued request holds the small image, not the large one."""
    from radscribe.model.pixels import sized

    processor = getattr(engine, "processor", None)
    return image if processor is None else sized(processor, image)


def decode_image(image: _PendingImage):
    """A checked image -> PIL RGB through `radscribe.data.imaging.load_image` (DICOM windowed)."""
    from radscribe.data.imaging import DecodeLimitError, load_image

    try:
        return load_image(image.data, window=image.window)
    except DecodeLimitError as err:
        raise RequestRejected(f"{image.param}: {err}", status=413, param=image.param,
                              code="image_too_large") from None
    except RadscribeError as err:
        raise RequestRejected(f"{image.param}: {err}", param=image.param) from None


def _preview_png(engine, image: _PendingImage) -> tuple[bytes, tuple[int, int]]:
    """The image as the model sees it: decoded, then sized under the engine's image policy (PNG, its size)."""
    picture = processor_sized(engine, decode_image(image))
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue(), picture.size


def _engine_request(messages: list[dict], params: dict):
    from radscribe.serve.engine import Request

    return Request(messages=messages, max_new_tokens=params["max_tokens"], temperature=params["temperature"],
                   top_p=params["top_p"], top_k=params["top_k"], repetition_penalty=params["repetition_penalty"],
                   seed=params["seed"], cancel=threading.Event())


def _finish_reason(engine, text: str, max_tokens: int) -> str:
    # Streams yield text only, so the token count is re-derived from the text: exact for ordinary text, an
    # overcount when generation stopped inside a multi-byte character (then "length" may be reported early).
    # Non-streaming answers carry the exact reason from `Engine.complete`.
    tokenizer = getattr(getattr(engine, "processor", None), "tokenizer", None)
    if tokenizer is None:
        return "stop"
    return "length" if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= max_tokens else "stop"


async def _sse(batcher: Batcher, gen, ticket: Ticket, tokens: int, completion_id: str, created: int, model: str,
               params: dict):
    """OpenAI chunk stream: a role chunk, one chunk per text delta, a finish chunk, then `data: [DONE]`."""
    loop = asyncio.get_running_loop()
    deltas: asyncio.Queue = asyncio.Queue()
    job = batcher.submit_stream(gen, lambda d: loop.call_soon_threadsafe(deltas.put_nowait, d), ticket, tokens)
    del gen

    def chunk(delta: dict, finish: str | None = None) -> str:
        payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    text = []
    try:
        yield chunk({"role": "assistant", "content": ""})
        while (delta := await deltas.get()) is not None:
            if isinstance(delta, Exception):
                kind, status = ("invalid_request_error", 400) if isinstance(delta, RadscribeError) else \
                    ("server_error", 500)
                message = str(delta) if status == 400 else f"generation failed ({type(delta).__name__})"
                err = {"error": {"message": message, "type": kind, "param": None, "code": None}}
                yield f"data: {json.dumps(err)}\n\n"
                break
            text.append(delta)
            yield chunk({"content": delta})
        else:
            yield chunk({}, _finish_reason(batcher.engine, "".join(text), params["max_tokens"]))
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True  # client gone or done: stop feeding tokens into a dead connection
        ticket.release()


def uvicorn_config(app, cfg: ServeConfig, **kwargs):
    """The uvicorn settings every way of serving uses (the CLI, tests, the bench): our header deadline included."""
    import uvicorn

    return uvicorn.Config(app, http=header_timeout_protocol(cfg.header_timeout_s), log_level="warning",
                          lifespan="on", timeout_keep_alive=5, **kwargs)


def bind(host: str, port: int):
    """A listening socket on host:port, or a one-line RadscribeError when the port is taken (checked before the
    model loads: minutes of loading are not wasted on a port conflict)."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise RadscribeError(f"cannot listen on {host}:{port}: {err.strerror or err} (another server on that "
                             "port? choose one with --port)") from None
    sock.listen(2048)
    return sock


def serve(model: str, adapter: str | None = None, cfg: ServeConfig | None = None, dtype: str = "auto",
          quantization: str | None = None, device: str | None = None) -> None:
    """Check the port, load the engine and run uvicorn until interrupted."""
    import uvicorn

    from radscribe.serve.model_process import ModelProcess

    cfg = cfg or ServeConfig()
    check_config(cfg)
    sock = bind(cfg.host, cfg.port)
    if cfg.host not in LOOPBACK_NAMES and not cfg.api_key:
        print(f"radscribe serve: warning: binding {cfg.host} with no API key exposes the model to the network; "
              "set --api-key or RADSCRIBE_API_KEY")
    # The model generates in a process of its own, off the GIL that every request's checks need
    # (radscribe/serve/model_process.py).
    engine = ModelProcess(model, adapter=adapter, dtype=dtype, quantization=quantization, device=device,
                          batch_size=cfg.max_batch)
    try:
        app = create_app(engine, cfg)
        print(f"radscribe serve: http://{cfg.host}:{cfg.port}/  (API: /v1/chat/completions, model id "
              f"{cfg.model_name!r})", flush=True)
        uvicorn.Server(uvicorn_config(app, cfg)).run(sockets=[sock])
    finally:
        engine.close()


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0):
    """Run `app` under uvicorn in a background thread; yields its base URL (tests, the bench, the web test)."""
    import uvicorn

    sock = bind(host, port)
    server = uvicorn.Server(uvicorn_config(app, app.state.cfg))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RadscribeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def data_uri(data: bytes, media_type: str) -> str:
    """bytes -> `data:<type>;base64,...` (clients, tests and the bench build image_url values with it)."""
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"
