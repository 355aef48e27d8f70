"""Progress bars (tqdm) that the recipe can switch off with --disable_tqdm, together with the bars of
`datasets` and `transformers`."""
from __future__ import annotations

from contextlib import contextmanager

from tqdm.auto import tqdm

_enabled = True


def bar(iterable=None, **kwargs):
    return tqdm(iterable, disable=not _enabled, **kwargs)


@contextmanager
def progress_bars(enabled: bool):
    """Within the block, show (or hide) this package's bars and those of datasets / transformers."""
    global _enabled
    import datasets
    from transformers.utils import logging as hf_logging

    before = (_enabled, datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled())
    _enabled = enabled
    for on, off, flag in ((datasets.enable_progress_bars, datasets.disable_progress_bars, before[1]),
                          (hf_logging.enable_progress_bar, hf_logging.disable_progress_bar, before[2])):
        (on if enabled and flag else off)()
    try:
        yield
    finally:
        _enabled = before[0]
        (datasets.enable_progress_bars if before[1] else datasets.disable_progress_bars)()
        (hf_logging.enable_progress_bar if before[2] else hf_logging.disable_progress_bar)()
