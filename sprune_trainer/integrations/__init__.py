"""Other libraries: TRL's trainers with the mixin (trl.py, needs trl) and DeepSpeed ZeRO-3 gathering (zero3.py)."""
