"""What every console command shares and that needs no torch: log records on stderr, prefixed."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def stderr_logging(prog: str) -> Iterator[logging.Logger]:
    """Show the package's INFO+ records on stderr as ``prog: message`` while one command runs."""
    logger = logging.getLogger("nearid_metric")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
