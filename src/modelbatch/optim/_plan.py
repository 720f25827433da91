"""The torch path's form of an update rule: `update` traced once, then specialised per step.

Run as written, a rule's `update` is about 15 out-of-place elementwise ops
per tensor plus a copy of every result into its tensor, where torch's own
single-tensor optimizers run about 7 in-place ops: on the CPU that was most
of the torch path's cost. So the torch executor (`_executor`) does not
call `update` directly; it traces it once per (rule, optional-state flags)
with `torch.fx` into a graph of torch calls and, for each step, runs a
specialised copy of that graph:

- **Coefficient-only values** (`-lr`, `momentum > 0`, ...) are computed once
  per step over the whole `[K, N]` coefficient table, not once per tensor.
- **Folds that are exact.** A product with a coefficient that is 1 for every
  model (`g * sign` without `maximize`, `p * decay` without decoupled weight
  decay) is its other factor, bitwise. A `where` whose condition depends on
  coefficients only and is the same for every model takes that branch (the
  rules write torch's `if weight_decay != 0` as such a `where`).
- **Fusion that is exact.** `x + a / b` and `x - a / b` over a full tensor
  `x` become one `addcdiv` (bitwise the same on the CPU). The plan never
  turns `x + a * b` into `addcmul`, which is not bitwise the same where its
  kernel contracts to a fused multiply-add; the rules write the multiply-adds
  torch.optim fuses with their own helper (`_rules._mul_add`), which is
  `addcmul` here.
- **Memory reused.** An op writes into its first argument's memory when it
  is that value's last reader. When every model updates and the tensor is in
  the math dtype, each final value is computed straight into its parameter or
  state tensor (`out=`) once that memory's value is dead; otherwise results
  are selected into place with one `where(..., out=)`.

The rule's arithmetic, and so every result, is the one `update` defines: the
specialised graph is checked bitwise against `update` itself in the tests.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor

from ._rules import UpdateRule

__all__ = ["Plan", "plan_for"]

#: torch functions with an `out=` variant for the Python operators `update` uses.
_OUT_FORM: dict[Any, Any] = {
    operator.mul: torch.mul,
    operator.add: torch.add,
    operator.sub: torch.sub,
    operator.truediv: torch.div,
    operator.neg: torch.neg,
}
_SAME: tuple[Any, ...] = (torch.where, torch.sqrt, torch.maximum, torch.minimum, torch.abs)
for _f in (*_SAME, torch.exp, torch.log, torch.lerp, torch.addcdiv, torch.addcmul):
    _OUT_FORM[_f] = _f


@dataclass
class _Traced:
    """A rule's `update` as one graph, for one choice of optional-state flags."""

    graph: fx.Graph
    tensors: list[fx.Node]  # p, g, *state placeholders
    coefficients: list[fx.Node]  # one placeholder per coefficient
    derived: list[fx.Node]  # coefficient-only nodes that tensor nodes read
    tests: list[tuple[fx.Node, str]]  # (node, "one" | "cond") whose value decides a fold
    outputs: list[Any]  # update's results: nodes (or a placeholder returned as is)


def _trace(rule: UpdateRule, flags: tuple[bool, ...]) -> _Traced:
    names = list(inspect.signature(rule.update).parameters)
    n_tensors = 2 + len(rule.state)
    names = names[: n_tensors + rule.num_coefficients]
    graph = fx.Graph()
    tracer = fx.proxy.GraphAppendingTracer(graph)
    placeholders = [graph.placeholder(name) for name in names]
    proxies = [fx.Proxy(node, tracer) for node in placeholders]
    out = rule.update(*proxies, *flags)
    graph.output(tuple(o.node if isinstance(o, fx.Proxy) else o for o in out))
    graph.eliminate_dead_code()

    coefficient_nodes = placeholders[n_tensors:]
    coefficient_only: set[fx.Node] = set(coefficient_nodes)
    for node in graph.nodes:
        if node.op == "call_function":
            inputs = node.all_input_nodes
            if inputs and all(i in coefficient_only for i in inputs):
                coefficient_only.add(node)
    derived: list[fx.Node] = []
    tests: list[tuple[fx.Node, str]] = []
    for node in graph.nodes:
        if node.op != "call_function" or node in coefficient_only:
            continue
        for i in node.all_input_nodes:
            if i in coefficient_only and i not in derived:
                derived.append(i)
        args = node.args
        if node.target is operator.mul and len(args) == 2:
            for a in args:
                if isinstance(a, fx.Node) and a in coefficient_only:
                    tests.append((a, "one"))
        elif (
            node.target is torch.where
            and isinstance(args[0], fx.Node)
            and args[0] in coefficient_only
        ):
            tests.append((args[0], "cond"))
    output_node = next(n for n in graph.nodes if n.op == "output")
    return _Traced(
        graph=graph,
        tensors=placeholders[:n_tensors],
        coefficients=coefficient_nodes,
        derived=derived,
        tests=tests,
        outputs=list(output_node.args[0]),
    )


class Plan:
    """A rule's update for one choice of flags: per-step coefficient values and specialised graphs."""

    def __init__(self, rule: UpdateRule, flags: tuple[bool, ...]) -> None:
        self.rule = rule
        self.traced = _trace(rule, flags)
        self._coefficient_fn = self._coefficient_module()
        self._specialised: dict[tuple[Any, ...], fx.GraphModule] = {}

    def _coefficient_module(self) -> Callable[..., Any]:
        """Coefficients (`[C, K, N]`) -> (derived values, test values), over the whole table."""
        t = self.traced
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for node in t.coefficients:
            env[node] = graph.placeholder(node.name)
        for node in t.graph.nodes:
            if node in env or node.op != "call_function":
                continue
            if all(i in env for i in node.all_input_nodes) and node.all_input_nodes:
                env[node] = graph.node_copy(node, lambda n: env[n])
        values = [env[n] for n in t.derived]
        checks = [env[node] for node, _ in t.tests]
        graph.output((tuple(values), tuple(checks)))
        return fx.GraphModule(torch.nn.Module(), graph)

    def coefficient_values(
        self, table: Tensor, *, fold: bool = True
    ) -> tuple[list[Tensor], tuple[Any, ...]]:
        """The derived coefficient values `[K, N]` and, per fold test, its decision.

        A test's decision is True (fold: the product's factor is 1, or the
        condition holds) or False (for a condition: it fails) for every entry
        of the table, or None when the models differ; all None without `fold`
        (reading the decisions is a host sync on a device).
        """
        values, checks = self._coefficient_fn(*table.unbind(0))
        decisions: list[Any] = [None] * len(checks)
        if checks and fold:
            decisions = []
            # One pass over every test: the least and greatest value of each (conditions
            # as 0/1). A factor is 1 for every model iff both are 1 (NaN is neither).
            stacked = torch.stack(torch.broadcast_tensors(*(table[0], *checks))[1:])
            low, high = torch.aminmax(stacked.flatten(1).to(table.dtype), dim=1)
            for (_, kind), lo, hi in zip(self.traced.tests, *torch.stack([low, high]).tolist()):
                if lo == 1.0 and hi == 1.0:
                    decisions.append(True)
                elif kind == "cond" and hi == 0.0:
                    decisions.append(False)
                else:
                    decisions.append(None)
        return list(values), tuple(decisions)

    def specialised(self, decisions: tuple[Any, ...], in_place: bool) -> fx.GraphModule:
        """The update graph with `decisions`' folds; `in_place` writes results into the inputs."""
        key = (decisions, in_place)
        fn = self._specialised.get(key)
        if fn is None:
            fn = self._specialised[key] = self._build(decisions, in_place)
        return fn

    def _build(self, decisions: tuple[Any, ...], in_place: bool) -> fx.GraphModule:
        t = self.traced
        folds_one = {node for (node, kind), d in zip(t.tests, decisions) if kind == "one" and d}
        folds_cond = {
            node: d
            for (node, kind), d in zip(t.tests, decisions)
            if kind == "cond" and d is not None
        }
        graph = fx.Graph()
        env: dict[fx.Node, Any] = {}
        for node in t.tensors:
            env[node] = graph.placeholder(node.name)
        for node in t.derived:
            env[node] = graph.placeholder(f"c_{node.name}")
        for node in t.graph.nodes:
            if node in env or node.op in ("placeholder", "output"):
                continue
            if not all(i in env for i in node.all_input_nodes):
                continue  # coefficient-only and not read by the tensor graph
            args = node.args
            if node.target is operator.mul and len(args) == 2:
                a, b = args
                if isinstance(b, fx.Node) and b in folds_one:
                    env[node] = env[a] if isinstance(a, fx.Node) else a
                    continue
                if isinstance(a, fx.Node) and a in folds_one:
                    env[node] = env[b] if isinstance(b, fx.Node) else b
                    continue
            if (
                node.target is torch.where
                and isinstance(args[0], fx.Node)
                and args[0] in folds_cond
            ):
                chosen = args[1] if folds_cond[args[0]] else args[2]
                env[node] = env[chosen] if isinstance(chosen, fx.Node) else chosen
                continue
            env[node] = graph.node_copy(node, lambda n: env[n])
        outputs = [env[o] if isinstance(o, fx.Node) else o for o in t.outputs]
        graph.output(tuple(outputs))
        graph.eliminate_dead_code()
        _fuse_addcdiv(graph)
        _assign_memory(graph, in_place)
        graph.lint()
        return fx.GraphModule(torch.nn.Module(), graph)


def _fuse_addcdiv(graph: fx.Graph) -> None:
    """`x + a / b` (either order) and `x - a / b` as one `addcdiv`: bitwise the same on the CPU."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (operator.add, operator.sub):
            continue
        x, y = node.args
        value = 1.0 if node.target is operator.add else -1.0
        for first, second in ((x, y), (y, x)) if value == 1.0 else ((x, y),):
            if (
                isinstance(second, fx.Node)
                and second.op == "call_function"
                and second.target is operator.truediv
                and len(second.users) == 1
                and isinstance(first, fx.Node)
                # onto a coefficient ([N, 1, ...]) addcdiv is slower than the two ops
                and not (first.op == "placeholder" and first.name.startswith("c_"))
                and all(isinstance(a, fx.Node) for a in second.args)
            ):
                with graph.inserting_before(node):
                    fused = graph.call_function(
                        torch.addcdiv, (first, *second.args), {"value": value}
                    )
                node.replace_all_uses_with(fused)
                graph.erase_node(node)
                graph.erase_node(second)
                break


#: ops whose result is bool: their memory never takes a float result.
_BOOL_OPS = (operator.gt, operator.lt, operator.ge, operator.le, operator.eq, operator.ne)


def _assign_memory(graph: fx.Graph, in_place: bool) -> None:
    """Give results memory that is already there (`out=`) wherever that is safe.

    One pass in program order, tracking which value each tensor's memory holds:

    - With `in_place`, result k of `update` (p, then each state; the gradient
      has no result) is computed straight into its input tensor once that
      memory's current value is dead, and stays there (pinned).
    - Any op may write into its first argument's memory when this op is that
      value's last reader: an intermediate's, or (with `in_place`) a
      parameter's or state's whose old value is dead. The gradient and the
      coefficients are never written.

    Results not written into their tensor are returned for the caller to copy
    (None marks the ones that were).
    """
    nodes = list(graph.nodes)
    order = {node: i for i, node in enumerate(nodes)}
    output = nodes[-1]
    placeholders = [n for n in nodes if n.op == "placeholder"]
    results = list(output.args[0])
    end = len(nodes)

    def last_use(node: fx.Node) -> int:
        if node in results:
            return end
        return max((order[u] for u in node.users), default=order[node])

    sources = [placeholders[0], *placeholders[2 : 1 + len(results)]]
    home: dict[fx.Node, fx.Node] = {}  # final result -> the input tensor it belongs in
    for result, source in zip(results, sources):
        if (
            in_place
            and isinstance(result, fx.Node)
            and result is not source
            and result.op == "call_function"
            and sum(1 for r in results if r is result) == 1
        ):
            home[result] = source
    # memory: keyed by the node that first held it; holder: the value it holds now.
    memory: dict[fx.Node, fx.Node] = {}
    holder: dict[fx.Node, fx.Node] = {}
    writable: set[fx.Node] = set()
    for source in sources if in_place else []:
        memory[source] = holder[source] = source
        writable.add(source)
    pinned: set[fx.Node] = set()
    written: set[fx.Node] = set()
    for node in nodes:
        if node.op != "call_function":
            continue
        memory.setdefault(node, node)
        if (
            node.target not in _OUT_FORM
            or "out" in node.kwargs
            or not node.args
            or not isinstance(node.args[0], fx.Node)
        ):
            if node.target not in _BOOL_OPS:
                writable.add(node)
            holder[node] = node
            continue
        target = None
        source = home.get(node)
        if source is not None and last_use(holder[source]) <= order[node]:
            target = source
            pinned.add(source)
            written.add(node)
        else:
            first = node.args[0]
            where = memory.get(first)
            if (
                where is not None
                and where in writable
                and where not in pinned
                and holder.get(where) is first
                and last_use(first) == order[node]
            ):
                target = where
        if target is None:
            writable.add(node)
            holder[node] = node
            continue
        node.target = _OUT_FORM[node.target]
        node.kwargs = {**node.kwargs, "out": holder[target]}
        memory[node] = target
        holder[target] = node
    output.args = (tuple(None if r in written else r for r in results),)


_PLANS: dict[tuple[str, tuple[bool, ...]], Plan] = {}


def plan_for(rule: UpdateRule, flags: Sequence[bool]) -> Plan:
    """The (cached) plan of `rule` with these optional-state flags."""
    key = (rule.name, tuple(flags))
    plan = _PLANS.get(key)
    if plan is None or plan.rule is not rule:
        plan = _PLANS[key] = Plan(rule, tuple(flags))
    return plan
