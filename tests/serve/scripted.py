"""A scripted stand-in for the engine, and request helpers, shared by the serve tests (HTTP layer, web page)."""

import io
import time
import weakref

import httpx
from PIL import Image

from radscribe.errors import RadscribeError
from radscribe.serve.engine import Generation


def png(size=(32, 24), mode="RGB", color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 0).save(buf, format="PNG")
    return buf.getvalue()


def ct_small() -> bytes:
    from pydicom.data import get_testdata_file

    return open(get_testdata_file("CT_small.dcm", download=False), "rb").read()


class ScriptedEngine:
    """Answers from what it was given: the size of each image and the last user text; records every call."""

    def __init__(self, delay_s=0.0, keep=True):
        self.delay_s = delay_s
        self.keep = keep  # False: record only weak references (the tests of what the server lets go of)
        self.batches: list[int] = []
        self.images: list = []
        self.requests = []

    def _answer(self, request):
        sizes, text = [], ""
        for m in request.messages:
            for part in m["content"]:
                if part["type"] == "image":
                    self.images.append(part["image"] if self.keep else weakref.ref(part["image"]))
                    sizes.append("x".join(map(str, part["image"].size)))
                elif m["role"] == "user":
                    text = part["text"]
        return f"report {' '.join(sizes) or 'no-image'} for {text}"

    def generate(self, requests):
        self.batches.append(len(requests))
        self.requests.extend(requests if self.keep else [weakref.ref(r) for r in requests])
        time.sleep(self.delay_s)
        return [self._answer(r) for r in requests]

    def complete(self, requests):
        return [Generation(text, prompt_tokens=7, completion_tokens=len(text.split()), finish_reason="stop")
                for text in self.generate(requests)]

    def stream(self, request):
        self.requests.append(request if self.keep else weakref.ref(request))
        for word in self._answer(request).split(" "):
            yield word + " "

    max_token_chars = 4

    def prompt_tokens(self, messages, image_sizes):
        """Words of text plus one token per 32x32 block of each image (for the admission tests)."""
        words = sum(len(p["text"].split()) for m in messages for p in m["content"] if p["type"] == "text")
        for width, height in image_sizes:
            if max(width, height) > 200 * min(width, height):
                raise RadscribeError(f"a {width}x{height} image cannot be processed: aspect ratio over 200")
        return words + sum(max(1, (w // 32) * (h // 32)) for w, h in image_sizes)


def user(text, *images, window=None):
    parts = [{"type": "image_url", "image_url": {"url": url, **({"window": window} if window else {})}}
             for url in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}



def healthy(url):
    """The server still answers, and still generates."""
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    reply = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", "messages": [user("ping")]})
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == "report no-image for ping"


def allowed_folder(tmp_path):
    """tmp_path/images/ok.png (12x8) inside the folder to allow, tmp_path/secret.png (13x9) outside it."""
    allowed = tmp_path / "images"
    allowed.mkdir()
    (allowed / "ok.png").write_bytes(png((12, 8)))
    (tmp_path / "secret.png").write_bytes(png((13, 9)))
    return allowed
