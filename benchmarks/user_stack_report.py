"""The user-stack benchmark's results: checks (loss against the plain run, the same batches, compiled slices against
eager ones), ratios ours / LoRA and ours / floor, item 5's targets, and the Markdown table."""
from __future__ import annotations

import math
from typing import Optional

from .user_stack_plan import SWITCH_LABELS, SWITCHES, switch_on, twin_key

OK = "ok"
CSV_COLUMNS = ["key", "model", "layers", "batch", "seq", "switch", "method", "status", "gpu", "peak_gib",
               "peak_bytes", "peak_bytes_process", "model_bytes", "tokens_per_s", "tokens_per_s_span", "step_s_median",
               "peak_x_lora", "tps_x_lora", "peak_x_floor", "tps_x_floor", "loss_first", "loss_last",
               "loss_max_rel_diff_vs_plain", "loss_ok", "same_batches_as_plain", "rebuild_state",
               "slices_max_rel_diff_vs_eager", "slices_ok", "trainable_params", "params_with_grad_at_step_1",
               "trainable_tensors", "build_s", "prepare_s", "train_s", "wall_s", "torch", "transformers", "peft",
               "liger_kernel", "bitsandbytes", "error"]


def _ok(row: Optional[dict]) -> bool:
    return row is not None and row.get("status") == OK


def _same_machine(a: dict, b: dict) -> bool:
    return a.get("gpu") == b.get("gpu")


def _ratio(a: Optional[dict], b: Optional[dict], field: str) -> Optional[float]:
    if not (_ok(a) and _ok(b) and _same_machine(a, b)) or a.get(field) is None or not b.get(field):
        return None
    return a[field] / b[field]


def max_rel_diff(values: list[float], reference: list[float]) -> Optional[float]:
    """Largest |a - b| / |b| over the steps both have; inf when any value is not finite; None when none overlap."""
    pairs = list(zip(values, reference))
    if not pairs:
        return None
    if not all(math.isfinite(a) and math.isfinite(b) for a, b in pairs):
        return math.inf
    return max(abs(a - b) / max(abs(b), 1e-12) for a, b in pairs)


def add_checks(rows: list[dict], loss_rtol: float, nf4_loss_rtol: float) -> None:
    """Per ok row: its per-step losses against the same method's plain run on the same batches (and whether the
    batches were the same), and, for ours, the ratios to LoRA and the floor with the same switch. An NF4 base is
    another model than the bf16 one: its losses are judged against `nf4_loss_rtol` (a gross error only)."""
    by_key = {r["key"]: r for r in rows}
    for r in rows:
        for field in ("peak_x_lora", "tps_x_lora", "peak_x_floor", "tps_x_floor", "loss_max_rel_diff_vs_plain",
                      "loss_ok", "same_batches_as_plain"):
            r.pop(field, None)
        if not _ok(r):
            continue
        losses = r.get("losses") or []
        r["loss_first"], r["loss_last"] = (losses[0], losses[-1]) if losses else (None, None)
        plain = by_key.get(twin_key(r["key"]))
        if _ok(plain) and losses:
            diff = max_rel_diff(losses, plain.get("losses") or [])
            r["loss_max_rel_diff_vs_plain"] = diff
            rtol = nf4_loss_rtol if switch_on(r["switch"], "nf4") else loss_rtol
            r["loss_ok"] = diff is not None and diff <= rtol and all(math.isfinite(x) for x in losses)
            r["same_batches_as_plain"] = r.get("batch_fingerprints") == plain.get("batch_fingerprints")
        if r["method"] == "ours":
            lora = by_key.get(twin_key(r["key"], r["switch"], "lora"))
            floor = by_key.get(twin_key(r["key"], r["switch"], "floor"))
            r["peak_x_lora"], r["tps_x_lora"] = _ratio(r, lora, "peak_bytes"), _ratio(r, lora, "tokens_per_s")
            r["peak_x_floor"], r["tps_x_floor"] = _ratio(r, floor, "peak_bytes"), _ratio(r, floor, "tokens_per_s")


def compare_slices(compiled: dict, eager: dict, rtol: float) -> dict:
    """Per slice ||compiled - eager|| / ||eager|| after the same steps (name -> tensor, as load_file gives them); ok
    when every slice moved and the largest relative difference is at most `rtol`."""
    import torch

    c, e = compiled, eager
    if c.keys() != e.keys():
        return {"ok": False, "error": f"different slices: {sorted(c.keys() ^ e.keys())[:4]}"}
    diffs = {n: float((c[n] - e[n]).norm() / e[n].norm().clamp_min(1e-30)) for n in e}
    moved = sum(bool(c[n].abs().sum() > 0) for n in c)
    worst = max(diffs, key=diffs.get)
    out = {"slices": len(diffs), "moved": moved, "max_rel_diff": diffs[worst], "worst_slice": worst,
           "median_rel_diff": float(torch.tensor(list(diffs.values())).median()), "rtol": rtol}
    out["ok"] = moved == len(diffs) and diffs[worst] <= rtol
    return out


def judge_compiled_slices(compiled: str, eager: str, truth: Optional[str], rtol: float) -> dict:
    """compare_slices(compiled, eager) of the saved slices at these paths and, with the fp32 truth's slices, each
    run's largest per-slice distance from it: ok when every slice moved and the compiled slices are within `rtol` of
    the eager ones, or no farther from the truth than twice the eager run is (studies/torch_compile's criterion: bf16
    noise grows with the steps, so a fixed rtol cannot tell it from a miss; eager bf16 is as far from fp32 as a sound
    compiled run should be). Each file is read once."""
    from safetensors.torch import load_file

    c, e = load_file(compiled), load_file(eager)
    out = compare_slices(c, e, rtol)
    if truth is not None and "max_rel_diff" in out:
        t = load_file(truth)
        to_c, to_e = compare_slices(c, t, math.inf), compare_slices(e, t, math.inf)
        if "max_rel_diff" not in to_c:  # a truth of other slices: the rtol alone decides
            return {**out, "truth_error": to_c["error"]}
        err_c, err_e = to_c["max_rel_diff"], to_e["max_rel_diff"]
        out.update(err_compiled_vs_fp32=err_c, err_eager_vs_fp32=err_e,
                   ok=out["moved"] == out["slices"] and (out["ok"] or err_c <= 2 * err_e))
    return out


def _at(r: dict) -> str:
    layers = f" ({r['layers']} layers)" if r.get("layers") else ""
    return f"{r['model']}{layers} {r['batch']}x{r['seq']}"


def targets(rows: list[dict]) -> list[dict]:
    """Item 5's targets on every ours row measured: with checkpointing peak <= 0.97x LoRA r16's (QLoRA's on the NF4
    base); tokens/s >= 1.2x LoRA's in every column; without checkpointing tokens/s >= 0.95x the floor's."""
    out = []

    def add(target, r, field, bound, upper):
        value = r.get(field)
        out.append({"target": target, "where": f"{_at(r)} {r['switch']}", "key": r["key"], "value": value,
                    "bound": bound, "met": None if value is None else (value <= bound if upper else value >= bound)})

    for r in rows:
        if r["method"] != "ours":
            continue
        if r["switch"] == "ckpt":
            add("checkpointing: peak <= 0.97x LoRA r16's", r, "peak_x_lora", 0.97, True)
        if r["switch"] == "nf4_ckpt":
            add("NF4 base + checkpointing: peak <= 0.97x QLoRA's", r, "peak_x_lora", 0.97, True)
        add("tokens/s >= 1.2x LoRA r16's (every column)", r, "tps_x_lora", 1.2, False)
        if not switch_on(r["switch"], "checkpointing"):
            add("no checkpointing: tokens/s >= 0.95x the floor's", r, "tps_x_floor", 0.95, False)
    return out


# ---- Markdown ---------------------------------------------------------------------------------------------------

def _status(r: Optional[dict]) -> str:
    if r is None:
        return "—"
    s = r.get("status", "")
    return "OOM" if s == "oom" else s.split(":")[0]  # error / skipped (the reason: under "Not measured")


def _gib(r):
    return f"{r['peak_bytes'] / 2**30:.2f}" if _ok(r) and r.get("peak_bytes") is not None else (
        "n/a" if _ok(r) else _status(r))


def _tps(r):
    return f"{r['tokens_per_s']:,.0f}" if _ok(r) else _status(r)


def _x(value):
    return "—" if value is None else f"{value:.3f}"


def _loss_cell(rows_by_method: dict, switch: str) -> str:
    if switch == "plain":
        return "(the reference)"
    parts = []
    for method, name in (("ours", "ours"), ("lora", "LoRA"), ("floor", "floor")):
        r = rows_by_method.get(method)
        if _ok(r) and r.get("loss_max_rel_diff_vs_plain") is not None:
            flag = "" if r.get("loss_ok") else " OFF"
            batches = "" if r.get("same_batches_as_plain") else " (other batches)"
            parts.append(f"{name} {r['loss_max_rel_diff_vs_plain']:.1e}{flag}{batches}")
    return ", ".join(parts) or "—"


def _slices_cell(r: Optional[dict]) -> str:
    s = (r or {}).get("slices_vs_eager")
    if not s:
        return "—" if not (r and switch_on(r["switch"], "compile")) else "not compared"
    if "max_rel_diff" not in s:
        return f"not compared: {s.get('error', '')}"
    truth = (f"; from fp32: compiled {s['err_compiled_vs_fp32']:.3f}, eager {s['err_eager_vs_fp32']:.3f}"
             if "err_compiled_vs_fp32" in s else "")
    return f"{s['max_rel_diff']:.3f} max ({s['moved']}/{s['slices']} moved{truth}) {'ok' if s['ok'] else 'OFF'}"


def group_table(rows: list[dict]) -> str:
    """One configuration group (model, layers, shape): a line per switch."""
    head = ("| switch | ours peak GiB | LoRA peak GiB | floor peak GiB | ours ÷ LoRA peak | ours tok/s | LoRA tok/s "
            "| floor tok/s | ours ÷ LoRA tok/s | ours ÷ floor tok/s | max loss diff vs plain | input rebuild (ours) "
            "| compiled slices vs eager |")
    out = [head, "|---|" + "---:|" * 9 + "---|---|---|"]
    for switch in SWITCHES:
        m = {r["method"]: r for r in rows if r["switch"] == switch}
        if not m:
            continue
        ours, lora, floor = m.get("ours"), m.get("lora"), m.get("floor")
        label = SWITCH_LABELS[switch] + (" (LoRA = QLoRA)" if switch_on(switch, "nf4") else "")
        rebuild = (ours or {}).get("rebuild", {}).get("state", "—") if _ok(ours) else "—"
        out.append(f"| {label} | {_gib(ours)} | {_gib(lora)} | {_gib(floor)} | {_x((ours or {}).get('peak_x_lora'))} "
                   f"| {_tps(ours)} | {_tps(lora)} | {_tps(floor)} | {_x((ours or {}).get('tps_x_lora'))} "
                   f"| {_x((ours or {}).get('tps_x_floor'))} | {_loss_cell(m, switch)} | {rebuild} "
                   f"| {_slices_cell(ours)} |")
    return "\n".join(out)


def markdown(doc: dict) -> str:
    rows = doc["configs"]
    settings = doc["meta"].get("settings", {})
    lines = ["# User-stack table: ours (default config, l2 rows r = {r}) against PEFT LoRA r{lora_r} through the "
             "Trainer".format(r=settings.get("r", 64), lora_r=settings.get("lora_r", 16)), ""]
    lines.append(f"Commands: {'; '.join(c['command'] for c in doc['meta'].get('calls', []))}")
    lines.append(f"Loss tolerance against the plain run: {settings.get('loss_rtol')} (relative, per step; NF4 base: "
                 f"{settings.get('nf4_loss_rtol')}, another model); compiled "
                 f"slices against eager: {settings.get('slice_rtol')} (relative, per slice), or beyond it no farther "
                 "from the fp32 truth than twice the eager run (where the truth ran). Ratios only between runs on the "
                 "same GPU model.")
    groups = list(dict.fromkeys((r["model"], r.get("layers"), r["batch"], r["seq"]) for r in rows))
    for model, layers, b, t in groups:
        g = [r for r in rows if (r["model"], r.get("layers"), r["batch"], r["seq"]) == (model, layers, b, t)]
        gpus = sorted({r["gpu"] for r in g if _ok(r)})
        versions = sorted({f"torch {r['torch']}, transformers {r['transformers']}, peft {r['peft']}"
                           for r in g if _ok(r)})
        lines += ["", f"## {model}{f' ({layers} layers)' if layers else ''}, batch {b} × {t}", "",
                  f"{', '.join(gpus) or 'no run finished'}; {'; '.join(versions)}", "", group_table(g)]
        same = {r.get("same_batches_as_plain") for r in g if r.get("same_batches_as_plain") is not None}
        if same:
            lines.append(f"\nSame batches as the plain run in every compared run: {'yes' if same == {True} else 'NO'}.")
    lines += ["", "## Targets (item 5)", ""]
    found = doc.get("targets") or targets(rows)
    if not found:
        lines.append("No ours run measured yet.")
    for t in found:
        verdict = "not measured" if t["met"] is None else "**met**" if t["met"] else "**missed**"
        value = "—" if t["value"] is None else f"{t['value']:.3f}"
        lines.append(f"- {t['target']}: {t['where']}: {value} (bound {t['bound']}) {verdict}")
    problems = [r for r in rows if r.get("status") in ("error", "oom") or str(r.get("status")).startswith("skipped")]
    if problems:
        lines += ["", "## Not measured", ""]
        lines += [f"- {r['key']}: {r['status']}{': ' + r['error'] if r.get('error') else ''}" for r in problems]
    return "\n".join(lines) + "\n"
