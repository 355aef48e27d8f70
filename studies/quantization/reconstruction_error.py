#!/usr/bin/env python
"""How far the quantized starting point is from the full-precision weight: ||W - W_hat||_F and ||W - W_hat||_*
for QLoRA (W_hat = dequant(Q(W)), adapter starts at 0), LoftQ (PEFT's loftq_init, 1 and 5 alternations) and ours
(NF4 base + k rows started at the residual, so W_hat[I] = W[I]) at the same trainable-parameter budget
(k rows * d_in = r * (d_in + d_out)). Ratios are against QLoRA: 1 - ratio is the error reduction.

Launch
------
# CPU (a minute): random-init SmolLM2-135M shapes, and real SmolLM2 layer 0 from the GGUF
python studies/quantization/reconstruction_error.py --out outputs/quant/recon_cpu_random.json
python studies/quantization/reconstruction_error.py --gguf .m/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
    --layers 0 --out outputs/quant/recon_cpu_smollm2_l0.json
# GPU: every SmolLM2 layer, and random-init Llama-2-7B shapes (PEFT's loftq_init itself runs there)
python studies/quantization/reconstruction_error.py --gguf /tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf --layers all \
    --out $OUT/recon_smollm2.json
python studies/quantization/reconstruction_error.py --shapes llama2-7b --out $OUT/recon_llama2_7b.json

PEFT's loftq_init pins its work to cuda/xpu: on a GPU the script calls it; on a CPU it runs a line-for-line port
(PEFT's own `_low_rank_decomposition`, the same bitsandbytes NF4 calls). On a GPU the port also runs on the first
matrix and its largest difference from PEFT is recorded (loftq_T1_port_vs_peft_max_abs).
Caveat for --gguf: SmolLM2's GGUF holds Q4_1 weights, so "full precision" there is a dequantized 4-bit grid.
"""
from __future__ import annotations

import argparse
import time

import torch

from matrices import (add_matrix_args, device_of, effective_weight, environment, errors, lora_rank,
                      matrices_from_args, nf4, residual_rows, sparse_corrected, write_json)


def loftq_port(weight: torch.Tensor, rank: int, num_iter: int) -> torch.Tensor:
    """W_hat = dequant(Q(W - L R)) + L R, exactly as peft.utils.loftq_utils.loftq_init computes it (4 bits)."""
    from peft.utils.loftq_utils import _low_rank_decomposition
    residual = weight
    for i in range(num_iter):
        dequantized = nf4(residual)
        low_rank = _low_rank_decomposition(weight - dequantized, reduced_rank=rank)
        L, R = low_rank["L"], low_rank["R"]
        if i + 1 == num_iter:
            break
        residual = weight - L @ R
    return dequantized + L @ R


def loftq_peft(weight: torch.Tensor, rank: int, num_iter: int) -> torch.Tensor:
    from peft.utils.loftq_utils import loftq_init
    dequantized, lora_A, lora_B = loftq_init(weight, num_bits=4, reduced_rank=rank, num_iter=num_iter)
    return dequantized.float() + lora_B @ lora_A


def measure(weight: torch.Tensor, k: int, check_port: bool = False) -> dict:
    """Errors of every method on one matrix. On a GPU LoftQ is PEFT's loftq_init itself (`check_port`: the CPU
    port next to it, for the record); on a CPU the port."""
    d_out, d_in = weight.shape
    k = min(k, d_out)
    r = lora_rank(d_out, d_in, k)
    loftq = loftq_peft if weight.is_cuda else loftq_port
    approx = {"qlora": nf4(weight)}
    for t in (1, 5):
        approx[f"loftq_T{t}"] = loftq(weight, r, t)
    approx["ours_l2"] = effective_weight(sparse_corrected(weight, k)[1])
    approx["ours_best_rows"] = effective_weight(sparse_corrected(weight, k, residual_rows(weight, k))[1])
    row = {"shape": [d_out, d_in], "rows": k, "lora_rank": r, "params_ours": k * d_in, "params_lora": r * (d_in + d_out),
           "loftq": "peft.utils.loftq_utils.loftq_init" if weight.is_cuda else "CPU port of loftq_init",
           "methods": {name: errors(weight, w_hat) for name, w_hat in approx.items()}}
    if weight.is_cuda and check_port:
        row["loftq_T1_port_vs_peft_max_abs"] = (loftq_port(weight, r, 1) - approx["loftq_T1"]).abs().max().item()
    base = row["methods"]["qlora"]
    for m in row["methods"].values():
        m["fro_ratio"], m["nuc_ratio"] = m["fro"] / base["fro"], m["nuc"] / base["nuc"]
    return row


def summary(rows: dict) -> dict:
    """Per method: total Frobenius error over all matrices (sqrt of summed squares), summed nuclear error, both
    as ratios to QLoRA, and the mean per-matrix ratios."""
    methods = next(iter(rows.values()))["methods"]
    out = {}
    for m in methods:
        fro = sum(r["methods"][m]["fro"] ** 2 for r in rows.values()) ** 0.5
        nuc = sum(r["methods"][m]["nuc"] for r in rows.values())
        out[m] = {"fro_total": fro, "nuc_total": nuc,
                  "mean_fro_ratio": sum(r["methods"][m]["fro_ratio"] for r in rows.values()) / len(rows),
                  "mean_nuc_ratio": sum(r["methods"][m]["nuc_ratio"] for r in rows.values()) / len(rows)}
    for m in out:
        out[m]["fro_total_ratio"] = out[m]["fro_total"] / out["qlora"]["fro_total"]
        out[m]["nuc_total_ratio"] = out[m]["nuc_total"] / out["qlora"]["nuc_total"]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_matrix_args(parser)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    device = device_of(args.device)
    t0 = time.perf_counter()
    rows = {}
    for name, weight in matrices_from_args(args, device).items():
        rows[name] = measure(weight, args.rows, check_port=not rows)
        m = rows[name]["methods"]
        print(f"{name:28s} {str(tuple(weight.shape)):14s} k={rows[name]['rows']:<4d} r={rows[name]['lora_rank']:<4d} "
              + "  ".join(f"{n}={v['fro_ratio']:.3f}/{v['nuc_ratio']:.3f}" for n, v in m.items() if n != "qlora"),
              flush=True)
    total = summary(rows)
    print(f"\n{'method':18s} {'||W-W^||_F':>12s} {'ratio':>7s} {'||W-W^||_*':>12s} {'ratio':>7s}   (totals over "
          f"{len(rows)} matrices; ratio to QLoRA, lower is better)")
    for m, v in total.items():
        print(f"{m:18s} {v['fro_total']:12.4f} {v['fro_total_ratio']:7.4f} {v['nuc_total']:12.2f} {v['nuc_total_ratio']:7.4f}")
    write_json(args.out, {"args": vars(args), "env": environment(device), "seconds": time.perf_counter() - t0,
                          "summary": total, "matrices": rows})
    return total


if __name__ == "__main__":
    main()
