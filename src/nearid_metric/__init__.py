"""nearid-metric: identity-preservation scores from NearID (frozen SigLIP2 trunk + retrained MAP head)."""

from nearid_metric._version import __version__
from nearid_metric.images import EncodedImage, ImageLoadError, load_image
from nearid_metric.metric import NearIDMetric
from nearid_metric.scorer import NearIDScore, Scorer
from nearid_metric.scorers import create_scorer, list_scorers

__all__ = ["EncodedImage", "ImageLoadError", "NearIDMetric", "NearIDScore", "Scorer", "__version__", "create_scorer",
           "list_scorers", "load_image"]
