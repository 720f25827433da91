"""Classification metrics as running sums: accuracy, NLL, Brier, entropy, calibration error.

One accumulator serves the ensemble (`log_probs [B, C]`) and its members
(`[K, B, C]`): every sum keeps the leading dims. Sums live on the device in
float64 and need no host synchronization, so an evaluation loop stays
asynchronous until the caller reads the result.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ClassificationSums", "NORMS"]

NORMS = ("l1", "l2", "max")


class ClassificationSums:
    """Running sums of per-sample metrics and of calibration bins.

    The bins are torchmetrics' (`CalibrationError`): `n_bins` equal-width bins
    `[i / n_bins, (i + 1) / n_bins)` of the top-class confidence, plus one bin
    for a confidence of exactly 1.
    """

    def __init__(self, n_bins: int = 15) -> None:
        self.n_bins = n_bins
        self.count = 0
        self.sums: dict[str, Tensor] = {}

    def update(self, log_probs: Tensor, targets: Tensor) -> None:
        """Add a batch: `log_probs [*L, B, C]` (log-probabilities), `targets [B]` class indices."""
        probs = log_probs.exp()
        conf, pred = probs.max(dim=-1)  # [*L, B]
        hit = (pred == targets).double()
        target = targets.expand(pred.shape).unsqueeze(-1)
        nll = -log_probs.gather(-1, target).squeeze(-1).double()
        onehot = torch.zeros_like(probs).scatter_(-1, target, 1.0)
        brier = (probs.double() - onehot.double()).square().sum(dim=-1)
        entropy = torch.special.entr(probs.double()).sum(dim=-1)
        boundaries = torch.linspace(0, 1, self.n_bins + 1, dtype=conf.dtype, device=conf.device)
        index = torch.bucketize(conf, boundaries, right=True) - 1
        bins = torch.zeros(
            *pred.shape[:-1], 3, self.n_bins + 1, dtype=torch.float64, device=conf.device
        )
        for row, src in enumerate((torch.ones_like(hit), conf.double(), hit)):
            bins[..., row, :].scatter_add_(-1, index, src)
        batch = {
            "correct": hit.sum(-1),
            "nll": nll.sum(-1),
            "brier": brier.sum(-1),
            "entropy": entropy.sum(-1),
            "bins": bins,
        }
        for key, value in batch.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += targets.numel()

    def bins(self) -> dict[str, Tensor]:
        """Per bin: `count`, mean `confidence` and `accuracy` (0 where empty): `[*L, n_bins + 1]`."""
        raw = self.sums["bins"]
        count = raw[..., 0, :]
        safe = count.clamp(min=1)
        return {
            "count": count,
            "confidence": raw[..., 1, :] / safe,
            "accuracy": raw[..., 2, :] / safe,
        }

    def compute(self, norm: str = "l1") -> dict[str, Tensor]:
        """`accuracy`, `nll`, `brier`, `ece`, `entropy`: each `[*L]`, float64."""
        n = self.count
        bins = self.bins()
        gap = (bins["accuracy"] - bins["confidence"]).abs()
        prop = bins["count"] / n
        if norm == "l1":
            ece = (gap * prop).sum(-1)
        elif norm == "l2":
            ece = (gap.square() * prop).sum(-1).sqrt()
        else:
            ece = gap.amax(-1)
        return {
            "accuracy": self.sums["correct"] / n,
            "nll": self.sums["nll"] / n,
            "brier": self.sums["brier"] / n,
            "ece": ece,
            "entropy": self.sums["entropy"] / n,
        }
