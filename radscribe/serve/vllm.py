"""The vLLM backend: launch vLLM's OpenAI-compatible server on a merged export (GPU only, vLLM's own environment).

Run as: radscribe serve --backend vllm --vllm-python VLLM_ENV/bin/python --model EXPORT [--port 8000]
        [--api-key KEY] [--max-model-len 8192]

vLLM runs in its own environment: vLLM 0.33 requires `transformers>=5.16.1,<5.21` and `torch==2.14.0`, radscribe
`transformers>=5.24,<5.25`, so the two cannot share one venv (there is no `radscribe[vllm]` extra). Build it once
(`python -m venv VLLM_ENV && VLLM_ENV/bin/pip install vllm==0.33.0`) and pass its interpreter as `--vllm-python`;
without the option, vLLM must be importable here. An export written by `radscribe export` is the base's published
files plus merged weights, so it loads with transformers 5.20 as the download does (tests/test_export_compat.py).

vLLM cannot apply a LoRA to the fused MoE experts of a VL model, so it serves the folder `radscribe export`
wrote (adapter merged, experts in the released layout), never base + adapter. vLLM is never imported here; the
server runs as `VLLM_PYTHON -m vllm.entrypoints.openai.api_server`, with our defaults carried over: loopback bind, the API key from the environment (not the command
line, where `ps` would show it), a per-prompt image limit, no video, and no media fetched from the network or
the disk unless allow-listed, and the same sampling defaults as radscribe's own backend: the export's
generation_config.json read by `radscribe.serve.engine.sampling_defaults` and passed explicitly
(`--generation-config vllm --override-generation-config {...}`: only those values, none of vLLM's own), so a
request that leaves temperature/top_p/top_k/repetition_penalty unset is answered alike by both backends. The
export's processor files carry the run's image policy (radscribe.model.pixels), which vLLM's processor reads.

Every `radscribe serve` option is either passed on to vLLM's equivalent (`PASSED_ON`) or, when it is set (given
on the command line or away from its default), refused in one line before anything starts (`REFUSED`): vLLM has
no body, image-byte, pixel or prompt-token caps, no admission queue and no Host allow-list of its own.

Special tokens: vLLM's chat endpoint renders the chat template to one string and tokenizes it whole, so
`<|im_start|>system ...` typed into a message becomes real control tokens and can forge turns. It has no option
that encodes message text as plain text (the proposals, vllm-project/vllm PRs #11691, #11713 and #31735, were
closed unmerged); radscribe's own backend does (engine.py, transformers' `sanitize_control_tokens`). So the vLLM backend prints `SPECIAL_TOKENS_WARNING` at start and is for trusted
clients only; put radscribe's own backend (`--backend hf`) in front of anyone else.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from radscribe.errors import RadscribeError

VLLM_VERSION = "0.33.0"
"""The vLLM release the launch arguments below were written for (its own environment; see the module docstring)."""
VLLM_ENV = (f"vLLM runs in its own environment (it pins transformers<5.21, radscribe needs 5.24): "
            f"`python -m venv VLLM_ENV && VLLM_ENV/bin/pip install vllm=={VLLM_VERSION}` on a Linux CUDA machine, "
            "then pass --vllm-python VLLM_ENV/bin/python")
# A domain that can never resolve (RFC 6761): vLLM fetches http(s) image URLs from any host unless
# --allowed-media-domains narrows it, so with no allow-listed host we narrow it to nothing.
NO_DOMAIN = "radscribe.invalid"
SPECIAL_TOKENS_WARNING = ("radscribe serve: warning: vLLM parses special tokens typed in messages (a user can write "
                          "<|im_start|>system and forge a turn); serve only trusted clients with --backend vllm")


DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
"""Our --dtype names -> vLLM's."""
PASSED_ON = {
    "model": "--model (a merged export)", "backend": "(selects this backend)", "host": "--host", "port": "--port",
    "api_key": "env VLLM_API_KEY", "model_name": "--served-model-name", "dtype": "--dtype",
    "device": "cuda / cuda:N (env CUDA_VISIBLE_DEVICES)", "max_batch": "--max-num-seqs",
    "max_images": "--limit-mm-per-prompt", "images.allow_folder": "--allowed-local-media-path",
    "images.allow_hosts": "--allowed-media-domains", "images.fetch_timeout_s": "env VLLM_IMAGE_FETCH_TIMEOUT",
    "vllm.max_model_len": "--max-model-len", "vllm.gpu_memory_utilization": "--gpu-memory-utilization",
    "vllm.max_num_seqs": "--max-num-seqs", "vllm.images_per_prompt": "--limit-mm-per-prompt",
    "vllm.python": "the interpreter that runs vLLM (its own environment)",
}
"""ServeConfig fields and what carries them into vLLM."""
REFUSED = {
    "adapter": ("--adapter", ("vLLM cannot put LoRA on fused MoE experts: run `radscribe export --model BASE "
                              "--adapter RUN OUT` and pass --model OUT")),
    "quantization": ("--quantize", ("quantize the export instead (`radscribe export --quantize 4bit`); its "
                                    "bitsandbytes config is passed on")),
    "allow_origins": ("--allow-origin", "vLLM checks no Host or Origin header"),
    "max_body_bytes": ("--max-body-mb", "vLLM has no request body limit"),
    "max_tokens_limit": ("--max-tokens", "vLLM bounds max_tokens only by --max-model-len"),
    "default_max_tokens": ("default_max_tokens", "vLLM's default max_tokens is what --max-model-len leaves"),
    "max_prompt_tokens": ("--max-prompt-tokens", "vLLM bounds prompts only by --max-model-len"),
    "images.max_image_bytes": ("--max-image-mb", "vLLM has no encoded-image size limit"),
    "images.max_pixels": ("--max-pixels", "vLLM has no image pixel limit"),
    "batch_wait_ms": ("--batch-wait-ms", "vLLM batches continuously, with no wait"),
    "max_queue": ("--max-queue", "vLLM has no bounded admission queue"),
    "max_queue_per_client": ("--max-queue-per-client", "vLLM has no per-client queue share"),
    "max_queued_pixels": ("--max-queued-pixels", "vLLM has no decoded-pixel budget"),
    "max_in_flight": ("--max-in-flight", "vLLM has no cap on requests in flight"),
    "header_timeout_s": ("--header-timeout", "vLLM's HTTP server has no header deadline"),
    "body_timeout_s": ("--body-timeout", "vLLM's HTTP server has no body deadline"),
    "client_mb_per_s": ("--client-mb-per-s", "vLLM has no per-client rate limit"),
    "client_pixels_per_s": ("--client-pixels-per-s", "vLLM has no per-client rate limit"),
}
"""ServeConfig fields vLLM has no equivalent for: (flag, why), refused when set."""
TWINS = {"max_batch": "vllm.max_num_seqs", "max_images": "vllm.images_per_prompt"}
"""A serve option that, when set, replaces its vLLM-section twin (the twin's default is vLLM's own)."""


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
    python: Path | None = None
    """The interpreter of vLLM's own environment (VLLM_ENV/bin/python); None = this one, if vLLM is installed here."""


def vllm_launch(cfg, given: set[str] | frozenset = frozenset()) -> tuple[list[str], dict[str, str]]:
    """The vLLM command line and the environment variables it needs for a ServeConfig, every option passed on
    (`PASSED_ON`) or refused (`REFUSED`) in one RadscribeError. `given`: dotted fields set on the command line."""
    from radscribe.serve.api import ServeConfig

    default = ServeConfig()

    def value(cfg_, field):
        for part in field.split("."):
            cfg_ = getattr(cfg_, part)
        return cfg_

    def requested(field: str) -> bool:
        return field in given or value(cfg, field) != value(default, field)

    if cfg.model is None or cfg.model == "":
        raise RadscribeError("--backend vllm needs --model pointing at a `radscribe export` folder")
    refused = [(flag, why) for field, (flag, why) in REFUSED.items() if requested(field)]
    env = {}
    device = cfg.device or "cuda"
    if device == "cuda":
        pass
    elif device.startswith("cuda:") and device[5:].isdigit():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [d.strip() for d in visible.split(",")] if visible else None
        index = int(device[5:])
        if ids is not None and index >= len(ids):
            raise RadscribeError(f"--device {device}: CUDA_VISIBLE_DEVICES={visible} shows only {len(ids)} GPU(s)")
        env["CUDA_VISIBLE_DEVICES"] = ids[index] if ids is not None else str(index)
    else:
        refused.append(("--device", f"vLLM runs on a CUDA GPU, not {device!r} (on CPU use --backend hf)"))
    options = cfg.vllm
    for field, twin in TWINS.items():
        if requested(field):
            if requested(twin) and value(cfg, field) != value(cfg, twin):
                why = f"both set vLLM's {PASSED_ON[field]}, to {value(cfg, field)} and {value(cfg, twin)}: set one"
                refused.append((f"{field} and {twin}", why))
            options = dataclasses.replace(options, **{twin.split(".")[1]: value(cfg, field)})
    timeout = cfg.images.fetch_timeout_s
    if timeout != int(timeout):
        refused.append(("--fetch-timeout", f"vLLM takes whole seconds (VLLM_IMAGE_FETCH_TIMEOUT), not {timeout:g}"))
    if refused:
        raise RadscribeError("--backend vllm cannot honour " + "; ".join(f"{flag} ({why})" for flag, why in refused)
                             + "; drop them, or serve with --backend hf")
    env["VLLM_IMAGE_FETCH_TIMEOUT"] = str(int(timeout))
    cmd = vllm_command(cfg.model, cfg.host, cfg.port, cfg.model_name, options, cfg.images.allow_hosts,
                       cfg.images.allow_folder, extra=["--dtype", DTYPES[cfg.dtype]])
    return cmd, env


def vllm_command(export_dir: str | Path, host: str, port: int, model_name: str, options: VllmOptions,
                 allow_hosts: list[str] = (), allow_folder: str | Path | None = None,
                 extra: list[str] = ()) -> list[str]:
    """The command line that starts vLLM's OpenAI server on `export_dir` (checked to be a merged export)."""
    folder = check_export(export_dir)
    cmd = [str(options.python or sys.executable), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
           "--served-model-name", model_name, "--host", host, "--port", str(port),
           "--max-model-len", str(options.max_model_len),
           "--gpu-memory-utilization", str(options.gpu_memory_utilization),
           "--max-num-seqs", str(options.max_num_seqs),
           "--limit-mm-per-prompt", json.dumps({"image": options.images_per_prompt, "video": 0}),
           "--allowed-media-domains", *(list(allow_hosts) or [NO_DOMAIN])]
    if allow_folder is not None:
        cmd += ["--allowed-local-media-path", str(Path(allow_folder).resolve())]
    cmd += ["--generation-config", "vllm", "--override-generation-config",
            json.dumps(export_sampling_defaults(folder).as_dict())]
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("quantization_config", {}).get("quant_method") == "bitsandbytes":
        cmd += ["--quantization", "bitsandbytes"]
    return cmd + list(extra)


def export_sampling_defaults(folder: Path):
    """The sampling defaults of a model folder: its generation_config.json, as radscribe's engine reads it."""
    from radscribe.serve.engine import sampling_defaults

    path = folder / "generation_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError as err:
        raise RadscribeError(f"{path} is not valid JSON ({err.msg}, line {err.lineno})") from None
    return sampling_defaults(config)


def check_export(export_dir: str | Path) -> Path:
    """`export_dir` must be a standalone model folder, not a base model with an adapter beside it."""
    from radscribe.model.load import check_model_dir

    folder = check_model_dir(export_dir)
    if (folder / "adapter_config.json").is_file() or (folder / "adapter").is_dir():
        raise RadscribeError(f"{folder} is an adapter, not a merged model: vLLM cannot serve LoRA on the fused "
                             "MoE experts of a VL model; run `radscribe export --model BASE --adapter RUN OUT` "
                             "and serve OUT")
    return folder


def check_vllm_available(python: str | Path | None = None) -> str | None:
    """vLLM importable by `python` (vLLM's own environment; None = this one) and a CUDA GPU visible, else a
    RadscribeError saying what to do. Returns vLLM's version (None when it does not say: a source checkout)."""
    if python is None:
        if importlib.util.find_spec("vllm") is None:
            raise RadscribeError(f"--backend vllm: vLLM is not installed here; {VLLM_ENV}; on CPU use --backend hf")
        try:
            version = importlib.metadata.version("vllm")
        except importlib.metadata.PackageNotFoundError:
            version = None
    else:
        if not Path(python).is_file():
            raise RadscribeError(f"--vllm-python {python}: no such interpreter; {VLLM_ENV}")
        probe = subprocess.run([str(python), "-c", "import vllm; print(getattr(vllm, '__version__', ''))"],
                               capture_output=True, text=True, timeout=600, check=False)
        if probe.returncode != 0:
            last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
            raise RadscribeError(f"--vllm-python {python} cannot import vllm ({last}); {VLLM_ENV}")
        version = probe.stdout.strip() or None
    import torch

    if not torch.cuda.is_available():
        raise RadscribeError("--backend vllm needs a CUDA GPU and none is visible; on CPU use --backend hf")
    return version


def serve_vllm(cfg, given: set[str] | frozenset = frozenset()) -> int:
    """Run vLLM's server for a ServeConfig in the foreground until it exits; returns its exit code."""
    cmd, extra_env = vllm_launch(cfg, given)
    print(SPECIAL_TOKENS_WARNING, flush=True)
    version = check_vllm_available(cfg.vllm.python)
    if version is not None and version != VLLM_VERSION:
        print(f"radscribe serve: warning: vLLM {version}, not {VLLM_VERSION} (the release these arguments were "
              "written for)", flush=True)
    env = dict(os.environ, VLLM_MEDIA_URL_ALLOW_REDIRECTS="0", **extra_env)
    if cfg.api_key:
        env["VLLM_API_KEY"] = cfg.api_key  # vLLM reads it; a --api-key argument would be visible in `ps`
    print(f"radscribe serve: starting vLLM on http://{cfg.host}:{cfg.port}/v1 (model id {cfg.model_name!r})",
          flush=True)
    return subprocess.call(cmd, env=env)
