"""What the user-stack benchmark (user_stack.py) runs: the switches a user turns on, one configuration's settings, the
order in which configurations run, and which ones cannot run here (a missing package)."""
from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from typing import Optional

# switch -> what it turns on: checkpointing (TrainingArguments' activation / gradient checkpointing), liger
# (use_liger_kernel), compile (torch_compile), nf4 (the seven projections converted to bitsandbytes NF4 first), fp32
# (the bf16-built weights cast to float32, no autocast: the truth a compiled run's slices are judged against, as in
# studies/torch_compile; with checkpointing, so that 8B fits; never in the table)
SWITCHES: dict[str, dict[str, bool]] = {
    "plain": {},
    "ckpt": {"checkpointing": True},
    "liger": {"liger": True},
    "liger_ckpt": {"liger": True, "checkpointing": True},
    "compile": {"compile": True},
    "nf4_ckpt": {"nf4": True, "checkpointing": True},
    "fp32_ckpt": {"fp32": True, "checkpointing": True},
}
SWITCH_LABELS = {"plain": "plain", "ckpt": "checkpointing", "liger": "Liger", "liger_ckpt": "Liger + checkpointing",
                 "compile": "torch_compile", "nf4_ckpt": "NF4 base + checkpointing",
                 "fp32_ckpt": "fp32 truth + checkpointing"}
# the default order: what item 5's targets need first (each switch's ours / LoRA pair back to back, then the floor)
DEFAULT_SWITCHES = ["plain", "ckpt", "liger_ckpt", "nf4_ckpt", "liger", "compile"]
METHODS = ["ours", "lora", "floor"]


def switch_on(switch: str, what: str) -> bool:
    return SWITCHES[switch].get(what, False)


@dataclass(frozen=True)
class RunConfig:
    """One measurement: `method` with `switch` on `model` (`layers` decoder layers; None = all) at batch x seq."""
    model: str
    layers: Optional[int]
    batch: int
    seq: int
    switch: str
    method: str                  # ours | lora | floor
    warmup: int = 3              # optimizer steps before the timed ones
    steps: int = 10              # timed optimizer steps
    r: int = 64                  # ours: rows per targeted linear
    lora_r: int = 16
    lr: float = 1e-4
    device: str = "cuda"
    dtype: str = "bfloat16"      # the model's weights
    bf16: bool = True            # TrainingArguments(bf16=...): autocast, as a user trains
    compile_backend: Optional[str] = None  # TrainingArguments.torch_compile_backend (None: the Trainer's default)
    slices_path: Optional[str] = None      # ours: save the trained slices here (safetensors)
    output_dir: str = "/tmp/user_stack_trainer"

    @property
    def key(self) -> str:
        return config_key(self.model, self.layers, self.batch, self.seq, self.switch, self.method)

    def as_dict(self) -> dict:
        return asdict(self)


def config_key(model: str, layers: Optional[int], batch: int, seq: int, switch: str, method: str) -> str:
    return f"{model}{f'-L{layers}' if layers else ''}/{batch}x{seq}/{switch}/{method}"


def twin_key(key: str, switch: str = "plain", method: Optional[str] = None) -> str:
    """The key of the same configuration with another switch (default: plain) and optionally another method."""
    model, shape, _, own_method = key.split("/")
    return "/".join([model, shape, switch, method or own_method])


def plan(models: list[str], shapes: list[tuple[int, int]], switches: list[str], methods: list[str],
         **settings) -> list[RunConfig]:
    """Model by model, shape by shape, switch by switch in the order given; within a switch the methods in the order
    given (ours and LoRA back to back, so each pair runs on the same machine)."""
    return [RunConfig(model, settings.get("layers"), b, t, switch, method,
                      **{k: v for k, v in settings.items() if k != "layers"})
            for model in models for b, t in shapes for switch in switches for method in methods]


def missing_dependency(switch: str, device: str) -> Optional[str]:
    """Why `switch` cannot run here (a package is missing, or it needs a GPU), or None."""
    if switch_on(switch, "liger"):
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel is not installed (pip install liger-kernel; a pure-Python wheel)"
        if device != "cuda":
            return "Liger's Triton kernels need a CUDA device"
    if switch_on(switch, "nf4") and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    return None
