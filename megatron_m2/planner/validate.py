"""Validation of a planned layout: :func:`validate` returns all of its errors, its warnings and
the sizes derived from it (DP, micro-batches per step, ITC group size, recomputation).

The rules are ``m2-pretrain``'s own (:func:`megatron_m2.layout.check_layout`), applied to the
layout the planner's command line (:meth:`~megatron_m2.planner.plan.Plan.training_args`) asks
for on this cluster's world and node size; only the cluster's own sanity and the fields of the
planner's :class:`~megatron_m2.planner.inputs.Layout` that ``m2-pretrain`` has no flag for are
checked here; the objective's flags by m2-pretrain's rules
(:func:`~megatron_m2.planner.objective.objective_errors`), and so are patch dropout's
(:func:`patch_dropout_errors`) and the data-parallel overlap flags' (:func:`dp_overlap_errors`).
"""

from __future__ import annotations

import math
from typing import Dict, List, Tuple

from ..config import M2ModelConfig
from ..layout import ParallelLayout, check_layout
from .inputs import Cluster, Layout
from .objective import objective_errors

PLANNED_PRECISIONS = ("bf16", "fp8")
"""Precisions the planner models (fp8: BF16 with FP8 GEMMs, delayed scaling, TE layers)."""


def parallel_layout(layout: Layout, cluster: Cluster) -> ParallelLayout:
    """The :class:`~megatron_m2.layout.ParallelLayout` of a planned layout on ``cluster``."""
    if not layout.recompute:
        method, layers = None, None
    elif layout.recompute_num_layers is None:
        method, layers = "uniform", 1  # --recompute-activations
    else:
        method, layers = "block", layout.recompute_num_layers
    return ParallelLayout(
        tp=layout.tp, pp=layout.pp, world_size=cluster.world_size,
        micro_batch=layout.micro_batch,
        global_batch=layout.global_batch or layout.micro_batch * cluster.world_size,
        precision=layout.precision, fp8_recipe="delayed",
        transformer_impl="te" if layout.precision == "fp8" else "local",
        itc_heads=layout.itc_heads, itc_group_size=layout.itc_group_size,
        itc_aggregate_nodes=layout.itc_aggregate_nodes,
        itc_accumulate_features=layout.itc_accumulate_features, recompute_method=method,
        recompute_num_layers=layers, distributed_optimizer=layout.distributed_optimizer,
        gpus_per_node=cluster.gpus_per_node,
        layers_per_virtual_stage=layout.layers_per_virtual_stage,
        image_mask_ratio=layout.image_mask_ratio, sequence_parallel=layout.sequence_parallel)


PATCH_DROPOUT_OBJECTIVES = ("itc",)
"""Objectives with patch dropout (``Objective.supports_patch_dropout`` in m2-pretrain): the
contrastive one. ``m2``'s contrastive and fused passes share one full-length sequence."""


def patch_dropout_errors(cfg: M2ModelConfig, layout: Layout) -> List[str]:
    """``--image-mask-ratio``'s rules, m2-pretrain's (``_validate_patch_dropout``): a ratio in
    [0, 1); an objective with patch dropout (``itc``; m2-pretrain refuses it under ``m2``). (Its
    FP8 row alignment is a layout rule: :func:`megatron_m2.layout.check_layout`.)"""
    ratio = float(layout.image_mask_ratio)
    if not (math.isfinite(ratio) and 0.0 <= ratio < 1.0):
        return [f"--image-mask-ratio must be in [0, 1), got {ratio}"]
    if not ratio:
        return []
    if layout.objective not in PATCH_DROPOUT_OBJECTIVES:
        return [f"--image-mask-ratio (patch dropout) works with contrastive training only "
                f"(--objective itc); objective {layout.objective!r} has no patch dropout "
                "(m2's contrastive and fused passes share one full-length sequence)"]
    return []


def dp_overlap_errors(layout: Layout) -> List[str]:
    """m2-pretrain's rules of the data-parallel overlap flags: ``--overlap-param-gather`` needs
    ``--use-distributed-optimizer``; ``--ddp-bucket-size`` >= 1."""
    errors = []
    if layout.overlap_param_gather and not layout.distributed_optimizer:
        errors.append("--overlap-param-gather needs --use-distributed-optimizer (only the "
                      "distributed optimizer all-gathers parameters)")
    if layout.ddp_bucket_size is not None and layout.ddp_bucket_size < 1:
        errors.append(f"--ddp-bucket-size must be >= 1, got {layout.ddp_bucket_size}")
    return errors


def validate(cfg: M2ModelConfig, layout: Layout, cluster: Cluster
             ) -> Tuple[List[str], List[str], Dict[str, object]]:
    """All of the layout's errors (not just the first), warnings and derived sizes."""
    if cluster.nodes < 1 or cluster.gpus_per_node < 1:
        return ["nodes and gpus_per_node must be >= 1"], [], {}
    errors: List[str] = []
    if layout.precision not in PLANNED_PRECISIONS:
        errors.append(f"precision must be 'bf16' or 'fp8', got {layout.precision!r}")
    if layout.recompute_num_layers is not None and not layout.recompute:
        errors.append("recompute_num_layers is set but recompute is off")
    if errors:
        return errors, [], {}
    lay = parallel_layout(layout, cluster)
    check = check_layout(cfg, lay)
    obj_errors, obj_warnings = objective_errors(cfg, layout)
    derived: Dict[str, object] = {"global_batch": lay.global_batch, **check.derived}
    derived.setdefault("recompute", None)
    derived.setdefault("virtual_stages", None)
    warnings = list(check.warnings) + obj_warnings
    if layout.precision == "fp8":
        warnings.append("fp8 is a projection: it needs Transformer Engine layers "
                        "(--transformer-impl te); GEMMs at 2x the BF16 peak, weights keep "
                        "FP8 copies")
    # m2-pretrain's order: the layout, patch dropout, the objective, the DP overlap flags.
    errors = (list(check.errors) + patch_dropout_errors(cfg, layout) + obj_errors
              + dp_overlap_errors(layout))
    return errors, warnings, derived
