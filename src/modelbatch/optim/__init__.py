"""Vectorized optimizers over stacked parameters, with per-model hyperparameters.

Also per-model learning-rate schedules and per-model gradient clipping.
"""

from ._clip import clip_grad_norm_, clip_grad_value_, per_model_grad_norm
from ._factory import NOT_SEPARABLE, VECTORIZED, OptimizerFactory
from ._hparams import per_model
from ._optimizers import (
    BatchAdadelta,
    BatchAdagrad,
    BatchAdam,
    BatchAdamax,
    BatchAdamW,
    BatchASGD,
    BatchNAdam,
    BatchOptimizer,
    BatchRAdam,
    BatchRMSprop,
    BatchRprop,
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
    "NOT_SEPARABLE",
    "VECTORIZED",
    "BatchASGD",
    "BatchAdadelta",
    "BatchAdagrad",
    "BatchAdam",
    "BatchAdamW",
    "BatchAdamax",
    "BatchCosineAnnealingLR",
    "BatchExponentialLR",
    "BatchLRScheduler",
    "BatchMultiStepLR",
    "BatchNAdam",
    "BatchOptimizer",
    "BatchRAdam",
    "BatchRMSprop",
    "BatchRprop",
    "BatchSGD",
    "BatchStepLR",
    "BatchWarmupCosineLR",
    "OptimizerFactory",
    "clip_grad_norm_",
    "clip_grad_value_",
    "per_model",
    "per_model_grad_norm",
]
