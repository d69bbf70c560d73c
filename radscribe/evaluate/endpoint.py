"""The eval's generations from any OpenAI-compatible chat-completions server (radscribe serve, llama-server, vLLM,
SGLang) instead of a model loaded here.

Run as: radscribe eval --endpoint http://127.0.0.1:8000/v1 --data DATASET --out DIR [--concurrency 4]
                       [--api-key-env RADSCRIBE_API_KEY] [--endpoint-model ID]

URL is the base URL an OpenAI client takes (`…/v1`): the model id comes from `URL/models` (or `--endpoint-model`),
each sample is one `POST URL/chat/completions`. Its images are loaded here by the one image loader (DICOM windowed,
ablations applied) exactly as the local eval loads them and sent as lossless PNG data URLs, so the server sees the
pixels the local eval's model sees, whatever its own image decoder. The generation settings (`temperature` 0 =
greedy, `top_p`, `top_k`, `repetition_penalty`, `seed`, `max_tokens`) are sent with every request and recorded in scores.json. `concurrency`
requests are in flight at once (a bounded pool); 429 and 503 answers are retried after the server's Retry-After
(exponential back-off when it gives none), up to `max_retries` times. Any other failure stops the eval with an
error naming the sample: nothing is skipped, and what was answered in order before it is kept for the rerun.
In predict_results.json a "step" is one request (runtime is the wall time of the whole generation).
Only the standard library is used (no client package needed to evaluate through a remote server).
"""

from __future__ import annotations

import base64
import email.utils
import io
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from radscribe.errors import RadscribeError

RETRIED = (429, 503)
"""Statuses that mean "busy, come back later" (our server's queue and in-flight caps, vLLM, llama-server)."""
MAX_BACKOFF_S = 30.0
"""Longest wait between retries when the server sends no Retry-After."""


class Endpoint:
    """A chat-completions client with the eval's settings: greedy or seeded sampling, bounded concurrency, retries."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, concurrency: int = 1,
                 timeout_s: float = 600.0, max_retries: int = 8, sleep: Callable[[float], None] = time.sleep):
        parsed = urllib.parse.urlsplit(url or "")
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise RadscribeError(f"--endpoint {url!r} is not an http(s) URL; give the server's OpenAI base URL, "
                                 "e.g. http://127.0.0.1:8000/v1")
        if concurrency < 1:
            raise RadscribeError(f"--concurrency must be at least 1, got {concurrency}")
        if max_retries < 0 or not timeout_s > 0:
            raise RadscribeError(f"max_retries must be >= 0 and request_timeout_s > 0, got {max_retries} and "
                                 f"{timeout_s}")
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.sleep = sleep
        self.model = model or self._only_model()

    @classmethod
    def from_config(cls, cfg) -> Endpoint:
        """From an EvalConfig: the API key is read from the environment variable `cfg.api_key_env` names."""
        import os

        key = None
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise RadscribeError(f"--api-key-env {cfg.api_key_env}: that environment variable is not set")
        return cls(cfg.endpoint, cfg.endpoint_model, key, cfg.concurrency, cfg.request_timeout_s, cfg.max_retries)

    # --- what the server serves ------------------------------------------------------------------------------
    def models(self) -> list[str]:
        """The model ids `URL/models` lists."""
        status, body, _ = self._http("GET", "/models", None)
        if status != 200:
            hint = " (is the URL the OpenAI base URL, usually ending in /v1?)" if status == 404 else ""
            raise RadscribeError(f"{self.url}/models answered {status}: {_message(body)}{hint}")
        try:
            return [str(m["id"]) for m in json.loads(body)["data"]]
        except (ValueError, KeyError, TypeError):
            raise RadscribeError(f"{self.url}/models did not answer an OpenAI model list: {body[:200]!r}") from None

    def _only_model(self) -> str:
        served = self.models()
        if len(served) != 1:
            raise RadscribeError(f"{self.url} serves {len(served)} models ({', '.join(served) or 'none'}); choose "
                                 "one with --endpoint-model ID")
        return served[0]

    # --- generation ------------------------------------------------------------------------------------------
    def chunks(self, request_for: Callable[[int], object], indices, id_of: Callable[[int], str]
               ) -> Iterator[tuple[list[int], list[str], float]]:
        """([index], [answer], seconds) for each index in order, generated `concurrency` at a time.

        `request_for(index)` builds the engine Request (images loaded) inside the worker, so at most `concurrency`
        samples' images are in memory. The first failure stops new requests and is raised naming its sample.
        """
        stop = threading.Event()

        def work(index: int) -> str:
            if stop.is_set():
                raise _Skipped
            try:
                return self.complete(request_for(index), id_of(index))
            except RadscribeError as err:
                stop.set()
                text = str(err)
                raise RadscribeError(text if text.startswith("sample ") else f"sample {id_of(index)}: {text}") \
                    from None
            except BaseException:
                stop.set()
                raise

        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="eval-endpoint")
        try:
            futures = [(index, pool.submit(work, index)) for index in indices]
            last = time.perf_counter()
            # The pool starts samples in order, so a failed sample is met here before any sample skipped after it.
            for index, future in futures:
                answer = future.result()
                now = time.perf_counter()
                yield [index], [answer], now - last
                last = now
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)

    def complete(self, request, sample_id: str) -> str:
        """One chat completion for an engine Request; retried on 429/503, else an error naming `sample_id`."""
        body = json.dumps(self.payload(request), ensure_ascii=False).encode("utf-8")
        for attempt in range(self.max_retries + 1):
            status, text, headers = self._http("POST", "/chat/completions", body, sample_id)
            if status == 200:
                return _answer(text, sample_id, self.url)
            if status not in RETRIED or attempt == self.max_retries:
                tried = f" after {attempt + 1} attempts" if status in RETRIED else ""
                raise RadscribeError(f"sample {sample_id}: {self.url}/chat/completions answered {status}{tried}: "
                                     f"{_message(text)}")
            self.sleep(retry_after(headers.get("Retry-After"), attempt))
        raise AssertionError("unreachable")

    def payload(self, request) -> dict:
        """The chat-completions body for an engine Request (images as PNG data URLs, text as text)."""
        body = {"model": self.model, "messages": [_message_json(m) for m in request.messages],
                "max_tokens": request.max_new_tokens, "temperature": request.temperature,
                # always sent: servers default to the model's own (Qwen2.5-VL ships 1.05), greedy or not
                "repetition_penalty": request.repetition_penalty, "stream": False}
        if request.temperature > 0:
            body["top_p"] = request.top_p
            body["top_k"] = request.top_k  # vLLM's / llama-server's / radscribe's field; 0 = off
            if request.seed is not None:
                body["seed"] = request.seed
        return body

    def _http(self, method: str, path: str, body: bytes | None, sample_id: str | None = None
              ) -> tuple[int, str, dict]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
        where = f"sample {sample_id}: " if sample_id else ""
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as response:
                return response.status, response.read().decode("utf-8", "replace"), dict(response.headers)
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode("utf-8", "replace"), dict(err.headers or {})
        except TimeoutError:
            raise RadscribeError(f"{where}{self.url}{path} gave no answer within {self.timeout_s:g} s "
                                 "(raise request_timeout_s=SECONDS)") from None
        except (urllib.error.URLError, ConnectionError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise RadscribeError(f"{where}cannot reach {self.url}{path}: {reason} (is the server up?)") from None


class _Skipped(Exception):
    """A sample not sent because an earlier one failed."""


def retry_after(header: str | None, attempt: int) -> float:
    """Seconds to wait before retry `attempt` + 1: the server's Retry-After (seconds or an HTTP date), else
    exponential back-off from 0.5 s, capped at MAX_BACKOFF_S."""
    if header:
        header = header.strip()
        try:
            return max(0.0, float(header))
        except ValueError:
            pass
        try:
            when = email.utils.parsedate_to_datetime(header)
            return max(0.0, when.timestamp() - time.time())
        except (TypeError, ValueError):
            pass
    return min(MAX_BACKOFF_S, 0.5 * 2 ** attempt)


def _message_json(message: dict) -> dict:
    content = message["content"]
    if isinstance(content, str):
        return {"role": message["role"], "content": content}
    parts = []
    for part in content:
        if part["type"] == "image":
            parts.append({"type": "image_url", "image_url": {"url": png_data_url(part["image"])}})
        else:
            parts.append({"type": "text", "text": part["text"]})
    return {"role": message["role"], "content": parts}


def png_data_url(image) -> str:
    """A loaded PIL image -> a lossless PNG data URL (the pixels the local eval's model would see)."""
    from radscribe.serve.engine import load_request_image

    buf = io.BytesIO()
    load_request_image(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _answer(text: str, sample_id: str, url: str) -> str:
    try:
        content = json.loads(text)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise RadscribeError(f"sample {sample_id}: {url}/chat/completions did not answer a chat completion: "
                             f"{text[:200]!r}") from None
    if not isinstance(content, str):
        raise RadscribeError(f"sample {sample_id}: {url}/chat/completions answered no text content "
                             f"({type(content).__name__})")
    return content


def _message(body: str) -> str:
    """The error message of an OpenAI-shaped error body, else the body's start."""
    try:
        error = json.loads(body).get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
    except (ValueError, AttributeError):
        pass
    return body[:200].strip() or "(empty body)"
