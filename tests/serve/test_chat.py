"""`radscribe chat`: the report streams to the terminal; follow-ups keep the image and the history."""

import io

import numpy as np
import pytest
from PIL import Image

from radscribe.cli import main
from radscribe.data.imaging import load_image
from radscribe.serve.chat import NOTICE, open_image, run_chat
from radscribe.serve.engine import Request


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from radscribe.model.tiny import build_tiny_model
    from radscribe.serve.engine import Engine

    model_dir = build_tiny_model("qwen3_vl", tmp_path_factory.mktemp("tiny") / "model", seed=0)
    return model_dir, Engine.from_pretrained(model_dir, device="cpu")


@pytest.fixture
def png_file(tmp_path):
    path = tmp_path / "scan.png"
    Image.fromarray((np.random.RandomState(3).rand(64, 64, 3) * 255).astype("uint8")).save(path)
    return path


class CountingStream:
    """Wraps the engine to record the deltas it streamed and the requests it got."""

    def __init__(self, engine):
        self.engine, self.requests, self.deltas = engine, [], []

    def stream(self, request):
        self.requests.append(request)
        for delta in self.engine.stream(request):
            self.deltas.append(delta)
            yield delta


def test_streams_the_report_then_answers_follow_ups_about_the_same_image(tiny, png_file):
    _, engine = tiny
    image = open_image(str(png_file))
    wrapped, out = CountingStream(engine), io.StringIO()
    questions = iter(["Where is the lesion?", ""])
    transcript = run_chat(wrapped, image, "图片中的诊断结果是怎样?", interactive=True, max_new_tokens=10,
                          read=lambda _prompt: next(questions), out=out)

    assert [m["role"] for m in transcript] == ["user", "assistant", "user", "assistant"]
    first = transcript[1]["content"][0]["text"]
    second = transcript[3]["content"][0]["text"]
    assert out.getvalue() == f"{NOTICE}\n{first}\n{second}\n"
    assert len(wrapped.deltas) > 2  # it arrived in pieces, not as one block
    # The first answer is the greedy answer to the first question...
    expected = engine.generate([Request(messages=transcript[:1], max_new_tokens=10)])[0]
    assert first == expected
    # ...and the follow-up request carried the image, the first answer and the new question.
    follow_up = wrapped.requests[1].messages
    assert follow_up[0]["content"][0]["image"] is image
    assert follow_up[1]["content"][0]["text"] == first and follow_up[2]["content"][0]["text"] == "Where is the lesion?"


def test_end_of_input_ends_the_session(tiny, png_file):
    _, engine = tiny

    def eof(_prompt):
        raise EOFError

    transcript = run_chat(engine, open_image(str(png_file)), interactive=True, max_new_tokens=4, read=eof,
                          out=io.StringIO())
    assert len(transcript) == 2


def test_dicom_is_windowed_by_the_one_loader():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm", download=False)
    lung, bone = open_image(path, "lung"), open_image(path, "bone")
    assert lung.tobytes() == load_image(path, window="lung").tobytes() and lung.tobytes() != bone.tobytes()


def test_cli_chat_prints_the_report(tiny, png_file, capsys):
    model_dir, engine = tiny
    assert main(["chat", "--model", str(model_dir), "--image", str(png_file), "--max-new-tokens", "8",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    request = Request(messages=[{"role": "user", "content": [{"type": "image", "image": open_image(str(png_file))},
                                                             {"type": "text", "text": "图片中的诊断结果是怎样?"}]}],
                      max_new_tokens=8)
    assert printed.endswith(NOTICE + "\n" + engine.generate([request])[0] + "\n")


def test_cli_chat_missing_image_is_one_line(tiny, tmp_path, capsys):
    model_dir, _ = tiny
    assert main(["chat", "--model", str(model_dir), "--image", str(tmp_path / "none.png")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"radscribe chat: error: --image {tmp_path / 'none.png'} does not exist"


def test_cli_chat_image_folder_is_one_line(tmp_path, capsys):
    # The image is checked before the model loads, so no model is needed to see the message.
    assert main(["chat", "--model", str(tmp_path / "unused"), "--image", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"radscribe chat: error: --image {tmp_path} is a folder; pass one image file (PNG/JPEG/WebP, DICOM or NIfTI)"]
