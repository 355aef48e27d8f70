"""Blockwise 8-bit codes for Adam moments (bitsandbytes-style dynamic maps, in pure torch): per block of 256
numbers of a flattened tensor, one fp32 absmax and one 8-bit code per number (see optim.py for the maps)."""
import functools

import torch

BLOCK = 256


@functools.lru_cache(maxsize=None)
def _dynamic_map(signed: bool, device: torch.device) -> torch.Tensor:
    """Sorted quantization levels in [0, 1], built like bitsandbytes' create_dynamic_map.

    signed=False (SQ): 256 levels: 0, the centres of 2^(i+1) linear bins in each decade
    [10^(i-7), 10^(i-6)] for i = 0..6, and 1.
    signed=True (MAG): 128 magnitudes, same with 2^i bins per decade (smallest centre dropped so
    that ±127 fits int8); the int8 code's sign gives the value's sign.
    """
    levels = []
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, (2**i if signed else 2 ** (i + 1)) + 1)
        levels += (10.0 ** (i - 6) * (edges[:-1] + edges[1:]) / 2).tolist()
    if signed:
        levels = sorted(levels)[1:]
    return torch.tensor(sorted(levels + [0.0, 1.0]), dtype=torch.float32, device=device)


def quantize_blockwise(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x (any shape; >= 0 unless signed) -> codes (numel,) int8|uint8, scales (ceil(numel/256),) fp32.

    Each value maps to the nearest level of its block-normalised magnitude |x| / absmax(block).
    """
    n = x.numel()
    flat = x.detach().float().flatten()  # (numel,)
    blocks = torch.nn.functional.pad(flat, (0, -n % BLOCK)).view(-1, BLOCK)  # (nb, 256)
    scale = blocks.abs().amax(dim=1)  # (nb,)
    xn = blocks.abs() / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None]  # (nb, 256) in [0, 1]
    table = _dynamic_map(signed, x.device)
    codes = torch.bucketize(xn, (table[1:] + table[:-1]) / 2).flatten()[:n]  # (numel,) level index
    if signed:
        return torch.where(flat < 0, -codes, codes).to(torch.int8), scale
    return torch.where(flat > 0, codes.clamp_min(1), codes).to(torch.uint8), scale


def dequantize_blockwise(codes: torch.Tensor, scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of quantize_blockwise (signedness from the code dtype) -> fp32 tensor of `shape`."""
    n, signed = codes.numel(), codes.dtype == torch.int8
    table = _dynamic_map(signed, codes.device)
    c = torch.nn.functional.pad(codes.long(), (0, -n % BLOCK)).view(-1, BLOCK)  # (nb, 256)
    values = table[c.abs()] * c.sign() if signed else table[c]
    return (values * scale[:, None]).flatten()[:n].view(shape)
