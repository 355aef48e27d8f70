"""The size of the PEFT LoRA export against the native adapter (README.md)."""
