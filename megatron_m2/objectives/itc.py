"""GBA-ITC, M2's contrastive objective, as an :class:`~.base.Objective`.

The loss (:func:`megatron_m2.loss.itc_loss`) is the mean of the backbone-head and VL-head
symmetric InfoNCE losses (``--itc-heads both``; ``vl``: the VL head only), each with its own
learnable log-temperature, over the k·b pairs of this rank's **ITC group**: k data-parallel
ranks (``--itc-group-size``/``--itc-aggregate-nodes``; default one node's), created here at
start-up (:func:`megatron_m2.parallel.groups.create_itc_groups`). With
``--itc-accumulate-features`` the step's M micro-batches form one contrastive batch of k·M·b
pairs (:meth:`ITCObjective.cached_loss`). After every optimizer step the log-temperatures are
clamped to ``[0, LOGIT_SCALE_MAX]`` (OpenCLIP's rule). With ``--image-mask-ratio r`` each
training image keeps [CLS] and a random ``1 - r`` of its patches (FLIP's patch dropout, drawn by
:meth:`~.base.Objective.drop_patches`; evaluation runs unmasked).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from ..loss import HEAD_KEYS, LOGIT_SCALE_MAX, cached_feature_loss, itc_loss
from .base import Objective, ObjectiveContext

__all__ = ["ITCObjective"]


class ITCObjective(Objective):
    name = "itc"
    outputs = tuple(k for name in ("backbone", "vl") for k in HEAD_KEYS[name][:2])
    metrics = ("loss_backbone", "acc_backbone", "loss_vl", "acc_vl")
    supports_feature_accumulation = True
    supports_patch_dropout = True

    def __init__(self, ctx: ObjectiveContext):
        from ..parallel.groups import create_itc_groups

        super().__init__(ctx)
        args = ctx.args
        self.heads = args.itc_heads
        self.itc = create_itc_groups(args.itc_group_size, args.itc_aggregate_nodes)

    def loss(self, outputs, batch=None):
        loss, metrics = itc_loss(outputs, group=self.itc.group, heads=self.heads)
        return loss, {k: v.detach() for k, v in metrics.items()}

    def cached_loss(self, cached: List[Dict[str, torch.Tensor]], backward_scale: float
                    ) -> Tuple[torch.Tensor, List[Dict[str, torch.Tensor]],
                               Dict[str, torch.Tensor]]:
        model = self.ctx.model
        scales = {"logit_scale": model.logit_scale.float(),
                  "logit_vl_scale": model.logit_vl_scale.float()}
        return cached_feature_loss(cached, scales, group=self.itc.group, heads=self.heads,
                                   backward_scale=backward_scale)

    def after_optimizer_step(self, optimizer) -> None:
        """Keep the log-temperatures in ``[0, LOGIT_SCALE_MAX]`` after the update, as OpenCLIP
        does: the parameter and the optimizer's copy of it (fp32 main weight, or this rank's
        shard of it), so that the next step starts from the clamped value. A clamp in the loss
        instead would zero the scale's gradient once it overshoots."""
        if not self.ctx.is_last_stage:
            return
        from ..checkpoint import optimizer_state_holders

        model = self.ctx.model
        params = (model.logit_scale, model.logit_vl_scale)
        scales = {id(p) for p in params}
        with torch.no_grad():
            # Every rank holds the updated parameter (the distributed optimizer has gathered
            # it), so every rank clamps it alike; the optimizer's own copy is clamped where it
            # lives (this rank's shard, if any).
            for param in params:
                param.clamp_(0.0, LOGIT_SCALE_MAX)
            for param, holder, _, _ in optimizer_state_holders(optimizer):
                if id(param) in scales:
                    holder.clamp_(0.0, LOGIT_SCALE_MAX)

    def process_groups(self):
        return {"ITC": self.itc.group}

    def describe(self) -> str:
        return (f"GBA-ITC ({self.heads} heads), ITC groups of k={self.itc.size} "
                f"({self.itc.num_groups} groups)")
