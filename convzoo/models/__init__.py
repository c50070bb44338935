"""Model families, one module each, registered by name.

Every public module in this package is imported here so that its ``@register_model`` entry
points are known to :func:`create_model` / :func:`list_models`.
"""
import importlib
import pkgutil

from ._builder import build_model, create_model
from ._checkpoint import load_checkpoint, load_model, save_checkpoint
from ._features import FeatureExtractor
from ._registry import list_models, register_model


for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "build_model",
    "create_model",
    "list_models",
    "register_model",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
    "FeatureExtractor",
]

# Segmentation heads on every backbone registered above (after all families are imported).
from .segmentation import register_segmentation_models as _register_segmentation_models  # noqa: E402

_register_segmentation_models()
