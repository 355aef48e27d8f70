"""MoE experts stored as fused 3-D parameters (transformers 5.x: `gate_up_proj` (E, 2·d_ff, d), `down_proj` (E, d, d_ff))
as per-expert linears the slicer can target.

`expose_experts` gives such an experts module one child per expert (`experts.3.gate_up_proj`, `experts.3.down_proj`):
an `ExpertLinear`, a view onto matrix 3 of the fused parameter that owns no weight. The module then runs transformers'
own per-expert loop through those children, so importance hooks see each expert on exactly the tokens routed to it, and
a slice wraps an expert's projection like any linear: its update is added inside the expert's matmul, with no dense copy
or gradient of any expert weight. The loop is checked against the module's own forward once per class before it is
used (a layout this code does not know is left frozen, and said so). `hide_experts` undoes it exactly: the module's
parameters and state-dict keys never change."""
from __future__ import annotations

import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

from .subtree_train import install_subtree_train, remove_subtree_train

logger = logging.get_logger(__name__)

_EXPOSED = "_sprune_expert_views"  # instance attribute: the experts module runs through its per-expert children
_REFUSED = "_sprune_experts_refused"  # instance attribute: why it cannot be exposed (said once, not re-checked)


class ExpertLinear(nn.Module):
    """Matrix `expert` of the 3-D parameter `owner.<param_name>`, seen as a linear layer with weight (d_out, d_in).

    Owns nothing: the owner keeps the parameter (its name, sharding and optimizer state are untouched), and this view
    reads it on each call, so `.to()`, ZeRO-3 gathering and in-place merges act on the fused tensor itself."""

    def __init__(self, owner: nn.Module, param_name: str, expert: int, transposed: bool = False,
                 bias_name: Optional[str] = None):
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # not a child module: the owner holds this view
        self.param_name, self.expert, self.transposed, self.bias_name = param_name, expert, transposed, bias_name

    @property
    def source(self) -> nn.Parameter:
        """The fused (E, ...) parameter this view reads."""
        return getattr(self._owner, self.param_name)

    @property
    def weight(self) -> torch.Tensor:
        p = self.source
        if p.dim() != 3:  # this rank's ZeRO-3 shard, outside a gather: only its dtype and device mean anything
            return p
        w = p[self.expert]
        return w.t() if self.transposed else w

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return None if self.bias_name is None else getattr(self._owner, self.bias_name)[self.expert]

    @property
    def out_features(self) -> int:
        return _full_shape(self.source)[2 if self.transposed else 1]

    @property
    def in_features(self) -> int:
        return _full_shape(self.source)[1 if self.transposed else 2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.param_name}[{self.expert}], in_features={self.in_features}, out_features={self.out_features}"


def _full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """A parameter's shape, also while ZeRO-3 holds only this rank's flat shard of it."""
    return tuple(getattr(p, "ds_shape", p.shape))


def activate(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The experts' activation between their projections: the module's own gate (act(gate) * up on [gate; up]), or
    its activation alone without a gate."""
    if not module.has_gate:
        return module.act_fn(h)
    if hasattr(module, "_apply_gate"):
        return module._apply_gate(h)
    gate, up = h.chunk(2, dim=-1)  # (transformers < 5.2x: the default gate, inline)
    return module.act_fn(gate) * up


def _projections(module: nn.Module) -> tuple[str, str]:
    return ("gate_up_proj" if module.has_gate else "up_proj"), "down_proj"


def is_fused_experts(module: nn.Module) -> bool:
    """transformers' experts layout (`use_experts_implementation`): 3-D projection parameters and layout flags."""
    if not all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed", "num_experts")):
        return False
    return all(isinstance(getattr(module, n, None), nn.Parameter) and len(_full_shape(getattr(module, n))) == 3
               for n in _projections(module))


def _sliced_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' eager experts loop, each projection called through this expert's child module; the grouped
    matmul path (grouped_experts.py) where the model runs grouped_mm experts and the slices stack."""
    from .grouped_experts import grouped_sliced_experts_forward, grouped_slices  # imports sliced_linear

    slices = grouped_slices(self, _projections(self))
    if slices is not None:
        return grouped_sliced_experts_forward(self, hidden_states, top_k_index, top_k_weights, slices)
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)  # (E+1, top_k, tokens)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
    up_name, down_name = _projections(self)
    for e in hit:
        if e == self.num_experts:  # expert-parallel sentinel: tokens handled on another rank
            continue
        expert = self._modules[str(e)]
        top_k_pos, token_idx = torch.where(mask[e])
        h = getattr(expert, up_name)(hidden_states[token_idx])
        h = activate(self, h)
        h = getattr(expert, down_name)(h)
        if getattr(self, "has_post_expert_norm", False):  # (transformers < 5.2x: no such flag)
            h = self.post_expert_norm(h)
        h = h * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, h.to(final.dtype))
    if torch.is_grad_enabled():
        hit_set = set(hit)
        idle = [p for e in range(self.num_experts) if e not in hit_set
                for p in self._modules[str(e)].parameters() if p.requires_grad]
        if idle:
            final = _ZeroGradFor.apply(final, *idle)
    return final


class _ZeroGradFor(torch.autograd.Function):
    """Identity on `out` that gives each of `params` a zero gradient: the slices of an expert no token reached this
    step get zeros, as the rows of a dense fused expert weight would (so Adam's moments decay and move them as in
    dense training), instead of no gradient at all."""

    @staticmethod
    def forward(ctx, out, *params):
        ctx.shapes = [(p.shape, p.dtype, p.device) for p in params]
        return out.clone()  # a new tensor: the caller may add to it in place

    @staticmethod
    def backward(ctx, grad):
        return (grad, *[torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.shapes])


def _add_views(module: nn.Module) -> None:
    for e in range(module.num_experts):
        expert = nn.Module()
        for name in _projections(module):
            bias = f"{name}_bias" if module.has_bias else None
            expert.add_module(name, ExpertLinear(module, name, e, module.is_transposed, bias))
        expert.train(module.training)  # a model in eval mode stays so: surgery gives its slices this mode (no dropout)
        module.add_module(str(e), expert)
    module.forward = types.MethodType(_sliced_experts_forward, module)
    install_subtree_train(module)  # model.train() on every step: ~5 modules per expert now
    setattr(module, _EXPOSED, True)


def _remove_views(module: nn.Module) -> None:
    from .stacked_slices import forget_stacked_slices  # (local: it imports sliced_linear, which imports this module)

    for e in range(module.num_experts):
        module._modules.pop(str(e), None)
    module.__dict__.pop("forward", None)
    module.__dict__.pop(_EXPOSED, None)
    remove_subtree_train(module)
    forget_stacked_slices(module)


@torch.no_grad()
def _loop_matches(module: nn.Module) -> Optional[str]:
    """None when the per-expert loop computes what the module's own forward does on a few random tokens, else why
    not. Skipped (None) for weights not materialised here (meta, ZeRO-3 shards)."""
    up = getattr(module, _projections(module)[0])
    if up.device.type == "meta" or up.numel() == 0 or hasattr(up, "ds_id"):
        return None
    gen = torch.Generator(device=up.device).manual_seed(0)
    hidden = _full_shape(up)[1 if module.is_transposed else 2]
    tokens, top_k = 6, min(2, module.num_experts)
    x = torch.randn(tokens, hidden, generator=gen, device=up.device, dtype=torch.float32).to(up.dtype)
    index = torch.stack([torch.randperm(module.num_experts, generator=gen, device=up.device)[:top_k]
                         for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen, device=up.device, dtype=torch.float32).to(up.dtype)
    expected = type(module).forward(module, x, index, weights).float()
    got = _sliced_experts_forward(module, x, index, weights).float()
    tol = 1e-4 if up.dtype == torch.float32 else 3e-2
    err = (got - expected).abs().max().item()
    scale = expected.abs().max().item()
    return None if err <= tol * max(scale, 1.0) else f"max |difference| {err:.3g} against its own forward"


def expose_experts(model: nn.Module) -> dict[str, str]:
    """Expose every fused experts module of `model` (idempotent). Returns {module name: why it was left as it is} for
    the experts modules newly found unexposable (one warning says so; they are not checked again); their weights stay
    frozen and the coverage warning names them too."""
    refused, verdict = {}, {}
    for name, module in list(model.named_modules()):  # a list: exposing adds children
        if not is_fused_experts(module) or getattr(module, _EXPOSED, False) or _REFUSED in module.__dict__:
            continue
        if hasattr(module, "_hf_hook") or "forward" in module.__dict__:
            refused[name] = "its forward is wrapped (accelerate hooks or another patch)"
            continue
        if getattr(module, "_is_expert_parallel", False):
            refused[name] = "expert parallelism is on"
            continue
        _add_views(module)
        cls = type(module)
        if cls not in verdict:
            verdict[cls] = _loop_matches(module)
        if verdict[cls] is not None:
            _remove_views(module)
            refused[name] = f"{cls.__name__}'s per-expert computation is not the layout this code knows ({verdict[cls]})"
    for name, why in refused.items():
        model.get_submodule(name).__dict__[_REFUSED] = why
    if refused:
        first = next(iter(refused.items()))
        logger.warning(f"{len(refused)} MoE experts modules cannot be sliced and stay frozen, e.g. {first[0]}: "
                       f"{first[1]}.")
    return refused


def hide_experts(model: nn.Module, only_unsliced: bool = False) -> None:
    """Put every exposed experts module back to its own forward and children (`only_unsliced`: those that hold no
    slice, e.g. after surgery put none there or a failed load check)."""
    from .sliced_linear import SlicedLinear  # (local: sliced_linear imports linear_like, which imports this module)

    for module in list(model.modules()):
        if getattr(module, _EXPOSED, False) and not (
                only_unsliced and any(isinstance(c, SlicedLinear) for c in module.modules())):
            _remove_views(module)


def expert_group(name: str) -> Optional[str]:
    """`<...>.experts.<projection>` for the name of one expert's projection (`<...>.experts.3.gate_up_proj`, exposed
    or, in transformers 4.x, an nn.Linear of an expert module list): the unit whose experts share one budget with
    `expert_scope='across_experts'`; None for any other layer name."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[-3] == "experts" and parts[-2].isdigit():
        return ".".join(parts[:-2] + [parts[-1]])
    return None
