"""`radscribe eval --endpoint`: the same eval through an OpenAI-compatible server.

The acceptance test serves the tiny real-layout Qwen3-VL (published processor, so 64x64 images are upscaled)
with `radscribe serve`'s app and checks that the endpoint eval writes what the local greedy eval writes. The
client's own rules (retries, errors naming the sample, the concurrency bound, what it sends) run against a stub
server that records every request.
"""

import base64
import io
import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from radscribe.cli import main
from radscribe.data.dataset import read_split
from radscribe.errors import RadscribeError
from radscribe.evaluate.endpoint import Endpoint, retry_after
from radscribe.evaluate.predict import EvalConfig, evaluate

FILES = ("generated_predictions.jsonl", "per_sample.jsonl", "ablation.json")
TIMING = ("predict_runtime", "predict_samples_per_second", "predict_steps_per_second")


def _results(folder):
    scores = json.loads((folder / "scores.json").read_text())
    files = {name: (folder / name).read_text() for name in FILES if (folder / name).exists()}
    untimed = {k: v for k, v in scores["predict_results"].items() if k not in TIMING}
    return scores, files, untimed


def test_endpoint_eval_through_radscribe_serve_reproduces_the_local_greedy_eval(real_model_dir, small_dataset,
                                                                                 tmp_path, monkeypatch):
    from radscribe.serve.api import ServeConfig, create_app, serve_in_thread
    from radscribe.serve.engine import Engine

    model = real_model_dir("qwen3_vl")
    common = ["--data", str(small_dataset), "--limit", "6", "--max-new-tokens", "10", "--n-boot", "200",
              "--ablate", "blank"]
    assert main(["eval", "--model", str(model), "--batch-size", "4", "--out", str(tmp_path / "local"), *common]) == 0

    cfg = ServeConfig(model_name="served-tiny", api_key="k-eval", max_batch=8)
    server_engine = Engine.from_pretrained(model, device="cpu", batch_size=cfg.max_batch)  # loaded on its own
    answered = []
    complete = server_engine.complete
    server_engine.complete = lambda requests, *a, **k: (answered.extend(requests), complete(requests, *a, **k))[1]
    monkeypatch.setenv("EVAL_TEST_KEY", "k-eval")
    with serve_in_thread(create_app(server_engine, cfg)) as url:
        assert main(["eval", "--endpoint", f"{url}/v1", "--concurrency", "3", "--api-key-env", "EVAL_TEST_KEY",
                     "--out", str(tmp_path / "served"), *common]) == 0
    assert len(answered) == 12  # 6 samples, real then blank images, one request each, all through the server
    for split in ("val", "val-blank"):
        local, served = _results(tmp_path / "local" / split), _results(tmp_path / "served" / split)
        assert served[1] == local[1]  # predictions, per-sample scores (and the ablation drop): byte for byte
        assert served[2] == local[2]  # LLaMA-Factory's means
        assert served[0]["metrics"] == local[0]["metrics"]  # every score and its CI
        assert served[0]["settings"]["endpoint"] == f"{url}/v1"
        assert served[0]["settings"]["endpoint_model"] == "served-tiny" and served[0]["settings"]["model"] is None
        assert {k: v for k, v in served[0]["settings"].items() if not k.startswith(("endpoint", "model"))} == \
               {k: v for k, v in local[0]["settings"].items() if not k.startswith(("endpoint", "model"))}
    predictions = [json.loads(l)["predict"] for l in (tmp_path / "served" / "val" / FILES[0]).read_text().splitlines()]
    assert len(predictions) == 6 and len(set(predictions)) > 1  # a real comparison: the answers differ by image


# --- the client's rules, against a stub server -------------------------------------------------------------------
class Stub:
    """A chat-completions stand-in: `script(body, n)` -> (status, headers, json) for the n-th POST it receives."""

    def __init__(self, script, delay_s=0.0, models=("stub-model",)):
        self.script, self.delay_s, self.models = script, delay_s, models
        self.bodies, self.headers = [], []
        self.in_flight = self.most_in_flight = 0
        self.lock = threading.Lock()

    def handler(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, headers, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {}, {"object": "list", "data": [{"id": m, "object": "model"} for m in stub.models]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.bodies.append(body)
                    stub.headers.append(dict(self.headers))
                    n = len(stub.bodies)
                    stub.in_flight += 1
                    stub.most_in_flight = max(stub.most_in_flight, stub.in_flight)
                time.sleep(stub.delay_s)
                with stub.lock:
                    stub.in_flight -= 1
                self._send(*stub.script(body, n))

        return Handler


@contextmanager
def stub_server(stub):
    server = ThreadingHTTPServer(("127.0.0.1", 0), stub.handler())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def answer(text):
    return 200, {}, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": "stop"}]}


def prompt_text(body):
    return next(p["text"] for p in body["messages"][0]["content"] if p["type"] == "text")


def image_of(body):
    url = next(p["image_url"]["url"] for p in body["messages"][0]["content"] if p["type"] == "image_url")
    header, data = url.split(",", 1)
    assert header == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_requests_are_greedy_with_the_settings_and_the_exact_pixels(small_dataset, tmp_path):
    samples = list(read_split(small_dataset, "val"))
    stub = Stub(lambda body, n: answer(f"report {n}"))
    with stub_server(stub) as url:
        cfg = EvalConfig(data=str(small_dataset), endpoint=url, out=str(tmp_path), max_new_tokens=33, n_boot=20)
        scores = evaluate(cfg, engine=Endpoint(url, api_key="sekrit", concurrency=1))
    assert len(stub.bodies) == len(samples) == scores["n"]
    for body, headers, sample in zip(stub.bodies, stub.headers, samples):
        assert {k: body[k] for k in ("model", "max_tokens", "temperature", "repetition_penalty", "stream")} == \
               {"model": "stub-model", "max_tokens": 33, "temperature": 0.0, "repetition_penalty": 1.0,
                "stream": False}  # no penalty, whatever the server's model defaults to
        assert "top_p" not in body and "top_k" not in body and "seed" not in body  # greedy: nothing that could sample
        assert headers["Authorization"] == "Bearer sekrit"
        assert prompt_text(body) == "图片中的诊断结果是怎样?"
        sent = image_of(body)
        assert sent.mode == "RGB" and sent.tobytes() == Image.open(sample.images[0]).convert("RGB").tobytes()
    rows = [json.loads(l) for l in (tmp_path / "val" / "generated_predictions.jsonl").read_text().splitlines()]
    assert [r["predict"] for r in rows] == [f"report {n}" for n in range(1, len(samples) + 1)]
    assert scores["settings"]["endpoint"] == url and scores["settings"]["endpoint_model"] == "stub-model"
    assert scores["settings"]["max_new_tokens"] == 33 and scores["settings"]["temperature"] == 0.0
    assert "sekrit" not in (tmp_path / "val" / "scores.json").read_text()


def test_sampled_settings_are_sent_as_recorded(small_dataset, tmp_path):
    stub = Stub(lambda body, n: answer("x"))
    with stub_server(stub) as url:
        cfg = EvalConfig(data=str(small_dataset), endpoint=url, out=str(tmp_path), limit=2, temperature=0.7,
                         top_p=0.8, top_k=20, seed=5, n_boot=20)
        evaluate(cfg, engine=Endpoint(url))
    assert [(b["temperature"], b["top_p"], b["top_k"], b["seed"]) for b in stub.bodies] == [(0.7, 0.8, 20, 5)] * 2


def test_busy_answers_are_retried_after_the_servers_retry_after(small_dataset, tmp_path):
    busy = {1: (429, {"Retry-After": "3"}, {"error": {"message": "queue full"}}),
            2: (503, {}, {"error": {"message": "in flight cap"}})}
    stub = Stub(lambda body, n: busy.get(n) or answer(f"ok {n}"))
    waits = []
    with stub_server(stub) as url:
        cfg = EvalConfig(data=str(small_dataset), endpoint=url, out=str(tmp_path), limit=2, n_boot=20)
        evaluate(cfg, engine=Endpoint(url, sleep=waits.append))
    assert waits == [3.0, 1.0]  # Retry-After honoured; without one, back-off (0.5 s doubled for the 2nd retry)
    assert len(stub.bodies) == 4 and stub.bodies[0] == stub.bodies[2]  # the same request, sent again
    rows = [json.loads(l) for l in (tmp_path / "val" / "generated_predictions.jsonl").read_text().splitlines()]
    assert [r["predict"] for r in rows] == ["ok 3", "ok 4"]


def test_retry_after_reads_seconds_dates_and_falls_back_to_backoff():
    from email.utils import formatdate

    assert retry_after("7", 0) == 7.0
    assert retry_after(None, 0) == 0.5 and retry_after(None, 3) == 4.0 and retry_after(None, 20) == 30.0
    assert 8 <= retry_after(formatdate(time.time() + 10, usegmt=True), 0) <= 10


def test_a_failed_sample_is_an_error_naming_it_and_nothing_is_dropped(small_dataset, tmp_path, capsys):
    samples = list(read_split(small_dataset, "val"))
    bad = samples[3].id

    def script(body, n):
        if image_of(body).tobytes() == Image.open(samples[3].images[0]).convert("RGB").tobytes():
            return 400, {}, {"error": {"message": "prompt too long", "type": "invalid_request_error"}}
        return answer("fine")

    stub = Stub(script)
    with stub_server(stub) as url:
        code = main(["eval", "--endpoint", url, "--data", str(small_dataset), "--out", str(tmp_path),
                     "--n-boot", "20"])
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
        assert code == 2
        assert err == f"radscribe eval: error: sample {bad}: {url}/chat/completions answered 400: prompt too long"
        assert not (tmp_path / "val" / "scores.json").exists()
        partial = (tmp_path / "val" / "generated_predictions.partial.jsonl").read_text().splitlines()
        assert [r["id"] for line in partial[1:] for r in json.loads(line)["rows"]] == [s.id for s in samples[:3]]
        # the server fixed, the rerun sends only the samples not yet answered and writes all of them
        sent = len(stub.bodies)
        stub.script = lambda body, n: answer("fixed")
        assert main(["eval", "--endpoint", url, "--data", str(small_dataset), "--out", str(tmp_path),
                     "--n-boot", "20"]) == 0
        assert len(stub.bodies) - sent == len(samples) - 3
        rows = [json.loads(l) for l in (tmp_path / "val" / "generated_predictions.jsonl").read_text().splitlines()]
        assert [r["id"] for r in rows] == [s.id for s in samples]
        assert [r["predict"] for r in rows] == ["fine"] * 3 + ["fixed"] * (len(samples) - 3)

        always_busy = Stub(lambda body, n: (503, {"Retry-After": "0"}, {"error": {"message": "busy"}}))
    busy_error = rf"^sample {samples[0].id}: .* answered 503 after 3 attempts: busy$"
    with stub_server(always_busy) as url, pytest.raises(RadscribeError, match=busy_error):
        evaluate(EvalConfig(data=str(small_dataset), endpoint=url, out=str(tmp_path / "b"), n_boot=20),
                 engine=Endpoint(url, max_retries=2, sleep=lambda s: None))
    assert len(always_busy.bodies) == 3


def test_concurrency_is_a_bounded_pool_and_answers_keep_sample_order(small_dataset, tmp_path):
    samples = list(read_split(small_dataset, "val"))
    # The answer names the sample by its prompt's image, whatever order the server answers in.
    by_pixels = {Image.open(s.images[0]).convert("RGB").tobytes(): s.id for s in samples}
    stub = Stub(lambda body, n: answer(by_pixels[image_of(body).tobytes()]), delay_s=0.15)
    with stub_server(stub) as url:
        cfg = EvalConfig(data=str(small_dataset), endpoint=url, out=str(tmp_path), concurrency=3, n_boot=20)
        scores = evaluate(cfg, engine=Endpoint.from_config(cfg))
    assert stub.most_in_flight == 3
    rows = [json.loads(l) for l in (tmp_path / "val" / "generated_predictions.jsonl").read_text().splitlines()]
    assert [r["predict"] for r in rows] == [r["id"] for r in rows] == [s.id for s in samples]
    assert scores["config"]["concurrency"] == 3 and scores["predict_results"]["predict_steps_per_second"] > 0


def test_rerun_rule_covers_the_endpoint(small_dataset, tmp_path, capsys):
    stub = Stub(lambda body, n: answer("same"))
    with stub_server(stub) as url:
        args = ["eval", "--endpoint", url, "--data", str(small_dataset), "--out", str(tmp_path), "--n-boot", "20"]
        assert main(args) == 0 and len(stub.bodies) == 8
        assert main(args) == 0 and len(stub.bodies) == 8  # same settings: reused, nothing sent
        assert "already evaluated with these settings" in capsys.readouterr().out
        assert main([*args, "--max-new-tokens", "7"]) == 2
        assert "max_new_tokens 512 -> 7" in capsys.readouterr().err
        other = Stub(lambda body, n: answer("same"), models=("another",))
        with stub_server(other) as url2:
            assert main(["eval", "--endpoint", url2, *args[3:]]) == 2
            assert f"endpoint '{url}' -> '{url2}'" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--model", "M"], "--model cannot take effect with --endpoint"),
    (["--adapter", "R"], "--adapter cannot take effect with --endpoint"),
    (["--batch-size", "2"], "--batch-size cannot take effect with --endpoint"),
    (["--dtype", "bf16"], "--dtype cannot take effect with --endpoint"),
    (["--api-key-env", "RADSCRIBE_TEST_UNSET_VAR"],
     "--api-key-env RADSCRIBE_TEST_UNSET_VAR: that environment variable is not set"),
    (["--concurrency", "0"], "--concurrency must be at least 1, got 0"),
])
def test_options_that_cannot_take_effect_with_an_endpoint_are_refused(small_dataset, tmp_path, capsys, extra, message):
    stub = Stub(lambda body, n: answer("x"))
    with stub_server(stub) as url:
        code = main(["eval", "--endpoint", url, "--data", str(small_dataset), "--out", str(tmp_path), *extra])
    assert code == 2 and message in capsys.readouterr().err
    assert stub.bodies == []


def test_endpoint_only_options_and_bad_urls_are_refused(small_dataset, tmp_path, capsys):
    for extra, message in ((["--concurrency", "4"], "--concurrency only applies with --endpoint URL"),
                           (["--api-key-env", "K", "max_retries=2"], "--api-key-env, max_retries only apply with "
                                                                     "--endpoint URL")):
        assert main(["eval", "--model", "M", "--data", str(small_dataset), "--out", str(tmp_path), *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["eval", "--data", str(small_dataset), "--out", str(tmp_path)]) == 2
    assert "--model is required" in capsys.readouterr().err
    assert main(["eval", "--endpoint", "localhost:8000", "--data", str(small_dataset), "--out", str(tmp_path)]) == 2
    assert "is not an http(s) URL" in capsys.readouterr().err
    stub = Stub(lambda body, n: answer("x"), models=("a", "b"))
    with stub_server(stub) as url:
        assert main(["eval", "--endpoint", url, "--data", str(small_dataset)]) == 2
        assert "an --endpoint eval has no run folder: pass --out DIR" in capsys.readouterr().err
        assert main(["eval", "--endpoint", url, "--data", str(small_dataset), "--out", str(tmp_path)]) == 2
        assert "serves 2 models (a, b); choose one with --endpoint-model ID" in capsys.readouterr().err
