"""Vectorized optimizers over stacked parameters, per-model schedules and clipping."""

__all__: list[str] = []

# --- per-model schedules and gradient clipping (sched-amp) ---
from ._clip import clip_grad_norm_, clip_grad_value_, per_model_grad_norm
from ._schedule import (
    CosineAnnealingLR,
    ExponentialLR,
    MultiStepLR,
    PerModelScheduler,
    StepLR,
    WarmupCosineLR,
)

__all__ += [
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
