"""One configuration of the user-stack benchmark, run in this process THROUGH the Trainer, as a user would run it.

    ours   SparseNeuronTrainer, the default config with the budget set: SparseNeuronConfig(neurons_per_layer=r)
           (l2 rows of every linear but the head, inputs rebuilt in backward, SliceAdamW, the run's guards)
    lora   transformers.Trainer on peft.get_peft_model(model, LoRA r16, alpha 32, no dropout, q/k/v/o/gate/up/down);
           on the NF4 base this is QLoRA (the same Linear4bit base; no prepare_model_for_kbit_training, which would
           also cast the embeddings and the head to fp32)
    floor  transformers.Trainer on the frozen model whose embedding output requires grad, so backward runs through
           every layer with no weight gradient; its optimizer holds one scalar outside the model that never gets a
           gradient (the Trainer needs an optimizer): the least any adapter method can cost

The model is a random-init Llama shape (benchmarks/shapes.py, seeded: the same weights for every run), the data a
seeded synthetic token set of batch x (warmup + steps) sequences, shuffled by the Trainer with seed 0: the same
batches for every run (their fingerprints are recorded). A callback brackets each optimizer step with device
synchronisations; tokens/s = batch x seq x timed steps / their summed time. Peak memory: max_memory_allocated
after the model is built (the training peak, weights included) and over the whole process."""
from __future__ import annotations

import collections
import contextlib
import gc
import importlib.metadata
import time
import traceback
import warnings
import zlib

import torch

from .measure import is_oom, release_memory, sync
from .report import environment
from .shapes import MOE_EXPERT_PARAMETERS, MOE_SHAPES, TARGETS, build_model, quantize_targets, random_batch
from .user_stack_plan import RunConfig, switch_on

REBUILD_WARNING = "recompute_slice_inputs"  # the start of SlicedLinear's warning when a rebuilt input differs


def versions() -> dict:
    out = {}
    for name in ("liger-kernel", "bitsandbytes", "accelerate"):
        try:
            out[name.replace("-", "_")] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name.replace("-", "_")] = None
    return out


def _callback_base():
    from transformers import TrainerCallback
    return TrainerCallback


class StepTimer(_callback_base()):
    """Times each optimizer step between device synchronisations; the steps after `warmup` are the timed ones.
    At the first step it also counts the trainable tensors that received a gradient."""

    def __init__(self, device: torch.device, warmup: int):
        self.device, self.warmup = device, warmup
        self.step_s: list[float] = []
        self.train_begin = self.first_step_begin = self.timed_begin = self.timed_end = None
        self.grads = None  # (trainable tensors with a gradient at the first step, trainable tensors)
        self._t = 0.0

    def on_train_begin(self, args, state, control, **kw):
        self.train_begin = time.perf_counter()

    def on_step_begin(self, args, state, control, **kw):
        sync(self.device)
        self._t = time.perf_counter()
        if self.first_step_begin is None:
            self.first_step_begin = self._t
        if len(self.step_s) == self.warmup:
            self.timed_begin = self._t

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if self.grads is None and model is not None:
            trainable = [p for p in model.parameters() if p.requires_grad]
            self.grads = (sum(p.grad is not None for p in trainable), len(trainable))

    def on_step_end(self, args, state, control, **kw):
        sync(self.device)
        self.timed_end = time.perf_counter()
        self.step_s.append(self.timed_end - self._t)


class BatchFingerprints:
    """transformers' default collator that also records a CRC of each batch's token ids (same batches check)."""

    def __init__(self):
        self.seen: list[int] = []

    def __call__(self, features):
        from transformers import default_data_collator
        batch = default_data_collator(features)
        self.seen.append(zlib.crc32(batch["input_ids"].numpy().tobytes()))
        return batch


@contextlib.contextmanager
def rebuild_probe():
    """Records, per sliced layer and call that tries to rebuild its input, what happened: "rebuilt" (a source was
    found), "no_graph" (the input has no autograd history, e.g. the first layer's q/k/v without input grads: it must
    be saved) or "saved" (it has a history the rebuild does not recognise). Yields {id(layer): Counter}."""
    from sprune_trainer.layers.sliced_linear import SlicedLinear

    seen: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    original = SlicedLinear._input_source

    def probe(self, x):
        source = original(self, x)
        seen[id(self)]["rebuilt" if source is not None else "no_graph" if x.grad_fn is None else "saved"] += 1
        return source

    SlicedLinear._input_source = probe
    try:
        yield seen
    finally:
        SlicedLinear._input_source = original


def rebuild_state(cfg: RunConfig, model, seen: dict, messages: list[str]) -> dict:
    """Whether ours' input rebuild stayed on, and if not, the likeliest reason. By design some inputs are saved:
    o_proj's (a view of the attention output, which attention saves anyway) and inputs with no autograd history."""
    from sprune_trainer.layers.surgery import sliced_modules

    layers = sliced_modules(model)
    flags = sum(bool(m.recompute_input) for m in layers.values())
    counts = collections.Counter()
    unexpected = []
    for name, m in layers.items():
        c = seen.get(id(m), collections.Counter())
        counts.update(c)
        if c["saved"] and not name.endswith("o_proj"):
            unexpected.append(name)
    calls = sum(counts.values())
    out = {"layers": len(layers), "flags_on": flags, "calls": calls, **counts, "warnings": messages[:5],
           "unexpected_layers": unexpected[:8], "unexpected_count": len(unexpected)}
    if messages:
        state = f"fell back: {len(messages)} warning(s), {flags}/{len(layers)} layers still rebuild"
    elif not calls:
        why = ("compiled: the compiler decides what to save" if switch_on(cfg.switch, "compile") else
               "4-bit base: the unfused path saves the input" if switch_on(cfg.switch, "nf4") else "no layer tried")
        state = f"off ({why})"
    elif not unexpected and counts["rebuilt"]:
        state = "on"
    else:
        why = ("checkpointing owns the saved tensors" if switch_on(cfg.switch, "checkpointing") else
               "Liger's RMSNorm / SwiGLU are not recognised as a source" if switch_on(cfg.switch, "liger") else
               "no source found")
        state = f"off in {len(unexpected)} of {len(layers)} layers ({why})"
    out["state"] = state
    return out


def _training_args(cfg: RunConfig, steps: int, device: torch.device):
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    kw = dict(output_dir=cfg.output_dir, per_device_train_batch_size=cfg.batch, max_steps=steps,
              learning_rate=cfg.lr, lr_scheduler_type="constant", weight_decay=0.0,
              bf16=cfg.bf16 and not switch_on(cfg.switch, "fp32"), logging_steps=1,
              save_strategy="no", report_to="none", disable_tqdm=True, seed=0, dataloader_num_workers=0,
              use_cpu=device.type == "cpu", torch_compile=switch_on(cfg.switch, "compile"),
              use_liger_kernel=switch_on(cfg.switch, "liger"))
    kw[ckpt] = switch_on(cfg.switch, "checkpointing")
    if kw["torch_compile"] and cfg.compile_backend:
        kw["torch_compile_backend"] = cfg.compile_backend
    return TrainingArguments(**kw)


def _trainer(cfg: RunConfig, model, args, data, collator, timer, device):
    return method_trainer(cfg.method, model, r=cfg.r, lora_r=cfg.lora_r, moe=cfg.model in MOE_SHAPES, device=device,
                          args=args, train_dataset=data, data_collator=collator, callbacks=[timer])


def method_trainer(method: str, model, *, r: int, lora_r: int, moe: bool, device: torch.device, **trainer_kwargs):
    """The Trainer of `method` (the module docstring's ours / lora / floor) on `model`; `moe`: LoRA on the attention
    linears and the fused experts through target_parameters. `trainer_kwargs`: args, train_dataset, callbacks, ..."""
    from transformers import Trainer

    if method == "ours":
        from sprune_trainer import SparseNeuronConfig, SparseNeuronTrainer
        return SparseNeuronTrainer(model=model, sparse_config=SparseNeuronConfig(neurons_per_layer=r), **trainer_kwargs)
    if method == "lora":
        from peft import LoraConfig, get_peft_model
        lora = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0,
                          target_modules=list(TARGETS[:4] if moe else TARGETS),
                          target_parameters=list(MOE_EXPERT_PARAMETERS) if moe else None,
                          bias="none", task_type="CAUSAL_LM")
        return Trainer(model=get_peft_model(model, lora), **trainer_kwargs)
    if method == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()
        placeholder = torch.nn.Parameter(torch.zeros(1, device=device))
        return Trainer(model=model, optimizers=(torch.optim.SGD([placeholder], lr=0.0), None), **trainer_kwargs)
    raise ValueError(f"unknown method {method!r}")


def _train(cfg: RunConfig, device: torch.device, row: dict) -> None:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, info = build_model(cfg.model, device, getattr(torch, cfg.dtype), cfg.layers)
    row["params"], row["num_hidden_layers"] = info["params"], info["num_hidden_layers"]
    if switch_on(cfg.switch, "nf4"):
        row["nf4_projections"] = quantize_targets(model)
    if switch_on(cfg.switch, "fp32"):
        model.float()  # the same bf16-valued weights, computed in float32
    sync(device)
    row["build_s"] = time.perf_counter() - t0
    row["peak_bytes_load"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    release_memory(device)  # empties the cache and resets the peak: what follows is the training peak
    row["model_bytes"] = torch.cuda.memory_allocated(device) if device.type == "cuda" else None

    steps = cfg.warmup + cfg.steps
    ids = random_batch(model.config.vocab_size, cfg.batch * steps, cfg.seq, torch.device("cpu"), seed=1)["input_ids"]
    data = [{"input_ids": x, "labels": x} for x in ids]
    collator, timer = BatchFingerprints(), StepTimer(device, cfg.warmup)
    messages: list[str] = []
    with warnings.catch_warnings(record=True) as caught, rebuild_probe() as seen:
        warnings.filterwarnings("always", message=REBUILD_WARNING)
        trainer = _trainer(cfg, model, _training_args(cfg, steps, device), data, collator, timer, device)
        t1 = time.perf_counter()
        trainer.train()
        row["train_s"] = time.perf_counter() - t1
    for w in caught:
        text = str(w.message)
        if text.startswith(REBUILD_WARNING):
            messages.append(text)
    row["other_warnings"] = sorted({f"{w.category.__name__}: {str(w.message)[:160]}" for w in caught
                                    if not str(w.message).startswith(REBUILD_WARNING)})[:12]

    timed = timer.step_s[cfg.warmup:]
    if len(timed) != cfg.steps:
        raise RuntimeError(f"{len(timer.step_s)} steps ran, {steps} expected")
    tokens = cfg.batch * cfg.seq
    row.update(step_s=timer.step_s, timed_s=sum(timed), step_s_median=sorted(timed)[len(timed) // 2],
               tokens_per_s=tokens * len(timed) / sum(timed),
               tokens_per_s_span=tokens * len(timed) / (timer.timed_end - timer.timed_begin),
               prepare_s=timer.first_step_begin - timer.train_begin if timer.train_begin else None)
    history = trainer.state.log_history
    row["losses"] = [h["loss"] for h in history if "loss" in h]
    row["grad_norms"] = [h.get("grad_norm") for h in history if "loss" in h]
    row["batch_fingerprints"] = collator.seen[-steps:]
    trained = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    row["trainable_params"] = sum(p.numel() for p in trained.values())  # (the floor's placeholder is not in it)
    row["params_with_grad_at_step_1"], row["trainable_tensors"] = timer.grads or (None, len(trained))
    if cfg.method == "ours":
        row["rebuild"] = rebuild_state(cfg, trainer.model, seen, messages)
        if cfg.slices_path:
            from safetensors.torch import save_file
            save_file({n: p.detach().float().cpu().contiguous() for n, p in trained.items()}, cfg.slices_path)
            row["slices_path"] = cfg.slices_path
    del trainer, model, trained


def run(cfg: RunConfig) -> dict:
    """Train `cfg` and return its row: status ok | oom | error, and what was measured."""
    device = torch.device(cfg.device, 0) if cfg.device == "cuda" else torch.device(cfg.device)
    env = environment(device)
    row = {**cfg.as_dict(), "key": cfg.key, "status": "ok", "gpu": env["gpu"], "torch": env["torch"],
           "cuda": env["cuda"], "transformers": env["transformers"], "peft": env["peft"], **versions(),
           "date": env["date"]}
    t0 = time.perf_counter()
    try:
        _train(cfg, device, row)
    except Exception as exc:  # noqa: BLE001 - recorded: out of memory is a result, anything else an error
        if is_oom(exc):
            row.update(status="oom", error=str(exc).splitlines()[0][:300])
        else:
            row.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:400]}",
                       traceback_tail=traceback.format_exc()[-2000:])
    if device.type == "cuda":
        row["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        row["peak_bytes_process"] = max(row["peak_bytes"], row.get("peak_bytes_load") or 0)
    row["wall_s"] = time.perf_counter() - t0
    gc.collect()
    if switch_on(cfg.switch, "compile"):
        torch._dynamo.reset()  # another configuration in this process starts from no compiled code
    release_memory(device)
    return row
