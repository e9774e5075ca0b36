"""nearid-metric: identity-preservation scores from NearID (frozen SigLIP2 trunk + retrained MAP head).

The public names load lazily, so the numeric modules (``protocol``, ``dreambench``,
``stats``) can be imported to score saved tables without importing torch or any model code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from nearid_metric._version import __version__

_EXPORTS = {
    "EncodedImage": "nearid_metric.images",
    "ImageLoadError": "nearid_metric.images",
    "load_image": "nearid_metric.images",
    "NearIDMetric": "nearid_metric.metric",
    "NearIDScore": "nearid_metric.scorers",
    "Scorer": "nearid_metric.scorer",
    "TEXT_SCORERS": "nearid_metric.scorers",
    "TextScorer": "nearid_metric.text",
    "create_scorer": "nearid_metric.scorers",
    "create_text_scorer": "nearid_metric.text",
    "image_text_scores": "nearid_metric.text",
    "list_scorers": "nearid_metric.scorers",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

if TYPE_CHECKING:
    from nearid_metric.images import EncodedImage, ImageLoadError, load_image
    from nearid_metric.metric import NearIDMetric
    from nearid_metric.scorer import Scorer
    from nearid_metric.scorers import TEXT_SCORERS, NearIDScore, create_scorer, list_scorers
    from nearid_metric.text import TextScorer, create_text_scorer, image_text_scores


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nearid_metric' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
