#!/usr/bin/env python
"""Scale-out evidence for issue 5: one SparseNeuronTrainer run of a random-init ~1B Llama on synthetic,
deterministic tokens, under any launcher; rank 0 writes <out>/result.json (per-step loss, per-rank peak
memory, tok/s, optimizer-state bytes, which neurons every rank trains).

Every launcher sees the same weights (one seeded random init saved to --model_dir by `--init_model`, then
loaded by every run), the same data (sequence i depends only on --data_seed and i, read in order) and, with the
same --global_batch, the same samples in every optimizer step: a single GPU runs per_device_batch x GA micro-
batches where two GPUs run one each (accelerate shards batch b of the sequential loader to rank b % world).

Launch (from the repository root; the whole 2-GPU suite is studies/multigpu/run_h200x2.sh)
------
python studies/multigpu/train_scale.py --init_model --model_dir /tmp/llama1b            # once: seeded init
CUDA_VISIBLE_DEVICES=0 python studies/multigpu/train_scale.py --model_dir /tmp/llama1b --out runs/single
torchrun --nproc_per_node 2 studies/multigpu/train_scale.py --model_dir /tmp/llama1b --out runs/ddp
torchrun --nproc_per_node 2 studies/multigpu/train_scale.py --model_dir /tmp/llama1b --out runs/zero2 \
    --deepspeed ds_configs/zero2.json            # or zero3.json / zero3_offload.json
accelerate launch --config_file ds_configs/accelerate/zero3_1node.yaml --num_processes 2 \
    studies/multigpu/train_scale.py --model_dir /tmp/llama1b --out runs/zero3
# save -> resume: --steps 20 --save_steps 10 --final_adapter A, then the same with
#   --resume_from <out>/train/checkpoint-10 --compare_adapter A
# merge check (one process): --merge_check ADAPTER_DIR
# throughput at equal per-GPU batch instead of equal global batch: --global_batch 0 (= per_device x world)
# CPU smoke test: add --tiny (a 2-layer model; fp32 unless --dtype bf16)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import sys
import time

T_START = time.time()
# who launched us, read before TrainingArguments (which sets ACCELERATE_* variables itself)
LAUNCHER = ("accelerate" if "ACCELERATE_DYNAMO_BACKEND" in os.environ or "ACCELERATE_USE_DEEPSPEED" in os.environ
            else "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "python")
NODES = os.environ.get("GROUP_WORLD_SIZE")
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
try:
    import sprune_trainer  # noqa: F401  (pip install -e .)
except ImportError:  # a checkout that is not installed (the GPU machine)
    sys.path.insert(0, _ROOT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils.data import Dataset, SequentialSampler  # noqa: E402
from transformers import (AutoConfig, AutoModelForCausalLM, LlamaConfig, TrainerCallback, TrainingArguments,  # noqa: E402
                          set_seed)

from sprune_trainer import (SliceAdamW, SparseNeuronConfig, SparseNeuronTrainer, load_sparse_adapter,  # noqa: E402
                            merge_sparse)
from sprune_trainer.io.adapter import read_sparse_adapter  # noqa: E402
from sprune_trainer.layers.surgery import sliced_modules  # noqa: E402

SHAPES = {  # ~1.1B parameters (Llama-3.2-1B / TinyLlama-like widths); tiny: a CPU smoke test
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_dir", required=True, help="seeded random-init model (written by --init_model)")
    p.add_argument("--init_model", action="store_true", help="build the seeded random-init model, save it, exit")
    p.add_argument("--merge_check", metavar="ADAPTER_DIR", help="fresh base + adapter: sliced vs merge_sparse logits")
    p.add_argument("--out", help="result folder (result.json; Trainer output in <out>/train)")
    p.add_argument("--tiny", action="store_true", help="2-layer model, short sequences (CPU smoke test)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--seq_len", type=int, default=None, help="default 1024 (tiny: 64)")
    p.add_argument("--per_device_batch", type=int, default=8)
    p.add_argument("--global_batch", type=int, default=16,
                   help="sequences per optimizer step over all ranks (GA = global / (per_device x world)); "
                        "0 = per_device x world, i.e. equal per-GPU batch, GA 1")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--timing_warmup", type=int, default=5, help="first steps left out of tok/s")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--neurons", type=int, default=None, help="rows per targeted linear (default: 64, the paper's; tiny: 8)")
    p.add_argument("--importance", default="l2")
    p.add_argument("--calibration_batches", type=int, default=4)
    p.add_argument("--deepspeed", default=None, help="DeepSpeed JSON (TrainingArguments.deepspeed)")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--save_steps", type=int, default=0, help="checkpoint every N steps (0: none)")
    p.add_argument("--resume_from", default=None, help="checkpoint folder to resume from")
    p.add_argument("--final_adapter", default=None, help="save the final adapter here")
    p.add_argument("--compare_adapter", default=None, help="adapter to compare the final one with (resume check)")
    p.add_argument("--name", default=None, help="run name in result.json")
    p.add_argument("--seed", type=int, default=1234, help="init and trainer seed")
    p.add_argument("--data_seed", type=int, default=7)
    p.add_argument("--n_states", type=int, default=256, help="synthetic data: distinct tokens of the Markov chain")
    a = p.parse_args(argv)
    if a.seq_len is None:
        a.seq_len = 64 if a.tiny else 1024
    if a.neurons is None:
        a.neurons = 8 if a.tiny else 64
    if a.dtype is None:
        a.dtype = "bf16" if torch.cuda.is_available() else "fp32"
    if not (a.init_model or a.merge_check) and not a.out:
        p.error("--out is required for a training run")
    return a


# ---- model and data ------------------------------------------------------------------------------------------
def model_config(tiny: bool, seq_len: int) -> LlamaConfig:
    return LlamaConfig(**SHAPES["tiny" if tiny else "1b"], max_position_embeddings=max(seq_len, 2048),
                       tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10000.0)


def init_model(a) -> None:
    """Seeded random init, built on the GPU when there is one (seconds instead of a minute of CPU init), saved in
    bf16 (GPU) or fp32 (CPU): every later run loads exactly these weights, whatever its launcher or ZeRO stage."""
    t0 = time.time()
    torch.manual_seed(a.seed)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(model_config(a.tiny, a.seq_len), dtype=torch.float32)
    except Exception as e:  # noqa: BLE001  (a transformers version that dislikes a device context: CPU init)
        print(f"init on {device} failed ({e!r}); initialising on the CPU")
        device = "cpu"
        torch.manual_seed(a.seed)
        model = AutoModelForCausalLM.from_config(model_config(a.tiny, a.seq_len), dtype=torch.float32)
    model.to(dtype).save_pretrained(a.model_dir)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"init_model": a.model_dir, "params": n, "dtype": str(dtype), "device": device,
                      "seconds": round(time.time() - t0, 1)}))


class MarkovTokens(Dataset):
    """Deterministic synthetic LM data with something to learn: a first-order Markov chain over `n_states` token
    ids (spread over the vocabulary), each with `fanout` equally likely successors. Entropy floor ln(fanout)
    (2.08 nats) vs ln(vocab) (10.4) at init. Sequence i is the same on every rank and in every launcher."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int, n_states: int = 256, fanout: int = 8,
                 block: int = 64):
        rng = np.random.default_rng(seed)
        n_states = min(n_states, vocab)
        states = rng.choice(vocab, size=n_states, replace=False)
        succ = rng.integers(0, n_states, size=(n_states, fanout))  # state -> successor states
        walk = np.empty((n, seq_len), dtype=np.int64)
        for b0 in range(0, n, block):  # sequences in blocks with their own seed: sequence i never depends on n
            brng = np.random.default_rng([seed, b0 // block])
            start = brng.integers(0, n_states, size=block)
            picks = brng.integers(0, fanout, size=(block, seq_len))
            w = np.empty((block, seq_len), dtype=np.int64)
            w[:, 0] = start
            for t in range(1, seq_len):
                w[:, t] = succ[w[:, t - 1], picks[:, t]]
            walk[b0:b0 + block] = w[: n - b0]
        self.ids = torch.from_numpy(states[walk])  # (n, T)
        self.entropy_floor = float(np.log(fanout))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


class SequentialSparseTrainer(SparseNeuronTrainer):
    """Samples in order (no shuffle): step k of every launcher trains on sequences [k*G, (k+1)*G)."""

    def _get_train_sampler(self, train_dataset=None, *args, **kwargs):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


# ---- measurements --------------------------------------------------------------------------------------------
def cuda_mem() -> dict:
    if not torch.cuda.is_available():
        return {"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    return {"allocated_bytes": torch.cuda.memory_allocated(), "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved()}


class Meter(TrainerCallback):
    """Wall time at the end of every optimizer step (after a device sync), memory after the last step."""

    def __init__(self):
        self.step_end: dict[int, float] = {}
        self.t_train_begin = None
        self.mem_after_step = None

    def on_train_begin(self, args, state, control, **kw):
        self.t_train_begin = time.time()
        self.step_end[state.global_step] = time.perf_counter()  # start of the first step (0, or the resumed step)

    def on_step_end(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_end[state.global_step] = time.perf_counter()
        self.mem_after_step = cuda_mem()  # params + optimizer state + DeepSpeed buffers: the "model states"


def gather(obj):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [None] * dist.get_world_size()
        dist.all_gather_object(box, obj)
        return box
    return [obj]


def find_slice_optimizer(opt):
    """accelerate wrapper -> (DeepSpeed ZeRO optimizer ->) SliceAdamW."""
    chain = []
    while opt is not None and len(chain) < 5:
        chain.append(type(opt).__name__)
        if isinstance(opt, SliceAdamW):
            return opt, chain
        opt = getattr(opt, "optimizer", None)
    return None, chain


def optimizer_state_bytes(opt) -> dict:
    """Bytes of the slice optimizer's state tensors on this rank. Read from opt.state, not param_groups: ZeRO-3
    puts its fp32 partitions into the param groups only for the duration of a step."""
    if opt is None:
        return {}
    by_device: dict[str, int] = {}
    numel, dtypes = 0, set()
    for p, st in opt.state.items():
        numel += p.numel()
        dtypes.add(str(p.dtype))
        for v in st.values():
            if torch.is_tensor(v) and v.numel() > 1:
                by_device[v.device.type] = by_device.get(v.device.type, 0) + v.numel() * v.element_size()
    return {"state_bytes_by_device": by_device, "state_bytes": sum(by_device.values()), "optimized_numel": numel,
            "param_dtypes": sorted(dtypes)}


def selection_digest(model) -> str:
    h = hashlib.sha256()
    for name, layer in sorted(sliced_modules(model).items()):
        h.update(name.encode())
        h.update(layer.index.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def compare_adapters(a_dir: str, b_dir: str) -> dict:
    a, b = read_sparse_adapter(a_dir), read_sparse_adapter(b_dir)
    same_sel = set(a.selection) == set(b.selection) and all(torch.equal(a.selection[n], b.selection[n]) for n in a.selection)
    max_abs, diff_sq, ref_sq, identical = 0.0, 0.0, 0.0, True
    for k, ta in a.tensors.items():
        tb = b.tensors[k].to(ta.dtype)
        d = (ta.float() - tb.float())
        identical &= torch.equal(ta, tb)
        max_abs = max(max_abs, d.abs().max().item())
        diff_sq += d.pow(2).sum().item()
        ref_sq += ta.float().pow(2).sum().item()
    return {"same_selection": bool(same_sel), "bitwise_identical": bool(identical), "max_abs_diff": max_abs,
            "rel_l2_diff": (diff_sq ** 0.5) / max(ref_sq ** 0.5, 1e-30), "delta_l2": ref_sq ** 0.5,
            "tensors": len(a.tensors)}


def versions() -> dict:
    import accelerate
    import transformers
    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
         "accelerate": accelerate.__version__}
    try:
        import deepspeed
        v["deepspeed"] = deepspeed.__version__
    except Exception:  # noqa: BLE001
        v["deepspeed"] = None
    if torch.cuda.is_available():
        v["gpu"] = torch.cuda.get_device_name()
    return v


# ---- merge check ---------------------------------------------------------------------------------------------
@torch.no_grad()
def merge_check(a) -> dict:
    """A freshly loaded base + load_sparse_adapter (sliced) vs merge_sparse of it: logits must agree. In fp32 the
    merged W[I] + delta is one rounding away from the sliced base(x) + x @ delta.T; bf16 shown for reference."""
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    data = MarkovTokens(4, a.seq_len, AutoConfig.from_pretrained(a.model_dir).vocab_size, a.data_seed + 1)
    ids = data.ids[:2].to(device)
    out = {"adapter": a.merge_check, "device": device}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        base = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=dtype).to(device).eval()
        plain = base(ids).logits.float()
        ref_weights = {n: m.weight.detach().clone() for n, m in base.named_modules()
                       if isinstance(m, torch.nn.Linear)}
        sliced = load_sparse_adapter(base, a.merge_check)
        n_sliced = len(sliced_modules(sliced))
        logits_sliced = sliced(ids).logits.float()
        adapter = read_sparse_adapter(a.merge_check)
        merged = merge_sparse(sliced)
        assert not sliced_modules(merged)
        logits_merged = merged(ids).logits.float()
        # only the selected rows changed; the rest is byte-identical to the fresh base
        untouched, changed_rows = True, 0
        for n, m in merged.named_modules():
            if n in adapter.selection:
                rows = adapter.selection[n].to(device)
                keep = torch.ones(m.weight.shape[0], dtype=torch.bool, device=device)
                keep[rows] = False
                untouched &= torch.equal(m.weight[keep], ref_weights[n][keep])
                changed_rows += int((m.weight[rows] != ref_weights[n][rows]).any(dim=1).sum())
        diff = (logits_merged - logits_sliced).abs()
        out[name] = {"sliced_layers": n_sliced, "max_abs_logit_diff": diff.max().item(),
                     "rel_logit_diff": (diff.norm() / logits_sliced.norm()).item(),
                     "logit_scale": logits_sliced.abs().max().item(),
                     "adapter_changes_logits": (logits_sliced - plain).abs().max().item(),
                     "argmax_agreement": (logits_merged.argmax(-1) == logits_sliced.argmax(-1)).float().mean().item(),
                     "unselected_rows_byte_identical": bool(untouched), "changed_selected_rows": changed_rows}
        del base, sliced, merged
    tol = 1e-4  # fp32: relative difference of one extra rounding per merged weight, amplified by 16 layers
    out["ok"] = bool(out["fp32"]["rel_logit_diff"] < tol and out["fp32"]["unselected_rows_byte_identical"]
                     and out["fp32"]["adapter_changes_logits"] > 0)
    out["tolerance_fp32_rel"] = tol
    return out


# ---- training run --------------------------------------------------------------------------------------------
def main(argv=None):
    a = parse_args(argv)
    if a.init_model:
        return init_model(a)
    if a.merge_check:
        res = merge_check(a)
        print(json.dumps(res, indent=1))
        if a.out:
            os.makedirs(a.out, exist_ok=True)
            with open(os.path.join(a.out, "result.json"), "w") as f:
                json.dump({"name": a.name or "merge_check", "merge_check": res, "versions": versions(),
                           "wall_s": round(time.time() - T_START, 1)}, f, indent=1)
        return 0 if res["ok"] else 1

    world = int(os.environ.get("WORLD_SIZE", "1"))
    global_batch = a.global_batch or a.per_device_batch * world
    if global_batch % (a.per_device_batch * world):
        raise SystemExit(f"--global_batch {global_batch} is not a multiple of per_device_batch x world "
                         f"({a.per_device_batch} x {world})")
    ga = global_batch // (a.per_device_batch * world)
    bf16 = a.dtype == "bf16"
    # TrainingArguments before the model: under ZeRO-3 (--deepspeed or accelerate's DeepSpeed plugin) the
    # model is then built partitioned (zero.Init), never whole on one rank
    args = TrainingArguments(
        output_dir=os.path.join(a.out, "train"), per_device_train_batch_size=a.per_device_batch,
        gradient_accumulation_steps=ga, max_steps=a.steps, learning_rate=a.lr, lr_scheduler_type="constant_with_warmup",
        warmup_steps=5, weight_decay=0.0, max_grad_norm=1.0, bf16=bf16, logging_steps=1,
        save_strategy="steps" if a.save_steps else "no", save_steps=a.save_steps or 500, seed=a.seed,
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, deepspeed=a.deepspeed,
        use_cpu=not torch.cuda.is_available(), remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # every slice gets a gradient; no per-step graph search
        **({"gradient_checkpointing": True} if a.gradient_checkpointing else {}))
    set_seed(a.seed)
    rank, world = args.process_index, args.world_size
    if a.deepspeed and world > 1:
        # zero.Init (inside from_pretrained) reads the world size from deepspeed.comm: on GPUs accelerate has
        # initialised it already (no-op here); on CPU accelerate uses plain gloo and DeepSpeed would see world 1
        import deepspeed
        deepspeed.init_distributed()
    t_load0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.bfloat16 if bf16 else torch.float32)
    model.config.use_cache = False
    partitioned = hasattr(model.model.layers[0].self_attn.q_proj.weight, "ds_id")
    mem_after_load = cuda_mem()
    t_loaded = time.time()
    vocab = model.config.vocab_size
    data = MarkovTokens(a.steps * global_batch, a.seq_len, vocab, a.data_seed, n_states=a.n_states)

    meter = Meter()
    cfg = SparseNeuronConfig(importance=a.importance, neurons_per_layer=a.neurons,
                             calibration_batches=a.calibration_batches, seed=0)
    trainer = SequentialSparseTrainer(model=model, args=args, train_dataset=data, sparse_config=cfg,
                                      callbacks=[meter])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    out = trainer.train(resume_from_checkpoint=a.resume_from)
    t_trained = time.time()

    if a.final_adapter:
        trainer.save_model(a.final_adapter)  # every rank (ZeRO-3 gathers the slices); rank 0 writes
    slice_opt, chain = find_slice_optimizer(trainer.optimizer)
    resumed_at = int(os.path.basename(a.resume_from.rstrip("/")).split("-")[-1]) if a.resume_from else 0
    steps_timed = sorted(s for s in meter.step_end if s > resumed_at + a.timing_warmup)
    tokens_per_step = global_batch * a.seq_len
    t0_key = steps_timed[0] - 1 if steps_timed else None
    tok_s = None
    if len(steps_timed) >= 2 and t0_key in meter.step_end:
        secs = meter.step_end[steps_timed[-1]] - meter.step_end[t0_key]
        tok_s = tokens_per_step * len(steps_timed) / secs
    per_rank = {
        "rank": rank, "local_rank": args.local_process_index, "host_pid": os.getpid(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "mem_after_load": mem_after_load, "mem_after_last_step": meter.mem_after_step, "mem_end": cuda_mem(),
        "selection_digest": selection_digest(trainer.model),
        "slice_optimizer": optimizer_state_bytes(slice_opt),
        "tok_s_rank_view": tok_s,
    }
    ranks = gather(per_rank)
    try:
        if rank == 0:
            report(a, trainer, meter, out, ranks, per_rank, data, dict(
                world=world, ga=ga, global_batch=global_batch, partitioned=partitioned, tok_s=tok_s,
                steps_timed=steps_timed, tokens_per_step=tokens_per_step, resumed_at=resumed_at, chain=chain,
                slice_opt=slice_opt, t_load0=t_load0, t_loaded=t_loaded, t_trained=t_trained,
                model_params=sum(getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters()
                                 if not p.requires_grad)))
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # no rank leaves while rank 0 still reads adapters; then a clean shutdown of the group
            dist.destroy_process_group()
    return 0


def report(a, trainer, meter, out, ranks, per_rank, data, m) -> None:
    world, ga, global_batch, tok_s, chain = m["world"], m["ga"], m["global_batch"], m["tok_s"], m["chain"]
    steps_timed, tokens_per_step, resumed_at, slice_opt = (m["steps_timed"], m["tokens_per_step"], m["resumed_at"],
                                                            m["slice_opt"])
    t_load0, t_loaded, t_trained, partitioned = m["t_load0"], m["t_loaded"], m["t_trained"], m["partitioned"]
    logs = trainer.state.log_history
    losses = [{"step": h["step"], "loss": h["loss"], "grad_norm": h.get("grad_norm"), "lr": h.get("learning_rate")}
              for h in logs if "loss" in h]
    summary = trainer.sparse_summary or {}
    res = {
        "name": a.name or os.path.basename(os.path.normpath(a.out)),
        "launcher": LAUNCHER, "world_size": world, "deepspeed_config": a.deepspeed or os.environ.get(
            "ACCELERATE_DEEPSPEED_CONFIG_FILE"), "deepspeed_enabled": trainer.is_deepspeed_enabled,
        "num_machines": int(NODES) if NODES else None,
        "model": "tiny" if a.tiny else "1b", "model_params": m["model_params"],  # frozen; ds_numel under ZeRO-3
        "summary_model_params": summary.get("model_params"),
        "partitioned_at_load": partitioned, "dtype": a.dtype, "seq_len": a.seq_len,
        "per_device_batch": a.per_device_batch, "grad_accum": ga, "global_batch": global_batch,
        "tokens_per_step": tokens_per_step, "steps": a.steps, "lr": a.lr, "importance": a.importance,
        "neurons_per_layer": a.neurons, "resumed_from_step": resumed_at or None,
        "trainable_params": summary.get("trainable_params"),
        "expected_adam_state_bytes": summary.get("optimizer_state_bytes"),
        "optimizer_chain": chain, "slice_adamw": slice_opt is not None,
        "selection_digest": per_rank["selection_digest"],
        "same_selection_on_all_ranks": len({r["selection_digest"] for r in ranks}) == 1,
        "entropy_floor": data.entropy_floor,
        "losses": losses,
        "timing": {"tok_s": tok_s, "tok_s_per_gpu": tok_s / world if tok_s else None,
                   "timed_steps": len(steps_timed), "warmup_steps_excluded": a.timing_warmup,
                   "step_s": (1 / tok_s * tokens_per_step) if tok_s else None,
                   "load_s": round(t_loaded - t_load0, 2), "startup_to_train_begin_s":
                       round((meter.t_train_begin or t_loaded) - T_START, 2),
                   "train_s": round(t_trained - (meter.t_train_begin or t_loaded), 2),
                   "wall_s": round(time.time() - T_START, 2), "trainer_metrics": out.metrics},
        "ranks": ranks,
        "peak_mem_gib_per_rank": [round(r["mem_end"].get("peak_allocated_bytes", 0) / 2**30, 3) for r in ranks],
        "model_states_gib_per_rank": [round((r["mem_after_last_step"] or {}).get("allocated_bytes", 0) / 2**30, 3)
                                      for r in ranks],
        "versions": versions(),
    }
    if a.final_adapter:
        res["final_adapter"] = a.final_adapter
    if a.compare_adapter and a.final_adapter:
        res["adapter_vs_reference"] = compare_adapters(a.compare_adapter, a.final_adapter)
        res["adapter_vs_reference"]["reference"] = a.compare_adapter
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "result.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    print(f"[train_scale] {res['name']}: world {world}, GA {ga}, final loss {losses[-1]['loss']:.4f}, "
          f"tok/s {tok_s or float('nan'):,.0f}, peak GiB/rank {res['peak_mem_gib_per_rank']}, "
          f"optimizer {'>'.join(chain)} -> {a.out}/result.json")


if __name__ == "__main__":
    sys.exit(main())
