"""Where a training step's time goes: torch.profiler over a few steps of each method, top kernels printed.

Kernels are also summed into coarse classes (matrix products, attention, index/scatter/gather, casts and
copies, elementwise, reductions, optimizer), so the sliced layers' overhead over the frozen floor shows as
the extra rows of our method's summary."""
from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from .measure import make_step, prepared_method, release_memory, sync

CLASSES = [  # first match wins; matched against the lower-cased kernel name
    ("attention", r"flash|fmha|attention|sdpa|efficient_attention"),
    ("matmul", r"gemm|matmul|cutlass|nvjet|wgmma|sm90_xmma|cublas|aten::mm$|addmm|bmm|aten::linear"),
    ("index/scatter/gather", r"index|scatter|gather|masked"),
    ("optimizer", r"adam|multi_tensor|foreach|fused_adam"),
    ("cast/copy", r"copy|cast|convert|to_copy|contiguous"),
    ("reduction", r"reduce|sum|norm|mean|softmax|cross_entropy|nll|logsumexp"),
    ("elementwise", r"elementwise|vectorized|unrolled|mul|add|silu|sigmoid|pow|rsqrt|neg|cat|fill"),
]


def classify(name: str) -> str:
    low = name.lower()
    for cls, pattern in CLASSES:
        if re.search(pattern, low):
            return cls
    return "other"


def _self_time_us(evt, on_gpu: bool) -> float:
    if on_gpu:
        return getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0.0)
    return evt.self_cpu_time_total


def profile_method(model, spec, batch, checkpointing, device, autocast=True, warmup=2, steps=3,
                   top=25, trace_path=None) -> str:
    """Profile `steps` optimizer steps of `spec`; returns the printed report."""
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    release_memory(device)
    with prepared_method(model, spec, checkpointing, lr=1e-5) as prepared:
        step = make_step(prepared, batch, device, autocast)
        for _ in range(warmup):
            step()
        sync(device)
        with profile(activities=activities, record_shapes=False) as prof:
            for _ in range(steps):
                step()
            sync(device)
    release_memory(device)
    if trace_path:
        prof.export_chrome_trace(trace_path)
    events = prof.key_averages()
    sort_key = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    try:
        table = events.table(sort_by=sort_key, row_limit=top, max_name_column_width=70)
    except (AttributeError, KeyError, ValueError):
        table = events.table(sort_by="self_device_time_total", row_limit=top, max_name_column_width=70)
    # classes by operator (aten::mm, aten::index_add_, ...): each op's self device time (CPU run: self CPU
    # time), so nothing is counted twice; kernels a library launches outside an op fall under "other"
    per_class: dict[str, float] = defaultdict(float)
    host, device_ms = {}, {}
    for evt in events:
        if evt.key in ("forward", "backward", "optimizer"):
            host[evt.key] = evt.cpu_time_total / steps / 1e3
            # kernels of the ops nested in the region on the same thread (backward runs on autograd's own
            # thread, so it is given as the rest)
            device_ms[evt.key] = (getattr(evt, "device_time_total", 0.0) if on_gpu else evt.cpu_time_total) / steps / 1e3
            continue
        if getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA:
            continue  # kernel rows: their time is already in the op that launched them
        us = _self_time_us(evt, on_gpu)
        if us:
            per_class[classify(evt.key)] += us
    total = sum(per_class.values()) or 1.0
    total_ms = total / steps / 1e3
    fwd, opt = device_ms.get("forward", 0.0), device_ms.get("optimizer", 0.0)
    b, t = batch["input_ids"].shape
    lines = [f"=== {spec.label}: batch {b} x seq {t}, checkpointing {'on' if checkpointing else 'off'}, "
             f"{steps} steps profiled ===",
             "host ms per step (includes waiting): " + ", ".join(f"{k} {v:.1f}" for k, v in host.items()),
             f"{'device' if on_gpu else 'cpu'} ms per step: forward {fwd:.1f}, optimizer (+ grad mask) {opt:.1f}, "
             f"backward and the rest {total_ms - fwd - opt:.1f}, total {total_ms:.1f}",
             f"{'op class':<24}{'ms/step':>10}{'share':>8}"]
    for cls, us in sorted(per_class.items(), key=lambda kv: -kv[1]):
        lines.append(f"{cls:<24}{us / steps / 1e3:>10.2f}{100 * us / total:>7.1f}%")
    lines += [f"{'total':<24}{total / steps / 1e3:>10.2f}", "", table]
    return "\n".join(lines)
