"""modelbatch: train many independent PyTorch models at once on one GPU."""

from ._batch import ModelBatch
from ._metrics import format_table

__all__ = ["ModelBatch", "format_table"]
__version__ = "0.1.0"
