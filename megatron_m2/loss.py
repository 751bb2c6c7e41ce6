"""Image–text contrastive (ITC) objectives, all in one module.

Every function takes the process group its gather runs over explicitly. Embeddings are
L2-normalised ``[b, D]`` rows owned by this rank; a group of k ranks forms a batch of k·b pairs
whose positives sit on the diagonal.

* :func:`gather_with_grad`: all-gather with autograd — the backward reduce-scatters (sums) the
  gradients of every rank's loss back to the rows' owner. A plain ``dist.all_gather`` has no
  backward, which leaves the owner's gradient too small by the group size.
* :func:`local_contrastive_loss`: symmetric InfoNCE of this rank's rows against the gathered group
  batch (OpenCLIP "local loss + gather with grad"). With the ITC group of GBA-ITC as ``group`` it
  is the **GBA-ITC** loss; with the whole DP group it is global ITC. Averaged over local rows;
  megatron DDP's averaging over the DP ranks then gives the exact gradient of the mean loss over
  all samples (mean over ITC groups of each group's loss).
* :func:`naive_global_loss`: the full (N·b)² logit matrix on every rank, VLMo style, as a
  baseline. Its embeddings are gathered without a reduce in the backward (each rank
  back-propagates only its own copy of the loss into its own rows), so after DDP's averaging
  over the N ranks its gradients are exactly 1/N of global ITC's, while its loss value is the
  same.
* :func:`itc_loss`: the M2 training objective: the mean of the backbone-head and VL-head losses,
  each with its own learnable temperature.
* :func:`cached_feature_loss`: the loss step of batch (feature) accumulation (GradCache): the loss
  over M cached micro-batches and the gradient of each cached embedding.

:class:`CommCounter` records, at the point where each collective is issued, the bytes this rank
sends and receives (ring algorithm: an all-gather or reduce-scatter over k ranks of s bytes per
rank moves (k − 1)·s bytes out and (k − 1)·s bytes in on every rank).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.nn import functional as F

__all__ = ["gather_with_grad", "local_contrastive_loss", "naive_global_loss", "itc_loss",
           "cached_feature_loss", "CommCounter", "LOGIT_SCALE_MAX", "HEAD_KEYS"]

LOGIT_SCALE_MAX = math.log(100.0)
"""Upper bound of the log-temperature (CLIP convention: temperature ≥ 0.01). As in OpenCLIP it is
enforced on the *parameter* after each optimizer step (the trainer clamps it to ``[0, max]``),
not inside the loss: a clamp in the forward would zero the scale's gradient once it overshoots,
so it could never come back down."""

HEAD_KEYS = {"backbone": ("image_feats", "text_feats", "logit_scale"),
             "vl": ("vl_image_feats", "vl_text_feats", "logit_vl_scale")}
"""Output keys of each ITC head: (image embedding, text embedding, log-temperature)."""


# -- communication accounting -------------------------------------------------------------------
@dataclass
class CommCounter:
    """Bytes sent/received by this rank in the loss's collectives while active."""

    sent: int = 0
    received: int = 0
    calls: List[Tuple[str, int, int]] = field(default_factory=list)

    def record(self, op: str, group_size: int, bytes_per_rank: int) -> None:
        moved = (group_size - 1) * bytes_per_rank
        self.sent += moved
        self.received += moved
        self.calls.append((op, group_size, bytes_per_rank))


_COUNTERS: List[CommCounter] = []


@contextlib.contextmanager
def count_communication():
    """Context manager yielding a :class:`CommCounter` of the ITC collectives issued inside."""
    c = CommCounter()
    _COUNTERS.append(c)
    try:
        yield c
    finally:
        _COUNTERS.remove(c)


def _record(op: str, group, shard: torch.Tensor) -> None:
    if _COUNTERS:
        k = dist.get_world_size(group)
        for c in _COUNTERS:
            c.record(op, k, shard.numel() * shard.element_size())


# -- gathers --------------------------------------------------------------------------------------
# torch >= 2.13 names the tensor-in/tensor-out collectives *_single (and deprecates the old
# names); clusters on older torch only have the *_tensor ones.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = (getattr(dist, "reduce_scatter_single", None)
                          or dist.reduce_scatter_tensor)


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
    _record("all_gather", group, x)
    _all_gather_single(out, x.contiguous(), group=group)
    return out


class _GatherWithGrad(torch.autograd.Function):
    """Forward all-gather; backward reduce-scatter (sum) to the owner."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        world = dist.get_world_size(ctx.group)
        out = grad.new_empty((grad.shape[0] // world,) + tuple(grad.shape[1:]))
        _record("reduce_scatter", ctx.group, out)
        _reduce_scatter_single(out, grad.contiguous(), group=ctx.group)
        return out, None


class _GatherOwnSlice(torch.autograd.Function):
    """Forward all-gather; backward keeps this rank's slice of its own gradient (no reduce)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.rank, ctx.b = dist.get_rank(group), x.shape[0]
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[ctx.rank * ctx.b:(ctx.rank + 1) * ctx.b].contiguous(), None


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def gather_with_grad(x: torch.Tensor, group) -> Tuple[torch.Tensor, int]:
    """All-gather ``x`` ``[b, ...]`` over ``group`` with autograd.

    Returns the ``[k·b, ...]`` group batch and the offset of this rank's rows in it. A group of
    one (or ``None``) returns ``x`` unchanged.
    """
    if _group_size(group) == 1:
        return x, 0
    return _GatherWithGrad.apply(x, group), dist.get_rank(group) * x.shape[0]


# -- losses ---------------------------------------------------------------------------------------
def _scale(logit_scale: torch.Tensor) -> torch.Tensor:
    return logit_scale.exp()


def _symmetric_ce(image, text, all_image, all_text, scale, labels):
    logits_i2t = scale * image @ all_text.t()
    logits_t2i = scale * text @ all_image.t()
    loss = 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))
    with torch.no_grad():
        acc = 0.5 * ((logits_i2t.argmax(-1) == labels).float().mean()
                     + (logits_t2i.argmax(-1) == labels).float().mean())
    return loss, acc


def local_contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                           group=None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Symmetric InfoNCE of this rank's pairs against the group batch (GBA-ITC).

    Args:
        image, text: ``[b, D]`` normalised embeddings of this rank's pairs.
        logit_scale: learnable log-temperature (scalar), used as it is (the trainer keeps it
            within ``[0, LOGIT_SCALE_MAX]``).
        group: the ITC group of the gather (``None``: this rank's batch only).

    Returns the loss (mean over local rows of the image→text and text→image cross-entropies,
    halved) and detached diagnostics (in-batch accuracy).
    """
    all_image, offset = gather_with_grad(image, group)
    all_text, _ = gather_with_grad(text, group)
    labels = torch.arange(image.shape[0], device=image.device) + offset
    loss, acc = _symmetric_ce(image, text, all_image, all_text, _scale(logit_scale), labels)
    return loss, {"acc": acc}


def naive_global_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                      group=None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Baseline: every rank builds the full (N·b) × (N·b) logits and averages over all rows.

    The loss value equals global ITC's. The gradient reaching this rank's embeddings is that of
    the full loss through this rank's copy only (no reduce in the gather's backward): 1/N of what
    :func:`local_contrastive_loss` gives over the same group, so after data-parallel averaging
    the model receives 1/N of the exact gradient (N = group size).
    """
    if _group_size(group) == 1:
        all_image, all_text = image, text
    else:
        all_image = _GatherOwnSlice.apply(image, group)
        all_text = _GatherOwnSlice.apply(text, group)
    labels = torch.arange(all_image.shape[0], device=image.device)
    loss, acc = _symmetric_ce(all_image, all_text, all_image, all_text, _scale(logit_scale),
                              labels)
    return loss, {"acc": acc}


def itc_loss(outputs: Dict[str, torch.Tensor], group=None,
             heads: str = "both") -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """M2 training loss from the model's output dict.

    ``heads="both"`` averages the backbone-head loss (``image_feats``/``text_feats`` with
    ``logit_scale``) and the VL-head loss (``vl_*`` with ``logit_vl_scale``), as the official
    training does; ``"vl"`` uses the VL head only (e.g. when pipeline stages put the backbone
    head elsewhere).
    """
    if heads not in ("both", "vl"):
        raise ValueError(f"heads must be 'both' or 'vl', got {heads!r}")
    names = ["vl"] if heads == "vl" else ["backbone", "vl"]
    if heads == "both" and "image_feats" not in outputs:
        raise ValueError("backbone-head embeddings are missing: this stage does not hold the "
                         "backbone/VL boundary (use heads='vl')")
    total, metrics = 0.0, {}
    for name in names:
        img, txt, scale = HEAD_KEYS[name]
        loss, stats = local_contrastive_loss(outputs[img], outputs[txt], outputs[scale], group)
        metrics[f"loss_{name}"] = loss.detach()
        metrics[f"acc_{name}"] = stats["acc"]
        total = total + loss
    return total / len(names), metrics


def cached_feature_loss(micro_outputs: Sequence[Dict[str, torch.Tensor]],
                        scales: Dict[str, torch.Tensor], group=None, heads: str = "both",
                        backward_scale: float = 1.0
                        ) -> Tuple[torch.Tensor, List[Dict[str, torch.Tensor]],
                                   Dict[str, torch.Tensor]]:
    """Loss step of batch (feature) accumulation over M cached micro-batches (GradCache).

    Args:
        micro_outputs: the embeddings of each of this rank's M micro-batches, computed without a
            graph (``[b, D]`` tensors under the keys of :data:`HEAD_KEYS`).
        scales: the live log-temperatures ``{"logit_scale": p, "logit_vl_scale": q}``.
        group: the ITC group; the loss sees k·M·b pairs, i.e. k·M·b − 1 negatives per sample.
        backward_scale: multiplies the loss before its backward (a mixed-precision loss scale);
            the returned embedding gradients are for the unscaled loss.

    Runs the backward itself (one pass, so the gather's reduce-scatter runs once): gradients of
    the log-temperatures accumulate into their ``.grad`` (through megatron DDP's hooks when they
    are model parameters). Returns ``(loss, grads, metrics)``, with ``grads[i][key]`` the gradient
    of the loss with respect to micro-batch i's cached embedding ``key``, to be injected by
    re-forwarding that micro-batch with a graph.
    """
    keys = [k for name in (["vl"] if heads == "vl" else ["backbone", "vl"])
            for k in HEAD_KEYS[name][:2]]
    leaves = [{k: out[k].detach().requires_grad_(True) for k in keys} for out in micro_outputs]
    cat = {k: torch.cat([leaf[k] for leaf in leaves], dim=0) for k in keys}
    loss, metrics = itc_loss({**cat, **scales}, group=group, heads=heads)
    (loss * backward_scale).backward()
    per_micro = [{k: leaf[k].grad / backward_scale for k in keys} for leaf in leaves]
    return loss.detach(), per_micro, metrics
