"""The fine-tuning methods compared, each as setup -> `Prepared` (what to call, what to step, how to undo).

All act on the same random-init model, one after another; `Prepared.undo()` gives the plain frozen base back
(every parameter frozen, no wrapper left), so one model per shape serves every method.

    floor    nothing trainable; the embedding output requires grad, so backward runs through every layer to
             the inputs: the least any adapter method can cost (its own extra work = 0)
    ours     sprune_trainer.layers.surgery.inject_slices, r rows (or columns) per projection, random indices,
             SliceAdamW;
             rows save their inputs (recompute_slice_inputs=False) unless "recompute": rebuilt in backward from
             what the frozen model keeps (recompute_slice_inputs, the trainer's default for rows since the H200
             run);
             "guard": the non-finite guard on the optimizer, as SparseNeuronTrainer runs it (its worst case here:
             its own norm over the slice gradients and one host sync per step, no clipping norm to reuse);
             "no cuDNN attention": forward and backward with PyTorch's cuDNN attention off, the trainer's default
    lora     PEFT LoRA (dora: use_dora=True), alpha = 2r, no dropout, PEFT's default fp32 adapter weights
    masked   SpFT baseline: dense projection weights trainable, grads multiplied by a 0/1 row mask before the
             step (the same random rows as `ours`), torch AdamW over the full weights, no weight decay
    full     every parameter trainable, torch AdamW (fused, bf16 params, bf16 moments)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional

import torch
from torch import nn

from .shapes import TARGETS


_SHORT = {"float32": "fp32", "bfloat16": "bf16", "int8": "int8"}


@dataclass(frozen=True)
class MethodSpec:
    name: str          # unique key in results, e.g. "ours_rows_fp32"
    kind: str          # floor | ours | lora | dora | masked | full
    r: int = 0         # rows/columns per layer (ours, masked) or LoRA rank
    axis: str = "rows"
    state: str = "float32"  # SliceAdamW moments (ours)
    fused: bool = True      # ours: the fused sliced matmul (False: the generic base(x) + update path)
    recompute: bool = False  # ours rows: rebuild slice inputs in backward (SparseNeuronConfig.recompute_slice_inputs)
    guard: bool = False      # ours: NonFiniteGuard decides every optimizer step (SparseNeuronConfig.nonfinite_guard)
    cudnn_attention: bool = True  # False: without_cudnn_attention() around the step (SparseNeuronConfig default)

    @property
    def label(self) -> str:
        return {
            "floor": "frozen floor",
            "ours": f"ours {self.axis} r{self.r} ({_SHORT[self.state]} state)" + ("" if self.fused else ", unfused")
                    + (", recompute" if self.recompute else "") + (", guard" if self.guard else "")
                    + ("" if self.cudnn_attention else ", no cuDNN attention"),
            "lora": f"LoRA r{self.r}",
            "dora": f"DoRA r{self.r}",
            "masked": f"masked SpFT r{self.r}",
            "full": "full FT",
        }[self.kind]


def main_methods(r: int = 64) -> list[MethodSpec]:
    """Issue 7's list, cheapest first (full FT / masked SpFT, the likeliest to OOM, last)."""
    return [
        MethodSpec("floor", "floor"),
        MethodSpec("ours_rows_fp32", "ours", r, "rows", "float32"),
        MethodSpec("ours_rows_fp32_recompute", "ours", r, "rows", "float32", recompute=True),
        MethodSpec("ours_rows_fp32_guard", "ours", r, "rows", "float32", guard=True),
        MethodSpec("ours_rows_fp32_no_cudnn", "ours", r, "rows", "float32", cudnn_attention=False),
        MethodSpec("ours_rows_int8", "ours", r, "rows", "int8"),
        MethodSpec("ours_cols_fp32", "ours", r, "columns", "float32"),
        MethodSpec("ours_rows_fp32_unfused", "ours", r, "rows", "float32", fused=False),
        MethodSpec("ours_cols_fp32_unfused", "ours", r, "columns", "float32", fused=False),
        MethodSpec("lora_r16", "lora", 16),
        MethodSpec("lora_r32", "lora", 32),
        MethodSpec("dora_r16", "dora", 16),
        MethodSpec("masked_spft", "masked", r),
        MethodSpec("full_ft", "full"),
    ]


def main_method(name: str, r: int = 64) -> MethodSpec:
    """One entry of `main_methods` by its name (KeyError: not one of them)."""
    return {s.name: s for s in main_methods(r)}[name]


@dataclass
class Prepared:
    model: nn.Module                      # what to call (the PEFT wrapper for LoRA/DoRA)
    optimizer: Optional[torch.optim.Optimizer]
    undo: Callable[[], None]
    trainable_params: int                 # numbers that get a gradient and optimizer state
    effective_params: int                 # numbers that can change (masked SpFT: the rows only)
    before_step: Optional[Callable[[], None]] = None
    step_context: Callable[[], ContextManager] = contextlib.nullcontext  # around forward + backward
    notes: list[str] = field(default_factory=list)


def target_layers(model: nn.Module) -> dict[str, nn.Linear]:
    from sprune_trainer.layers.targets import find_target_layers
    return find_target_layers(model, TARGETS)


def random_selection(layers: dict[str, nn.Linear], r: int, axis: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """name -> r random distinct indices (clamped to the layer's size). Importance scoring is timed separately."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, layer in layers.items():
        n = layer.out_features if axis == "rows" else layer.in_features
        out[name] = torch.randperm(n, generator=gen)[: min(r, n)]
    return out


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None


def _adamw(params, lr: float) -> torch.optim.AdamW:
    params = list(params)
    on_gpu = all(p.device.type == "cuda" for p in params)
    # fused: what HF Trainer's default optimizer ("adamw_torch_fused") runs; no full-size temporaries
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=on_gpu, foreach=False if not on_gpu else None)


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


# --------------------------------------------------------------------------------------------------------
def setup_floor(model, spec, lr):
    freeze_all(model)
    return Prepared(model, None, lambda: None, 0, 0)


def setup_ours(model, spec, lr):
    from sprune_trainer import SliceAdamW, SparseNeuronConfig
    from sprune_trainer.layers.surgery import CONFIG_ATTR, inject_slices
    from sprune_trainer.training.nonfinite import NonFiniteGuard, without_cudnn_attention

    layers = target_layers(model)
    selection = random_selection(layers, spec.r, spec.axis)
    cfg = SparseNeuronConfig(neurons_per_layer=spec.r, axis=spec.axis, optimizer_state=spec.state,
                             target_modules=list(TARGETS), importance="random", recompute_slice_inputs=spec.recompute)
    wrapped = inject_slices(model, selection, cfg)  # freezes everything else
    for layer in wrapped.values():
        layer.fused = spec.fused

    def undo():
        for name, layer in wrapped.items():
            _replace(model, name, layer.base_layer)
        if hasattr(model, CONFIG_ATTR):
            delattr(model, CONFIG_ATTR)
        freeze_all(model)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = SliceAdamW(params, lr=lr, weight_decay=0.0, state_dtype=spec.state)
    if spec.guard:
        NonFiniteGuard().attach_optimizer(opt)
    n = _numel(params)
    context = contextlib.nullcontext
    if not spec.cudnn_attention:
        device = next(model.parameters()).device
        context = lambda: without_cudnn_attention(device)  # noqa: E731
    return Prepared(model, opt, undo, n, n, step_context=context)


def setup_lora(model, spec, lr):
    from peft import LoraConfig, get_peft_model

    freeze_all(model)
    cfg = LoraConfig(r=spec.r, lora_alpha=2 * spec.r, lora_dropout=0.0, target_modules=list(TARGETS),
                     use_dora=spec.kind == "dora", bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)

    def undo():
        peft_model.unload()  # puts the plain base linears back (no merge)
        freeze_all(model)

    params = [p for p in peft_model.parameters() if p.requires_grad]
    n = _numel(params)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
    return Prepared(peft_model, _adamw(params, lr), undo, n, n, notes=[f"adapter dtype {','.join(dtypes)}"])


def setup_masked(model, spec, lr):
    freeze_all(model)
    layers = target_layers(model)
    selection = random_selection(layers, spec.r, "rows")
    pairs = []
    for name, layer in layers.items():
        w = layer.weight
        mask = torch.zeros(w.shape[0], 1, dtype=w.dtype, device=w.device)  # (d_out, 1)
        mask[selection[name].to(w.device)] = 1
        w.requires_grad_(True)
        pairs.append((w, mask))

    def before_step():
        for w, mask in pairs:
            if w.grad is not None:
                w.grad.mul_(mask)

    weights = [w for w, _ in pairs]
    effective = sum(len(selection[n]) * layer.in_features for n, layer in layers.items())
    return Prepared(model, _adamw(weights, lr), lambda: freeze_all(model), _numel(weights), effective,
                    before_step=before_step)


def setup_full(model, spec, lr):
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    n = _numel(params)
    return Prepared(model, _adamw(params, lr), lambda: freeze_all(model), n, n)


SETUP = {"floor": setup_floor, "ours": setup_ours, "lora": setup_lora, "dora": setup_lora,
         "masked": setup_masked, "full": setup_full}


def setup(model: nn.Module, spec: MethodSpec, lr: float = 1e-5) -> Prepared:
    return SETUP[spec.kind](model, spec, lr)


def static_bytes_estimate(model: nn.Module, spec: MethodSpec) -> int:
    """Weights + gradients + AdamW moments of the methods whose state is model-sized (before activations):
    used to skip a run that cannot fit, instead of allocating until it fails."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if spec.kind == "full":
        trained = list(model.parameters())
    elif spec.kind == "masked":
        trained = [layer.weight for layer in target_layers(model).values()]
    else:
        return weights
    return weights + sum(3 * p.numel() * p.element_size() for p in trained)  # grad + 2 moments, param dtype
