"""LSTMCell, GRUCell and RNNCell that run under `torch.vmap` without a per-model loop.

torch's `aten::lstm_cell` has no vmap batching rule; `aten::gru_cell` and
`aten::rnn_tanh_cell` fall back to running the models one by one. These cells
share the step functions of the sequence layers in `_rnn.py`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._rnn import _gru_cell, _lstm_cell

__all__ = ["GRUCell", "LSTMCell", "RNNCell"]


class _CellBase(nn.Module):
    """Shared parameters of the single-step cells (torch's names and initialisation)."""

    gates = 4
    torch_type: type[nn.Module] = nn.LSTMCell

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        factory = {"device": device, "dtype": dtype}
        rows = self.gates * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(rows, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(rows, hidden_size, **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(rows, **factory))
            self.bias_hh = nn.Parameter(torch.empty(rows, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        stdv = 1.0 / math.sqrt(hidden_size) if hidden_size > 0 else 0.0
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, bias={self.bias}"

    @classmethod
    def from_torch(cls, module: Any) -> _CellBase:
        """The vmappable twin of the torch cell, sharing its parameters (nothing is copied)."""
        if type(module) is not cls.torch_type:
            raise TypeError(
                f"modelbatch.nn.{cls.__name__}.from_torch: expected a torch "
                f"{cls.torch_type.__name__}, got {type(module).__name__}."
            )
        sizes: tuple[Any, ...] = (module.input_size, module.hidden_size, module.bias)
        kwargs: dict[str, Any] = {}
        if isinstance(module, nn.RNNCell):
            kwargs["nonlinearity"] = module.nonlinearity
        twin = cls(sizes[0], sizes[1], sizes[2], device="meta", **kwargs)
        twin._parameters = dict(module._parameters)
        twin.train(module.training)
        return twin

    def _prepare(self, input: Tensor, hx: Tensor | None) -> tuple[Tensor, Tensor, bool]:
        if input.dim() not in (1, 2):
            raise ValueError(
                f"modelbatch.nn.{type(self).__name__}: expected input [B, {self.input_size}] "
                f"or [{self.input_size}], got {tuple(input.shape)}."
            )
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        if hx is None:
            hx = torch.zeros(x.shape[0], self.hidden_size, dtype=x.dtype, device=x.device)
        elif not batched:
            hx = hx.unsqueeze(0)
        return x, hx, batched


class LSTMCell(_CellBase):
    """`torch.nn.LSTMCell` that runs under `torch.vmap`; same arguments and parameter names.

    Shapes:
        input `[B, I]` (or `[I]`); `hx = (h [B, H], c [B, H])`, optional.
        Returns `(h' [B, H], c' [B, H])`.
    """

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> Any:
        x, h, batched = self._prepare(input, None if hx is None else hx[0])
        c = torch.zeros_like(h) if hx is None else (hx[1] if batched else hx[1].unsqueeze(0))
        bias = None if self.bias_ih is None else self.bias_ih + self.bias_hh
        h, c = _lstm_cell(F.linear(x, self.weight_ih, bias), h, c, self.weight_hh.t(), None)
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))


class GRUCell(_CellBase):
    """`torch.nn.GRUCell` that runs under `torch.vmap` without a per-model fallback loop.

    Shapes:
        input `[B, I]` (or `[I]`); `hx` `[B, H]`, optional. Returns `h' [B, H]`.
    """

    gates = 3
    torch_type = nn.GRUCell

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        x, h, batched = self._prepare(input, hx)
        h = _gru_cell(
            F.linear(x, self.weight_ih, self.bias_ih), h, self.weight_hh.t(), self.bias_hh
        )
        return h if batched else h.squeeze(0)


class RNNCell(_CellBase):
    """`torch.nn.RNNCell` (tanh or relu) that runs under `torch.vmap` without a fallback loop.

    Shapes:
        as `GRUCell`.
    """

    gates = 1
    torch_type = nn.RNNCell

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        nonlinearity: str = "tanh",
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(
                f"modelbatch.nn.RNNCell: nonlinearity must be 'tanh' or 'relu', got "
                f"{nonlinearity!r}."
            )
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, bias, device, dtype)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        x, h, batched = self._prepare(input, hx)
        bias = None if self.bias_ih is None else self.bias_ih + self.bias_hh
        pre = torch.addmm(F.linear(x, self.weight_ih, bias), h, self.weight_hh.t())
        h = torch.tanh(pre) if self.nonlinearity == "tanh" else torch.relu(pre)
        return h if batched else h.squeeze(0)
