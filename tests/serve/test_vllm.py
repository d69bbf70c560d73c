"""The vLLM backend's launch command and its refusals (vLLM itself needs a GPU: bench/gpu/serve_smoke.sh)."""

import importlib.util
import json

import pytest

from radscribe.cli import main
from radscribe.errors import RadscribeError
from radscribe.serve.vllm import (NO_DOMAIN, SPECIAL_TOKENS_WARNING, VllmOptions, check_vllm_available,
                                  vllm_command)


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
def test_missing_vllm_names_the_extra(export_dir, capsys):
    with pytest.raises(RadscribeError, match=r"radscribe\[vllm\]"):
        check_vllm_available()
    assert main(["serve", "--backend", "vllm", "--model", str(export_dir)]) == 2
    out = capsys.readouterr()
    assert "radscribe[vllm]" in out.err
    # vLLM has no way to encode message text as plain text: the operator is told, every time.
    assert SPECIAL_TOKENS_WARNING in out.out and "<|im_start|>" in SPECIAL_TOKENS_WARNING
