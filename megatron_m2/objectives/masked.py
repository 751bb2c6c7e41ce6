"""Heads and losses of M2's masked objectives (CMLM, CMIM), on megatron-core's TP layers.

* :class:`VocabParallelHead`: a linear to ``num_classes`` logits split across the
  tensor-parallel group (megatron's ``ColumnParallelLinear``, ``gather_output=False``), with
  classes padded to a multiple of TP masked out, so the loss does not depend on TP; optionally
  tied to an existing ``[classes, d]`` weight (the text embedding). Its loss is megatron's
  ``vocab_parallel_cross_entropy`` (no logits are gathered).
* :class:`PixelHead`: a linear to the pixels of a patch, replicated on the TP ranks (it is
  small), with the MAE loss on per-patch normalised pixels (:func:`patch_pixel_targets`).

Both read the fused pass's last hidden states (``fused_hidden``, ``[s_v + s_t, b, d]``) at
the masked positions only. Their parameters are a checkpoint parameter group each
(``cmlm_head.``, ``cmim_head.``; training-only: exports leave them out unless asked).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from ..checkpoint.format import register_parameter_group

__all__ = ["VocabParallelHead", "PixelHead", "patch_pixel_targets", "masked_rows",
           "default_mask_patches", "CMLM_PREFIX", "CMIM_PREFIX"]

CMLM_PREFIX = "cmlm_head."
CMIM_PREFIX = "cmim_head."


register_parameter_group(CMLM_PREFIX, training_only=True, stage="last",
                         vocab_rows=("cmlm_head.linear.weight", "cmlm_head.linear.bias"),
                         description="CMLM head (--objective m2): d -> vocabulary")
register_parameter_group(CMIM_PREFIX, training_only=True, stage="last",
                         description="CMIM head (--objective m2): d -> VQ-KD codes or pixels")


def masked_rows(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows of ``hidden`` ``[s, b, d]`` where ``mask`` ``[b, s]`` is True, sample by sample
    (``[n, d]``, in the order of ``mask.nonzero()``)."""
    return hidden.transpose(0, 1)[mask]


class VocabParallelHead(nn.Module):
    """``d -> num_classes`` logits, vocabulary-parallel across the TP group.

    Args:
        hidden_size: d.
        num_classes: the classes (vocabulary size or codebook size); padded to a multiple of
            the TP size, padded classes never predicted (their logits are -inf).
        config: the model's megatron ``TransformerConfig``.
        tp_group: the tensor-parallel group.
        tied_weight: share this ``[padded classes / TP, d]`` parameter (the rank's shard of
            the text embedding) instead of owning a weight; only a bias is created.
    """

    def __init__(self, hidden_size: int, num_classes: int, config, tp_group,
                 tied_weight: Optional[torch.nn.Parameter] = None):
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear

        self.tp_group = tp_group
        self.tp = dist.get_world_size(tp_group) if tp_group is not None else 1
        self.tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
        self.num_classes = num_classes
        self.padded = -(-num_classes // self.tp) * self.tp
        self.per_rank = self.padded // self.tp
        if tied_weight is not None and tuple(tied_weight.shape) != (self.per_rank, hidden_size):
            raise ValueError(f"tied weight of shape {tuple(tied_weight.shape)}, expected "
                             f"{(self.per_rank, hidden_size)}")
        # The head reads the whole sequence (gathered by the model under sequence parallelism,
        # on every TP rank): its linear must not gather it again along the sequence.
        if getattr(config, "sequence_parallel", False):
            config = dataclasses.replace(config, sequence_parallel=False)
        self.linear = ColumnParallelLinear(
            hidden_size, self.padded, config=config, init_method=lambda w: None, bias=True,
            gather_output=False, skip_bias_add=False,
            skip_weight_param_allocation=tied_weight is not None, tp_group=tp_group)
        # Not a submodule attribute: the embedding owns it (and the optimizer sees it once).
        self._tied = [tied_weight] if tied_weight is not None else None
        lo = self.tp_rank * self.per_rank
        self.register_buffer("_pad", torch.arange(lo, lo + self.per_rank) >= num_classes,
                             persistent=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, d]`` → this rank's fp32 logits ``[n, padded / TP]`` (padded classes -inf)."""
        weight = self._tied[0] if self._tied else None
        dtype = (weight if weight is not None else self.linear.weight).dtype
        # The trainer hands the last stage's outputs over in fp32; the head runs in its own
        # dtype (bf16 under --bf16) and the loss in fp32.
        out, _ = self.linear(x.to(dtype).unsqueeze(1), weight=weight)  # [s, b, h] for megatron
        out = out.squeeze(1).float()
        if bool(self._pad.any()):
            out = out.masked_fill(self._pad.to(out.device), float("-inf"))
        return out

    def loss(self, x: torch.Tensor, labels: torch.Tensor
             ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy of ``x`` ``[n, d]`` against ``labels`` ``[n]`` (class ids), and
        the accuracy of the arg-max (detached). ``n = 0`` gives a zero loss that still reaches
        every parameter (so that every rank's gradients are defined)."""
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        logits = self.logits(x)
        if logits.shape[0] == 0:
            return logits.sum() * 0.0, logits.new_zeros(())
        losses = vocab_parallel_cross_entropy(logits.unsqueeze(1), labels.unsqueeze(1))
        return losses.mean(), self._accuracy(logits.detach(), labels)

    def _accuracy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Share of rows whose label has the largest logit over all TP shards."""
        best = logits.max(dim=-1).values
        lo = self.tp_rank * self.per_rank
        local = (labels >= lo) & (labels < lo + self.per_rank)
        idx = (labels - lo).clamp(0, self.per_rank - 1)
        target = torch.where(local, logits.gather(1, idx[:, None])[:, 0],
                             torch.zeros_like(best))
        if self.tp > 1:
            dist.all_reduce(best, op=dist.ReduceOp.MAX, group=self.tp_group)
            dist.all_reduce(target, group=self.tp_group)
        return (target >= best).float().mean()


def patch_pixel_targets(images: torch.Tensor, patch_size: int, eps: float = 1e-6
                        ) -> torch.Tensor:
    """Per-patch normalised pixels (MAE's ``norm_pix_loss`` targets): ``[b, C, H, W]`` →
    ``[b, num_patches, patch² · C]`` (patches row-major, each patch's values ``(p, p, C)``
    flattened), every patch shifted to mean 0 and scaled to variance 1."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.float().reshape(b, c, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=True)
    return (x - mean) / torch.sqrt(var + eps)


class PixelHead(nn.Module):
    """``d -> patch² · C`` pixel regression (replicated on the TP ranks), MSE on normalised
    pixels."""

    def __init__(self, hidden_size: int, out_features: int, device=None, dtype=None):
        super().__init__()
        self.linear = nn.Linear(hidden_size, out_features, device=device, dtype=dtype)

    def loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean squared error of ``x`` ``[n, d]`` against ``targets`` ``[n, patch² · C]``."""
        pred = self.linear(x.to(self.linear.weight.dtype)).float()
        if pred.shape[0] == 0:
            return pred.sum() * 0.0
        return F.mse_loss(pred, targets.float())


def default_mask_patches(num_patches: int) -> int:
    """The release's 80 masked patches of 196, scaled to ``num_patches`` (at least 1)."""
    return max(1, min(num_patches - 1, int(math.floor(80 / 196 * num_patches + 0.5))))
