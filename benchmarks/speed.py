"""The training step against its alternatives, each arm in its own fresh process.

Arms (Adam, batch 128 shared by all models, cross-entropy; ms per training step):

- `loop`: N `nn.Module`s and N `torch.optim.Adam`, one after another (timed on at
  most `--loop-cap` models, scaled to N).
- `recipe`: the torch.func recipe: `stack_module_state` + `vmap(functional_call)`
  + torch's fused Adam with one shared lr, eager.
- `recipe_compiled`: the same recipe with `torch.compile` on the loss and on
  `opt.step()` (inductor defaults).
- `quickstart`: the README's loop (`mb.zero_grad(); mb.compute_loss(mb(x), y)
  .backward(); mb.step()`), per-model lr.
- `compiled`: `modelbatch.compile_step` (one CUDA graph), per-model lr; run in
  `--repeats` fresh processes, each with a fresh Triton cache.
- `jax`: `jit(vmap(value_and_grad))` with `optax.inject_hyperparams(optax.adam)`
  per-model lr, donated buffers (skipped where jax is missing).

bf16 means autocast (torch) or bf16 compute with float32 master weights (JAX);
fp32 has TF32 off. For the compiled step each process also profiles a few
replays: kernels per step, GPU time by kernel family, and the optimizer
kernels' time against their memory roofline (bytes they must move over the
measured device-to-device copy bandwidth).

    python benchmarks/speed.py --out benchmarks/results          # the driver (GPU machine)
    python benchmarks/speed.py --quick --device cpu --out /tmp/x  # a smoke test on the CPU
    # the CPU comparison: one thread, each arm in 3 fresh processes
    python benchmarks/speed.py --device cpu --models mlp_64-64-10 --precisions fp32 \
        --arms loop recipe quickstart --n 16 64 256 --batch 64 --threads 1 \
        --repeats 3 --all-repeats --target-ms 300 --tag _cpu
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
MODELS = {
    "mlp_784-64-64-10": (784, 64, 64, 10),
    "mlp_784-512-512-10": (784, 512, 512, 10),
    "mlp_64-64-10": (64, 64, 64, 10),  # the CPU comparison (digits-sized input)
}
NS = (1, 128, 1024, 4096, 16384)
ARMS = ("loop", "recipe", "recipe_compiled", "quickstart", "compiled", "jax")
#: the N each arm is timed at (the slow arms skip the largest N).
ARM_NS = {
    "loop": (1, 128, 1024, 4096, 16384),
    "recipe": (1, 128, 1024, 4096, 16384),
    "recipe_compiled": (128, 1024, 4096),
    "quickstart": (1, 128, 1024, 4096, 16384),
    "compiled": (1, 128, 1024, 4096, 16384),
    "jax": (1, 128, 1024, 4096, 16384),
}
LR = 1e-3
BATCH = 128


# ---------------------------------------------------------------------- one arm (child process)


def _torch_setup(device: str) -> Any:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch


def _mlp(sizes: tuple[int, ...]) -> Any:
    from _models import mlp

    return mlp(*sizes)()


def _data(torch: Any, sizes: tuple[int, ...], device: str, k: int = 4) -> list:
    g = torch.Generator(device="cpu").manual_seed(0)
    return [
        (
            torch.randn(BATCH, sizes[0], generator=g).to(device),
            torch.randint(0, sizes[-1], (BATCH,), generator=g).to(device),
        )
        for _ in range(k)
    ]


def _lrs(n: int) -> list[float]:
    return [LR * (0.5 + 1.5 * i / max(n - 1, 1)) for i in range(n)]


def _timer(
    torch: Any, device: str, step: Any, batches: list, target_ms: float, repeats: int
) -> dict:
    """Median ms per step over `repeats` runs of about `target_ms` each, after warm-up."""
    cuda = device == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    k = len(batches)
    for i in range(6):
        step(*batches[i % k])
    sync()
    t0 = time.perf_counter()
    for i in range(3):
        step(*batches[i % k])
    sync()
    probe = (time.perf_counter() - t0) / 3 * 1e3
    iters = max(3, min(500, math.ceil(target_ms / max(probe, 1e-3))))
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(iters):
                step(*batches[i % k])
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / iters)
        else:
            t0 = time.perf_counter()
            for i in range(iters):
                step(*batches[i % k])
            times.append((time.perf_counter() - t0) / iters * 1e3)
    return {
        "ms": statistics.median(times),
        "ms_min": min(times),
        "ms_max": max(times),
        "iters": iters,
    }


def _autocast(torch: Any, device: str, precision: str) -> Any:
    import contextlib

    if precision == "bf16":
        return torch.autocast(device, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def arm_loop(torch: Any, sizes, n, device, precision, cap):  # type: ignore[no-untyped-def]
    import torch.nn.functional as F

    timed = min(n, cap)
    with torch.device(device):
        models = [_mlp(sizes) for _ in range(timed)]
    opts = [torch.optim.Adam(m.parameters(), lr=LR) for m in models]

    def step(x, y):  # type: ignore[no-untyped-def]
        for m, o in zip(models, opts):
            o.zero_grad(set_to_none=True)
            with _autocast(torch, device, precision):
                loss = F.cross_entropy(m(x), y)
            loss.backward()
            o.step()

    return step, n / timed


def _recipe(torch: Any, sizes, n, device, precision, compiled):  # type: ignore[no-untyped-def]
    import copy

    import torch.nn.functional as F
    from torch.func import functional_call, stack_module_state

    with torch.device(device):
        models = [_mlp(sizes) for _ in range(n)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    del models

    def one(p, b, x, y):  # type: ignore[no-untyped-def]
        return F.cross_entropy(functional_call(base, (p, b), (x,)), y)

    def loss_fn(p, b, x, y):  # type: ignore[no-untyped-def]
        with _autocast(torch, device, precision):
            return torch.vmap(one, in_dims=(0, 0, None, None))(p, b, x, y).sum()

    opt = torch.optim.Adam(list(params.values()), lr=LR, fused=device == "cuda")
    opt_step = opt.step
    if compiled:
        loss_fn = torch.compile(loss_fn)
        opt_step = torch.compile(opt.step)

    def step(x, y):  # type: ignore[no-untyped-def]
        opt.zero_grad(set_to_none=True)
        loss_fn(params, buffers, x, y).backward()
        opt_step()

    return step, 1.0


def arm_quickstart(torch: Any, sizes, n, device, precision):  # type: ignore[no-untyped-def]
    from modelbatch import ModelBatch

    with torch.device(device):
        models = [_mlp(sizes) for _ in range(n)]
    mb = ModelBatch(models, lr_list=_lrs(n), optimizer_cls=torch.optim.Adam)
    del models

    def step(x, y):  # type: ignore[no-untyped-def]
        mb.zero_grad()
        with _autocast(torch, device, precision):
            loss = mb.compute_loss(mb(x), y)
        loss.backward()
        mb.step()

    return step, 1.0


def arm_compiled(torch: Any, sizes, n, device, precision):  # type: ignore[no-untyped-def]
    import warnings

    from modelbatch import ModelBatch, compile_step
    from modelbatch.optim import OptimizerFactory

    with torch.device(device):
        models = [_mlp(sizes) for _ in range(n)]
    mb = ModelBatch(models)
    del models
    opt = OptimizerFactory(torch.optim.Adam).create_optimizer(mb, [{"lr": lr} for lr in _lrs(n)])
    dtype = torch.bfloat16 if precision == "bf16" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step = compile_step(mb, opt, autocast_dtype=dtype)
    step.param_bytes = sum(p.numel() for p in mb.parameters())  # type: ignore[attr-defined]
    return step, 1.0


def arm_jax(sizes, n, precision, target_ms, repeats):  # type: ignore[no-untyped-def]
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    if precision == "fp32":
        # Like TF32 off on the torch side: XLA may otherwise use TF32 for float32 dots.
        jax.config.update("jax_default_matmul_precision", "float32")
    key = jax.random.PRNGKey(0)

    def init(key):  # type: ignore[no-untyped-def]
        params = []
        for a, b in itertools.pairwise(sizes):
            key, k1, k2 = jax.random.split(key, 3)
            bound = 1 / math.sqrt(a)
            params.append(
                (
                    jax.random.uniform(k1, (a, b), minval=-bound, maxval=bound),
                    jax.random.uniform(k2, (b,), minval=-bound, maxval=bound),
                )
            )
        return params

    params = jax.vmap(init)(jax.random.split(key, n))
    compute = jnp.bfloat16 if precision == "bf16" else jnp.float32

    def loss_fn(params, x, y):  # type: ignore[no-untyped-def]
        h = x.astype(compute)
        for i, (w, b) in enumerate(params):
            h = h @ w.astype(compute) + b.astype(compute)
            if i < len(params) - 1:
                h = jax.nn.relu(h)
        logp = jax.nn.log_softmax(h.astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    opt = optax.inject_hyperparams(optax.adam)(learning_rate=LR)
    state = jax.vmap(opt.init)(params)
    state.hyperparams["learning_rate"] = jnp.asarray(_lrs(n), dtype=jnp.float32)

    def one(p, s, x, y):  # type: ignore[no-untyped-def]
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    @jax.jit
    def _step(p, s, x, y):  # type: ignore[no-untyped-def]
        return jax.vmap(one, in_axes=(0, 0, None, None))(p, s, x, y)

    step_fn = jax.jit(_step, donate_argnums=(0, 1))
    rng = np.random.default_rng(0)
    batches = [
        (
            jnp.asarray(rng.standard_normal((BATCH, sizes[0]), dtype=np.float32)),
            jnp.asarray(rng.integers(0, sizes[-1], BATCH)),
        )
        for _ in range(4)
    ]
    holder = {"p": params, "s": state}

    def step(x, y):  # type: ignore[no-untyped-def]
        holder["p"], holder["s"], loss = step_fn(holder["p"], holder["s"], x, y)
        return loss

    for i in range(6):
        step(*batches[i % 4])
    jax.block_until_ready(holder["p"])
    t0 = time.perf_counter()
    for i in range(3):
        step(*batches[i % 4])
    jax.block_until_ready(holder["p"])
    probe = (time.perf_counter() - t0) / 3 * 1e3
    iters = max(3, min(500, math.ceil(target_ms / max(probe, 1e-3))))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(iters):
            step(*batches[i % 4])
        jax.block_until_ready(holder["p"])
        times.append((time.perf_counter() - t0) / iters * 1e3)
    return {
        "ms": statistics.median(times),
        "ms_min": min(times),
        "ms_max": max(times),
        "iters": iters,
    }


def _copy_bandwidth(torch: Any) -> float:
    """Measured device-to-device copy bandwidth, bytes read + written per second."""
    a = torch.empty(2**28, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 10
    return 2 * a.numel() * 4 / seconds


def _host_profile(step: Any, batches: list) -> list:
    """Where the host time of an eager step goes: the top functions by cumulative time."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for i in range(20):
        step(*batches[i % len(batches)])
    prof.disable()
    stats = pstats.Stats(prof).sort_stats("cumulative")
    rows = []
    for (file, line, fn), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append([f"{pathlib.Path(file).name}:{line}:{fn}", round(ct / 20 * 1e3, 3)])
    return sorted(rows, key=lambda r: -r[1])[:40]


def child(args: argparse.Namespace) -> None:
    """Time one arm for one model and precision at every N given; JSON lines on stdout."""
    sizes = MODELS[args.model]
    if args.arm == "jax":
        try:
            import jax  # noqa: F401
            import optax  # noqa: F401
        except ImportError:
            print(json.dumps({"status": "skipped", "reason": "jax or optax missing"}), flush=True)
            return
        for n in args.n:
            try:
                res = arm_jax(sizes, n, args.precision, args.target_ms, args.timing_repeats)
                res["status"] = "ok"
            except Exception as err:
                res = {"status": "error", "reason": repr(err)[:300]}
            print(json.dumps({"n": n, **res}), flush=True)
        return
    global BATCH
    BATCH = args.batch
    torch = _torch_setup(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    batches = _data(torch, sizes, device)
    bandwidth = _copy_bandwidth(torch) if args.arm == "compiled" and device == "cuda" else None
    for n in args.n:
        try:
            if args.arm == "loop":
                step, scale = arm_loop(torch, sizes, n, device, args.precision, args.loop_cap)
            elif args.arm in ("recipe", "recipe_compiled"):
                step, scale = _recipe(
                    torch, sizes, n, device, args.precision, args.arm == "recipe_compiled"
                )
            elif args.arm == "quickstart":
                step, scale = arm_quickstart(torch, sizes, n, device, args.precision)
            else:
                step, scale = arm_compiled(torch, sizes, n, device, args.precision)
            res = _timer(torch, device, step, batches, args.target_ms, args.timing_repeats)
            if args.arm == "quickstart" and n == args.n[0]:
                res["host_profile"] = _host_profile(step, batches)
            for key in ("ms", "ms_min", "ms_max"):
                res[key] *= scale
            res["status"] = "ok"
            if scale != 1.0:
                res["scaled_from_models"] = round(n / scale)
            if args.arm == "compiled" and device == "cuda":
                from _timing import profile_kernels

                it = itertools.cycle(batches)
                res["profile"] = profile_kernels(lambda s=step, i=it: s(*next(i)))
                res["mode"] = step.mode
                # Adam moves p, g, m, v in and p, m, v out: 28 bytes per fp32 parameter.
                params = step.param_bytes
                floor_ms = params * 28 / bandwidth * 1e3
                res["optimizer_roofline_ms"] = floor_ms
                res["copy_bandwidth_tb_s"] = bandwidth / 1e12
        except Exception as err:
            res = {"status": "error", "reason": repr(err)[:300]}
        print(json.dumps({"n": n, **res}), flush=True)
        step = None  # type: ignore[assignment]
        if device == "cuda":
            import gc

            gc.collect()
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------- the driver


def run_child(
    arm: str, model: str, precision: str, ns: list[int], args: argparse.Namespace
) -> list[dict]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(HERE.parent / "src") + os.pathsep + env.get("PYTHONPATH", "")
    # A fresh compile cache per process: the speed may not depend on a cached first tuning.
    cache = tempfile.mkdtemp(prefix="mb_cache_")
    env["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
    env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache, "inductor")
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [
        sys.executable, __file__, "--child", "--arm", arm, "--model", model, "--precision", precision,
        "--device", args.device, "--target-ms", str(args.target_ms),
        "--timing-repeats", str(args.timing_repeats), "--loop-cap", str(args.loop_cap),
        "--batch", str(args.batch), "--threads", str(args.threads),
        "--n", *map(str, ns),
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.child_timeout)
    records = []
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            rec.update(arm=arm, model=model, precision=precision)
            records.append(rec)
    if proc.returncode != 0:
        records.append(
            {"arm": arm, "model": model, "precision": precision, "status": "crashed",
             "reason": proc.stderr[-600:]}
        )  # fmt: skip
    print(f"  {arm:16s} {model:20s} {precision:5s} {time.perf_counter() - t0:6.1f}s", flush=True)
    for r in records:
        shown = (
            f"{r['ms']:9.3f} ms"
            if r.get("status") == "ok"
            else f"{r.get('status')}: {r.get('reason', '')[:160]}"
        )
        print(f"      N={r.get('n', '-'):>6} {shown}", flush=True)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--arm", default="compiled")
    parser.add_argument("--arms", nargs="*", default=list(ARMS))
    parser.add_argument("--model", default="mlp_784-64-64-10")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--precisions", nargs="*", default=["fp32", "bf16"])
    parser.add_argument("--n", nargs="*", type=int)
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--repeats", type=int, default=5, help="fresh processes for the compiled step"
    )
    parser.add_argument("--timing-repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=BATCH, help="examples per step")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--all-repeats", action="store_true", help="every arm in --repeats fresh processes"
    )
    parser.add_argument("--target-ms", type=float, default=100.0)
    parser.add_argument("--loop-cap", type=int, default=16)
    parser.add_argument("--child-timeout", type=float, default=400.0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke test)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.quick:
        args.repeats, args.timing_repeats, args.target_ms = 2, 2, 5.0
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M", time.gmtime())
    path = out / f"speed_{stamp}{args.tag}.json"
    records: list[dict] = []
    meta = {"date": stamp, "command": " ".join(sys.argv), "batch": args.batch, "lr_base": LR}
    for model in args.models:
        for precision in args.precisions:
            for arm in args.arms:
                ns = list(args.n or ARM_NS[arm])
                if args.quick:
                    ns = [n for n in ns if n <= 128][:2] or [1]
                reps = args.repeats if arm == "compiled" or args.all_repeats else 1
                for rep in range(reps):
                    for r in run_child(arm, model, precision, ns, args):
                        r["process"] = rep
                        records.append(r)
                    path.write_text(json.dumps({"meta": meta, "results": records}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
