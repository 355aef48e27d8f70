"""Sparse-neuron fine-tuning (Li & Bhaskara, arXiv 2502.11439) as a Hugging Face Trainer extension."""
from .checkpoint import load_sparse_adapter, save_sparse_adapter
from .config import SparseNeuronConfig
from .inject import merge_sparse, quantize_with_sparse_correction
from .optim import SliceAdamW
from .sliced_linear import SlicedLinear
from .trainer import SparseNeuronTrainer

__all__ = ["SparseNeuronConfig", "SparseNeuronTrainer", "SlicedLinear", "SliceAdamW",
           "save_sparse_adapter", "load_sparse_adapter", "merge_sparse", "quantize_with_sparse_correction"]
__version__ = "0.1.0"
