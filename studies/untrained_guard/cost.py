"""What the untrained-slices guard costs on a checked optimizer step, at the Llama-2-7B rows r = 64 slice set.

    python studies/untrained_guard/cost.py --out studies/untrained_guard/results/h100

The guard's work on a checked step is independent of the model's forward/backward: norms of the slices' gradients
and values before the update, of the values after it, and one flag reduction. So this times SliceAdamW's step over
the 224 slices of Llama-2-7B (32 layers x q/k/v/o/gate/up (64 x 4096) and down (64 x 11008): 72.9 M fp32 numbers)
with and without the guard around it, CUDA-synchronised, median of `--repeats`, and divides the difference by a
whole training step of the same configuration measured by benchmarks/run_all.py on the same GPU kind
(`--step-s`; default: H100, rows r64, 4 x 1024 tokens, 13,304 tokens/s -> 0.308 s, benchmarks/results/h100)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from sprune_trainer import SliceAdamW  # noqa: E402
from sprune_trainer.training.untrained import UntrainedGuard  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--step-s", type=float, default=4096 / 13303.6)
    a = ap.parse_args()
    dev = torch.device("cuda")
    shapes = [(64, 4096)] * 6 + [(64, 11008)]
    params = [torch.nn.Parameter(torch.zeros(s, device=dev)) for _ in range(32) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = SliceAdamW(params, lr=1e-4)
    guard = UntrainedGuard(step_source=lambda: 0, every=lambda: 1)  # every step is a checked one

    def plain():
        opt.step()

    def guarded():
        pending = guard.before_step(opt)
        opt.step()
        guard.after_step(pending)

    times = {}
    for name, fn in (("plain", plain), ("guarded", guarded), ("plain_again", plain)):
        runs = []
        for i in range(a.repeats + 5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            if i >= 5:
                runs.append(time.perf_counter() - t0)
        times[name] = statistics.median(runs)
    cost = times["guarded"] - min(times["plain"], times["plain_again"])
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "slice_numbers": sum(p.numel() for p in params), "slice_tensors": len(params),
           "median_s": times, "guard_cost_s": cost, "step_s": a.step_s,
           "cost_pct_of_a_checked_step": 100 * cost / a.step_s,
           "cost_pct_per_step_logging_every_10": 100 * cost / a.step_s / 10}
    os.makedirs(a.out, exist_ok=True)
    json.dump(out, open(os.path.join(a.out, "cost.json"), "w"), indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
