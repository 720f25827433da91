"""Generated Triton kernels that run the update rules on CUDA (private to `_executor`).

For each rule two kernels are generated from the rule's own functions, which
are re-bound so that their `ops` is `triton.language` and inlined:

- the coefficient kernel, grid `(ceil(N / 128), K)`: advances the step counts
  and scalar state of live (parameter, model) pairs and writes the rule's
  coefficients to a `[K, N, C]` float64 table;
- the update kernel, a one-dimensional grid of `N * chunks` programs:
  program `n * chunks + c` updates chunk `c` (of `CHUNK` elements) of model
  n's slice of one parameter tensor, for up to `MAX_SLOTS` tensors passed as
  separate arguments (a table of chunks maps `c` to a tensor and offset). A
  model's chunks are consecutive programs, so the programs running at once
  walk memory in order: on an H200 this took the Adam update from 1.37x to
  1.04x of its memory floor against a grid with the model axis fastest
  (`benchmarks/update_kernel.py`). It reads p, g and the state once and
  writes p, the state and an optional low-precision copy of p once; a model
  outside the mask returns before touching memory.

The launch configuration is fixed (no autotuning), so the speed does not
depend on a first measurement. Each tensor must be dense with the model axis
outermost in memory, and its gradient and state must share its strides: every
model's slice is then one contiguous run of `L` elements.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import tempfile
import types
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .._layout import model_major
from ._executor import StepCoefficients, hparam_column, update_tensor
from ._rules import UpdateRule

__all__ = ["available", "run", "kernel_layout"]

MAX_SLOTS = 16
BLOCK = 1024
NUM_WARPS = 4
#: a chunk (one program's share of a tensor) is at most this many blocks
CHUNK_BLOCKS = 4
COEFF_BLOCK = 128
_MAX_PROGRAMS = 2**31 - 1
_MIN_PROGRAMS = 4096
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


#: set False (or MODELBATCH_TRITON=0) to run every update with torch ops (for comparisons).
ENABLED = os.environ.get("MODELBATCH_TRITON", "1") != "0"


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def available(device: torch.device) -> bool:
    """Whether the generated kernels can run on `device`."""
    return ENABLED and device.type == "cuda" and _triton_importable()


def kernel_layout(slot: Any, models: int) -> int | None:
    """How the update kernel takes this parameter: None if it cannot (the torch path
    runs it), else the element multiple every model's slice starts at (see below).

    The kernel needs float tensors, the state in the parameter's dtype, and
    every tensor with the parameter's strides and device, dense with the model
    axis outermost. Each model's slice then starts at `n * L` elements from its
    base; all of them are 16-byte aligned when every base is and `L` is a
    multiple of 16 bytes' worth of the narrowest element (4 for fp32 alone, 8
    with a bf16/fp16 gradient or copy): that multiple is returned, else 1.
    """
    p, g = slot.param, slot.grad
    dtype = p.dtype
    if dtype not in _FLOATS or g.dtype not in _FLOATS or p.dim() == 0 or p.numel() == 0:
        return None
    state = slot.state.values()
    if any(t.dtype != dtype for t in state):
        return None
    stride, device = p.stride(), p.device
    tensors = [p, g, *state]
    if slot.low_precision is not None:
        tensors.append(slot.low_precision)
    for t in tensors[1:]:
        if t.stride() != stride or t.device != device:
            return None
    if not model_major(p.shape, stride):
        return None
    need = 16 // min(t.element_size() for t in tensors)
    if (p.numel() // models) % need == 0 and all(t.data_ptr() % 16 == 0 for t in tensors):
        return need
    return 1


# ---------------------------------------------------------------------- code generation


def _rebound(fn: Any) -> Any:
    """`fn` with its global `ops` (and helpers it calls) bound to Triton."""
    import triton
    import triton.language as tl

    module = sys.modules[fn.__module__]
    namespace = dict(module.__dict__)
    namespace["ops"] = tl
    namespace["tl"] = tl
    helpers = ("_round32", "_signed", "_decayed", "_moments")
    formulas = (
        ("_lerp", "_lerp_formula"),
        ("_pow", "_pow_formula"),
        ("_mul_add", "_mul_add_formula"),
    )
    for name, source in (*formulas, *((h, h) for h in helpers)):
        helper = module.__dict__[source]
        namespace[name] = triton.jit(types.FunctionType(helper.__code__, namespace, source))
    copy = types.FunctionType(fn.__code__, namespace, fn.__name__)
    copy.__module__ = fn.__module__
    return triton.jit(copy)


def _load_source(name: str, source: str) -> types.ModuleType:
    """Import generated source from a file (Triton reads a kernel's source with inspect)."""
    folder = _source_dir()
    path = os.path.join(folder, f"{name}.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"modelbatch_generated_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=1)
def _source_dir() -> str:
    return tempfile.mkdtemp(prefix="modelbatch_kernels_")


@functools.cache
def _coefficient_kernel(rule: UpdateRule) -> Any:
    h = [f"h{i}" for i in range(len(rule.hparams))]
    sc = [f"s{i}" for i in range(len(rule.scalars))]
    opts = [f"o{i}" for i in range(len(rule.options))]
    c = rule.num_coefficients
    lines = [
        "import triton",
        "import triton.language as tl",
        "",
        "@triton.jit(do_not_specialize=['K', 'N'])",
        f"def modelbatch_coefficients_{rule.name}(mask_ptr, has_ptr, steps_ptr, lr_factor_ptr, coef_ptr, K, N, "
        + "".join(f"{x}_ptr, {x}_stride, " for x in h)
        + "".join(f"{x}_ptr, " for x in sc)
        + "".join(f"{x}, " for x in opts)
        + "BLOCK: tl.constexpr):",
        "    k = tl.program_id(1)",
        "    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)",
        "    inb = n < N",
        "    live = (tl.load(mask_ptr + n, mask=inb, other=0) != 0) & (tl.load(has_ptr + k) != 0)",
        "    idx = k.to(tl.int64) * N + n",
        "    step = tl.load(steps_ptr + idx, mask=inb, other=0.0) + tl.where(live, 1.0, 0.0).to(tl.float64)",
        "    tl.store(steps_ptr + idx, step, mask=inb & live)",
    ]
    for i, (key, _col) in enumerate(rule.hparams):
        value = f"tl.load(h{i}_ptr + n * h{i}_stride, mask=inb, other=0).to(tl.float64)"
        if key == "lr":
            value += " * tl.load(lr_factor_ptr)"
        lines.append(f"    h{i} = {value}")
    for x in sc:
        lines.append(f"    {x} = tl.load({x}_ptr + idx, mask=inb, other=0.0)")
    args = ", ".join(["step", *sc, *h, *[f"{o} + 0.0" for o in opts]])
    lines.append(f"    out = _coefficients({args})")
    for j in range(c):
        lines.append(
            f"    tl.store(coef_ptr + idx * {c} + {j}, (out[{j}] + 0.0 * step).to(tl.float64), mask=inb)"
        )
    for j, x in enumerate(sc):
        lines.append(f"    tl.store({x}_ptr + idx, out[{c + j}], mask=inb & live)")
    module = _load_source(f"coefficients_{rule.name}", "\n".join(lines) + "\n")
    module._coefficients = _rebound(rule.coefficients)  # type: ignore[attr-defined]
    return getattr(module, f"modelbatch_coefficients_{rule.name}")


@functools.cache
def _update_kernel(
    rule: UpdateRule, present: tuple[bool, ...], slots: int, low_precision: bool, align: int
) -> Any:
    states = [i for i, on in enumerate(present) if on]
    per_slot = ["p", "g", *[f"s{i}" for i in states]] + (["lp"] if low_precision else [])
    c = rule.num_coefficients
    flags = [on for name, on in zip(rule.state, present) if name in rule.optional]
    header = []
    for j in range(slots):
        header += [f"{x}{j}" for x in per_slot] + [f"L{j}", f"R{j}"]
    no_spec = [f"L{j}" for j in range(slots)] + [f"R{j}" for j in range(slots)]
    no_spec += ["K", "N", "CHUNKS"]
    lines = [
        "import triton",
        "import triton.language as tl",
        "",
        f"@triton.jit(do_not_specialize={no_spec!r})",
        f"def modelbatch_update_{rule.name}(mask_ptr, coef_ptr, chunk_slot_ptr, chunk_off_ptr, K, N, "
        + ", ".join(header)
        + ", CHUNKS, CHUNK: tl.constexpr, BLOCK: tl.constexpr):",
        "    pid = tl.program_id(0)",
        "    n = pid // CHUNKS",
        "    c = pid - n * CHUNKS",
        "    if tl.load(mask_ptr + n) != 0:",
        "        slot = tl.load(chunk_slot_ptr + c)",
        "        off = tl.load(chunk_off_ptr + c)",
    ]
    for j in range(slots):
        indent = "            "
        if slots == 1:
            indent = "        "
        else:
            keyword = "if" if j == 0 else ("else" if j == slots - 1 else "elif")
            cond = "" if keyword == "else" else f" slot == {j}"
            lines.append(f"        {keyword}{cond}:")
        for x in per_slot:
            lines.append(f"{indent}{x}_ = {x}{j}")
        lines.append(f"{indent}L = L{j}")
        lines.append(f"{indent}row = R{j}")
    if align > 1:
        lines.append(f"        L = tl.multiple_of(L, {align})")
        lines.append("        off = tl.multiple_of(off, BLOCK)")
    lines += [
        "        base = n.to(tl.int64) * L",
        f"        cbase = coef_ptr + (row.to(tl.int64) * N + n) * {c}",
    ]
    for j in range(c):
        lines.append(f"        c{j} = tl.load(cbase + {j}).to(tl.float32)")
    placeholders = {i: f"s{i}" for i in states}
    lines.append("        for start in tl.range(0, CHUNK, BLOCK):")
    lines += [
        "            if off + start < L:",
        "                idx = off + start + tl.arange(0, BLOCK)",
        "                inb = idx < L",
        "                o = base + idx",
        "                p = tl.load(p_ + o, mask=inb, other=0.0).to(tl.float32)",
        "                g = tl.load(g_ + o, mask=inb, other=0.0).to(tl.float32)",
    ]
    args = ["p", "g"]
    for i in range(len(rule.state)):
        if i in placeholders:
            lines.append(
                f"                s{i} = tl.load(s{i}_ + o, mask=inb, other=0.0).to(tl.float32)"
            )
            args.append(f"s{i}")
        else:
            args.append("p")
    args += [f"c{j}" for j in range(c)] + [str(f) for f in flags]
    lines.append(f"                out = _update({', '.join(args)})")
    lines.append("                tl.store(p_ + o, out[0].to(p_.dtype.element_ty), mask=inb)")
    for i in states:
        lines.append(
            f"                tl.store(s{i}_ + o, out[{1 + i}].to(s{i}_.dtype.element_ty), mask=inb)"
        )
    if low_precision:
        lines.append("                tl.store(lp_ + o, out[0].to(lp_.dtype.element_ty), mask=inb)")
    name = f"update_{rule.name}_{''.join('1' if x else '0' for x in present)}_{slots}{'_lp' if low_precision else ''}_a{align}"
    module = _load_source(name, "\n".join(lines) + "\n")
    module._update = _rebound(rule.update)  # type: ignore[attr-defined]
    return getattr(module, f"modelbatch_update_{rule.name}")


# ---------------------------------------------------------------------- launching


_HAS_GRAD: dict[tuple, Tensor] = {}
_CHUNKS: dict[tuple, tuple[Tensor, Tensor, int]] = {}


def _device_flags(key: tuple[bool, ...], device: torch.device) -> Tensor:
    """The has-gradient flags `[K]` on the device, made once per pattern (no copy per step)."""
    full = (key, str(device))
    t = _HAS_GRAD.get(full)
    if t is None:
        t = _HAS_GRAD[full] = torch.tensor(key, dtype=torch.uint8, device=device)
    return t


def _chunk_tables(
    lengths: tuple[int, ...], models: int, device: torch.device
) -> tuple[Tensor, Tensor, int]:
    """Which tensor and offset each chunk covers; the chunk size (a multiple of BLOCK).

    Chunks are as long as possible (up to CHUNK_BLOCKS blocks: fewer programs, each
    loading its coefficients once) while the grid keeps at least
    `_MIN_PROGRAMS` programs to spread over the multiprocessors.
    """
    full = (lengths, models, str(device))
    cached = _CHUNKS.get(full)
    if cached is not None:
        return cached

    def count(chunk: int) -> int:
        return sum(-(-n // chunk) for n in lengths)

    chunk = CHUNK_BLOCKS * BLOCK
    while chunk > BLOCK and models * count(chunk) < _MIN_PROGRAMS:
        chunk //= 2
    while models * count(chunk) > _MAX_PROGRAMS:
        chunk *= 2
    slot, offset = [], []
    for j, n in enumerate(lengths):
        for start in range(0, n, chunk):
            slot.append(j)
            offset.append(start)
    cached = (
        torch.tensor(slot, dtype=torch.int32, device=device),
        torch.tensor(offset, dtype=torch.int32, device=device),
        chunk,
    )
    _CHUNKS[full] = cached
    return cached


def run(
    rule: UpdateRule,
    slots: Sequence[Any],
    hparams: Mapping[str, Tensor],
    lr_factor: Tensor,
    steps: Tensor,
    scalars: Mapping[str, Tensor],
    mask: Tensor,
    options: Mapping[str, bool],
    flags: Mapping[str, bool],
) -> None:
    """The coefficient kernel, then the update kernel(s) over every slot with a gradient."""
    k, n = steps.shape
    device = steps.device
    has = _device_flags(tuple(s.grad is not None for s in slots), device)
    # [K, N, C]: one program's coefficients are adjacent in memory.
    table = torch.empty((k, n, rule.num_coefficients), dtype=torch.float64, device=device)
    coefficients = table.permute(2, 0, 1)
    args: list[Any] = [mask, has, steps, lr_factor, table, k, n]
    for key, column in rule.hparams:
        t = hparam_column(hparams, key, column)
        args += [t, t.stride(0)]
    args += [scalars[name] for name, _ in rule.scalars]
    args += [float(options[o]) for o in rule.options]
    grid = (-(-n // COEFF_BLOCK), k)
    _coefficient_kernel(rule)[grid](*args, BLOCK=COEFF_BLOCK, num_warps=4)

    present = tuple(flags.get(name, True) for name in rule.state)
    groups: dict[tuple, list[Any]] = {}
    fallback: StepCoefficients | None = None  # for tensors the kernel cannot take
    for slot in slots:
        if slot.grad is None:
            continue
        align = kernel_layout(slot, n)
        if align is None:
            if fallback is None:
                fallback = StepCoefficients(rule, flags, coefficients, mask)
            update_tensor(rule, slot, fallback, slot.row, flags)
            continue
        lp = slot.low_precision
        group_key = (slot.param.dtype, slot.grad.dtype, None if lp is None else lp.dtype)
        groups.setdefault((*group_key, align), []).append(slot)
    for (_, _, lp_dtype, align), members in groups.items():
        for i in range(0, len(members), MAX_SLOTS):
            _launch(
                table,
                rule,
                members[i : i + MAX_SLOTS],
                present,
                lp_dtype is not None,
                align,
                coefficients,
                mask,
                k,
                n,
            )


def _launch(
    table: Tensor,
    rule: UpdateRule,
    members: Sequence[Any],
    present: tuple[bool, ...],
    low_precision: bool,
    align: int,
    coefficients: Tensor,
    mask: Tensor,
    k: int,
    n: int,
) -> None:
    lengths = tuple(s.param.numel() // n for s in members)
    chunk_slot, chunk_off, chunk = _chunk_tables(lengths, n, mask.device)
    args: list[Any] = [mask, table, chunk_slot, chunk_off, k, n]
    for s, length in zip(members, lengths):
        args += [s.param, s.grad]
        args += [s.state[name] for name, on in zip(rule.state, present) if on]
        if low_precision:
            args.append(s.low_precision)
        args += [length, s.row]
    kernel = _update_kernel(rule, present, len(members), low_precision, align)
    chunks = chunk_slot.numel()
    kernel[(n * chunks,)](*args, chunks, CHUNK=chunk, BLOCK=BLOCK, num_warps=NUM_WARPS)
