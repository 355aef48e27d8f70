"""The pieces of the accuracy studies' run lists: method configs, runs, and the trainable-parameter arithmetic
that puts every sparse config at LoRA r16's budget (which configs, lr grids and seeds a study runs: studies.py).

Trainable parameters, from the layer shapes of a Llama model (targets q/k/v/o/gate/up/down, each layer):
    LoRA r            r * sum(d_in + d_out)
    DoRA r            LoRA r + sum(d_out)             (one magnitude per output feature)
    sparse rows k     k * sum(d_in)                   (per_layer scope: k output rows of every linear)
    sparse columns k  k * sum(d_out)                  (k input columns of every linear)
The sparse k is the largest whose count does not exceed LoRA r16's. For SmolLM2-135M (hidden 576,
intermediate 1536, 30 layers, 9 heads / 3 kv heads of 64): LoRA r16 = 4,884,480; rows 149,760 per k -> 32
(4,792,320); columns 155,520 per k -> 31 (4,821,120). Global scope spends the same number of neurons
(k per layer summed) wherever they score highest, so its parameter count depends on the selection.
For Qwen2.5-Coder-1.5B (hidden 1536, intermediate 8960, 28 layers, 12 heads / 2 kv heads of 128; q/k/v biases,
which neither LoRA nor the sparse slices train): LoRA r16 = 18,464,768, DoRA r16 = 19,109,888; rows 508,928 per
k -> 36 (18,321,408); columns 645,120 per k -> 28 (18,063,360).
Coupled neurons (axis "coupled": an MLP neuron is its gate/up rows and its down column, an attention channel its
v_proj row and o_proj columns, or its k_proj row and q_proj rows) take the rows' k: the library fills each layer
with whole groups up to k rows' worth of weights of every targeted linear, so the count is <= the rows' and depends
on the selection (expected_params None).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IMPORTANCES = ("random", "l2", "taylor", "hessian", "zeroth_order")
SCOPES = ("per_layer", "global")
AXES = ("rows", "columns")  # the SmolLM2 grid's; "coupled" (configs of the qwen15 study) budgets as rows

BUDGET_RANK = 16  # the sparse configs match LoRA r16's trainable-parameter count
TUNE_SEED = 1
TEST_SEEDS = (1, 2, 3)


# ---------------------------------------------------------------- shapes and parameter counts

@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, cfg: Mapping) -> "LlamaShape":
        heads = int(cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or int(cfg["hidden_size"]) // heads
        return cls(int(cfg["hidden_size"]), int(cfg["intermediate_size"]), int(cfg["num_hidden_layers"]), heads,
                   int(cfg.get("num_key_value_heads") or heads), int(head_dim))

    @classmethod
    def from_model_dir(cls, path: str | Path) -> "LlamaShape":
        return cls.from_config(json.loads((Path(path) / "config.json").read_text()))

    def linears(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of each targeted linear of one decoder layer."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


# SmolLM2-135M-Instruct's config.json (used when the model folder is not at hand, e.g. for a dry run)
SMOLLM2_135M = LlamaShape(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, head_dim=64)
# Qwen2.5-Coder-1.5B-Instruct's (its GGUF's metadata; Qwen2's config.json has no head_dim: 1536 / 12)
QWEN25_CODER_15B = LlamaShape(hidden=1536, intermediate=8960, layers=28, heads=12, kv_heads=2, head_dim=128)


def lora_params(shape: LlamaShape, r: int) -> int:
    return shape.layers * r * sum(d_in + d_out for d_in, d_out in shape.linears().values())


def dora_params(shape: LlamaShape, r: int) -> int:
    return lora_params(shape, r) + shape.layers * sum(d_out for _, d_out in shape.linears().values())


def sparse_params(shape: LlamaShape, k: int, axis: str) -> int:
    """Per-layer scope: k rows (x d_in each) or k columns (x d_out each) of every targeted linear."""
    side = 0 if axis == "rows" else 1  # a row spans d_in weights, a column d_out
    return shape.layers * k * sum(dims[side] for dims in shape.linears().values())


def budget_neurons(shape: LlamaShape, axis: str, budget: int) -> int:
    """Largest k (>= 1) whose per-layer sparse count is <= `budget`, capped at the narrowest layer's number
    of rows (or columns) so every layer can give k."""
    per_k = sparse_params(shape, 1, axis)
    units = [d_out if axis == "rows" else d_in for d_in, d_out in shape.linears().values()]
    return max(1, min(budget // per_k, min(units)))


# ---------------------------------------------------------------- configs and runs

@dataclass(frozen=True)
class Config:
    name: str
    family: str                       # the learning-rate / colour family, one of the study's families
    flags: tuple[str, ...]            # method flags of recipes/llama_commonsense.py
    expected_params: Optional[int]    # trainable parameters from the shapes (None: depends on the selection)

    @property
    def method(self) -> str:
        return self.flags[1]  # every config's flags start with --method <name>


def full_config() -> Config:
    return Config("full", "full", ("--method", "full"), None)


def zero_shot_config() -> Config:
    """The model as it is: no training, the same evaluation (the recipe's `before`; --eval_before true overrides
    the sweep's common false, as the later flag wins)."""
    return Config("zero_shot", "zero_shot", ("--method", "full", "--do_train", "false", "--eval_before", "true"), 0)


def lora_config(shape: LlamaShape, r: int, method: str = "lora", dropout: float = 0.05) -> Config:
    count = lora_params(shape, r) if method == "lora" else dora_params(shape, r)
    return Config(f"{method}_r{r}", method, ("--method", method, "--lora_r", str(r), "--lora_alpha", str(2 * r),
                                            "--lora_dropout", str(dropout)), count)


def sparse_config(shape: LlamaShape, importance: str, scope: str, axis: str, calibration_batches: int,
                  budget_rank: int = BUDGET_RANK, k: Optional[int] = None) -> Config:
    """k: neurons per layer (default: the largest at LoRA r`budget_rank`'s count; axis "coupled" takes the rows' k,
    its count depends on the selection)."""
    counted = axis != "coupled"
    k = k or budget_neurons(shape, axis if counted else "rows", lora_params(shape, budget_rank))
    return Config(f"sparse_{importance}_{scope}_{axis}", f"sparse_{axis}",
                  ("--method", "sparse", "--importance", importance, "--scope", scope, "--axis", axis,
                   "--neurons_per_layer", str(k), "--calibration_batches", str(calibration_batches)),
                  sparse_params(shape, k, axis) if scope == "per_layer" and counted else None)


def variant(config: Config, suffix: str, flags: tuple[str, ...], expected_params: Optional[int] = None,
            neurons_per_layer: Optional[int] = None, family: Optional[str] = None) -> Config:
    """`config` under the name `<name>_<suffix>` with more recipe flags (the later flag wins), in its family (so it
    runs at the family's tuned lr without a tuning of its own) or in `family`; neurons_per_layer replaces the
    config's k. expected_params None keeps the config's count when k is kept, else None."""
    base = list(config.flags)
    if neurons_per_layer is not None:
        base[base.index("--neurons_per_layer") + 1] = str(neurons_per_layer)
    keep = config.expected_params if neurons_per_layer is None else None
    return Config(f"{config.name}_{suffix}", family or config.family, (*base, *flags),
                  expected_params if expected_params is not None else keep)


def qlora_config(shape: LlamaShape, r: int, dropout: float = 0.05, flags: tuple[str, ...] = ()) -> Config:
    """LoRA r on a base loaded in 4-bit NF4 (QLoRA; the recipe's --load_in_4bit), in the lora family (its lr);
    `flags`: more recipe flags."""
    lora = lora_config(shape, r, "lora", dropout)
    return Config(f"q{lora.name}", "lora", (*lora.flags, "--load_in_4bit", "true", *flags), lora.expected_params)


# Bytes a trained number costs while training (fp32 slice + its fp32 gradient + Adam's two fp32 moments = 16, plus
# the bf16 copy of the slice that autocast keeps for backward, docs/performance.md), and a column slice's saved input:
# x[..., J], bf16, per token and targeted linear.
BYTES_PER_TRAINED_NUMBER = 4 + 4 + 8 + 2
BYTES_PER_SAVED_INPUT = 2


def equal_memory_columns_k(shape: LlamaShape, target_peak: int, columns_peak: int, columns_k: int,
                           tokens_per_step: int) -> int:
    """The per-layer columns k whose peak memory reaches `target_peak` (bytes), from a measured columns peak at
    `columns_k`: each further k adds its trained numbers' state and its saved inputs at the step's tokens,
        per k = BYTES_PER_TRAINED_NUMBER * sparse_params(shape, 1, "columns")
              + BYTES_PER_SAVED_INPUT * tokens_per_step * layers * targeted linears,
    rounded down (<= the target) and capped at the narrowest layer's columns."""
    per_k = (BYTES_PER_TRAINED_NUMBER * sparse_params(shape, 1, "columns")
             + BYTES_PER_SAVED_INPUT * tokens_per_step * shape.layers * len(shape.linears()))
    k = columns_k + (target_peak - columns_peak) // per_k
    return max(1, min(k, min(d_in for d_in, _ in shape.linears().values())))


def configs(shape: LlamaShape, calibration_batches: int, lora_dropout: float = 0.05) -> dict[str, Config]:
    """The SmolLM2 study's configs (studies.SMOLLM2), in table order: full, LoRA r8 / r16, DoRA r8, then the
    sparse grid importance x scope x axis."""
    out = [full_config(), lora_config(shape, 8, "lora", lora_dropout),
           lora_config(shape, 16, "lora", lora_dropout), lora_config(shape, 8, "dora", lora_dropout)]
    out += [sparse_config(shape, i, s, a, calibration_batches) for i in IMPORTANCES for s in SCOPES for a in AXES]
    return {c.name: c for c in out}


def lr_tag(lr: float) -> str:
    """5e-4 -> '5e-4', 2.5e-05 -> '2.5e-5' (short, exact enough for a folder name)."""
    mantissa, exp = f"{lr:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"


@dataclass(frozen=True)
class Run:
    phase: str                        # "tune" (validation sets), "test" (test files) or "solo" (no evaluation)
    config: Config
    seed: int
    lr: Optional[float]               # None: the config trains nothing (zero_shot)
    name: str = field(init=False)

    def __post_init__(self):
        lr = "" if self.lr is None else f"-lr{lr_tag(self.lr)}"
        object.__setattr__(self, "name", f"{self.phase}-{self.config.name}{lr}-s{self.seed}")

    def flags(self) -> list[str]:
        """Run-specific recipe flags (the method's, seed and learning rate; sparse_seed follows the seed so
        `random` picks other neurons per seed)."""
        extra = ["--sparse_seed", str(self.seed)] if self.config.family.startswith("sparse") else []
        lr = [] if self.lr is None else ["--learning_rate", repr(self.lr)]
        return [*self.config.flags, "--seed", str(self.seed), *lr, *extra]

    def meta(self) -> dict:
        return {"name": self.name, "phase": self.phase, "config": self.config.name, "family": self.config.family,
                "seed": self.seed, "learning_rate": self.lr, "expected_trainable_params": self.config.expected_params}


def select(runs: Iterable[Run], pattern: Optional[str]) -> list[Run]:
    """Runs whose name matches the regex (re.search); all when pattern is None."""
    return [r for r in runs if pattern is None or re.search(pattern, r.name)]
