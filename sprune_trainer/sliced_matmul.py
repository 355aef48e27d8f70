"""One autograd function per slice axis for a plain dense base: the frozen matmul and the slice update in one
node, so the slice costs no extra full-size tensor.

What the generic path (`base(x)` then a separate slice update) pays, per layer and step, and these avoid:
  rows:    an out-of-place copy of y for `index_add`; autograd summing two full (..., d_in) input grads
  columns: a full (..., d_out) product `x[..., J] @ delta.T` plus the add; a zero-filled (..., d_in) grad
           for `index_select` plus the add
Here the update goes into y in place (the frozen matmul never needs its output back), and the slice's part of
the input grad is accumulated into the base's grad in place (`addmm_` / `index_add_`).

Both run in the compute dtype the caller picks (the autocast dtype under autocast); the frozen weight is saved
as is (it is a parameter: no memory) and cast again in backward, never kept as a cast copy."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class RowSlicedLinear(torch.autograd.Function):
    """y = x @ W.T + b, then y[..., I] += x @ delta.T;   delta (k, d_in)."""

    @staticmethod
    def forward(ctx, x, weight, bias, index, delta):
        dt = x.dtype
        d = delta.to(dt)  # (k, d_in)
        y = F.linear(x, weight.to(dt), None if bias is None else bias.to(dt))  # (..., d_out)
        y.index_add_(-1, index, x @ d.T)
        ctx.save_for_backward(x, weight, index, d)
        ctx.delta_dtype = delta.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, index, d = ctx.saved_tensors
        g = grad_y.to(x.dtype)
        g_k = _flat(g.index_select(-1, index))  # (n, k)
        grad_x = grad_delta = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight.to(x.dtype)  # (..., d_in)
            _flat(grad_x).addmm_(g_k, d)
        if ctx.needs_input_grad[4]:
            grad_delta = (g_k.T @ _flat(x)).to(ctx.delta_dtype)  # (k, d_in)
        return grad_x, None, None, None, grad_delta


class ColumnSlicedLinear(torch.autograd.Function):
    """y = x @ W.T + b + x[..., J] @ delta.T;   delta (d_out, k). Saves only x[..., J] for backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, index, delta):
        dt = x.dtype
        d = delta.to(dt)  # (d_out, k)
        y = F.linear(x, weight.to(dt), None if bias is None else bias.to(dt))  # (..., d_out)
        x_j = x.index_select(-1, index)  # (..., k)
        _flat(y).addmm_(_flat(x_j), d.T)
        ctx.save_for_backward(x_j, weight, index, d)
        ctx.delta_dtype = delta.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_j, weight, index, d = ctx.saved_tensors
        g = grad_y.to(x_j.dtype)
        grad_x = grad_delta = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight.to(x_j.dtype)  # (..., d_in)
            grad_x.index_add_(-1, index, g @ d)
        if ctx.needs_input_grad[4]:
            grad_delta = (_flat(g).T @ _flat(x_j)).to(ctx.delta_dtype)  # (d_out, k)
        return grad_x, None, None, None, grad_delta


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear runs in for input `x`: autocast's, where autocast is on, else x's own."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def sliced_linear(x, weight, bias, index, delta, axis: str) -> torch.Tensor:
    """x @ (W + slice update).T + b through the fused functions, with autocast's casting done here."""
    dt = compute_dtype(x)
    fn = RowSlicedLinear if axis == "rows" else ColumnSlicedLinear
    with torch.autocast(x.device.type, enabled=False):
        return fn.apply(x.to(dt), weight, bias, index, delta)
