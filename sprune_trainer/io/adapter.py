"""Sparse adapters on disk: slices + indices, and the full tensors of `modules_to_save` (safetensors), and
config + layer shapes + those tensors' shapes and dtypes + checksums (json).

The json's config holds only what defines the adapter (`SparseNeuronConfig.ADAPTER_KEYS`); run-time fields load
at their defaults (older adapters, which recorded every field, load the same). Next to it: the sprune_trainer
version that wrote it and the base model's name or path (as PEFT's `base_model_name_or_path`). A key this version
does not know, written by a newer one, is warned about and ignored, as PEFT does.

Writes are atomic (temp file + fsync + os.replace + fsync of the directory; the json, written last, names the
weights' sha256 and its own), so a crash mid-save never leaves a half-written adapter that loads. An adapter loads
only when it is exactly what was saved and fits the model: both checksums, the json and the tensors agree (every
listed layer has its index, delta and, exactly when the config trains biases, bias_delta, of the recorded shape, k,
axis and dtype; no tensor is left over), and the model has the recorded class and layer shapes. Everything is
checked before the model is touched: a failed load leaves it as it was."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__
from ..config import SLICE_DTYPES, SparseNeuronConfig, dtype_name
from ..layers.experts import expose_experts, hide_experts
from ..layers.linear_like import is_sliceable, linear_shape
from ..layers.full_modules import check_full_fits, check_full_tensors, copy_full_into, full_metadata, full_state
from ..layers.surgery import CONFIG_ATTR, inject_slices, layers_to_quantize, selection_axes, sliced_modules
from ..training.nonfinite import require_finite
from ..layers.sliced_linear import SlicedLinear, slice_dtype_for
from ..integrations.zero3 import gathered

WEIGHTS_NAME = "sparse_adapter.safetensors"
META_NAME = "sparse_adapter.json"
FORMAT = "sprune_trainer.sparse_adapter"
VERSION = 2  # 2: the json records its own sha256 ("metadata_sha256"); version 1 files (without it) still load
REQUIRED_KEYS = ("config", "layers", "weights_sha256")
LAYER_KEYS = ("shape", "axis", "k", "dtype")
KNOWN_KEYS = REQUIRED_KEYS + ("format", "version", "model_class", "model_type", "modules_to_save", "metadata_sha256",
                              "sprune_trainer_version", "base_model_name_or_path")
_EXACT_WIDENING = {(torch.bfloat16, torch.float32), (torch.float16, torch.float32)}


@dataclass
class SparseAdapter:
    config: SparseNeuronConfig
    selection: dict[str, torch.Tensor]  # module name -> sorted neuron indices
    tensors: dict[str, torch.Tensor]    # "<module>.delta" / "<module>.bias_delta"
    shapes: dict[str, tuple[int, int]]  # module name -> base weight (d_out, d_in)
    model_class: Optional[str] = None   # type(model).__name__ and model.config.model_type when saved
    model_type: Optional[str] = None
    axes: dict[str, str] = field(default_factory=dict)  # module name -> "rows" / "columns" (default: config.axis)

    def axis(self, name: str) -> str:
        return self.axes.get(name, self.config.axis)

    def dtypes(self) -> dict[str, torch.dtype]:
        return {name: self.tensors[f"{name}.delta"].dtype for name in self.selection}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def metadata_digest(meta: dict) -> str:
    """sha256 of the json's content (every entry but the digest itself, in a canonical form)."""
    body = {k: v for k, v in meta.items() if k != "metadata_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def fsync_directory(path: str) -> None:
    """Make a rename or removal inside `path` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # filesystems that cannot sync a directory say so
            raise
    finally:
        os.close(fd)


def _new_file_mode() -> int:
    mask = os.umask(0)  # the only portable way to read the umask is to set it
    os.umask(mask)
    return 0o666 & ~mask


def replace_atomically(write, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.chmod(tmp, _new_file_mode())  # as any new file, whatever `write` made (safetensors writes 0o600)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_directory(os.path.dirname(os.path.abspath(path)))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def model_type_of(model: nn.Module) -> Optional[str]:
    return getattr(getattr(model, "config", None), "model_type", None)


def base_model_name_or_path(model: nn.Module) -> Optional[str]:
    """The hub id or path the model was loaded from (None for one built from a config)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    return str(name) if name else None


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
                      "k": layer.index.numel(), "dtype": dtype_name(layer.delta.dtype)}
    config = getattr(model, CONFIG_ATTR, None)
    tensors.update(full_state(model, config.modules_to_save if config is not None else None))
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
    full_meta = full_metadata(tensors) if config.modules_to_save else None  # present exactly when configured
    check_adapter_consistent(config, layer_meta, tensors, "the adapter to save", full_meta)  # what is written must load
    require_finite(tensors, f"to save the sparse adapter to {save_directory}")
    os.makedirs(save_directory, exist_ok=True)
    weights_path = os.path.join(save_directory, WEIGHTS_NAME)
    replace_atomically(lambda p: save_file(tensors, p, metadata={"format": "pt"}), weights_path)
    meta = {"format": FORMAT, "version": VERSION, "config": config.adapter_dict(), "layers": layer_meta,
            "model_class": type(model).__name__, "model_type": model_type_of(model),
            "base_model_name_or_path": base_model_name_or_path(model), "sprune_trainer_version": __version__,
            "weights_sha256": _sha256(weights_path)}
    if full_meta is not None:
        meta["modules_to_save"] = full_meta
    meta["metadata_sha256"] = metadata_digest(meta)

    def write_json(p):
        with open(p, "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
    replace_atomically(write_json, os.path.join(save_directory, META_NAME))
    return save_directory


def is_sparse_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META_NAME)) and os.path.isfile(os.path.join(path, WEIGHTS_NAME))


def _read_metadata(meta_path: str) -> dict:
    """The json, checked for format, version, its own checksum and the entries every adapter has."""
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt sparse adapter metadata {meta_path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} is not a {FORMAT} file")
    version = meta.get("version", 0)
    if not isinstance(version, int) or version > VERSION:
        raise ValueError(f"{meta_path} has format version {version!r}; this sprune_trainer reads <= {VERSION}")
    if version >= 2 and meta.get("metadata_sha256") != metadata_digest(meta):
        raise ValueError(f"{meta_path} was edited or is corrupt: its content's sha256 differs from the one it "
                         "records (an adapter loads only as it was saved)")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{meta_path} lacks the entries {missing}")
    if not isinstance(meta["config"], dict):
        raise ValueError(f"{meta_path}: 'config' must map SparseNeuronConfig fields, got {meta['config']!r}")
    if not isinstance(meta["layers"], dict) or not meta["layers"]:
        raise ValueError(f"{meta_path}: 'layers' must map each sliced module to its shape, got {meta['layers']!r}")
    return meta


def read_sparse_adapter(path: str) -> SparseAdapter:
    """Read and verify an adapter directory; clear errors for missing, corrupt, truncated or edited files and for
    json and tensors that disagree."""
    meta_path, weights_path = os.path.join(path, META_NAME), os.path.join(path, WEIGHTS_NAME)
    for p in (meta_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} not found: {path!r} is not a sparse adapter directory")
    meta = _read_metadata(meta_path)
    if _sha256(weights_path) != meta["weights_sha256"]:
        raise ValueError(f"{weights_path} is corrupt or truncated (sha256 differs from {META_NAME})")
    try:
        tensors = load_file(weights_path)
    except SafetensorError as e:
        raise ValueError(f"{weights_path} is corrupt: {e}") from None
    require_finite(tensors, f"to load the sparse adapter {path}")
    try:
        config, unknown = SparseNeuronConfig.from_adapter_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{meta_path} holds an invalid config: {e}") from None
    _warn_unknown_keys(meta_path, meta, [f"config.{k}" for k in unknown])
    layers = meta["layers"]
    check_adapter_consistent(config, layers, tensors, path, meta.get("modules_to_save"))
    selection = {n: tensors.pop(f"{n}.index") for n in layers}
    return SparseAdapter(config, selection, tensors, {n: tuple(m["shape"]) for n, m in layers.items()},
                         meta.get("model_class"), meta.get("model_type"), {n: m["axis"] for n, m in layers.items()})


def _warn_unknown_keys(meta_path: str, meta: dict, unknown_config: list[str]) -> None:
    """One warning for the keys a newer sprune_trainer wrote, which this one ignores. warnings.warn, not the log:
    resuming reads a checkpoint's adapter several times, and the same warning is shown once."""
    unknown = sorted(set(meta) - set(KNOWN_KEYS)) + unknown_config
    if unknown:
        warnings.warn(f"{meta_path} has keys {unknown} that this sprune_trainer ({__version__}) does not know; it was "
                      f"written by sprune_trainer {meta.get('sprune_trainer_version', 'of an unknown version')}. "
                      "They are ignored (the adapter loads without them); upgrade sprune_trainer to use them.",
                      stacklevel=2)


def check_adapter_consistent(config: SparseNeuronConfig, layers: dict, tensors: dict[str, torch.Tensor],
                             where: str, full_meta: Optional[dict] = None) -> None:
    """The layer metadata and the tensors (with "<module>.index") describe the same slices, `full_meta` (the json's
    "modules_to_save") the same full modules, and nothing else. Raises ValueError naming `where` and the first
    disagreement."""
    used = check_full_tensors(config.modules_to_save, full_meta, tensors, where)
    for name, meta in layers.items():
        _check_layer(config, name, meta, tensors, where)
        used |= {f"{name}.{t}" for t in ("index", "delta", "bias_delta")}
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"{where}: tensors {unused[:4]} belong to no layer listed in its metadata")


def _check_layer(config: SparseNeuronConfig, name: str, meta, tensors: dict, where: str) -> None:
    if not isinstance(meta, dict) or any(k not in meta for k in LAYER_KEYS):
        raise ValueError(f"{where}: layer {name!r} must record {LAYER_KEYS}, got {meta!r}")
    shape, axis, k, dtype = (meta[key] for key in LAYER_KEYS)
    if not (isinstance(shape, list | tuple) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
        raise ValueError(f"{where}: layer {name!r} has shape {shape!r}, not (d_out, d_in)")
    if axis != config.axis and not (config.axis == "coupled" and axis in ("rows", "columns")):
        raise ValueError(f"{where}: layer {name!r} is recorded with axis={axis!r}, its config says {config.axis!r}")
    index, delta = tensors.get(f"{name}.index"), tensors.get(f"{name}.delta")
    if index is None or delta is None:
        raise ValueError(f"{where}: layer {name!r} lacks its index or delta tensor")
    d_out, d_in = shape
    n_units = d_out if axis == "rows" else d_in
    if (not isinstance(k, int) or index.dtype != torch.int64 or index.dim() != 1 or index.numel() != k
            or not 0 < k <= n_units
            or index[0] < 0 or index[-1] >= n_units or (index.numel() > 1 and not (index[1:] > index[:-1]).all())):
        raise ValueError(f"{where}: {name}.index must be {k} sorted unique int64 indices in [0, {n_units}) "
                         f"(its layer's {axis}), got a {index.dtype} tensor of shape {tuple(index.shape)}")
    want = (k, d_in) if axis == "rows" else (d_out, k)
    if tuple(delta.shape) != want:
        raise ValueError(f"{where}: {name}.delta has shape {tuple(delta.shape)}, but {k} {axis} of a {d_out}x{d_in} "
                         f"weight need {want}")
    if dtype_name(delta.dtype) not in SLICE_DTYPES:
        raise ValueError(f"{where}: {name}.delta is {delta.dtype}, not one of the slice dtypes {SLICE_DTYPES[:3]}")
    if dtype_name(delta.dtype) != dtype:
        raise ValueError(f"{where}: {name}.delta is {dtype_name(delta.dtype)}, its metadata says {dtype!r}")
    if config.slice_dtype != "auto" and dtype != config.slice_dtype:
        raise ValueError(f"{where}: {name}.delta is {dtype}, but its config says slice_dtype={config.slice_dtype!r}")
    bias = tensors.get(f"{name}.bias_delta")
    if bias is not None and not config.train_bias:
        raise ValueError(f"{where}: {name}.bias_delta is present, but its config says train_bias=False")
    if bias is not None and (tuple(bias.shape) != (k,) or bias.dtype != delta.dtype):
        raise ValueError(f"{where}: {name}.bias_delta must be ({k},) {dtype}, got {tuple(bias.shape)} {bias.dtype}")


def check_no_rounding(saved: torch.dtype, target: torch.dtype, what: str, fix: str) -> None:
    """Slices saved in `saved` may go into `target` only when every value survives (same dtype, or widened)."""
    if saved != target and (saved, target) not in _EXACT_WIDENING:
        raise ValueError(f"{what} was saved in {dtype_name(saved)} but would be held in {dtype_name(target)}, "
                         f"which rounds it; {fix}")


def check_adapter_fits(model: nn.Module, adapter: SparseAdapter, slice_dtype: Optional[str] = None,
                       check_model_class: bool = True) -> None:
    """Raise a clear error, before anything changes, when the adapter was made for another model (class,
    layer names or shapes, biases) or, for a model sliced already, for other slices. `slice_dtype`: the setting
    fresh slices will be made with (None: the adapter's own dtypes); values that it would round are refused."""
    if check_model_class:
        for what, saved, here in (("class", adapter.model_class, type(model).__name__),
                                  ("model_type", adapter.model_type, model_type_of(model))):
            if saved is not None and saved != here:
                raise ValueError(f"adapter is for a different model: saved from a {what} {saved!r}, this model's is "
                                 f"{here!r} (pass check_model_class=False if its layers really are the same)")
    if any(".experts." in name for name in adapter.shapes):
        expose_experts(model)  # expert slices are named by their views, experts.<e>.<projection>
    try:
        _check_layers_fit(model, adapter)
        check_full_fits(model, adapter.config.modules_to_save, adapter.tensors)
        if sliced_modules(model):
            check_slices_match(model, adapter)
            return
        layers_to_quantize(model, adapter.config)  # quantize_base on an already quantized model: refused now
        _check_coupled_axes(model, adapter)
        if slice_dtype is not None:
            for name, saved in adapter.dtypes().items():
                check_no_rounding(saved, slice_dtype_for(model.get_submodule(name), slice_dtype), f"slice {name!r}",
                                  f"use slice_dtype={dtype_name(saved)!r} (or 'float32')")
    except ValueError:
        hide_experts(model, only_unsliced=True)  # as it was
        raise


def _check_coupled_axes(model: nn.Module, adapter: SparseAdapter) -> None:
    """axis='coupled': this model's neuron groups slice each layer along the axis the adapter recorded."""
    if adapter.config.axis != "coupled":
        return
    here = selection_axes(model, adapter.selection, adapter.config)
    wrong = next((n for n in adapter.selection if here[n] != adapter.axis(n)), None)
    if wrong is not None:
        raise ValueError(f"adapter is for a different model: its coupled slice {wrong!r} runs along "
                         f"{adapter.axis(wrong)}, this model's neuron groups give it {here[wrong]}")


def _check_layers_fit(model: nn.Module, adapter: SparseAdapter) -> None:
    """Every slice of the adapter sits on a linear of `model` with its shape (and bias, with train_bias)."""
    for name, shape in adapter.shapes.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"adapter is for a different model: it has a slice for {name!r}, which "
                             f"{type(model).__name__} does not have") from None
        if not (is_sliceable(module) or isinstance(module, SlicedLinear)):
            raise ValueError(f"adapter is for a different model: {name!r} is a {type(module).__name__} here")
        have = (module.out_features, module.in_features) if isinstance(module, SlicedLinear) else linear_shape(module)
        if have != tuple(shape):
            raise ValueError(f"adapter is for a different model shape: {name!r} is {have} here, "
                             f"{tuple(shape)} in the adapter")
        has_bias, saved_bias = module.bias is not None, f"{name}.bias_delta" in adapter.tensors
        if adapter.config.train_bias and has_bias != saved_bias:
            raise ValueError(f"adapter is for a different model: {name!r} {'has' if has_bias else 'has no'} bias here, "
                             f"but the adapter (train_bias=True) {'has' if saved_bias else 'has no'} bias_delta for it")


def check_slices_match(model: nn.Module, adapter: SparseAdapter) -> None:
    """The slices on `model` sit on the adapter's layers and neurons, with its axis and biases, in a dtype that
    holds its values exactly."""
    layers = sliced_modules(model)
    if set(layers) != set(adapter.selection):
        raise ValueError("the model's slices are on other layers than the adapter's: "
                         f"{sorted(set(layers) ^ set(adapter.selection))[:4]}")
    for name, layer in layers.items():
        if layer.axis != adapter.axis(name) or not torch.equal(layer.index.cpu(), adapter.selection[name]):
            raise ValueError(f"the model's slice {name!r} trains other neurons than the adapter's")
        if (layer.bias_delta is not None) != (f"{name}.bias_delta" in adapter.tensors):
            raise ValueError(f"the model's slice {name!r} and the adapter disagree on training its bias")
        check_no_rounding(adapter.tensors[f"{name}.delta"].dtype, layer.delta.dtype, f"slice {name!r}",
                          "load it into a fresh model, or one sliced in the adapter's dtype")


@torch.no_grad()
def copy_adapter_into(model: nn.Module, adapter: SparseAdapter) -> None:
    """Copy the adapter's slices into the slices already on `model`, which must sit on the same neurons (checked
    for every layer before the first copy), and its modules_to_save tensors into those modules."""
    check_slices_match(model, adapter)
    for name, layer in sliced_modules(model).items():
        with gathered([layer.delta, layer.bias_delta], modifier_rank=0):
            layer.delta.copy_(adapter.tensors[f"{name}.delta"])
            if layer.bias_delta is not None:
                layer.bias_delta.copy_(adapter.tensors[f"{name}.bias_delta"])
    copy_full_into(model, adapter.config.modules_to_save, adapter.tensors)


def load_sparse_adapter(model: nn.Module, adapter_dir: str, check_model_class: bool = True) -> nn.Module:
    """Attach the adapter in `adapter_dir` to `model` (a base model, or one already sliced on the same
    neurons) and return it; the slices stay trainable, merge_sparse() makes it a plain dense model.

    The slices are made in the dtype they were saved in, and hold exactly the saved values. Everything is
    checked first; on any error the model is left as it was. `check_model_class=False` accepts a model of
    another class or model_type (e.g. a Mistral for a Llama adapter) whose layer names and shapes match."""
    adapter = read_sparse_adapter(adapter_dir)
    check_adapter_fits(model, adapter, check_model_class=check_model_class)
    if not sliced_modules(model):
        inject_slices(model, adapter.selection, adapter.config, slice_dtypes=adapter.dtypes())
    copy_adapter_into(model, adapter)
    return model
