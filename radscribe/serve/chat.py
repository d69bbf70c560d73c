"""Terminal chat: stream a report for one image (PNG/JPEG/WebP, DICOM, NIfTI), then take follow-up questions.

Run as: radscribe chat --model BASE [--adapter RUN] --image FILE [--window lung] [--prompt "…"] [--interactive]

The image is decoded once by the one image loader (DICOM/NIfTI windowed with `--window`) and stays in the first
user turn; every follow-up is a new user turn after the previous answers, so the model sees the whole
conversation, as the API and the web page do. Generation goes through `radscribe.serve.engine.Engine.stream`, with
the model's generation_config.json sampling defaults unless --temperature / --top-p / --top-k say otherwise
(--temperature 0 is greedy), and the run's image policy (radscribe.model.pixels).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, TextIO

from radscribe.errors import RadscribeError

DEFAULT_PROMPT = "图片中的诊断结果是怎样?"
NOTICE = "Research use only — not a diagnosis."
QUIT_WORDS = {"", "exit", "quit", ":q"}


def chat(model: str, image: str, adapter: str | None = None, prompt: str = DEFAULT_PROMPT,
         window: str | None = None, interactive: bool = False, max_new_tokens: int = 512,
         temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
         seed: int | None = None, dtype: str = "auto", device: str | None = None) -> list[dict]:
    """Load the engine and run one chat session on stdin/stdout; returns the transcript. Sampling settings left
    None are the model's generation_config.json."""
    from radscribe.serve.engine import Engine

    picture = open_image(image, window)
    engine = Engine.from_pretrained(model, adapter=adapter, dtype=dtype, device=device)
    return run_chat(engine, picture, prompt, interactive=interactive, max_new_tokens=max_new_tokens,
                    sampling={"temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed})


def open_image(path: str, window: str | None = None):
    """The image file as the model will see it (RGB), through `radscribe.data.imaging.load_image`."""
    from radscribe.data.imaging import load_image

    if Path(path).is_dir():
        raise RadscribeError(f"--image {path} is a folder; pass one image file (PNG/JPEG/WebP, DICOM or NIfTI)")
    if not Path(path).is_file():
        raise RadscribeError(f"--image {path} does not exist")
    return load_image(path, window=window)


def run_chat(engine, image, prompt: str = DEFAULT_PROMPT, interactive: bool = False, max_new_tokens: int = 512,
             sampling: dict | None = None, read: Callable[[str], str] = input,
             out: TextIO | None = None) -> list[dict]:
    """Stream the answer to `prompt` about `image`, then (interactive) answer follow-ups until an empty line/EOF.
    `sampling`: Request fields (temperature, top_p, top_k, seed); absent or None = the model's defaults."""
    from radscribe.serve.engine import Request

    out = out or sys.stdout
    print(NOTICE, file=out)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
    while True:
        answer = []
        for delta in engine.stream(Request(messages=messages, max_new_tokens=max_new_tokens, **(sampling or {}))):
            answer.append(delta)
            out.write(delta)
            out.flush()
        out.write("\n")
        messages.append({"role": "assistant", "content": [{"type": "text", "text": "".join(answer)}]})
        if not interactive:
            return messages
        try:
            question = read("> ").strip()
        except EOFError:
            question = ""
        if question.lower() in QUIT_WORDS:
            return messages
        messages.append({"role": "user", "content": [{"type": "text", "text": question}]})
