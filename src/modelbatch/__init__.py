"""modelbatch: train many independent PyTorch models at once on one GPU.

The front door re-exports the names most programs need; the rest lives in the
subpackages: `modelbatch.optim` (vectorized optimizers, schedules, clipping),
`modelbatch.amp`, `modelbatch.nn`, `modelbatch.data`, `modelbatch.checkpoint`,
`modelbatch.lifecycle`, `modelbatch.fast` and `modelbatch.integrations`.
"""

from . import amp, checkpoint, data, distributed, ensemble, lifecycle, mixed, nn, optim, plot
from ._batch import ModelBatch
from ._chunked import ChunkedTrainer
from ._metrics import format_table, log_tensorboard, to_dataframe, write_csv
from ._progress import ProgressBar, track
from .amp import BatchGradScaler
from .ensemble import ensemble_evaluate, ensemble_predict
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
    "log_tensorboard",
    "to_dataframe",
    "write_csv",
    "plot",
    "ensemble",
    "ensemble_evaluate",
    "ensemble_predict",
    "ChunkedTrainer",
    "distributed",
    "MixedBatch",
    "MixedOptimizer",
    "MixedStep",
    "compile_mixed_step",
    "mixed",
]
__version__ = "0.1.0"
