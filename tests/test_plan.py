"""The torch path's specialised update graphs (`optim/_plan.py`) equal the rules as written."""

from __future__ import annotations

import itertools

import pytest
import torch

from modelbatch.optim._plan import plan_for
from modelbatch.optim._rules import RULES

N = 5


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal values, NaN equal to NaN."""
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def coefficient_table(c: int, variant: int, generator: torch.Generator) -> torch.Tensor:
    """`[C, 1, N]`: random per model, with columns that are 1, 0 or mixed 0/1 for every model."""
    table = torch.rand(c, 1, N, generator=generator) + 0.1
    for j in range(c):
        kind = (variant + j) % 4
        if kind == 0:
            table[j] = 1.0
        elif kind == 1:
            table[j] = 0.0
        elif kind == 2:
            table[j] = (torch.rand(1, N, generator=generator) > 0.5).float()
    return table


@pytest.mark.parametrize("name", sorted(RULES))
def test_specialised_graphs_equal_the_rule_bitwise(name: str) -> None:
    rule = RULES[name]
    optional = [s for s in rule.state if s in rule.optional]
    g = torch.Generator().manual_seed(0)
    for flags in itertools.product([False, True], repeat=len(optional)):
        plan = plan_for(rule, flags)
        for variant in range(6):
            table = coefficient_table(rule.num_coefficients, variant, g)
            shape = (N, 3, 7)
            p, grad = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
            state = [torch.rand(shape, generator=g) + 0.1 for _ in rule.state]
            columns = [table[j, 0].view(N, 1, 1) for j in range(rule.num_coefficients)]
            expected = rule.update(p, grad, *state, *columns, *flags)
            for in_place in (False, True):
                values, decisions = plan.coefficient_values(table)
                inputs = [p.clone(), grad.clone(), *(t.clone() for t in state)]
                targets = [inputs[0], *inputs[2:]]
                out = plan.specialised(decisions, in_place)(
                    *inputs, *(v[0].view(N, 1, 1) for v in values)
                )
                got = [t if o is None else o for t, o in zip(targets, out)]
                for k, (a, b) in enumerate(zip(got, expected)):
                    assert same(a, b), (name, flags, variant, in_place, k)
                assert torch.equal(inputs[1], grad), "the gradient is never written"


def test_default_adam_folds_and_writes_in_place() -> None:
    # Adam without weight decay, maximize or amsgrad: the products by 1 and the
    # weight-decay branch fold away, and p, exp_avg, exp_avg_sq are computed in place.
    rule = RULES["Adam"]
    plan = plan_for(rule, (False,))
    # step_size, bias2_sqrt, eps, wd, w1, beta2, w2, sign, amsgrad, decay
    column = torch.tensor([1e-3, 0.9, 1e-8, 0.0, 0.1, 0.999, 0.001, 1.0, 0.0, 1.0])
    table = column.view(-1, 1, 1).expand(-1, 2, N)
    _, decisions = plan.coefficient_values(table)
    graph = plan.specialised(decisions, True).graph
    calls = [n for n in graph.nodes if n.op == "call_function"]
    assert not any(n.target is torch.where for n in calls)
    output = next(n for n in graph.nodes if n.op == "output")
    assert output.args[0][:3] == (None, None, None)  # p, exp_avg, exp_avg_sq: in place
    # Nine ops (v * beta2 + w2 * g * g is two muls and an addcmul); only three need new
    # memory (w2 * g, sqrt, -step_size * m).
    assert len(calls) == 9
    assert sum("out" not in n.kwargs for n in calls) == 3
    # Different weight decay per model: the branch stays, and nothing is folded that differs.
    mixed = table.clone()
    mixed[3, :, 0] = 0.1
    _, decisions = plan.coefficient_values(mixed)
    graph = plan.specialised(decisions, True).graph
    assert any(n.target is torch.where for n in graph.nodes)
    # On a device the decisions are never read (they would be a host sync).
    _, decisions = plan.coefficient_values(table, fold=False)
    assert all(d is None for d in decisions)
