"""Vectorized optimizers over stacked parameters, with per-model hyperparameters."""

from ._factory import ELEMENTWISE, NOT_SEPARABLE, VECTORIZED, OptimizerFactory
from ._hparams import per_model
from ._optimizers import (
    BatchAdagrad,
    BatchAdam,
    BatchAdamW,
    BatchOptimizer,
    BatchRMSprop,
    BatchSGD,
)

__all__ = [
    "OptimizerFactory",
    "BatchOptimizer",
    "BatchSGD",
    "BatchAdam",
    "BatchAdamW",
    "BatchRMSprop",
    "BatchAdagrad",
    "VECTORIZED",
    "ELEMENTWISE",
    "NOT_SEPARABLE",
    "per_model",
]
