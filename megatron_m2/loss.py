"""Image–text contrastive (ITC) objectives, all in one module.

Every function takes the process group its gather runs over explicitly. Embeddings are
L2-normalised ``[b, D]`` rows owned by this rank; a group of k ranks forms a batch of k·b pairs
whose positives sit on the diagonal.

* :func:`gather_with_grad`: all-gather with autograd — the backward reduce-scatters (sums) the
  gradients of every rank's loss back to the rows' owner. A plain ``dist.all_gather`` has no
  backward, which leaves the owner's gradient too small by the group size.
* :func:`local_contrastive_loss`: symmetric InfoNCE of this rank's rows against the gathered group
  batch (OpenCLIP "local loss + gather with grad"). Averaged over local rows; data-parallel
  gradient averaging (megatron DDP divides by the DP size) then gives the exact gradient of the
  mean loss over all samples.
* :func:`itc_loss`: the M2 training objective: the mean of the backbone-head and VL-head losses,
  each with its own clamped learnable temperature.
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
import torch.distributed as dist
from torch.nn import functional as F

__all__ = ["gather_with_grad", "local_contrastive_loss", "itc_loss", "LOGIT_SCALE_MAX"]

LOGIT_SCALE_MAX = math.log(100.0)
"""Upper clamp of the log-temperature (CLIP convention: temperature ≥ 0.01)."""


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        world = dist.get_world_size(ctx.group)
        out = grad.new_empty((grad.shape[0] // world,) + tuple(grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad.contiguous(), group=ctx.group)
        return out, None


def gather_with_grad(x: torch.Tensor, group) -> Tuple[torch.Tensor, int]:
    """All-gather ``x`` ``[b, ...]`` over ``group`` with autograd.

    Returns the ``[k·b, ...]`` group batch and the offset of this rank's rows in it. A group of
    one (or ``None``) returns ``x`` unchanged.
    """
    if group is None or dist.get_world_size(group) == 1:
        return x, 0
    return _GatherWithGrad.apply(x, group), dist.get_rank(group) * x.shape[0]


def local_contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                           group=None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Symmetric InfoNCE of this rank's pairs against the group batch.

    Args:
        image, text: ``[b, D]`` normalised embeddings of this rank's pairs.
        logit_scale: learnable log-temperature (scalar); clamped at :data:`LOGIT_SCALE_MAX`.
        group: process group of the gather (``None``: this rank's batch only).

    Returns the loss (mean over local rows of the image→text and text→image cross-entropies,
    halved) and detached diagnostics (in-batch accuracy).
    """
    all_image, offset = gather_with_grad(image, group)
    all_text, _ = gather_with_grad(text, group)
    scale = logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()
    labels = torch.arange(image.shape[0], device=image.device) + offset
    logits_i2t = scale * image @ all_text.t()
    logits_t2i = scale * text @ all_image.t()
    loss = 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))
    with torch.no_grad():
        acc = 0.5 * ((logits_i2t.argmax(-1) == labels).float().mean()
                     + (logits_t2i.argmax(-1) == labels).float().mean())
    return loss, {"acc": acc}


def itc_loss(outputs: Dict[str, torch.Tensor], group=None,
             heads: str = "both") -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """M2 training loss from the model's output dict.

    ``heads="both"`` averages the backbone-head loss (``image_feats``/``text_feats`` with
    ``logit_scale``) and the VL-head loss (``vl_*`` with ``logit_vl_scale``), as the official
    training does; ``"vl"`` uses the VL head only (e.g. when pipeline stages put the backbone
    head elsewhere).
    """
    vl, stats = local_contrastive_loss(outputs["vl_image_feats"], outputs["vl_text_feats"],
                                       outputs["logit_vl_scale"], group)
    metrics = {"loss_vl": vl.detach(), "acc_vl": stats["acc"]}
    if heads == "vl":
        return vl, metrics
    if heads != "both":
        raise ValueError(f"heads must be 'both' or 'vl', got {heads!r}")
    if "image_feats" not in outputs:
        raise ValueError("backbone-head embeddings are missing: this stage does not hold the "
                         "backbone/VL boundary (use heads='vl')")
    bb, stats = local_contrastive_loss(outputs["image_feats"], outputs["text_feats"],
                                       outputs["logit_scale"], group)
    metrics.update(loss_backbone=bb.detach(), acc_backbone=stats["acc"])
    return 0.5 * (bb + vl), metrics
