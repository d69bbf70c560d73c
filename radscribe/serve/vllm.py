"""The vLLM backend: launch vLLM's OpenAI-compatible server on a merged export (GPU only, optional extra).

Run as: radscribe serve --backend vllm --model EXPORT [--port 8000] [--api-key KEY] [--max-model-len 8192]

vLLM cannot apply a LoRA to the fused MoE experts of a VL model, so it serves the folder `radscribe export`
wrote (adapter merged, experts in the released layout), never base + adapter. vLLM is imported only here and
only to check it is installed; the server runs as `python -m vllm.entrypoints.openai.api_server` in the same
environment, with our defaults carried over: loopback bind, the API key from the environment (not the command
line, where `ps` would show it), a per-prompt image limit, no video, and no media fetched from the network or
the disk unless allow-listed.

Special tokens: vLLM's chat endpoint renders the chat template to one string and tokenizes it whole, so
`<|im_start|>system ...` typed into a message becomes real control tokens and can forge turns. It has no option
that encodes message text as plain text (the proposals, vllm-project/vllm PRs #11691, #11713 and #31735, were
closed unmerged); radscribe's own backend does (engine.py, transformers' `sanitize_control_tokens`). So the vLLM backend prints `SPECIAL_TOKENS_WARNING` at start and is for trusted
clients only; put radscribe's own backend (`--backend hf`) in front of anyone else.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from radscribe.errors import RadscribeError

VLLM_EXTRA = "pip install 'radscribe[vllm]' (Linux with a CUDA GPU)"
# A domain that can never resolve (RFC 6761): vLLM fetches http(s) image URLs from any host unless
# --allowed-media-domains narrows it, so with no allow-listed host we narrow it to nothing.
NO_DOMAIN = "radscribe.invalid"
SPECIAL_TOKENS_WARNING = ("radscribe serve: warning: vLLM parses special tokens typed in messages (a user can write "
                          "<|im_start|>system and forge a turn); serve only trusted clients with --backend vllm")


@dataclass
class VllmOptions:
    """vLLM settings that matter for a VL report model; the rest is vLLM's defaults."""

    max_model_len: int = 8192
    """Context length: a 1024x1024 image is ~1,300 tokens for Qwen3-VL (patch 16, merge 2), plus the report."""
    gpu_memory_utilization: float = 0.90
    """Share of GPU memory vLLM may take (weights + KV cache)."""
    max_num_seqs: int = 32
    """Most sequences in one decoding batch."""
    images_per_prompt: int = 4
    """--limit-mm-per-prompt image count (video is always 0)."""


def vllm_command(export_dir: str | Path, host: str, port: int, model_name: str, options: VllmOptions,
                 allow_hosts: list[str] = (), allow_folder: str | Path | None = None) -> list[str]:
    """The command line that starts vLLM's OpenAI server on `export_dir` (checked to be a merged export)."""
    folder = check_export(export_dir)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
           "--served-model-name", model_name, "--host", host, "--port", str(port),
           "--max-model-len", str(options.max_model_len),
           "--gpu-memory-utilization", str(options.gpu_memory_utilization),
           "--max-num-seqs", str(options.max_num_seqs),
           "--limit-mm-per-prompt", json.dumps({"image": options.images_per_prompt, "video": 0}),
           "--allowed-media-domains", *(list(allow_hosts) or [NO_DOMAIN])]
    if allow_folder is not None:
        cmd += ["--allowed-local-media-path", str(Path(allow_folder).resolve())]
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("quantization_config", {}).get("quant_method") == "bitsandbytes":
        cmd += ["--quantization", "bitsandbytes"]
    return cmd


def check_export(export_dir: str | Path) -> Path:
    """`export_dir` must be a standalone model folder, not a base model with an adapter beside it."""
    from radscribe.model.load import check_model_dir

    folder = check_model_dir(export_dir)
    if (folder / "adapter_config.json").is_file() or (folder / "adapter").is_dir():
        raise RadscribeError(f"{folder} is an adapter, not a merged model: vLLM cannot serve LoRA on the fused "
                             "MoE experts of a VL model; run `radscribe export --model BASE --adapter RUN OUT` "
                             "and serve OUT")
    return folder


def check_vllm_available() -> None:
    """vLLM installed and a CUDA GPU visible, else a RadscribeError saying what to do."""
    if importlib.util.find_spec("vllm") is None:
        raise RadscribeError(f"--backend vllm needs vLLM: {VLLM_EXTRA}; on CPU use --backend hf")
    import torch

    if not torch.cuda.is_available():
        raise RadscribeError("--backend vllm needs a CUDA GPU and none is visible; on CPU use --backend hf")


def serve_vllm(export_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, model_name: str = "radscribe",
               api_key: str | None = None, options: VllmOptions | None = None, allow_hosts: list[str] = (),
               allow_folder: str | Path | None = None) -> int:
    """Run vLLM's server in the foreground until it exits; returns its exit code."""
    if export_dir is None:
        raise RadscribeError("--backend vllm needs --model pointing at a `radscribe export` folder")
    cmd = vllm_command(export_dir, host, port, model_name, options or VllmOptions(), allow_hosts, allow_folder)
    print(SPECIAL_TOKENS_WARNING, flush=True)
    check_vllm_available()
    env = dict(os.environ, VLLM_MEDIA_URL_ALLOW_REDIRECTS="0")
    if api_key:
        env["VLLM_API_KEY"] = api_key  # vLLM reads it; a --api-key argument would be visible in `ps`
    print(f"radscribe serve: starting vLLM on http://{host}:{port}/v1 (model id {model_name!r})", flush=True)
    return subprocess.call(cmd, env=env)
