"""The web page end to end in headless Debian Chromium (Playwright drives the system browser; nothing downloaded).

Upload a PNG -> the preview shows -> the streamed report fills in -> a follow-up question gets its own answer;
upload a DICOM -> the server-side windowed preview changes with the window preset. A screenshot is checked for
content (the notice banner, the image and the report all painted).
"""

import io
import json
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from radscribe.serve.api import ServeConfig, create_app, data_uri, serve_in_thread

CHROMIUM = os.environ.get("RADSCRIBE_CHROMIUM", "/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists() or shutil.which(CHROMIUM) is None,
                                reason=f"no Chromium at {CHROMIUM}")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from radscribe.model.tiny import build_tiny_model
    from radscribe.serve.engine import Engine

    model_dir = build_tiny_model("qwen3_vl", tmp_path_factory.mktemp("tiny") / "model", seed=0)
    engine = Engine.from_pretrained(model_dir, device="cpu")
    with serve_in_thread(create_app(engine, ServeConfig(model_name="radscribe-tiny"))) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright import sync_api  # declared in [test]: a broken install fails here, never skips
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def phantom_png(path: Path) -> Path:
    # A bright disc with a dark blob on black: enough structure that a painted preview is unmistakable.
    yy, xx = np.mgrid[:160, :160]
    img = np.where((yy - 80) ** 2 + (xx - 80) ** 2 < 70 ** 2, 180, 0).astype(np.uint8)
    img[(yy - 60) ** 2 + (xx - 100) ** 2 < 12 ** 2] = 60
    Image.fromarray(img).convert("RGB").save(path)
    return path


def test_upload_png_streams_a_report_and_answers_a_follow_up(browser, server, tmp_path):
    image_path = phantom_png(tmp_path / "phantom.png")
    page = browser.new_page(viewport={"width": 1200, "height": 800}, bypass_csp=True)
    page.set_default_timeout(20_000)
    page.goto(server + "/")
    assert "Research use only — not a diagnosis" in page.inner_text("#notice")
    assert page.is_disabled("#generate")

    page.set_input_files("#file", str(image_path))
    page.wait_for_function("document.getElementById('preview').naturalWidth > 0")
    # the tiny processor's policy keeps 160x160 (5x5 tokens of 32 px); the caption says what it costs
    assert page.inner_text("#preview-caption") == "phantom.png — 160×160 as the model sees it (25 image tokens)"
    page.click("summary")  # the settings fold
    # the page sends no sampling fields: the server's defaults, the tiny model's generation_config (greedy)
    assert page.inner_text("#sampling") == "Sampling: greedy (the model's generation_config.json)"
    page.fill("#max-tokens", "24")
    page.click("#generate")
    page.wait_for_selector(".turn.assistant.done", timeout=60_000)
    report = page.inner_text(".turn.assistant")
    assert report.strip() and "[error" not in report

    # The page showed exactly what the API answers for the same request (greedy decoding).
    prompt = "图片中的诊断结果是怎样?"
    body = {"max_tokens": 24, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(image_path.read_bytes(), "image/png"), "window": "auto"}},
        {"type": "text", "text": prompt}]}]}
    expected = httpx.post(server + "/v1/chat/completions", json=body, timeout=60).json()
    assert report == expected["choices"][0]["message"]["content"]

    page.fill("#followup", "Is the lesion on the left?")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.turn.assistant.done').length === 2", timeout=60_000)
    turns = page.locator(".turn").all_inner_texts()
    assert turns[0] == prompt and turns[2] == "Is the lesion on the left?" and turns[3].strip()
    assert page.inner_text("#status") == "Done."

    shot = tmp_path / "web.png"
    page.screenshot(path=str(shot), full_page=True)
    page.close()
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[0] >= 600 and pixels.shape[1] == 1200
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # text, banner, image: not a blank page
    # the notice banner's amber is painted near the top
    top = pixels[: pixels.shape[0] // 4].reshape(-1, 3)
    assert ((abs(top[:, 0].astype(int) - 0xFF) < 8) & (abs(top[:, 1].astype(int) - 0xE0) < 8)).sum() > 5000
    if os.environ.get("RADSCRIBE_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["RADSCRIBE_KEEP_SCREENSHOT"])


def test_dicom_upload_is_previewed_with_the_chosen_window(browser, server, tmp_path):
    from pydicom.data import get_testdata_file

    dicom = tmp_path / "ct.dcm"
    shutil.copy(get_testdata_file("CT_small.dcm", download=False), dicom)
    page = browser.new_page(bypass_csp=True)  # wait_for_function evaluates strings; our CSP forbids that
    page.set_default_timeout(20_000)
    page.goto(server + "/")
    page.select_option("#window", "lung")
    page.set_input_files("#file", str(dicom))
    page.wait_for_function("document.getElementById('preview').naturalWidth > 0")
    assert page.inner_text("#preview-caption").startswith("ct.dcm — 128×128")
    lung = page.locator("#preview").screenshot()
    page.select_option("#window", "bone")
    page.wait_for_function("document.getElementById('status').textContent === ''")
    page.wait_for_timeout(200)
    bone = page.locator("#preview").screenshot()
    assert np.asarray(Image.open(io.BytesIO(lung))).std() > 5
    assert lung != bone  # the server re-windowed the same file
    page.click("summary")
    page.fill("#max-tokens", "8")
    page.click("#generate")
    page.wait_for_selector(".turn.assistant.done", timeout=60_000)
    assert page.inner_text(".turn.assistant").strip() and page.inner_text("#status") == "Done."

    # A refused upload says why instead of failing silently.
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an image at all" * 20)
    page.set_input_files("#file", str(bad))
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Image refused')")
    assert "not a PNG, JPEG, WebP or DICOM" in page.inner_text("#status")
    assert page.is_disabled("#generate")
    page.close()


@pytest.fixture(scope="module")
def scripted_server():
    # Answers "report WxH for <question>" from the image it was sent: what went with each request is on screen.
    from scripted import ScriptedEngine

    with serve_in_thread(create_app(ScriptedEngine(), ServeConfig(model_name="scripted"))) as url:
        yield url


def sized_png(path: Path, width: int, height: int, shade: int) -> Path:
    Image.new("RGB", (width, height), (shade, 255 - shade, 90)).save(path)
    return path


def test_a_follow_up_goes_with_the_image_on_screen_and_refusals_reset_the_page(browser, scripted_server, tmp_path):
    first = sized_png(tmp_path / "first.png", 160, 160, 40)
    second = sized_png(tmp_path / "second.png", 96, 64, 200)
    page = browser.new_page(viewport={"width": 1200, "height": 800}, bypass_csp=True)  # string predicates below
    page.set_default_timeout(20_000)
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else None)
    page.goto(scripted_server + "/")
    # Before any upload there is no image element on screen at all (no broken-image icon).
    assert page.locator("#preview").bounding_box() is None and not page.is_visible("#preview")

    def upload_and_ask(path: Path, question: str, turns: int) -> list[str]:
        page.set_input_files("#file", str(path))
        page.wait_for_function(f"document.getElementById('preview-caption').textContent.startsWith('{path.name}')")
        assert page.locator(".turn").count() == 0 and page.is_disabled("#followup")  # a fresh conversation
        page.click("#generate")
        page.wait_for_function("document.querySelectorAll('.turn.assistant.done').length === 1")
        page.fill("#followup", question)
        page.click("#send")
        page.wait_for_function(f"document.querySelectorAll('.turn.assistant.done').length === {turns}")
        return page.locator(".turn.assistant").all_inner_texts()

    assert upload_and_ask(first, "left side?", 2) == ["report 160x160 for 图片中的诊断结果是怎样? ",
                                                      "report 160x160 for left side? "]
    answers = upload_and_ask(second, "and now?", 2)
    assert answers == ["report 96x64 for 图片中的诊断结果是怎样? ", "report 96x64 for and now? "]
    # What the page sent with the follow-up: the second image (and only it), never the first.
    follow_up = sent[-1]["messages"]
    images = [p["image_url"]["url"] for m in follow_up if isinstance(m["content"], list) for p in m["content"]
              if p["type"] == "image_url"]
    assert images == [data_uri(second.read_bytes(), "image/png")]
    assert [m["role"] for m in follow_up] == ["user", "assistant", "user"]

    # A refused upload clears the preview and the conversation; nothing can be sent about the old image.
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"not an image" * 40)
    page.set_input_files("#file", str(bad))
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Image refused')")
    assert not page.is_visible("#preview") and page.get_attribute("#preview", "src") is None
    assert page.inner_text("#preview-caption") == "notes.png was refused."
    assert page.locator(".turn").count() == 0
    assert page.is_disabled("#generate") and page.is_disabled("#followup") and page.is_disabled("#send")
    # Another window for the same file is another image as shown: the conversation starts over too.
    upload_and_ask(second, "again?", 2)
    page.select_option("#window", "lung")
    page.wait_for_function("document.getElementById('status').textContent === ''")
    assert page.locator(".turn").count() == 0 and page.is_disabled("#followup")
    page.close()


def test_the_page_works_under_its_content_security_policy(browser, scripted_server, tmp_path):
    # No bypass here, and only selector waits (string predicates are eval, which the policy forbids).
    page = browser.new_page()
    page.set_default_timeout(20_000)
    violations = []
    page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
    response = page.goto(scripted_server + "/")
    assert "default-src 'none'" in response.headers["content-security-policy"]
    page.set_input_files("#file", str(sized_png(tmp_path / "p.png", 50, 40, 10)))
    page.wait_for_selector("#preview:not([hidden])")
    page.wait_for_selector("#generate:not([disabled])")
    assert page.inner_text("#preview-caption") == "p.png — 50×40 as the model sees it"  # the blob: image loaded
    page.click("#generate")
    page.wait_for_selector(".turn.assistant.done")
    assert page.inner_text(".turn.assistant") == "report 50x40 for 图片中的诊断结果是怎样? " and violations == []
    page.close()
