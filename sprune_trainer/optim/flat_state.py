"""Compressed Adam state of many slices stepped as one flat tensor: a few dozen kernels per step instead of a
few dozen per slice (hundreds of slices made the 8-bit step launch-bound on a GPU).

Layout: the params of a chunk lie back to back in one flat buffer, each starting on a 256-element block
boundary (zero padding between). Quantization blocks therefore never span two params, absmax and codes are
those of the per-param computation, and every op is elementwise or per block: the result is bit-for-bit the
per-slice step. Each param's state entries ("exp_avg_code", ...) are views into the chunk's buffers, so
`state_dict()` and code that reads `optimizer.state[p]` see ordinary per-param tensors. A chunk holds at
most CHUNK_NUMEL numbers, which bounds the fp32 temporaries of one step (param, grad, two moments)."""
from __future__ import annotations

import torch

from .blockwise import BLOCK, dequantize_blockwise, quantize_blockwise
CHUNK_NUMEL = 1 << 24  # 16 M numbers: <= 4 x 64 MiB of fp32 temporaries per step


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def chunk_params(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive runs of params (same device) whose padded sizes sum to at most CHUNK_NUMEL."""
    chunks, size = [], 0
    for p in params:
        n = _padded(p.numel())
        if chunks and size + n <= CHUNK_NUMEL and chunks[-1][0].device == p.device:
            chunks[-1].append(p)
            size += n
        else:
            chunks.append([p])
            size = n
    return chunks


def _buffer_specs(kind: str) -> dict[str, tuple[torch.dtype, bool]]:
    """state key -> (dtype, per block?) of the flat buffers a state kind keeps."""
    if kind == "int8":
        return {"exp_avg_code": (torch.int8, False), "exp_avg_scale": (torch.float32, True),
                "exp_avg_sq_code": (torch.uint8, False), "exp_avg_sq_scale": (torch.float32, True)}
    return {"exp_avg": (torch.bfloat16, False), "exp_avg_sq": (torch.bfloat16, False)}


class FlatChunk:
    """The flat buffers of one chunk's compressed state, and the per-param views into them."""

    def __init__(self, params: list[torch.Tensor], kind: str):
        self.params, self.kind = params, kind
        self.numels = [p.numel() for p in params]
        self.offsets, off = [], 0
        for n in self.numels:
            self.offsets.append(off)
            off += _padded(n)
        self.total = off
        self.buffers: dict[str, torch.Tensor] = {}

    def _view(self, key: str, i: int) -> torch.Tensor:
        dtype, per_block = _buffer_specs(self.kind)[key]
        off, n = self.offsets[i], self.numels[i]
        if per_block:
            return self.buffers[key][off // BLOCK: off // BLOCK + -(-n // BLOCK)]
        view = self.buffers[key][off: off + n]
        return view if key.endswith("code") else view.view(self.params[i].shape)

    def _linked(self, states: list[dict]) -> bool:
        if not self.buffers:
            return False
        return all(key in s and s[key].data_ptr() == self._view(key, i).data_ptr()
                   for i, s in enumerate(states) for key in self.buffers)

    def link(self, states: list[dict]) -> None:
        """Make every param's state entries views into this chunk's buffers, keeping their values (a state
        loaded from a checkpoint, or replaced by a per-param step, is copied in once)."""
        if self._linked(states):
            return
        device = self.params[0].device
        self.buffers = {key: torch.zeros(self.total // BLOCK if per_block else self.total, dtype=dtype, device=device)
                        for key, (dtype, per_block) in _buffer_specs(self.kind).items()}
        for i, state in enumerate(states):
            for key in self.buffers:
                view = self._view(key, i)
                if key in state:
                    view.copy_(state[key].reshape(view.shape))
                state[key] = view

    def gather(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """One fp32 flat tensor of `tensors` (shaped like the params) in this chunk's padded layout."""
        pieces, pad = [], None
        for t, n in zip(tensors, self.numels):
            pieces.append(t.reshape(-1))
            if _padded(n) > n:
                pad = pad if pad is not None and pad.numel() >= BLOCK else t.new_zeros(BLOCK)
                pieces.append(pad[: _padded(n) - n])
        return torch.cat(pieces).float()

    def scatter_(self, flat: torch.Tensor, targets: list[torch.Tensor]) -> None:
        """targets[i] <- its part of `flat` (cast to the target's dtype)."""
        parts = [flat[off: off + n].view(t.shape) for off, n, t in zip(self.offsets, self.numels, targets)]
        torch._foreach_copy_(targets, parts)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(exp_avg, exp_avg_sq) of the whole chunk as fresh fp32 flat tensors."""
        b = self.buffers
        if self.kind == "int8":
            m = dequantize_blockwise(b["exp_avg_code"], b["exp_avg_scale"], (self.total,))
            sqrt_v = dequantize_blockwise(b["exp_avg_sq_code"], b["exp_avg_sq_scale"], (self.total,))
            return m, sqrt_v.square_()
        return b["exp_avg"].float(), b["exp_avg_sq"].float()

    def store_moments(self, m: torch.Tensor, v: torch.Tensor) -> None:
        b = self.buffers
        if self.kind == "int8":
            for (code_key, scale_key), x, signed in ((("exp_avg_code", "exp_avg_scale"), m, True),
                                                      (("exp_avg_sq_code", "exp_avg_sq_scale"), v.sqrt_(), False)):
                codes, scale = quantize_blockwise(x, signed=signed)
                b[code_key].copy_(codes)
                b[scale_key].copy_(scale)
        else:
            b["exp_avg"].copy_(m)
            b["exp_avg_sq"].copy_(v)
