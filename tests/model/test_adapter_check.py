"""An adapter on a base it was not trained on fails in one line naming both folders, before any weight is read.

Bases whose weight files are garbage (`unreadable_weights`) prove the "before": the check reads config.json, the
tokenizer and the adapter file's header only, so it must name the mismatch where loading the weights would fail.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_export import make_adapter

from radscribe.cli import main
from radscribe.config import config_from_args
from radscribe.errors import RadscribeError
from radscribe.model.adapter_check import (
    RECORD,
    base_identity,
    check_adapter,
    record_base,
)
from radscribe.model.load import load_model, load_processor
from radscribe.model.tiny import build_tiny_model
from radscribe.train import TrainConfig, train


def unreadable_weights(base, out):
    """A copy of `base` whose safetensors files hold no tensors: loading weights from it can only fail."""
    shutil.copytree(base, out)
    for shard in out.glob("*.safetensors"):
        shard.write_bytes(b"these bytes are not a safetensors file")
    return out


def recorded(base, adapter):
    record_base(base, load_processor(base).tokenizer, adapter)
    return adapter


def merged_in(model, base) -> bool:
    """Whether the loader merged an adapter into `model`: a LoRA-targeted weight differs from the base's."""
    weight = "model.language_model.layers.0.self_attn.q_proj.weight"
    plain, _ = load_model(base, device="cpu")
    return not torch.equal(model.state_dict()[weight], plain.state_dict()[weight])


def one_line(err: RadscribeError, *folders) -> str:
    message = str(err.value)
    assert "\n" not in message
    for folder in folders:
        assert str(folder) in message
    return message


@pytest.fixture(scope="module")
def adapters(models, tmp_path_factory):
    """arch -> an adapter (non-zero LoRA B, no record) made on the session's tiny base of that arch."""
    root = tmp_path_factory.mktemp("adapters")
    return {arch: make_adapter(base, root / arch, experts=False) for arch, base in models.items()}


def test_a_recorded_adapter_loads_on_its_base_wherever_the_base_lies(models, adapters, tmp_path):
    adapter = recorded(models["qwen3_vl"], shutil.copytree(adapters["qwen3_vl"], tmp_path / "adapter"))
    record = json.loads((adapter / RECORD).read_text())
    assert record["model_type"] == "qwen3_vl" and record["hidden_size"] == 64 and record["vision_hidden_size"] == 32
    assert record["model_dir"] == str(models["qwen3_vl"].resolve())
    moved = shutil.copytree(models["qwen3_vl"], tmp_path / "moved")
    config = json.loads((moved / "config.json").read_text())
    config["transformers_version"], config["text_config"]["dtype"] = "4.57.0", "bfloat16"  # storage, not identity
    (moved / "config.json").write_text(json.dumps(config))
    model, _ = load_model(moved, adapter=adapter, device="cpu")
    assert merged_in(model, moved)


def test_a_recorded_qwen2_5_vl_adapter_on_qwen3_vl_fails_in_one_line(models, adapters, tmp_path):
    adapter = recorded(models["qwen2_5_vl"], shutil.copytree(adapters["qwen2_5_vl"], tmp_path / "adapter"))
    base = unreadable_weights(models["qwen3_vl"], tmp_path / "base")
    with pytest.raises(RadscribeError) as err:
        load_model(base, adapter=adapter, device="cpu")
    message = one_line(err, adapter, base, models["qwen2_5_vl"].resolve())
    assert "was trained on another base" in message
    assert "model type qwen2_5_vl at train time, qwen3_vl here" in message
    assert "architectures Qwen2_5_VLForConditionalGeneration at train time" in message


def test_a_tiny_vocabulary_adapter_trained_here_fails_on_the_real_vocabulary_base(models, real_model_dir,
                                                                                 tiny_dataset, tmp_path):
    # `radscribe train` records its base; the real-layout base has the same widths but Qwen's 151k vocabulary
    cfg = config_from_args(TrainConfig, None, ["train.precision=fp32", "train.max_steps=1", "train.per_device_batch=2",
                                               "data.val_split=null", "data.max_samples=4"],
                           **{"model.path": str(models["qwen3_vl"]), "data.dataset": str(tiny_dataset),
                              "output.dir": str(tmp_path / "run")})
    run = train(cfg)
    record = json.loads((run / "adapter" / RECORD).read_text())
    assert {k: record[k] for k in base_identity(models["qwen3_vl"], load_processor(models["qwen3_vl"]).tokenizer)} \
        == base_identity(models["qwen3_vl"], load_processor(models["qwen3_vl"]).tokenizer)
    base = unreadable_weights(real_model_dir("qwen3_vl"), tmp_path / "real")
    vocab = json.loads((models["qwen3_vl"] / "config.json").read_text())["text_config"]["vocab_size"]
    with pytest.raises(RadscribeError) as err:
        load_model(base, adapter=run, device="cpu")
    message = one_line(err, run / "adapter", base)
    assert f"vocabulary size {vocab} at train time, 151936 here" in message
    assert "tokenizer vocabulary differs" in message and "text layers 2 at train time, 4 here" in message


def test_a_config_that_differs_only_in_its_fingerprint_names_config_json_and_the_way_out(models, adapters, tmp_path):
    adapter = recorded(models["qwen3_vl"], shutil.copytree(adapters["qwen3_vl"], tmp_path / "adapter"))
    base = unreadable_weights(models["qwen3_vl"], tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    config["text_config"]["rope_theta"] = 10_000  # same sizes, another model
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(RadscribeError) as err:
        load_model(base, adapter=adapter, device="cpu")
    message = one_line(err, adapter, base)
    assert "config.json differs" in message and f"delete {adapter / RECORD}" in message
    assert "model type" not in message and "vocabulary size" not in message


def test_an_unrecorded_adapter_of_another_hidden_size_fails_in_one_line(adapters, models, tmp_path):
    wide = build_tiny_model("qwen3_vl", tmp_path / "wide", seed=0, text_hidden=128)
    adapter = make_adapter(wide, tmp_path / "adapter", experts=False)
    base = unreadable_weights(models["qwen3_vl"], tmp_path / "base")
    with pytest.raises(RadscribeError) as err:
        load_model(base, adapter=adapter, device="cpu")
    message = one_line(err, adapter, base)
    assert "does not fit base" in message and "of other shapes" in message
    assert "in the adapter" in message and "[4, 128]" in message


def test_an_unrecorded_adapter_names_modules_the_base_lacks_or_needs(adapters, models, real_model_dir, tmp_path):
    # Qwen2.5-VL's vision blocks have an mlp.down_proj, Qwen3-VL's have linear_fc1/fc2
    base = unreadable_weights(models["qwen3_vl"], tmp_path / "base")
    with pytest.raises(RadscribeError) as err:
        check_adapter(base, adapters["qwen2_5_vl"])
    assert "for modules this base lacks (model.visual.blocks.0.mlp.down_proj" in one_line(err, adapters["qwen2_5_vl"],
                                                                                          base)
    # the real-layout base has 4 text layers where the tiny one has 2: layers 2 and 3 would get no LoRA weights
    real = unreadable_weights(real_model_dir("qwen3_vl"), tmp_path / "real")
    with pytest.raises(RadscribeError) as err:
        check_adapter(real, adapters["qwen3_vl"])
    message = one_line(err, adapters["qwen3_vl"], real)
    assert "need are not in the adapter (model.language_model.layers.2." in message


def test_an_unrecorded_adapter_of_matching_shapes_still_loads(adapters, models):
    model, _ = load_model(models["qwen3_vl"], adapter=adapters["qwen3_vl"], device="cpu")
    assert merged_in(model, models["qwen3_vl"])


def test_cli_and_resume_refuse_a_wrong_base_in_one_line(adapters, models, tiny_dataset, tmp_path, capsys):
    wide = build_tiny_model("qwen3_vl", tmp_path / "wide", seed=0, text_hidden=128)
    adapter = make_adapter(wide, tmp_path / "adapter", experts=False)
    capsys.readouterr()  # the progress bars of making it
    assert main(["export", "--model", str(models["qwen3_vl"]), "--adapter", str(adapter), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("radscribe export: error: adapter ")
    assert str(adapter) in err[0] and str(models["qwen3_vl"]) in err[0]

    # a run whose checkpoint was made on another base: --resume refuses before the Trainer loads it
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    shutil.copytree(adapter, checkpoint)
    (checkpoint / "trainer_state.json").write_text("{}")
    cfg = config_from_args(TrainConfig, None, ["train.precision=fp32", "data.val_split=null", "data.max_samples=4"],
                           **{"model.path": str(models["qwen3_vl"]), "data.dataset": str(tiny_dataset),
                              "output.dir": str(tmp_path / "run"), "output.resume": True})
    with pytest.raises(RadscribeError) as err:
        train(cfg)
    assert "does not fit base" in one_line(err, checkpoint, models["qwen3_vl"])


def test_resume_refuses_a_base_of_the_same_shapes_that_the_run_did_not_start_on(adapters, models, tiny_dataset,
                                                                               tmp_path):
    # the checkpoint's shapes fit both bases; the run's own record (written at its start) tells them apart
    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "checkpoint-2"
    shutil.copytree(adapters["qwen3_vl"], checkpoint)
    (checkpoint / "trainer_state.json").write_text("{}")
    record_base(models["qwen3_vl"], load_processor(models["qwen3_vl"]).tokenizer, run)
    other = shutil.copytree(models["qwen3_vl"], tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    config["text_config"]["rope_theta"] = 10_000
    (other / "config.json").write_text(json.dumps(config))
    check_adapter(other, checkpoint)  # by shapes alone it fits
    cfg = config_from_args(TrainConfig, None, ["train.precision=fp32", "data.val_split=null", "data.max_samples=4"],
                           **{"model.path": str(other), "data.dataset": str(tiny_dataset),
                              "output.dir": str(run), "output.resume": True})
    with pytest.raises(RadscribeError) as err:
        train(cfg)
    assert "config.json differs" in one_line(err, checkpoint, other)
