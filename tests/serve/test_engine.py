"""The generation engine: batched greedy output equals one-at-a-time output (left padding), streaming, sampling."""

import numpy as np
import pytest
from PIL import Image

from radscribe.errors import RadscribeError
from radscribe.serve.engine import Engine, Request


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.from_pretrained(tiny_model_dir("qwen3_vl"), dtype="fp32", device="cpu")


def _image(seed: int, size: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _requests(max_new_tokens=10):
    # Different image sizes and prompt lengths, so rows of one batch have different lengths and get left pads.
    prompts = ["图片中的诊断结果是怎样?", "描述这张图像。", "这是一张什么部位的图像?请详细描述病灶的位置、大小和密度。", "报告"]
    sizes = [64, 96, 64, 128]
    return [Request(messages=[{"role": "user", "content": [{"type": "image", "image": _image(i, s)},
                                                            {"type": "text", "text": p}]}],
                    max_new_tokens=max_new_tokens)
            for i, (p, s) in enumerate(zip(prompts, sizes))]


def test_batched_greedy_equals_batch_of_one(engine):
    requests = _requests()
    lengths = {engine._encode([r])["input_ids"].shape[1] for r in requests}
    assert len(lengths) > 1  # the batch really is padded
    one_by_one = [engine.generate([r], batch_size=1)[0] for r in requests]
    batched = engine.generate(requests, batch_size=4)
    assert batched == one_by_one
    assert all(one_by_one) and len(set(one_by_one)) > 1


def test_text_only_request_and_per_request_budget(engine):
    short = Request(messages=[{"role": "user", "content": "你好"}], max_new_tokens=3)
    long = Request(messages=[{"role": "user", "content": "你好"}], max_new_tokens=12)
    a, b = engine.generate([short, long])
    tokens = engine.tokenizer(a, add_special_tokens=False)["input_ids"]
    assert len(tokens) <= 3 and b.startswith(a)


def test_stream_concatenates_to_the_greedy_answer(engine):
    request = _requests()[1]
    deltas = list(engine.stream(request))
    assert len(deltas) > 1
    assert "".join(deltas) == engine.generate([request])[0]
    # closing the iterator early stops generation and leaves the engine usable
    it = engine.stream(request)
    next(it)
    it.close()
    assert engine.generate([request])[0] == "".join(deltas)


def test_sampling_is_seeded(engine):
    base = _requests(max_new_tokens=12)[0]
    sampled = [Request(base.messages, 12, temperature=1.5, top_p=0.95, seed=s) for s in (1, 1, 2)]
    a, b, c = (engine.generate([r])[0] for r in sampled)
    assert a == b and a != c


def test_image_paths_go_through_the_image_loader(engine, tmp_path):
    path = tmp_path / "scan.png"
    _image(0, 64).save(path)
    by_path = Request(messages=[{"role": "user", "content": [{"type": "image", "image": str(path)},
                                                             {"type": "text", "text": "报告"}]}], max_new_tokens=6)
    by_pil = Request(messages=[{"role": "user", "content": [{"type": "image", "image": _image(0, 64)},
                                                            {"type": "text", "text": "报告"}]}], max_new_tokens=6)
    assert engine.generate([by_path]) == engine.generate([by_pil])


def test_bad_requests_name_the_field(engine):
    with pytest.raises(RadscribeError, match="top_p"):
        engine.generate([Request(messages=[{"role": "user", "content": "x"}], top_p=0)])
    with pytest.raises(RadscribeError, match="max_new_tokens"):
        engine.generate([Request(messages=[{"role": "user", "content": "x"}], max_new_tokens=0)])


@pytest.mark.parametrize("arch", ["qwen3_vl_moe", "qwen2_5_vl"])
def test_left_padding_is_exact_for_the_other_architectures(tiny_model_dir, arch):
    # Qwen2.5-VL builds its M-RoPE positions differently from Qwen3-VL; MoE routes every token separately.
    engine = Engine.from_pretrained(tiny_model_dir(arch), dtype="fp32", device="cpu")
    requests = [_requests(max_new_tokens=8)[i] for i in (0, 2, 3)]
    assert engine.generate(requests, batch_size=3) == [engine.generate([r])[0] for r in requests]


def test_complete_reports_token_counts_and_why_each_answer_ended(engine):
    requests = _requests(max_new_tokens=6)
    batched = engine.complete(requests, batch_size=4)
    for r, g in zip(requests, batched):
        assert g.prompt_tokens == engine._encode([r])["input_ids"].shape[1]  # padding not counted
    assert [g.text for g in batched] == engine.generate(requests, batch_size=1)
    # The random tiny model does not emit an end-of-turn token within 6 steps: every answer hit the budget.
    assert all(g.finish_reason == "length" and g.completion_tokens == 6 for g in batched)

    # Make the token each answer starts with an end-of-turn token: the answers now stop after one token.
    first = {engine.tokenizer.convert_tokens_to_ids(engine.tokenizer.tokenize(g.text)[0]) for g in batched if g.text}
    saved = engine.eos_token_ids
    engine.eos_token_ids = sorted(set(saved) | first)
    try:
        stopped = engine.complete(requests, batch_size=4)
    finally:
        engine.eos_token_ids = saved
    assert any(g.finish_reason == "stop" and g.completion_tokens == 1 for g in stopped)
    assert all(g.completion_tokens <= 6 for g in stopped)
