"""Probe: torch.compile(mode="reduce-overhead") of the vmapped step against compile_step's graph.

PYTHONPATH=src python benchmarks/probe_compile.py --n 1024
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import _arms
from _models import MODELS, make_batches


def probe_one(model, make, n, device, batches):
    mb = _arms.build_batch(make, n, device)
    step, keep, _ = _arms.modelbatch_step(mb, None, "auto")
    graph = _arms.time_step(step, batches)
    del step, keep
    lr = torch.tensor(1e-3, device=device)
    opt = torch.optim.Adam(mb.parameters(), lr=lr, capturable=True)

    def fwd_loss(x, y):
        return mb.per_model_losses(mb(x), y)

    cfwd = torch.compile(fwd_loss, mode="reduce-overhead")

    @torch.compile(fullgraph=False)
    def opt_step():
        opt.step()

    def cstep(x, y):
        opt.zero_grad(set_to_none=True)
        losses = cfwd(x, y)
        losses.sum().backward()
        opt_step()
        return losses.detach().clone()

    t0 = time.perf_counter()
    for i in range(3):
        cstep(*batches[i % 4])
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    comp = _arms.time_step(cstep, batches)
    row = {
        "model": model,
        "n": n,
        "graph_ms": graph["ms"],
        "compile_ms": comp["ms"],
        "compile_s": compile_s,
    }
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mlp_784-64-64-10")
    parser.add_argument("--n", type=int, nargs="*", default=[1024])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    make, in_shape, _ = MODELS[args.model]
    device = torch.device("cuda")
    batches = make_batches(in_shape, 128, 4, device)
    rows = []
    for n in args.n:
        row = probe_one(args.model, make, n, device, batches)
        rows.append(row)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
