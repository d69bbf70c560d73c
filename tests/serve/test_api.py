"""The OpenAI-compatible API over real HTTP (uvicorn on 127.0.0.1 in a thread).

A scripted engine stands in for the model where the point is the HTTP layer (refusals, batching, SSE format);
the official `openai` client runs against the tiny Qwen3-VL model through the real engine.
"""

import io
import json
import threading
import time

import httpx
import pytest
from PIL import Image

from scripted import ScriptedEngine, allowed_folder, ct_small, healthy, png, user

from radscribe.data.imaging import load_image
from radscribe.serve.api import ServeConfig, create_app, data_uri, serve_in_thread
from radscribe.serve.safety import ImagePolicy


@pytest.fixture(scope="module")
def scripted():
    engine = ScriptedEngine()
    cfg = ServeConfig(model_name="tiny", max_body_bytes=2 * 1024 * 1024, max_tokens_limit=64,
                      images=ImagePolicy(max_image_bytes=1024 * 1024))
    with serve_in_thread(create_app(engine, cfg)) as url:
        yield engine, url


def test_models_health_and_a_plain_completion(scripted):
    engine, url = scripted
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "tiny"
    body = {"model": "tiny", "max_tokens": 16,
            "messages": [user("图片中的诊断结果是怎样?", data_uri(png((32, 24)), "image/png"))]}
    reply = httpx.post(f"{url}/v1/chat/completions", json=body).json()
    assert reply["object"] == "chat.completion" and reply["id"].startswith("chatcmpl-")
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": "report 32x24 for 图片中的诊断结果是怎样?"}
    r = engine.requests[-1]  # sampling fields not sent stay unset: the engine fills in the model's defaults
    assert r.max_new_tokens == 16 and (r.temperature, r.top_p, r.top_k, r.repetition_penalty) == (None,) * 4
    body.update(temperature=0.7, top_p=0.9, top_k=5, repetition_penalty=1.1, seed=11)
    httpx.post(f"{url}/v1/chat/completions", json=body).raise_for_status()
    r = engine.requests[-1]
    assert (r.temperature, r.top_p, r.top_k, r.repetition_penalty, r.seed) == (0.7, 0.9, 5, 1.1, 11)
    body.update(top_k=-1)  # vLLM's spelling of "off"
    httpx.post(f"{url}/v1/chat/completions", json=body).raise_for_status()
    assert engine.requests[-1].top_k == 0


@pytest.mark.parametrize("media, make", [("image/jpeg", "JPEG"), ("image/webp", "WEBP")])
def test_jpeg_and_webp_data_uris(scripted, media, make):
    _, url = scripted
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (0, 90, 0)).save(buf, format=make)
    reply = httpx.post(f"{url}/v1/chat/completions",
                       json={"messages": [user("q", data_uri(buf.getvalue(), media))]}).json()
    assert reply["choices"][0]["message"]["content"] == "report 40x30 for q"


def test_dicom_is_windowed_server_side_by_the_one_loader(scripted):
    engine, url = scripted
    dicom = ct_small()
    for window in ("lung", "bone"):
        reply = httpx.post(f"{url}/v1/chat/completions",
                           json={"messages": [user("q", data_uri(dicom, "application/dicom"), window=window)]})
        assert reply.json()["choices"][0]["message"]["content"] == "report 128x128 for q"
        assert engine.images[-1].tobytes() == load_image(dicom, window=window).tobytes()
    preview = httpx.post(f"{url}/v1/preview", json={"image_url": data_uri(dicom, "application/dicom"),
                                                    "window": "lung"})
    assert preview.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(preview.content)).convert("RGB").tobytes() == load_image(dicom, "lung").tobytes()


def test_sse_stream_is_openai_chunks_then_done(scripted):
    _, url = scripted
    body = {"model": "tiny", "stream": True, "messages": [user("stream me")]}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["choices"][0]["delta"] == {}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "report no-image for stream me "
    assert len(chunks) == 2 + 5  # role chunk, one per word, finish chunk


def test_follow_up_turns_keep_the_image_in_the_history(scripted):
    engine, url = scripted
    messages = [user("first", data_uri(png((20, 10)), "image/png")),
                {"role": "assistant", "content": "report 20x10 for first"},
                {"role": "user", "content": "and the left side?"}]
    reply = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages}).json()
    assert reply["choices"][0]["message"]["content"] == "report 20x10 for and the left side?"
    assert [m["role"] for m in engine.requests[-1].messages] == ["user", "assistant", "user"]


def _huge_png() -> bytes:
    # 5000 x 5000 = 25 M pixels (over the 16.7 M default), a few KB on the wire: a decompression bomb in miniature.
    return png((5000, 5000), mode="1")


BAD_REQUESTS = [
    # (name, raw body or json, expected status, expected error code or param fragment)
    ("malformed JSON", b'{"messages": [', 400, "invalid_json"),
    ("JSON that is not an object", b"[1, 2]", 400, "invalid_json"),
    ("not UTF-8", b"\xff\xfe{", 400, "invalid_json"),
    ("no messages", {"model": "tiny"}, 400, "messages"),
    ("unknown model", {"model": "gpt-4o", "messages": [user("q")]}, 404, "model_not_found"),
    ("max_tokens over the limit", {"messages": [user("q")], "max_tokens": 100000}, 400, "max_tokens"),
    ("negative temperature", {"messages": [user("q")], "temperature": -1}, 400, "temperature"),
    ("top_k below -1", {"messages": [user("q")], "top_k": -2}, 400, "top_k"),
    ("top_k not whole", {"messages": [user("q")], "top_k": 2.5}, 400, "top_k"),
    ("repetition_penalty 0", {"messages": [user("q")], "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("n > 1", {"messages": [user("q")], "n": 3}, 400, "n"),
    ("seed not an integer", {"messages": [user("q")], "seed": "x"}, 400, "seed"),
    ("bad role", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0]"),
    ("bad part", {"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "messages[0].content[0]"),
    ("file:// URL", {"messages": [user("q", "file:///etc/passwd")]}, 403, "local_files_disabled"),
    ("path traversal", {"messages": [user("q", "../../../../etc/passwd")]}, 403, "local_files_disabled"),
    ("encoded traversal", {"messages": [user("q", "%2e%2e/%2e%2e/etc/passwd")]}, 403, "local_files_disabled"),
    ("loopback http URL", {"messages": [user("q", "http://127.0.0.1:22/x.png")]}, 403, "fetch_disabled"),
    ("metadata http URL", {"messages": [user("q", "http://169.254.169.254/latest")]}, 403, "fetch_disabled"),
    ("svg data URI", {"messages": [user("q", "data:image/svg+xml;base64,PHN2Zz4=")]}, 415, "unsupported_media_type"),
    ("bytes that are no image", {"messages": [user("q", data_uri(b"MZ" + b"\0" * 300, "image/png"))]}, 415,
     "unsupported_media_type"),
    ("truncated PNG", {"messages": [user("q", data_uri(png()[:40], "image/png"))]}, 400, "image_url"),
    ("unknown window", {"messages": [user("q", data_uri(ct_small(), "application/dicom"), window="foo")]}, 400,
     "image_url"),
    ("too many images", {"messages": [user("q", *[data_uri(png(), "image/png")] * 5)]}, 400, "more than 4"),
]


@pytest.mark.parametrize("name, body, status, marker", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors_and_the_server_stays_up(scripted, name, body, status, marker):
    _, url = scripted
    if isinstance(body, bytes):
        reply = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    else:
        reply = httpx.post(f"{url}/v1/chat/completions", json=body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert marker in json.dumps(error)
    healthy(url)


def test_huge_images_and_bodies_are_413(scripted):
    _, url = scripted
    huge = _huge_png()
    assert len(huge) < 100_000
    reply = httpx.post(f"{url}/v1/chat/completions", json={"messages": [user("q", data_uri(huge, "image/png"))]})
    assert reply.status_code == 413 and "5000x5000" in reply.json()["error"]["message"]
    healthy(url)
    # A body over max_body_bytes (2 MiB here) is refused from its Content-Length, before it is parsed...
    reply = httpx.post(f"{url}/v1/chat/completions", content=b" " * (3 * 1024 * 1024),
                       headers={"content-type": "application/json"})
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "body_too_large"
    healthy(url)

    # ...and a chunked body with no Content-Length is cut off once it passes the limit.
    def chunks():
        for _ in range(40):
            yield b" " * 100_000

    reply = httpx.post(f"{url}/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert reply.status_code == 413
    healthy(url)
    # An image over max_image_bytes (1 MiB) inside a body under the body limit.
    big = png() + b"\0" * (1024 * 1024 + 10)
    reply = httpx.post(f"{url}/v1/chat/completions", json={"messages": [user("q", data_uri(big, "image/png"))]})
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "image_too_large"
    healthy(url)


def test_unknown_paths_and_methods_are_json_errors(scripted):
    _, url = scripted
    assert httpx.get(f"{url}/v1/nothing").json()["error"]["code"] == "not_found"
    assert httpx.get(f"{url}/v1/chat/completions").status_code == 405
    assert httpx.get(f"{url}/web/../../etc/passwd").status_code == 404
    healthy(url)


def test_allow_listed_hosts_still_refuse_private_and_loopback_addresses(tmp_path):
    allowed = allowed_folder(tmp_path)
    cfg = ServeConfig(images=ImagePolicy(allow_hosts=["127.0.0.1", "localhost", "10.0.0.1"], allow_folder=allowed))
    with serve_in_thread(create_app(ScriptedEngine(), cfg)) as url:
        for target in ("http://127.0.0.1:1/x.png", "http://localhost/x.png", "https://10.0.0.1/x.png",
                       f"{url}/web/app.js"):
            reply = httpx.post(f"{url}/v1/chat/completions", json={"messages": [user("q", target)]})
            assert reply.status_code == 403 and "non-public address" in reply.json()["error"]["message"], target
        reply = httpx.post(f"{url}/v1/chat/completions", json={"messages": [user("q", "ok.png")]})
        assert reply.json()["choices"][0]["message"]["content"] == "report 12x8 for q"
        for target in ("../secret.png", f"file://{tmp_path}/secret.png", f"file://{allowed}/../secret.png"):
            reply = httpx.post(f"{url}/v1/chat/completions", json={"messages": [user("q", target)]})
            assert reply.status_code == 403 and reply.json()["error"]["code"] == "path_not_allowed", target
        assert httpx.get(f"{url}/health").status_code == 200


def test_api_key_is_required_when_set():
    cfg = ServeConfig(api_key="s3cret")
    with serve_in_thread(create_app(ScriptedEngine(), cfg)) as url:
        body = {"messages": [user("q")]}
        assert httpx.post(f"{url}/v1/chat/completions", json=body).status_code == 401
        wrong = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        right = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert right.status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200 and httpx.get(f"{url}/").status_code == 200


def _fire(url, n):
    answers = [None] * n

    def client(i):
        body = {"messages": [user(f"request {i}")], "max_tokens": 8}
        answers[i] = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).json()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def test_concurrent_requests_are_batched_and_answers_stay_matched():
    engine = ScriptedEngine(delay_s=1.0)  # long enough for all eight to arrive on a loaded machine
    with serve_in_thread(create_app(engine, ServeConfig(max_batch=8, batch_wait_ms=20))) as url:
        answers = _fire(url, 8)
    assert [a["choices"][0]["message"]["content"] for a in answers] == [f"report no-image for request {i}"
                                                                        for i in range(8)]
    assert sum(engine.batches) == 8
    # While the first group generates (1 s) the rest queue up, so at most two generate calls serve eight.
    assert len(engine.batches) <= 2 and max(engine.batches) >= 4


class RowByRowEngine(ScriptedEngine):
    """Answers the request asking for fewest tokens at once, the others only when released (a batch whose other
    rows have longer budgets)."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def complete(self, requests):
        answers = super().complete(requests)
        first = min(range(len(requests)), key=lambda i: requests[i].max_new_tokens)
        requests[first].answered(answers[first])
        self.release.wait(20)
        return answers


def test_an_answer_goes_out_when_its_row_stops_not_when_its_batch_does():
    engine = RowByRowEngine()
    replies = {}

    def client(tokens):
        body = {"messages": [user(f"request {tokens}")], "max_tokens": tokens}
        replies[tokens] = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).json()

    with serve_in_thread(create_app(engine, ServeConfig(max_batch=8, batch_wait_ms=300))) as url:
        threads = [threading.Thread(target=client, args=(n,)) for n in (4, 400)]
        for t in threads:
            t.start()
        threads[0].join(10)
        assert engine.batches == [2]  # one group, still generating ...
        assert replies[4]["choices"][0]["message"]["content"] == "report no-image for request 4"  # ... answered
        assert 400 not in replies
        engine.release.set()
        threads[1].join(10)
    assert replies[400]["choices"][0]["message"]["content"] == "report no-image for request 400"


def test_batching_off_serves_one_request_per_generate_call():
    engine = ScriptedEngine(delay_s=0.01)
    with serve_in_thread(create_app(engine, ServeConfig(max_batch=1))) as url:
        answers = _fire(url, 4)
    assert all(a["choices"][0]["message"]["content"].startswith("report") for a in answers)
    assert engine.batches == [1, 1, 1, 1]


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    from radscribe.model.tiny import build_tiny_model
    from radscribe.serve.engine import Engine

    model_dir = build_tiny_model("qwen3_vl", tmp_path_factory.mktemp("tiny") / "model", seed=0)
    return Engine.from_pretrained(model_dir, device="cpu")


def test_openai_client_works_unchanged_against_the_tiny_model(tiny_engine):
    import openai

    cfg = ServeConfig(model_name="radscribe-tiny", api_key="k-123")
    with serve_in_thread(create_app(tiny_engine, cfg)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k-123", max_retries=0)
        assert [m.id for m in client.models.list()] == ["radscribe-tiny"]
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri(png((64, 64)), "image/png")}},
            {"type": "text", "text": "图片中的诊断结果是怎样?"}]}]
        completion = client.chat.completions.create(model="radscribe-tiny", messages=messages, max_tokens=12)
        text = completion.choices[0].message.content
        assert text and 1 <= completion.usage.completion_tokens <= 12 and completion.usage.prompt_tokens > 16
        assert completion.choices[0].finish_reason == ("length" if completion.usage.completion_tokens == 12
                                                       else "stop")
        stream = client.chat.completions.create(model="radscribe-tiny", messages=messages, max_tokens=12,
                                                stream=True)
        pieces = [c.choices[0].delta.content or "" for c in stream]
        assert "".join(pieces) == text  # greedy: the stream spells out the same answer
        assert len([p for p in pieces if p]) >= 2  # and it arrived in pieces
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            client.chat.completions.create(model="radscribe-tiny", messages=messages, max_tokens=10**6)


class FailingEngine(ScriptedEngine):
    """Generation blows up for prompts saying "boom"; streams of "forever" never end on their own."""

    def generate(self, requests):
        if any("boom" in self._answer(r) for r in requests):
            raise RuntimeError("CUDA out of memory (simulated)")
        return super().generate(requests)

    def stream(self, request):
        text = self._answer(request)
        if "boom" in text:
            yield "partial "
            raise RuntimeError("simulated failure mid-stream")
        if "forever" in text:
            self.stream_closed = False
            try:
                while True:
                    time.sleep(0.01)
                    yield "more "
            finally:
                self.stream_closed = True
        yield from super().stream(request)


def test_engine_failures_and_abandoned_streams_do_not_take_the_server_down():
    engine = FailingEngine()
    with serve_in_thread(create_app(engine, ServeConfig())) as url:
        reply = httpx.post(f"{url}/v1/chat/completions", json={"messages": [user("boom")]})
        assert reply.status_code == 500 and reply.json()["error"]["type"] == "server_error"
        healthy_text = httpx.post(f"{url}/v1/chat/completions", json={"messages": [user("fine")]}).json()
        assert healthy_text["choices"][0]["message"]["content"] == "report no-image for fine"

        with httpx.stream("POST", f"{url}/v1/chat/completions",
                          json={"stream": True, "messages": [user("boom")]}) as resp:
            events = [line for line in resp.iter_lines() if line.startswith("data: ")]
        assert '"server_error"' in events[-2] and events[-1] == "data: [DONE]"

        # A client that walks away from an endless stream frees the worker for everyone else.
        with httpx.stream("POST", f"{url}/v1/chat/completions",
                          json={"stream": True, "messages": [user("forever")]}) as resp:
            # leave once the endless generator is running (its first chunk arrived), not before it started
            assert any("more " in line for line in resp.iter_lines() if line.startswith("data: "))
        after = httpx.post(f"{url}/v1/chat/completions", json={"messages": [user("next")]}, timeout=20)
        assert after.json()["choices"][0]["message"]["content"] == "report no-image for next"
        deadline = time.monotonic() + 10  # the server notices the closed connection at its next chunk
        while not engine.stream_closed and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.stream_closed


def test_a_failing_request_does_not_fail_its_batch_neighbours():
    engine = FailingEngine(delay_s=0.1)
    with serve_in_thread(create_app(engine, ServeConfig(max_batch=8, batch_wait_ms=50))) as url:
        replies = [None] * 6

        def client(i):
            text = "boom" if i == 3 else f"fine {i}"
            replies[i] = httpx.post(f"{url}/v1/chat/completions", json={"messages": [user(text)]}, timeout=30)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r.status_code for r in replies] == [200, 200, 200, 500, 200, 200]
        assert replies[5].json()["choices"][0]["message"]["content"] == "report no-image for fine 5"
        health = httpx.get(f"{url}/health").json()
        assert health["generate_calls"] >= 1 and health["mean_batch"] >= 1


class SlicedEngine(ScriptedEngine):
    """Generates long prompts in three slices (the first waits for `go`), logging every slice and whole call."""

    def __init__(self):
        super().__init__()
        self.log: list[str] = []
        self.in_first_slice = threading.Event()
        self.go = threading.Event()

    def complete_steps(self, requests):
        name = requests[0].messages[0]["content"][0]["text"]
        for index in range(3):
            self.log.append(f"{name} slice {index}")
            if index == 0 and not self.in_first_slice.is_set():
                self.in_first_slice.set()
                self.go.wait(10)
            yield
        self.log.append(f"{name} generated")
        return ScriptedEngine.complete(self, requests)

    def complete(self, requests):
        self.log.append("whole " + ",".join(r.messages[0]["content"][0]["text"] for r in requests))
        return super().complete(requests)


def test_short_requests_run_between_the_slices_of_a_long_one():
    from radscribe.serve.api import SLICED_TOKENS, Batcher
    from radscribe.serve.engine import Request

    def ask(text):
        return Request(messages=[{"role": "user", "content": [{"type": "text", "text": text}]}], max_new_tokens=4)

    engine = SlicedEngine()
    batcher = Batcher(engine, max_batch=8, wait_ms=1)
    try:
        long_a = batcher.submit(ask("A"), tokens=SLICED_TOKENS)
        assert engine.in_first_slice.wait(10)
        long_b = batcher.submit(ask("B"), tokens=4 * SLICED_TOKENS)  # long too: waits for A, never between
        short = batcher.submit(ask("c"), tokens=SLICED_TOKENS - 1)
        engine.go.set()
        answers = [job.future.result(10).text for job in (long_a, long_b, short)]
    finally:
        batcher.close()
    assert engine.log == ["A slice 0", "whole c", "A slice 1", "A slice 2", "A generated",
                          "B slice 0", "B slice 1", "B slice 2", "B generated"]
    assert answers == ["report no-image for A", "report no-image for B", "report no-image for c"]
