"""What the slicer takes as a linear layer, and its weight seen as (d_out, d_in):

- nn.Linear (bitsandbytes' 4/8-bit linears subclass it);
- transformers' Conv1D (GPT-2 and models built on it): a linear whose weight is stored transposed, (d_in, d_out),
  y = x @ W + b; its (d_out, d_in) weight is a transposed view, so merges write into the stored tensor;
- one expert's projection of a fused MoE experts module (`experts.ExpertLinear`)."""
from __future__ import annotations

import torch
from torch import nn

from .experts import ExpertLinear


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_sliceable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, ExpertLinear)) or is_conv1d(module)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The (d_out, d_in) weight (a view for Conv1D and experts); for a 4-bit layer its packed storage as is."""
    return module.weight.t() if is_conv1d(module) else module.weight


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in); from the module's features, as 4-bit weights are stored packed (a Conv1D's transposed weight:
    its full shape, also while ZeRO-3 holds only a shard of it)."""
    if is_conv1d(module):
        shape = getattr(module.weight, "ds_shape", module.weight.shape)
        return shape[1], shape[0]
    return module.out_features, module.in_features


def source_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters that hold the layer's weights: the fused tensors an expert view reads, else its own."""
    if isinstance(module, ExpertLinear):
        owner = module._owner
        return [getattr(owner, n) for n in (module.param_name, module.bias_name) if n is not None]
    return list(module.parameters())


def is_plain_dense(module: nn.Module) -> bool:
    """A dense float layer computed as x @ W.T + b and nothing else (no quantized storage, no subclass forward)."""
    return type(module) is nn.Linear or is_conv1d(module) or isinstance(module, ExpertLinear)
