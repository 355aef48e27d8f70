"""One measurement: a method on a model at (batch, seq) with checkpointing on/off -> peak memory, tokens/s.

Peak memory is torch.cuda.max_memory_allocated over setup + warm-up + timed steps, after emptying the cache
and resetting the peak (it includes the frozen weights). Time is host wall time of each step, bracketed by
device synchronisations; tokens/s uses the median step. An out-of-memory failure is recorded as "oom", and
every tensor of the failed attempt is released before the next run."""
from __future__ import annotations

import contextlib
import gc
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from .methods import MethodSpec, freeze_all, setup, static_bytes_estimate


@dataclass
class StepSettings:
    warmup: int = 3
    steps: int = 10
    autocast: bool = True  # bf16 autocast, as HF Trainer(bf16=True) runs every method
    lr: float = 1e-5


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    gc.collect()  # fast once long-lived objects are frozen (see run_all: gc.freeze after each model build)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def device_total_bytes(device: torch.device):
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "ALLOC_FAILED" in text)


def set_checkpointing(model: nn.Module, on: bool) -> None:
    """HF activation (gradient) checkpointing, non-reentrant; works on transformers 4.57 - 5.x names."""
    from sprune_trainer import _hf_internals as hf
    if on:
        hf.enable_checkpointing(model, {"use_reentrant": False})
    elif hf.model_checkpoints(model):
        hf.disable_checkpointing(model)


def set_input_grads(model: nn.Module, on: bool) -> None:
    """Make the embedding output require grad (on) or not (off), leaving exactly one hook or none."""
    model.disable_input_require_grads()
    model.get_input_embeddings()._forward_hooks.clear()  # also hooks another library may have left
    if on:
        model.enable_input_require_grads()


def model_is_plain(model: nn.Module) -> bool:
    """No slice wrapper or PEFT layer left, nothing trainable."""
    for m in model.modules():
        if type(m).__name__ == "SlicedLinear" or hasattr(m, "lora_A"):
            return False
    return not any(p.requires_grad for p in model.parameters())


def _autocast(device: torch.device, on: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()


def _optimizer_state_bytes(opt) -> int:
    if opt is None:
        return 0
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


@contextlib.contextmanager
def prepared_method(model: nn.Module, spec: MethodSpec, checkpointing: bool, lr: float):
    """Apply `spec` to `model` (with checkpointing on/off) for the block; afterwards the model is the plain
    frozen base again and the method's tensors are released, also after an error."""
    prepared = None
    try:
        set_checkpointing(model, checkpointing)
        # the floor needs grad-requiring inputs to have any backward; with checkpointing every method gets
        # them (as HF / PEFT do), without it only the floor does
        set_input_grads(model, checkpointing or spec.kind == "floor")
        model.train()
        prepared = setup(model, spec, lr)
        yield prepared
    finally:
        if prepared is not None:
            if prepared.optimizer is not None:
                prepared.optimizer.state.clear()
            prepared.undo()
        prepared = None
        set_checkpointing(model, False)
        set_input_grads(model, False)
        freeze_all(model)


def make_step(prepared, batch: dict, device: torch.device, autocast: bool):
    """One optimizer step: forward, backward, (grad mask), step, zero_grad. Returns the detached loss."""
    def step():
        with prepared.step_context():
            with torch.profiler.record_function("forward"), _autocast(device, autocast):
                loss = prepared.model(**batch).loss
            with torch.profiler.record_function("backward"):
                loss.backward()
        with torch.profiler.record_function("optimizer"):
            if prepared.before_step is not None:
                prepared.before_step()
            if prepared.optimizer is not None:
                prepared.optimizer.step()
                prepared.optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def bench_config(model: nn.Module, spec: MethodSpec, batch: dict, checkpointing: bool, settings: StepSettings,
                 device: torch.device, strict: bool = False) -> dict:
    """Measure one (method, batch, checkpointing) on `model` (left frozen and unwrapped afterwards)."""
    b, t = batch["input_ids"].shape
    row = {"method": spec.name, "label": spec.label, "kind": spec.kind, "r": spec.r, "axis": spec.axis,
           "state": spec.state, "batch": b, "seq": t, "checkpointing": checkpointing, "status": "ok"}
    release_memory(device)
    total = device_total_bytes(device)
    if total is not None:
        need = static_bytes_estimate(model, spec)
        if need > 0.98 * total:
            row.update(status="oom", error=f"skipped: weights+grads+AdamW alone need {need / 2**30:.1f} GiB "
                                           f"of {total / 2**30:.1f} GiB")
            return row
    t0 = time.perf_counter()
    try:
        with prepared_method(model, spec, checkpointing, settings.lr) as prepared:
            sync(device)
            row["setup_s"] = time.perf_counter() - t0
            row["trainable_params"] = prepared.trainable_params
            row["effective_params"] = prepared.effective_params
            if prepared.notes:
                row["notes"] = "; ".join(prepared.notes)
            step = make_step(prepared, batch, device, settings.autocast)
            for _ in range(settings.warmup):
                step()
            sync(device)
            times = []
            for _ in range(settings.steps):
                t1 = time.perf_counter()
                loss = step()
                sync(device)
                times.append(time.perf_counter() - t1)
            med = statistics.median(times)
            row.update(step_s_median=med, step_s_all=times, tokens_per_s=b * t / med,
                       tokens_per_s_mean=b * t * len(times) / sum(times), loss_last=float(loss),
                       peak_bytes=peak_bytes(device),
                       optimizer_state_bytes=_optimizer_state_bytes(prepared.optimizer))
    except Exception as exc:  # noqa: BLE001 - recorded; OOM is a result, anything else fails in strict mode
        if is_oom(exc):
            row.update(status="oom", error=str(exc).splitlines()[0][:300], peak_bytes=peak_bytes(device))
        elif strict:
            raise
        else:
            row.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:300]}")
    release_memory(device)
    if not model_is_plain(model):
        row["model_left_modified"] = True  # the runner builds a fresh model before the next run
    row["wall_s"] = time.perf_counter() - t0
    return row
