"""vmap-friendly layers and the conversion of user models before stacking."""

from ._convert import prepare_models

__all__ = ["prepare_models"]
