"""Ensemble prediction of N members in one vectorized forward against a loop over members.

Every arm computes the same thing, the mean of the N members' softmax
probabilities on one shared batch `[B, IN]` already on the device, in eval
mode under `torch.no_grad`:

- `loop`: what torchensemble's `VotingClassifier.forward` does: a Python loop
  over N ordinary member modules (`[F.softmax(m(x), dim=1) for m in members]`),
  then the average. The members are unstacked from the ModelBatch once
  (`mb.model(i)` for every i); that one-time cost is reported as `unstack_s`.
- `modelbatch`: `modelbatch.ensemble.ensemble_predict(mb, x)`: one
  `torch.vmap` over `functional_call` on the stacked weights.
- `exported`: the `StackedEnsemble` from `export_ensemble(mb)` (the same
  computation in a plain inference module).
- `exported_compiled` (CUDA, unless `--no-compile`): that module under
  `torch.compile`; its compile time is reported as `compile_s`.

Each time is the median over `--repeats` runs after `--warmup` runs, bracketed
by `torch.cuda.synchronize()`; `max_abs_diff` compares each arm's output with
the loop's. TF32 stays off (torch's default), so all arms do fp32 math.

    PYTHONPATH=src python benchmarks/ensemble.py --out benchmarks/results/ensemble   # GPU
    PYTHONPATH=src python benchmarks/ensemble.py --quick --out /tmp/ensemble         # CPU, small
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import sync, timed

from modelbatch import ModelBatch
from modelbatch.ensemble import ensemble_predict, export_ensemble


def mlp(inputs: int, hidden: int, classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(inputs, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )


def voting_loop(members: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """torchensemble's VotingClassifier.forward: softmax of each member, then the average."""
    outputs = [F.softmax(m(x), dim=1) for m in members]
    return sum(outputs) / len(outputs)  # type: ignore[return-value]


@torch.no_grad()
def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    with torch.device(device):
        models = [mlp(args.inputs, args.hidden, args.classes) for _ in range(args.members)]
        x = torch.randn(args.batch, args.inputs)
    mb = ModelBatch(models).eval()
    del models  # the stacked tensors are the weights, as in a trained batch
    start = time.perf_counter()
    members = [mb.model(i).eval() for i in range(args.members)]
    sync(device)
    unstack_s = time.perf_counter() - start
    ens = export_ensemble(mb)

    arms: dict[str, Callable[[], torch.Tensor]] = {
        "loop": lambda: voting_loop(members, x),
        "modelbatch": lambda: ensemble_predict(mb, x),  # type: ignore[dict-item]
        "exported": lambda: ens(x),  # type: ignore[dict-item]
    }
    compile_s = None
    if device.type == "cuda" and not args.no_compile:
        compiled = torch.compile(ens)
        start = time.perf_counter()
        compiled(x)
        sync(device)
        compile_s = time.perf_counter() - start
        arms["exported_compiled"] = lambda: compiled(x)  # type: ignore[dict-item]

    reference = arms["loop"]()
    results: dict[str, Any] = {}
    for name, fn in arms.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ms = timed(fn, device, args.warmup, args.repeats)
        diff = (fn() - reference).abs().max().item()
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        results[name] = {"ms": ms, "max_abs_diff": diff, "peak_gib": peak}
        print(f"{name:>18}: {ms:9.3f} ms   max |diff| vs loop {diff:.2e}", flush=True)
    loop_ms = results["loop"]["ms"]
    for r in results.values():
        r["speedup_vs_loop"] = loop_ms / r["ms"]
    params = sum(p.numel() for p in mb.parameters()) // args.members
    return {
        "members": args.members,
        "batch": args.batch,
        "model": f"MLP {args.inputs}-{args.hidden}-{args.hidden}-{args.classes}",
        "params_per_member": params,
        "unstack_s": unstack_s,
        "compile_s": compile_s,
        "arms": results,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Ensemble prediction: {result['members']} members, batch {result['batch']}",
        "",
        f"{result['device']}, torch {result['torch']}, {result['model']} "
        f"({result['params_per_member']:,} parameters per member), fp32, eval, no grad.",
        f"Unstacking the members for the loop (once): {result['unstack_s']:.2f} s."
        + (f" Compile time: {result['compile_s']:.1f} s." if result["compile_s"] else ""),
        "",
        "| arm | ms per prediction | speedup vs loop | max abs diff vs loop | peak GiB |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in result["arms"].items():
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        lines.append(
            f"| {name} | {r['ms']:.3f} | {r['speedup_vs_loop']:.1f}x | "
            f"{r['max_abs_diff']:.1e} | {peak} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write ensemble.json and ensemble.md here")
    parser.add_argument("--quick", action="store_true", help="small sizes on CPU (smoke test)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--members", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--inputs", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile arm")
    args = parser.parse_args(argv)
    if args.quick:
        args.device = args.device or "cpu"
        args.members, args.batch, args.hidden, args.repeats = 16, 64, 32, 3
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"{args.members} members, batch {args.batch}, on {name or device}", flush=True)
    result = {
        "device": name or str(device),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **run(args, device),
    }
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ensemble.json").write_text(json.dumps(result, indent=2))
        (args.out / "ensemble.md").write_text(markdown(result))
        print(f"wrote {args.out / 'ensemble.json'} and {args.out / 'ensemble.md'}")
    return result


if __name__ == "__main__":
    main()
