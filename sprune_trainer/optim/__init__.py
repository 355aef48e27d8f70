"""The optimizer over the slices: `SliceAdamW` (slice_adamw.py) with full, 8-bit blockwise (blockwise.py) or flat
chunked (flat_state.py) moments, and the check that an optimizer holds every slice (holds_slices.py)."""
