"""radscribe train on several CPU processes (torchrun, gloo): ZeRO-2 and ZeRO-3 on one node, ZeRO-3 on two localhost
"nodes", and the one-process DeepSpeed run without a launcher.

With the same global batch ZeRO-2, ZeRO-3 with gradient checkpointing, and ZeRO-3 across two nodes of one process each
follow the same loss curve; every rank says where its weights went (device-map onto its device; partitioned under
ZeRO-3), and the adapters load. The first DeepSpeed run on a machine JIT-compiles a shared-memory comm op (~2 min);
later runs reuse it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from radscribe.dist import free_port

pytestmark = pytest.mark.slow

ENV = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")},
       "OMP_NUM_THREADS": "1"}


def _command(model_dir, dataset, out, stage: str, *extra) -> list[str]:
    return [sys.executable, "-m", "radscribe.cli", "train", "--model", str(model_dir), "--data", str(dataset),
            "--out", str(out), "--deepspeed", stage, "train.precision=fp32", "train.max_steps=6",
            "train.per_device_batch=4", "train.grad_accum=2", "train.lr=2e-3", "train.logging_steps=1",
            "train.save_steps=1000", "data.val_split=null", *extra]


def _run(model_dir, dataset, out, stage: str, *extra) -> str:
    done = subprocess.run(_command(model_dir, dataset, out, stage, "--nproc", "2", *extra), env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def _run_two_nodes(model_dir, dataset, out, stage: str, *extra) -> str:
    """Two launches on localhost, node ranks 0 and 1, one process each, meeting at one rendezvous port."""
    port = str(free_port())
    nodes = [subprocess.Popen(_command(model_dir, dataset, out, stage, "--nproc", "1", "--nnodes", "2",
                                       "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", port,
                                       *extra), env=ENV, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    errs = [node.communicate(timeout=900)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(e[-2000:] for e in errs)
    return "\n".join(errs)


def _placement(stderr: str) -> dict[int, str]:
    lines = re.findall(r"\[radscribe train rank (\d)/2\] weights loaded via ([^\[\n]+)", stderr)
    return {int(rank): text for rank, text in lines}


def test_zero2_zero3_and_two_nodes_same_loss_curve_each_rank_on_its_own(tiny_model_dir, tiny_dataset, tmp_path):
    from peft import PeftModel

    from radscribe.model.load import load_model
    from radscribe.runlog import read_log

    model_dir = tiny_model_dir("qwen3_vl")
    logs = {"z2": _run(model_dir, tiny_dataset, tmp_path / "z2", "z2"),
            "z3": _run(model_dir, tiny_dataset, tmp_path / "z3", "z3", "train.gradient_checkpointing=true"),
            "z3-2nodes": _run_two_nodes(model_dir, tiny_dataset, tmp_path / "z3-2nodes", "z3",
                                        "train.gradient_checkpointing=true")}
    curves = {}
    for name in logs:
        run = tmp_path / name
        summary = json.loads((run / "train_summary.json").read_text())
        assert summary["processes"] == 2 and summary["global_batch"] == 16 and summary["steps"] == 6
        curves[name] = [r["loss"] for r in read_log(run) if "loss" in r]
        assert len(curves[name]) == 6 and curves[name][-1] < curves[name][0]
        base, _ = load_model(model_dir, dtype="fp32")
        tuned = PeftModel.from_pretrained(base, run / "adapter")
        assert sum(p.abs().sum() for n, p in tuned.named_parameters() if "lora_B" in n) > 0
    # checkpointing recomputes, it does not change the arithmetic; two nodes of one process are one node of two
    assert curves["z2"] == pytest.approx(curves["z3"], rel=1e-4)
    assert curves["z3-2nodes"] == pytest.approx(curves["z3"], rel=1e-6)
    assert (tmp_path / "z3-2nodes" / "launch_config.node1.yaml").is_file()

    # where each rank's weights went: straight onto its own device under ZeRO-2, its partition under ZeRO-3
    assert _placement(logs["z2"]) == {rank: "device-map onto cpu: device_map {'': 'cpu'}" for rank in (0, 1)}
    for name in ("z3", "z3-2nodes"):
        held = _placement(logs[name])
        assert sorted(held) == [0, 1]
        for text in held.values():
            local, full = (int(n.replace(",", "")) for n in re.findall(r"holds ([\d,]+) of ([\d,]+)", text)[0])
            assert text.startswith("zero3-partitioned onto cpu") and full / 2 <= local < 0.51 * full


def test_reference_preset_runs_deepspeed_in_one_process_without_a_launcher(tiny_model_dir, tiny_dataset, tmp_path):
    # reference-z2 sets deepspeed: z2 and bf16; a plain `radscribe train` (no --nproc) must still run it
    command = [sys.executable, "-m", "radscribe.cli", "train", "--config", "reference-z2", "--model",
               str(tiny_model_dir("qwen3_vl")), "--data", str(tiny_dataset), "--out", str(tmp_path / "run"),
               "train.max_steps=2", "train.grad_accum=1", "train.logging_steps=1", "data.val_split=null"]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["processes"] == 1 and summary["trainable_parameters"] == 16384
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
