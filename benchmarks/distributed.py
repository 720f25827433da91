"""Scale-out benchmarks: the model axis over torchrun ranks, fast construction, chunked training.

Suites (results as JSON under --out):

- `sharded`: under `torchrun --nproc-per-node G`, one process per GPU (NCCL). The
  compiled step (Adam, per-model lr) of MLP 784-64-64-10 at 16,384 and 65,536
  models per GPU and of a CIFAR-sized CNN (3x32x32, conv 32/64/128 + pool,
  fc 10) at 512 per GPU, fp32 and bf16: model-steps/s per GPU on every rank;
  the time of a metrics gather, of gathering every step, and of a lifecycle
  decision; a distributed checkpoint save and load; and an equality sweep whose
  weights a later run with another G is compared against (scaling efficiency
  and equality: run G = 1 first, then G = 2, 4, 8 with the same --out).

      torchrun --standalone --nproc-per-node 1 benchmarks/distributed.py --suite sharded --out results/dist
      torchrun --standalone --nproc-per-node 8 benchmarks/distributed.py --suite sharded --out results/dist

- `scale`: one GPU. `ModelBatch.from_factory` of 100,000 MLPs 784-64-64-10; the
  in-memory compiled step of those 100,000; then 250,000 models, 110,000
  resident on the GPU and 140,000 in pinned host memory trained by a
  `ChunkedTrainer`, in rounds of 32 batches: model-steps/s against in-memory.

      python benchmarks/distributed.py --suite scale --out results/scale

- CPU smoke test of both: `python benchmarks/distributed.py --suite all --device cpu --quick --out /tmp/d`
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import modelbatch
from modelbatch import ChunkedTrainer, ModelBatch, OptimizerFactory, compile_step
from modelbatch import distributed as dist

LR = 1e-3


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )


def cnn() -> nn.Module:
    """CIFAR-sized: 3x32x32 -> conv 32/64/128 (3x3, each followed by 2x2 max-pool) -> fc 10."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(128 * 4 * 4, 10),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp_784-64-64-10": (mlp, (784,)),
    "cnn_cifar_32-64-128": (cnn, (3, 32, 32)),
}


def configs_for(ids: torch.Tensor, n: int) -> list[dict[str, float]]:
    """Model id's lr, spread over [0.5, 2] x LR by global id (the same under any world size)."""
    return [{"lr": LR * (0.5 + 1.5 * int(i) / max(1, n - 1))} for i in ids]


def batches(shape: tuple[int, ...], batch: int, count: int, device: torch.device) -> list:
    g = torch.Generator(device="cpu").manual_seed(1234)
    return [
        (
            torch.randn(batch, *shape, generator=g).to(device),
            torch.randint(0, 10, (batch,), generator=g).to(device),
        )
        for _ in range(count)
    ]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def time_steps(step: Callable, data: list, device: torch.device, quick: bool) -> dict[str, float]:
    """Median ms per step over repeats, after warm-up (capture included in the warm-up)."""
    warmup, repeats = (3, 2) if quick else (6, 5)
    for i in range(warmup):
        step(*data[i % len(data)])
    probe = timed(lambda: [step(*data[i % len(data)]) for i in range(2)], device) / 2
    iters = max(2, min(200, int(0.25 / max(probe, 1e-4)))) if not quick else 2
    times = []
    for _ in range(repeats):
        t = timed(lambda: [step(*data[i % len(data)]) for i in range(iters)], device)
        times.append(1000 * t / iters)
    return {
        "ms": statistics.median(times),
        "ms_min": min(times),
        "ms_max": max(times),
        "iters": iters,
    }


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "modelbatch": modelbatch.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpus_visible"] = torch.cuda.device_count()
    return env


# ---------------------------------------------------------------------- sharded (issue 16)


def sharded(args: argparse.Namespace, device: torch.device, out: Path) -> None:
    cpu = device.type == "cpu"
    ctx = dist.init(backend="gloo" if cpu else None, device=device if cpu else None)
    device = ctx.device
    g = ctx.world_size
    per_gpu = {"mlp_784-64-64-10": [16384, 65536], "cnn_cifar_32-64-128": [512]}
    if args.quick:
        per_gpu = {"mlp_784-64-64-10": [64, 256], "cnn_cifar_32-64-128": [8]}
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    mode = "auto" if device.type == "cuda" else "eager"
    batch = 16 if args.quick else args.batch
    results: list[dict[str, Any]] = []
    if "steps" not in args.parts.split(","):
        per_gpu = {}
    for name, counts in per_gpu.items():
        make, shape = MODELS[name]
        data = batches(shape, batch, 4, device)
        for per in counts:
            for dname, dtype in dtypes.items():
                row = measure(ctx, make, per, dtype, data, mode, args.quick)
                row.update(model=name, dtype=dname, batch_per_model=batch)
                everyone: list[Any] = [None] * g
                torch.distributed.all_gather_object(everyone, row)
                free(device)
                if not ctx.is_main:
                    continue
                steps = [r["model_steps_per_s"] for r in everyone]
                keys = ("model", "dtype", "models_per_gpu", "models_total", "batch_per_model")
                summary = {
                    **{k: row[k] for k in (*keys, "step_mode")},
                    "world_size": g,
                    "model_steps_per_s_per_gpu": statistics.mean(steps),
                    "model_steps_per_s_per_gpu_min": min(steps),
                    "ms_per_step_max_rank": max(r["ms_per_step"] for r in everyone),
                    "gather_every_step_overhead": max(
                        r["ms_per_step_with_gather"] / r["ms_per_step"] - 1 for r in everyone
                    ),
                    "gather_all_ms": max(r["gather_all_ms"] for r in everyone),
                    "gather_rank0_ms": max(r["gather_rank0_ms"] for r in everyone),
                    "decide_ms": max(r["decide_ms"] for r in everyone),
                    "build_s": max(r["build_s"] for r in everyone),
                    "ranks": everyone,
                }
                results.append(summary)
                print(
                    f"{name} {dname} {per}/GPU x{g}: {summary['model_steps_per_s_per_gpu']:.4g} "
                    f"model-steps/s/GPU, step {row['ms_per_step']:.2f} ms, gather "
                    f"{summary['gather_all_ms']:.3f} ms",
                    flush=True,
                )
    report: dict[str, Any] = {
        "suite": "sharded",
        "world_size": g,
        "env": environment(device),
        "results": results,
    }
    parts = set(args.parts.split(","))
    report["checkpoint"] = checkpoint_timing(ctx, args, out) if "checkpoint" in parts else None
    report["equality"] = equality(ctx, args, out) if "equality" in parts else None
    if ctx.is_main:
        path = out / f"sharded_G{g}.json"
        if (out / "sharded_G1.json").exists() and g > 1:
            base = json.loads((out / "sharded_G1.json").read_text())["results"]
            for r in results:
                for b in base:
                    if all(b[k] == r[k] for k in ("model", "dtype", "models_per_gpu")):
                        r["scaling_efficiency"] = (
                            r["model_steps_per_s_per_gpu"] / b["model_steps_per_s_per_gpu"]
                        )
        path.write_text(json.dumps(report, indent=2))
        print(f"wrote {path}")
    ctx.close()


def measure(
    ctx: dist.Context,
    make: Callable[[], nn.Module],
    per: int,
    dtype: torch.dtype | None,
    data: list,
    mode: str,
    quick: bool,
) -> dict[str, Any]:
    """One configuration on this rank: build, compiled step, gathers and a decision."""
    device, n = ctx.device, per * ctx.world_size
    ids = ctx.shard(range(n))
    t0 = time.perf_counter()
    mb = ModelBatch.from_factory(
        make,
        ids,
        seed=0,
        device=device,
        optimizer_cls=torch.optim.Adam,
        configs=configs_for(ids, n),
    )
    sync(device)
    build_s = time.perf_counter() - t0
    step = compile_step(mb, mb.optimizer, autocast_dtype=dtype, mode=mode)
    t = time_steps(step, data, device, quick)

    def step_and_gather(x: torch.Tensor, y: torch.Tensor) -> None:
        step(x, y)
        ctx.gather(mb.latest_losses)

    with_gather = time_steps(step_and_gather, data, device, quick)
    reps = 5 if quick else 50

    def gathers(dst: int | None) -> float:
        return (
            1000
            * timed(lambda: [ctx.gather(mb.latest_losses, dst=dst) for _ in range(reps)], device)
            / reps
        )

    def decisions() -> None:
        for _ in range(reps):
            ctx.decide(lambda v: v > v.median(), mb.latest_losses)

    return {
        "models_per_gpu": per,
        "models_total": n,
        "step_mode": step.mode,
        "build_s": build_s,
        "ms_per_step": t["ms"],
        "ms_min": t["ms_min"],
        "ms_max": t["ms_max"],
        "model_steps_per_s": len(ids) / (t["ms"] / 1000),
        "ms_per_step_with_gather": with_gather["ms"],
        "gather_all_ms": gathers(None),
        "gather_rank0_ms": gathers(0),
        "decide_ms": 1000 * timed(decisions, device) / reps,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
    }


def checkpoint_timing(ctx: dist.Context, args: argparse.Namespace, out: Path) -> dict | None:
    """Save and load of a sharded MLP run (weights, Adam state), timed across all ranks."""
    device = ctx.device
    per = 64 if args.quick else args.ckpt_per_gpu
    n = per * ctx.world_size
    ids = ctx.shard(range(n))
    mb = ModelBatch.from_factory(
        mlp, ids, seed=0, device=device, optimizer_cls=torch.optim.Adam, configs=configs_for(ids, n)
    )
    data = batches((784,), 16 if args.quick else args.batch, 2, device)
    for x, y in data:
        mb.zero_grad()
        mb.compute_loss(mb(x), y).backward()
        mb.step()
    folder = (args.ckpt_dir or out) / f"ckpt_G{ctx.world_size}"
    ctx.barrier()
    save_s = timed(lambda: dist.save(folder, ctx, mb, step=2), device)
    ctx.barrier()
    load_s = timed(lambda: dist.load(folder, ctx, mb), device)
    size = sum(f.stat().st_size for f in folder.iterdir()) if ctx.is_main else None
    ctx.barrier()
    if ctx.is_main:
        shutil.rmtree(folder, ignore_errors=True)
    result = {
        "models_per_gpu": per,
        "save_s": save_s,
        "load_s": load_s,
        "bytes": size,
        "save_gb_per_s_per_gpu": (size / ctx.world_size / save_s / 1e9) if size else None,
    }
    if ctx.is_main:
        print(f"checkpoint {per}/GPU: save {save_s:.2f} s, load {load_s:.2f} s", flush=True)
    return result


def equality(ctx: dist.Context, args: argparse.Namespace, out: Path) -> dict | None:
    """Train a fixed sweep; rank 0 keeps a fingerprint of its weights and compares it with G = 1's."""
    device = ctx.device
    n = 64 if args.quick else 1024
    ids = ctx.shard(range(n))
    mb = ModelBatch.from_factory(
        mlp, ids, seed=7, device=device, optimizer_cls=torch.optim.Adam, configs=configs_for(ids, n)
    )
    data = batches((784,), 16 if args.quick else args.batch, 4, device)
    for i in range(10):
        x, y = data[i % len(data)]
        mb.zero_grad()
        mb.compute_loss(mb(x), y).backward()
        mb.step()
    # A small fingerprint of every model (64 spread entries and the norm of each
    # parameter), so the file stays a few MB whatever G.
    weights = {}
    for k, t in mb.stacked_params().items():
        flat = t.detach().reshape(t.shape[0], -1).float()
        spread = flat[:, :: max(1, flat.shape[1] // 64)][:, :64]
        weights[k] = ctx.gather(torch.cat([spread, flat.norm(dim=1, keepdim=True)], dim=1), dst=0)
    result = None
    if ctx.is_main:
        weights = {k: v.cpu() for k, v in weights.items()}
        torch.save(weights, out / f"equality_G{ctx.world_size}.pt")
        base_path = out / "equality_G1.pt"
        if base_path.exists() and ctx.world_size > 1:
            base = torch.load(base_path)
            result = {
                k: {
                    "max_abs": float((weights[k] - base[k]).abs().max()),
                    "max_rel": float(
                        ((weights[k] - base[k]).abs() / base[k].abs().clamp_min(1e-6)).max()
                    ),
                    "bitwise": bool(torch.equal(weights[k], base[k])),
                }
                for k in weights
            }
            print(f"equality vs G=1: {result}", flush=True)
    del mb
    free(device)
    return result


# ---------------------------------------------------------------------- scale (issue 15)


def scale(args: argparse.Namespace, device: torch.device, out: Path) -> None:
    quick = args.quick
    n_mem = 512 if quick else 100_000
    n_total = 1280 if quick else args.models
    resident = 256 if quick else args.resident
    rounds_k = 4 if quick else args.round
    batch = 16 if quick else args.batch
    mode = "auto" if device.type == "cuda" else "eager"
    report: dict[str, Any] = {"suite": "scale", "env": environment(device)}

    # Construction: from_factory, twice (the first pays for CUDA's allocator warm-up).
    build = []
    for _ in range(2):
        t0 = time.perf_counter()
        mb = ModelBatch.from_factory(mlp, n_mem, seed=0, device=device)
        sync(device)
        build.append(time.perf_counter() - t0)
        del mb
        free(device)
    n_old = 64 if quick else 1000
    t0 = time.perf_counter()
    with torch.device(device):
        old = ModelBatch([mlp() for _ in range(n_old)])
    sync(device)
    old_s = time.perf_counter() - t0
    del old
    report["build"] = {
        "models": n_mem,
        "from_factory_s": build,
        "modules_then_stack_s_per_1000_models": 1000 * old_s / n_old,
    }
    print(
        f"from_factory {n_mem}: {build} s; modules+stack {1000 * old_s / n_old:.2f} s/1000",
        flush=True,
    )

    data = batches((784,), batch, rounds_k, device)

    # In memory: n_mem models, one compiled step.
    ids = torch.arange(n_mem)
    mb = ModelBatch.from_factory(
        mlp,
        ids,
        seed=0,
        device=device,
        optimizer_cls=torch.optim.Adam,
        configs=configs_for(ids, n_total),
    )
    step = compile_step(mb, mb.optimizer, mode=mode)
    t = time_steps(step, data, device, quick)
    mem = n_mem / (t["ms"] / 1000)
    report["in_memory"] = {"models": n_mem, **t, "model_steps_per_s": mem}
    if device.type == "cuda":
        report["in_memory"]["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(f"in memory {n_mem}: {t['ms']:.1f} ms/step, {mem:.4g} model-steps/s", flush=True)
    del mb, step
    free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # Chunked: `resident` models on the GPU, the rest in pinned host memory.
    t0 = time.perf_counter()
    res_ids = torch.arange(resident)
    off_ids = torch.arange(resident, n_total)
    res = ModelBatch.from_factory(
        mlp,
        res_ids,
        seed=0,
        device=device,
        optimizer_cls=torch.optim.Adam,
        configs=configs_for(res_ids, n_total),
    )
    res_step = compile_step(res, res.optimizer, mode=mode)
    store = ModelBatch.from_factory(mlp, off_ids, seed=0, device="cpu", build_device=device)
    trainer = ChunkedTrainer(
        store,
        OptimizerFactory(torch.optim.Adam),
        configs_for(off_ids, n_total),
        device=device,
        offload=True,
        chunk_size=args.chunk or (96 if quick else None),
    )
    sync(device)
    setup_s = time.perf_counter() - t0
    round_times = []
    for r in range(2 if quick else 3):

        def one_round() -> None:
            for x, y in data:
                res_step(x, y)
            trainer.train(data)

        round_times.append(timed(one_round, device))
        print(f"round {r}: {round_times[-1]:.2f} s (chunk {trainer.chunk_size})", flush=True)
    best = min(round_times[1:])
    chunked = n_total * rounds_k / best
    report["chunked"] = {
        "models": n_total,
        "resident_on_gpu": resident,
        "offloaded_to_host": n_total - resident,
        "chunk_size": trainer.chunk_size,
        "batches_per_round": rounds_k,
        "setup_s": setup_s,
        "round_s": round_times,
        "model_steps_per_s": chunked,
        "vs_in_memory": chunked / mem,
        "host_bytes": sum(t.numel() * t.element_size() for t in store.parameters())
        + sum(
            v.numel() * v.element_size()
            for s in trainer.optimizer.state.values()
            for v in s.values()
            if isinstance(v, torch.Tensor)
        ),
    }
    if device.type == "cuda":
        report["chunked"]["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(
        f"chunked {n_total} ({resident} resident): {chunked:.4g} model-steps/s = "
        f"{chunked / mem:.2f}x in-memory",
        flush=True,
    )
    path = out / "scale.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=["sharded", "scale", "all"], default="sharded")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--batch", type=int, default=128, help="samples per step, shared")
    parser.add_argument(
        "--parts", default="steps,checkpoint,equality", help="of the sharded suite, comma-separated"
    )
    parser.add_argument("--ckpt-per-gpu", type=int, default=16384)
    parser.add_argument("--ckpt-dir", type=Path, default=None)
    parser.add_argument("--models", type=int, default=250_000)
    parser.add_argument("--resident", type=int, default=110_000)
    parser.add_argument("--round", type=int, default=32, help="batches per chunk round")
    parser.add_argument("--chunk", type=int, default=None, help="models per chunk (default: auto)")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.suite in ("scale", "all") and int(os.environ.get("RANK", "0")) == 0:
        scale(args, device, args.out)
    if args.suite in ("sharded", "all"):
        sharded(args, device, args.out)


if __name__ == "__main__":
    main()
