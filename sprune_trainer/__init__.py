"""Sparse-neuron fine-tuning (Li & Bhaskara, arXiv 2502.11439) as a Hugging Face Trainer extension."""
import importlib.util

from .checkpoint import load_sparse_adapter, save_sparse_adapter
from .config import SparseNeuronConfig
from .inject import merge_sparse, quantize_with_sparse_correction
from .optim import SliceAdamW
from .sliced_linear import SlicedLinear
from .trainer import SparseNeuronMixin, SparseNeuronTrainer
from .untrained import SlicesNotTrainingError
from .nonfinite import NonFiniteTrainingError

__all__ = ["SparseNeuronConfig", "SparseNeuronMixin", "SparseNeuronTrainer", "SlicedLinear", "SliceAdamW",
           "save_sparse_adapter", "load_sparse_adapter", "merge_sparse", "quantize_with_sparse_correction",
           "SlicesNotTrainingError", "NonFiniteTrainingError"]
__version__ = "0.1.0"

# TRL's trainers (trl_trainer.py) only when trl is installed, imported on first use: trl is an optional extra
_TRL_EXPORTS = ("SparseNeuronSFTTrainer", "SparseNeuronDPOTrainer")
if importlib.util.find_spec("trl") is not None:
    __all__ += list(_TRL_EXPORTS)


def __getattr__(name):
    if name in _TRL_EXPORTS:
        try:
            from . import trl_trainer
        except ImportError as e:
            raise ImportError(f"sprune_trainer.{name} needs trl: pip install 'sprune_trainer[trl]' ({e})") from e
        return getattr(trl_trainer, name)
    raise AttributeError(f"module 'sprune_trainer' has no attribute {name!r}")
