"""One autograd function for a sliced layer over a plain dense base: the frozen matmul and the slice update in one
node, so the slice costs no extra full-size tensor.

What the generic path (`base(x)` then a separate slice update) pays, per layer and step, and these avoid:
  rows:    an out-of-place copy of y for `index_add`; autograd summing two full (..., d_in) input grads
  columns: a full (..., d_out) product `x[..., J] @ delta.T` plus the add; a zero-filled (..., d_in) grad
           for `index_select` plus the add
Here the update goes into y in place (the frozen matmul never needs its output back), and the slice's part of
the input grad is accumulated into the base's grad in place (`addmm_` / `index_add_`).

Under torch.compile the same sums are written out of place (the compiler fuses them anyway): with an in-place
update of the returned tensor, Dynamo's tracing of an autograd.Function on torch 2.11 routes the output's gradient to
a stale alias of it, so the slices get none and train nothing while the loss looks normal (a PyTorch bug, fixed in
2.12); every torch version takes the out-of-place form while compiling.

Both run in the compute dtype the caller picks (the autocast dtype under autocast); the frozen weight is saved
as is (it is a parameter: no memory) and cast again in backward, never kept as a cast copy."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .recompute import shared_rebuild


def updates_output_in_place() -> bool:
    """Whether the forward adds the slice update into its output in place: eager only (module docstring)."""
    return not torch.compiler.is_compiling()


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class SlicedLinearFunction(torch.autograd.Function):
    """rows:    y = x @ W.T + b, then y[..., I] += x @ delta.T          delta (k, d_in); saves x
    columns: y = x @ W.T + b + x[..., J] @ delta.T                     delta (d_out, k); saves x[..., J] only
    rows with `source` = (rebuild, tensors) (recompute.py): saves the tensors and rebuilds x from them in backward"""

    @staticmethod
    def forward(ctx, x, weight, bias, index, delta, axis: str, source=None):
        dt = x.dtype
        d = delta.to(dt)
        y = F.linear(x, weight.to(dt), None if bias is None else bias.to(dt))  # (..., d_out)
        in_place = updates_output_in_place()
        if axis == "rows":
            update = x @ d.T  # (..., k)
            y = y.index_add_(-1, index, update) if in_place else y.index_add(-1, index, update)
            saved = (x,) if source is None else source[1]
        else:
            saved = (x.index_select(-1, index),)  # (..., k)
            if in_place:
                _flat(y).addmm_(_flat(saved[0]), d.T)
            else:
                y = _flat(y).addmm(_flat(saved[0]), d.T).view(y.shape)
        ctx.save_for_backward(weight, index, d, *saved)
        ctx.axis, ctx.delta_dtype = axis, delta.dtype
        ctx.rebuild = None if source is None else source[0]
        return y

    @staticmethod
    def backward(ctx, grad_y):
        weight, index, d, *saved = ctx.saved_tensors
        saved = saved[0] if ctx.rebuild is None else ctx.rebuild(*saved)
        rows = ctx.axis == "rows"
        g = grad_y.to(saved.dtype)
        g_k = _flat(g.index_select(-1, index)) if rows else None  # (n, k)
        grad_x = grad_delta = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight.to(saved.dtype)  # (..., d_in)
            if rows:
                _flat(grad_x).addmm_(g_k, d)
            else:
                grad_x.index_add_(-1, index, g @ d)
        if ctx.needs_input_grad[4]:
            grad_delta = ((g_k if rows else _flat(g)).T @ _flat(saved)).to(ctx.delta_dtype)
        return grad_x, None, None, None, grad_delta, None, None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear runs in for input `x`: autocast's, where autocast is on, else x's own."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def sliced_linear(x, weight, bias, index, delta, axis: str, source=None) -> torch.Tensor:
    """x @ (W + slice update).T + b through the fused functions, with autocast's casting done here. `source`
    (rows only): how x itself is rebuilt from tensors kept anyway (recompute.py), once for all slices reading x,
    cast included."""
    dt = compute_dtype(x)
    if source is not None:
        source = shared_rebuild(x, source, dt)
    with torch.autocast(x.device.type, enabled=False):
        return SlicedLinearFunction.apply(x.to(dt), weight, bias, index, delta, axis, source)
