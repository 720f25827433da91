"""Full-size operations in one forward and backward of the BatchNorm/dropout MLP (CPU is enough).

Counts every aten operator dispatched in `ModelBatch`'s forward + loss and in
its backward for the 784-256-256-10 MLP with BatchNorm and dropout, split into
those that touch a whole activation (`numel >= N * B * 256`) and small ones;
views are not counted. Copies (`clone`, `copy_`) and casts (`_to_copy`) show
what the math does not need:

    PYTHONPATH=src python benchmarks/bn_copies.py
"""

from __future__ import annotations

import collections
import pathlib
import sys
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from _models import mlp_bn_dropout

from modelbatch import ModelBatch

VIEWS = {
    "view", "_unsafe_view", "permute", "transpose", "expand", "reshape", "_reshape_alias",
    "alias", "as_strided", "detach", "unsqueeze", "squeeze", "t", "select", "slice",
    "unflatten", "movedim",
}  # fmt: skip


class Count(TorchDispatchMode):
    """Counts operators by name, full-size (output numel >= `full`) and small."""

    def __init__(self, full: int) -> None:
        super().__init__()
        self.full_size: collections.Counter[str] = collections.Counter()
        self.small: collections.Counter[str] = collections.Counter()
        self.threshold = full

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        outs = out if isinstance(out, (tuple, list)) else (out,)
        size = max([o.numel() for o in outs if isinstance(o, torch.Tensor)] + [0])
        if name not in VIEWS:
            (self.full_size if size >= self.threshold else self.small)[name] += 1
        return out


def main(n: int = 8, batch: int = 32) -> None:
    torch.manual_seed(0)
    mb = ModelBatch([mlp_bn_dropout() for _ in range(n)])
    x, y = torch.randn(batch, 784), torch.randint(0, 10, (batch,))
    with Count(n * batch * 256) as forward:
        loss = mb.compute_loss(mb(x), y)
    with Count(n * batch * 256) as backward:
        loss.backward()
    for what, count in (("forward + loss", forward), ("backward", backward)):
        print(f"{what}: full-size {dict(sorted(count.full_size.items()))}")
        print(f"{what}: {sum(count.small.values())} small ops {dict(sorted(count.small.items()))}")


if __name__ == "__main__":
    main()
