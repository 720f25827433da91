"""The generated update kernel against its memory roofline, for several launch configurations.

N stacked MLPs (default 784-64-64-10) get random gradients; `opt.step()` of
modelbatch's Adam (a different lr per model) is profiled with torch.profiler
and the update kernel's time is compared with its floor: the bytes it must
move (read p, g, m, v; write p, m, v; under `--lp` the gradient is bf16 and a
bf16 copy of p is written too) over the device-to-device copy bandwidth
measured in the same process.

Each configuration sets `modelbatch.optim._kernels`' BLOCK, NUM_WARPS,
and CHUNK_BLOCKS; the PTX of the kernel is searched for vector
loads (`ld.global.v4`) to show whether the loads were vectorised. One line of
JSON per (configuration, N, precision). CUDA only.

    python benchmarks/update_kernel.py --n 4096 16384 --out results.jsonl
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics
import sys
from collections.abc import Sequence

import torch
from torch import nn

from modelbatch import ModelBatch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _models import mlp

from modelbatch.optim import OptimizerFactory, _kernels

#: (BLOCK, NUM_WARPS, CHUNK_BLOCKS); the first is the default
CONFIGS = [
    (1024, 4, 4),
    (1024, 4, 2),
    (1024, 4, 1),
    (1024, 8, 4),
    (1024, 8, 2),
    (2048, 8, 2),
    (512, 4, 8),
]


def _mlp(sizes: Sequence[int]) -> nn.Module:
    return mlp(*sizes)()


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (median of 5)."""
    a = torch.empty(2**28, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    runs = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        b.copy_(a)
        start.record()
        for _ in range(10):
            b.copy_(a)
        end.record()
        end.synchronize()
        runs.append(2 * a.numel() * 4 / (start.elapsed_time(end) / 1e3 / 10))
    return statistics.median(runs)


def kernel_ms(opt: torch.optim.Optimizer, steps: int = 10) -> tuple[float, float]:
    """(update kernel ms per step, coefficient kernel ms per step), from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        opt.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            opt.step()
        torch.cuda.synchronize()
    update = coef = 0.0
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = evt.device_time if hasattr(evt, "device_time") else evt.cuda_time
        if "modelbatch_update" in evt.name:
            update += us
        elif "modelbatch_coefficients" in evt.name:
            coef += us
    return update / 1e3 / steps, coef / 1e3 / steps


class _Recorder:
    """Wraps `_kernels._update_kernel` to keep each compiled kernel a launch returns."""

    def __init__(self) -> None:
        self.original = _kernels._update_kernel
        self.compiled: list = []

    def __call__(self, *key: object) -> object:
        jit = self.original(*key)
        recorder = self

        class Launcher:
            def __getitem__(self, grid: tuple) -> object:
                def launch(*a: object, **kw: object) -> object:
                    out = jit[grid](*a, **kw)
                    if out is not None and out not in recorder.compiled:
                        recorder.compiled.append(out)
                    return out

                return launch

        return Launcher()

    def vector_loads(self) -> dict[str, int]:
        """Vector and scalar global loads in the PTX of the kernels compiled so far."""
        counts = {"v4": 0, "v2": 0, "scalar": 0}
        for kernel in self.compiled:
            ptx = kernel.asm.get("ptx", "")
            # qualifiers such as .L1::evict_last may stand between ld.global and the width
            counts["v4"] += len(re.findall(r"ld\.global(?:\.[\w:]+)*\.v4", ptx))
            counts["v2"] += len(re.findall(r"ld\.global(?:\.[\w:]+)*\.v2", ptx))
            counts["scalar"] += len(
                re.findall(r"ld\.global(?:\.(?!v[248]\b)[\w:]+)*\.(?:b32|f32|b16|u16)\s", ptx)
            )
        return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", nargs="*", type=int, default=[4096, 16384])
    parser.add_argument("--sizes", nargs="*", type=int, default=[784, 64, 64, 10])
    parser.add_argument("--configs", nargs="*", type=int, help="indices into CONFIGS")
    parser.add_argument("--modes", nargs="*", default=["fp32", "lp"], help="fp32 and/or lp")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    print(json.dumps({"copy_bandwidth_tb_s": bandwidth / 1e12}), flush=True)
    configs = [CONFIGS[i] for i in args.configs] if args.configs else CONFIGS
    recorder = _Recorder()
    _kernels._update_kernel = recorder  # type: ignore[assignment]
    lines = []
    for n in args.n:
        with torch.device("cuda"):
            models = [_mlp(args.sizes) for _ in range(n)]
        mb = ModelBatch(models)
        del models
        lrs = [{"lr": 1e-3 * (0.5 + i / n)} for i in range(n)]
        for lp in [mode == "lp" for mode in args.modes]:
            opt = OptimizerFactory(torch.optim.Adam).create_optimizer(mb, lrs)
            params = list(mb.parameters())
            if lp:
                copies = opt.low_precision_copies(torch.bfloat16)
                for p in params:
                    copies[p].grad = torch.randn_like(copies[p])
            else:
                for p in params:
                    p.grad = torch.randn_like(p)
            elements = sum(p.numel() for p in params)
            floor_bytes = elements * 28  # fp32: 4 reads + 3 writes of 4 B; lp: g and copy 2 B each
            floor_ms = floor_bytes / bandwidth * 1e3
            for block, warps, chunk_blocks in configs:
                _kernels.BLOCK, _kernels.NUM_WARPS = block, warps
                _kernels.CHUNK_BLOCKS = chunk_blocks
                _kernels._CHUNKS.clear()
                recorder.original.cache_clear()
                recorder.compiled.clear()
                opt.step()  # compiles
                ms = [kernel_ms(opt)[0] for _ in range(3)]
                row = {
                    "n": n,
                    "sizes": args.sizes,
                    "lp": lp,
                    "block": block,
                    "num_warps": warps,
                    "chunk_blocks": chunk_blocks,
                    "update_ms": statistics.median(ms),
                    "update_ms_runs": ms,
                    "floor_ms": floor_ms,
                    "x_floor": statistics.median(ms) / floor_ms,
                    "ptx_loads": recorder.vector_loads(),
                }
                lines.append(row)
                print(json.dumps(row), flush=True)
            del opt
            for p in params:
                p.grad = None
            torch.cuda.empty_cache()
        del mb
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            for row in lines:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
