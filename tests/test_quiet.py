"""Ordinary commands print no warning that tells the user nothing (radscribe/quiet.py); real notices still show."""

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

from radscribe.quiet import _CpuAcceleratorBanner, peft_notices

ASSETS = Path(__file__).parent / "assets"


def _radscribe(*args, cwd):
    done = subprocess.run([sys.executable, "-m", "radscribe.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return [line for line in (done.stdout + done.stderr).splitlines() if "warn" in line.lower()]


def test_tiny_model_train_and_eval_print_no_warning(tiny_model_dir, tiny_dataset, tmp_path):
    # tiny-model saves a model; train imports peft (through transformers' Trainer) and deepspeed (through accelerate), wraps the model with
    # get_peft_model; eval of the run loads the adapter with PeftModel.from_pretrained: every path that warned.
    assert _radscribe("tiny-model", tmp_path / "tiny", cwd=tmp_path) == []  # save_pretrained imports deepspeed
    run = tmp_path / "run"
    assert _radscribe("train", "--model", tiny_model_dir("qwen3_vl"), "--data", tiny_dataset, "--out", run,
                      "train.max_steps=2", "train.per_device_batch=2", "train.precision=fp32",
                      "train.eval_steps=null", "data.val_split=null", "data.max_samples=8", cwd=tmp_path) == []
    assert _radscribe("eval", "--model", tiny_model_dir("qwen3_vl"), "--adapter", run, "--data", tiny_dataset,
                      "--limit", "2", "--max-new-tokens", "4", "--n-boot", "10", cwd=tmp_path) == []


def test_dry_run_plan_with_deepspeed_prints_no_warning(tmp_path):
    # the plan imports DeepSpeed's ZeRO estimators, which brought its CPU-accelerator banner with them
    model = tmp_path / "a3b"
    model.mkdir()
    (model / "config.json").write_bytes((ASSETS / "qwen3_vl_30b_a3b_instruct_config.json").read_bytes())
    assert _radscribe("train", "--config", "reference-z2", "--model", model, "--dry-run", "--nproc", "4",
                      cwd=tmp_path) == []


class _Records(logging.Handler):
    """Collects a logger's records itself: deepspeed's logger does not propagate to the root (caplog) once imported."""

    def __init__(self, logger: logging.Logger):
        super().__init__(logging.DEBUG)
        self.messages, self.logger = [], logger

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)


def test_bitsandbytes_kernel_notice_is_dropped_only_when_nothing_is_4bit(monkeypatch):
    # The notice is logged while bitsandbytes is first imported (on CPUs with AVX512-BF16); emulate that import.
    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    notice = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with _Records(notice) as records:
        with peft_notices():
            notice.warning("Failed to load CPU gemm_4bit_forward: `pip install kernels`")
        with peft_notices("4bit"):
            notice.warning("Failed to load CPU gemm_4bit_forward: `pip install kernels` (4-bit asked for)")
        notice.warning("a later warning of that logger")
    assert records.messages == ["Failed to load CPU gemm_4bit_forward: `pip install kernels` (4-bit asked for)",
                                "a later warning of that logger"]


def test_only_the_named_notices_are_silenced():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with peft_notices():
            warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
            warnings.warn("some other deprecation", FutureWarning)
    assert [str(w.message) for w in seen] == ["some other deprecation"]



def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


def test_deepspeed_is_imported_without_its_cpu_banner_only():
    import torch

    if not torch.cuda.is_available():  # a plain import prints the banner where no GPU is found ...
        assert "Setting accelerator to CPU" in _python("import deepspeed")
    # ... the quiet import does not, and leaves deepspeed imported, so accelerate's later import is silent too
    assert _python("import sys; from radscribe.quiet import import_deepspeed_quietly; import_deepspeed_quietly(); "
                   "import deepspeed; assert 'deepspeed' in sys.modules") == ""
    # other messages of that logger pass
    record = logging.LogRecord("DeepSpeed", logging.WARNING, __file__, 1, "a real DeepSpeed warning", None, None)
    assert _CpuAcceleratorBanner().filter(record)
