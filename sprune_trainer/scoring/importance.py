"""Neuron importance: one score per output row (or input column) of every targeted linear.

Entry point: `score_neurons(model, layers, config, batches, loss_fn)`. Each criterion is one small class with
one `score` method (Torch-Pruning's `Importance` shape), looked up by name in `IMPORTANCES`:

    random        seeded uniform                                        nothing
    l1 / l2       ||W_i||_1 / ||W_i||_2                                 weights
    taylor        sum_batches |sum_j W_ij dL/dW_ij|                     backward, output hooks
      elementwise sum_parts sum_j |W_ij dL/dW_ij|  (taylor_form)        backward, one layer's dL/dW at a time
    hessian       sum_parts sum_j W_ij^2 (dL/dW_ij)^2  (OBD, diag. Fisher)  backward, one layer's dL/dW at a time
    zeroth_order  taylor with an SPSA gradient estimate                 two forwards per batch, no backward
    wanda         sum_j |W_ij| ||X_j||_2  (X_j: input feature j over all calibration tokens)  forwards only

"Row i" is output neuron i of W (d_out, d_in); a linear sliced along columns (`config.axis == "columns"`, or its
part in a coupled group, layers/neuron_groups.py) gets every criterion with W transposed (score of input feature j
sums over rows i).

Each calibration batch runs in parts of `config.calibration_micro_batch_size` sequences ('auto': as many as memory
allows, `micro_batch.py`; `calibration.py`), each part's loss weighted by its share of the batch's label tokens: the
criteria linear in the gradient (taylor, zeroth_order) and wanda get exactly the whole-batch score, at the memory
peak of one part. hessian and the elementwise taylor square / take |.| of a gradient, which needs the whole weight
gradient of the unit they score: keeping it for every layer across parts would cost a model-sized fp32 buffer, so
their unit is the part.

Data-driven criteria never compute weight gradients: every parameter is frozen for the duration, the input-embedding
output is made to require grad, and the per-layer quantities come from forward hooks (layer input x, output y) and
an identity autograd function on y whose backward sees g = dL/dy (`_Tap`; under activation checkpointing x and y are
then recomputed with their block, as the model's own activations are). So they work unchanged on a frozen, quantized
(bitsandbytes) base; weights are read through `dense_weight` (dequantized / ZeRO-3 gathered) only where a criterion
needs them. Model state (requires_grad flags, train/eval modes, global RNG, hooks) is restored afterwards, also on
error.

Distributed note: scores are computed from this process's batches only; under DDP/ZeRO the caller must make
the selection identical on every rank (all-reduce the scores, or broadcast rank 0's selection).
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .micro_batch import MicroBatchPlan
from ..config import SparseNeuronConfig
from ..layers.linear_like import linear_shape, source_parameters
from ..layers.neuron_groups import slice_axes
from ..layers.quantization import dequantize_weight

LossFn = Callable[[nn.Module, dict], torch.Tensor]


# ----------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------

def _seed_from(*parts) -> int:
    """A 63-bit seed derived from `parts` (stable across processes, unlike `hash`)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def layer_seed(seed: int, name: str) -> int:
    """Seed of the `random` criterion for layer `name`."""
    return _seed_from("random", seed, name)


def spsa_direction(shape: torch.Size, seed: int, batch_index: int, layer_index: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """The SPSA direction z (fp32, N(0, 1), `shape` = W's shape) of one layer for one batch.

    Drawn from its own generator seeded with (seed, batch_index, layer_index), so it is regenerated
    wherever needed instead of being stored for all layers."""
    gen = torch.Generator(device=device)
    gen.manual_seed(_seed_from("spsa", seed, batch_index, layer_index))
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)


@contextlib.contextmanager
def dense_weight(layer: nn.Module) -> Iterator[torch.Tensor]:
    """Yield `layer`'s weight as a dense fp32 (d_out, d_in) tensor.

    Dequantizes bitsandbytes 4-bit / 8-bit weights through `quantization.dequantize_weight`, which also finds an
    8-bit layer's scales after its first forward (moved from `weight.SCB` to `layer.state`), and gathers a ZeRO-3
    partitioned weight (`ds_id`) for the duration of the block. The layer's values are never modified."""
    partitioned = [p for p in source_parameters(layer) if hasattr(p, "ds_id")]  # DeepSpeed ZeRO-3 shards
    gather = contextlib.nullcontext()
    if partitioned:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
    with gather:
        yield dequantize_weight(layer)


def _reduce_dim(axis: str) -> int:
    """Dimension of W summed over: 1 for one score per row, 0 for one per column."""
    return 1 if axis == "rows" else 0


def _as_2d(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(B, T, d) or (N, d) -> (tokens, d), detached, dtype kept."""
    return None if t is None else t.detach().reshape(-1, t.shape[-1])


def _n_scores(layer: nn.Module, axis: str) -> int:
    """d_out (rows) or d_in (columns)."""
    return linear_shape(layer)[0 if axis == "rows" else 1]


def _default_loss(model: nn.Module, batch: dict) -> Optional[torch.Tensor]:
    out = model(**batch)
    if isinstance(out, dict):
        return out.get("loss")
    return getattr(out, "loss", None)


def _calibration(batches: Optional[Iterable[dict]], config: SparseNeuronConfig, criterion: str,
                 progress: bool) -> Iterator[dict]:
    """The first `config.calibration_batches` batches (never pulls one more), under a progress bar."""
    if batches is None:
        raise ValueError(f"importance={criterion!r} needs calibration batches (got batches=None); pass the "
                         "train dataloader or use importance='l2' / 'l1' / 'random'.")
    n = config.calibration_batches
    try:
        total = min(n, len(batches))
    except TypeError:  # generators, iterable-dataset dataloaders
        total = n
    return iter(tqdm(itertools.islice(batches, n), total=total, desc=f"importance ({criterion})",
                     unit="batch", disable=not progress))


def _no_batches_error(criterion: str) -> ValueError:
    return ValueError(f"importance={criterion!r} needs calibration batches, but the iterable was empty.")


def _no_loss_error(criterion: str) -> ValueError:
    return ValueError(f"importance={criterion!r}: the loss is None or does not depend on the model; the "
                      "calibration batches need labels (e.g. `labels` for a causal LM), or pass a loss_fn "
                      "that returns a differentiable scalar loss.")


@contextlib.contextmanager
def _scoring_mode(model: nn.Module, layers: dict[str, nn.Module], need_input_grad: bool):
    """Eval mode, forked global RNG and, if `need_input_grad`, frozen parameters with grad-requiring inputs.

    Gradients then reach every layer output without any parameter gradient being computed or stored. With
    `need_input_grad`, modules with activation checkpointing on (`gradient_checkpointing`, as transformers sets it)
    stay in training mode, the condition under which they checkpoint (dropout modules inside them stay in eval).
    Everything (modes, flags, RNG, hooks) is restored on exit, also on error."""
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    handles = []
    accel = sorted({(p.device.type, p.device.index) for p in params
                    if p.device.type not in ("cpu", "meta") and p.device.index is not None})
    device_type = accel[0][0] if accel else None
    rng = torch.random.fork_rng(devices=[i for t, i in accel if t == device_type],
                                device_type=device_type or "cuda")
    try:
        with rng:
            model.eval()
            if need_input_grad:
                for m in model.modules():
                    if getattr(m, "gradient_checkpointing", False) is True:
                        m.training = True
                for p in params:
                    p.requires_grad_(False)
                emb = None
                try:
                    emb = model.get_input_embeddings()
                except (AttributeError, NotImplementedError):
                    pass
                if emb is None:
                    emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
                if emb is not None:
                    handles.append(emb.register_forward_hook(_output_requires_grad))
                # safety net (models without embeddings, inputs_embeds, ...): a layer whose input does not
                # require grad gets a grad-requiring alias of it, so its output still receives dL/dy
                for layer in layers.values():
                    handles.append(layer.register_forward_pre_hook(_input_requires_grad))
            yield
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        for m, training in modes:
            m.training = training


def _output_requires_grad(module, args, output):
    if torch.is_tensor(output) and output.is_floating_point() and not output.requires_grad:
        return output.detach().requires_grad_(True)
    return None


def _input_requires_grad(module, args):
    if torch.is_grad_enabled() and args and torch.is_tensor(args[0]) and args[0].is_floating_point() \
            and not args[0].requires_grad:
        return (args[0].detach().requires_grad_(True),) + tuple(args[1:])
    return None


# ----------------------------------------------------------------------------------------------------------
# criteria
# ----------------------------------------------------------------------------------------------------------

class Importance:
    """A criterion: `score` returns {layer name: fp32 scores on the layer's device} (length d_out for rows,
    d_in for columns). `needs_data` criteria consume calibration batches."""

    needs_data = False
    exact_in_parts = True  # scores the same whatever parts a batch is split into (calibration_micro_batch_size)

    def __init__(self, config: SparseNeuronConfig, axes: Optional[dict[str, str]] = None):
        self.config = config
        self.axes = axes or {}

    def axis(self, name: str) -> str:
        """The axis layer `name` is scored along (rows / columns)."""
        return self.axes.get(name, self.config.axis)

    def score(self, model: nn.Module, layers: dict[str, nn.Module], batches: Optional[Iterable[dict]],
              loss_fn: LossFn, progress: bool) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class RandomImportance(Importance):
    """Uniform [0, 1) scores from a generator seeded by (config.seed, layer name); global RNG untouched."""

    def score(self, model, layers, batches, loss_fn, progress):
        out = {}
        for name, layer in layers.items():
            gen = torch.Generator().manual_seed(layer_seed(self.config.seed, name))
            out[name] = torch.rand(_n_scores(layer, self.axis(name)), generator=gen, dtype=torch.float32)
        return out


class NormImportance(Importance):
    """||W_i||_p computed in fp32 (`p` = 1 or 2)."""

    p: float = 2.0

    def score(self, model, layers, batches, loss_fn, progress):
        out = {}
        for name, layer in layers.items():
            with dense_weight(layer) as w:  # (d_out, d_in)
                out[name] = torch.linalg.vector_norm(w, ord=self.p, dim=_reduce_dim(self.axis(name)))
        return out


class L1Importance(NormImportance):
    p = 1.0


class L2Importance(NormImportance):
    p = 2.0


class _Tap(torch.autograd.Function):
    """Identity on a layer's output y whose backward hands (x, y, dL/dy) to `on_grad`.

    x and y are kept with save_for_backward, so they live exactly as the model's own saved activations do: freed by
    the backward that uses them, and under activation checkpointing dropped after the forward and recomputed with
    their block in backward (non-reentrant checkpointing), or not kept at all by the block's no-grad forward
    (reentrant). `keep_x` / `keep_y`: only what the criterion needs is kept. The layer's output goes on as a copy:
    models that add to a layer's output in place (Falcon) could not modify a tensor a custom Function returned as is.
    """

    @staticmethod
    def forward(ctx, y, x, on_grad, keep_x, keep_y):
        ctx.on_grad = on_grad
        ctx.save_for_backward(x if keep_x else None, y if keep_y else None)
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        ctx.on_grad(x, y, g)
        return g, None, None, None, None


class GradientImportance(Importance):
    """Shared loop of the backward-hook criteria.

    Per part, every call of a layer contributes `batch_term(layer, x, y, g, axis)` (x: (tokens, d_in) input,
    y: (tokens, d_out) output, g = dL/dy (tokens, d_out), all in the model's dtype; x / y are None unless
    `keeps(axis)` says so, so only what a criterion needs is kept until backward, see `_Tap`). The terms
    are summed (a layer used several times per forward gets its full weight gradient) and `finish(layer, total, axis)`
    turns the sum into a non-negative score increment: over the whole batch when `linear_in_grad` (the term is
    linear in g, so the parts' weighted terms add up to the batch's), else per part, as soon as the grads of all its
    calls have arrived, so a large per-layer term (a d_out x d_in gradient) lives for one layer at a time.

    Calls are counted in the forward only: a checkpointed block's recompute in backward calls its layers again,
    and either those calls (reentrant checkpointing, whose forward ran without grad) or the forward's (non-reentrant)
    get the gradients, never both."""

    needs_data = True
    name = "gradient"
    linear_in_grad = False

    @property
    def exact_in_parts(self) -> bool:
        return self.linear_in_grad

    def keeps(self, axis: str) -> tuple[bool, bool]:
        """(input x, output y): what batch_term needs of a layer scored along `axis`."""
        return True, False

    def batch_term(self, layer: nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Tensor,
                   axis: str) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, layer: nn.Module, total: torch.Tensor, axis: str) -> torch.Tensor:
        raise NotImplementedError

    def score(self, model, layers, batches, loss_fn, progress):
        scores: dict[str, torch.Tensor] = {}
        pending: dict[str, torch.Tensor] = {}  # summed batch_term of layers not finished yet
        calls: dict[str, int] = {}  # forward calls this part
        received: dict[str, int] = {}  # grads received this part
        in_backward = [False]

        def flush(name):
            inc = self.finish(layers[name], pending.pop(name), self.axis(name))
            scores[name] = scores[name] + inc if name in scores else inc

        def make_forward_hook(name):
            axis = self.axis(name)

            def forward_hook(module, args, output):
                if not in_backward[0]:
                    calls[name] = calls.get(name, 0) + 1
                if not (torch.is_tensor(output) and output.requires_grad):
                    return None

                def on_grad(x, y, g):
                    term = self.batch_term(module, _as_2d(x), _as_2d(y), _as_2d(g), axis)
                    pending[name] = pending[name] + term if name in pending else term
                    received[name] = received.get(name, 0) + 1
                    if not self.linear_in_grad and received[name] == calls.get(name, 0):
                        flush(name)

                x = args[0] if args else None
                return _Tap.apply(output, x, on_grad, *self.keeps(axis))
            return forward_hook

        n_batches = 0
        plan = MicroBatchPlan(self.config.calibration_micro_batch_size, self.exact_in_parts)
        with _scoring_mode(model, layers, need_input_grad=True):
            handles = [layer.register_forward_hook(make_forward_hook(name)) for name, layer in layers.items()]
            try:
                for batch in _calibration(batches, self.config, self.name, progress):
                    for part, weight in plan.parts(batch):
                        calls.clear()
                        received.clear()
                        loss = loss_fn(model, part)
                        in_backward[0] = True
                        try:
                            _weighted_backward(loss, weight, self.name)
                        finally:
                            in_backward[0] = False
                        del loss
                        if not self.linear_in_grad:
                            for name in list(pending):  # a call whose output never reached the loss
                                flush(name)
                    for name in list(pending):
                        flush(name)
                    n_batches += 1
            finally:
                for h in handles:
                    h.remove()
                pending.clear()
        if n_batches == 0:
            raise _no_batches_error(self.name)
        return scores


def _weighted_backward(loss, weight: float, criterion: str) -> None:
    """Backward of weight * loss (the part's share of its batch's loss); the loss is dropped before the next part."""
    if loss is None or not torch.is_tensor(loss) or not loss.requires_grad:
        raise _no_loss_error(criterion)
    (loss if weight == 1.0 else loss * weight).backward()


class TaylorImportance(GradientImportance):
    """First-order Taylor (taylor_form='multivariable'): sum over batches of |sum_j W_ij dL/dW_ij|, from the layer
    output alone.

    rows:    sum_j W_ij dL/dW_ij = sum_tokens (y_ti - b_i) g_ti           (no weight needed)
    columns: sum_i W_ij dL/dW_ij = sum_tokens x_tj (g_t @ W)_j"""

    name = "taylor"
    linear_in_grad = True

    def keeps(self, axis):
        return axis != "rows", axis == "rows"

    def batch_term(self, layer, x, y, g, axis):
        g = g.float()
        if axis == "rows":
            term = (y.float() * g).sum(0)  # (d_out,)
            if getattr(layer, "bias", None) is not None:
                term = term - layer.bias.detach().float() * g.sum(0)
            return term
        with dense_weight(layer) as w:
            return ((g @ w) * x.float()).sum(0)  # (tokens, d_in) -> (d_in,)

    def finish(self, layer, total, axis):
        return total.abs()


class WeightGradientImportance(GradientImportance):
    """A criterion of the weight gradient G = g^T x of one part (formed inside the layer's grad hook, one layer at
    a time, never for all layers at once)."""

    def batch_term(self, layer, x, y, g, axis):
        return g.float().t() @ x.float()  # (d_out, d_in)


class HessianImportance(WeightGradientImportance):
    """OBD with the diagonal Fisher: sum over parts of sum_j W_ij^2 G_ij^2."""

    name = "hessian"

    def finish(self, layer, total, axis):
        with dense_weight(layer) as w:
            return (w.square() * total.square()).sum(_reduce_dim(axis))


class ElementwiseTaylorImportance(WeightGradientImportance):
    """Taylor with taylor_form='elementwise' (the paper code's default): sum over parts of sum_j |W_ij G_ij|.

    The paper's code sums G over all calibration batches before |.|, which keeps a full gradient of every layer;
    here |.| is taken per part (see the module doc)."""

    name = "taylor"

    def finish(self, layer, total, axis):
        with dense_weight(layer) as w:
            return (w * total).abs().sum(_reduce_dim(axis))


class ZerothOrderImportance(Importance):
    """Taylor with an SPSA gradient estimate: two forward passes per batch, no backward, weights untouched.

    For batch b every layer l draws z_l ~ N(0, I) (shape of W, from `spsa_direction(seed, b, l)`, regenerated
    rather than stored); forward hooks add +eps x z_l^T, then -eps x z_l^T, to the layer outputs, which is
    the forward of W +- eps z with the frozen (possibly quantized) base left as is (for a bf16 layer z is rounded
    to bf16 and x z^T computed in bf16: `_perturbation_dtype`). With
    c = (L+ - L-) / (2 eps), c z_l estimates dL/dW_l, so c sum_j W_ij z_ij estimates sum_j W_ij dL/dW_ij.

    Unlike `taylor`, the SIGNED estimates are accumulated over batches and the score is the absolute value
    of the sum: each estimate is the true Taylor term plus zero-mean SPSA noise as large as the signal, so
    summing |estimate| would add up |noise| (biasing every row towards its norm), while the signed sum
    averages the noise out. It therefore estimates |sum_batches sum_j W_ij dL/dW_ij|, which equals taylor's
    score when the per-batch terms keep their sign. Layers not called in a batch get no update from it.
    L+- of a batch is the weighted sum of its parts' losses (same z in every part): the whole batch's loss."""

    needs_data = True
    name = "zeroth_order"

    def score(self, model, layers, batches, loss_fn, progress):
        eps = float(self.config.zo_eps)
        index = {name: i for i, name in enumerate(layers)}
        state = {"batch": 0, "sign": 0.0}
        proj: dict[str, torch.Tensor] = {}  # sum_j W_ij z_ij of this batch, per layer
        acc: dict[str, torch.Tensor] = {}

        def make_forward_hook(name):
            def forward_hook(module, args, output):
                if state["sign"] == 0.0:
                    return None
                x = args[0]
                mm = _perturbation_dtype(output.dtype)
                z = spsa_direction(linear_shape(module), self.config.seed, state["batch"], index[name],
                                   x.device).to(mm)
                if state["sign"] > 0 and name not in proj:  # the weight once per layer and batch, not per pass
                    with dense_weight(module) as w:
                        proj[name] = (w * z).sum(_reduce_dim(self.axis(name)))  # fp32 (or fp64) products
                delta = x.to(mm) @ z.t()  # (..., d_out)
                dt = torch.promote_types(output.dtype, torch.float32)  # bf16 -> fp32, fp64 stays
                return (output.to(dt) + state["sign"] * eps * delta.to(dt)).to(output.dtype)
            return forward_hook

        n_batches = 0
        plan = MicroBatchPlan(self.config.calibration_micro_batch_size, self.exact_in_parts)
        with _forward_hooks(model, layers, make_forward_hook):
            try:
                for b, batch in enumerate(_calibration(batches, self.config, self.name, progress)):
                    state["batch"], state["sign"] = b, 1.0
                    parts, plus = [], 0.0  # the minus pass takes the plus pass's parts: the same rounding
                    for part, weight in plan.parts(batch):
                        parts.append((part, weight))
                        plus += weight * _loss_value(loss_fn(model, part), self.name)
                    state["sign"] = -1.0
                    minus = sum(weight * _loss_value(loss_fn(model, part), self.name) for part, weight in parts)
                    state["sign"] = 0.0
                    c = (plus - minus) / (2 * eps)
                    for name, p in proj.items():
                        acc[name] = acc[name] + c * p if name in acc else c * p
                    proj.clear()
                    n_batches += 1
            finally:
                state["sign"] = 0.0
        if n_batches == 0:
            raise _no_batches_error(self.name)
        return {name: a.abs() for name, a in acc.items()}


def _perturbation_dtype(output_dtype: torch.dtype) -> torch.dtype:
    """The dtype of zeroth_order's x @ z^T: bf16 for a layer that computes in bf16, else at least fp32.

    A bf16 layer's perturbed output is rounded back to bf16, which loses far more of eps x z^T than computing
    that product in bf16 does, and an fp32 product as large as the layer's own matmul is what made the criterion
    slow on GPUs (fp32 matmuls run at a small fraction of bf16's rate). z is rounded to bf16 for both the
    product and the projection sum_j W_ij z_ij, so the estimate stays c z along the direction actually taken.
    fp16 keeps fp32: x z^T with z ~ N(0, 1) can exceed fp16's range where the layer's own output does not."""
    if output_dtype == torch.bfloat16:
        return torch.bfloat16
    return torch.promote_types(output_dtype, torch.float32)


@contextlib.contextmanager
def _forward_hooks(model: nn.Module, layers: dict[str, nn.Module], make_forward_hook):
    """The forward-only criteria's setting: scoring mode without gradients, `make_forward_hook(name)` on every layer
    for the block (removed after it, also on error)."""
    with _scoring_mode(model, layers, need_input_grad=False), torch.no_grad():
        handles = [layer.register_forward_hook(make_forward_hook(name)) for name, layer in layers.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def _loss_value(loss, criterion: str) -> float:
    if loss is None or not torch.is_tensor(loss):
        raise _no_loss_error(criterion)
    return loss.double().item()


class WandaImportance(Importance):
    """Wanda (Sun et al. 2023; the paper code's WandAImportance): |W_ij| weighted by the norm of input feature j
    over all calibration tokens, ||X_j||_2 = sqrt(sum_tokens x_tj^2), summed over the neuron's weights:

    rows:    sum_j |W_ij| ||X_j||        columns: ||X_j|| sum_i |W_ij|

    Forward passes only (no loss gradient; the loss is computed and ignored); padding positions (attention_mask
    == 0) are left out of the norms. The paper code multiplies |W| by a per-layer sum of these norms instead,
    which ranks rows as l1 does; this is Wanda's own per-weight metric."""

    needs_data = True
    name = "wanda"

    def score(self, model, layers, batches, loss_fn, progress):
        sumsq: dict[str, torch.Tensor] = {}  # (d_in,) fp32 sum of x_j^2 over tokens
        state = {"mask": None}

        def make_forward_hook(name):
            def forward_hook(module, args, output):
                x = args[0].detach()
                x2 = x.float().square()
                mask = state["mask"]
                if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
                    x2 = x2 * mask.to(x2.dtype).unsqueeze(-1)
                s = x2.reshape(-1, x.shape[-1]).sum(0)
                sumsq[name] = sumsq[name] + s if name in sumsq else s
            return forward_hook

        n_batches = 0
        plan = MicroBatchPlan(self.config.calibration_micro_batch_size, self.exact_in_parts)
        with _forward_hooks(model, layers, make_forward_hook):
            try:
                for batch in _calibration(batches, self.config, self.name, progress):
                    for part, _ in plan.parts(batch, weighted=False):
                        mask = part.get("attention_mask")
                        state["mask"] = mask if torch.is_tensor(mask) else None
                        loss_fn(model, part)
                    n_batches += 1
            finally:
                state["mask"] = None
        if n_batches == 0:
            raise _no_batches_error(self.name)
        out = {}
        for name, s in sumsq.items():
            norm = s.sqrt()  # (d_in,)
            with dense_weight(layers[name]) as w:
                out[name] = w.abs() @ norm if self.axis(name) == "rows" else norm * w.abs().sum(0)
        return out


IMPORTANCES: dict[str, type[Importance]] = {
    "random": RandomImportance,
    "l1": L1Importance,
    "l2": L2Importance,
    "taylor": TaylorImportance,
    "hessian": HessianImportance,
    "zeroth_order": ZerothOrderImportance,
    "wanda": WandaImportance,
}


def criterion_for(config: SparseNeuronConfig, axes: Optional[dict[str, str]] = None) -> Importance:
    """The criterion `config` asks for (taylor's form decides between its two classes), scoring each layer along
    `axes[name]` (default: config.axis)."""
    if config.importance == "taylor" and config.taylor_form == "elementwise":
        return ElementwiseTaylorImportance(config, axes)
    return IMPORTANCES[config.importance](config, axes)


def score_neurons(model: nn.Module, layers: dict[str, nn.Linear], config: SparseNeuronConfig,
                  batches: Iterable[dict] | None = None, loss_fn: LossFn | None = None,
                  progress: bool = True) -> dict[str, torch.Tensor]:
    """Score every neuron of `layers` with `config.importance`.

    Args:
        model: the model containing `layers` (left exactly as it was found).
        layers: name -> frozen base linear (weight (d_out, d_in), optional bias) inside `model`.
        config: uses `importance`, `taylor_form`, `axis`, `calibration_batches`, `calibration_micro_batch_size`,
            `seed`, `zo_eps`.
        batches: device-placed input dicts (e.g. the train dataloader); at most `calibration_batches` are
            taken. Needed by taylor / hessian / zeroth_order / wanda, ignored by the others.
        loss_fn: `loss_fn(model, batch) -> scalar loss`; default `model(**batch).loss`.
        progress: show a tqdm bar over the calibration batches.

    Returns:
        name -> 1-D float32 CPU tensor: d_out scores (axis="rows") or d_in scores (axis="columns"); with
        axis="coupled", each layer's along the axis its neuron groups slice it (`slice_axes`).
    """
    axes = slice_axes(model, layers, config.axis)
    importance = criterion_for(config, axes)
    scores = importance.score(model, layers, batches, loss_fn or _default_loss, progress)
    out = {}
    for name, layer in layers.items():
        if name in scores:
            out[name] = scores[name].detach().float().cpu()
        else:  # never reached the loss: no evidence of importance
            out[name] = torch.zeros(_n_scores(layer, axes[name]), dtype=torch.float32)
    return out
