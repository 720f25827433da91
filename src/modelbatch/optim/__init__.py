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

# --- per-model LR schedules and gradient clipping (sched-amp) ---
from ._clip import clip_grad_norm_, clip_grad_value_, per_model_grad_norm
from ._schedule import (
    BatchCosineAnnealingLR,
    BatchExponentialLR,
    BatchLRScheduler,
    BatchMultiStepLR,
    BatchStepLR,
    BatchWarmupCosineLR,
)

__all__ += [
    "BatchStepLR",
    "BatchMultiStepLR",
    "BatchExponentialLR",
    "BatchCosineAnnealingLR",
    "BatchWarmupCosineLR",
    "BatchLRScheduler",
    "clip_grad_norm_",
    "clip_grad_value_",
    "per_model_grad_norm",
]
