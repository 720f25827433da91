"""The benchmark suite: sequential loop vs modelbatch (eager, fast) vs the hand-written ideal.

One command (on a CUDA machine):

    PYTHONPATH=src python benchmarks/run.py --out benchmarks/results

writes `<out>/bench_<gpu>_<date>.json` (every measurement, with the machine),
then `benchmarks/report.py` turns it into the PNG and the markdown table of
`docs/benchmarks.md`. Every arm trains on the same shared batches, already on
the GPU (batch 128 per model); each time is the median over repeats of CUDA-event
timed runs after warm-up; peak memory is `torch.cuda.max_memory_allocated`
over the arm's own run.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import pathlib
import sys
import time
from typing import Any

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import _arms
from _models import MODELS, make_batches

PRECISIONS = ("fp32", "tf32", "bf16")
NS = (1, 8, 32, 128, 512, 1024, 4096)
# modelbatch arms: name, compile_step mode, further compile_step options
VARIANTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("eager", "eager", {}),
    ("fast", "auto", {}),
    ("fast_compiled", "auto", {"compile_model": True}),
)


def set_precision(precision: str) -> torch.dtype | None:
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    return torch.bfloat16 if precision == "bf16" else None


def cleanup() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def measure(build: Any, batches: list, timing: dict) -> dict[str, Any]:
    """Build an arm, time it, and read its peak memory; 'oom' where it does not fit."""
    cleanup()
    keep: list = []
    try:
        built = build()
        step, keep = built[0], list(built[1:])
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result = _arms.time_step(step, batches, **timing)
        result["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["status"] = "ok"
        extra = [k for k in keep if isinstance(k, str)]
        if extra:
            result["optimizer"] = extra[0]
        if hasattr(step, "mode"):
            result["step_mode"] = step.mode
    except torch.OutOfMemoryError:
        result = {"status": "oom"}
    finally:
        del keep
        cleanup()
    return result


def run_config(
    args: argparse.Namespace,
    name: str,
    make: Any,
    sizes: tuple[int, ...] | None,
    n: int,
    batches: list,
    seq_cache: dict[tuple[str, str], dict[str, Any]],
    records: list[dict[str, Any]],
) -> None:
    """Every arm and precision for one model and N; appends to `records`."""
    device = torch.device("cuda")
    timing = {"repeats": args.repeats}
    for precision in args.precisions:
        dtype = set_precision(precision)

        def add(arm: str, res: dict[str, Any], precision: str = precision, **extra: Any) -> None:
            rec = {"model": name, "n": n, "precision": precision, "arm": arm, **res, **extra}
            if res.get("status") == "ok":
                rec["model_steps_per_s"] = n / (rec["ms"] / 1e3)
            records.append(rec)
            ms = rec.get("ms")
            shown = f"{ms:9.3f} ms" if ms is not None else rec["status"]
            print(f"{name:20s} N={n:5d} {precision:5s} {arm:10s} {shown}", flush=True)

        if "sequential" in args.arms:
            timed = min(n, args.seq_cap)
            key = (name, precision)
            if timed == args.seq_cap and key in seq_cache:
                res = dict(seq_cache[key])
            else:
                res = measure(
                    lambda timed=timed, dtype=dtype: _arms.sequential_step(
                        make, timed, device, dtype
                    ),
                    batches,
                    timing,
                )
                if timed == args.seq_cap:
                    seq_cache[key] = dict(res)
            if res.get("status") == "ok":
                for field in ("ms", "ms_min", "ms_max"):
                    res[field] *= n / timed
            add("sequential", res, timed_models=timed, sequential_scaled=timed < n)
        if "ideal" in args.arms and sizes is not None:
            res = measure(
                lambda dtype=dtype: _arms.ideal_step(sizes, n, device, dtype), batches, timing
            )
            add("ideal", res)
        for arm, mode, options in VARIANTS:
            if arm not in args.arms:
                continue
            # A fresh batch for every arm: the fast step stores weights in their
            # gradients' layout and trains them, which an arm timed after it
            # on the same batch would inherit.
            try:
                mb = _arms.build_batch(make, n, device)
            except torch.OutOfMemoryError:
                cleanup()
                add(arm, {"status": "oom"})
                continue
            res = measure(
                lambda mode=mode, dtype=dtype, mb=mb, options=options: _arms.modelbatch_step(
                    mb, dtype, mode, **options
                ),
                batches,
                timing,
            )
            add(arm, res)
            del mb
            cleanup()


def main(argv: list[str] | None = None) -> pathlib.Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--n", nargs="*", type=int, default=list(NS))
    parser.add_argument("--precisions", nargs="*", default=list(PRECISIONS))
    parser.add_argument("--arms", nargs="*", default=["sequential", "eager", "fast", "ideal"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seq-cap", type=int, default=32, help="most models the loop times")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=480, help="stop starting configs after")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/run.py: needs a CUDA device; run it on a GPU machine.")

    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    now = datetime.datetime.now(datetime.timezone.utc)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = props.name.replace(" ", "-")
    path = out / f"bench_{gpu}_{now:%Y%m%d-%H%M}{args.tag}.json"
    meta = {
        "gpu": props.name,
        "gpu_memory_gb": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": now.isoformat(timespec="seconds"),
        "batch_per_model": args.batch,
        "repeats": args.repeats,
        "sequential_timed_models": args.seq_cap,
        "command": " ".join(sys.argv),
        "note": (
            f"The sequential loop is timed on at most {args.seq_cap} models and scaled "
            "linearly to N (sequential_scaled=true)."
        ),
    }
    records: list[dict[str, Any]] = []
    seq_cache: dict[tuple[str, str], dict[str, Any]] = {}
    t0 = time.perf_counter()

    def save() -> None:
        path.write_text(json.dumps({"meta": meta, "results": records}, indent=1))

    for name in args.models:
        make, in_shape, sizes = MODELS[name]
        batches = make_batches(in_shape, args.batch, 4, device)
        for n in args.n:
            if time.perf_counter() - t0 > args.budget_s:
                print(f"budget of {args.budget_s}s spent: skipping {name} N={n}", flush=True)
                meta["stopped_early"] = True
                continue
            run_config(args, name, make, sizes, n, batches, seq_cache, records)
            save()
    meta["elapsed_s"] = round(time.perf_counter() - t0, 1)
    save()
    print(f"wrote {path}", flush=True)
    return path


if __name__ == "__main__":
    main()
