"""modelbatch: train many independent PyTorch models at once on one GPU.

The front door re-exports the names most programs need; the rest lives in the
subpackages: `modelbatch.optim` (vectorized optimizers, schedules, clipping),
`modelbatch.amp`, `modelbatch.nn`, `modelbatch.data`, `modelbatch.checkpoint`,
`modelbatch.lifecycle`, `modelbatch.fast` and `modelbatch.integrations`.
"""

from . import amp, checkpoint, data, lifecycle, mixed, nn, optim
from ._batch import ModelBatch
from ._metrics import format_table
from ._progress import ProgressBar, track
from .amp import BatchGradScaler
from .fast import EvalResult, FastStep, compile_step, evaluate
from .mixed import MixedBatch, MixedOptimizer, MixedStep, compile_mixed_step
from .optim import OptimizerFactory

__all__ = [
    "BatchGradScaler",
    "EvalResult",
    "FastStep",
    "ModelBatch",
    "OptimizerFactory",
    "ProgressBar",
    "amp",
    "checkpoint",
    "compile_step",
    "data",
    "evaluate",
    "format_table",
    "lifecycle",
    "nn",
    "optim",
    "track",
    "MixedBatch",
    "MixedOptimizer",
    "MixedStep",
    "compile_mixed_step",
    "mixed",
]
__version__ = "0.1.0"
