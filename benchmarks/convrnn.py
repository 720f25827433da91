"""Convolutional and recurrent models: sequential loop, torch.func recipe, compile_step, JAX.

Four models (LeNet-5 on 1x28x28, a 3-conv CNN on 3x32x32, a GRU over 40 steps,
a residual CNN with BatchNorm on 3x32x32), batch 128 shared by all models,
Adam with a different lr per model where the arm allows it, N = 64 and 512,
fp32 (TF32 off) and bf16 (autocast; JAX casts parameters and inputs). Arms:

- `sequential`: N separate models and N `torch.optim.Adam`; a few models are
  timed for a few steps and the time per model-step is scaled to N;
- `torch_func`: `stack_module_state` + `vmap(functional_call)` + one torch Adam;
- `compile_step`: `ModelBatch` + `OptimizerFactory(torch.optim.Adam)` (per-model
  lr) + `modelbatch.fast.compile_step`;
- `jax`: the same architecture in `jax.lax` / `jax.numpy`,
  `jit(vmap(value_and_grad))` + `optax.inject_hyperparams(optax.adam)` with a
  per-model lr, donated buffers (skipped where JAX is missing).

Every (arm, model) runs in its own fresh subprocess. Each time is the median
over repeats of synchronized wall-clock runs after warm-up. The parent prints
the table, each conv model's FLOP per step (torch's FLOP counter, forward and
backward) with the achieved fraction of the matmul rate measured in its own
subprocess, and the issue's targets as met or missed; it writes
`<out>/convrnn.json`, `<out>/convrnn.md` and, for the compile_step arm, a
profile per configuration under `<out>/profiles/`.

    PYTHONPATH=src python benchmarks/convrnn.py --out benchmarks/results/convrnn   # GPU
    PYTHONPATH=src python benchmarks/convrnn.py --quick --device cpu --out /tmp/cr  # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

ARMS = ("sequential", "torch_func", "compile_step", "jax")
PRECISIONS = ("fp32", "bf16")
MODELS = ("lenet5", "cnn", "gru", "resnet_bn")
CONV_MODELS = ("lenet5", "cnn", "resnet_bn")
LR = 1e-3
CLASSES = 10


# ---------------------------------------------------------------------- timing


def timed(
    step: Callable[[], Any], sync: Callable[[Any], None], opts: dict[str, Any]
) -> dict[str, Any]:
    """Median ms per call of `step` over `repeats` runs of `iters` calls, after warm-up."""
    out = None
    for _ in range(opts["warmup"]):
        out = step()
    sync(out)
    start = time.perf_counter()
    out = step()
    sync(out)
    probe = (time.perf_counter() - start) * 1e3
    iters = max(opts["min_iters"], min(opts["max_iters"], math.ceil(opts["target_ms"] / probe)))
    samples = []
    for _ in range(opts["repeats"]):
        start = time.perf_counter()
        for _ in range(iters):
            out = step()
        sync(out)
        samples.append((time.perf_counter() - start) * 1e3 / iters)
    return {"ms": statistics.median(samples), "ms_min": min(samples), "iters": iters}


# ---------------------------------------------------------------------- torch arms


def _torch_setup(job: dict[str, Any]) -> Any:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch.device(job["device"])


def _autocast(device: Any, precision: str) -> contextlib.AbstractContextManager:
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _batches(job: dict[str, Any], device: Any, count: int = 4) -> list:
    import torch
    from _models import CONV_RNN_MODELS

    shape = CONV_RNN_MODELS[job["model"]][1]
    g = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(job["batch"], *shape, generator=g).to(device),
            torch.randint(0, CLASSES, (job["batch"],), generator=g).to(device),
        )
        for _ in range(count)
    ]


def _sync_torch(device: Any) -> Callable[[Any], None]:
    import torch

    def sync(_: Any) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return sync


def _cycle(fn: Callable, batches: list) -> Callable[[], Any]:
    state = {"i": 0}

    def step() -> Any:
        x, y = batches[state["i"] % len(batches)]
        state["i"] += 1
        return fn(x, y)

    return step


def _free(device: Any) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def arm_sequential(job: dict[str, Any], n: int, precision: str) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from _models import CONV_RNN_MODELS

    device = _torch_setup(job)
    make = CONV_RNN_MODELS[job["model"]][0]
    k = min(n, job["seq_models"])
    with torch.device(device):
        models = [make() for _ in range(k)]
    opts = [torch.optim.Adam(m.parameters(), lr=LR) for m in models]

    def one_pass(x: Any, y: Any) -> None:
        for m, o in zip(models, opts):
            o.zero_grad(set_to_none=True)
            with _autocast(device, precision):
                loss = F.cross_entropy(m(x).float(), y)
            loss.backward()
            o.step()

    timing = timed(_cycle(one_pass, _batches(job, device)), _sync_torch(device), job["timing_seq"])
    per_model = timing["ms"] / k
    return {"ms": per_model * n, "ms_per_model_step": per_model, "timed_models": k, "scaled": True}


def arm_torch_func(job: dict[str, Any], n: int, precision: str) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from _models import CONV_RNN_MODELS
    from torch.func import functional_call, stack_module_state

    device = _torch_setup(job)
    make = CONV_RNN_MODELS[job["model"]][0]
    with torch.device(device):
        models = [make() for _ in range(n)]
    params, buffers = stack_module_state(models)  # type: ignore[arg-type]
    base = copy.deepcopy(models[0]).to("meta")
    del models
    opt = torch.optim.Adam(list(params.values()), lr=LR)

    def run_one(p: dict, b: dict, x: Any) -> Any:
        return functional_call(base, (p, b), (x,))

    forward = torch.vmap(run_one, in_dims=(0, 0, None), randomness="different")
    loss_of = torch.vmap(F.cross_entropy, in_dims=(0, None))

    def step(x: Any, y: Any) -> Any:
        opt.zero_grad(set_to_none=True)
        with _autocast(device, precision):
            out = forward(params, buffers, x)
        loss = loss_of(out.float(), y).sum()
        loss.backward()
        opt.step()
        return loss

    return timed(_cycle(step, _batches(job, device)), _sync_torch(device), job["timing"])


def arm_compile_step(job: dict[str, Any], n: int, precision: str) -> dict[str, Any]:
    import _arms
    import torch
    from _models import CONV_RNN_MODELS

    from modelbatch.nn import _conv

    device = _torch_setup(job)
    make = CONV_RNN_MODELS[job["model"]][0]
    mb = _arms.build_batch(make, n, device)
    dtype = torch.bfloat16 if precision == "bf16" else None
    step, keep, opt_name = _arms.modelbatch_step(mb, dtype, "auto")
    batches = _batches(job, device)
    result = timed(_cycle(step, batches), _sync_torch(device), job["timing"])
    result["optimizer"] = opt_name
    result["conv_lowerings"] = sorted(
        f"x {key[2]} w {key[4]}: {name}" for key, name in _conv.chosen_lowerings().items()
    )
    if job.get("profile_dir") and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for x, y in batches[:3]:
                step(x, y)
            torch.cuda.synchronize(device)
        path = Path(job["profile_dir"]) / f"compile_step_{job['model']}_{precision}_n{n}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            prof.key_averages().table(
                sort_by="cuda_time_total", row_limit=25, max_name_column_width=70
            )
        )
        result["profile"] = str(path)
    del step, keep, mb
    return result


# ---------------------------------------------------------------------- JAX arm


def _jax_model(name: str, jax: Any, jnp: Any, lax: Any) -> tuple[Callable, Callable]:
    """(init(key) -> (params, state), apply(params, state, x) -> (logits, state)); NHWC."""

    def uniform(key: Any, shape: tuple, fan_in: int) -> Any:
        bound = 1 / math.sqrt(fan_in)
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound)

    def dense(key: Any, a: int, b: int) -> dict:
        k1, k2 = jax.random.split(key)
        return {"w": uniform(k1, (a, b), a), "b": uniform(k2, (b,), a)}

    def conv_p(key: Any, k: int, a: int, b: int, bias: bool = True) -> dict:
        k1, k2 = jax.random.split(key)
        p = {"w": uniform(k1, (k, k, a, b), a * k * k)}
        if bias:
            p["b"] = uniform(k2, (b,), a * k * k)
        return p

    def conv(p: dict, x: Any, pad: int, stride: int = 1) -> Any:
        y = lax.conv_general_dilated(
            x,
            p["w"],
            (stride, stride),
            [(pad, pad), (pad, pad)],
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + p["b"] if "b" in p else y

    def linear(p: dict, x: Any) -> Any:
        return x @ p["w"] + p["b"]

    def pool(x: Any) -> Any:  # 2x2 max-pool, stride 2 (every size here is even)
        b, h, w, c = x.shape
        return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))

    def bn_init(c: int) -> tuple[dict, dict]:
        return (
            {"g": jnp.ones((c,)), "b": jnp.zeros((c,))},
            {"mean": jnp.zeros((c,)), "var": jnp.ones((c,))},
        )

    def bn(p: dict, s: dict, x: Any) -> tuple[Any, dict]:
        x32 = x.astype(jnp.float32)
        mean = x32.mean((0, 1, 2))
        var = x32.var((0, 1, 2))
        count = x.shape[0] * x.shape[1] * x.shape[2]
        y = (x32 - mean) * lax.rsqrt(var + 1e-5) * p["g"] + p["b"]
        new = {
            "mean": 0.9 * s["mean"] + 0.1 * lax.stop_gradient(mean),
            "var": 0.9 * s["var"] + 0.1 * lax.stop_gradient(var) * count / (count - 1),
        }
        return y.astype(x.dtype), new

    relu = jax.nn.relu

    if name == "lenet5":

        def init(key: Any) -> tuple[dict, dict]:
            k = jax.random.split(key, 5)
            return {
                "c1": conv_p(k[0], 5, 1, 6),
                "c2": conv_p(k[1], 5, 6, 16),
                "f1": dense(k[2], 400, 120),
                "f2": dense(k[3], 120, 84),
                "f3": dense(k[4], 84, 10),
            }, {}

        def apply(p: dict, s: dict, x: Any) -> tuple[Any, dict]:
            x = pool(relu(conv(p["c1"], x, 2)))
            x = pool(relu(conv(p["c2"], x, 0)))
            x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)  # torch's flatten order
            x = relu(linear(p["f1"], x))
            return linear(p["f3"], relu(linear(p["f2"], x))), s

    elif name == "cnn":

        def init(key: Any) -> tuple[dict, dict]:
            k = jax.random.split(key, 4)
            return {
                "c1": conv_p(k[0], 3, 3, 32),
                "c2": conv_p(k[1], 3, 32, 64),
                "c3": conv_p(k[2], 3, 64, 128),
                "fc": dense(k[3], 128, 10),
            }, {}

        def apply(p: dict, s: dict, x: Any) -> tuple[Any, dict]:
            for c in ("c1", "c2", "c3"):
                x = pool(relu(conv(p[c], x, 1)))
            return linear(p["fc"], x.max(axis=(1, 2))), s

    elif name == "gru":
        hidden = 64

        def init(key: Any) -> tuple[dict, dict]:
            k = jax.random.split(key, 5)
            g = 3 * hidden
            return {
                "w_ih": uniform(k[0], (1, g), hidden),
                "w_hh": uniform(k[1], (hidden, g), hidden),
                "b_ih": uniform(k[2], (g,), hidden),
                "b_hh": uniform(k[3], (g,), hidden),
                "fc": dense(k[4], hidden, 10),
            }, {}

        def apply(p: dict, s: dict, x: Any) -> tuple[Any, dict]:
            xg = (x @ p["w_ih"] + p["b_ih"]).transpose(1, 0, 2)  # [T, B, 3H], hoisted

            def cell(h: Any, xg_t: Any) -> tuple[Any, None]:
                hg = h @ p["w_hh"] + p["b_hh"]
                xr, xz, xn = jnp.split(xg_t, 3, axis=-1)
                hr, hz, hn = jnp.split(hg, 3, axis=-1)
                r = jax.nn.sigmoid(xr + hr)
                z = jax.nn.sigmoid(xz + hz)
                n = jnp.tanh(xn + r * hn)
                return (1 - z) * n + z * h, None

            h0 = jnp.zeros((x.shape[0], hidden), xg.dtype)
            h, _ = lax.scan(cell, h0, xg)
            return linear(p["fc"], h), s

    elif name == "resnet_bn":

        def block_init(key: Any, a: int, b: int, short: bool) -> tuple[dict, dict]:
            k = jax.random.split(key, 3)
            p = {"c1": conv_p(k[0], 3, a, b, False), "c2": conv_p(k[1], 3, b, b, False)}
            s = {}
            p["bn1"], s["bn1"] = bn_init(b)
            p["bn2"], s["bn2"] = bn_init(b)
            if short:
                p["cs"] = conv_p(k[2], 1, a, b, False)
                p["bns"], s["bns"] = bn_init(b)
            return p, s

        def init(key: Any) -> tuple[dict, dict]:
            k = jax.random.split(key, 4)
            p: dict = {"stem": conv_p(k[0], 3, 3, 16, False), "fc": dense(k[3], 32, 10)}
            s: dict = {}
            p["bn0"], s["bn0"] = bn_init(16)
            p["b1"], s["b1"] = block_init(k[1], 16, 16, False)
            p["b2"], s["b2"] = block_init(k[2], 16, 32, True)
            return p, s

        def block(p: dict, s: dict, x: Any, stride: int) -> tuple[Any, dict]:
            new: dict = {}
            out, new["bn1"] = bn(p["bn1"], s["bn1"], conv(p["c1"], x, 1, stride))
            out, new["bn2"] = bn(p["bn2"], s["bn2"], conv(p["c2"], relu(out), 1))
            if "cs" in p:
                x, new["bns"] = bn(p["bns"], s["bns"], conv(p["cs"], x, 0, stride))
            return relu(out + x), new

        def apply(p: dict, s: dict, x: Any) -> tuple[Any, dict]:
            new: dict = {}
            x, new["bn0"] = bn(p["bn0"], s["bn0"], conv(p["stem"], x, 1))
            x, new["b1"] = block(p["b1"], s["b1"], relu(x), 1)
            x, new["b2"] = block(p["b2"], s["b2"], x, 2)
            return linear(p["fc"], x.mean(axis=(1, 2))), new

    else:
        raise ValueError(f"convrnn: no JAX model {name!r}")
    return init, apply


def arm_jax(job: dict[str, Any], n: int, precision: str) -> dict[str, Any]:
    try:
        import jax
        import jax.numpy as jnp
        import optax
        from jax import lax
    except ImportError as err:
        return {"skipped": f"JAX missing ({err})"}
    import numpy as np
    from _models import CONV_RNN_MODELS

    shape = CONV_RNN_MODELS[job["model"]][1]
    if len(shape) == 3:  # CHW -> HWC
        shape = (shape[1], shape[2], shape[0])
    init, apply = _jax_model(job["model"], jax, jnp, lax)
    low = precision == "bf16"
    matmul_precision = "default" if low else "highest"  # fp32: no TF32
    with jax.default_matmul_precision(matmul_precision):
        keys = jax.random.split(jax.random.PRNGKey(0), n)
        params, state = jax.vmap(init)(keys)
        lrs = jnp.linspace(0.5 * LR, 2 * LR, n)
        opt_state = jax.vmap(
            lambda p, lr: optax.inject_hyperparams(optax.adam)(learning_rate=lr).init(p)
        )(params, lrs)
        tx = optax.inject_hyperparams(optax.adam)(learning_rate=LR)  # lr read from the state

        def loss_fn(p: Any, s: Any, x: Any, y: Any) -> Any:
            if low:
                p = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p)
                x = x.astype(jnp.bfloat16)
            logits, s = apply(p, s, x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
            return loss.mean(), s

        def one(p: Any, s: Any, o: Any, x: Any, y: Any) -> Any:
            (loss, s), g = jax.value_and_grad(loss_fn, has_aux=True)(p, s, x, y)
            updates, o = tx.update(g, o, p)
            return optax.apply_updates(p, updates), s, o, loss

        step = jax.jit(jax.vmap(one, in_axes=(0, 0, 0, None, None)), donate_argnums=(0, 1, 2))
        rng = np.random.default_rng(0)
        batches = [
            (
                jnp.asarray(rng.standard_normal((job["batch"], *shape), dtype=np.float32)),
                jnp.asarray(rng.integers(0, CLASSES, job["batch"]), dtype=jnp.int32),
            )
            for _ in range(4)
        ]
        carry = {"p": params, "s": state, "o": opt_state, "i": 0}

        def run() -> Any:
            x, y = batches[carry["i"] % len(batches)]
            carry["i"] += 1
            carry["p"], carry["s"], carry["o"], loss = step(
                carry["p"], carry["s"], carry["o"], x, y
            )
            return loss

        start = time.perf_counter()
        run().block_until_ready()
        compile_s = time.perf_counter() - start
        result = timed(run, lambda out: out.block_until_ready(), job["timing"])
    result["compile_s"] = compile_s
    result["jax"] = jax.__version__
    result["jax_device"] = str(jax.devices()[0])
    return result


# ---------------------------------------------------------------------- peak rate


def arm_peak(job: dict[str, Any]) -> dict[str, Any]:
    """Measured dense matmul rate (TFLOP/s) in fp32 (TF32 off) and bf16."""
    import torch

    device = _torch_setup(job)
    size = 8192 if device.type == "cuda" else 512
    out = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        t = timed(lambda a=a, b=b: a @ b, _sync_torch(device), job["timing"])
        out[precision] = 2 * size**3 / (t["ms"] * 1e-3) / 1e12
    return out


# ---------------------------------------------------------------------- worker


ARM_FUNCS = {
    "sequential": arm_sequential,
    "torch_func": arm_torch_func,
    "compile_step": arm_compile_step,
    "jax": arm_jax,
}


def _is_oom(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}"
    return "OutOfMemory" in text or "out of memory" in text or "RESOURCE_EXHAUSTED" in text


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """Run one arm for one model over its (N, precision) configurations."""
    if job["arm"] == "peak":
        return {"peak_tflops": arm_peak(job)}
    records = []
    fn = ARM_FUNCS[job["arm"]]
    seq_cache: dict[str, dict[str, Any]] = {}
    for precision in job["precisions"]:
        for n in job["ns"]:
            rec: dict[str, Any] = {"model": job["model"], "arm": job["arm"], "precision": precision}
            rec["n"] = n
            try:
                if job["arm"] == "sequential":  # time per model-step does not depend on N
                    if precision not in seq_cache:
                        seq_cache[precision] = fn(job, max(job["ns"]), precision)
                    per = seq_cache[precision]["ms_per_model_step"]
                    rec.update({**seq_cache[precision], "ms": per * n})
                else:
                    rec.update(fn(job, n, precision))
            except Exception as err:
                rec["error"] = "oom" if _is_oom(err) else f"{type(err).__name__}: {err}"[:300]
                rec["traceback"] = traceback.format_exc(limit=4)[-1500:]
            records.append(rec)
            print(json.dumps({k: v for k, v in rec.items() if k != "traceback"}), flush=True)
            if job["arm"] != "jax":
                import torch

                _free(torch.device(job["device"]))
    return {"records": records}


def run_worker(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One fresh Python process for `job`; its last stdout line `RESULT {json}` is the answer."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent / "src"), env.get("PYTHONPATH", "")])
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "wall_s": timeout}
    wall = time.perf_counter() - start
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
            result["wall_s"] = wall
            return result
    return {"error": f"worker failed (rc {proc.returncode}): {proc.stderr[-1500:]}", "wall_s": wall}


# ---------------------------------------------------------------------- FLOP


def flop_per_model_step(model: str, batch: int) -> float:
    """Forward + backward FLOP of one model on one batch (torch's FLOP counter, meta tensors)."""
    import torch
    import torch.nn.functional as F
    from _models import CONV_RNN_MODELS
    from torch.utils.flop_counter import FlopCounterMode

    make, shape = CONV_RNN_MODELS[model]
    with torch.device("meta"):
        m = make()
        x = torch.randn(batch, *shape)
        y = torch.randint(0, CLASSES, (batch,))
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(m(x), y).backward()
    return float(counter.get_total_flops())


# ---------------------------------------------------------------------- report


def _fmt(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "-"
    if "skipped" in rec:
        return "skipped"
    if "error" in rec:
        return "OOM" if rec["error"] == "oom" else "fails"
    mark = "*" if rec.get("scaled") else ""
    return f"{rec['ms']:.3g}{mark}"


def report(result: dict[str, Any]) -> tuple[str, list[str]]:
    """The markdown table and the target lines."""
    recs = {(r["model"], r["precision"], r["n"], r["arm"]): r for r in result["records"]}
    peak = result.get("peak_tflops", {})
    lines = [
        "| model | prec | N | sequential | torch.func | compile_step | JAX | "
        "compile_step / JAX | seq / compile_step | GFLOP/step | compile_step % of peak |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def ms(key: tuple) -> float | None:
        r = recs.get(key)
        return r["ms"] if r is not None and "ms" in r else None

    for model in result["config"]["models"]:
        for prec in result["config"]["precisions"]:
            for n in result["config"]["ns"]:
                cells = [_fmt(recs.get((model, prec, n, arm))) for arm in ARMS]
                ours, jax_ms = ms((model, prec, n, "compile_step")), ms((model, prec, n, "jax"))
                seq = ms((model, prec, n, "sequential"))
                ratio = f"{ours / jax_ms:.2f}" if ours and jax_ms else "-"
                speed = f"{seq / ours:.1f}x" if ours and seq else "-"
                flop = result["flop_per_model_step"].get(model)
                gflop = f"{flop * n / 1e9:.1f}" if flop and model in CONV_MODELS else "-"
                frac = "-"
                if flop and ours and prec in peak and model in CONV_MODELS:
                    frac = f"{100 * flop * n / (ours * 1e-3) / (peak[prec] * 1e12):.1f}%"
                lines.append(
                    f"| {model} | {prec} | {n} | " + " | ".join(cells) + f" | {ratio} | {speed} | "
                    f"{gflop} | {frac} |"
                )
    targets = []
    for model in ("lenet5", "cnn", "gru"):
        for prec in PRECISIONS:
            for n in (64, 512):
                ours, jax_ms = ms((model, prec, n, "compile_step")), ms((model, prec, n, "jax"))
                if ours and jax_ms:
                    verdict = "met" if ours <= 0.9 * jax_ms else "missed"
                    targets.append(
                        f"{verdict}: {model} {prec} N={n} compile_step {ours:.3g} ms <= 0.9 x JAX "
                        f"{jax_ms:.3g} ms (ratio {ours / jax_ms:.2f})"
                    )
    ours = ms(("cnn", "bf16", 512, "compile_step"))
    if ours:
        targets.append(
            f"{'met' if ours <= 25 else 'missed'}: cnn bf16 N=512 {ours:.3g} ms <= 25 ms"
        )
    for prec in PRECISIONS:
        ours, seq = ms(("cnn", prec, 512, "compile_step")), ms(("cnn", prec, 512, "sequential"))
        if ours and seq:
            targets.append(
                f"{'met' if seq / ours >= 40 else 'missed'}: cnn {prec} N=512 "
                f"{seq / ours:.1f}x the sequential loop (>= 40x)"
            )
    return "\n".join(lines), targets


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for the JSON, markdown, profiles"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny N, few steps (smoke test)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--ns", nargs="+", type=int, default=[64, 512])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seq-models", type=int, default=4, help="models timed in the loop arm")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per worker process")
    parser.add_argument("--no-profile", action="store_true", help="skip compile_step profiles")
    args = parser.parse_args(argv)
    timing = {"warmup": 3, "repeats": 5, "target_ms": 100.0, "min_iters": 3, "max_iters": 50}
    timing_seq = {"warmup": 1, "repeats": 3, "target_ms": 30.0, "min_iters": 1, "max_iters": 5}
    if args.quick:
        args.ns, args.batch, args.seq_models = [2], 4, 2
        timing = {"warmup": 2, "repeats": 2, "target_ms": 1.0, "min_iters": 1, "max_iters": 2}
        timing_seq = {"warmup": 1, "repeats": 1, "target_ms": 1.0, "min_iters": 1, "max_iters": 1}
    common = {
        "device": args.device,
        "batch": args.batch,
        "ns": args.ns,
        "precisions": args.precisions,
        "seq_models": args.seq_models,
        "timing": timing,
        "timing_seq": timing_seq,
        "profile_dir": None if args.no_profile else str(args.out / "profiles"),
    }
    t0 = time.perf_counter()
    peak = run_worker({**common, "arm": "peak", "model": None}, args.timeout)
    print(f"matmul rate (TFLOP/s): {peak.get('peak_tflops', peak)}", flush=True)
    records: list[dict[str, Any]] = []
    walls: dict[str, float] = {"peak": peak.get("wall_s", 0.0)}
    for model in args.models:
        for arm in args.arms:
            out = run_worker({**common, "arm": arm, "model": model}, args.timeout)
            walls[f"{arm}/{model}"] = out.get("wall_s", 0.0)
            if "records" in out:
                records += out["records"]
            else:
                records += [
                    {"model": model, "arm": arm, "precision": p, "n": n, "error": out["error"]}
                    for p in args.precisions
                    for n in args.ns
                ]
            print(
                f"{arm:>12} {model:<10} {walls[f'{arm}/{model}']:6.1f} s: "
                + ", ".join(
                    f"{r['precision']}/N={r['n']} {_fmt(r)}"
                    for r in records
                    if r["model"] == model and r["arm"] == arm
                ),
                flush=True,
            )
    import torch

    result: dict[str, Any] = {
        "benchmark": "convrnn",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "torch": torch.__version__,
        "device": args.device,
        "config": {
            "models": args.models,
            "arms": args.arms,
            "ns": args.ns,
            "precisions": args.precisions,
            "batch": args.batch,
            "seq_models": args.seq_models,
            "timing": timing,
            "quick": args.quick,
        },
        "peak_tflops": peak.get("peak_tflops", {}),
        "flop_per_model_step": {m: flop_per_model_step(m, args.batch) for m in args.models},
        "records": records,
        "wall_s": walls,
        "total_wall_s": time.perf_counter() - t0,
    }
    table, targets = report(result)
    result["targets"] = targets
    print()
    print(table)
    print("\n* sequential: time per model-step of a few models, scaled to N")
    for model in args.models:
        if model in CONV_MODELS:
            flop = result["flop_per_model_step"][model]
            print(
                f"{model}: {flop / 1e9:.3f} GFLOP per model-step (forward + backward, batch {args.batch})"
            )
    print("\n".join(targets))
    print(f"total wall time {result['total_wall_s']:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "convrnn.json").write_text(json.dumps(result, indent=2))
    md = [f"# convrnn benchmark ({result['date']}, {args.device})", "", table, ""]
    md += ["* sequential: time per model-step of a few models, scaled to N", ""]
    md += [f"- {t}" for t in targets]
    (args.out / "convrnn.md").write_text("\n".join(md) + "\n")
    print(f"wrote {args.out / 'convrnn.json'} and {args.out / 'convrnn.md'}")
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print("RESULT " + json.dumps(worker(json.loads(sys.argv[2]))), flush=True)
    else:
        main()
