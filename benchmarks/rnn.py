"""Timing of the vmapped modelbatch LSTM (or GRU) against N sequential cuDNN `nn.LSTM`s.

For each N, both arms run the same N LSTMs (same weights) on one shared batch
already on the device:

- `sequential`: a Python loop over N torch `nn.LSTM` modules (cuDNN on CUDA),
  forward and backward of each model in turn;
- `modelbatch`: one `ModelBatch` of the same N models, whose `nn.LSTM` runs as
  `modelbatch.nn.LSTM` under one `torch.vmap` (one batched matmul per time
  step for all N models).

`--kind gru` runs the same comparison for `nn.GRU`.

Each time is the median over `--repeats` timed runs after `--warmup` runs,
bracketed by `torch.cuda.synchronize()`. Modes: `train` (forward + backward of
a summed loss) and `forward` (inference, `torch.no_grad`). TF32 is off so that
the outputs of the two arms can be compared (`max_abs_diff`, first models).

    PYTHONPATH=src python benchmarks/rnn.py --out rnn.json            # GPU
    PYTHONPATH=src python benchmarks/rnn.py --quick --out rnn.json    # CPU, small sizes
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import timed

from modelbatch import ModelBatch


def build(n: int, args: argparse.Namespace, device: torch.device) -> list[nn.Module]:
    torch.manual_seed(0)
    kind = {"lstm": nn.LSTM, "gru": nn.GRU}[args.kind]
    return [
        kind(
            args.input_size,
            args.hidden_size,
            num_layers=args.layers,
            bidirectional=args.bidirectional,
        ).to(device)
        for _ in range(n)
    ]


def sequential_arm(models: list[nn.Module], x: torch.Tensor, mode: str) -> Callable[[], None]:
    def train() -> None:
        for m in models:
            m.zero_grad(set_to_none=True)
            y, _ = m(x)
            y.square().mean().backward()

    def forward() -> None:
        with torch.no_grad():
            for m in models:
                m(x)

    return train if mode == "train" else forward


def modelbatch_arm(mb: ModelBatch, x: torch.Tensor, mode: str) -> Callable[[], None]:
    def train() -> None:
        mb.zero_grad(set_to_none=True)
        y, _ = mb(x)
        # Sum of per-model means: each model gets exactly its own gradient.
        y.square().mean(dim=tuple(range(1, y.dim()))).sum().backward()

    def forward() -> None:
        with torch.no_grad():
            mb(x)

    return train if mode == "train" else forward


def check(models: list[nn.Module], mb: ModelBatch, x: torch.Tensor, k: int = 4) -> float:
    with torch.no_grad():
        batched = mb(x)[0]
        return max(
            float((batched[i] - models[i](x)[0]).abs().max()) for i in range(min(k, len(models)))
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="small sizes on CPU (smoke test)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--ns", type=int, nargs="+", default=[1, 8, 32, 128, 512])
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--kind", choices=["lstm", "gru"], default="lstm")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--bidirectional", action="store_true")
    parser.add_argument("--modes", nargs="+", default=["train", "forward"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--seq-cap",
        type=int,
        default=128,
        help="time at most this many sequential models and scale linearly beyond",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.device = args.device or "cpu"
        args.ns, args.seq_len, args.batch = [1, 4], 8, 4
        args.input_size, args.hidden_size = 8, 16
        args.warmup, args.repeats = 1, 3
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    x = torch.randn(args.seq_len, args.batch, args.input_size, device=device)
    records: list[dict[str, Any]] = []
    print(
        f"{'N':>6} {'mode':>8} {'sequential ms':>14} {'modelbatch ms':>14} {'speedup':>8} "
        f"{'max|diff|':>10}"
    )
    for n in args.ns:
        models = build(n, args, device)
        mb = ModelBatch(models)
        diff = check(models, mb, x)
        timed_seq = models[: min(n, args.seq_cap)]
        for mode in args.modes:
            seq_ms = timed(sequential_arm(timed_seq, x, mode), device, args.warmup, args.repeats)
            seq_ms *= n / len(timed_seq)
            mb_ms = timed(modelbatch_arm(mb, x, mode), device, args.warmup, args.repeats)
            rec = {
                "n": n,
                "mode": mode,
                "sequential_ms": seq_ms,
                "sequential_extrapolated": len(timed_seq) < n,
                "modelbatch_ms": mb_ms,
                "speedup": seq_ms / mb_ms,
                "max_abs_diff": diff,
            }
            records.append(rec)
            mark = "*" if rec["sequential_extrapolated"] else " "
            print(
                f"{n:>6} {mode:>8} {seq_ms:>13.3f}{mark} {mb_ms:>14.3f} {seq_ms / mb_ms:>7.2f}x "
                f"{diff:>10.2e}",
                flush=True,
            )
        del models, mb
        if device.type == "cuda":
            torch.cuda.empty_cache()

    result = {
        "benchmark": "rnn",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "config": {
            k: getattr(args, k)
            for k in (
                "kind",
                "seq_len",
                "batch",
                "input_size",
                "hidden_size",
                "layers",
                "bidirectional",
                "warmup",
                "repeats",
                "seq_cap",
            )
        },
        "records": records,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
