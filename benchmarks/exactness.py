"""Whether the CPU optimizers give bitwise torch.optim's weights, optimizer by optimizer.

For every case of the test suite (`tests/test_optim.py`: an optimizer and one
configuration per model), the modelbatch optimizer over the stacked tensors and
one torch optimizer per model get the same gradients for `--steps` steps; the
script prints, per case, which models end bitwise equal and the largest
difference. The suite itself compares with tolerances: fused CPU kernels may
round differently on another vector ISA, so bitwise equality is reported here,
not asserted.

    python benchmarks/exactness.py [--steps 30]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))

from test_optim import ALL_CASES

from modelbatch.optim._optimizers import BATCH_CLASSES


def compare(cls: type, configs: list[dict], steps: int) -> tuple[list[bool], float]:
    """(per model: bitwise equal, largest absolute difference) after `steps` steps."""
    n = len(configs)
    torch.manual_seed(0)
    shapes = [(n, 16, 12), (n, 12)]
    start = [torch.randn(s) for s in shapes]
    reference = [[p[i].clone() for p in start] for i in range(n)]
    torch_opts = [cls(reference[i], **configs[i]) for i in range(n)]
    ours = [p.clone() for p in start]
    opt = BATCH_CLASSES[cls](ours, configs)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for i in range(n):
            for r, grad in zip(reference[i], grads):
                r.grad = grad[i].clone()
            torch_opts[i].step()
        for o, grad in zip(ours, grads):
            o.grad = grad.clone()
        opt.step()
    equal = [all(torch.equal(ours[k][i], reference[i][k]) for k in range(2)) for i in range(n)]
    worst = max(
        float((ours[k][i] - reference[i][k]).abs().max()) for k in range(2) for i in range(n)
    )
    return equal, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for case in ALL_CASES:
        cls, configs = case.values
        equal, worst = compare(cls, configs, args.steps)
        print(f"{case.id:16s} bitwise {sum(equal)}/{len(equal)}  max difference {worst:.2e}")


if __name__ == "__main__":
    main()
