"""The plan: :class:`Plan` and :func:`make_plan`, which validates a layout and fills one section
per concern (parameters and memory, communication, FLOPs, time)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..config import M2ModelConfig
from ..flavors import FLAVORS, count_parameters
from .communication import communication_section
from .context import Context
from .flops import flops_section
from .groups import rank_groups
from .inputs import GB, Assumptions, Cluster, Layout
from .memory import (
    memory_section,
    parameters_section,
    sequence_parts,
    stage_layout,
    stage_parameters,
)
from .objective import masked_settings, objective_args
from .timing import decode_section, time_section
from .validate import validate


@dataclass
class Plan:
    """Result of :func:`make_plan`. Numeric sections are ``None`` when the layout is invalid."""

    model_name: str
    model: M2ModelConfig
    layout: Layout
    cluster: Cluster
    assumptions: Assumptions
    errors: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    derived: Dict[str, object] = field(default_factory=dict)
    parameters: Optional[Dict[str, object]] = None
    memory: Optional[Dict[str, object]] = None
    communication: Optional[Dict[str, object]] = None
    flops: Optional[Dict[str, object]] = None
    time: Optional[Dict[str, object]] = None
    decode: Optional[Dict[str, object]] = None

    @property
    def valid(self) -> bool:
        """The layout passes every rule m2-pretrain applies (and TP within a node)."""
        return not self.errors

    @property
    def fits(self) -> bool:
        """Valid, and the fullest stage's memory is within the GPU's."""
        return self.valid and bool(self.memory["fits"])

    def rank_groups(self, rank: int) -> Dict[str, object]:
        """:func:`rank_groups` for this plan's layout."""
        return rank_groups(self.layout.tp, self.layout.pp, self.cluster.world_size,
                           self.cluster.gpus_per_node, self.derived["itc_group_size"], rank)

    def training_args(self) -> List[str]:
        """The m2-pretrain arguments of this layout: ``--flavor NAME`` for a named flavor, else
        ``--model-config`` with the configuration's fields inline (data arguments are not
        included). ``--objective m2`` adds its flags
        (:func:`~megatron_m2.planner.objective.objective_args`); the scale features theirs
        (``--num-layers-per-virtual-pipeline-stage``, ``--sequence-parallel``,
        ``--overlap-grad-reduce``, ``--overlap-param-gather``, ``--ddp-bucket-size``,
        ``--image-mask-ratio``)."""
        lay = self.layout
        if self.model_name in FLAVORS and FLAVORS[self.model_name] == self.model:
            args = ["--flavor", self.model_name]
        else:
            args = ["--model-config", json.dumps(self.model.to_dict(), separators=(",", ":"))]
        args += ["--tensor-model-parallel-size", str(lay.tp),
                "--pipeline-model-parallel-size", str(lay.pp),
                "--micro-batch-size", str(lay.micro_batch),
                "--global-batch-size", str(self.derived["global_batch"]),
                "--bf16", "--itc-heads", lay.itc_heads]
        args += objective_args(lay)
        if lay.precision == "fp8":
            args += ["--fp8-format", "hybrid", "--fp8-recipe", "delayed",
                     "--transformer-impl", "te"]
        if lay.distributed_optimizer:
            args.append("--use-distributed-optimizer")
        if lay.layers_per_virtual_stage is not None:
            args += ["--num-layers-per-virtual-pipeline-stage",
                     str(lay.layers_per_virtual_stage)]
        if lay.sequence_parallel:
            args.append("--sequence-parallel")
        if lay.overlap_grad_reduce:
            args.append("--overlap-grad-reduce")
        if lay.overlap_param_gather:
            args.append("--overlap-param-gather")
        if lay.ddp_bucket_size is not None:
            args += ["--ddp-bucket-size", str(lay.ddp_bucket_size)]
        if lay.image_mask_ratio:
            args += ["--image-mask-ratio", repr(float(lay.image_mask_ratio))]
        if lay.itc_group_size is not None:
            args += ["--itc-group-size", str(lay.itc_group_size)]
        if lay.itc_aggregate_nodes is not None:
            args += ["--itc-aggregate-nodes", str(lay.itc_aggregate_nodes)]
        if lay.itc_accumulate_features:
            args.append("--itc-accumulate-features")
        # The recomputation asked for, valid or not: m2-pretrain then says why not.
        if lay.recompute and lay.recompute_num_layers is None:
            args.append("--recompute-activations")
        elif lay.recompute:
            args += ["--recompute-granularity", "full", "--recompute-method", "block",
                     "--recompute-num-layers", str(lay.recompute_num_layers)]
        return args

    def summary(self) -> Dict[str, object]:
        """A few headline numbers (used in the recommendation table)."""
        out = {"layout": self.layout.key(), "valid": self.valid}
        if self.valid:
            mem = self.memory
            out.update(fits=mem["fits"], memory_gb=round(mem["peak_bytes"] / GB, 2),
                       step_time_s=self.time["step_time_s"],
                       samples_per_s=self.time["samples_per_s"], mfu=self.time["mfu"],
                       itc_group_size=self.derived["itc_group_size"])
        return out

    def to_dict(self) -> Dict[str, object]:
        """JSON-ready form (see docs/planner.md for the schema)."""
        derived = dict(self.derived)
        if derived.get("recompute"):
            method, n = derived["recompute"]
            derived["recompute"] = {"method": method, "num_layers": n}
        return {
            "model": {"name": self.model_name, **self.model.to_dict(),
                      "params": count_parameters(self.model)},
            "cluster": dict(dataclasses.asdict(self.cluster),
                            world_size=self.cluster.world_size),
            "layout": dataclasses.asdict(self.layout),
            "assumptions": dataclasses.asdict(self.assumptions),
            "valid": self.valid, "fits": self.fits,
            "errors": list(self.errors), "warnings": list(self.warnings),
            "derived": derived,
            "training_args": self.training_args(),
            "parameters": self.parameters, "memory": self.memory,
            "communication": self.communication, "flops": self.flops, "time": self.time,
            "decode": self.decode,
        }


def _context(model: M2ModelConfig, layout: Layout, cluster: Cluster, assumptions: Assumptions,
             derived: Dict[str, object]) -> Context:
    """The :class:`Context` of a valid layout (``derived``: the validator's sizes)."""
    sv, st = sequence_parts(model, layout.precision, layout.image_mask_ratio)
    obj = masked_settings(model, layout)
    n = layout.layers_per_virtual_stage
    return Context(model, layout, cluster, assumptions, dp=derived["dp"],
                   m=derived["num_micro_batches"], k=derived["itc_group_size"],
                   gbs=derived["global_batch"], recompute=derived["recompute"],
                   stages=stage_layout(model, layout.pp, n),
                   params=stage_parameters(model, layout.tp, layout.pp, obj, n), sv=sv, st=st,
                   obj=obj)


def make_plan(model: M2ModelConfig, layout: Layout = Layout(), cluster: Cluster = Cluster(),
              assumptions: Assumptions = Assumptions(), model_name: str = "custom") -> Plan:
    """Validate ``layout`` on ``cluster`` and, if valid, estimate memory, communication,
    FLOPs and step time (see the package docstring and docs/planner.md)."""
    errors, warnings, derived = validate(model, layout, cluster)
    plan = Plan(model_name, model, layout, cluster, assumptions, errors, warnings, derived)
    if errors:
        return plan
    ctx = _context(model, layout, cluster, assumptions, derived)
    # The rows of a training step's sequence (patch dropout: 1 + keep vision rows).
    plan.derived.update(vision_rows=ctx.sv, text_rows=ctx.st)
    plan.parameters = parameters_section(ctx)
    plan.memory = memory_section(ctx)
    plan.communication = communication_section(ctx)
    plan.flops = flops_section(ctx)
    plan.time = time_section(ctx, plan.flops, plan.communication)
    plan.decode = decode_section(ctx, plan.time["step_time_s"])
    return plan
