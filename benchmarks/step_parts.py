"""Where the quick-start loop's time goes against the torch.func recipe, part by part.

For each N: the whole step of both (zero_grad, forward, loss, backward,
optimizer step), forward+backward alone, and the optimizer step alone (ours
with a per-model lr; torch's Adam with one lr on the stacked tensors). Median
of 5 timing runs in this one process; run it in several fresh processes for a
spread:

    for i in 1 2 3; do python benchmarks/step_parts.py --n 16 64 256; done

MLP 64-64-10, batch 64, one thread (`--threads`) by default. On CUDA
(`--device cuda --sizes 784 64 64 10 --batch 128`) each timing ends with a
synchronisation, and the "host" column is the time `step()` takes to return
without one: the launch cost the GPU waits on when the step is short.
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state

from modelbatch import ModelBatch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _models import mlp

SIZES = (64, 64, 64, 10)


def _mlp(sizes: Sequence[int]) -> nn.Module:
    return mlp(*sizes)()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ms(fn: Callable[[], object], iters: int, sync: bool = True) -> float:
    """Median of 5 runs of `iters` calls, in ms per call; `sync=False` times the host alone."""
    device = DEVICE[0]
    for _ in range(10):
        fn()
    _sync(device)
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        if sync:
            _sync(device)
        runs.append((time.perf_counter() - t0) / iters * 1e3)
        _sync(device)
    return sorted(runs)[2]


DEVICE = [torch.device("cpu")]
ITERS = [0]


def measure(n: int, x: torch.Tensor, y: torch.Tensor, sizes: tuple[int, ...] = SIZES) -> str:
    """One line: whole step, forward+backward and optimizer step, ours / recipe, at N = n."""
    torch.manual_seed(0)
    with torch.device(x.device):
        models = [_mlp(sizes) for _ in range(n)]
    lrs = [1e-3 * (1 + i / n) for i in range(n)]
    mb = ModelBatch(copy.deepcopy(models), lr_list=lrs, optimizer_cls=torch.optim.Adam)
    params, buffers = stack_module_state(models)  # type: ignore[arg-type]
    base = copy.deepcopy(models[0]).to("meta")
    opt = torch.optim.Adam(list(params.values()), lr=1e-3, fused=x.device.type == "cuda")

    def one(p: dict, b: dict, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(base, (p, b), (xb,)), yb)

    def ours_fwd_bwd() -> None:
        mb.zero_grad()
        mb.compute_loss(mb(x), y).backward()

    def recipe_fwd_bwd() -> None:
        opt.zero_grad(set_to_none=True)
        torch.vmap(one, in_dims=(0, 0, None, None))(params, buffers, x, y).sum().backward()

    def ours() -> None:
        ours_fwd_bwd()
        mb.step()

    def recipe() -> None:
        recipe_fwd_bwd()
        opt.step()

    iters = ITERS[0] or max(20, 4000 // n)
    whole = (_ms(ours, iters), _ms(recipe, iters))
    fwd_bwd = (_ms(ours_fwd_bwd, iters), _ms(recipe_fwd_bwd, iters))
    ours_fwd_bwd()
    recipe_fwd_bwd()
    optimizer = (_ms(mb.step, iters), _ms(opt.step, iters))
    host = (_ms(mb.step, iters, sync=False), _ms(opt.step, iters, sync=False))
    line = (
        f"N={n:5d}  step {whole[0]:.3f} / {whole[1]:.3f} ms ({whole[0] / whole[1]:.2f}x)  "
        f"fwd+bwd {fwd_bwd[0]:.3f} / {fwd_bwd[1]:.3f}  "
        f"optimizer {optimizer[0]:.3f} / {optimizer[1]:.3f}  "
        f"host {host[0]:.3f} / {host[1]:.3f}"
    )
    if x.device.type == "cuda":
        line += f"  (ours without kernel launches {_without_launches(mb.step, iters):.3f})"
    return line + "   (ours / recipe)"


def _without_launches(step: Callable[[], object], iters: int) -> float:
    """Host ms of `step` with the generated kernels' launches replaced by nothing (last: it
    leaves the optimizer's state behind)."""
    from modelbatch.optim import _kernels

    class NoLaunch:
        def __getitem__(self, grid: object) -> Callable[..., None]:
            return lambda *a, **k: None

    saved = _kernels._coefficient_kernel, _kernels._update_kernel
    _kernels._coefficient_kernel = lambda *a: NoLaunch()  # type: ignore[assignment]
    _kernels._update_kernel = lambda *a: NoLaunch()  # type: ignore[assignment]
    try:
        return _ms(step, iters, sync=False)
    finally:
        _kernels._coefficient_kernel, _kernels._update_kernel = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", nargs="*", type=int, default=[16, 64, 256])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", nargs="*", type=int, default=list(SIZES))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=0, help="calls per timing (0: 4000 / N)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    DEVICE[0] = torch.device(args.device)
    ITERS[0] = args.iters
    sizes = tuple(args.sizes)
    x = torch.randn(args.batch, sizes[0], device=args.device)
    y = torch.randint(0, sizes[-1], (args.batch,), device=args.device)
    for n in args.n:
        print(measure(n, x, y, sizes), flush=True)


if __name__ == "__main__":
    main()
