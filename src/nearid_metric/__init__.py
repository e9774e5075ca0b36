"""nearid-metric: identity-preservation scores from NearID (frozen SigLIP2 trunk + retrained MAP head)."""

from nearid_metric._version import __version__
from nearid_metric.images import ImageLoadError, load_image
from nearid_metric.scorer import NearIDScore

__all__ = ["ImageLoadError", "NearIDScore", "__version__", "load_image"]
