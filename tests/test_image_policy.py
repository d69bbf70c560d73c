"""One image policy from training to serving, and generation defaults from the model's generation_config.json.

On the real-layout Qwen3-VL folder (published processor: 65,536 to 16,777,216 px; published sampling defaults:
temperature 0.7, top_p 0.8, top_k 20): a run trained at the default cap (data.image_max_pixels 768x768) saves its
limits with its processor, and eval, chat, serve (HTTP), the web preview and export size a 1024x1024 image to the
576 tokens training gave it, while the base model without a run keeps the published limits and says so.
"""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from radscribe.cli import stage_config
from radscribe.model import pixels
from radscribe.serve.engine import Engine, Request, Sampling, sampling_defaults

DEFAULT_MIN, DEFAULT_MAX = 32 * 32, 768 * 768  # TrainConfig.data's defaults
PUBLISHED = (65_536, 16_777_216)
TOKENS_AT_CAP = (768 // 32) ** 2  # 576: patch 16 x merge 2 = 32 px per token side
TOKENS_PUBLISHED = (1024 // 32) ** 2  # 1,024


def _image(size=(1024, 1024), seed=0) -> Image.Image:
    pixels_ = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels_)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _sample(tmp_path, image: Image.Image, name="scan.png"):
    from radscribe.data.dataset import Sample

    path = tmp_path / name
    image.save(path)
    return Sample(id=name, messages=[{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}],
                  images=[path])


def _pads(engine, ids) -> int:
    return int((ids == engine.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())


def _user(text, image=None):
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def trained_run(real_model_dir, tiny_dataset, tmp_path_factory):
    """A LoRA run on the real-layout dense Qwen3-VL, trained (2 steps) with the default data.image_* limits."""
    from radscribe.train import train

    run = tmp_path_factory.mktemp("policy") / "run"
    cfg = stage_config(["train", "--model", str(real_model_dir("qwen3_vl")), "--data", str(tiny_dataset),
                        "--out", str(run), "train.max_steps=2", "train.per_device_batch=2", "train.grad_accum=1",
                        "data.max_samples=4", "data.val_split=null"])
    assert (cfg.data.image_min_pixels, cfg.data.image_max_pixels) == (DEFAULT_MIN, DEFAULT_MAX)
    train(cfg)
    return run


@pytest.fixture(scope="module")
def run_engine(real_model_dir, trained_run):
    return Engine.from_pretrained(real_model_dir("qwen3_vl"), adapter=trained_run, device="cpu")


@pytest.fixture(scope="module")
def base_engine(real_model_dir):
    return Engine.from_pretrained(real_model_dir("qwen3_vl"), device="cpu")


def _image_tokens(engine, image) -> int:
    ids = engine._encode([Request(messages=_user("q", image))])["input_ids"][0]
    return int((ids == engine.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())


# --- the policy is recorded by training and read back ---------------------------------------------------------
def test_the_run_saves_its_pixel_limits_with_its_processor(trained_run):
    assert pixels.saved_limits(trained_run / "adapter") == (DEFAULT_MIN, DEFAULT_MAX)


def test_a_run_saved_before_the_limits_were_recorded_is_served_as_it_was_trained(real_model_dir, trained_run,
                                                                                 tmp_path):
    import shutil

    # such a run saved the published processor limits, while its training capped images at data.image_max_pixels
    old = tmp_path / "old-run"
    shutil.copytree(trained_run, old)
    pixels.write_limits(old / "adapter", *PUBLISHED)
    assert pixels.saved_limits(old / "adapter") == PUBLISHED
    assert pixels.trained_limits(old / "adapter") == (PUBLISHED[0], DEFAULT_MAX)  # the published floor applied
    engine = Engine.from_pretrained(real_model_dir("qwen3_vl"), adapter=old, device="cpu")
    assert _image_tokens(engine, _image()) == TOKENS_AT_CAP
    assert _image_tokens(engine, _image((64, 64))) == 64  # scaled up to the floor, as that training did


def test_training_encodes_a_1024_image_to_the_tokens_inference_gives_it(run_engine, base_engine, tmp_path):
    from radscribe.encode import Encoder

    image = _image()
    encoded = Encoder(base_engine.processor, 4096, DEFAULT_MAX, DEFAULT_MIN)(_sample(tmp_path, image))
    assert _pads(base_engine, encoded["input_ids"]) == TOKENS_AT_CAP  # training, at the default cap
    assert _image_tokens(run_engine, image) == TOKENS_AT_CAP  # eval / chat / serve with the run
    assert (run_engine.image_policy.min_pixels, run_engine.image_policy.max_pixels) == (DEFAULT_MIN, DEFAULT_MAX)
    assert "as trained" in run_engine.image_policy.source
    # the base model without a run keeps the published limits, and says where they come from
    assert _image_tokens(base_engine, image) == TOKENS_PUBLISHED
    assert (base_engine.image_policy.min_pixels, base_engine.image_policy.max_pixels) == PUBLISHED
    assert "no run given" in base_engine.image_policy.source


def test_engine_start_says_which_image_policy_and_sampling_defaults_apply(real_model_dir, trained_run, capsys):
    capsys.readouterr()
    Engine.from_pretrained(real_model_dir("qwen3_vl"), adapter=trained_run, device="cpu")
    err = capsys.readouterr().err
    assert f"images: brought into {DEFAULT_MIN:,}-{DEFAULT_MAX:,} pixels (as trained" in err
    assert f"a 1024x1024 image is {TOKENS_AT_CAP} image tokens" in err
    assert "'temperature': 0.7, 'top_p': 0.8, 'top_k': 20" in err


# --- serve: the HTTP API and the web preview ------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(run_engine):
    from radscribe.serve.api import ServeConfig, create_app, serve_in_thread

    with serve_in_thread(create_app(run_engine, ServeConfig(model_name="policy"))) as url:
        yield url


def _completion(url, image=None, **fields):
    from radscribe.serve.api import data_uri

    content = ([{"type": "image_url", "image_url": {"url": data_uri(_png(image), "image/png")}}] if image else [])
    body = {"messages": [{"role": "user", "content": content + [{"type": "text", "text": "q"}]}],
            "max_tokens": 6, **fields}
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_served_1024_image_costs_at_most_the_576_tokens_of_training(served, run_engine):
    with_image = _completion(served, _image(), temperature=0)["usage"]["prompt_tokens"]
    text_only = _completion(served, temperature=0)["usage"]["prompt_tokens"]
    vision_markers = 2  # <|vision_start|> <|vision_end|>
    assert with_image - text_only - vision_markers == TOKENS_AT_CAP <= 576
    # the admission count (--max-prompt-tokens), made from the image size before decoding, is the same number
    one = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}]
    assert run_engine.prompt_tokens(one, [(1024, 1024)]) == with_image
    assert httpx.get(f"{served}/health").json()["image_pixels"] == [DEFAULT_MIN, DEFAULT_MAX]


def test_web_preview_shows_the_image_at_the_policy_size(served):
    from radscribe.serve.api import data_uri

    reply = httpx.post(f"{served}/v1/preview", json={"image_url": data_uri(_png(_image((1000, 700))), "image/png")})
    assert reply.status_code == 200
    shown = Image.open(io.BytesIO(reply.content))
    assert shown.size == (896, 640) and reply.headers["X-Image-Size"] == "896x640"  # smart_resize under 768^2
    assert reply.headers["X-Image-Tokens"] == str((896 // 32) * (640 // 32))


# --- export ----------------------------------------------------------------------------------------------------
def test_export_carries_the_policy_into_every_processor_file(real_model_dir, trained_run, tmp_path):
    from radscribe.export import export

    base = real_model_dir("qwen3_vl")
    out = export(base, trained_run, tmp_path / "merged")
    # the export is the base's files with merged weights: its preprocessor_config.json (what transformers 4.x,
    # 5.x and vLLM read) keeps the published layout, with the run's limits as its size
    flat = json.loads((out / "preprocessor_config.json").read_text())
    published = json.loads((base / "preprocessor_config.json").read_text())
    assert flat["size"] == {"shortest_edge": DEFAULT_MIN, "longest_edge": DEFAULT_MAX}
    assert {k: v for k, v in flat.items() if k != "size"} == {k: v for k, v in published.items() if k != "size"}
    # a transformers-5 processor_config.json nesting the image processor gets the same limits
    nested = tmp_path / "nested"
    nested.mkdir()
    (nested / "processor_config.json").write_text(json.dumps({"image_processor": {"size": {
        "shortest_edge": PUBLISHED[0], "longest_edge": PUBLISHED[1]}, "min_pixels": 1}}))
    pixels.write_limits(nested, DEFAULT_MIN, DEFAULT_MAX)
    assert json.loads((nested / "processor_config.json").read_text()) == {"image_processor": {"size": {
        "shortest_edge": DEFAULT_MIN, "longest_edge": DEFAULT_MAX}}}
    exported = Engine.from_pretrained(out, device="cpu")
    assert _image_tokens(exported, _image()) == TOKENS_AT_CAP


# --- data.image_min_pixels lowers the published floor ----------------------------------------------------------
def test_image_min_pixels_lowers_the_published_floor_when_fitting_cutoff_len(base_engine, tmp_path):
    from radscribe.encode import Encoder, Rejected

    processor = base_engine.processor
    sample = _sample(tmp_path, _image((256, 256)))  # 65,536 px: exactly the published floor, 64 tokens
    full = Encoder(processor, 4096, DEFAULT_MAX, DEFAULT_MIN)(sample)
    assert _pads(base_engine, full["input_ids"]) == 64
    cutoff = len(full["input_ids"]) - 40  # 64 image tokens do not fit: the image must shrink below the floor
    fitted = Encoder(processor, cutoff, DEFAULT_MAX, DEFAULT_MIN)(sample)
    assert 0 < _pads(base_engine, fitted["input_ids"]) < 64 and len(fitted["input_ids"]) <= cutoff
    # a small image is not scaled up to the published floor either: 64x64 stays 2x2 tokens
    small = Encoder(processor, 4096, DEFAULT_MAX, DEFAULT_MIN)(_sample(tmp_path, _image((64, 64)), "small.png"))
    assert _pads(base_engine, small["input_ids"]) == 4
    # asking for the published floor keeps it: the same cutoff then rejects the sample
    with pytest.raises(Rejected, match="even at image_min_pixels"):
        Encoder(processor, cutoff, DEFAULT_MAX, PUBLISHED[0])(sample)
    assert pixels.pixel_limits(processor) == PUBLISHED  # the encoder never changed the shared processor


def test_an_empty_pixel_range_is_refused_in_one_line(base_engine):
    from radscribe.errors import RadscribeError

    with pytest.raises(RadscribeError, match=r"pixel range \[4096, 1024\] is empty"):
        pixels.set_pixel_limits(base_engine.processor, 4096, 1024)


# --- generation defaults ---------------------------------------------------------------------------------------
def test_the_published_generation_config_is_the_default_of_chat_and_serve(base_engine, tiny_model_dir):
    assert base_engine.defaults == Sampling(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.0)
    kwargs = base_engine._generation_kwargs(base_engine.resolve(Request(messages=_user("q"))))
    assert (kwargs["do_sample"], kwargs["temperature"], kwargs["top_p"], kwargs["top_k"]) == (True, 0.7, 0.8, 20)
    # a request's own fields win; temperature 0 is greedy whatever the model's config says
    own = base_engine.resolve(Request(messages=_user("q"), temperature=1.2, top_k=3))
    assert (own.temperature, own.top_p, own.top_k) == (1.2, 0.8, 3)
    assert base_engine._generation_kwargs(base_engine.resolve(Request(_user("q"), temperature=0)))["do_sample"] is False
    # our own tiny models say do_sample false: greedy by default
    tiny = Engine.from_pretrained(tiny_model_dir("qwen3_vl"), device="cpu")
    assert tiny.defaults.temperature == 0.0


def test_sampling_defaults_read_every_published_config_the_same_way():
    qwen2_5 = {"do_sample": True, "repetition_penalty": 1.05, "temperature": 1e-06}  # greedy in effect (and vLLM)
    assert sampling_defaults(qwen2_5) == Sampling(0.0, 1.0, 0, 1.05)
    assert sampling_defaults({}) == Sampling(0.0, 1.0, 0, 1.0)
    assert sampling_defaults({"do_sample": True, "top_k": 20}) == Sampling(1.0, 1.0, 20, 1.0)


def test_top_k_and_the_seed_reach_generation(base_engine):
    messages = _user("你好")
    greedy = base_engine.generate([Request(messages, 12, temperature=0)])[0]
    # top_k 1 leaves only the likeliest token: sampling at any temperature is then greedy (it was ignored before)
    assert base_engine.generate([Request(messages, 12, temperature=2.0, top_k=1, seed=5)])[0] == greedy
    default = [base_engine.generate([Request(messages, 12, seed=s)])[0] for s in (1, 1, 2, 3)]
    explicit = base_engine.generate([Request(messages, 12, temperature=0.7, top_p=0.8, top_k=20, seed=1)])[0]
    assert default[0] == default[1] == explicit  # unset fields are the published defaults, and seeds repeat
    assert len(set(default)) > 1  # and they sample


def test_serve_follows_generation_config_and_request_fields_override_it(served):
    health = httpx.get(f"{served}/health").json()
    assert health["sampling_defaults"] == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.0}
    a = _completion(served, seed=7)["choices"][0]["message"]["content"]
    b = _completion(served, seed=7, temperature=0.7, top_p=0.8, top_k=20)["choices"][0]["message"]["content"]
    greedy = _completion(served, temperature=0)["choices"][0]["message"]["content"]
    assert a == b
    assert _completion(served, temperature=1.5, top_k=1, seed=3)["choices"][0]["message"]["content"] == greedy


def test_chat_defaults_to_the_model_and_flags_override(base_engine):
    from radscribe.serve.chat import run_chat

    seen = []
    original = base_engine.resolve

    def recording(request):
        seen.append(original(request))
        return seen[-1]

    base_engine.resolve = recording
    try:
        out = io.StringIO()
        run_chat(base_engine, _image((64, 64)), "q", max_new_tokens=2, out=out)
        run_chat(base_engine, _image((64, 64)), "q", max_new_tokens=2, sampling={"temperature": 0}, out=out)
    finally:
        del base_engine.resolve
    assert (seen[0].temperature, seen[0].top_p, seen[0].top_k) == (0.7, 0.8, 20)
    assert seen[1].temperature == 0


def test_eval_stays_greedy_and_records_its_settings(base_engine, tiny_dataset, real_model_dir, tmp_path):
    from radscribe.evaluate.predict import EvalConfig, evaluate

    seen = []
    original = base_engine.resolve
    base_engine.resolve = lambda r: seen.append(original(r)) or seen[-1]
    try:
        scores = evaluate(EvalConfig(model=str(real_model_dir("qwen3_vl")), data=str(tiny_dataset), limit=2,
                                     max_new_tokens=3, n_boot=10, out=str(tmp_path / "eval")), engine=base_engine)
    finally:
        del base_engine.resolve
    assert seen and all(r.temperature == 0 and r.repetition_penalty == 1.0 for r in seen)
    settings = scores["settings"]
    assert (settings["temperature"], settings["top_p"], settings["top_k"], settings["repetition_penalty"]) == \
        (0.0, 1.0, 0, 1.0)
    assert scores["image_pixels"]["min"] == PUBLISHED[0] and scores["image_pixels"]["max"] == PUBLISHED[1]


def test_vllm_is_started_with_the_same_defaults_spelled_out(real_model_dir):
    from radscribe.serve.vllm import VllmOptions, vllm_command

    cmd = vllm_command(real_model_dir("qwen3_vl"), "127.0.0.1", 8000, "m", VllmOptions())
    assert cmd[cmd.index("--generation-config") + 1] == "vllm"  # nothing of vLLM's own defaults
    assert json.loads(cmd[cmd.index("--override-generation-config") + 1]) == {
        "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.0}

