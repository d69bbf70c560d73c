"""The llama.cpp backend: radscribe's API in front of `llama-server` running a `radscribe export --format gguf` folder.

Run as: radscribe serve --backend llamacpp --model GGUF_EXPORT [--port 8000] [--max-batch 4] [--device cpu]

llama-server answers OpenAI requests itself, but with other rules than ours: it fetches any http(s) image URL a
client names (no allow-list), parses special tokens typed in messages, and has no per-client queue or pixel
budget. So it is never the front. `radscribe serve` runs it as a private subprocess on a free loopback port, with
a random key of its own passed through the environment (`LLAMA_API_KEY`, not the command line), and serves our
own app (`radscribe.serve.api.create_app`) on --host/--port with `LlamaCppEngine` as its engine: every request
passes the same checks as with `--backend hf` (Host allow-list, API key, body and image limits, image URLs and
local paths refused unless allow-listed, prompt-token cap, bounded fair queue) and only then reaches llama-server,
through `POST /completion`, as token ids (text-only prompts, encoded by the export's own processor exactly as the
hf backend encodes them, so control tokens typed in messages stay text) or as text plus the decoded, processor-
sized image in base64 (image prompts). llama.cpp parses special tokens in that text, so an image prompt whose text
holds a control token (`<|im_start|>`, ...) is refused with 400 rather than passed on.

Every `radscribe serve` option either takes effect or is refused in one line (`check_options`): the API's limits
work as with --backend hf; --max-batch is also llama-server's number of parallel slots (`-np`), each with a
context of --max-prompt-tokens + --max-tokens; --device cpu (or unset) keeps every layer on the CPU, cuda / cuda:N
offloads all of them (`-ngl 999 --device CUDAn`, which needs a llama.cpp built with CUDA: $RADSCRIBE_LLAMACPP);
--adapter, --dtype and --quantize belong to the export (`radscribe export --format gguf --quantize ...`) and the
vLLM settings to --backend vllm, so they are refused.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from radscribe.errors import RadscribeError
from radscribe.serve.engine import Engine, Generation, image_placeholders, load_request_image, sampling_defaults

# llama-server's sampler set to what radscribe's engine does: temperature 0 = greedy; otherwise temperature and
# top_p only (no top-k, min-p or repetition penalty, which llama-server would otherwise apply by default).
_PLAIN_SAMPLING = {"top_k": 0, "min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0, "presence_penalty": 0.0,
                   "frequency_penalty": 0.0, "dry_multiplier": 0.0, "xtc_probability": 0.0}
SEED_LIMIT = 2 ** 32 - 1
"""llama.cpp's seeds are unsigned 32-bit, and 0xFFFFFFFF means "random"."""


@dataclass(frozen=True)
class GgufExport:
    """A `radscribe export --format gguf` folder: the text model, the vision projector and the processor files."""

    folder: Path
    model: Path
    mmproj: Path
    processor: Path


def check_gguf_export(folder: str | Path | None) -> GgufExport:
    from radscribe.interop import gguf

    if not folder:
        raise RadscribeError("--backend llamacpp needs --model pointing at a `radscribe export --format gguf` folder")
    path = Path(folder).expanduser()
    manifest_path = path / gguf.MANIFEST
    if not manifest_path.is_file():
        raise RadscribeError(f"{path} is not a GGUF export (no {gguf.MANIFEST}): run `radscribe export --format gguf "
                             f"--model BASE --adapter RUN OUT` and pass --model OUT")
    files = json.loads(manifest_path.read_text()).get("files", {})
    if "model" not in files or "mmproj" not in files:
        raise RadscribeError(f"{manifest_path} lists no model and mmproj file (a GGUF LoRA export? serve the merged "
                             "export: radscribe export --format gguf)")
    export = GgufExport(path, path / files["model"], path / files["mmproj"], path / gguf.PROCESSOR_DIR)
    for name in ("model", "mmproj", "processor"):
        if not getattr(export, name).exists():
            raise RadscribeError(f"{getattr(export, name)} is missing: export the folder again with this radscribe")
    return export


def check_options(cfg) -> None:
    """Refuse, in one line, every serve setting this backend cannot honour (the rest take effect)."""
    from radscribe.interop import llamacpp
    from radscribe.serve.vllm import VllmOptions

    if cfg.adapter:
        raise RadscribeError("--adapter: --backend llamacpp serves a GGUF export with the adapter merged in; run "
                             "`radscribe export --format gguf --model BASE --adapter RUN OUT` and pass --model OUT")
    if cfg.dtype != "auto":
        raise RadscribeError(f"--dtype {cfg.dtype}: a GGUF export's tensor types are fixed when it is written; choose "
                             "them with `radscribe export --format gguf --quantize f16|q8_0|q4_k_m`")
    if cfg.quantization is not None:
        raise RadscribeError(f"--quantize {cfg.quantization}: a GGUF export is quantised when it is written; use "
                             "`radscribe export --format gguf --quantize q4_k_m` and serve that folder")
    changed = [f"vllm.{k}" for k, v in vars(cfg.vllm).items() if v != getattr(VllmOptions(), k)]
    if changed:
        raise RadscribeError(f"{', '.join(changed)} only apply to --backend vllm (llama.cpp's context per slot is "
                             "--max-prompt-tokens + --max-tokens)")
    if (cfg.device or "cpu").startswith("cuda") and not os.environ.get(llamacpp.ENV_VAR):
        raise RadscribeError(f"--device {cfg.device}: the llama.cpp `radscribe llamacpp install` builds is CPU-only; "
                             f"set ${llamacpp.ENV_VAR} to a llama.cpp source folder built with -DGGML_CUDA=ON")
    if cfg.device not in (None, "cpu") and not cfg.device.startswith("cuda"):
        raise RadscribeError(f"--device {cfg.device!r}: use cpu, cuda or cuda:N")


def server_args(cfg) -> tuple[str, ...]:
    """llama-server's flags for `cfg` (beyond model, mmproj, host and port, which LlamaServer sets)."""
    device = cfg.device or "cpu"
    if device.startswith("cuda"):
        index = device.partition(":")[2] or "0"
        placement = ("-ngl", "999", "--device", f"CUDA{index}")
    else:
        placement = ("-ngl", "0", "--device", "none")
    # Our API has already checked every request; llama-server's own web page, slot file I/O and metrics stay off.
    return (*placement, "-np", str(cfg.max_batch), "--no-slots")


class LlamaCppEngine:
    """The engine `create_app` drives, generating on a running llama-server (radscribe.interop.llamacpp.LlamaServer).

    Prompt tokens, the processor's image size and the text encoding come from the export's processor/ folder,
    through the same code as radscribe's own engine."""

    def __init__(self, server, processor, generation_config: dict | None = None):
        self.server = server
        self.processor = processor
        self.defaults = sampling_defaults(generation_config or {})
        """What a request gets for the sampling fields it leaves unset, as with --backend hf."""
        self.tokenizer = processor.tokenizer
        self._special = sorted((t for t in self.tokenizer.all_special_tokens + [
            str(t) for t in self.tokenizer.added_tokens_decoder.values() if getattr(t, "special", False)] if t),
            key=len, reverse=True)

    prompt_tokens = Engine.prompt_tokens
    max_token_chars = Engine.max_token_chars
    resolve = Engine.resolve  # unset sampling fields from the model's generation_config.json, then checked

    # --- the two calls create_app makes ---------------------------------------------------------------------
    def complete(self, requests: list) -> list:
        """Answers in order; requests run concurrently in llama-server's parallel slots (-np = --max-batch)."""
        import concurrent.futures

        if len(requests) == 1:
            return [self._answered(requests[0])]
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            return list(pool.map(self._answered, requests))

    def stream(self, request) -> Iterator[str]:
        body = dict(self._body(request), stream=True)
        with self.server.stream("/completion", body) as events:
            for event in events:
                if event.get("content"):
                    yield event["content"]

    # --- internals ------------------------------------------------------------------------------------------
    def _answered(self, request):
        answer = self._complete(request)
        if request.answered is not None:  # each slot's answer goes out as it ends, as with --backend hf
            request.answered(answer)
        return answer

    def _complete(self, request):
        # streamed from llama-server even for a non-streaming answer: a client that goes away (request.cancel)
        # then closes the connection, which stops llama-server generating, as --backend hf stops
        parts, final = [], {}
        with self.server.stream("/completion", dict(self._body(request), stream=True)) as events:
            for event in events:
                parts.append(event.get("content") or "")
                if event.get("stop"):
                    final = event
                if request.cancel is not None and request.cancel.is_set():
                    return Generation(text="".join(parts), prompt_tokens=0, completion_tokens=len(parts),
                                      finish_reason="cancelled")
        # stop_type: "eos" (end-of-turn token), "word" (a stop string), "limit" (n_predict)
        finish = "length" if final.get("stop_type") == "limit" else "stop"
        return Generation(text="".join(parts), prompt_tokens=int(final.get("tokens_evaluated", 0)),
                          completion_tokens=int(final.get("tokens_predicted", 0)), finish_reason=finish)

    def _body(self, request) -> dict:
        request = self.resolve(request)
        if request.seed is not None and not 0 <= request.seed < SEED_LIMIT:
            raise RadscribeError(f"seed {request.seed}: --backend llamacpp takes seeds in [0, {SEED_LIMIT - 1}] "
                                 "(llama.cpp's are unsigned 32-bit)")
        body = {"prompt": self._prompt(request.messages), "n_predict": request.max_new_tokens,
                "cache_prompt": True, **_PLAIN_SAMPLING}
        if request.temperature == 0:
            body.update(temperature=0.0, top_k=1, top_p=1.0)
        else:
            body.update(temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                        repeat_penalty=request.repetition_penalty,
                        seed=secrets.randbelow(SEED_LIMIT) if request.seed is None else request.seed)
        return body

    def _prompt(self, messages: list[dict]):
        images = [p["image"] for m in messages if isinstance(m.get("content"), list)
                  for p in m["content"] if p.get("type") == "image"]
        if not images:
            # token ids, encoded as the hf backend encodes them: typed control tokens stay plain text
            return self.tokenizer.apply_chat_template(messages, chat_template=self.processor.chat_template,
                                                      add_generation_prompt=True, tokenize=True,
                                                      sanitize_control_tokens=True, return_dict=False)
        for m in messages:
            for p in m["content"] if isinstance(m.get("content"), list) else [{"text": m.get("content", "")}]:
                found = next((t for t in self._special if t in (p.get("text") or "")), None)
                if found:
                    from radscribe.serve.safety import RequestRejected

                    raise RequestRejected(f"a message holds the control token {found!r}: with an image, "
                                          "--backend llamacpp passes text that llama.cpp parses for special tokens, "
                                          "so it refuses it (remove it, or serve with --backend hf)", param="messages")
        rendered = self.tokenizer.apply_chat_template(image_placeholders(messages),
                                                      chat_template=self.processor.chat_template,
                                                      add_generation_prompt=True, tokenize=False)
        from radscribe.interop.gguf import vision_blocks_to_marker

        return {"prompt_string": vision_blocks_to_marker(rendered, len(images), self.server.media_marker),
                "multimodal_data": [base64.b64encode(_png(image)).decode() for image in images]}


def _png(image) -> bytes:
    buffer = io.BytesIO()
    load_request_image(image).save(buffer, format="PNG")
    return buffer.getvalue()


@contextlib.contextmanager
def running(cfg):
    """llama-server on the export in `cfg.model` and radscribe's app in front of it: yields the app (a context
    manager, so the subprocess ends with it)."""
    from radscribe.interop.llamacpp import LlamaServer
    from radscribe.model.load import load_processor
    from radscribe.serve.api import check_config, create_app

    check_options(cfg)
    check_config(cfg)
    export = check_gguf_export(cfg.model)
    processor = load_processor(export.processor)
    ctx = (cfg.max_prompt_tokens + cfg.max_tokens_limit) * cfg.max_batch  # llama-server splits -c over the slots
    with LlamaServer(export.model, mmproj=export.mmproj, ctx=ctx, extra=server_args(cfg),
                     api_key=secrets.token_urlsafe(24)) as server:
        config = export.processor / "generation_config.json"  # the model's own, carried into the export
        generation = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
        yield create_app(LlamaCppEngine(server, processor, generation), cfg)


def serve_llamacpp(cfg) -> None:
    """`radscribe serve --backend llamacpp`: check the options and the port, start llama-server, serve until
    interrupted."""
    import uvicorn

    from radscribe.serve.api import LOOPBACK_NAMES, bind, uvicorn_config

    check_options(cfg)
    check_gguf_export(cfg.model)
    sock = bind(cfg.host, cfg.port)
    if cfg.host not in LOOPBACK_NAMES and not cfg.api_key:
        print(f"radscribe serve: warning: binding {cfg.host} with no API key exposes the model to the network; "
              "set RADSCRIBE_API_KEY")
    with running(cfg) as app:
        print(f"radscribe serve: http://{cfg.host}:{cfg.port}/  (llama.cpp backend; API: /v1/chat/completions, "
              f"model id {cfg.model_name!r})", flush=True)
        uvicorn.Server(uvicorn_config(app, cfg)).run(sockets=[sock])
