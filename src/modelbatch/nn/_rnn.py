"""LSTM, GRU and RNN layers that run under `torch.vmap`.

torch's recurrent layers call fused kernels (`aten::lstm`, `aten::gru`,
`aten::rnn_tanh`, `aten::lstm_cell`) that have no vmap batching rule. These
layers compute the same recurrences from `addmm` and pointwise ops, which vmap
batches over the model axis: one step of N models is one batched matmul, so
the launch count grows with the sequence length, never with N.

Parameter names, shapes, initialisation, gate order and formulas are torch's,
so `load_state_dict` works in both directions.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ._scan import _gru_step, _lstm_step, scan

__all__ = ["GRU", "LSTM", "RNN"]

_TORCH_TYPES: dict[str, type[nn.Module]] = {
    "LSTM": nn.LSTM,
    "GRU": nn.GRU,
    "RNN_TANH": nn.RNN,
    "RNN_RELU": nn.RNN,
}


def _lstm_cell(
    x_gates: Tensor, h: Tensor, c: Tensor, w_hh_t: Tensor, w_hr_t: Tensor | None
) -> tuple[Tensor, Tensor]:
    """One LSTM step; `x_gates` `[B, 4H]` already holds `x W_ih^T + b_ih + b_hh`."""
    h, c, _ = _lstm_step(x_gates, h @ w_hh_t, c)
    if w_hr_t is not None:
        h = h @ w_hr_t
    return h, c


def _gru_cell(x_gates: Tensor, h: Tensor, w_hh_t: Tensor, b_hh: Tensor | None) -> Tensor:
    """One GRU step; `x_gates` `[B, 3H]` is `x W_ih^T + b_ih`. `b_hn` stays inside `r * (...)`."""
    h_gates = h @ w_hh_t if b_hh is None else torch.addmm(b_hh, h, w_hh_t)
    return _gru_step(x_gates, h_gates, h)[0]


class _RNNBase(nn.Module):
    """Shared constructor, parameters and layer loop of LSTM, GRU and RNN."""

    mode = "LSTM"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not 0 <= float(dropout) <= 1:
            raise ValueError(f"modelbatch.nn.{name}: dropout must be in [0, 1], got {dropout}.")
        if proj_size and self.mode != "LSTM":
            raise ValueError(f"modelbatch.nn.{name}: proj_size is only defined for LSTM.")
        if proj_size < 0:
            raise ValueError(f"modelbatch.nn.{name}: proj_size must be >= 0, got {proj_size}.")
        if proj_size >= hidden_size and proj_size:
            raise ValueError(
                f"modelbatch.nn.{name}: proj_size must be smaller than hidden_size "
                f"({hidden_size}), got {proj_size}."
            )
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        gates = {"LSTM": 4, "GRU": 3}.get(self.mode, 1)
        out_size = proj_size or hidden_size
        directions = 2 if bidirectional else 1
        factory = {"device": device, "dtype": dtype}
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else out_size * directions
            for suffix in ("", "_reverse")[:directions]:

                def add(kind: str, *shape: int, layer: int = layer, suffix: str = suffix) -> None:
                    tensor = torch.empty(*shape, **factory)
                    self.register_parameter(f"{kind}_l{layer}{suffix}", nn.Parameter(tensor))

                add("weight_ih", gates * hidden_size, layer_in)
                add("weight_hh", gates * hidden_size, out_size)
                if bias:
                    add("bias_ih", gates * hidden_size)
                    add("bias_hh", gates * hidden_size)
                if proj_size:
                    add("weight_hr", proj_size, hidden_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch's initialisation: every weight and bias uniform in `±1/sqrt(hidden_size)`."""
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0.0
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        for key, default in (
            ("proj_size", 0),
            ("num_layers", 1),
            ("bias", True),
            ("batch_first", False),
            ("dropout", 0.0),
            ("bidirectional", False),
        ):
            if getattr(self, key) != default:
                s += f", {key}={getattr(self, key)}"
        return s

    @classmethod
    def from_torch(cls, module: Any) -> _RNNBase:
        """The vmappable twin of a torch `nn.LSTM`/`nn.GRU`/`nn.RNN`, sharing its parameters.

        No weight is copied: the new module holds the very `nn.Parameter`
        objects of `module`.
        """
        expected = _TORCH_TYPES[cls.mode]
        if type(module) is not expected:
            raise TypeError(
                f"modelbatch.nn.{cls.__name__}.from_torch: expected a torch "
                f"{expected.__name__}, got {type(module).__name__}."
            )
        kwargs: dict[str, Any] = {
            "num_layers": module.num_layers,
            "bias": module.bias,
            "batch_first": module.batch_first,
            "dropout": module.dropout,
            "bidirectional": module.bidirectional,
            "device": "meta",
        }
        if cls.mode == "LSTM":
            kwargs["proj_size"] = module.proj_size
        sizes: tuple[Any, ...] = (module.input_size, module.hidden_size)
        if isinstance(module, nn.RNN):
            kwargs["nonlinearity"] = module.nonlinearity
        twin = cls(*sizes, **kwargs)
        if list(twin._parameters) != list(module._parameters):
            raise ValueError(
                f"modelbatch.nn.{cls.__name__}.from_torch: parameter names "
                f"{list(module._parameters)} do not match {list(twin._parameters)}."
            )
        twin._parameters = dict(module._parameters)
        twin.train(module.training)
        return twin

    def flatten_parameters(self) -> None:
        """No-op, for models that call it in their forward (it packs weights for cuDNN)."""

    # ------------------------------------------------------------------ forward

    def _directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _check_input(self, input: Any) -> bool:
        name = type(self).__name__
        if isinstance(input, PackedSequence):
            raise TypeError(
                f"modelbatch.nn.{name}: packed sequences are not supported; pass the padded "
                "tensor [T, B, features] (pad_packed_sequence) and mask the padded steps "
                "in the loss."
            )
        if not isinstance(input, Tensor) or input.dim() not in (2, 3):
            shape = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
            raise ValueError(
                f"modelbatch.nn.{name}: expected input [T, B, {self.input_size}] "
                f"(or [B, T, ...] with batch_first, or unbatched [T, ...]), got {shape}."
            )
        if input.shape[-1] != self.input_size:
            raise ValueError(
                f"modelbatch.nn.{name}: expected input with {self.input_size} features in the "
                f"last dimension, got shape {tuple(input.shape)}."
            )
        return input.dim() == 3

    def _state(self, hx: Tensor | None, batch: int, size: int, like: Tensor, what: str) -> Tensor:
        shape = (self.num_layers * self._directions(), batch, size)
        if hx is None:
            return torch.zeros(shape, dtype=like.dtype, device=like.device)
        if tuple(hx.shape) != shape:
            raise ValueError(
                f"modelbatch.nn.{type(self).__name__}: expected {what} of shape {shape} "
                f"(num_layers * num_directions, batch, size), got {tuple(hx.shape)}."
            )
        return hx

    def _run(
        self, x: Tensor, h0: Tensor, c0: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """All layers and directions over `x` `[T, B, I]`; states `[L * D, B, H]`."""
        directions = self._directions()
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout, training=True)
            outs = []
            for d, suffix in enumerate(("", "_reverse")[:directions]):
                k = layer * directions + d
                y, h, c = self._direction(
                    x, h0[k], None if c0 is None else c0[k], f"_l{layer}{suffix}", d == 1
                )
                outs.append(y)
                h_n.append(h)
                if c is not None:
                    c_n.append(c)
            x = outs[0] if directions == 1 else torch.cat(outs, dim=-1)
        return x, torch.stack(h_n), torch.stack(c_n) if c_n else None

    def _direction(
        self, x: Tensor, h: Tensor, c: Tensor | None, suffix: str, reverse: bool
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        # Under functional_call these are the stacked tensors' per-model slices.
        p = cast("dict[str, Tensor]", self._parameters)
        w_ih, w_hh = p[f"weight_ih{suffix}"], p[f"weight_hh{suffix}"]
        b_ih, b_hh = p.get(f"bias_ih{suffix}"), p.get(f"bias_hh{suffix}")
        # The input projection of every step is one matmul outside the loop.
        fold_hh = self.mode != "GRU"  # GRU keeps b_hn inside the reset product
        bias = b_ih + b_hh if (b_ih is not None and b_hh is not None and fold_hh) else b_ih
        w_hr = p.get(f"weight_hr{suffix}")
        if w_hr is None and not torch.compiler.is_compiling():
            xg = F.linear(x, w_ih, bias)
            return scan(self.mode, reverse, xg, h, c, w_hh, None if fold_hh else b_hh)
        # LSTM with a projection, or traced by torch.compile (which fuses the steps
        # itself): the step by step loop of autograd ops.
        x_steps = F.linear(x, w_ih, bias).unbind(0)
        if reverse:
            x_steps = x_steps[::-1]
        w_hh_t = w_hh.t()
        outputs: list[Tensor] = []
        if self.mode == "LSTM":
            w_hr_t = None if w_hr is None else w_hr.t()
            for x_t in x_steps:
                h, c = _lstm_cell(x_t, h, c, w_hh_t, w_hr_t)  # type: ignore[arg-type]
                outputs.append(h)
        elif self.mode == "GRU":
            for x_t in x_steps:
                h = _gru_cell(x_t, h, w_hh_t, b_hh)
                outputs.append(h)
        else:
            act = torch.tanh if self.mode == "RNN_TANH" else torch.relu
            for x_t in x_steps:
                h = act(torch.addmm(x_t, h, w_hh_t))
                outputs.append(h)
        if reverse:
            outputs.reverse()
        return torch.stack(outputs), h, c

    def _forward(self, input: Any, hx: Any) -> tuple[Tensor, Tensor, Tensor | None]:
        batched = self._check_input(input)
        x = input if batched else input.unsqueeze(1)
        if batched and self.batch_first:
            x = x.transpose(0, 1)
        batch = x.shape[1]
        out_size = self.proj_size or self.hidden_size
        is_lstm = self.mode == "LSTM"
        if is_lstm and hx is not None and not (isinstance(hx, tuple) and len(hx) == 2):
            raise TypeError(
                f"modelbatch.nn.{type(self).__name__}: expected hx to be a tuple (h_0, c_0), "
                f"got {type(hx).__name__}."
            )
        h_in, c_in = hx if (is_lstm and hx is not None) else (hx, None)
        if not batched:
            h_in = None if h_in is None else h_in.unsqueeze(1)
            c_in = None if c_in is None else c_in.unsqueeze(1)
        h0 = self._state(h_in, batch, out_size, x, "h_0")
        c0 = self._state(c_in, batch, self.hidden_size, x, "c_0") if is_lstm else None
        y, h_n, c_n = self._run(x, h0, c0)
        if batched and self.batch_first:
            y = y.transpose(0, 1)
        if not batched:
            y, h_n = y.squeeze(1), h_n.squeeze(1)
            c_n = None if c_n is None else c_n.squeeze(1)
        return y, h_n, c_n


class LSTM(_RNNBase):
    """`torch.nn.LSTM` that runs under `torch.vmap`; same arguments, parameter names and math.

    Takes the arguments of `torch.nn.LSTM` (`input_size`, `hidden_size`,
    `num_layers`, `bias`, `batch_first`, `dropout`, `bidirectional`,
    `proj_size`, `device`, `dtype`), with the same meaning.

    Shapes:
        input `[T, B, I]` (`[B, T, I]` with `batch_first`, or unbatched
        `[T, I]`); `hx = (h_0 [L*D, B, H_out], c_0 [L*D, B, H])`, optional.
        Returns `output [T, B, D*H_out], (h_n [L*D, B, H_out], c_n [L*D, B, H])`.

    Example:
        >>> lstm = LSTM(8, 16, num_layers=2, batch_first=True)
        >>> lstm(torch.randn(4, 10, 8))[0].shape
        torch.Size([4, 10, 16])

    Warning:
        Packed sequences are not supported. Dropout between layers draws its
        own masks, so in training mode with `dropout > 0` the outputs equal
        torch's only in distribution.
    """

    mode = "LSTM"

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> Any:
        y, h_n, c_n = self._forward(input, hx)
        return y, (h_n, c_n)


class GRU(_RNNBase):
    """`torch.nn.GRU` that runs under `torch.vmap`; same arguments, parameter names and math.

    Shapes:
        input `[T, B, I]` (`[B, T, I]` with `batch_first`, or unbatched
        `[T, I]`); `hx` `[L*D, B, H]`, optional. Returns
        `output [T, B, D*H], h_n [L*D, B, H]`.

    Example:
        >>> GRU(8, 16)(torch.randn(10, 4, 8))[1].shape
        torch.Size([1, 4, 16])
    """

    mode = "GRU"

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Any:
        y, h_n, _ = self._forward(input, hx)
        return y, h_n


class RNN(_RNNBase):
    """`torch.nn.RNN` (tanh or relu) that runs under `torch.vmap`; same arguments and names.

    Shapes:
        as `GRU`.

    Example:
        >>> RNN(8, 16, nonlinearity="relu")(torch.randn(10, 4, 8))[0].shape
        torch.Size([10, 4, 16])
    """

    mode = "RNN_TANH"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(
                f"modelbatch.nn.RNN: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}."
            )
        self.nonlinearity = nonlinearity
        self.mode = "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU"
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            device=device,
            dtype=dtype,
        )

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.nonlinearity == "tanh" else f"{s}, nonlinearity={self.nonlinearity!r}"

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Any:
        y, h_n, _ = self._forward(input, hx)
        return y, h_n
