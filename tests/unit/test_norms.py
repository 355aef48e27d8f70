"""The guards' batched norms (training/norms.py): the fp32 ones equal the per-tensor fp32 casts they replace, exactly,
for mixed dtypes and for parameters that require a gradient (no graph is built); the fp64 ones equal an fp64
reference, with and without torch's fused dtype argument."""
import torch

from sprune_trainer.training import norms
from sprune_trainer.training.norms import norms_fp32, norms_fp64


def test_norms_equal_the_per_tensor_ones_exactly():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 5, generator=g).to(dtype) for dtype in (torch.float32, torch.bfloat16, torch.float16)]
    params = [torch.nn.Parameter(t) for t in tensors]
    want = torch.stack([n.float() for n in torch._foreach_norm(tensors)])  # the guards' expression before
    for got in (norms_fp32(tensors), norms_fp32(params)):
        assert got.dtype == torch.float32 and not got.requires_grad
        assert torch.equal(got, want)


def test_fp64_norms_equal_an_fp64_reference_with_and_without_the_fused_dtype_argument(monkeypatch):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(64, 33, generator=g).to(dtype) for dtype in (torch.float32, torch.bfloat16)]
    want = torch.stack([t.double().pow(2).sum().sqrt() for t in tensors])
    got = norms_fp64([torch.nn.Parameter(t) for t in tensors])
    assert got.dtype == torch.float64 and not got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)

    def no_dtype_argument(tensors, ord=2):  # torch builds whose _foreach_norm takes no dtype
        raise TypeError("_foreach_norm() got an unexpected keyword argument 'dtype'")
    monkeypatch.setattr(norms.torch, "_foreach_norm", no_dtype_argument)
    torch.testing.assert_close(norms_fp64(tensors), want, rtol=1e-12, atol=0)
