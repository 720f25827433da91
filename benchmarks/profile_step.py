"""Where the time of one step goes: kernels of the modelbatch step and of the ideal, by CUDA time.

    PYTHONPATH=src python benchmarks/profile_step.py --model mlp_784-512-512-10 --n 1024

Both steps run eagerly here (a profiler sees the kernels, not one graph launch);
the modelbatch step is the body `compile_step` captures, with the fused optimizer.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import _arms
from _models import MODELS, make_batches
from run import set_precision


def kernels(fn, batches, steps: int = 3) -> str:
    for i in range(3):
        fn(*batches[i % len(batches)])
    torch.cuda.synchronize()
    with profile(
        activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], record_shapes=True
    ) as prof:
        for i in range(steps):
            fn(*batches[i % len(batches)])
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events) / steps / 1e3
    count = sum(e.count for e in events) / steps
    lines = [f"  {total:.3f} ms of kernels per step, {count:.0f} kernels per step"]
    for e in events[:14]:
        lines.append(
            f"  {e.device_time_total / steps / 1e3:8.3f} ms {e.count // steps:4d}x  {e.key[:90]}"
        )
    ops = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    ops.sort(key=lambda e: -e.self_device_time_total)
    lines.append("  by operator (self CUDA time):")
    for e in ops[:12]:
        lines.append(
            f"  {e.self_device_time_total / steps / 1e3:8.3f} ms {e.count // steps:4d}x  {e.key[:80]}"
        )
    copies = [
        e
        for e in prof.key_averages(group_by_input_shape=True)
        if e.key in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::bmm", "aten::mm")
    ]
    copies.sort(key=lambda e: -e.device_time_total)
    for e in copies[:8]:
        lines.append(
            f"  {e.device_time_total / steps / 1e3:8.3f} ms {e.count // steps:4d}x  "
            f"{e.key} {str(e.input_shapes)[:110]}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mlp_784-512-512-10")
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args()
    dtype = set_precision(args.precision)
    make, in_shape, sizes = MODELS[args.model]
    device = torch.device("cuda")
    batches = make_batches(in_shape, 128, 4, device)
    print(f"== {args.model} N={args.n} {args.precision}")
    if sizes is not None:
        ideal = _arms._IdealMLP(sizes, args.n, device, dtype)

        def ideal_eager(x, y):
            ideal.opt.zero_grad(set_to_none=True)
            return ideal.body(x, y)

        print("ideal (eager, no graph):\n" + kernels(ideal_eager, batches))
        del ideal
    mb = _arms.build_batch(make, args.n, device)
    step, _keep, _ = _arms.modelbatch_step(mb, dtype, "auto")
    for i in range(4):
        step(*batches[i % len(batches)])  # compiles the fused optimizer
    print("modelbatch step body (eager, fused optimizer):\n" + kernels(step._eager, batches))


if __name__ == "__main__":
    main()
