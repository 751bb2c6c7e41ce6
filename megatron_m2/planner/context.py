"""What every section of a valid plan reads: the inputs and the sizes derived from them.

:func:`megatron_m2.planner.plan.make_plan` builds one :class:`Context` once the layout has passed
:func:`~megatron_m2.planner.validate.validate`; the section functions (parameters and memory,
communication, FLOPs, time) take it instead of a dozen arguments each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from ..config import M2ModelConfig
from .inputs import Assumptions, Cluster, Layout
from .objective import MaskedSettings


@dataclass(frozen=True)
class StageShape:
    """Which layers and modules one pipeline stage holds."""

    index: int
    first_layer: int
    num_layers: int
    num_sep: int
    """Multiway layers (both branches trained)."""
    num_vl: int
    """Shared VL layers (branch A trained, branch B frozen)."""
    has_entry: bool
    """Holds the first VL layer (with the backbone's final LayerNorm)."""
    is_first: bool
    is_last: bool


def stage_layout(cfg: M2ModelConfig, pp: int) -> List[StageShape]:
    """Split the ``L_sep + L_vl`` layers into ``pp`` equal stages (megatron's even split)."""
    per = cfg.num_layers // pp
    stages = []
    for i in range(pp):
        lo, hi = i * per, (i + 1) * per
        sep = max(0, min(hi, cfg.num_sep_layers) - lo)
        stages.append(StageShape(i, lo, per, sep, per - sep, lo <= cfg.num_sep_layers < hi,
                                 i == 0, i == pp - 1))
    return stages


@dataclass(frozen=True)
class Context:
    """A valid layout's inputs, its derived sizes and its stages.

    ``dp``, ``m`` (micro-batches per step), ``k`` (ITC group size), ``gbs`` (global batch) and
    ``recompute`` (``(method, layers)`` or None) are the validator's ``derived`` values;
    ``stages``/``params`` are :func:`~megatron_m2.planner.memory.stage_layout` and
    :func:`~megatron_m2.planner.memory.stage_parameters`; ``sv``/``st`` the vision and text
    tokens of the packed sequence (:func:`~megatron_m2.planner.memory.sequence_parts`);
    ``obj`` the settings of ``--objective m2`` (None for ``itc``:
    :func:`~megatron_m2.planner.objective.masked_settings`).
    """

    cfg: M2ModelConfig
    layout: Layout
    cluster: Cluster
    assumptions: Assumptions
    dp: int
    m: int
    k: int
    gbs: int
    recompute: Optional[Tuple[str, int]]
    stages: List[StageShape]
    params: List[Dict[str, int]]
    sv: int
    st: int
    obj: Optional[MaskedSettings] = None

    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def pp(self) -> int:
        return self.layout.pp

    @property
    def b(self) -> int:
        """Samples per micro-batch."""
        return self.layout.micro_batch

    @property
    def passes(self) -> int:
        """n: the fused (masked) passes per sample, 0 for ``--objective itc``."""
        return self.obj.passes if self.obj else 0

    @property
    def cols(self) -> int:
        """Model samples (columns) per micro-batch: ``b·(1 + n)``, the micro-batch size the
        pipeline schedule is called with."""
        return self.b * (1 + self.passes)

    @property
    def world(self) -> int:
        return self.cluster.world_size

    @property
    def gpn(self) -> int:
        return self.cluster.gpus_per_node

    @property
    def latency(self) -> float:
        """Fixed cost of one collective or p2p transfer, in seconds."""
        return self.assumptions.collective_latency_us * 1e-6

    @property
    def s(self) -> int:
        """Tokens of the packed sequence."""
        return self.sv + self.st

    @property
    def heads(self) -> int:
        """ITC heads trained: 2 (``both``) or 1 (``vl``)."""
        return 2 if self.layout.itc_heads == "both" else 1

    @property
    def embeddings(self) -> int:
        """Embeddings the ITC loss gathers: an image and a text one per head."""
        return 2 * self.heads

    @property
    def accum(self) -> bool:
        """``--itc-accumulate-features``: one contrastive batch of the whole step."""
        return self.layout.itc_accumulate_features

    @property
    def attentive(self) -> bool:
        """``--image-mask-style attentive`` with CMIM on: per-patch scores from a forward-only
        pass of the contrastive columns, broadcast from the last stage before the training
        forward."""
        return self.obj is not None and self.obj.attentive

    @property
    def scoring_pass(self) -> bool:
        """The trainer runs an extra forward-only pass of the contrastive columns for the
        attentive scores (with feature accumulation they come from its first phase)."""
        return self.attentive and not self.accum

    @property
    def itc_rows(self) -> int:
        """Local rows of one contrastive batch."""
        return self.b * self.m if self.accum else self.b

    @property
    def fp8(self) -> bool:
        return self.layout.precision == "fp8"

    def recomputed_layers(self, stage: StageShape) -> int:
        """Layers of ``stage`` whose activations are recomputed in the backward."""
        if self.recompute is None:
            return 0
        return stage.num_layers if self.recompute[0] == "uniform" else self.recompute[1]

    def bandwidth(self, inter: bool) -> float:
        """GB/s per GPU and direction of the inter-node or the intra-node link."""
        return self.cluster.inter_node_gbps if inter else self.cluster.intra_node_gbps
