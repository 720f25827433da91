"""Diagnostic: list the copy-like aten ops (and their shapes/strides) of one modelbatch step.

PYTHONPATH=src python benchmarks/diag_copies.py
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from modelbatch import ModelBatch
from modelbatch.fast import _adopt_grad_layouts, _stride_recorder

WATCH = ("copy", "clone", "contiguous", "bmm", "mm", "new_empty", "cat", "stack", "where", "mul")


class Log(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if any(w in name for w in WATCH):
            ins = [(tuple(a.shape), a.stride()) for a in args if isinstance(a, torch.Tensor)]
            o = out if isinstance(out, torch.Tensor) else None
            print(f"  {name} {ins} -> {(tuple(o.shape), o.stride()) if o is not None else ''}")
        return out


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    for relayout in (False, True):
        print(f"== relayout={relayout} on {device}")
        with torch.device(device):
            mb = ModelBatch(
                [nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10)) for _ in range(8)]
            )
        x = torch.randn(128, 784, device=device)
        y = torch.randint(0, 10, (128,), device=device)
        params = list(mb.parameters())
        if relayout:
            layouts: dict = {}
            hooks = [p.register_hook(_stride_recorder(layouts, id(p))) for p in params]
            mb.compute_loss(mb(x), y).backward()
            for h in hooks:
                h.remove()
            _adopt_grad_layouts(params, layouts, torch.optim.SGD(params, lr=0.1))
            for p in params:
                p.grad = None
        with Log():
            mb.compute_loss(mb(x), y).backward()


if __name__ == "__main__":
    main()
