"""Upstream notices that tell a radscribe user nothing true and actionable, silenced where they are raised.

Each is a context manager around the one call that raises it; nothing here changes a global filter or level for
longer than that call, so every other warning of these libraries still reaches the user.
"""

from __future__ import annotations

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


@contextmanager
def deepspeed_cpu_banner():
    """Around the first import of deepspeed when DeepSpeed is not used (the HF Trainer's set-up imports it through
    accelerate whenever it is installed): its "Setting accelerator to CPU. If you have GPU ..." warning says
    nothing about a run that does not use DeepSpeed. Its logger is (re)configured during that import, so a filter
    on it is what survives the import; it is removed afterwards."""
    ds_logger = logging.getLogger("DeepSpeed")
    banner = _CpuAcceleratorBanner()
    ds_logger.addFilter(banner)
    try:
        yield
    finally:
        ds_logger.removeFilter(banner)
