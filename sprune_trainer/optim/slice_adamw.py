"""AdamW for the trainable neuron slices, with optionally compressed moments.

Why not ``torch.optim.AdamW``: the trainer hands this optimizer only the small slice tensors
(``delta`` of shape (k, d_in) per layer), so Adam state is 2·k·d_in numbers instead of
2·d_out·d_in, and those moments can additionally be stored in bf16 (half the bytes) or as
blockwise 8-bit codes (about a quarter), in pure torch, so it runs on CPU and GPU alike without
bitsandbytes. With ``state_dtype="float32"`` the update is bit-for-bit torch's AdamW with the same ``foreach``
setting (default: the multi-tensor path, a few kernels per step for all slices instead of a dozen per
slice, which at hundreds of slices is host time the GPU would wait for), and the state dict uses torch's
key names.

Low-precision parameters (bf16/fp16): decay, moments and step are computed in fp32 from the upcast
parameter and grad, and the parameter is rounded to its dtype once, on write-back (bf16 arithmetic
would round after the decay and again after the step, losing small decays entirely). The moments
are stored in ``state_dtype`` regardless of the parameter dtype.

Compensated low-precision parameters (``compensated=True``): each bf16/fp16 parameter keeps, in a buffer of its own
dtype (``state["compensation"]``), the rounding error of its last write-back; the next step starts from
param + compensation (Kahan-compensated summation). Updates far below the parameter's rounding step then add up
instead of rounding away, and the pair holds about twice the parameter's mantissa bits, at 2 bytes per number for
bf16: a bf16 slice with int8 moments costs 2 (slice) + 2 (gradient) + 2 (compensation) + 2 (moments) = 8 bytes per
trained number, against 16 for fp32 slices and moments.

8-bit state (``state_dtype="int8"``), per block of 256 elements of the flattened tensor:
  exp_avg     -> int8 code k in [-127, 127], value = sign(k) · MAG[|k|] · absmax(block)
  exp_avg_sq  -> uint8 code c,  sqrt(value) = SQ[c] · max(sqrt(block))   (sqrt halves the range)
MAG / SQ (``_dynamic_map``) are bitsandbytes-style "dynamic" maps (dynamic exponent + linear
fraction, levels from 1e-6 to 1): a few percent relative precision even for entries decades below
the block maximum, which a linear map rounds to zero. A positive second moment is never rounded
to zero (the step would become m / eps). Each step dequantizes to fp32, does the AdamW math, and
requantizes.
"""

import torch
from torch.optim.adam import adam as _torch_adam

from .blockwise import BLOCK, dequantize_blockwise, quantize_blockwise  # noqa: F401 (re-exported)
from ..config import OPTIMIZER_STATES as STATE_DTYPES
from .flat_state import FlatChunk, chunk_params

# the state key of a compensated slice's rounding-error buffer (checkpoints store it; the untrained guard reads it)
COMPENSATION = "compensation"

_HPARAMS = ("lr", "betas", "eps", "weight_decay", "state_dtype")  # per param group


def adam_state_bytes_per_param(state_dtype: str) -> float:
    """Bytes of Adam moments per trainable number (ignoring the per-tensor step counter)."""
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be one of {STATE_DTYPES}, got {state_dtype!r}")
    # two moments; int8 adds one fp32 scale per moment per block of 256
    return {"float32": 8.0, "bfloat16": 4.0, "int8": 2.0 + 2 * 4 / BLOCK}[state_dtype]


class SliceAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) whose moments may be stored in fp32, bf16 or blockwise 8 bits.

    Args mirror ``torch.optim.AdamW``; ``state_dtype`` ("float32" | "bfloat16" | "int8") may also
    be set per param group; ``compensated`` keeps low-precision params' rounding errors (module docstring).
    """

    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, state_dtype="float32",
        foreach: bool = True, compensated: bool = False,
    ):
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, state_dtype=state_dtype,
            foreach=foreach, compensated=compensated,
        )
        _check_hparams(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        _check_hparams(self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            for p in with_grad:
                if p.grad.is_sparse:
                    raise RuntimeError("SliceAdamW does not support sparse gradients")
            if not group.get("foreach", True):
                for p in with_grad:
                    self._update(p, group)
                continue
            torch_math = [p for p in with_grad if _torch_math_applies(p, group)]  # fp32: nothing to compensate
            if torch_math:
                self._update_foreach(torch_math, group)
            if _flat_applies(group):  # the layout covers every param of the group, so it is the same each step
                self._update_flat(group["params"], group)
            else:
                batched = {id(p) for p in torch_math}
                for p in with_grad:
                    if id(p) not in batched:
                        self._update(p, group)
        return loss

    def _update_flat(self, params: list, group: dict) -> None:
        """Compressed moments: each chunk of slices (optim_flat) in one batched step when all of its params have
        a grad and the same step count; otherwise (rare: params without grads) per param."""
        lr, (beta1, beta2), eps, wd, kind = (group[k] for k in _HPARAMS)
        layouts = self.__dict__.setdefault("_flat_layouts", {})  # not state: rebuilt after pickling
        key = (kind,) + tuple(id(p) for p in params)
        if key not in layouts:
            layouts[key] = [FlatChunk(c, kind) for c in chunk_params(list(params))]
        for chunk in layouts[key]:
            states = [self.state[p] for p in chunk.params]
            if any(p.grad is None for p in chunk.params) or len({float(s.get("step", 0.0)) for s in states}) > 1:
                for p in chunk.params:
                    if p.grad is not None:
                        self._update(p, group)
                continue
            for s in states:
                s.setdefault("step", torch.tensor(0.0, dtype=torch.float32))
            chunk.link(states)
            param = chunk.gather([p.detach() for p in chunk.params])
            compensations = _compensations(chunk.params, states, group)
            if compensations:
                param += chunk.gather(compensations)
            grad = chunk.gather([p.grad for p in chunk.params])
            exp_avg, exp_avg_sq = chunk.moments()
            for s in states:
                s["step"] += 1
            _adam_math(param, grad, exp_avg, exp_avg_sq, float(states[0]["step"]), lr, beta1, beta2, eps, wd)
            chunk.store_moments(exp_avg, exp_avg_sq)
            chunk.scatter_(param, [p.detach() for p in chunk.params])
            if compensations:  # what the write-back rounded off, kept for the next step
                chunk.scatter_(param - chunk.gather([p.detach() for p in chunk.params]), compensations)

    def _update_foreach(self, params: list, group: dict) -> None:
        """fp32 params with fp32 state: torch's own multi-tensor AdamW kernels over all of them at once."""
        lr, (beta1, beta2), eps, wd, _ = (group[k] for k in _HPARAMS)
        for p in params:
            if not self.state[p]:
                self._init_state(self.state[p], p, "float32")
        states = [self.state[p] for p in params]
        _torch_adam(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [], [s["step"] for s in states], foreach=True, decoupled_weight_decay=True,
            amsgrad=False, beta1=beta1, beta2=beta2, lr=lr, weight_decay=wd, eps=eps, maximize=False)

    def _update(self, p: torch.Tensor, group: dict) -> None:
        lr, (beta1, beta2), eps, wd, kind = (group[k] for k in _HPARAMS)
        state = self.state[p]
        if not state:
            self._init_state(state, p, kind)

        param = p.float()  # fp32 params: p itself (in place); bf16/fp16: an fp32 copy written back below
        compensation = _compensations([p], [state], group)
        if compensation:
            param = param + compensation[0].float()
        grad = p.grad.float()
        exp_avg, exp_avg_sq = _moments_fp32(state, kind, p.shape)

        state["step"] += 1
        _adam_math(param, grad, exp_avg, exp_avg_sq, state["step"].item(), lr, beta1, beta2, eps, wd)

        if param is not p:
            p.copy_(param)
            if compensation:  # what the write-back rounded off, kept for the next step
                compensation[0].copy_(param - p.float())
        _store_moments(state, kind, exp_avg, exp_avg_sq)

    @staticmethod
    def _init_state(state: dict, p: torch.Tensor, kind: str) -> None:
        # fp32 step counter on CPU, exactly as torch's non-capturable Adam keeps it
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        if kind == "int8":
            n, nb = p.numel(), -(-p.numel() // BLOCK)
            state["exp_avg_code"] = torch.zeros(n, dtype=torch.int8, device=p.device)  # (numel,)
            state["exp_avg_scale"] = torch.zeros(nb, dtype=torch.float32, device=p.device)  # (nb,)
            state["exp_avg_sq_code"] = torch.zeros(n, dtype=torch.uint8, device=p.device)  # (numel,) of sqrt
            state["exp_avg_sq_scale"] = torch.zeros(nb, dtype=torch.float32, device=p.device)  # (nb,)
        else:
            dtype = torch.float32 if kind == "float32" else torch.bfloat16
            state["exp_avg"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=dtype, device=p.device)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader, keeping the saved dtypes; `state_dtype` and `compensated` stay this optimizer's own (storage
        choices, not hyperparameters): moments saved in another storage are converted (e.g. a float32 run resumed
        with int8), compensation buffers dropped when this optimizer does not compensate."""
        # torch's loader casts every floating state tensor to its param's dtype (fp32 scales of a
        # bf16 param would become bf16, bf16 moments fp32). Keep the saved dtypes: re-copy them,
        # to the param's device (the step counter stays on CPU, as in torch).
        wanted = [g["state_dtype"] for g in self.param_groups]
        compensating = [g.get("compensated", False) for g in self.param_groups]
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            if i in state_dict["state"]:
                self.state[p] = {
                    k: v.to("cpu" if k == "step" else p.device, copy=True)
                    for k, v in state_dict["state"][i].items()
                }
        for group, compensated in zip(self.param_groups, compensating):  # a storage choice too: this run's own
            group["compensated"] = compensated
            if not compensated:
                for p in group["params"]:
                    self.state.get(p, {}).pop(COMPENSATION, None)
        for group, kind in zip(self.param_groups, wanted):
            saved, group["state_dtype"] = group["state_dtype"], kind
            if saved != kind:
                for p in group["params"]:
                    if self.state.get(p):
                        self.state[p] = _converted_state(self.state[p], p, saved, kind)
        self.__dict__.pop("_flat_layouts", None)  # buffers of the states just replaced

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors (moments, scales and step counters)."""
        tensors = [v for s in self.state.values() for v in s.values() if torch.is_tensor(v)]
        return sum(v.numel() * v.element_size() for v in tensors)


def _moments_fp32(state: dict, kind: str, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """(exp_avg, exp_avg_sq) in fp32: float32 state's own tensors (updated in place), else decoded copies."""
    if kind == "int8":
        exp_avg = dequantize_blockwise(state["exp_avg_code"], state["exp_avg_scale"], shape)
        sqrt_v = dequantize_blockwise(state["exp_avg_sq_code"], state["exp_avg_sq_scale"], shape)
        return exp_avg, sqrt_v.square_()
    return state["exp_avg"].float(), state["exp_avg_sq"].float()


def _store_moments(state: dict, kind: str, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
    """Write fp32 moments into `state` in its storage (`exp_avg_sq` is consumed: int8 keeps its square root)."""
    if kind == "int8":
        state["exp_avg_code"], state["exp_avg_scale"] = quantize_blockwise(exp_avg, signed=True)
        state["exp_avg_sq_code"], state["exp_avg_sq_scale"] = quantize_blockwise(exp_avg_sq.sqrt_(), signed=False)
    elif state["exp_avg"] is not exp_avg:  # float32 moments were updated in place
        state["exp_avg"].copy_(exp_avg)
        state["exp_avg_sq"].copy_(exp_avg_sq)


def _converted_state(state: dict, p: torch.Tensor, saved: str, kind: str) -> dict:
    """A param's state moved from `saved` storage to `kind` (the step counter kept)."""
    exp_avg, exp_avg_sq = _moments_fp32(state, saved, p.shape)
    new = {}
    SliceAdamW._init_state(new, p, kind)
    new["step"] = state["step"]
    if COMPENSATION in state:
        new[COMPENSATION] = state[COMPENSATION]
    _store_moments(new, kind, exp_avg.clone(), exp_avg_sq.clone())
    return new


def _adam_math(param, grad, exp_avg, exp_avg_sq, step: float, lr, beta1, beta2, eps, wd) -> None:
    """One AdamW update of fp32 tensors in place: the ops, in the order, of torch.optim.adam._single_tensor_adam
    (decoupled weight decay), so fp32 results are torch's bit for bit."""
    if wd != 0:
        param.mul_(1 - lr * wd)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def _compensations(params: list, states: list[dict], group: dict) -> list:
    """Each low-precision param's compensation buffer (made at zero on first use) when the group compensates; else
    an empty list (fp32 params are exact already)."""
    if not group.get("compensated", False) or any(p.dtype == torch.float32 for p in params):
        return []
    for p, s in zip(params, states):
        if COMPENSATION not in s:
            s[COMPENSATION] = torch.zeros_like(p, memory_format=torch.contiguous_format)
    return [s[COMPENSATION] for s in states]


def _flat_applies(group: dict) -> bool:
    return group["state_dtype"] in ("int8", "bfloat16")


def _torch_math_applies(p: torch.Tensor, group: dict) -> bool:
    """torch's AdamW math is ours exactly for fp32 params with fp32 moments (low-precision params need the
    fp32 round trip of `_update`, compressed moments their dequantize / requantize)."""
    return group["state_dtype"] == "float32" and p.dtype == torch.float32


def _check_hparams(group: dict) -> None:
    lr, betas, eps, wd, kind = (group[k] for k in _HPARAMS)
    if not lr >= 0.0:
        raise ValueError(f"SliceAdamW: lr must be >= 0, got {lr}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"SliceAdamW: betas must be two numbers in [0, 1), got {betas}")
    if not eps >= 0.0:
        raise ValueError(f"SliceAdamW: eps must be >= 0, got {eps}")
    if not wd >= 0.0:
        raise ValueError(f"SliceAdamW: weight_decay must be >= 0, got {wd}")
    if kind not in STATE_DTYPES:
        raise ValueError(f"SliceAdamW: state_dtype must be one of {STATE_DTYPES}, got {kind!r}")
