"""radscribe serve's model in a process of its own (radscribe/serve/model_process.py): the same answers as the
Engine in this process, streams, cancellation across the pipe, errors, and a clean exit."""

import dataclasses
import threading
import time

import numpy as np
import pytest
from PIL import Image

from radscribe.errors import RadscribeError
from radscribe.serve.engine import Engine, Request
from radscribe.serve.model_process import ModelGone, ModelProcess


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    folder = tiny_model_dir("qwen3_vl")
    remote = ModelProcess(folder, dtype="fp32", device="cpu")
    yield Engine.from_pretrained(folder, dtype="fp32", device="cpu"), remote
    remote.close()


def scan(seed: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(96, 96, 3) * 255).astype("uint8"))


def ask(text: str, seed: int | None = None, **fields) -> Request:
    content = ([] if seed is None else [{"type": "image", "image": scan(seed)}]) + [{"type": "text", "text": text}]
    return Request(messages=[{"role": "user", "content": content}], **{"max_new_tokens": 12, "temperature": 0.0,
                                                                        **fields})


def test_answers_and_streams_are_the_engines(pair):
    local, remote = pair
    requests = [ask("Describe the lesion.", 1), ask("Describe the lesion.", 2), ask("胸部CT平扫所见:")]
    here, there = local.complete(requests), remote.complete(requests)
    assert [g.text for g in there] == [g.text for g in here]
    assert [(g.prompt_tokens, g.completion_tokens, g.finish_reason) for g in there] == \
           [(g.prompt_tokens, g.completion_tokens, g.finish_reason) for g in here]
    assert here[0].text != here[1].text  # the image reached the model process
    assert "".join(remote.stream(requests[0])) == here[0].text
    # what the API asks before generating comes from the model the child loaded
    assert remote.defaults == local.defaults and remote.image_policy == local.image_policy
    messages = [{"role": "user", "content": [{"type": "image", "image": None}, {"type": "text", "text": "q"}]}]
    assert remote.prompt_tokens(messages, [(96, 96)]) == local.prompt_tokens(messages, [(96, 96)])


def test_a_cancel_set_here_stops_the_generation_there(real_model_dir):
    # random weights over Qwen's real 151k vocabulary: an answer that would not end by itself before 1000 tokens
    remote = ModelProcess(real_model_dir("qwen3_vl"), device="cpu")
    request = ask("Write a radiology report.", 3, max_new_tokens=1000, cancel=threading.Event())
    threading.Timer(0.3, request.cancel.set).start()
    started = time.monotonic()
    answer = remote.complete([request])[0]
    assert answer.finish_reason == "cancelled" and answer.completion_tokens < 1000
    assert time.monotonic() - started < 10
    # a stream closed after its first piece frees the model for the next request at once
    stream = remote.stream(ask("Write a radiology report.", 3, max_new_tokens=1000))
    next(stream)
    stream.close()
    started = time.monotonic()
    assert remote.complete([ask("q", max_new_tokens=4)])[0].completion_tokens == 4
    assert time.monotonic() - started < 10

    # Each answer crosses the pipe as its row stops: the short row's hook, here, cancels its neighbour, which then
    # stops there long before its budget (were answers sent only with the whole batch, it would run 1000 tokens).
    gone = threading.Event()
    heard = []
    short = ask("Describe the lesion.", 1, max_new_tokens=2, answered=lambda g: (heard.append(g), gone.set()))
    long = ask("Describe the lesion.", 2, max_new_tokens=1000, cancel=gone)
    quick, stopped = remote.complete([short, long])
    assert heard == [quick] and quick.completion_tokens == 2
    assert quick.text == remote.complete([ask("Describe the lesion.", 1, max_new_tokens=2)])[0].text
    assert stopped.finish_reason == "cancelled" and stopped.completion_tokens < 50
    remote.close()


def test_the_engines_refusals_arrive_as_themselves(pair):
    _, remote = pair
    with pytest.raises(RadscribeError, match="top_p"):
        remote.complete([ask("q", temperature=1.0, top_p=0.0)])
    assert remote.complete([ask("q")])[0].text  # and the process goes on serving


def test_a_model_that_cannot_load_is_one_error_and_the_process_ends(tmp_path):
    with pytest.raises(RadscribeError, match="no-model-here"):
        ModelProcess(tmp_path / "no-model-here", device="cpu")


def test_close_ends_the_model_process(tiny_model_dir):
    remote = ModelProcess(tiny_model_dir("qwen3_vl"), dtype="fp32", device="cpu")
    remote.close()
    assert remote._process.exitcode == 0
    with pytest.raises(ModelGone, match="model process has exited"):  # a 500 from the API, not a 400
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the reader notices the end of the pipe
            remote.complete([ask("q")])
            time.sleep(0.1)


def test_sliced_answers_are_the_engines_and_a_slice_at_a_time(pair):
    local, remote = pair
    two = Request(messages=[{"role": "user", "content": [{"type": "image", "image": scan(5)},
                                                         {"type": "image", "image": scan(6)},
                                                         {"type": "text", "text": "Compare."}]}], max_new_tokens=12)
    requests = [two, ask("Describe the lesion.", 1)]
    steps, yields = remote.complete_steps(requests), 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            there = done.value
            break
        yields += 1
    assert there == local.complete(requests)
    assert yields == 1  # three 96x96 scans are one run of images: one slice, then the generation


def test_a_sliced_job_given_up_half_way_leaves_the_process_serving(pair):
    local, remote = pair
    steps = remote.complete_steps([ask("Describe the lesion.", 3)])
    next(steps)  # the child holds the encoded images now
    steps.close()  # dropped there
    request = ask("Describe the lesion.", 4)
    assert remote.complete([request]) == local.complete([request])


def test_a_request_cancelled_between_slices_is_not_generated_there(pair):
    _, remote = pair
    request = dataclasses.replace(ask("Describe the lesion.", 7), cancel=threading.Event())
    steps = remote.complete_steps([request])
    next(steps)  # its image is encoded in the child
    request.cancel.set()  # the client goes while other work runs between the slices
    with pytest.raises(StopIteration) as done:
        next(steps)
    answer = done.value.value[0]
    assert (answer.text, answer.completion_tokens, answer.finish_reason) == ("", 0, "cancelled")
