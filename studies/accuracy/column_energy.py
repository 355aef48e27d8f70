"""Why do taylor / hessian *columns* lose the answer format when l2 / random / zeroth-order columns keep it?

Training input columns J of W moves a layer's output by dY = X[:, J] dW[J, :]^T: Adam takes steps of about lr per
weight whatever the column, so the output moves in proportion to the activation energy sum_t x_tj^2 of the chosen
columns. This script measures, on the study's own training batches, the share of each layer's input energy that
each criterion's per-layer column selection (the study's budget) carries, against k / d_in for a uniform pick.

    python studies/accuracy/column_energy.py --data_dir ../shared/data/commonsense --batches 8 \
        --out studies/accuracy/results/smollm2/column_energy.json

CPU, SmolLM2-135M-Instruct (offline), ~1 min per data-driven criterion at 8 batches of 16.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "recipes")]

from studies.accuracy import grid  # noqa: E402
from commonsense.modeling import load_model_and_tokenizer, smollm2_offline_dir  # noqa: E402
from commonsense.prompting import tokenize_dataset  # noqa: E402
from commonsense.sources import load_commonsense  # noqa: E402
from sprune_trainer import SparseNeuronConfig  # noqa: E402
from sprune_trainer.scoring.importance import score_neurons  # noqa: E402
from sprune_trainer.scoring.selection import select_neurons  # noqa: E402
from sprune_trainer.layers.targets import find_target_layers  # noqa: E402
from transformers import DataCollatorForSeq2Seq  # noqa: E402

CRITERIA = ("random", "l2", "taylor", "hessian", "zeroth_order")


def training_batches(tok, data_dir: str, n_batches: int, batch_size: int, seed: int) -> list[dict]:
    """The study's training mix (4,000 examples, seed `seed`), seeded shuffle, first `n_batches` batches."""
    data = load_commonsense("local", data_dir, max_train_samples=4000, seed=seed)
    ds = tokenize_dataset(data.train, tok, 256).select_columns(["input_ids", "attention_mask", "labels"])
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    return [collate([ds[i] for i in order[b * batch_size:(b + 1) * batch_size]]) for b in range(n_batches)]


@torch.no_grad()
def input_energy(model, layers: dict, batches: list[dict]) -> dict[str, torch.Tensor]:
    """name -> sum over real (unpadded) tokens of x_j^2, per input feature j."""
    energy, mask = {}, {}

    def hook(name):
        def fn(module, args):
            x = args[0].float()[mask["m"]]  # (tokens, d_in)
            energy[name] = energy.get(name, 0) + (x * x).sum(0)
        return fn

    handles = [layer.register_forward_pre_hook(hook(n)) for n, layer in layers.items()]
    try:
        for b in batches:
            mask["m"] = b["attention_mask"].bool()
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return energy


def energy_shares(selection: dict[str, torch.Tensor], energy: dict[str, torch.Tensor]) -> dict[str, float]:
    return {n: float(energy[n][idx].sum() / energy[n].sum()) for n, idx in selection.items()}


def by_kind(values: dict[str, float]) -> dict[str, float]:
    """Mean over layers of each projection kind (q_proj, ..., down_proj) and over all layers."""
    groups = defaultdict(list)
    for name, v in values.items():
        groups[name.split(".")[-1]].append(v)
    out = {k: statistics.fmean(v) for k, v in groups.items()}
    out["all"] = statistics.fmean(values.values())
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data_dir", required=True, help="LLM-Adapters folder (train/, test/)")
    ap.add_argument("--model_name_or_path", default=None, help="default: the offline SmolLM2-135M-Instruct")
    ap.add_argument("--batches", type=int, default=8, help="calibration and energy batches (the study used 50)")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args(argv)

    path = args.model_name_or_path or str(smollm2_offline_dir())
    model, tok = load_model_and_tokenizer(path, dtype="float32")
    model.eval()
    shape = grid.LlamaShape.from_model_dir(path)
    k = grid.budget_neurons(shape, "columns", grid.lora_params(shape, grid.BUDGET_RANK))
    layers = find_target_layers(model)
    batches = training_batches(tok, args.data_dir, args.batches, args.batch_size, args.seed)
    energy = input_energy(model, layers, batches)
    d_in = {n: layer.in_features for n, layer in layers.items()}
    result = {"model": path, "columns_per_layer": k, "batches": args.batches, "batch_size": args.batch_size,
              "uniform": by_kind({n: k / d for n, d in d_in.items()}), "criteria": {}}
    for crit in CRITERIA:
        t0 = time.time()
        cfg = SparseNeuronConfig(importance=crit, neurons_per_layer=k, axis="columns",
                                 calibration_batches=args.batches, seed=args.seed)
        scores = score_neurons(model, layers, cfg, batches=batches, progress=False)
        shares = energy_shares(select_neurons(scores, cfg), energy)
        result["criteria"][crit] = {"energy_share": by_kind(shares), "seconds": round(time.time() - t0, 1)}
        print(f"{crit:>12}: selected columns carry {100 * result['criteria'][crit]['energy_share']['all']:.1f}% "
              f"of the input energy (uniform pick: {100 * result['uniform']['all']:.1f}%)  "
              f"[{time.time() - t0:.0f} s]", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
