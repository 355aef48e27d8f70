"""The parts a calibration batch is scored in (`config.calibration_micro_batch_size`): a fixed number of sequences,
0 for the whole batch, or "auto", the largest part that fits in memory.

"auto" on a device with memory statistics (CUDA): the first part of the run is one sequence, scored as any other
part; its memory peak above what was held before it, divided by its tokens, is the memory one token of a part
needs. Later parts hold as many sequences as `HEADROOM` of the memory available before that first part allows,
at that cost per token (an over-estimate: part of the first part's peak is fixed, not per token), and never more
than the batch. A Trainer's calibration batch is one training micro-batch, so no part holds more activations than
a training step does. On a device without memory statistics (CPU, ...) "auto" scores the whole batch, for the same
reason. Criteria whose estimate depends on the part (hessian, elementwise taylor) keep one sequence per part.

Only `read_memory` touches the device's memory statistics (the tests replace it)."""
from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Union

import torch
from transformers.utils import logging

from ..config import CALIBRATION_AUTO as AUTO
from .calibration import batch_rows, lead_tensor, micro_batches, row_shares, rows_part, split_rows

logger = logging.get_logger(__name__)

HEADROOM = 0.8  # of the memory available: the allocator's fragmentation and the part-to-part variation


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
    allocated: int  # bytes held by tensors now
    peak: int  # the most held since the peak was last reset
    available: int  # bytes that could still be allocated: free on the device + cached by torch and unused


def read_memory(device: torch.device, reset_peak: bool = False) -> Optional[DeviceMemory]:
    """The device's memory now (then, with `reset_peak`, the peak statistic restarts from here); None for a device
    without memory statistics."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    memory = DeviceMemory(allocated=allocated, peak=torch.cuda.max_memory_allocated(device),
                          available=free + torch.cuda.memory_reserved(device) - allocated)
    if reset_peak:
        torch.cuda.reset_peak_memory_stats(device)
    return memory


class MicroBatchPlan:
    """Splits every calibration batch of one scoring run into parts; "auto" measures its first part.

    `exact_in_parts`: the criterion scores the same in any parts (taylor, zeroth_order, wanda), so "auto" may grow
    the part; else "auto" is one sequence. `parts(batch)` yields (part, weight): weights are the parts' shares of
    the batch's loss terms (`calibration.micro_batches`), None with `weighted=False` (every row is kept)."""

    def __init__(self, size: Union[int, str], exact_in_parts: bool):
        self.size = size
        self.exact_in_parts = exact_in_parts
        self.token_budget: Optional[int] = None  # auto, once measured: the most tokens a part may hold
        self.whole_batches = False  # auto on a device without memory statistics

    def parts(self, batch: dict, weighted: bool = True) -> Iterator[tuple[dict, Optional[float]]]:
        size = self._size(batch)
        if size is not None:
            if weighted:
                yield from micro_batches(batch, size)
            else:
                yield from ((part, None) for part in split_rows(batch, size))
            return
        yield from self._probe_then_split(batch, weighted)

    def _size(self, batch: dict) -> Optional[int]:
        """Sequences per part for this batch (0 = whole), None while "auto" has yet to measure."""
        if self.size != AUTO:
            return self.size
        if not self.exact_in_parts:
            return 1
        rows, lead = batch_rows(batch), lead_tensor(batch)
        if rows is None or self.whole_batches:
            return 0
        if self.token_budget is None:
            if read_memory(lead.device) is None:
                self.whole_batches = True
                return 0
            return None
        return max(1, min(rows, self.token_budget // _tokens_per_row(lead)))

    def _probe_then_split(self, batch: dict, weighted: bool) -> Iterator[tuple[dict, Optional[float]]]:
        rows, lead = batch_rows(batch), lead_tensor(batch)
        shares = row_shares(batch) if weighted else None
        if weighted and shares is None:  # no loss term to weight by: scored whole, as micro_batches does
            yield batch, 1.0
            return
        lo = 0
        while lo < rows and self.token_budget is None:  # the first row with loss terms, alone
            weight = float(shares[lo]) if weighted else None
            if weight is None or weight > 0.0:
                before = read_memory(lead.device, reset_peak=True)
                yield rows_part(batch, lo, lo + 1), weight
                self._measured(before, read_memory(lead.device), _tokens_per_row(lead))
            lo += 1
        size = self._size(batch) if self.token_budget is not None else 1
        for start in range(lo, rows, size):
            weight = float(shares[start:start + size].sum()) if weighted else None
            if weight is None or weight > 0.0:
                yield rows_part(batch, start, start + size), weight

    def _measured(self, before: DeviceMemory, after: DeviceMemory, tokens: int) -> None:
        per_token = max(after.peak - before.allocated, 1) / max(tokens, 1)
        self.token_budget = int(HEADROOM * max(before.available, 0) / per_token)
        logger.info(f"calibration_micro_batch_size='auto': one sequence of {tokens} tokens peaked "
                    f"{(after.peak - before.allocated) / 2**20:.0f} MiB above the {before.allocated / 2**20:.0f} MiB "
                    f"held, with {before.available / 2**30:.1f} GiB available: parts of up to "
                    f"{self.token_budget} tokens, never more than the batch")


def _tokens_per_row(lead: torch.Tensor) -> int:
    """Elements of one row of the lead tensor (tokens, for input_ids): what a part's memory grows with."""
    return max(1, lead[0].numel())
