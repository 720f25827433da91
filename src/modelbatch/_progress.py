"""One progress bar for N models: aggregate statistics, never one line per model.

tqdm is optional: without it the bar is silent and iteration works the same.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor

from ._metrics import aggregate

__all__ = ["ProgressBar", "track"]

T = TypeVar("T")


def _tqdm() -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


def postfix(metric: Tensor, active: Tensor, mode: str = "min") -> dict[str, str]:
    """The bar's text: number active, and best and median of the active finite values."""
    stats = aggregate(metric, active, higher_is_better=mode == "max")
    text = {"active": f"{stats['active']}/{active.numel()}"}
    if stats["best_model"] >= 0:
        text["best"] = f"{stats['best']:.4g}"
        text["median"] = f"{stats['median']:.4g}"
    return text


class ProgressBar:
    """A tqdm bar over training steps showing best, median and number of active models.

    The statistics are read from the device at most every `mininterval`
    seconds, so the bar adds no synchronization to most steps.

    Args:
        total: the number of steps (or None).
        model_batch: where the default metric (`latest_losses`) and the active
            mask come from.
        mode: `"min"` when lower is better (a loss), `"max"` otherwise.
        disable: no bar; None disables it when tqdm is not installed.
        mininterval: seconds between refreshes of the statistics.
        **tqdm_kwargs: passed to tqdm (`desc`, `leave`, `file`, ...).

    Example:
        >>> with ProgressBar(total=100, model_batch=mb, desc="train") as bar:
        ...     for step in range(100):
        ...         train_step()
        ...         bar.update()      # shows e.g. active=64/64, best=0.12, median=0.53
    """

    def __init__(
        self,
        total: int | None = None,
        *,
        model_batch: Any = None,
        mode: str = "min",
        disable: bool | None = None,
        mininterval: float = 0.5,
        **tqdm_kwargs: Any,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"ProgressBar: mode must be 'min' or 'max', got {mode!r}.")
        self.model_batch, self.mode, self.mininterval = model_batch, mode, mininterval
        tqdm = _tqdm()
        self.enabled = tqdm is not None and not disable
        self._bar = (
            tqdm(total=total, mininterval=mininterval, **tqdm_kwargs) if self.enabled else None
        )
        self._last = -float("inf")
        self.postfix: dict[str, Any] = {}

    def update(self, n: int = 1, metric: Tensor | None = None) -> None:
        """Advance by `n` steps; `metric` `[N]` defaults to `model_batch.latest_losses`."""
        if self._bar is None:
            return
        now = time.monotonic()
        if now - self._last >= self.mininterval:
            self._last = now
            mb = self.model_batch
            if metric is None and mb is not None:
                metric = mb.latest_losses
            if metric is not None:
                active = mb.active if mb is not None else torch.ones_like(metric, dtype=torch.bool)
                self.postfix = postfix(metric, active, self.mode)
            elif mb is not None:
                self.postfix = {"active": f"{int(mb.active.sum())}/{mb.num_models}"}
            self._bar.set_postfix(self.postfix, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def track(iterable: Iterable[T], model_batch: Any = None, **kwargs: Any) -> Iterator[T]:
    """Iterate with a `ProgressBar` that updates after each item.

    Example:
        >>> for xb, yb in track(loader, mb, desc="epoch 3"):
        ...     train_step(xb, yb)
    """
    total = kwargs.pop("total", None)
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with ProgressBar(total, model_batch=model_batch, **kwargs) as bar:
        for item in iterable:
            yield item
            bar.update()
