"""The OpenAI-compatible API and the web page: `/v1/models`, `/v1/chat/completions` (plain and SSE), `/health`, `/`.

Run as: radscribe serve --model BASE [--adapter RUN] [--host 127.0.0.1] [--port 8000] [--api-key KEY]

`create_app(engine, cfg)` builds the FastAPI app around one `radscribe.serve.engine.Engine`. Non-streaming
requests go through a `Batcher`: one worker thread takes the first waiting request, gathers whatever else
arrives within `batch_wait_ms` (up to `max_batch`), and calls `engine.generate` once for the group. Streaming
requests run on the same worker, one at a time, so the model is never driven by two threads at once.
Images are checked by radscribe/serve/safety.py and decoded by the one image loader,
`radscribe.data.imaging.load_image` (DICOM is windowed server-side). Every refusal is an OpenAI-shaped
JSON error with a 4xx status; the server keeps serving after it.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import io
import json
import queue
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import Request as HttpRequest  # module level: FastAPI resolves route annotations by name

from radscribe.errors import RadscribeError
from radscribe.serve.safety import ImagePolicy, RequestRejected, check_pixels, image_bytes
from radscribe.serve.vllm import VllmOptions

WEB_DIR = Path(__file__).parent / "web"


@dataclass
class ServeConfig:
    """What `radscribe serve` loads, how it listens, what it accepts and how it batches."""

    model: str = ""
    """Base model folder, or a `radscribe export` folder (the vllm backend needs one)."""
    adapter: str | None = None
    """A `radscribe train` run folder or a PEFT adapter folder (hf backend only)."""
    backend: Literal["hf", "vllm"] = "hf"
    """hf: transformers + our batching (CPU or GPU); vllm: vLLM's server on a merged export (GPU)."""
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
    max_body_bytes: int = 16 * 1024 * 1024
    """Largest request body; a bigger one gets 413 before it is parsed."""
    max_tokens_limit: int = 1024
    """Largest `max_tokens` a request may ask for."""
    default_max_tokens: int = 512
    """`max_tokens` when a request does not say."""
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


class Batcher:
    """One worker thread between the API and the engine: groups plain requests, runs streams one at a time."""

    def __init__(self, engine, max_batch: int = 8, wait_ms: float = 5.0):
        self.engine = engine
        self.max_batch = max(1, max_batch)
        self.wait_s = max(0.0, wait_ms) / 1000
        self.generate_calls = 0  # with `batched_requests`, reported by /health (the bench reads the mean batch)
        self.batched_requests = 0
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="radscribe-batcher", daemon=True)
        self._worker.start()

    def submit(self, request) -> concurrent.futures.Future:
        """Queue a non-streaming request; the future resolves to the generated text."""
        job = _Job(request, concurrent.futures.Future())
        self._queue.put(job)
        return job.future

    def submit_stream(self, request, push) -> "_StreamJob":
        """Queue a streaming request; `push(delta)` is called per text piece, then `push(None)` (or an exception)."""
        job = _StreamJob(request, push)
        self._queue.put(job)
        return job

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=5)

    def _run(self) -> None:
        held = None
        while True:
            job = held if held is not None else self._queue.get()
            held = None
            if job is None:
                return
            if isinstance(job, _StreamJob):
                self._run_stream(job)
                continue
            group = [job]
            deadline = time.monotonic() + self.wait_s
            while len(group) < self.max_batch:
                try:
                    # Requests that queued while the last group ran are taken at once; then wait out the window.
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if not isinstance(nxt, _Job):
                    held = nxt
                    break
                group.append(nxt)
            self._run_group(group)

    def _run_group(self, group: list["_Job"], retry: bool = False) -> None:
        if not retry:
            group = [j for j in group if j.future.set_running_or_notify_cancel()]
        if not group:
            return
        self.generate_calls += 1
        self.batched_requests += len(group)
        try:
            answers = self.engine.complete([j.request for j in group])
        except Exception as err:
            if len(group) == 1:
                group[0].future.set_exception(err)
                return
            # One bad request must not fail its neighbours: retry each alone, so only the culprit gets the error.
            for j in group:
                self._run_group([j], retry=True)
            return
        for j, answer in zip(group, answers):
            j.future.set_result(answer)

    def _run_stream(self, job: "_StreamJob") -> None:
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


@dataclass
class _Job:
    request: Any
    future: concurrent.futures.Future


@dataclass
class _StreamJob:
    request: Any
    push: Any
    cancelled: bool = False


def create_app(engine, cfg: ServeConfig | None = None):
    """The FastAPI app serving `engine` (anything with `complete(list[Request])` and `stream(Request)`)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    cfg = cfg or ServeConfig()
    batcher = Batcher(engine, cfg.max_batch, cfg.batch_wait_ms)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        batcher.close()

    app = FastAPI(title="radscribe", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.batcher = batcher
    app.state.cfg = cfg

    def error(status: int, message: str, param: str | None = None, code: str | None = None,
              kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                            status_code=status)

    @app.exception_handler(RequestRejected)
    async def _rejected(_req, err: RequestRejected):
        return error(err.status, str(err), err.param, err.code)

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

    @app.middleware("http")
    async def _auth(request: HttpRequest, call_next):
        # The web page and /health are open; the model endpoints need the key when one is set.
        if cfg.api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {cfg.api_key}".encode()):
                return error(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                             code="invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health():
        calls = batcher.generate_calls
        return {"status": "ok", "model": cfg.model_name, "queued": batcher._queue.qsize(), "generate_calls": calls,
                "mean_batch": round(batcher.batched_requests / calls, 3) if calls else None}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "radscribe"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        body = await _read_json(request, cfg.max_body_bytes)
        params = _completion_params(body, cfg)
        messages = await run_in_threadpool(_chat_messages, body["messages"], cfg)
        gen = _engine_request(messages, params)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if params["stream"]:
            return StreamingResponse(_sse(batcher, gen, completion_id, created, cfg.model_name, params),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            answer = await asyncio.wrap_future(batcher.submit(gen))
        except Exception as err:  # the engine failed (e.g. out of memory): answer, log one line, keep serving
            print(f"radscribe serve: generation failed: {type(err).__name__}: {err}", flush=True)
            return error(500, f"generation failed ({type(err).__name__}); the server is still up",
                         kind="server_error")
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
        body = await _read_json(request, cfg.max_body_bytes)
        url, window = body.get("image_url"), body.get("window")
        if isinstance(url, dict):
            url, window = url.get("url"), url.get("window", window)
        png = await run_in_threadpool(_preview_png, url, window, cfg)
        return Response(png, media_type="image/png")

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

    return app


async def _read_json(request, limit: int) -> dict:
    """The request body as a JSON object, refusing oversized bodies before reading them whole."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestRejected("Content-Length is not a number")
        if int(declared) > limit:
            raise RequestRejected(f"request body of {declared} bytes is over the limit of {limit}", status=413,
                                  code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestRejected(f"request body is over the limit of {limit} bytes", status=413,
                                  code="body_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestRejected(f"the body is not valid JSON ({getattr(err, 'msg', err)})",
                              code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestRejected("the body must be a JSON object", code="invalid_json")
    return body


def _completion_params(body: dict, cfg: ServeConfig) -> dict:
    """Validate the OpenAI fields we honour; unknown fields are ignored as OpenAI-compatible servers do."""
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
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise RequestRejected("`top_p` must be greater than 0", param="top_p")
    if body.get("n", 1) != 1:
        raise RequestRejected("only `n` = 1 is supported", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestRejected("`stream` must be true or false", param="stream")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise RequestRejected("`seed` must be an integer", param="seed")
    return {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "stream": stream, "seed": seed}


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise RequestRejected(f"`{name}` must be a number in [{low}, {high}]", param=name)
    return float(value)


def _chat_messages(messages: list, cfg: ServeConfig) -> list[dict]:
    """OpenAI messages -> the processor's chat format, images decoded by the one image loader."""
    out, n_images = [], 0
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
                n_images += 1
                if n_images > cfg.max_images:
                    raise RequestRejected(f"more than {cfg.max_images} images in one request", param=pwhere)
                spec = part.get("image_url")
                url, window = (spec.get("url"), spec.get("window")) if isinstance(spec, dict) else (spec, None)
                parts.append({"type": "image", "image": decode_image(url, window, cfg.images, f"{pwhere}.image_url")})
            else:
                raise RequestRejected(f"{pwhere} must be {{'type': 'text', 'text': ...}} or "
                                      "{'type': 'image_url', 'image_url': {'url': 'data:...'}}", param=pwhere)
        out.append({"role": m["role"], "content": parts})
    return out


def decode_image(url, window: str | None, policy: ImagePolicy, param: str = "image_url"):
    """A checked image_url -> PIL RGB through `radscribe.data.imaging.load_image` (DICOM windowed)."""
    from radscribe.data.imaging import load_image

    if window is not None and not isinstance(window, str):
        raise RequestRejected(f"{param}.window must be a preset name", param=f"{param}.window")
    data = image_bytes(url, policy, param)
    check_pixels(data, policy, param)
    try:
        return load_image(data, window=window)
    except RadscribeError as err:
        raise RequestRejected(f"{param}: {err}", param=param) from None


def _preview_png(url, window, cfg: ServeConfig) -> bytes:
    image = decode_image(url, window, cfg.images, "image_url")
    image.thumbnail((768, 768))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _engine_request(messages: list[dict], params: dict):
    from radscribe.serve.engine import Request

    return Request(messages=messages, max_new_tokens=params["max_tokens"], temperature=params["temperature"],
                   top_p=params["top_p"], seed=params["seed"])


def _finish_reason(engine, text: str, max_tokens: int) -> str:
    # Streams yield text only, so the token count is re-derived from the text: exact for ordinary text, an
    # overcount when generation stopped inside a multi-byte character (then "length" may be reported early).
    # Non-streaming answers carry the exact reason from `Engine.complete`.
    tokenizer = getattr(getattr(engine, "processor", None), "tokenizer", None)
    if tokenizer is None:
        return "stop"
    return "length" if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= max_tokens else "stop"


async def _sse(batcher: Batcher, gen, completion_id: str, created: int, model: str, params: dict):
    """OpenAI chunk stream: a role chunk, one chunk per text delta, a finish chunk, then `data: [DONE]`."""
    loop = asyncio.get_running_loop()
    deltas: asyncio.Queue = asyncio.Queue()
    job = batcher.submit_stream(gen, lambda d: loop.call_soon_threadsafe(deltas.put_nowait, d))

    def chunk(delta: dict, finish: str | None = None) -> str:
        payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    text = []
    try:
        yield chunk({"role": "assistant", "content": ""})
        while (delta := await deltas.get()) is not None:
            if isinstance(delta, Exception):
                err = {"error": {"message": f"generation failed ({type(delta).__name__})", "type": "server_error",
                                 "param": None, "code": None}}
                yield f"data: {json.dumps(err)}\n\n"
                break
            text.append(delta)
            yield chunk({"content": delta})
        else:
            yield chunk({}, _finish_reason(batcher.engine, "".join(text), params["max_tokens"]))
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True  # client gone or done: stop feeding tokens into a dead connection


def serve(model: str, adapter: str | None = None, cfg: ServeConfig | None = None, dtype: str = "auto",
          quantization: str | None = None, device: str | None = None) -> None:
    """Load the engine and run uvicorn until interrupted."""
    import uvicorn

    from radscribe.serve.engine import Engine

    cfg = cfg or ServeConfig()
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        print(f"radscribe serve: warning: binding {cfg.host} with no API key exposes the model to the network; "
              "set --api-key or RADSCRIBE_API_KEY")
    engine = Engine.from_pretrained(model, adapter=adapter, dtype=dtype, quantization=quantization, device=device,
                                    batch_size=cfg.max_batch)
    app = create_app(engine, cfg)
    print(f"radscribe serve: http://{cfg.host}:{cfg.port}/  (API: /v1/chat/completions, model id {cfg.model_name!r})")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0):
    """Run `app` under uvicorn in a background thread; yields its base URL (tests, the bench, the web test)."""
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
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
