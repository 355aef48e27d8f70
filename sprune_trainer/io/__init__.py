"""On disk: the sparse adapter format (adapter.py), its exact export as a PEFT LoRA adapter (peft_export.py) and the
Trainer's checkpoint folders, which of them can be resumed from (checkpoints.py)."""
