"""The guards' batched norms (training/norms.py) equal the per-tensor fp32 casts they replace, exactly, for mixed
dtypes and for parameters that require a gradient (no graph is built)."""
import torch

from sprune_trainer.training.norms import norms_fp32


def test_norms_equal_the_per_tensor_ones_exactly():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 5, generator=g).to(dtype) for dtype in (torch.float32, torch.bfloat16, torch.float16)]
    params = [torch.nn.Parameter(t) for t in tensors]
    want = torch.stack([n.float() for n in torch._foreach_norm(tensors)])  # the guards' expression before
    for got in (norms_fp32(tensors), norms_fp32(params)):
        assert got.dtype == torch.float32 and not got.requires_grad
        assert torch.equal(got, want)
