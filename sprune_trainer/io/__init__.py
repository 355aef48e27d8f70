"""On disk: the sparse adapter format (adapter.py) and the Trainer's checkpoint folders, which of them can be
resumed from (checkpoints.py)."""
