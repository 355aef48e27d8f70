"""Per-step host overhead of sliced MoE experts: Trainer steps of a tiny-width, many-expert Qwen3-MoE on the CPU.

    PYTHONPATH=. python studies/moe_step_overhead/step_time.py --out studies/moe_step_overhead/results/cpu

The widths are tiny (hidden 64, experts of width 32) and the expert count is Qwen3-30B-A3B's (128, top-8), so the
matmuls cost little and a step's time is mostly the per-module and per-parameter Python work the GPU run waits for.
Three methods on the same seeded model and batches: ours (SparseNeuronTrainer, rows r on attention and every
expert's gate_up / down), PEFT LoRA r16 on attention plus `target_parameters` on the fused experts (the
benchmark's setup), and the frozen floor (no trainable weight; a placeholder optimizer). Median Trainer step time
over the timed steps (a callback's step begin -> step end), then a cProfile of ours' timed steps (top functions by
own time)."""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM, TrainerCallback, TrainingArguments  # noqa: E402

from benchmarks.trainer_run import method_trainer  # noqa: E402
from studies.moe_step_overhead.phases import PhaseTimer  # noqa: E402

METHODS = ("ours", "lora", "floor")


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (forward, backward, clipping, optimizer, zero_grad, the Trainer's own walks)."""

    def __init__(self):
        self.step_s, self._t0 = [], None

    def on_step_begin(self, args, state, control, **kw):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.step_s.append(time.perf_counter() - self._t0)


class ProfileAfter(TrainerCallback):
    """cProfile over the steps after the first `warmup` (the scoring and surgery before them are not per-step)."""

    def __init__(self, warmup: int):
        self.warmup, self.profile = warmup, cProfile.Profile()

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.warmup:
            self.profile.enable()

    def on_train_end(self, args, state, control, **kw):
        self.profile.disable()


def build_model(a) -> Qwen3MoeForCausalLM:
    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=256, hidden_size=a.hidden, intermediate_size=2 * a.hidden,
                            moe_intermediate_size=a.expert_width, num_hidden_layers=a.layers, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, num_experts=a.experts, num_experts_per_tok=a.top_k,
                            norm_topk_prob=True, max_position_embeddings=256, tie_word_embeddings=False,
                            use_cache=False, output_router_logits=False)
    model = Qwen3MoeForCausalLM(config)
    if a.experts_implementation != "default":
        model.set_experts_implementation(a.experts_implementation)
    return model.train()


def make_trainer(method: str, model, a, out: str, callbacks: list):
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=a.batch, max_steps=a.warmup + a.steps,
                             learning_rate=1e-4, lr_scheduler_type="constant", weight_decay=0.0,
                             logging_steps=a.logging_steps,
                             save_strategy="no", report_to="none", disable_tqdm=True, seed=0, use_cpu=True,
                             dataloader_num_workers=0, max_grad_norm=1.0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (a.batch * (a.warmup + a.steps), a.seq), generator=g)
    data = [{"input_ids": x, "labels": x} for x in ids]
    # the user-stack benchmark's three Trainers (ours: its default config, l2 rows: no calibration batches to wait for)
    return method_trainer(method, model, r=a.r, lora_r=16, moe=True, device=torch.device("cpu"), args=args,
                          train_dataset=data, callbacks=callbacks)


def grouped_path_taken(model) -> bool | None:
    """Whether ours' sliced experts run the grouped matmul path (grouped_experts.py) rather than the eager loop."""
    from sprune_trainer.layers.experts import _projections
    from sprune_trainer.layers.grouped_experts import grouped_slices
    experts = [m for m in model.modules() if getattr(m, "_sprune_expert_views", False)]
    return None if not experts else grouped_slices(experts[0], _projections(experts[0])) is not None


def run(method: str, a) -> dict:
    """Timed steps (no profiler): the median step and its phases."""
    model = build_model(a)
    timer = StepTimer()
    trainer = make_trainer(method, model, a, os.path.join(a.tmp, method), [timer])
    phases = PhaseTimer(trainer, a.warmup)
    trainer.add_callback(phases)
    trainer.train()
    timed = timer.step_s[a.warmup:]
    row = dict(method=method, step_ms_median=1e3 * statistics.median(timed), step_ms_min=1e3 * min(timed),
               steps=len(timed), phases_ms=phases.per_step_ms(),
               trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
               trainable_tensors=sum(1 for p in model.parameters() if p.requires_grad),
               modules=sum(1 for _ in model.modules()),
               experts_implementation=getattr(model.config, "_experts_implementation", None))
    if method == "ours":
        row["grouped_path"] = grouped_path_taken(model)
    return row


def profile(method: str, a) -> dict[str, str]:
    """A separate run under cProfile (its overhead would skew the timed one): top functions by own and
    cumulative time."""
    prof = ProfileAfter(a.warmup)
    trainer = make_trainer(method, build_model(a), a, os.path.join(a.tmp, method + "_profiled"), [prof])
    trainer.train()
    out = {}
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(prof.profile, stream=text).sort_stats(order).print_stats(a.top)
        out[order] = text.getvalue()
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for step_time.json and the profiles (none: print only)")
    ap.add_argument("--tmp", default="/tmp/moe_step_overhead")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--expert-width", type=int, default=32)
    ap.add_argument("--r", type=int, default=4, help="ours: neurons per layer (each expert projection too)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--logging-steps", type=int, default=1, help="1, as the benchmark: ours' untrained-slices guard "
                                                                  "then checks every step")
    ap.add_argument("--top", type=int, default=30, help="functions listed in each profile")
    ap.add_argument("--profile", default="ours", help="comma-separated methods to cProfile ('' for none)")
    ap.add_argument("--experts-implementation", default="default", help="default (transformers' choice), eager, "
                                                                          "grouped_mm")
    a = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = [run(m, a) for m in a.methods.split(",")]
    profiles = {m: profile(m, a) for m in filter(None, a.profile.split(","))}
    for method, texts in profiles.items():
        for order, text in texts.items():
            print(f"---- {method}: cProfile by {order}\n{text}")
    print(table(rows))
    print("experts implementation:", rows[0]["experts_implementation"],
          "| ours on the grouped path:", next((r["grouped_path"] for r in rows if "grouped_path" in r), None))
    result = dict(args=vars(a), torch=torch.__version__, rows=rows)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "step_time.json"), "w") as f:
            json.dump(result, f, indent=1)
        for method, texts in profiles.items():
            with open(os.path.join(a.out, f"profile_{method}.txt"), "w") as f:
                f.write("\n".join(f"---- cProfile by {order}\n{text}" for order, text in texts.items()))
    return result


def table(rows: list[dict]) -> str:
    """Markdown: one column per method, rows: the median step, its phases, the trainable tensors and modules."""
    phases = list(dict.fromkeys(k for row in rows for k in row["phases_ms"]))
    lines = ["| per step (ms) | " + " | ".join(r["method"] for r in rows) + " |",
             "|---|" + "---:|" * len(rows),
             "| **step (median)** | " + " | ".join(f"**{r['step_ms_median']:.1f}**" for r in rows) + " |"]
    lines += [f"| {p} | " + " | ".join(f"{r['phases_ms'].get(p, 0.0):.2f}" for r in rows) + " |" for p in phases]
    lines += ["| trainable tensors | " + " | ".join(str(r["trainable_tensors"]) for r in rows) + " |",
              "| modules | " + " | ".join(str(r["modules"]) for r in rows) + " |"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
