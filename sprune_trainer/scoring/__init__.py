"""Which neurons to train: importance criteria (importance.py) over calibration batches (calibration.py), then
the top ones per layer or globally (selection.py), optionally balanced over attention heads (heads.py)."""
