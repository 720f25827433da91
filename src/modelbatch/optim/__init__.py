"""Vectorized optimizers over stacked parameters, per-model schedules and clipping."""

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
    CosineAnnealingLR,
    ExponentialLR,
    MultiStepLR,
    PerModelScheduler,
    StepLR,
    WarmupCosineLR,
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
    "CosineAnnealingLR",
    "ExponentialLR",
    "MultiStepLR",
    "PerModelScheduler",
    "StepLR",
    "WarmupCosineLR",
    "clip_grad_norm_",
    "clip_grad_value_",
    "per_model_grad_norm",
]
