"""Validation of a planned layout: :func:`validate` returns all of its errors, its warnings and
the sizes derived from it (DP, micro-batches per step, ITC group size, recomputation).

The rules are ``m2-pretrain``'s own (:func:`megatron_m2.layout.check_layout`), applied to the
layout the planner's command line (:meth:`~megatron_m2.planner.plan.Plan.training_args`) asks
for on this cluster's world and node size; only the cluster's own sanity and the fields of the
planner's :class:`~megatron_m2.planner.inputs.Layout` that ``m2-pretrain`` has no flag for are
checked here; the objective's flags by m2-pretrain's rules
(:func:`~megatron_m2.planner.objective.objective_errors`).
"""

from __future__ import annotations

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
        gpus_per_node=cluster.gpus_per_node)


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
    warnings = list(check.warnings) + obj_warnings
    if layout.precision == "fp8":
        warnings.append("fp8 is a projection: it needs Transformer Engine layers "
                        "(--transformer-impl te); GEMMs at 2x the BF16 peak, weights keep "
                        "FP8 copies")
    return list(check.errors) + obj_errors, warnings, derived
