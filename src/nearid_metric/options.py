"""Names and defaults of the scoring options that the commands' parsers need, without importing torch.

``--precision`` names (their torch dtypes are :data:`nearid_metric.scorer.PRECISIONS`) and the
automatic number of decoding processes (``--num-workers auto``).
"""

from __future__ import annotations

import os

PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""Precision name -> the name of its ``torch`` dtype."""

MAX_AUTO_WORKERS = 16
"""``auto`` never starts more decoding processes than this."""


def available_cores() -> int:
    """CPU cores this process may run on: its affinity mask where the OS has one, else the CPU count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def auto_num_workers() -> int:
    """Decoding processes for ``--num-workers auto``: one per available core, up to :data:`MAX_AUTO_WORKERS`."""
    return min(MAX_AUTO_WORKERS, available_cores())
