"""`SlicedLinear`: a frozen linear layer plus a trainable slice of its neurons.

rows    (the paper): delta (k, d_in) holds updates of W[I, :];  y = base(x);  y[..., I] += x @ delta.T
columns (ours):      delta (d_out, k) holds updates of W[:, J]; y = base(x) + x[..., J] @ delta.T
With `dropout` > 0 (training mode) the slice sees dropout(x) instead of x, as LoRA's A does.
No dense d_out x d_in update, mask or gradient is ever allocated; the optimizer sees only `delta`."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .linear_like import is_plain_dense, linear_shape, linear_weight, source_parameters
from .recompute import input_source
from .sliced_matmul import sliced_linear

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def slice_dtype_for(base: nn.Linear, name: str) -> torch.dtype:
    """The dtype a slice is kept in: fixed, or ('auto') the base weight's float dtype (4-bit bases: compute dtype)."""
    if name != "auto":
        return _DTYPES[name]
    if base.weight.dtype.is_floating_point:
        return base.weight.dtype
    return getattr(base, "compute_dtype", None) or torch.float32


def checked_index(index, n_units: int) -> torch.Tensor:
    """`index` as a sorted int64 CPU tensor, or a ValueError unless it is non-empty, unique and in [0, n_units)."""
    index = torch.as_tensor(index, dtype=torch.long).flatten().cpu()
    if index.numel() == 0 or index.min() < 0 or index.max() >= n_units:
        raise ValueError(f"neuron indices must be non-empty and in [0, {n_units}), got {index.tolist()[:8]}...")
    if index.unique().numel() != index.numel():
        raise ValueError("neuron indices must be unique")
    return torch.sort(index).values


class SlicedLinear(nn.Module):
    """Wraps `base_layer` (kept frozen, never modified unless merged) and trains `delta` on neurons `index`."""

    fused = True  # False: always the generic path (the reference the fused one is tested and benchmarked against)
    # rows, fused path: rebuild the input in backward from tensors the model keeps anyway (recompute.py), not save it
    recompute_input = False

    def __init__(self, base_layer: nn.Linear, index: torch.Tensor, axis: str = "rows",
                 dtype: torch.dtype = torch.float32, train_bias: bool = False, dropout: float = 0.0):
        super().__init__()
        if axis not in ("rows", "columns"):
            raise ValueError(f"axis must be 'rows' or 'columns', got {axis!r}")
        d_out, d_in = linear_shape(base_layer)
        index = checked_index(index, d_out if axis == "rows" else d_in)
        if train_bias and axis != "rows":
            raise ValueError("train_bias needs axis='rows'")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")

        device = base_layer.weight.device
        self.base_layer = base_layer
        self.axis = axis
        self.register_buffer("index", index.to(device))  # (k,)
        k = index.numel()
        shape = (k, d_in) if axis == "rows" else (d_out, k)
        self.delta = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))
        self.bias_delta = nn.Parameter(torch.zeros(k, device=device, dtype=dtype)) if (
            train_bias and base_layer.bias is not None) else None
        # on the slice path's input only (LoRA-style); nn.Dropout is the identity in eval mode
        self.slice_dropout = nn.Dropout(dropout) if dropout > 0 else None
        self._merged_original: tuple | None = None  # exact copies of the rows/columns overwritten by merge()
        self._recompute_checked = False

    # Code that inspects `layer.weight` / `layer.in_features` (HF, quantizers) keeps working on the wrapper.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return linear_shape(self.base_layer)[1]

    @property
    def out_features(self) -> int:
        return linear_shape(self.base_layer)[0]

    @property
    def merged(self) -> bool:
        return self._merged_original is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        dropping = self.slice_dropout is not None and self.training
        if not dropping and self._fusable():
            base = self.base_layer
            # compiled: the compiler's own partitioner decides what to save or recompute (it cannot trace autograd's
            # saved tensors, which the rebuild reads)
            rebuild = self.recompute_input and self.axis == "rows" and not torch.compiler.is_compiling()
            source = self._input_source(x) if rebuild else None
            return sliced_linear(x, linear_weight(base), base.bias, self.index, self.delta, self.axis, source)
        y = self.base_layer(x)  # (..., d_out)
        delta = self.delta.to(x.dtype)
        if self.axis == "rows":
            update = self._dropout(x) @ delta.T  # (..., k)
            if self.bias_delta is not None:
                update = update + self.bias_delta.to(update.dtype)
            return y.index_add(-1, self.index, update.to(y.dtype))
        return y + (self._dropout(x.index_select(-1, self.index)) @ delta.T).to(y.dtype)  # (..., d_out)

    def _input_source(self, x: torch.Tensor):
        """recompute.input_source(x), checked bit-exact on this layer's first use (else today's path from then on)."""
        source = input_source(x)
        if source is not None and not self._recompute_checked:
            with torch.no_grad():
                exact = torch.equal(source[0](*source[1]), x)
            self._recompute_checked = True
            if not exact:
                warnings.warn(f"recompute_slice_inputs: the rebuilt input of a {tuple(self.delta.shape)} slice differs "
                              "from the one seen in forward; this layer saves its input instead", RuntimeWarning)
                self.recompute_input = False
                return None
        return source

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.slice_dropout is None else self.slice_dropout(x)

    def _fusable(self) -> bool:
        """The fused path (sliced_matmul) reads the base weight itself, so only for a plain, hook-free dense
        layer (linear_like.is_plain_dense): not a quantized or ZeRO-3-partitioned weight (ds_id), nor one that
        accelerate or user hooks must see being called; `base_layer(x)` plus a separate update otherwise."""
        base = self.base_layer
        return (self.fused and is_plain_dense(base) and self.bias_delta is None and base.weight.dtype.is_floating_point
                and not any(hasattr(p, "ds_id") for p in source_parameters(base)) and not hasattr(base, "_hf_hook")
                and not (base._forward_hooks or base._forward_pre_hooks))

    @property
    def _dim(self) -> int:
        return 0 if self.axis == "rows" else 1

    def select(self, weight: torch.Tensor) -> torch.Tensor:
        """The part of a dense (d_out, d_in) `weight` this slice covers: W[I] (k, d_in) or W[:, J] (d_out, k)."""
        return weight.index_select(self._dim, self.index)

    @torch.no_grad()
    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """A new fp32 tensor: the dense base `weight` (e.g. dequantized) with the slice added to its rows/columns."""
        return weight.float().index_add(self._dim, self.index, self.delta.float())

    @torch.no_grad()
    def merged_bias(self):
        """The base bias with the trained bias entries added (a new tensor), or the base bias itself."""
        bias = self.base_layer.bias
        if self.bias_delta is None:
            return bias
        return bias.float().index_add(0, self.index, self.bias_delta.float()).to(bias.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W[I] += delta (rows) or W[:, J] += delta (columns), in the base weight's dtype; unmerge() undoes it
        exactly by restoring the saved original rows/columns."""
        if self.merged:
            return
        w = linear_weight(self.base_layer)  # a view for Conv1D and experts: written through to the stored tensor
        if not w.dtype.is_floating_point:
            raise TypeError(f"cannot merge into a {w.dtype} (quantized) weight in place; merge_sparse "
                            "dequantizes such layers")
        if self.axis == "rows":
            original = w[self.index].clone()
            w[self.index] = (original.float() + self.delta.float()).to(w.dtype)
        else:
            original = w[:, self.index].clone()
            w[:, self.index] = (original.float() + self.delta.float()).to(w.dtype)
        bias_original = None
        if self.bias_delta is not None:
            b = self.base_layer.bias
            bias_original = b[self.index].clone()
            b[self.index] = (bias_original.float() + self.bias_delta.float()).to(b.dtype)
        self._merged_original = (original, bias_original)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        original, bias_original = self._merged_original
        w = linear_weight(self.base_layer)
        if self.axis == "rows":
            w[self.index] = original
        else:
            w[:, self.index] = original
        if bias_original is not None:
            self.base_layer.bias[self.index] = bias_original
        self._merged_original = None

    def extra_repr(self) -> str:
        dropout = "" if self.slice_dropout is None else f", dropout={self.slice_dropout.p}"
        return f"axis={self.axis}, k={self.index.numel()}, delta={tuple(self.delta.shape)}{dropout}"
