#!/usr/bin/env python
"""What re-quantizing a merged adapter into 4-bit costs: sprune_trainer's merge_sparse(requantize=True) next to
PEFT's merge_and_unload of a QLoRA adapter on the same NF4 base (PEFT dequantizes, adds and re-quantizes too).

Both adapters carry an update of the same Frobenius norm (`--update_scale` x ||W||_F) and the same parameter
budget: ours on k rows (l2-selected, started at the quantization residual), LoRA as the best rank-r part of the
same random target. Reported per matrix, all fp32 norms:
  requant_error    ||W_merged - dequant(Q(W_merged))||_F   what re-quantization does to the merged model
  requant_rel      requant_error / ||update||_F
  update_kept      <W_final - W_start, update> / ||update||^2   (1 = the update survives re-quantization)
  error_vs_target  ||(W + update) - W_final||_F   distance of the final 4-bit model from the fp model + update
  rows_changed     rows whose 4-bit values differ from the starting base
Model level (--gguf --model_level, GPU): the same kind of update on every projection of the model; on a fixed text
(the repository's README and design notes) the loss of the adapter model and of its re-quantized merge, and the
mean token KL between the two, for both adapters.

Launch
------
# CPU (a minute): random-init SmolLM2-135M shapes
python studies/quantization/merge_requantize.py --out outputs/quant/requant_cpu.json
# GPU: real SmolLM2 matrices, then the model-level loss change; and Llama-2-7B shapes
python studies/quantization/merge_requantize.py --gguf /tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf --layers all \
    --model_level --out $OUT/requant_smollm2.json
python studies/quantization/merge_requantize.py --shapes llama2-7b --out $OUT/requant_llama2_7b.json
"""
from __future__ import annotations

import argparse
import copy
import os
import time

import torch
from torch import nn

from matrices import (PROJECTIONS, add_matrix_args, device_of, environment, lora_rank, load_gguf_model,
                      matrices_from_args, sparse_corrected, write_json)
from sprune_trainer import SparseNeuronConfig, merge_sparse
from sprune_trainer.layers.surgery import quantize_with_sparse_correction, sliced_modules
from sprune_trainer.layers.quantization import bnb_kind, dequantize_weight, quantize_4bit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Quantized(nn.Module):
    """A module PEFT treats as a 4-bit model (it picks its bnb LoRA layer by this flag)."""
    is_loaded_in_4bit = True

    def __init__(self, layers: dict):
        super().__init__()
        self.layers = nn.ModuleDict(layers)


def sparse_update(weight: torch.Tensor, rows: torch.Tensor, scale: float, target: torch.Tensor) -> torch.Tensor:
    """`target` on `rows` only, scaled to Frobenius norm scale * ||W||_F."""
    update = torch.zeros_like(weight)
    update[rows] = target[rows]
    return update * (scale * weight.norm() / update.norm())


def low_rank_update(weight: torch.Tensor, rank: int, scale: float, target: torch.Tensor):
    """(B, A): the best rank-`rank` part of `target` as LoRA factors, B @ A scaled to norm scale * ||W||_F."""
    U, S, Vh = torch.linalg.svd(target, full_matrices=False)
    B, A = U[:, :rank] * S[:rank].sqrt(), S[:rank].sqrt()[:, None] * Vh[:rank]
    factor = (scale * weight.norm() / (B @ A).norm()).sqrt()
    return B * factor, A * factor


def random_target(weight: torch.Tensor, seed: int) -> torch.Tensor:
    """A random "trained" direction, independent of the weights (their seeds are small integers)."""
    return torch.randn(weight.shape, generator=torch.Generator().manual_seed(1_000_003 + seed)).to(weight.device)


def _stats(weight, update, start, merged, final) -> dict:
    return {"requant_error": (merged - final).norm().item(), "requant_rel": ((merged - final).norm() / update.norm()).item(),
            "update_kept": (((final - start) * update).sum() / update.pow(2).sum()).item(),
            "error_vs_target": (weight + update - final).norm().item(),
            "rows_changed": int(((final - start).abs().amax(dim=1) > 0).sum())}


def ours(weight: torch.Tensor, k: int, scale: float, target: torch.Tensor) -> dict:
    model, sliced = sparse_corrected(weight, k)
    start = dequantize_weight(sliced.base_layer)  # the 4-bit base before training
    update = sparse_update(weight, sliced.index, scale, target)
    with torch.no_grad():
        sliced.delta += sliced.select(update)
    merged = sliced.merged_weight(start)
    merge_sparse(model, requantize=True)
    assert bnb_kind(model["proj"]) == "4bit"
    return _stats(weight, update, start, merged, dequantize_weight(model["proj"]))


def _set_lora(layer, B: torch.Tensor, A: torch.Tensor) -> None:
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)


def qlora(weight: torch.Tensor, rank: int, scale: float, target: torch.Tensor) -> dict:
    from peft import LoraConfig, get_peft_model
    base = quantize_4bit(weight, None, quant_type="nf4")
    start = dequantize_weight(base)
    B, A = low_rank_update(weight, rank, scale, target)
    peft_model = get_peft_model(_Quantized({"proj": base}), LoraConfig(r=rank, lora_alpha=rank, target_modules=["proj"]))
    _set_lora(peft_model.base_model.model.layers["proj"], B, A)  # alpha = r: the update is B @ A
    final = dequantize_weight(peft_model.merge_and_unload().layers["proj"])
    return _stats(weight, B @ A, start, start + B @ A, final)


def matrix_level(matrices: dict, k_rows: int, scales: list[float], seed: int) -> dict:
    rows = {}
    for name, weight in matrices.items():
        d_out, d_in = weight.shape
        k = min(k_rows, d_out)
        r = lora_rank(d_out, d_in, k)
        target = random_target(weight, seed)  # both adapters draw their update from the same random target
        entry = {"shape": [d_out, d_in], "rows": k, "lora_rank": r}
        for s in scales:
            entry[f"ours@{s}"] = ours(weight, k, s, target)
            entry[f"qlora@{s}"] = qlora(weight, r, s, target)
        rows[name] = entry
        print(f"{name:28s} k={k:<4d} r={r:<4d} " + "  ".join(
            f"{m}: rel={v['requant_rel']:.3f} kept={v['update_kept']:.3f}" for m, v in entry.items() if "@" in m),
            flush=True)
    return rows


@torch.no_grad()
def _run(model, ids) -> tuple[float, torch.Tensor]:
    """(text loss, next-token log-probabilities) of `model` on `ids`."""
    out = model(input_ids=ids, labels=ids)
    return out.loss.item(), out.logits.float().log_softmax(-1)


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    """Mean per-token KL(p || q)."""
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean().item()


def model_level(path: str, k: int, scale: float, seed: int, device) -> dict:
    """Every projection gets an update of norm scale * ||W||_F (ours: on its k l2 rows; QLoRA: rank r, the same
    parameter count). Reported: text loss of the fp model, of each adapter model (= its fp merge), of its
    re-quantized merge, and the mean token KL(adapter || re-quantized): how much re-quantization changes outputs.
    (Random updates raise the loss, so a lower loss after re-quantization means the update was lost.)"""
    from peft import LoraConfig, get_peft_model
    model, tok = load_gguf_model(path)
    model.to(device).eval()
    text = "\n".join(open(os.path.join(ROOT, f)).read() for f in ("README.md", "design.md")
                     if os.path.exists(os.path.join(ROOT, f)))
    ids = tok(text, return_tensors="pt").input_ids[:, :1024].to(device)
    result = {"tokens": ids.shape[1], "loss_fp": _run(model, ids)[0]}

    ours_model = copy.deepcopy(model)
    quantize_with_sparse_correction(ours_model, SparseNeuronConfig(neurons_per_layer=k, importance="l2"))
    for i, layer in enumerate(sliced_modules(ours_model).values()):
        w = layer.merged_weight(dequantize_weight(layer.base_layer))  # W on the chosen rows, dequant(Q(W)) elsewhere
        with torch.no_grad():
            layer.delta += layer.select(sparse_update(w, layer.index, scale, random_target(w, seed + i)))
    result["ours_loss_adapter"], adapter = _run(ours_model, ids)
    result["ours_loss_requantized"], requantized = _run(merge_sparse(ours_model, requantize=True), ids)
    result["ours_kl_requantized"] = _kl(adapter, requantized)

    targets = [n for n, m in model.named_modules() if n.split(".")[-1] in PROJECTIONS]
    for name in targets:  # the QLoRA base: the same NF4 quantization of every projection
        parent, _, child = name.rpartition(".")
        m = model.get_submodule(name)
        setattr(model.get_submodule(parent), child, quantize_4bit(m.weight, m.bias, quant_type="nf4"))
    model.is_loaded_in_4bit = True  # PEFT picks its bnb LoRA layers by this flag
    ranks = {n: lora_rank(*dequantize_weight(model.get_submodule(n)).shape, k) for n in targets}
    peft_model = get_peft_model(model, LoraConfig(r=k, target_modules=list(PROJECTIONS), rank_pattern=ranks,
                                                  alpha_pattern=ranks))
    for i, name in enumerate(targets):
        layer = peft_model.base_model.model.get_submodule(name)
        w = dequantize_weight(layer.base_layer)
        _set_lora(layer, *low_rank_update(w, ranks[name], scale, random_target(w, seed + i)))
    result["qlora_loss_adapter"], adapter = _run(peft_model, ids)
    result["qlora_loss_requantized"], requantized = _run(peft_model.merge_and_unload(), ids)
    result["qlora_kl_requantized"] = _kl(adapter, requantized)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_matrix_args(parser)
    parser.add_argument("--update_scale", default="0.01,0.05", help="update norm / ||W||_F, comma-separated")
    parser.add_argument("--model_level", action="store_true", help="with --gguf: also the model's text loss")
    args = parser.parse_args(argv)
    device = device_of(args.device)
    scales = [float(s) for s in args.update_scale.split(",")]
    t0 = time.perf_counter()
    rows = matrix_level(matrices_from_args(args, device), args.rows, scales, args.seed)
    summary = {}
    for key in (k for k in next(iter(rows.values())) if "@" in k):
        vals = [r[key] for r in rows.values()]
        summary[key] = {m: sum(v[m] for v in vals) / len(vals) for m in ("requant_rel", "update_kept")}
        summary[key]["requant_error_total"] = sum(v["requant_error"] ** 2 for v in vals) ** 0.5
        summary[key]["error_vs_target_total"] = sum(v["error_vs_target"] ** 2 for v in vals) ** 0.5
    print(f"\n{'adapter@scale':14s} {'requant ||.||_F':>16s} {'mean rel':>9s} {'update kept':>12s} {'vs fp+update':>13s}")
    for key, v in summary.items():
        print(f"{key:14s} {v['requant_error_total']:16.4f} {v['requant_rel']:9.3f} {v['update_kept']:12.3f} "
              f"{v['error_vs_target_total']:13.4f}")
    payload = {"args": vars(args), "env": environment(device), "summary": summary, "matrices": rows}
    if args.model_level:
        if not args.gguf:
            parser.error("--model_level needs --gguf")
        payload["model_level"] = {s: model_level(args.gguf, args.rows, s, args.seed, device) for s in scales}
        for s, v in payload["model_level"].items():
            print(f"model @ {s}: " + ", ".join(f"{k}={x:.4f}" for k, x in v.items() if k != "tokens"))
    payload["seconds"] = time.perf_counter() - t0
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
