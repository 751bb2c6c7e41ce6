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
    """Which layers and modules one pipeline stage (pipeline rank) holds."""

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
    chunks: Tuple[Tuple[int, int], ...] = ()
    """The ``[lo, hi)`` layer ranges of the rank's model chunks: one without interleaving,
    ``v`` with ``--num-layers-per-virtual-pipeline-stage`` (chunk j holds global chunk
    ``j·PP + index``)."""

    def layer_ids(self) -> List[int]:
        """The global indices of the stage's layers, chunk by chunk."""
        chunks = self.chunks or ((self.first_layer, self.first_layer + self.num_layers),)
        return [i for lo, hi in chunks for i in range(lo, hi)]


def stage_layout(cfg: M2ModelConfig, pp: int,
                 layers_per_virtual_stage: Optional[int] = None) -> List[StageShape]:
    """Split the ``L_sep + L_vl`` layers into ``pp`` equal stages (megatron's even split).

    With ``layers_per_virtual_stage = n`` (an interleaved pipeline) the layers form ``L / n``
    chunks of n layers, chunk c on pipeline rank ``c mod PP``: rank r holds chunks
    ``r, r + PP, ...`` (megatron-core's virtual pipeline ranks). The embeddings stay on rank 0
    (its first chunk), the final LayerNorm and the heads on rank PP − 1 (its last chunk)."""
    per = cfg.num_layers // pp
    n = layers_per_virtual_stage or per
    v = per // n
    stages = []
    for i in range(pp):
        chunks = tuple(((j * pp + i) * n, (j * pp + i + 1) * n) for j in range(v))
        ids = [k for lo, hi in chunks for k in range(lo, hi)]
        sep = sum(1 for k in ids if k < cfg.num_sep_layers)
        stages.append(StageShape(i, chunks[0][0], per, sep, per - sep,
                                 cfg.num_sep_layers in ids, i == 0, i == pp - 1, chunks))
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
    :func:`~megatron_m2.planner.objective.masked_settings`). ``sv`` is ``1 + keep`` under
    patch dropout; ``sv_p``/``st_p``/``s_p`` are the rows the layers process, each part padded
    to a multiple of TP under sequence parallelism (equal to ``sv``/``st``/``s`` without it).
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
        """Tokens of the packed sequence (its real rows: what the model FLOPs count)."""
        return self.sv + self.st

    @property
    def sp(self) -> bool:
        """``--sequence-parallel``."""
        return self.layout.sequence_parallel

    def padded(self, rows: int) -> int:
        """A part's rows as the layers process them: padded to a multiple of TP under
        sequence parallelism (:class:`megatron_m2.model.sequence_parallel.SequenceSharding`)."""
        return -(-rows // self.tp) * self.tp if self.sp else rows

    @property
    def sv_p(self) -> int:
        """Vision rows the layers process (padded under sequence parallelism)."""
        return self.padded(self.sv)

    @property
    def st_p(self) -> int:
        """Text rows the layers process (padded under sequence parallelism)."""
        return self.padded(self.st)

    @property
    def s_p(self) -> int:
        """Rows of the whole sequence the layers process: ``sv_p + st_p``."""
        return self.sv_p + self.st_p

    @property
    def shard(self) -> int:
        """The share of a sequence-long activation one TP rank holds outside the TP regions:
        TP under sequence parallelism, else 1 (replicated)."""
        return self.tp if self.sp else 1

    @property
    def v(self) -> int:
        """Model chunks per pipeline rank: ``L / (PP·n)`` with an interleaved pipeline, else 1."""
        n = self.layout.layers_per_virtual_stage
        return self.cfg.num_layers // (self.pp * n) if n else 1

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
        """Layers of ``stage`` whose activations are recomputed in the backward: all of them
        (uniform), or the first N of each model chunk (block: N, or N·v with v chunks per
        rank; megatron recomputes per ``TransformerBlock``, i.e. per chunk)."""
        if self.recompute is None:
            return 0
        return stage.num_layers if self.recompute[0] == "uniform" else self.recompute[1] * self.v

    def bandwidth(self, inter: bool) -> float:
        """GB/s per GPU and direction of the inter-node or the intra-node link."""
        return self.cluster.inter_node_gbps if inter else self.cluster.intra_node_gbps
