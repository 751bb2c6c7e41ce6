"""``--trim-text-padding``: each step's captions cut to the step's longest caption.

Captions are padded to the model's ``max_text_len`` by the data loader, and the padding is
masked out of attention, zeroed in the embeddings and never pooled, so the rows past the
longest caption of a batch change nothing but the cost: on short captions (the bundled demo set
averages 9 tokens against 32 rows) most of the text tower's work is padding. Cutting them is
exact up to float summation order.

The length is the longest caption of the *global* batch (one MAX all-reduce over all ranks),
rounded up for FP8's GEMM alignment: every rank, pipeline stage and micro-batch of the step runs
the same length (megatron's schedule sends one message shape per step), and a run gets the same
lengths, hence the same per-position randomness (CMLM masks), under any parallel layout.
"""

from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.distributed as dist

__all__ = ["caption_extent", "fp8_align", "trim_text_padding", "trimmed_length"]

TEXT_KEYS = ("text_ids", "text_pad_mask")
"""The micro-batch entries with one column per text row (the loader's output)."""


def caption_extent(batches: List[Dict[str, torch.Tensor]]) -> int:
    """Rows of the longest caption (framing included) in ``batches`` (padding is at the end:
    ``text_pad_mask`` is True from a caption's end on)."""
    return max(int((~b["text_pad_mask"]).sum(1).max()) for b in batches)


def fp8_align(args) -> int:
    """GEMM rows FP8 needs a multiple of under ``args`` (0 without ``--fp8-format``)."""
    from ..layout import FP8_ALIGN

    return FP8_ALIGN[args.fp8_recipe] if getattr(args, "fp8_format", None) else 0


def trimmed_length(longest: int, padded: int, micro_batch: int, align: int = 0) -> int:
    """Text rows for a step whose longest caption has ``longest`` rows: at most ``padded``
    (the loader's length) and, with FP8 (``align`` > 0), a length whose ``micro_batch`` rows
    make a multiple of ``align`` GEMM rows."""
    multiple = align // math.gcd(align, micro_batch) if align else 1
    return min(padded, -(-max(longest, 1) // multiple) * multiple)


def trim_text_padding(batches: List[Dict[str, torch.Tensor]], micro_batch: int,
                      align: int = 0) -> List[Dict[str, torch.Tensor]]:
    """``batches`` (this rank's micro-batches of one step) with their text entries cut to the
    global batch's longest caption (a collective: every rank calls it once per step)."""
    padded = int(batches[0]["text_ids"].shape[1])
    longest = torch.tensor([caption_extent(batches)], dtype=torch.int64)
    if dist.is_initialized():
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    length = trimmed_length(int(longest), padded, micro_batch, align)
    if length == padded:
        return batches
    return [{k: v[:, :length].contiguous() if k in TEXT_KEYS else v for k, v in b.items()}
            for b in batches]
