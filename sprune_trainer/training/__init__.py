"""The Trainer side: `SparseNeuronMixin` / `SparseNeuronTrainer` (trainer.py), assembled from slice preparation
(preparation.py), adapter saving and loading (saving.py) and the non-finite step guard (nonfinite.py, with
nonfinite_trace.py to find the operation); the untrained-slices guard (untrained.py) and the selection summary
(summary.py)."""
