#!/usr/bin/env python
"""Bytes autograd keeps for backward after one training forward, method by method, at a real model's layer shape
(CPU is enough: it reads the saved tensors off the graph, no allocator statistics needed). What rows save on top of
the frozen floor, and what recompute_slice_inputs gives back, per token and decoder layer:

    python benchmarks/saved_bytes.py --shape llama2-7b --layers 2 --tokens 256     # CPU, ~1 min

The floor's embedding output requires grad (so every layer has a backward), the other methods' does not (as in
run_all.py); the difference per token and layer is taken between the model with `--layers` and with one layer
less, so the embedding, head and loss cancel out."""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.measure import prepared_method  # noqa: E402
from benchmarks.methods import MethodSpec, main_methods  # noqa: E402
from benchmarks.shapes import llama_config, random_batch  # noqa: E402


def kept_bytes(loss: torch.Tensor, model: torch.nn.Module) -> int:
    """Bytes of the distinct storages autograd holds for the backward of `loss`, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, stack, storages = set(), [loss.grad_fn], {}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        tensors = list(getattr(node, "saved_tensors", ()))  # custom autograd Functions
        for name in dir(node):
            if name.startswith("_saved_"):
                value = getattr(node, name, None)
                tensors += [value] if torch.is_tensor(value) else \
                    [t for t in value if torch.is_tensor(t)] if isinstance(value, (list, tuple)) else []
        for t in tensors:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                storages[storage.data_ptr()] = storage.nbytes()
        stack += [f for f, _ in node.next_functions]
    return sum(storages.values())


MEASURED = ("floor", "ours_rows_fp32", "ours_rows_fp32_recompute", "ours_cols_fp32")  # of the main comparison


def methods(r: int) -> list[MethodSpec]:
    return [m for m in main_methods(r) if m.name in MEASURED]


def measure(shape: str, layers: int, tokens: int, r: int, dtype: torch.dtype, autocast: bool) -> dict[str, int]:
    from transformers import AutoModelForCausalLM
    config = llama_config(shape)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    batch = random_batch(config.vocab_size, 1, tokens, torch.device("cpu"))
    out = {}
    for spec in methods(r):
        with prepared_method(model, spec, False, 1e-5) as prepared, \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = prepared.model(**batch).loss
            out[spec.name] = kept_bytes(loss, model)
            del loss
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers built (>= 2)")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--no-autocast", action="store_true")
    ap.add_argument("--out", default=None, help="also write the numbers as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    dtype, autocast = getattr(torch, args.dtype), not args.no_autocast
    full = measure(args.shape, args.layers, args.tokens, args.r, dtype, autocast)
    less = measure(args.shape, args.layers - 1, args.tokens, args.r, dtype, autocast)
    per = {m: (full[m] - less[m]) / args.tokens for m in full}  # bytes per token and decoder layer
    print(f"{args.shape}, {args.dtype} weights, autocast {'on' if autocast else 'off'}, r = {args.r}: bytes autograd "
          "keeps per token and decoder layer")
    print("| method | bytes / token / layer | × floor | − floor |\n|---|---:|---:|---:|")
    for m, v in per.items():
        print(f"| {m} | {v:,.0f} | {v / per['floor']:.3f} | {v - per['floor']:+,.0f} |")
    result = {"args": vars(args), "per_token_layer": per, "total_bytes": full}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
