"""Wall-clock timing shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of `fn` in milliseconds, after warm-up, with device syncs."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def kernel_family(name: str) -> str:
    """The family of a CUDA kernel by its name: optimizer, gemm, copy_cast or other."""
    low = name.lower()
    if "modelbatch_update" in low or "modelbatch_coefficients" in low:
        return "optimizer"
    if any(s in low for s in ("gemm", "cutlass", "xmma", "cublas", "matmul", "sm90_", "nvjet")):
        return "gemm"
    if any(s in low for s in ("copy", "cast", "memcpy", "memset", "fill", "to_copy")):
        return "copy_cast"
    return "other"


def profile_kernels(step: Callable[[], Any], steps: int = 10) -> dict:
    """Kernels per step, GPU time by family and the top kernels, over `steps` calls of `step()`."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    families: dict[str, float] = {}
    kernels: dict[str, list[float]] = {}
    count = 0
    optimizer_us = 0.0
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        count += 1
        us = evt.device_time if hasattr(evt, "device_time") else evt.cuda_time
        fam = kernel_family(evt.name)
        families[fam] = families.get(fam, 0.0) + us
        entry = kernels.setdefault(evt.name[:90], [0.0, 0.0])
        entry[0] += us / steps
        entry[1] += 1 / steps
        if fam == "optimizer" and "update" in evt.name:
            optimizer_us += us
    total = sum(families.values()) or 1.0
    return {
        "kernels_per_step": count / steps,
        "gpu_ms_per_step": total / 1e3 / steps,
        "share": {k: v / total for k, v in families.items()},
        "optimizer_update_ms": optimizer_us / 1e3 / steps,
        "top_kernels_us": sorted(
            ([k, round(v[0], 2), round(v[1], 2)] for k, v in kernels.items()), key=lambda r: -r[1]
        )[:25],
    }
