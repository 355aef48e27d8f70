#!/usr/bin/env python
"""Read the multi-GPU runs of train_scale.py and check / tabulate them.

python studies/multigpu/compare.py RESULTS.json|RUNS_DIR [--markdown table.md] [--plot curves.png]
python studies/multigpu/compare.py --collect RUNS_DIR --status status.tsv --write RESULTS.json   (run_h200x2.sh)

Checks, against the single-GPU run (`--reference`, default single_gpu):
* loss curves: every run with the same global batch, data and steps must match the reference at every step within
  LOSS_RTOL = 2^-7 = 0.78 % relative (bf16's machine epsilon: one ulp of the loss value itself). Why that band:
  all runs start from the same bf16 weights and see the same sequences in every optimizer step; what differs is
  the order and precision of reductions (fp32 all-reduce in DDP; bf16 gradients reduce-scattered and bf16 copies of
  the fp32 master slices in DeepSpeed) - perturbations of one bf16 rounding (2^-8 relative) per operation, which
  Adam turns into slightly different updates. A curve that agrees to one bf16 ulp at every step is the same
  training run in bf16. Step 1 (identical weights and inputs) must agree within 2^-8. As the loss of a step is
  dominated by that step's batch, matching curves alone could hide a different trajectory, so the final trained
  slices (the adapters) are compared too (relative L2 difference, reported), and the band is checked to be far
  narrower than the loss decrease over the run (else the check could not fail).
* every run and every rank trains the same neurons (selection digest);
* the slice optimizer is SliceAdamW (DeepSpeed wraps ours) and its state is <= 2 x trainable params x 4 B;
* ZeRO-3 2-GPU vs 1-GPU: tok/s speedup (target >= 1.8x at equal per-GPU micro-batch) and model-state memory
  per GPU (target ~1/2);
* save -> resume: the resumed run's final adapter vs the uninterrupted one; merge_sparse logits check.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import sys

LOSS_RTOL = 2.0 ** -7   # bf16 machine epsilon, relative
STEP1_RTOL = 2.0 ** -8  # bf16 unit roundoff
ORDER = ["single_gpu", "ddp", "zero2", "zero3", "zero3_offload", "two_node_zero3", "two_node_zero3_resume",
         "merge_check"]
LABELS = {"single_gpu": "1 GPU (python)", "ddp": "DDP 2 GPUs (torchrun)", "zero2": "ZeRO-2 2 GPUs (torchrun --deepspeed)",
          "zero3": "ZeRO-3 2 GPUs (accelerate launch)", "zero3_offload": "ZeRO-3 + CPU offload 2 GPUs (torchrun --deepspeed)",
          "two_node_zero3": "ZeRO-3 2 nodes x 1 GPU (accelerate, simulated)",
          "two_node_zero3_resume": "  same, resumed from step N/2"}


# ---- collecting --------------------------------------------------------------------------------------------------
def adapter_diff(ref_dir: str, other_dir: str):
    try:
        from safetensors.torch import load_file
    except ImportError:
        return None
    fa, fb = os.path.join(ref_dir, "sparse_adapter.safetensors"), os.path.join(other_dir, "sparse_adapter.safetensors")
    if not (os.path.isfile(fa) and os.path.isfile(fb)):
        return None
    a, b = load_file(fa), load_file(fb)
    if set(a) != set(b):
        return {"same_tensors": False}
    num = den = 0.0
    max_abs = 0.0
    same_index = True
    for k, ta in a.items():
        tb = b[k]
        if k.endswith(".index"):
            same_index &= bool((ta == tb).all())
            continue
        d = ta.double() - tb.double()
        num += float(d.pow(2).sum())
        den += float(ta.double().pow(2).sum())
        max_abs = max(max_abs, float(d.abs().max()))
    return {"same_tensors": True, "same_indices": same_index, "rel_l2_diff": math.sqrt(num) / max(math.sqrt(den), 1e-30),
            "max_abs_diff": max_abs, "ref_l2": math.sqrt(den)}


def collect(runs_dir: str, status_path: str | None, reference: str, adapters: bool = True) -> dict:
    runs = {}
    for path in sorted(glob.glob(os.path.join(runs_dir, "*", "result.json"))):
        with open(path) as f:
            r = json.load(f)
        runs[os.path.basename(os.path.dirname(path))] = r
    status = {}
    if status_path and os.path.isfile(status_path):
        with open(status_path) as f:
            for row in csv.reader(f, delimiter="\t"):
                if len(row) >= 3:
                    status[row[0]] = {"rc": int(row[1]) if row[1].lstrip("-").isdigit() else row[1],
                                      "seconds": float(row[2]), "note": row[3] if len(row) > 3 else ""}
    ref = runs.get(reference, {}).get("final_adapter") if adapters else None
    for name, r in runs.items():
        if ref and name != reference and r.get("final_adapter") and r.get("resumed_from_step") is None \
                and r.get("steps") == runs[reference].get("steps"):
            r["adapter_vs_single_gpu"] = adapter_diff(ref, r["final_adapter"])
    return {"runs": runs, "status": status}


# ---- checks ------------------------------------------------------------------------------------------------------
def load(path: str) -> dict:
    if os.path.isdir(path):
        return collect(path, os.path.join(path, "status.tsv"), "single_gpu")
    with open(path) as f:
        return json.load(f)


def curve(r: dict) -> dict[int, float]:
    return {int(h["step"]): float(h["loss"]) for h in r.get("losses", [])}


def comparable(r: dict, ref: dict) -> bool:
    keys = ("global_batch", "seq_len", "model", "lr", "dtype", "importance", "neurons_per_layer")
    return all(r.get(k) == ref.get(k) for k in keys)


def loss_match(r: dict, ref: dict) -> dict:
    a, b = curve(ref), curve(r)
    steps = sorted(set(a) & set(b))
    if r.get("resumed_from_step"):
        steps = [s for s in steps if s > r["resumed_from_step"]]  # the steps this launch actually trained
    if not steps:
        return {"steps": 0, "ok": False}
    rel = {s: abs(b[s] - a[s]) / abs(a[s]) for s in steps}
    first = steps[0]
    drop = a[min(a)] - min(a.values())  # how far the reference curve moves
    res = {"steps": len(steps), "first_step": first, "max_rel_diff": max(rel.values()),
           "max_rel_step": max(rel, key=rel.get), "mean_rel_diff": sum(rel.values()) / len(rel),
           "first_step_rel_diff": rel[first], "max_abs_diff": max(abs(b[s] - a[s]) for s in steps),
           "final_loss": b[steps[-1]], "ref_final_loss": a[steps[-1]], "ref_loss_drop": drop,
           "rtol": LOSS_RTOL}
    band = LOSS_RTOL * a[min(a)]
    res["drop_over_band"] = drop / band if band else None
    res["ok"] = bool(res["max_rel_diff"] <= LOSS_RTOL and (r.get("resumed_from_step") or rel[first] <= STEP1_RTOL))
    return res


def gib(x):
    return None if x is None else x / 2**30


def rank_mem(r: dict, key: str, field: str):
    vals = [(rk.get(key) or {}).get(field) for rk in r.get("ranks", [])]
    return [v for v in vals if v is not None]


def analyse(data: dict, reference: str) -> dict:
    runs, rep = data["runs"], {"checks": [], "rows": []}
    ref = runs.get(reference)
    digests = {n: r.get("selection_digest") for n, r in runs.items() if r.get("selection_digest")}

    def check(name, ok, detail):
        rep["checks"].append({"check": name, "ok": bool(ok), "detail": detail})

    for name in sorted(runs, key=lambda n: ORDER.index(n) if n in ORDER else 99):
        r = runs[name]
        if "merge_check" in r:
            continue
        t = r.get("timing", {})
        peak = rank_mem(r, "mem_end", "peak_allocated_bytes")
        states = rank_mem(r, "mem_after_last_step", "allocated_bytes")
        opt = [rk.get("slice_optimizer", {}) for rk in r.get("ranks", [])]
        opt_bytes = [o.get("state_bytes") for o in opt if o.get("state_bytes") is not None]
        row = {"run": name, "label": LABELS.get(name, name), "launcher": r.get("launcher"), "gpus": r.get("world_size"),
               "ga": r.get("grad_accum"), "micro_batch": r.get("per_device_batch"), "global_batch": r.get("global_batch"),
               "steps": len(r.get("losses", [])), "final_loss": (r.get("losses") or [{}])[-1].get("loss"),
               "tok_s": t.get("tok_s"), "tok_s_per_gpu": t.get("tok_s_per_gpu"),
               "peak_gib_max": gib(max(peak)) if peak else None, "states_gib_max": gib(max(states)) if states else None,
               "opt_state_mib_per_rank": (max(opt_bytes) / 2**20) if opt_bytes else None,
               "optimizer": ">".join(r.get("optimizer_chain", [])), "wall_s": t.get("wall_s")}
        if ref is not None and name != reference and comparable(r, ref):
            lm = loss_match(r, ref)
            row["max_rel_loss_diff"] = lm.get("max_rel_diff")
            row["loss_match"] = lm
            check(f"loss curve {name} vs {reference}", lm["ok"],
                  f"{lm['steps']} steps, max rel diff {lm.get('max_rel_diff', float('nan')):.2e} (step "
                  f"{lm.get('max_rel_step')}), mean {lm.get('mean_rel_diff', float('nan')):.2e}, step {lm.get('first_step')}: "
                  f"{lm.get('first_step_rel_diff', float('nan')):.2e}; tolerance {LOSS_RTOL:.2e}; reference loss drop "
                  f"{lm.get('ref_loss_drop', 0):.3f} = {lm.get('drop_over_band') or 0:.0f}x the band")
        av = r.get("adapter_vs_single_gpu")
        if av and av.get("same_tensors"):
            row["adapter_rel_diff"] = av["rel_l2_diff"]
        check(f"{name}: SliceAdamW is the optimizer", r.get("slice_adamw"), row["optimizer"])
        check(f"{name}: same neurons on every rank", r.get("same_selection_on_all_ranks"), r.get("selection_digest"))
        if opt_bytes and r.get("trainable_params"):
            limit = 2 * 4 * r["trainable_params"]  # Adam: two fp32 moments per selected weight
            check(f"{name}: slice optimizer state per GPU <= 2 x trainable params x 4 B", max(opt_bytes) <= limit * 1.001,
                  f"per rank {', '.join(f'{b / 2**20:.1f}' for b in opt_bytes)} MiB vs {limit / 2**20:.1f} MiB "
                  f"(AdamW on the full model: {2 * 4 * (r.get('model_params') or 0) / 2**30:.1f} GiB)")
        rep["rows"].append(row)

    if ref is not None:
        a = curve(ref)
        if a:
            drop, band = a[min(a)] - min(a.values()), LOSS_RTOL * a[min(a)]
            check("the loss band can fail: reference loss drop >= 10x the band", drop >= 10 * band,
                  f"{reference} loss {a[min(a)]:.3f} -> min {min(a.values()):.3f} (drop {drop:.3f}) vs band "
                  f"±{band:.3f} ({drop / band:.1f}x)")
    if len(set(digests.values())) > 1:
        check("all runs train the same neurons", False, digests)
    elif digests:
        check("all runs train the same neurons", True, next(iter(digests.values())))

    rows = {row["run"]: row for row in rep["rows"]}
    s, z = rows.get(reference), rows.get("zero3")
    if s and z and s.get("tok_s") and z.get("tok_s"):
        same_micro = s["micro_batch"] == z["micro_batch"]
        rep["zero3_speedup"] = z["tok_s"] / s["tok_s"]
        check("ZeRO-3 2 GPUs >= 1.8x single-GPU tok/s", rep["zero3_speedup"] >= 1.8,
              f"{rep['zero3_speedup']:.2f}x ({z['tok_s']:,.0f} vs {s['tok_s']:,.0f} tok/s; micro-batch per GPU "
              f"{z['micro_batch']} vs {s['micro_batch']}{'' if same_micro else ' - NOT equal'}; GA {z['ga']} vs {s['ga']})")
    if s and z and s.get("states_gib_max") and z.get("states_gib_max"):
        rep["zero3_state_ratio"] = z["states_gib_max"] / s["states_gib_max"]
        check("ZeRO-3 model states per GPU ~ 1/2 of single GPU", rep["zero3_state_ratio"] <= 0.6,
              f"{z['states_gib_max']:.2f} vs {s['states_gib_max']:.2f} GiB ({rep['zero3_state_ratio']:.2f}x)")

    res = runs.get("two_node_zero3_resume", {})
    av = res.get("adapter_vs_reference")
    if av:
        rep["resume"] = av
        check("two-node: resumed final adapter == uninterrupted (same neurons, rel L2 diff <= 2^-7)",
              av["same_selection"] and av["rel_l2_diff"] <= LOSS_RTOL,
              f"bitwise {av['bitwise_identical']}, rel L2 diff {av['rel_l2_diff']:.2e}, max abs {av['max_abs_diff']:.2e}")
        tn = runs.get("two_node_zero3")
        if tn:
            lm = loss_match(res, tn)
            check("two-node: resumed steps' losses == uninterrupted run's", lm["ok"],
                  f"steps {lm.get('first_step')}..: max rel diff {lm.get('max_rel_diff', float('nan')):.2e}")
    mc = runs.get("merge_check", {}).get("merge_check")
    if mc:
        rep["merge_check"] = mc
        check("merge_sparse(fresh base + adapter) logits == sliced model's (fp32, rel <= 1e-4)", mc.get("ok"),
              f"fp32 rel {mc['fp32']['rel_logit_diff']:.1e} max abs {mc['fp32']['max_abs_logit_diff']:.1e}; "
              f"bf16 rel {mc['bf16']['rel_logit_diff']:.1e}; unselected rows byte-identical "
              f"{mc['fp32']['unselected_rows_byte_identical']}; adapter moves logits by {mc['fp32']['adapter_changes_logits']:.2f}")
    for name, st in data.get("status", {}).items():
        if st.get("rc") not in (0, "0"):
            check(f"run {name} finished", False, f"rc {st.get('rc')} after {st.get('seconds')} s {st.get('note', '')}")
    return rep


# ---- reporting ---------------------------------------------------------------------------------------------------
def fmt(x, spec):
    return "–" if x is None else format(x, spec)


def markdown(rep: dict, data: dict) -> str:
    any_run = next(iter(data["runs"].values()), {})
    v = any_run.get("versions", {})
    lines = [f"Random-init Llama {any_run.get('model')} ({fmt(any_run.get('model_params'), ',')} params, {any_run.get('dtype')}), "
             f"seq {any_run.get('seq_len')}, {any_run.get('neurons_per_layer')} rows/layer ({any_run.get('importance')}), "
             f"{fmt(any_run.get('trainable_params'), ',')} trainable; {v.get('gpu', 'cpu')}, torch {v.get('torch')}, "
             f"transformers {v.get('transformers')}, deepspeed {v.get('deepspeed')}, accelerate {v.get('accelerate')}.",
             "",
             "| run | GPUs | micro-batch × GA | final loss | max rel. loss diff vs 1 GPU | adapter rel. diff vs 1 GPU "
             "| peak mem / GPU (GiB) | model states / GPU (GiB) | slice Adam state / GPU (MiB) | tok/s | tok/s / GPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        lines.append(f"| {r['label']} | {r['gpus']} | {r['micro_batch']} × {r['ga']} | {fmt(r['final_loss'], '.4f')} | "
                     f"{fmt(r.get('max_rel_loss_diff'), '.1e')} | {fmt(r.get('adapter_rel_diff'), '.1e')} | "
                     f"{fmt(r['peak_gib_max'], '.2f')} | {fmt(r['states_gib_max'], '.2f')} | "
                     f"{fmt(r['opt_state_mib_per_rank'], '.1f')} | {fmt(r['tok_s'], ',.0f')} | {fmt(r['tok_s_per_gpu'], ',.0f')} |")
    lines.append("")
    if "zero3_speedup" in rep:
        lines.append(f"ZeRO-3 on 2 GPUs vs 1 GPU (equal micro-batch per GPU): **{rep['zero3_speedup']:.2f}× tok/s**"
                     + (f", model states per GPU {rep['zero3_state_ratio']:.2f}×." if "zero3_state_ratio" in rep else "."))
    lines.append(f"Loss tolerance: {LOSS_RTOL:.2e} relative per step (bf16 machine epsilon); step 1 within {STEP1_RTOL:.2e}.")
    lines += ["", "| check | ok | detail |", "|---|---|---|"]
    for c in rep["checks"]:
        lines.append(f"| {c['check']} | {'✅' if c['ok'] else '❌'} | {str(c['detail']).replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def plot(data: dict, rep: dict, path: str, reference: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return False
    runs = data["runs"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    ref = curve(runs[reference]) if reference in runs else {}
    for name in sorted(runs, key=lambda n: ORDER.index(n) if n in ORDER else 99):
        c = curve(runs[name])
        if not c:
            continue
        xs = sorted(c)
        ax.plot(xs, [c[x] for x in xs], label=LABELS.get(name, name).strip(),
                lw=2.5 if name == reference else 1.2, ls="-" if name == reference else "--")
        if ref and name != reference:
            xs2 = [x for x in xs if x in ref and (not runs[name].get("resumed_from_step") or x > runs[name]["resumed_from_step"])]
            ax2.plot(xs2, [(c[x] - ref[x]) / ref[x] for x in xs2], label=LABELS.get(name, name).strip())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("loss, same weights / data / global batch")
    ax.legend(fontsize=7)
    for y in (LOSS_RTOL, -LOSS_RTOL):
        ax2.axhline(y, color="k", ls=":", lw=1)
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel(f"(loss - loss_{reference}) / loss_{reference}")
    ax2.set_title("relative difference vs 1 GPU (band ±2^-7)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def print_table(rep: dict) -> None:
    hdr = f"{'run':<24}{'GPUs':>5}{'mb×GA':>7}{'loss':>9}{'maxrelΔ':>10}{'adapΔ':>9}{'peakGiB':>9}{'statesGiB':>10}{'optMiB':>8}{'tok/s':>10}{'tok/s/GPU':>10}{'wall s':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in rep["rows"]:
        print(f"{r['run']:<24}{fmt(r['gpus'], 'd'):>5}{str(r['micro_batch']) + '×' + str(r['ga']):>7}"
              f"{fmt(r['final_loss'], '.4f'):>9}{fmt(r.get('max_rel_loss_diff'), '.1e'):>10}"
              f"{fmt(r.get('adapter_rel_diff'), '.1e'):>9}{fmt(r['peak_gib_max'], '.2f'):>9}"
              f"{fmt(r['states_gib_max'], '.2f'):>10}{fmt(r['opt_state_mib_per_rank'], '.1f'):>8}"
              f"{fmt(r['tok_s'], ',.0f'):>10}{fmt(r['tok_s_per_gpu'], ',.0f'):>10}{fmt(r['wall_s'], '.0f'):>8}")
    if "zero3_speedup" in rep:
        print(f"ZeRO-3 2-GPU / 1-GPU tok/s: {rep['zero3_speedup']:.2f}x")
    for c in rep["checks"]:
        print(f"[{'PASS' if c['ok'] else 'FAIL'}] {c['check']}: {c['detail']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="?", help="merged results JSON, or a folder of <run>/result.json")
    p.add_argument("--collect", metavar="RUNS_DIR", help="merge RUNS_DIR/*/result.json (+ adapter diffs) ...")
    p.add_argument("--status", help="... with this status.tsv (name, rc, seconds, note) ...")
    p.add_argument("--write", help="... into this JSON")
    p.add_argument("--no_adapters", action="store_true", help="... without the adapter diffs (fast: no torch import)")
    p.add_argument("--reference", default="single_gpu")
    p.add_argument("--markdown", help="write the Markdown tables here")
    p.add_argument("--plot", help="write the loss-curve plot here (needs matplotlib)")
    p.add_argument("--strict", action="store_true", help="exit 1 if a check fails")
    a = p.parse_args(argv)
    if a.collect:
        data = collect(a.collect, a.status, a.reference, adapters=not a.no_adapters)
        if a.write:
            with open(a.write, "w") as f:
                json.dump(data, f, indent=1)
        if not a.results and not a.markdown:
            return 0
    else:
        if not a.results:
            p.error("give RESULTS or --collect")
        data = load(a.results)
    if not data["runs"]:
        print("no runs found", file=sys.stderr)
        return 1
    rep = analyse(data, a.reference)
    print_table(rep)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(markdown(rep, data))
    if a.plot:
        plot(data, rep, a.plot, a.reference)
    return 1 if a.strict and not all(c["ok"] for c in rep["checks"]) else 0


if __name__ == "__main__":
    sys.exit(main())
