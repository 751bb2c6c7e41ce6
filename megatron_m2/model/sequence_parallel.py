"""Sequence parallelism (Megatron semantics) on the packed multiway sequence.

With ``--sequence-parallel`` the activations between the tensor-parallel regions (the residual
stream, the LayerNorms, the bias-dropout-adds, the pipeline's messages) are sharded along the
sequence across the TP group instead of being replicated: each column-parallel linear
all-gathers its input along the sequence (its backward reduce-scatters the input gradient),
each row-parallel linear reduce-scatters its output (backward: all-gather), and the LayerNorm
weights that see one shard of the tokens have their gradients summed across TP by megatron's
``finalize_model_grads`` (the ``sequence_parallel`` parameter attribute). The linears are
megatron's own (local or Transformer Engine), unchanged.

The packed sequence is two parts (vision rows, then text rows) that go through different
branches of every multiway module. Cutting the whole sequence into TP contiguous shards would
give each rank a different vision/text split and the per-branch linears unequal all-gathers,
so **each part is sharded on its own**: rank r holds rows ``[r·v, (r+1)·v)`` of the vision part
followed by rows ``[r·t, (r+1)·t)`` of the text part, where ``v = ⌈s_v / TP⌉`` and
``t = ⌈s_t / TP⌉``. Every rank's shard is then an ordinary packed sequence with ``v`` vision
rows: the multiway modules route each row to its modality's branch and Sub-LN locally, and a
branch's linear all-gathers exactly its part, in order.

A part whose length is not a multiple of TP is padded with zero rows at its end
(:class:`SequenceSharding`). Padded rows are masked out of attention as keys (padded text
rows are added to the text padding mask; padded vision rows get a key mask of their own), so
they change no real token, and they are cut off before anything reads the output: the last
stage gathers the parts back (:func:`gather_parts`), drops the padding, and pools the [CLS]
rows for the heads from the full sequence, on every TP rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)

__all__ = ["SequenceSharding", "padded", "scatter_parts", "gather_parts", "pad_text_mask"]


def padded(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


@dataclass(frozen=True, eq=False)
class SequenceSharding:
    """How one forward's packed sequence is split across the ``size`` ranks of ``group``.

    ``vision`` / ``text``: the real (unpadded) rows of each part in the whole sequence (0 when
    the part is absent).
    """

    size: int
    vision: int
    text: int
    group: Optional[object] = None

    @property
    def vision_padded(self) -> int:
        return padded(self.vision, self.size)

    @property
    def text_padded(self) -> int:
        return padded(self.text, self.size)

    @property
    def vision_pad(self) -> int:
        """Zero rows appended to the vision part."""
        return self.vision_padded - self.vision

    @property
    def text_pad(self) -> int:
        """Zero rows appended to the text part."""
        return self.text_padded - self.text

    @property
    def local_vision(self) -> int:
        """Vision rows of each rank's shard (its first rows)."""
        return self.vision_padded // self.size

    @property
    def local_text(self) -> int:
        return self.text_padded // self.size

    @property
    def rows(self) -> int:
        """Rows of the padded whole sequence (``size`` × the rows of one shard)."""
        return self.vision_padded + self.text_padded


def _pad_rows(x: torch.Tensor, pad: int) -> torch.Tensor:
    if not pad:
        return x
    return torch.cat([x, x.new_zeros(pad, *x.shape[1:])], dim=0)


def scatter_parts(x: torch.Tensor, sharding: SequenceSharding) -> torch.Tensor:
    """The whole packed sequence ``[vision + text, b, d]`` (identical on every TP rank) →
    this rank's shard ``[local_vision + local_text, b, d]``: each part padded and split along
    the sequence (backward: all-gather of each part's gradient)."""
    if x.shape[0] != sharding.vision + sharding.text:
        raise ValueError(f"a packed sequence of {x.shape[0]} rows for {sharding.vision} vision "
                         f"+ {sharding.text} text rows")
    parts = []
    for start, n, pad in ((0, sharding.vision, sharding.vision_pad),
                          (sharding.vision, sharding.text, sharding.text_pad)):
        if n:
            part = _pad_rows(x.narrow(0, start, n), pad)
            parts.append(scatter_to_sequence_parallel_region(part, group=sharding.group))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def gather_parts(h: torch.Tensor, sharding: SequenceSharding) -> torch.Tensor:
    """This rank's shard → the whole packed sequence ``[vision + text, b, d]`` without padding,
    on every TP rank.

    What reads the result (pooling, the ITC heads, the masked-modelling heads) runs on every TP
    rank alike, so the backward keeps each rank's own rows of the gradient
    (``tensor_parallel_output_grad=False``: a split, not a reduce-scatter that would count the
    replicated loss TP times)."""
    local = sharding.local_vision + sharding.local_text
    if h.shape[0] != local:
        raise ValueError(f"a sequence shard of {h.shape[0]} rows, expected {local} "
                         f"({sharding.local_vision} vision + {sharding.local_text} text)")
    parts = []
    for start, n, real in ((0, sharding.local_vision, sharding.vision),
                           (sharding.local_vision, sharding.local_text, sharding.text)):
        if n:
            full = gather_from_sequence_parallel_region(
                h.narrow(0, start, n), tensor_parallel_output_grad=False, group=sharding.group)
            parts.append(full[:real])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def pad_text_mask(text_pad_mask: Optional[torch.Tensor], batch: int,
                  sharding: SequenceSharding, device=None) -> Optional[torch.Tensor]:
    """The text padding mask ``[b, text]`` (True = padding) extended to the padded text part
    (the appended rows are padding); ``None`` stays ``None`` when nothing is appended."""
    if not sharding.text_pad:
        return text_pad_mask
    if text_pad_mask is None:
        text_pad_mask = torch.zeros(batch, sharding.text, dtype=torch.bool, device=device)
    extra = text_pad_mask.new_ones(text_pad_mask.shape[0], sharding.text_pad)
    return torch.cat([text_pad_mask, extra], dim=1)
