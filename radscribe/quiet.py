"""Upstream notices that tell a radscribe user nothing true and actionable, silenced where they are raised.

Each wraps the one call that raises it; nothing here changes a filter or level for longer than that call, so every
other warning of these libraries still reaches the user.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import warnings
from contextlib import contextmanager


@contextmanager
def peft_notices(quantization: str | None = None):
    """Around `import peft` (transformers' Trainer imports it too) and PeftModel construction.

    - peft 0.21's PeftModel.__init__ reads `model.is_gradient_checkpointing`, which transformers 5.24 deprecated:
      a FutureWarning on every wrap about peft's own code.
    - peft imports bitsandbytes whenever it is installed; on CPUs with AVX512-BF16, bitsandbytes logs at import
      that its CPU 4-bit kernel needs `pip install kernels` (bitsandbytes/backends/cpu/ops.py). That concerns 4-bit
      matmuls only, so it stays when `quantization` (4-bit) is asked for.
    """
    bnb_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = bnb_logger.level
    if quantization is None and "bitsandbytes" not in sys.modules:
        bnb_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            yield
    finally:
        bnb_logger.setLevel(level)


class _CpuAcceleratorBanner(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Setting accelerator to CPU.")


def import_deepspeed_quietly() -> None:
    """Import deepspeed now, if it is installed, without its "Setting accelerator to CPU. If you have GPU ..." banner.

    For commands that do not use DeepSpeed: accelerate imports it anyway on the first `save_pretrained` or HF
    Trainer set-up (`extract_model_from_parallel`), and the banner then says nothing about the run. Its logger is
    (re)configured during that import, so a filter on it, removed afterwards, is what drops the one message.
    """
    if "deepspeed" in sys.modules or importlib.util.find_spec("deepspeed") is None:
        return
    ds_logger = logging.getLogger("DeepSpeed")
    banner = _CpuAcceleratorBanner()
    ds_logger.addFilter(banner)
    try:
        import deepspeed  # noqa: F401
    finally:
        ds_logger.removeFilter(banner)
