"""The `radscribe` command line: one config loader for every stage, help generated from the field docstrings."""

from __future__ import annotations

import importlib.metadata

import pytest

from radscribe.cli import main, stage_config
from radscribe.config import describe, format_value
from radscribe.errors import RadscribeError


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_train_help_lists_every_field_with_its_default_and_doc(capsys):
    from radscribe.train import TrainConfig

    out = _help(capsys, "train")
    lines = out.splitlines()
    for entry in describe(TrainConfig):
        if entry.section:
            assert f"{entry.name}: {entry.line}" in lines  # section header with its docstring
            continue
        row = next(line for line in lines if line.split()[:1] == [entry.name])
        assert row.split()[1] == format_value(entry.default) and row.endswith(entry.line)
    assert "  train.lr                      5e-05    Peak learning rate (AdamW)." in lines
    assert "train.max_steps=20 data.max_samples=64" in out  # how to make a short run


@pytest.mark.parametrize("stage", ["eval", "audit", "prepare", "serve", "export", "synth", "demo", "train"])
def test_every_option_has_a_description_and_a_default(stage, capsys):
    from radscribe.cli import build_parser

    sub = build_parser(stage)._subparsers._group_actions[0].choices[stage]
    _help(capsys, stage)  # renders without error
    for action in sub._actions:
        if action.dest in ("help", "config", "overrides") or action.help is None:
            continue
        if action.option_strings in (["--emit-llamafactory"], ["--dry-run"], ["--fresh"]):
            continue  # actions, not settings
        assert len(action.help) > 20 and ("default" in action.help or "required" in action.help), action.dest


def test_version_comes_from_the_package_metadata(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"radscribe {importlib.metadata.version('radscribe')}"


@pytest.mark.parametrize("argv, field, yaml_value, override, flag, expected", [
    # stage, the field under test, its YAML value, an override, the stage's flag for it, what wins (the flag)
    (["prepare", "in.parquet"], "val_ratio", 0.3, "val_ratio=0.2", ["--val-ratio", "0.25"], 0.25),
    (["train"], "train.lr", 0.1, "train.lr=0.01", [], 0.01),
    (["eval", "--model", "m", "--data", "d"], "batch_size", 2, "batch_size=3", ["--batch-size", "4"], 4),
    (["audit", "ds"], "near_threshold", 1, "near_threshold=2", ["--near-threshold", "3"], 3),
    (["serve"], "port", 9000, "port=9001", ["--port", "9002"], 9002),
    (["export", "out", "--model", "m", "--adapter", "a"], "dtype", "fp16", "dtype=bf16", ["--dtype", "fp32"],
     "fp32"),
    (["synth"], "n", 10, "n=20", ["--n", "30"], 30),
    (["demo"], "lang", "en", "lang=zh", ["--lang", "en"], "en"),
])
def test_every_stage_takes_config_overrides_then_flags(argv, field, yaml_value, override, flag, expected, tmp_path):
    def get(cfg):
        for part in field.split("."):
            cfg = getattr(cfg, part)
        return cfg

    section, _, name = field.rpartition(".")
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"{section}:\n  {name}: {yaml_value}\n" if section else f"{name}: {yaml_value}\n")
    assert get(stage_config([*argv, "--config", str(yaml_file)])) == yaml_value
    assert get(stage_config([*argv, "--config", str(yaml_file), override])) == type(yaml_value)(
        override.split("=")[1])
    assert get(stage_config([*argv, *flag, override, "--config", str(yaml_file)])) == expected


def test_flags_stay_strings_and_positionals_mix_with_overrides():
    assert stage_config(["demo", "--out", "a: b #1"]).out == "a: b #1"  # used to break: values were not quoted
    assert stage_config(["train", "--out", "runs/true"]).output.dir == "runs/true"
    cfg = stage_config(["prepare", "a.parquet", "--out", "o", "year=2020/b.parquet", "val_ratio=0.5", "--keep-ids"])
    assert (cfg.inputs, cfg.out, cfg.val_ratio, cfg.keep_ids) == (["a.parquet", "year=2020/b.parquet"], "o", 0.5, True)
    cfg = stage_config(["audit", "near_threshold=2", "ds", "--strict"])
    assert (cfg.dataset, cfg.near_threshold, cfg.strict) == ("ds", 2, True)
    serve = stage_config(["serve", "--max-body-mb", "2", "--allow-host", "a", "--allow-host", "b",
                          "--allow-folder", "/tmp", "--max-model-len", "100", "vllm.max_num_seqs=4"])
    assert serve.max_body_bytes == 2 * 1024 * 1024 and serve.images.allow_hosts == ["a", "b"]
    assert str(serve.images.allow_folder) == "/tmp" and (serve.vllm.max_model_len, serve.vllm.max_num_seqs) == (100, 4)


def test_user_mistakes_on_the_command_line_are_one_line(capsys):
    assert main(["eval", "--model", "m"]) == 2
    assert capsys.readouterr().err.strip() == "radscribe eval: error: --data is required (data)"
    assert main(["audit"]) == 2
    assert capsys.readouterr().err.strip() == "radscribe audit: error: DATASET is required (dataset)"
    assert main(["train", "lroa.rank=3"]) == 2
    assert "unknown field(s) lroa; known: data, lora, model, output, train" in capsys.readouterr().err
    with pytest.raises(RadscribeError, match="not one of"):
        stage_config(["train", "train.precision=fp8"])
