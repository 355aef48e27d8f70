"""Sparse-neuron fine-tuning (Li & Bhaskara, arXiv 2502.11439) as a Hugging Face Trainer extension.

The public API is what this module exports. Inside, one subpackage per concept:
  scoring/       which neurons matter: importance criteria, calibration batches, per-layer selection
  layers/        the sliced layer and the surgery that puts it in (and merges it out again)
  optim/         SliceAdamW and its compressed moments
  io/            the sparse adapter format and the Trainer's checkpoint folders
  training/      the Trainer mixin and its guards (non-finite steps, slices that do not train)
  integrations/  TRL's trainers and DeepSpeed ZeRO-3
and `_hf_internals.py`, every private transformers member the package relies on."""
import importlib.util

__version__ = "0.1.0"  # before the imports: io/adapter.py records it in every adapter

from .config import SparseNeuronConfig
from .io.adapter import load_sparse_adapter, save_sparse_adapter
from .io.peft_export import export_peft_lora
from .layers.merge import merge_sparse
from .layers.sliced_linear import SlicedLinear
from .layers.surgery import quantize_with_sparse_correction
from .optim.slice_adamw import SliceAdamW
from .training.nonfinite import NonFiniteGuardMixin, NonFiniteTrainingError
from .training.trainer import SparseNeuronMixin, SparseNeuronTrainer
from .training.untrained import SlicesNotTrainingError

__all__ = ["SparseNeuronConfig", "SparseNeuronMixin", "SparseNeuronTrainer", "SlicedLinear", "SliceAdamW",
           "save_sparse_adapter", "load_sparse_adapter", "export_peft_lora", "merge_sparse",
           "quantize_with_sparse_correction", "SlicesNotTrainingError", "NonFiniteTrainingError", "NonFiniteGuardMixin"]

# TRL's trainers (integrations/trl.py) only when trl is installed, imported on first use: trl is an optional extra
_TRL_EXPORTS = ("SparseNeuronSFTTrainer", "SparseNeuronDPOTrainer", "SparseNeuronTRLMixin")
if importlib.util.find_spec("trl") is not None:
    __all__ += list(_TRL_EXPORTS)


def __getattr__(name):
    if name in _TRL_EXPORTS:
        try:
            from .integrations import trl
        except ImportError as e:
            raise ImportError(f"sprune_trainer.{name} needs trl: pip install 'sprune_trainer[trl]' ({e})") from e
        return getattr(trl, name)
    raise AttributeError(f"module 'sprune_trainer' has no attribute {name!r}")
