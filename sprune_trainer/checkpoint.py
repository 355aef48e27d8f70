"""Sparse adapters on disk: slices + indices (safetensors) and config + layer shapes + checksum (json).

Writes are atomic (temp file + os.replace; the json, written last, names the weights' sha256), so a crash
mid-save never leaves a half-written adapter that loads; reads verify the checksum and load tensors only."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import SparseNeuronConfig
from .inject import CONFIG_ATTR, inject_slices, sliced_modules
from .nonfinite import require_finite
from .sliced_linear import SlicedLinear
from .zero3 import gathered

WEIGHTS_NAME = "sparse_adapter.safetensors"
META_NAME = "sparse_adapter.json"
FORMAT = "sprune_trainer.sparse_adapter"
VERSION = 1


@dataclass
class SparseAdapter:
    config: SparseNeuronConfig
    selection: dict[str, torch.Tensor]  # module name -> sorted neuron indices
    tensors: dict[str, torch.Tensor]    # "<module>.delta" / "<module>.bias_delta"
    shapes: dict[str, tuple[int, int]]  # module name -> base weight (d_out, d_in)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _replace_atomically(write, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def adapter_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, layer metadata) of every slice in `model`, tensors on CPU. Under ZeRO-3 every rank must call
    it (the slices are gathered: a plain read would save empty partitions)."""
    layers = sliced_modules(model)
    if not layers:
        raise ValueError("model has no sparse-neuron slices; train it with SparseNeuronTrainer or "
                         "load_sparse_adapter() first")
    tensors, meta = {}, {}
    for name, layer in layers.items():
        tensors[f"{name}.index"] = layer.index.detach().cpu().contiguous()
        with gathered([layer.delta, layer.bias_delta]):
            tensors[f"{name}.delta"] = layer.delta.detach().cpu().clone()
            if layer.bias_delta is not None:
                tensors[f"{name}.bias_delta"] = layer.bias_delta.detach().cpu().clone()
        meta[name] = {"shape": [layer.out_features, layer.in_features], "axis": layer.axis,
                      "k": layer.index.numel(), "dtype": str(layer.delta.dtype).removeprefix("torch.")}
    return tensors, meta


def save_sparse_adapter(model: nn.Module, save_directory: str, tensors: dict | None = None,
                        layer_meta: dict | None = None) -> str:
    """Write `model`'s slices to `save_directory` (created). Returns the directory.
    `tensors`/`layer_meta` may be given when they were gathered elsewhere (e.g. under ZeRO-3)."""
    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise ValueError("model carries no SparseNeuronConfig; it was not prepared by sprune_trainer")
    if tensors is None:
        tensors, layer_meta = adapter_state(model)
    require_finite(tensors, f"to save the sparse adapter to {save_directory}")
    os.makedirs(save_directory, exist_ok=True)
    weights_path = os.path.join(save_directory, WEIGHTS_NAME)
    _replace_atomically(lambda p: save_file(tensors, p, metadata={"format": "pt"}), weights_path)
    meta = {"format": FORMAT, "version": VERSION, "config": config.to_dict(), "layers": layer_meta,
            "model_class": type(model).__name__, "weights_sha256": _sha256(weights_path)}

    def write_json(p):
        with open(p, "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
    _replace_atomically(write_json, os.path.join(save_directory, META_NAME))
    return save_directory


def is_sparse_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META_NAME)) and os.path.isfile(os.path.join(path, WEIGHTS_NAME))


def read_sparse_adapter(path: str) -> SparseAdapter:
    """Read and verify an adapter directory; clear errors for missing, corrupt or truncated files."""
    meta_path, weights_path = os.path.join(path, META_NAME), os.path.join(path, WEIGHTS_NAME)
    for p in (meta_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} not found: {path!r} is not a sparse adapter directory")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt sparse adapter metadata {meta_path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} is not a {FORMAT} file")
    if meta.get("version", 0) > VERSION:
        raise ValueError(f"{meta_path} has format version {meta['version']}; this sprune_trainer reads <= {VERSION}")
    if _sha256(weights_path) != meta.get("weights_sha256"):
        raise ValueError(f"{weights_path} is corrupt or truncated (sha256 differs from {META_NAME})")
    try:
        tensors = load_file(weights_path)
    except SafetensorError as e:
        raise ValueError(f"{weights_path} is corrupt: {e}") from None
    require_finite(tensors, f"to load the sparse adapter {path}")
    config = SparseNeuronConfig.from_dict(meta["config"])
    layers = meta["layers"]
    missing = [f"{n}.{t}" for n in layers for t in ("index", "delta") if f"{n}.{t}" not in tensors]
    if missing:
        raise ValueError(f"{weights_path} lacks tensors {missing[:4]}")
    selection = {n: tensors.pop(f"{n}.index") for n in layers}
    return SparseAdapter(config, selection, tensors, {n: tuple(m["shape"]) for n, m in layers.items()})


def check_adapter_fits(model: nn.Module, adapter: SparseAdapter) -> None:
    """Raise a clear error when the adapter was made for a model of another shape."""
    for name, shape in adapter.shapes.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"adapter is for a different model: it has a slice for {name!r}, which "
                             f"{type(model).__name__} does not have") from None
        if not isinstance(module, nn.Linear | SlicedLinear):
            raise ValueError(f"adapter is for a different model: {name!r} is a {type(module).__name__} here")
        have = (module.out_features, module.in_features)
        if have != tuple(shape):
            raise ValueError(f"adapter is for a different model shape: {name!r} is {have} here, "
                             f"{tuple(shape)} in the adapter")


@torch.no_grad()
def copy_adapter_into(model: nn.Module, adapter: SparseAdapter) -> None:
    """Copy the adapter's slices into the slices already on `model`, which must sit on the same neurons."""
    layers = sliced_modules(model)
    if set(layers) != set(adapter.selection):
        raise ValueError("the model's slices are on other layers than the adapter's: "
                         f"{sorted(set(layers) ^ set(adapter.selection))[:4]}")
    for name, layer in layers.items():
        if not torch.equal(layer.index.cpu(), adapter.selection[name]):
            raise ValueError(f"the model's slice {name!r} trains other neurons than the adapter's")
        with gathered([layer.delta, layer.bias_delta], modifier_rank=0):
            layer.delta.copy_(adapter.tensors[f"{name}.delta"])
            if layer.bias_delta is not None:
                layer.bias_delta.copy_(adapter.tensors[f"{name}.bias_delta"])


def load_sparse_adapter(model: nn.Module, adapter_dir: str) -> nn.Module:
    """Attach the adapter in `adapter_dir` to `model` (a base model, or one already sliced on the same
    neurons) and return it; the slices stay trainable, merge_sparse() makes it a plain dense model."""
    adapter = read_sparse_adapter(adapter_dir)
    check_adapter_fits(model, adapter)
    if not sliced_modules(model):
        inject_slices(model, adapter.selection, adapter.config)
    copy_adapter_into(model, adapter)
    return model
