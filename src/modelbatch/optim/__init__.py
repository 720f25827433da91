"""Vectorized optimizers over stacked parameters, with per-model hyperparameters.

Also per-model learning-rate schedules and per-model gradient clipping.
"""

from ._clip import clip_grad_norm_, clip_grad_value_, per_model_grad_norm
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
from ._schedule import (
    BatchCosineAnnealingLR,
    BatchExponentialLR,
    BatchLRScheduler,
    BatchMultiStepLR,
    BatchStepLR,
    BatchWarmupCosineLR,
)

__all__ = [
    "ELEMENTWISE",
    "NOT_SEPARABLE",
    "VECTORIZED",
    "BatchAdagrad",
    "BatchAdam",
    "BatchAdamW",
    "BatchCosineAnnealingLR",
    "BatchExponentialLR",
    "BatchLRScheduler",
    "BatchMultiStepLR",
    "BatchOptimizer",
    "BatchRMSprop",
    "BatchSGD",
    "BatchStepLR",
    "BatchWarmupCosineLR",
    "OptimizerFactory",
    "clip_grad_norm_",
    "clip_grad_value_",
    "per_model",
    "per_model_grad_norm",
]
