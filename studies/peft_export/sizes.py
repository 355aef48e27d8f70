"""How large is the exported PEFT LoRA folder against the native sparse adapter at the Llama-2-7B shape
(32 decoder layers; q/k/v/o 4096 x 4096, gate/up 11008 x 4096, down 4096 x 11008), 64 neurons per layer?

Both adapters are written for real for the first decoder layers (the bases on the meta device, seeded slices), the
growth of each file per decoder layer is measured, its tensor bytes are checked against the formula (native: the
slice plus an int64 index; PEFT: both factors, k * (d_in + d_out) values), and 32 layers follow.

    python studies/peft_export/sizes.py        # writes studies/peft_export/results/sizes.json
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from sprune_trainer import SlicedLinear, SparseNeuronConfig, export_peft_lora, save_sparse_adapter  # noqa: E402
from sprune_trainer.config import dtype_name  # noqa: E402
from sprune_trainer.layers.surgery import CONFIG_ATTR  # noqa: E402

LLAMA2_7B = {"hidden": 4096, "intermediate": 11008, "layers": 32, "vocab": 32000}
TINY = {"hidden": 64, "intermediate": 128, "layers": 4, "vocab": 128}
SHAPES = {"llama2_7b": LLAMA2_7B, "tiny": TINY}
RESULTS = Path(__file__).resolve().parent / "results" / "sizes.json"


def projections(shape: dict) -> dict[str, tuple[int, int]]:
    """Each decoder layer's projections, name -> (d_out, d_in) (Llama-2-7B has as many kv heads as heads)."""
    h, i = shape["hidden"], shape["intermediate"]
    return {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}


def sliced_decoder(shape: dict, n_layers: int, k: int, axis: str, dtype: torch.dtype) -> nn.Module:
    """A module tree named as a Llama's (model.layers.N.self_attn.q_proj, ...) of SlicedLinears over meta bases."""
    g = torch.Generator().manual_seed(0)
    root, model = nn.Module(), nn.Module()
    root.model, model.layers = model, nn.ModuleList()
    for _ in range(n_layers):
        layer = nn.Module()
        layer.self_attn, layer.mlp = nn.Module(), nn.Module()
        for name, (d_out, d_in) in projections(shape).items():
            part, proj = name.split(".")
            index = torch.randperm(d_out if axis == "rows" else d_in, generator=g)[:k]
            sliced = SlicedLinear(nn.Linear(d_in, d_out, bias=False, device="meta"), index, axis=axis, dtype=dtype)
            sliced.index = index.sort().values  # (SlicedLinear put it on the base's meta device)
            sliced.delta = nn.Parameter((torch.randn(sliced.delta.shape, generator=g) * 0.01).to(dtype))
            setattr(getattr(layer, part), proj, sliced)
        model.layers.append(layer)
    setattr(root, CONFIG_ATTR, SparseNeuronConfig(neurons_per_layer=k, axis=axis, slice_dtype=dtype_name(dtype)))
    return root


def safetensors_data_bytes(path: str) -> int:
    """The tensor bytes of a safetensors file: its size less the 8-byte length and the json header."""
    with open(path, "rb") as f:
        header = struct.unpack("<Q", f.read(8))[0]
    return os.path.getsize(path) - 8 - header


def folder_bytes(path: str) -> int:
    return sum(p.stat().st_size for p in Path(path).iterdir())


def formula(shape: dict, k: int, axis: str, dtype: torch.dtype) -> dict[str, int]:
    """Tensor bytes per decoder layer: native = the slices + int64 indices; PEFT = lora_A + lora_B."""
    b = torch.tensor([], dtype=dtype).element_size()
    native = sum(k * (d_in if axis == "rows" else d_out) * b + 8 * k for d_out, d_in in projections(shape).values())
    peft = sum(k * (d_in + d_out) * b for d_out, d_in in projections(shape).values())
    return {"native": native, "peft": peft}


def write_both(shape: dict, n_layers: int, k: int, axis: str, dtype: torch.dtype, root: str) -> dict[str, dict]:
    model = sliced_decoder(shape, n_layers, k, axis, dtype)
    native, peft = os.path.join(root, f"native{n_layers}"), os.path.join(root, f"peft{n_layers}")
    save_sparse_adapter(model, native)
    export_peft_lora(model, peft)
    return {"native": {"data": safetensors_data_bytes(os.path.join(native, "sparse_adapter.safetensors")),
                       "folder": folder_bytes(native)},
            "peft": {"data": safetensors_data_bytes(os.path.join(peft, "adapter_model.safetensors")),
                     "folder": folder_bytes(peft)}}


def measure(shape: dict, k: int, axis: str, dtype: torch.dtype) -> dict:
    """Real files for 1 and 2 decoder layers; their difference is one layer's bytes, checked against the formula;
    the whole model's folders = 1 layer's + (layers - 1) x one layer's."""
    with tempfile.TemporaryDirectory() as root:
        one, two = (write_both(shape, n, k, axis, dtype, root) for n in (1, 2))
    want = formula(shape, k, axis, dtype)
    out = {"axis": axis, "slice_dtype": dtype_name(dtype), "per_decoder_layer": {}, "model": {}}
    for kind in ("native", "peft"):
        data = two[kind]["data"] - one[kind]["data"]
        if data != want[kind]:
            raise AssertionError(f"{kind}: {data} tensor bytes per decoder layer, the formula says {want[kind]}")
        per_layer = two[kind]["folder"] - one[kind]["folder"]  # tensors + their header and json entries
        out["per_decoder_layer"][kind] = {"tensor_bytes": data, "file_bytes": per_layer}
        out["model"][kind] = one[kind]["folder"] + (shape["layers"] - 1) * per_layer
    out["model"]["peft_over_native"] = round(out["model"]["peft"] / out["model"]["native"], 3)
    return out


def dense_model_bytes(shape: dict, bytes_per_value: int = 2) -> int:
    """The merged model (Llama: embeddings, head, the projections, two norms per layer, the final norm) in bf16."""
    h = shape["hidden"]
    per_layer = sum(d_out * d_in for d_out, d_in in projections(shape).values()) + 2 * h
    return (2 * shape["vocab"] * h + shape["layers"] * per_layer + h) * bytes_per_value


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2_7b")
    parser.add_argument("--k", type=int, default=64, help="neurons per layer (the paper's r)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    cases = [measure(shape, args.k, axis, dtype) for axis in ("rows", "columns")
             for dtype in (torch.float32, torch.bfloat16)]
    result = {"shape": {"name": args.shape, **shape}, "k": args.k, "cases": cases,
              "merged_model_bf16_bytes": dense_model_bytes(shape)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for c in cases:
        print(f"{c['axis']:8s} {c['slice_dtype']:9s} native {c['model']['native'] / 1e6:7.1f} MB   "
              f"PEFT {c['model']['peft'] / 1e6:7.1f} MB   x{c['model']['peft_over_native']}")
    print(f"merged model (bf16): {result['merged_model_bf16_bytes'] / 1e9:.2f} GB")
    return result


if __name__ == "__main__":
    main()
