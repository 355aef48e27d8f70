"""The sliced layer and the surgery around it: `SlicedLinear` (sliced_linear.py) and its fused autograd function
(sliced_matmul.py, recompute.py), finding the target linears (targets.py), putting slices in (surgery.py) and merging
them out (merge.py), bitsandbytes bases (quantization.py) and modules trained in full (full_modules.py)."""
