"""`SparseNeuronConfig`: every knob of sparse-neuron fine-tuning in one dataclass.

The field docs are the user documentation (they become `--help` through `HfArgumentParser`)."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional, Union

IMPORTANCE_NAMES = ("random", "l1", "l2", "taylor", "hessian", "zeroth_order", "wanda")
DATA_IMPORTANCE_NAMES = ("taylor", "hessian", "zeroth_order", "wanda")  # those that score on calibration batches
TAYLOR_FORMS = ("multivariable", "elementwise")
SCOPES = ("per_layer", "global")
EXPERT_SCOPES = ("per_expert", "across_experts")
AXES = ("rows", "columns", "coupled")
SLICE_DTYPES = ("float32", "bfloat16", "float16", "auto")
OPTIMIZER_STATES = ("float32", "bfloat16", "int8")
QUANTIZE_BASES = ("nf4", "fp4")
CALIBRATION_AUTO = "auto"  # calibration_micro_batch_size chosen per run (scoring/micro_batch.py)


def dtype_name(dtype) -> str:
    """A torch dtype as adapters and `slice_dtype` spell it ("bfloat16", not "torch.bfloat16")."""
    return str(dtype).removeprefix("torch.")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:  # NaN fails every range check it meets
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class SparseNeuronConfig:
    """Which neurons to train and how. Exactly one of `neurons_per_layer` / `ratio` must be set."""

    importance: str = field(
        default="l2",
        metadata={"help": f"Neuron importance criterion, one of {IMPORTANCE_NAMES}. taylor/hessian/zeroth_order/wanda "
                          "score on `calibration_batches` batches of the train dataloader; wanda = |W| weighted by "
                          "the input features' activation norms (forward passes only)."},
    )
    neurons_per_layer: Optional[int] = field(
        default=None, metadata={"help": "Neurons (rows, or columns) trained per targeted linear (paper: 64)."}
    )
    ratio: Optional[float] = field(
        default=None, metadata={"help": "Fraction in (0, 1] of each layer's neurons to train, instead of a count."}
    )
    scope: str = field(
        default="per_layer",
        metadata={"help": "per_layer: top-k in every layer; global: one budget (same total) across all layers, "
                          "scores normalised by each layer's mean."},
    )
    expert_scope: str = field(
        default="per_expert",
        metadata={"help": f"MoE experts, one of {EXPERT_SCOPES}: per_expert: every expert's projection is a layer of "
                          "its own (each gets the per-layer budget); across_experts: the experts of one projection "
                          "(e.g. layer 3's gate_up_proj) share the sum of their budgets, so an expert scored higher "
                          "(with data-driven criteria: one that more tokens are routed to) trains more neurons and one "
                          "may train none. With scope='global' every layer shares one budget anyway."},
    )
    head_balanced: bool = field(
        default=False,
        metadata={"help": "Attention projections get the same number of neurons in every head (the paper code's "
                          "channel_groups): q_proj rows per attention head, k_proj/v_proj rows per key-value head, "
                          "o_proj columns per attention head (axis='columns'); heads from the model config. Such a "
                          "layer's budget is rounded to a multiple of its heads (at least one neuron per head)."},
    )
    axis: str = field(
        default="rows",
        metadata={"help": "rows: train output neurons W[I, :] (the paper); columns: train input features W[:, J] "
                          "(saves only x[..., J] for backward). Taylor/Hessian columns are the high-activation "
                          "features: they want a ~10x lower learning rate than l2/random columns. coupled: train "
                          "structural neurons whole, as structural pruning removes them: an MLP neuron is its row in "
                          "gate_proj and up_proj and its column in down_proj; an attention value channel is a v_proj "
                          "row and the o_proj columns it feeds; a query-key channel is a k_proj row and the q_proj rows "
                          "it meets (every query head of its key-value group); other targeted linears give rows. A "
                          "group scores the sum of its members' scores (each linear's scores divided by their mean), "
                          "and groups compete per trained weight: per_layer, each decoder layer trains as many "
                          "weights as neurons_per_layer (or ratio) rows of each of its targeted linears would; "
                          "global, the model's sum of those."},
    )
    target_modules: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Module names (exact or dotted suffix, e.g. q_proj) to slice; a single string is a "
                          "regex matched against the full name. Default: every linear except the output head."},
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Module names (exact or dotted suffix, as target_modules; each must match a module) trained "
                          "in full next to the slices, e.g. a classification head (score, classifier) or a resized "
                          "embedding; saved in the adapter and kept by merge_sparse (PEFT's name)."},
    )
    calibration_batches: int = field(
        default=50,
        metadata={"help": "Train-dataloader batches used by taylor / hessian / zeroth_order / wanda scoring (all "
                          "the data has, with a warning, when it has fewer)."}
    )
    calibration_micro_batch_size: Union[str, int] = field(
        default="auto",
        metadata={"help": "Sequences per forward/backward while scoring a calibration batch: 'auto', a number, or 0 "
                          "(the whole batch). taylor, zeroth_order and wanda sum over tokens, so they score the same "
                          "at any size (each part weighted by its share of the label tokens: loss = mean over labels "
                          "!= -100, as Hugging Face computes it) and only memory and speed change; for them 'auto' "
                          "scores the first sequence alone on a CUDA device, then parts as large as 80 percent of the memory "
                          "available before it allows at its peak per token, never more than the batch (a Trainer's "
                          "calibration batch is a training micro-batch); on other devices the whole batch. hessian "
                          "and taylor_form='elementwise' square / take |.| of each part's gradient, so for them the "
                          "part is the unit of the estimate: 'auto' = 1 (per sequence, as the paper code's per-sample "
                          "Fisher), and a number changes the estimate. A loss_fn that is not such a mean wants 0. "
                          "When the Trainer trains with gradient (activation) checkpointing, taylor and hessian score "
                          "under the same checkpointing."},
    )
    taylor_form: str = field(
        default="multivariable",
        metadata={"help": f"taylor, one of {TAYLOR_FORMS}: 'multivariable' = |sum_j W_ij dL/dW_ij| per neuron (the "
                          "loss change when the whole neuron is removed; from the layer outputs alone), 'elementwise' "
                          "= sum_j |W_ij dL/dW_ij| (the paper code's default, torch-pruning's multivariable=False; "
                          "forms one layer's weight gradient at a time)."},
    )
    train_bias: bool = field(
        default=False, metadata={"help": "Also train the bias entries of the selected rows, in layers that have a bias (rows axis only)."}
    )
    slice_dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout probability on the slice path's input (as LoRA's dropout: the frozen base still "
                          "sees x), in training mode only; 0 = off. While training with it, layers take the generic "
                          "(unfused) path."},
    )
    slice_dtype: str = field(
        default="float32",
        metadata={"help": f"dtype of the trainable slices, one of {SLICE_DTYPES} ('auto' = base weight dtype). "
                          "float32 keeps Adam exact while the frozen base stays bf16/4-bit."},
    )
    recompute_slice_inputs: Optional[bool] = field(
        default=None,
        metadata={"help": "axis='rows': do not save each sliced projection's input for its weight gradient; rebuild it "
                          "in backward from tensors the frozen model's own backward keeps anyway (RMSNorm input and "
                          "scale for q/k/v and gate/up, act(gate) and up for down_proj: Llama / Mistral / Qwen2 "
                          "structure, found in the autograd graph; checked bit-exact on first use). Other layers, "
                          "quantized bases and activation checkpointing keep saving the input. None (default) = on "
                          "for rows, off for columns (whose slices save only x[..., J]). False saves the inputs: "
                          "faster, more memory."},
    )
    optimizer_state: str = field(
        default="float32",
        metadata={"help": f"Adam moment storage, one of {OPTIMIZER_STATES}: 8, 4 or ~2 bytes per trained weight."},
    )
    compensated_update: bool = field(
        default=False,
        metadata={"help": "Low-precision slices (slice_dtype bfloat16 / float16) keep the rounding error of each "
                          "optimizer update in a buffer of their own dtype and add it back on the next (Kahan-"
                          "compensated summation; SliceAdamW only), so updates far below a bf16 slice's rounding step "
                          "add up instead of rounding away. slice_dtype='bfloat16' with optimizer_state='int8' then "
                          "costs 8 bytes per trained number (slice, gradient, compensation, moments) against 16 at "
                          "the defaults. No effect on float32 slices."},
    )
    quantize_base: Optional[str] = field(
        default=None,
        metadata={"help": f"Quantize the targeted linears of a full-precision model to bitsandbytes 4-bit, one of "
                          f"{QUANTIZE_BASES}, when the slices are put in (QLoRA-style frozen base: blocksize 64, "
                          "compute and storage dtype = the weight's dtype, so ZeRO-3 can partition it). Leave unset "
                          "for a model loaded with BitsAndBytesConfig (4/8-bit) or kept in full precision."},
    )
    double_quant: bool = field(
        default=False, metadata={"help": "quantize_base: also quantize the 4-bit scales (QLoRA's double "
                                         "quantization, ~0.4 bit/weight less; merges re-quantize less exactly)."}
    )
    init_from_quantization_error: bool = field(
        default=False,
        metadata={"help": "Low-quantization-error start: while quantize_base turns a full-precision weight W into "
                          "Q(W), start each selected row's slice at the residual (W - dequant(Q(W)))[I], so the "
                          "selected rows reproduce W exactly (up to the slice dtype) and only the other rows keep "
                          "the 4-bit error. Needs the full-precision model: a model loaded in 4/8-bit has lost W."},
    )
    zo_eps: float = field(default=1e-3, metadata={"help": "zeroth_order: SPSA perturbation size."})
    seed: int = field(default=0, metadata={"help": "Seed for random scoring, SPSA directions and calibration order."})
    nonfinite_guard: bool = field(
        default=True,
        metadata={"help": "Skip an optimizer step whose loss or slice gradients hold NaN/inf (no update, moments and "
                          "learning rate unchanged, all ranks together) and warn with its step number."})
    cudnn_attention: bool = field(
        default=False,
        metadata={"help": "Let training use PyTorch's cuDNN attention kernel. Off by default: in bf16 its "
                          "backward has returned NaN gradients for a padded batch that the memory-efficient kernel "
                          "handles."})
    untrained_guard: bool = field(
        default=True,
        metadata={"help": "Stop with SlicesNotTrainingError when an optimizer step finds no slice with a non-zero "
                          "gradient, or changes none (a compiled or wrapped model that loses the slices' gradient, "
                          "hooks, a frozen path, a zero learning rate): checked on the first steps taken until one "
                          "with a positive learning rate moved the slices, then at every logging step, all ranks "
                          "alike. After that first move, a step that changes no slice (updates rounding away at the "
                          "end of a decay) warns instead of stopping."})
    max_nonfinite_steps: int = field(
        default=10, metadata={"help": "nonfinite_guard: consecutive skipped steps after which training stops with "
                                      "an error (the run has diverged; try float32 or a lower learning rate)."})

    def __post_init__(self):
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.modules_to_save, tuple):
            self.modules_to_save = list(self.modules_to_save)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on any invalid setting, before a model is touched."""
        self._validate_scoring_options()
        if self.importance not in IMPORTANCE_NAMES:
            raise ValueError(f"Unknown importance {self.importance!r}; choose one of {IMPORTANCE_NAMES}.")
        if (self.neurons_per_layer is None) == (self.ratio is None):
            raise ValueError("Set exactly one of neurons_per_layer or ratio "
                             f"(got neurons_per_layer={self.neurons_per_layer}, ratio={self.ratio}).")
        if self.neurons_per_layer is not None and not (_is_int(self.neurons_per_layer) and self.neurons_per_layer > 0):
            raise ValueError(f"neurons_per_layer must be a positive integer, got {self.neurons_per_layer!r}.")
        if self.ratio is not None and not (_is_real(self.ratio) and 0.0 < self.ratio <= 1.0):
            raise ValueError(f"ratio must be a number in (0, 1], got {self.ratio!r}.")
        for name, value, allowed in (("scope", self.scope, SCOPES), ("expert_scope", self.expert_scope, EXPERT_SCOPES),
                                     ("axis", self.axis, AXES),
                                     ("slice_dtype", self.slice_dtype, SLICE_DTYPES),
                                     ("optimizer_state", self.optimizer_state, OPTIMIZER_STATES)):
            if value not in allowed:
                raise ValueError(f"Unknown {name} {value!r}; choose one of {allowed}.")
        for name in ("train_bias", "double_quant", "init_from_quantization_error", "nonfinite_guard",
                     "cudnn_attention", "untrained_guard", "compensated_update"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if self.train_bias and self.axis != "rows":
            raise ValueError("train_bias needs axis='rows' (a column slice touches every output's bias).")
        if self.axis == "coupled" and (self.head_balanced or self.expert_scope != "per_expert"):
            raise ValueError("axis='coupled' chooses whole neuron groups, not per-linear neurons: it does not combine "
                             "with head_balanced=True or expert_scope='across_experts'.")
        if not (_is_int(self.calibration_batches) and self.calibration_batches >= 0):
            raise ValueError(f"calibration_batches must be a non-negative integer, got {self.calibration_batches!r}.")
        if self.importance in DATA_IMPORTANCE_NAMES and self.calibration_batches <= 0:
            raise ValueError(f"importance={self.importance!r} needs calibration_batches > 0.")
        if self.quantize_base is not None and self.quantize_base not in QUANTIZE_BASES:
            raise ValueError(f"Unknown quantize_base {self.quantize_base!r}; choose one of {QUANTIZE_BASES} or None.")
        if self.double_quant and self.quantize_base is None:
            raise ValueError("double_quant applies to the 4-bit base that quantize_base makes: set quantize_base too "
                             "(a model loaded with BitsAndBytesConfig keeps its own bnb_4bit_use_double_quant).")
        if self.init_from_quantization_error and self.quantize_base is None:
            raise ValueError("init_from_quantization_error corrects the error of quantizing full-precision weights: "
                             "set quantize_base='nf4' (or 'fp4') and pass a full-precision model.")
        if not (_is_int(self.max_nonfinite_steps) and self.max_nonfinite_steps >= 1):
            raise ValueError(f"max_nonfinite_steps must be an integer >= 1, got {self.max_nonfinite_steps!r}.")
        if not (_is_real(self.zo_eps) and math.isfinite(self.zo_eps) and self.zo_eps > 0):
            raise ValueError(f"zo_eps must be a finite number > 0, got {self.zo_eps!r}.")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}.")
        tm = self.target_modules
        if tm is not None and not (isinstance(tm, str) or (isinstance(tm, list) and tm
                                                          and all(isinstance(t, str) and t for t in tm))):
            raise ValueError(f"target_modules must be None, a regex string or a non-empty list of names, got {tm!r}.")
        ms = self.modules_to_save
        if ms is not None and not (isinstance(ms, list) and ms and all(isinstance(m, str) and m for m in ms)):
            raise ValueError(f"modules_to_save must be None or a non-empty list of module names, got {ms!r}.")

    def _validate_scoring_options(self) -> None:
        """The calibration, criterion and slice options (validate() checks the others)."""
        micro = self.calibration_micro_batch_size
        if not ((_is_int(micro) and micro >= 0) or micro == CALIBRATION_AUTO):
            raise ValueError(f"calibration_micro_batch_size must be 'auto' or an integer >= 0 (0 = whole batches), "
                             f"got {micro!r}.")
        if self.taylor_form not in TAYLOR_FORMS:
            raise ValueError(f"Unknown taylor_form {self.taylor_form!r}; choose one of {TAYLOR_FORMS}.")
        if self.taylor_form != "multivariable" and self.importance != "taylor":
            raise ValueError(f"taylor_form={self.taylor_form!r} applies to importance='taylor' only, got "
                             f"importance={self.importance!r}.")
        if not (isinstance(self.slice_dropout, (int, float)) and 0.0 <= float(self.slice_dropout) < 1.0):
            raise ValueError(f"slice_dropout must be a probability in [0, 1), got {self.slice_dropout!r}.")
        if self.recompute_slice_inputs is not None and not isinstance(self.recompute_slice_inputs, bool):
            raise ValueError(f"recompute_slice_inputs must be True, False or None (rows: on), "
                             f"got {self.recompute_slice_inputs!r}.")
        if self.recompute_slice_inputs and self.axis == "columns":
            raise ValueError("recompute_slice_inputs applies to row slices (a column slice saves only x[..., J]), "
                             f"got axis={self.axis!r}.")

    # what must agree between a checkpoint and the run resuming it: the neurons and the base they sit on
    # (optimizer state may differ only in storage)
    SELECTION_KEYS = ("importance", "neurons_per_layer", "ratio", "scope", "axis", "target_modules", "train_bias",
                      "quantize_base", "double_quant", "init_from_quantization_error", "taylor_form", "head_balanced",
                      "modules_to_save", "expert_scope")

    # what a model's slices are, once they exist: a trainer given a sliced model refuses a config that differs here
    SLICE_KEYS = ("neurons_per_layer", "ratio", "scope", "axis", "target_modules", "train_bias", "modules_to_save",
                  "expert_scope")

    # what an adapter is, and so what its json records (every other field is how a run goes, set anew by each run
    # and never saved, so renaming one cannot make a saved adapter unloadable):
    ADAPTER_KEYS = SELECTION_KEYS + (
        "slice_dtype",  # the saved deltas' dtype; loading checks them against it
        "seed",         # with importance='random' it alone picks the neurons
        "slice_dropout",  # builds the layers' dropout module, as PEFT's adapter_config keeps lora_dropout
    )
    # Run-time, not saved; the borderline ones:
    #   calibration_batches, calibration_micro_batch_size, zo_eps: how the scores were estimated; the indices are saved
    #   recompute_slice_inputs: memory against speed, the same gradients
    #   optimizer_state, compensated_update: how the optimizer stores its state; a checkpoint keeps that state itself
    # and the run's guards and kernels: nonfinite_guard, max_nonfinite_steps, untrained_guard, cudnn_attention.

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def adapter_dict(self) -> dict[str, Any]:
        """The fields an adapter's json records (`ADAPTER_KEYS`)."""
        return {k: v for k, v in self.to_dict().items() if k in self.ADAPTER_KEYS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SparseNeuronConfig":
        """A config from a dict the user wrote: an unknown key is a typo, refused."""
        unknown = set(d) - cls.field_names()
        if unknown:
            raise ValueError(f"Unknown SparseNeuronConfig fields {sorted(unknown)}.")
        return cls(**d)

    @classmethod
    def from_adapter_dict(cls, d: dict[str, Any]) -> tuple["SparseNeuronConfig", list[str]]:
        """(config, unknown keys) from an adapter's json: its `ADAPTER_KEYS`, the run-time fields at their
        defaults. Run-time fields that older adapters recorded are dropped; keys this version does not know (a newer
        version wrote them) are returned for the caller to warn about, as PEFT does, rather than refused."""
        return cls(**{k: v for k, v in d.items() if k in cls.ADAPTER_KEYS}), sorted(set(d) - cls.field_names())

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @property
    def recomputes_slice_inputs(self) -> bool:
        """`recompute_slice_inputs` resolved for row slices (axis rows, or the rows of coupled groups): None = on
        (column slices save only x[..., J] anyway)."""
        return self.axis != "columns" if self.recompute_slice_inputs is None else self.recompute_slice_inputs

    def selection_differences(self, other: "SparseNeuronConfig") -> dict[str, tuple]:
        """Fields that decide which neurons are trained and differ between `self` and `other`."""
        return {k: (getattr(self, k), getattr(other, k)) for k in self.SELECTION_KEYS
                if getattr(self, k) != getattr(other, k)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


