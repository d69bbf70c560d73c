"""The vLLM backend's launch command and its refusals (vLLM itself needs a GPU: bench/gpu/serve_smoke.sh)."""

import importlib.util
import json
import os
import sys

import pytest

from radscribe.cli import main
from radscribe.errors import RadscribeError
from radscribe.serve.vllm import (
    NO_DOMAIN,
    SPECIAL_TOKENS_WARNING,
    VllmOptions,
    check_vllm_available,
    vllm_command,
)


@pytest.fixture
def export_dir(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_vl_moe"}))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_command_carries_our_safe_defaults(export_dir):
    cmd = vllm_command(export_dir, "127.0.0.1", 8011, "rad", VllmOptions(max_model_len=4096, images_per_prompt=2))
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    args = dict(zip(cmd[3::2], cmd[4::2]))
    assert args["--model"] == str(export_dir) and args["--host"] == "127.0.0.1" and args["--port"] == "8011"
    assert args["--served-model-name"] == "rad" and args["--max-model-len"] == "4096"
    assert json.loads(args["--limit-mm-per-prompt"]) == {"image": 2, "video": 0}
    assert cmd[cmd.index("--allowed-media-domains") + 1] == NO_DOMAIN
    assert "--allowed-local-media-path" not in cmd and "--api-key" not in cmd and "--quantization" not in cmd


def test_allow_lists_and_4bit_exports_are_passed_on(export_dir, tmp_path):
    config = {"model_type": "qwen3_vl_moe", "quantization_config": {"quant_method": "bitsandbytes"}}
    (export_dir / "config.json").write_text(json.dumps(config))
    cmd = vllm_command(export_dir, "127.0.0.1", 8000, "rad", VllmOptions(), allow_hosts=["pacs.example.org"],
                       allow_folder=tmp_path)
    assert cmd[cmd.index("--allowed-media-domains") + 1] == "pacs.example.org"
    assert cmd[cmd.index("--allowed-local-media-path") + 1] == str(tmp_path.resolve())
    assert cmd[cmd.index("--quantization") + 1] == "bitsandbytes"


def test_adapters_are_refused_with_the_export_hint(export_dir, tmp_path):
    (export_dir / "adapter_config.json").write_text("{}")
    with pytest.raises(RadscribeError, match="radscribe export"):
        vllm_command(export_dir, "127.0.0.1", 8000, "rad", VllmOptions())
    assert main(["serve", "--backend", "vllm", "--model", str(tmp_path), "--adapter", str(tmp_path)]) == 2


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_missing_vllm_says_how_to_build_its_own_environment(export_dir, capsys):
    with pytest.raises(RadscribeError, match=r"pip install vllm==0\.33\.0.*--vllm-python"):
        check_vllm_available()
    assert main(["serve", "--backend", "vllm", "--model", str(export_dir)]) == 2
    out = capsys.readouterr()
    assert "its own environment" in out.err and len(out.err.strip().splitlines()) == 1
    # vLLM has no way to encode message text as plain text: the operator is told, every time.
    assert SPECIAL_TOKENS_WARNING in out.out and "<|im_start|>" in SPECIAL_TOKENS_WARNING


# --- every serve option reaches vLLM or is refused (a stub stands in for vLLM's entry point) ----------------------
STUB = '''import json, os, sys
with open(os.environ["VLLM_STUB_RECORD"], "w") as f:
    json.dump({"argv": sys.argv[1:], "env": {k: v for k, v in os.environ.items()
                                             if k.startswith(("VLLM_", "CUDA_VISIBLE"))}}, f)
'''


@pytest.fixture
def stub_vllm(tmp_path, monkeypatch):
    """A `vllm` package whose `python -m vllm.entrypoints.openai.api_server` records its arguments and environment;
    returns a function reading that record (None when vLLM was never started)."""
    import torch

    root = tmp_path / "stub"
    package = root / "vllm" / "entrypoints" / "openai"
    package.mkdir(parents=True)
    for folder in (root / "vllm", root / "vllm" / "entrypoints", package):
        (folder / "__init__.py").write_text("")
    (package / "api_server.py").write_text(STUB)
    record = tmp_path / "record.json"
    monkeypatch.syspath_prepend(str(root))  # found by check_vllm_available here, and by the child through PYTHONPATH
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("VLLM_STUB_RECORD", str(record))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # vLLM's own GPU check is the stub's business
    return lambda: json.loads(record.read_text()) if record.exists() else None


def _serve(export_dir, *flags):
    return main(["serve", "--backend", "vllm", "--model", str(export_dir), *flags])


def _args(argv):
    return {flag: argv[i + 1] for i, flag in enumerate(argv) if flag.startswith("--") and i + 1 < len(argv)}


def test_every_passable_option_reaches_vllm(export_dir, stub_vllm, tmp_path, monkeypatch):
    monkeypatch.setenv("RADSCRIBE_API_KEY", "k-vllm")
    assert _serve(export_dir, "--host", "127.0.0.2", "--port", "8123", "--model-name", "rad", "--dtype", "bf16",
                  "--device", "cuda:1", "--max-batch", "6", "--allow-host", "pacs.example.org", "--allow-folder",
                  str(tmp_path), "--fetch-timeout", "7", "--max-model-len", "4096", "--gpu-memory-utilization",
                  "0.5", "max_images=2") == 0
    seen = stub_vllm()
    args = _args(seen["argv"])
    assert args["--model"] == str(export_dir) and args["--host"] == "127.0.0.2" and args["--port"] == "8123"
    assert args["--served-model-name"] == "rad" and args["--dtype"] == "bfloat16"
    assert args["--max-num-seqs"] == "6" and json.loads(args["--limit-mm-per-prompt"]) == {"image": 2, "video": 0}
    assert args["--allowed-media-domains"] == "pacs.example.org"
    assert args["--allowed-local-media-path"] == str(tmp_path.resolve())
    assert args["--max-model-len"] == "4096" and args["--gpu-memory-utilization"] == "0.5"
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "1" and seen["env"]["VLLM_IMAGE_FETCH_TIMEOUT"] == "7"
    assert seen["env"]["VLLM_API_KEY"] == "k-vllm" and "k-vllm" not in seen["argv"]
    assert seen["env"]["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] == "0"


def test_defaults_reach_vllm_as_vllm_values(export_dir, stub_vllm, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert _serve(export_dir, "--device", "cuda:1") == 0
    seen = stub_vllm()
    args = _args(seen["argv"])
    assert args["--dtype"] == "auto" and args["--max-num-seqs"] == str(VllmOptions().max_num_seqs)
    assert json.loads(args["--limit-mm-per-prompt"]) == {"image": 4, "video": 0}
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "5"  # the second of the GPUs this process may see
    assert seen["env"]["VLLM_IMAGE_FETCH_TIMEOUT"] == "10"


REFUSALS = [
    (["--adapter", "runs/r"], "--adapter"),
    (["--quantize", "4bit"], "--quantize"),
    (["--device", "cpu"], "--device"),
    (["--allow-origin", "viewer.example.org"], "--allow-origin"),
    (["--max-body-mb", "16"], "--max-body-mb"),  # even at its default: asked for, so not silently dropped
    (["--max-tokens", "256"], "--max-tokens"),
    (["default_max_tokens=64"], "default_max_tokens"),
    (["--max-prompt-tokens", "4096"], "--max-prompt-tokens"),
    (["--max-image-mb", "5"], "--max-image-mb"),
    (["--max-pixels", "1000000"], "--max-pixels"),
    (["--batch-wait-ms", "2"], "--batch-wait-ms"),
    (["--max-queue", "8"], "--max-queue"),
    (["--max-queue-per-client", "2"], "--max-queue-per-client"),
    (["--max-queued-pixels", "99999999"], "--max-queued-pixels"),
    (["--max-in-flight", "10"], "--max-in-flight"),
    (["--header-timeout", "5"], "--header-timeout"),
    (["--body-timeout", "5"], "--body-timeout"),
    (["--fetch-timeout", "2.5"], "--fetch-timeout"),
    (["--max-batch", "4", "vllm.max_num_seqs=16"], "max_batch and vllm.max_num_seqs"),
]


@pytest.mark.parametrize("flags, named", REFUSALS, ids=[r[1] for r in REFUSALS])
def test_options_vllm_cannot_honour_are_refused_in_one_line_before_it_starts(export_dir, stub_vllm, capsys, flags,
                                                                               named):
    assert _serve(export_dir, *flags) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("radscribe serve: error: --backend vllm cannot honour ")
    assert f"{named} (" in lines[0] and lines[0].endswith("; drop them, or serve with --backend hf")
    assert stub_vllm() is None and SPECIAL_TOKENS_WARNING not in out.out  # refused before anything started


def test_several_refusals_are_named_together(export_dir, stub_vllm, capsys):
    assert _serve(export_dir, "--max-queue", "8", "--max-pixels", "100") == 2
    err = capsys.readouterr().err
    assert "--max-queue (vLLM has no bounded admission queue)" in err and "--max-pixels (" in err


def test_every_serve_option_is_classified_for_vllm():
    import dataclasses

    from radscribe.serve.api import ServeConfig
    from radscribe.serve.vllm import PASSED_ON, REFUSED

    def leaves(cls, prefix=""):
        for f in dataclasses.fields(cls):
            kind = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(kind):
                yield from leaves(type(kind), f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    fields = set(leaves(ServeConfig))
    assert not set(PASSED_ON) & set(REFUSED)
    assert set(PASSED_ON) | set(REFUSED) == fields  # a new serve option must say what vLLM does with it


def test_vllm_settings_are_refused_by_the_hf_backend(tmp_path, capsys):
    for flags in (["--max-model-len", "4096"], ["--gpu-memory-utilization", "0.5"], ["vllm.max_num_seqs=32"]):
        assert main(["serve", "--model", str(tmp_path), *flags]) == 2  # before any model is loaded
        assert capsys.readouterr().err.strip() == ("radscribe serve: error: --max-model-len, --gpu-memory-utilization "
                                                   "and vllm.* settings only apply with --backend vllm")


def _interpreter(path, script: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return path


def test_vllm_runs_from_its_own_environment(export_dir, stub_vllm, tmp_path):
    # vLLM 0.33 pins transformers<5.21: it lives in its own venv, and radscribe runs that venv's interpreter
    calls = tmp_path / "calls.log"
    python = _interpreter(tmp_path / "vllm-env" / "bin" / "python",
                          f'echo "$1 $2" >> {calls}\nexec {sys.executable} "$@"')
    assert _serve(export_dir, "--vllm-python", str(python)) == 0
    assert _args(stub_vllm()["argv"])["--model"] == str(export_dir)
    probe, launch = calls.read_text().splitlines()
    assert probe.startswith("-c import vllm") and launch == "-m vllm.entrypoints.openai.api_server"


def test_a_vllm_environment_that_cannot_run_it_is_one_line(tmp_path):
    bare = _interpreter(tmp_path / "bare", """echo "ModuleNotFoundError: No module named 'vllm'" >&2; exit 1""")
    with pytest.raises(RadscribeError, match=r"cannot import vllm \(ModuleNotFoundError: No module named 'vllm'\)"):
        check_vllm_available(bare)
    with pytest.raises(RadscribeError, match="no such interpreter.*pip install vllm==0.33.0"):
        check_vllm_available(tmp_path / "missing")


def test_no_vllm_extra_is_declared():
    # an extra pip cannot resolve against our transformers pin is worse than none (issue #10)
    import tomllib

    from scratch_venv import REPO_ROOT

    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "vllm" not in extras and not any("vllm" in r for reqs in extras.values() for r in reqs)
