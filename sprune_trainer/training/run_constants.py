"""`RunConstantsMixin`: what the Trainer finds on every step by walking the whole model, though it cannot change
while one `train()` runs, found once per run instead.

A sliced MoE model holds ~5 modules and 2 slice tensors per expert (thousands at 128 experts a layer), and each
walk over its modules and parameters costs more host time than the step's expert matmuls: the parameter count in
`floating_point_ops` and the parameter list handed to gradient clipping (every micro-batch / every step). Surgery
happens before the run starts (`prepare_sparse_model`) and merging after it ends, so within a run both stay fixed;
outside a run, and wherever clipping or the estimate is not the Trainer's plain one, the Trainer's own code runs."""
from __future__ import annotations

from typing import Any, Callable, Optional

from accelerate.utils import DistributedType
from transformers import PreTrainedModel, Trainer
from transformers.utils import is_sagemaker_mp_enabled

# accelerate types whose clip_grad_norm_ is torch's over the parameters given (DDP-like or one process); FSDP, XLA
# and DeepSpeed compare the list with the model's or take the norm elsewhere
_PLAIN_CLIPPING = {getattr(DistributedType, n) for n in ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_NPU", "MULTI_XPU",
                                                         "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA", "MULTI_HPU")
                   if hasattr(DistributedType, n)}


class RunConstantsMixin:
    """For a `transformers.Trainer` subclass (after the mixins that prepare the model in their `train()`)."""

    _run_constants: Optional[dict] = None  # set while train() runs

    def train(self, *args, **kwargs):
        self._run_constants = {}
        try:
            return super().train(*args, **kwargs)
        finally:
            self._run_constants = None  # what it holds (parameters) is let go; a later run finds its own

    def once_per_run(self, key: Any, find: Callable[[], Any]) -> Any:
        """`find()`, kept under `key` until this run ends (found afresh on every call outside a run)."""
        if self._run_constants is None:
            return find()
        if key not in self._run_constants:
            self._run_constants[key] = find()
        return self._run_constants[key]

    def floating_point_ops(self, inputs) -> int:
        """The Trainer's estimate (6 x input tokens x the model's non-embedding parameters), the count taken once
        per run; the Trainer's own call for a model or trainer that estimates otherwise."""
        model = self.model
        main = getattr(model, "main_input_name", "input_ids")
        if not (_default_estimate(model) and _parent_is_trainers(self, "floating_point_ops") and main in inputs):
            return super().floating_point_ops(inputs)
        count = self.once_per_run(("num_parameters", id(model)), lambda: model.num_parameters(exclude_embeddings=True))
        return 6 * inputs[main].numel() * count

    def _clip_grad_norm(self, model):  # transformers >= 5.x (4.57 clips inline)
        params = self._gradient_holders(model, "_clip_grad_norm")
        if params is None:
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_(params, self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):  # transformers >= 5.x: the norm when clipping is off
        params = self._gradient_holders(model, "_get_grad_norm") if grad_norm is None else None
        if params is not None:
            grad_norm = self.accelerator.clip_grad_norm_(params, float("inf"))
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def _gradient_holders(self, model, method: str) -> Optional[list]:
        """The parameters of `model` that require a gradient, in its order, listed once per run: the only ones a
        backward fills (the Trainer sets every gradient to None after each step), so the norm is the one over
        `model.parameters()`. None outside a run, under a subclass's own `method`, or where clipping is not
        torch's over the list given (FSDP, XLA, DeepSpeed, SageMaker, DTensor parameters)."""
        if self._run_constants is None or is_sagemaker_mp_enabled() or (
                self.accelerator.distributed_type not in _PLAIN_CLIPPING) or not _parent_is_trainers(self, method):
            return None
        return self.once_per_run(("gradient_holders", id(model)), lambda: _plain_trainable(model))


def _plain_trainable(model) -> Optional[list]:
    params = [p for p in model.parameters() if p.requires_grad]
    return None if any(_is_dtensor(p) for p in params) else params


def _is_dtensor(p) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # (torch without distributed, or < 2.5)
        return False
    return isinstance(p, DTensor)


def _default_estimate(model) -> bool:
    """A transformers model whose parameter count and flop estimate are transformers' own."""
    return isinstance(model, PreTrainedModel) and all(
        getattr(type(model), n, None) is getattr(PreTrainedModel, n, None) for n in ("num_parameters",
                                                                                      "floating_point_ops"))


def _parent_is_trainers(trainer, name: str) -> bool:
    """Whether the next `name` after this mixin in `trainer`'s class order is Trainer's own (no subclass between,
    e.g. a TRL trainer, estimates otherwise)."""
    mro = type(trainer).__mro__
    after = mro[mro.index(RunConstantsMixin) + 1:]
    owner = next((c for c in after if name in c.__dict__), None)
    return owner is Trainer
