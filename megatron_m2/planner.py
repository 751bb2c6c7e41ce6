"""Dry-run planner: memory, communication, FLOPs and step time of a TP × PP × DP layout.

Everything here is arithmetic on the architecture (:class:`~megatron_m2.config.M2ModelConfig`),
the layout (:class:`Layout`) and the cluster (:class:`Cluster`); nothing is allocated and no
hardware is needed. The module imports neither torch nor megatron-core, except
:func:`build_groups`, which creates the real process groups of one rank of a large world on a
fake ``torch.distributed`` backend to prove that the mesh the plan describes is the one
megatron-core and :func:`megatron_m2.parallel.groups.create_itc_groups` build.

Conventions (all formulas are stated in the docstrings of the functions that apply them):

* byte counts are exact integers where the quantity is (weights, gradients, activations,
  payloads); ring traffic ``2(n−1)/n × payload`` is a float; ``GB`` = 10⁹ bytes, bandwidths in
  GB/s (10⁹ bytes per second, per GPU, one direction);
* "per rank" means one GPU; a stage's numbers are those of one of its TP ranks (TP ranks of a
  stage are symmetric);
* megatron-core's rank order ``tp-cp-ep-dp-pp``: ``rank = tp_rank + TP·(dp_rank + DP·pp_rank)``,
  nodes hold consecutive ranks (``node = rank // gpus_per_node``);
* what is modelled is this package's implementation: the local (pure torch) layer spec with
  SDPA attention, megatron DDP with ``grad_reduce_in_fp32=True`` and
  ``overlap_grad_reduce=False``, the contrastive loss in fp32 on the last pipeline stage.

Public API: :class:`Cluster`, :class:`Layout`, :class:`Assumptions`, :func:`make_plan` →
:class:`Plan`, :func:`recommend` → :class:`Recommendation`, :func:`rank_groups`,
:func:`build_groups`, the shared formulas (:func:`ring_all_reduce_bytes`,
:func:`ring_gather_bytes`, :func:`itc_bytes_per_rank`, :func:`stage_parameters`,
:func:`layer_activation_bytes`) and the text formatters :func:`format_plan`,
:func:`format_recommendation`.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .config import ConfigError, M2ModelConfig
from .flavors import FLAVORS, count_parameters, get_flavor

__all__ = [
    "GB", "BF16_BYTES", "FP32_BYTES", "ITC_BYTES_PER_ELEMENT", "RANK_ORDER", "Cluster",
    "Layout", "Assumptions", "Plan", "Recommendation", "make_plan", "recommend",
    "rank_groups", "build_groups", "ring_all_reduce_bytes", "ring_gather_bytes",
    "itc_bytes_per_rank", "stage_layout", "stage_parameters", "layer_activation_bytes",
    "forward_flops_per_sample", "load_model_config", "format_plan", "format_recommendation",
]

GB = 10 ** 9
"""One gigabyte (decimal), the unit of the memory report and of the bandwidths (GB/s)."""
BF16_BYTES = 2
FP32_BYTES = 4
ITC_BYTES_PER_ELEMENT = FP32_BYTES
"""The trainer casts the last stage's outputs to fp32 before the loss, so the ITC gathers move
fp32 embeddings whatever the training precision."""
RANK_ORDER = "tp-cp-ep-dp-pp"
"""megatron-core's default rank order (TP fastest, PP slowest)."""
FP8_TOKEN_MULTIPLE = 16
"""FP8 GEMMs need the token dimension of each part of the packed sequence padded to this."""
LN_STATS_BYTES = 8
"""fp32 mean and reciprocal standard deviation a LayerNorm saves per token (GPU kernels)."""


# -- shared communication formulas ---------------------------------------------------------------
def ring_all_reduce_bytes(payload_bytes: float, n: int) -> float:
    """Bytes each rank sends in a ring all-reduce of ``payload_bytes`` over ``n`` ranks:
    ``2(n−1)/n × payload`` (a reduce-scatter then an all-gather, each moving (n−1)/n)."""
    return 0.0 if n <= 1 else 2.0 * (n - 1) * payload_bytes / n


def ring_gather_bytes(shard_bytes: int, n: int) -> int:
    """Bytes each rank sends in a ring all-gather (or reduce-scatter) whose per-rank shard is
    ``shard_bytes``: ``(n−1) × shard`` — the accounting of
    :class:`megatron_m2.loss.CommCounter`."""
    return 0 if n <= 1 else (n - 1) * shard_bytes


def itc_bytes_per_rank(group_size: int, batch: int, dim: int, bytes_per_element: int,
                       embeddings: int = 2) -> int:
    """Loss-side bytes one rank sends for one contrastive batch of ``batch`` local rows.

    Each of ``embeddings`` ``[batch, dim]`` tensors is all-gathered over the ITC group of
    ``group_size`` ranks in the forward and reduce-scattered back in the backward:
    ``2 × embeddings × (k−1) × batch × dim × bytes``. Global ITC is ``group_size`` = DP;
    GBA-ITC is the ITC group's k, so the ratio global / GBA is (DP−1)/(k−1).
    ``embeddings`` is 2 per ITC head (image and text): 4 for M2's two heads.
    """
    return 2 * embeddings * ring_gather_bytes(batch * dim * bytes_per_element, group_size)


# -- inputs ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cluster:
    """The machines: ``nodes`` × ``gpus_per_node`` GPUs.

    Bandwidths are per GPU and direction: NVLink 4 on H100 SXM gives 450 GB/s; one 400 Gb/s
    InfiniBand NIC per GPU gives 50 GB/s. ``peak_tflops`` is the dense BF16 peak (H100 SXM:
    989); FP8 GEMMs run at twice that.
    """

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    intra_node_gbps: float = 450.0
    inter_node_gbps: float = 50.0
    peak_tflops: float = 989.0

    @property
    def world_size(self) -> int:
        """Total GPUs (ranks)."""
        return self.nodes * self.gpus_per_node

    def node_of(self, rank: int) -> int:
        """Node index of a global rank (torchrun lays ranks out node by node)."""
        return rank // self.gpus_per_node


@dataclass(frozen=True)
class Layout:
    """How the model is parallelised and trained; field names follow m2-pretrain's flags.

    ``global_batch=None`` means ``micro_batch × world size`` (every GPU processes
    ``micro_batch`` samples' worth of compute per step whatever TP and PP are, so layouts
    compare at equal work). ``itc_group_size``/``itc_aggregate_nodes`` behave as
    ``--itc-group-size``/``--itc-aggregate-nodes`` (neither: one node's DP ranks). With
    ``recompute=True`` and ``recompute_num_layers=None`` the planner recomputes every layer
    (``--recompute-activations``: full, uniform, one layer per chunk); with
    ``recompute_num_layers=N`` the first N layers of every stage (``--recompute-method block``).
    """

    tp: int = 1
    pp: int = 1
    micro_batch: int = 8
    global_batch: Optional[int] = None
    itc_group_size: Optional[int] = None
    itc_aggregate_nodes: Optional[int] = None
    itc_heads: str = "both"
    itc_accumulate_features: bool = False
    distributed_optimizer: bool = False
    precision: str = "bf16"
    recompute: bool = False
    recompute_num_layers: Optional[int] = None

    def key(self) -> str:
        """Short label, e.g. ``TP2 PP1 DO+ RC-``."""
        return (f"TP{self.tp} PP{self.pp} DO{'+' if self.distributed_optimizer else '-'} "
                f"RC{'+' if self.recompute else '-'}")


@dataclass(frozen=True)
class Assumptions:
    """Knobs of the time and memory model that are not facts of the layout.

    * ``mfu``: fraction of the dense peak the kernels reach while computing (all of a step's
      FLOPs run at ``mfu × peak``).
    * ``overhead_gb``: fixed memory per GPU outside the model: CUDA context (~0.5 GB), cuBLAS
      and NCCL workspaces and buffers, allocator slack.
    * ``collective_latency_us``: fixed cost of every collective and p2p transfer.
    * ``dp_overlap``: fraction of the data-parallel gradient communication hidden behind the
      backward; 0 because the trainer runs megatron DDP with ``overlap_grad_reduce=False``.
    """

    mfu: float = 0.4
    overhead_gb: float = 3.0
    collective_latency_us: float = 10.0
    dp_overlap: float = 0.0


# -- the model, stage by stage ---------------------------------------------------------------------
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


def _branch_layer_params(cfg: M2ModelConfig, tp: int) -> int:
    """One branch of one layer on one TP rank.

    Column-parallel Q, K, V, FC1 (weight and bias sharded), row-parallel Out, FC2 (weight
    sharded, bias replicated), LN1 and LN2 replicated, the Sub-LN LayerNorms LNinner (width d)
    and LNffn (width d_ffn) sharded like their inputs. At TP=1 this is the per-branch layer of
    :func:`megatron_m2.flavors.count_parameters`.
    """
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    column = 3 * (d * d // tp + d // tp) + (d * f // tp + f // tp)
    row = (d * d // tp + d) + (f * d // tp + d)
    norms = 2 * 2 * d + 2 * d // tp + 2 * f // tp
    return column + row + norms


def _branch_gemm_weights(cfg: M2ModelConfig, tp: int) -> int:
    """GEMM weight elements of one branch of one layer on one TP rank: (4d² + 2·d·d_ffn)/TP."""
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    return (4 * d * d + 2 * d * f) // tp


def stage_parameters(cfg: M2ModelConfig, tp: int, pp: int) -> List[Dict[str, int]]:
    """Parameters one TP rank of each stage holds: ``total``, ``trainable`` and ``gemm``.

    * layers: 2 branches each; the shared VL layers' branch B is frozen (never sees data);
    * the stage holding the first VL layer adds the backbone's final LayerNorm (2 branches);
    * first stage: patch Conv2d (weight + bias), CLS token, the frozen mask token, the
      vocabulary-parallel text table (``padded_vocab / TP`` rows), both position tables;
    * last stage: the VL final LayerNorm (branch B frozen), four ITC heads (d × embed_dim,
      no bias) and the two log-temperatures.

    ``gemm`` counts the GEMM weights of the trained branches (the tensors FP8 keeps cast
    copies of). Summed over stages at TP=1 ``total`` equals
    :func:`~megatron_m2.flavors.count_parameters`.
    """
    d, e = cfg.hidden_size, cfg.embed_dim
    branch, gemm = _branch_layer_params(cfg, tp), _branch_gemm_weights(cfg, tp)
    out = []
    for st in stage_layout(cfg, pp):
        total = 2 * branch * st.num_layers
        frozen = branch * st.num_vl
        gemms = gemm * (2 * st.num_sep + st.num_vl)
        if st.has_entry:
            total += 2 * 2 * d
        if st.is_first:
            total += (cfg.in_channels * cfg.patch_size ** 2 * d + d + 2 * d
                      + cfg.padded_vocab_size(tp) // tp * d
                      + (cfg.vision_pos_table + cfg.text_pos_table) * d)
            frozen += d
        if st.is_last:
            total += 2 * 2 * d + 4 * d * e + 2
            frozen += 2 * d
        out.append({"total": total, "trainable": total - frozen, "gemm": gemms})
    return out


def _padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def sequence_parts(cfg: M2ModelConfig, precision: str) -> Tuple[int, int]:
    """Tokens of the vision and text parts of the packed sequence (padded for FP8)."""
    sv, st = cfg.vision_seq_len, cfg.max_text_len
    if precision == "fp8":
        return _padded(sv, FP8_TOKEN_MULTIPLE), _padded(st, FP8_TOKEN_MULTIPLE)
    return sv, st


def layer_activation_bytes(cfg: M2ModelConfig, tp: int, tokens: int, batch: int,
                           entry: bool = False) -> int:
    """Bytes one layer saves for its backward, for ``batch`` samples of ``tokens`` tokens.

    Counted tensor by tensor for the local layer spec in bf16 (h = d, f = d_ffn, a = heads,
    t = TP; sequence parallelism is off, so LN1/LN2 and the inputs of the column-parallel
    linears are replicated across TP ranks):

    * LN1 input 2h, LN1 output (input of Q, K, V, shared by the three) 2h, LN2 input 2h,
      LN2 output (FC1 input) 2h: ``8h`` replicated;
    * attention: q, k, v and the output saved by SDPA ``8h/t``, its fp32 logsumexp ``4a/t``
      (fused kernels keep no s × s matrix, so Korthikanti et al.'s ``5as/h`` term is absent,
      and the block-diagonal split would make it ``a(s_v² + s_t²)/(s·h)`` anyway);
    * LNinner reads the attention output (already saved) and its output feeds Out: ``2h/t``;
      the FFN saves the GELU input, the LNffn input and the FC2 input: ``6f/t``. Sharded or
      not, a Sub-LN keeps only its input and two fp32 statistics per token
      (:class:`~megatron_m2.model.multiway.TPLayerNorm`);
    * LayerNorm statistics: 8 bytes (fp32 mean and rstd) per token per LayerNorm, four of them.

    Per token: ``8h + (10h + 6f + 4a)/t + 32`` (for f = 4h: 42h at TP=1, 25h at TP=2).
    No dropout (probabilities are 0). The first VL layer adds the backbone's final LayerNorm:
    ``2h + 8``. ``tests/tools/test_plan.py`` checks the total against the bytes autograd
    actually saves for the tiny flavor at TP=1 and TP=2.
    """
    h, f, a = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads
    per_token = 8 * h + (10 * h + 6 * f + 4 * a) // tp + 4 * LN_STATS_BYTES
    if entry:
        per_token += 2 * h + LN_STATS_BYTES
    return per_token * tokens * batch


def forward_flops_per_sample(cfg: M2ModelConfig, vision_tokens: int, text_tokens: int,
                             itc_batch: int, heads: int) -> Dict[str, int]:
    """Forward FLOPs of one sample, by part (a multiply-add is 2 FLOPs).

    * ``layer_gemm`` (per layer): every token goes through one branch's Q, K, V, Out, FC1, FC2:
      ``2·s·(4d² + 2·d·d_ffn)`` with s = s_v + s_t — i.e. 2 × active parameters × tokens;
    * ``layer_attention`` (per layer): QKᵀ and attention × V of the two blocks:
      ``4·d·(s_v² + s_t²)`` (padded text positions are computed and masked);
    * ``embed``: the patch Conv2d, ``2·patches·(3·p²)·d`` (the text table is a lookup);
    * ``heads``: four ``d × embed_dim`` projections of one [CLS] row each;
    * ``loss``: the logits of each head in both directions against the group batch,
      ``heads·2·2·itc_batch·embed_dim``.

    Biases, LayerNorms, GELU and softmax are left out (under 1 % at these widths).
    Training multiplies every part by 3 (forward + backward = 2 × forward).
    """
    d, f, e = cfg.hidden_size, cfg.ffn_hidden_size, cfg.embed_dim
    s = vision_tokens + text_tokens
    return {
        "layer_gemm": 2 * s * (4 * d * d + 2 * d * f),
        "layer_attention": 4 * d * (vision_tokens ** 2 + text_tokens ** 2),
        "embed": 2 * cfg.num_patches * cfg.in_channels * cfg.patch_size ** 2 * d,
        "heads": 4 * 2 * d * e,
        "loss": heads * 2 * 2 * itc_batch * e,
    }


# -- rank arithmetic -------------------------------------------------------------------------------
def rank_groups(tp: int, pp: int, world_size: int, gpus_per_node: int, itc_group_size: int,
                rank: int) -> Dict[str, object]:
    """This rank's coordinates and groups in megatron-core's ``tp-cp-ep-dp-pp`` order.

    ``rank = tp_rank + TP·(dp_rank + DP·pp_rank)``: the TP group is TP consecutive ranks, the
    DP group the ranks sharing (tp_rank, pp_rank) with stride TP, the PP group stride TP·DP;
    the ITC group is the k consecutive members of the DP group that contain this rank.
    """
    dp = world_size // (tp * pp)
    tp_rank, dp_rank, pp_rank = rank % tp, (rank // tp) % dp, rank // (tp * dp)
    dp_group = [tp_rank + tp * j + tp * dp * pp_rank for j in range(dp)]
    start = dp_rank // itc_group_size * itc_group_size
    return {
        "rank": rank, "node": rank // gpus_per_node,
        "tp_rank": tp_rank, "dp_rank": dp_rank, "pp_rank": pp_rank,
        "tp_group": [rank - tp_rank + i for i in range(tp)],
        "pp_group": [tp_rank + tp * dp_rank + tp * dp * i for i in range(pp)],
        "dp_group": dp_group,
        "itc_group": dp_group[start:start + itc_group_size],
    }


def _all_dp_groups(tp: int, pp: int, world: int) -> List[List[int]]:
    dp = world // (tp * pp)
    return [[t + tp * j + tp * dp * p for j in range(dp)] for p in range(pp) for t in range(tp)]


def _misaligned_itc_group(groups: List[List[int]], k: int, gpn: int) -> Optional[str]:
    """The first ITC group that holds part of a node's DP ranks while spanning several nodes
    (the check of :func:`megatron_m2.parallel.groups.create_itc_groups`), else None."""
    for dp in groups:
        for i in range(0, len(dp), k):
            ranks = dp[i:i + k]
            spanned = sorted({r // gpn for r in ranks})
            if len(spanned) == 1:
                continue
            for n in spanned:
                on_node = [r for r in dp if r // gpn == n]
                if not set(on_node) <= set(ranks):
                    return (f"ITC group {short_ranks(ranks)} is not node-aligned: it holds part of "
                            f"node {n}'s DP ranks {short_ranks(on_node)}")
    return None


def short_ranks(ranks: Sequence[int], limit: int = 8) -> str:
    """A rank list for messages: in full up to ``limit`` ranks, else its ends and length."""
    ranks = list(ranks)
    if len(ranks) <= limit:
        return str(ranks)
    return f"[{', '.join(map(str, ranks[:limit // 2]))}, ..., {ranks[-1]}] ({len(ranks)} ranks)"


def _spans_nodes(groups: List[List[int]], gpn: int) -> bool:
    return any(len({r // gpn for r in g}) > 1 for g in groups)


# -- validation -----------------------------------------------------------------------------------
def _recompute_setting(cfg: M2ModelConfig, layout: Layout, pp: int,
                       errors: List[str]) -> Optional[Tuple[str, int]]:
    """(method, layers) of the recomputation, following m2-pretrain's rules; None if off."""
    if not layout.recompute:
        if layout.recompute_num_layers is not None:
            errors.append("recompute_num_layers is set but recompute is off")
        return None
    per_stage = cfg.num_layers // pp
    if layout.recompute_num_layers is None:
        return "uniform", 1
    n = layout.recompute_num_layers
    if not 1 <= n <= per_stage:
        errors.append(f"--recompute-num-layers ({n}) must be between 1 and the layers per "
                      f"pipeline stage ({per_stage})")
        return None
    return "block", n


def _validate(cfg: M2ModelConfig, layout: Layout, cluster: Cluster):
    """All of the layout's errors (not just the first), warnings and derived sizes."""
    errors: List[str] = []
    warnings: List[str] = []
    derived: Dict[str, object] = {}
    tp, pp, world, gpn = layout.tp, layout.pp, cluster.world_size, cluster.gpus_per_node
    if cluster.nodes < 1 or gpn < 1:
        return ["nodes and gpus_per_node must be >= 1"], warnings, derived
    if tp < 1 or pp < 1:
        return ["--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1"
                ], warnings, derived
    if layout.precision not in ("bf16", "fp8"):
        errors.append(f"precision must be 'bf16' or 'fp8', got {layout.precision!r}")
    if layout.itc_heads not in ("both", "vl"):
        errors.append(f"itc_heads must be 'both' or 'vl', got {layout.itc_heads!r}")
    if world % (tp * pp):
        errors.append(f"world size {world} is not divisible by --tensor-model-parallel-size "
                      f"({tp}) x --pipeline-model-parallel-size ({pp})")
    if cfg.num_attention_heads % tp:
        errors.append(f"tensor-model-parallel-size ({tp}) must divide num_attention_heads "
                      f"({cfg.num_attention_heads})")
    if cfg.ffn_hidden_size % tp:
        errors.append(f"tensor-model-parallel-size ({tp}) must divide ffn_hidden_size "
                      f"({cfg.ffn_hidden_size})")
    if cfg.num_layers % pp:
        errors.append(f"pipeline-model-parallel-size ({pp}) must divide the number of layers "
                      f"({cfg.num_sep_layers} + {cfg.num_vl_layers} = {cfg.num_layers})")
    if tp > gpn or gpn % tp:
        errors.append(f"tensor-model-parallel-size ({tp}) must divide the GPUs per node ({gpn}): "
                      f"a TP group must lie within one node (its all-reduces run every layer)")
    gbs = layout.global_batch or layout.micro_batch * world
    derived["global_batch"] = gbs
    if layout.micro_batch < 1 or gbs < 1:
        errors.append("--micro-batch-size and --global-batch-size must be >= 1")
    if errors:
        return errors, warnings, derived

    dp = world // (tp * pp)
    derived["dp"] = dp
    if gbs % (layout.micro_batch * dp):
        errors.append(f"--global-batch-size ({gbs}) must be divisible by --micro-batch-size "
                      f"({layout.micro_batch}) x data-parallel size ({dp})")
    else:
        derived["num_micro_batches"] = gbs // (layout.micro_batch * dp)

    # ITC group size, as resolve_itc_group_size() computes it on every rank.
    per_node = set()
    for g in _all_dp_groups(tp, pp, world):
        counts = Counter(r // gpn for r in g)
        per_node.update(counts.values())
    dp_per_node = min(per_node)
    derived["dp_ranks_per_node"] = dp_per_node
    gs, agg = layout.itc_group_size, layout.itc_aggregate_nodes
    k = None
    if gs is not None and agg is not None:
        errors.append("--itc-group-size and --itc-aggregate-nodes are mutually exclusive")
    elif gs is not None:
        k = dp if gs == -1 else gs
        what = f"--itc-group-size ({gs})"
        if k < 1 or dp % k:  # m2-pretrain's argument check
            errors.append(f"--itc-group-size ({gs}) must divide the data-parallel size ({dp})")
            k = None
    elif agg is not None:
        if agg != -1 and agg < 1:
            errors.append(f"--itc-aggregate-nodes must be -1 or >= 1, got {agg}")
        else:
            k = dp if agg == -1 else agg * dp_per_node
            what = f"--itc-aggregate-nodes ({agg}) x {dp_per_node} DP ranks per node"
    else:
        k = min(dp_per_node, dp)
        what = f"one node's DP ranks ({dp_per_node})"
    if k is not None:
        if len(per_node) > 1 and gs is None:
            errors.append(f"ranks see different numbers of their DP group's ranks on their node "
                          f"({sorted(per_node)}): a node-derived ITC group size is ambiguous")
        elif not 1 <= k <= dp:
            errors.append(f"ITC group size {what} = {k} must lie in [1, data-parallel size "
                          f"{dp}]")
        elif dp % k:
            errors.append(f"ITC group size {what} = {k} must divide the data-parallel size "
                          f"({dp})")
        else:
            derived["itc_group_size"] = k
            bad = _misaligned_itc_group(_all_dp_groups(tp, pp, world), k, gpn)
            if bad and gs is None:
                errors.append(bad)
            elif bad:
                warnings.append(f"{bad}; m2-pretrain accepts an explicit --itc-group-size that "
                                f"straddles nodes, but its gathers then use the inter-node link")
            if k == 1:
                warnings.append("ITC group k = 1: each rank's contrastive loss sees only its own "
                                "pairs (no gathered negatives)")

    if pp > 1 and layout.itc_heads == "both":
        per_stage = cfg.num_layers // pp
        if cfg.num_vl_layers > per_stage:
            errors.append(f"--itc-heads both needs the backbone/VL boundary on the last pipeline "
                          f"stage, but {pp} stages of {per_stage} layers put VL layers on "
                          f"earlier stages; use fewer stages or --itc-heads vl")
    derived["recompute"] = _recompute_setting(cfg, layout, pp, errors)
    m = derived.get("num_micro_batches")
    if m is not None and pp > 1 and m < pp:
        warnings.append(f"{m} micro-batches per step for {pp} pipeline stages: the pipeline "
                        f"never fills (bubble {(pp - 1) / (m + pp - 1):.0%})")
    if layout.precision == "fp8":
        warnings.append("fp8 is a projection: it needs Transformer Engine layers "
                        "(--transformer-impl te); GEMMs at 2x the BF16 peak, each part of the "
                        "packed sequence padded to a multiple of 16 tokens, weights keep "
                        "FP8 copies")
    return errors, warnings, derived


# -- the plan -------------------------------------------------------------------------------------
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
        """The m2-pretrain arguments of this layout (a flavor's name, or ``--flavor CUSTOM``
        for a configuration read from JSON; data arguments are not included)."""
        lay = self.layout
        args = ["--flavor", self.model_name if self.model_name in FLAVORS else "CUSTOM",
                "--tensor-model-parallel-size", str(lay.tp),
                "--pipeline-model-parallel-size", str(lay.pp),
                "--micro-batch-size", str(lay.micro_batch),
                "--global-batch-size", str(self.derived["global_batch"]),
                "--bf16", "--itc-heads", lay.itc_heads]
        if lay.precision == "fp8":
            args += ["--fp8-format", "hybrid", "--fp8-recipe", "delayed",
                     "--transformer-impl", "te"]
        if lay.distributed_optimizer:
            args.append("--use-distributed-optimizer")
        if lay.itc_group_size is not None:
            args += ["--itc-group-size", str(lay.itc_group_size)]
        if lay.itc_aggregate_nodes is not None:
            args += ["--itc-aggregate-nodes", str(lay.itc_aggregate_nodes)]
        if lay.itc_accumulate_features:
            args.append("--itc-accumulate-features")
        rc = self.derived.get("recompute")
        if rc == ("uniform", 1):
            args.append("--recompute-activations")
        elif rc:
            args += ["--recompute-granularity", "full", "--recompute-method", rc[0],
                     "--recompute-num-layers", str(rc[1])]
        elif lay.recompute:  # invalid recomputation: pass it on so that m2-pretrain says why
            args.append("--recompute-activations")
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
        }


def _link(inter: bool) -> str:
    return "inter-node" if inter else "intra-node"


def _collective(op: str, count: int, payload: float, sent: float, link: str, bw_gbps: float,
                latency_s: float) -> Dict[str, object]:
    return {"op": op, "count": count, "payload_bytes": payload, "bytes_sent": sent,
            "link": link, "time_s": count * latency_s + sent / (bw_gbps * GB)}


def make_plan(model: M2ModelConfig, layout: Layout = Layout(), cluster: Cluster = Cluster(),
              assumptions: Assumptions = Assumptions(), model_name: str = "custom") -> Plan:
    """Validate ``layout`` on ``cluster`` and, if valid, estimate memory, communication,
    FLOPs and step time (see the module docstring and docs/planner.md)."""
    errors, warnings, derived = _validate(model, layout, cluster)
    plan = Plan(model_name, model, layout, cluster, assumptions, errors, warnings, derived)
    if errors:
        return plan
    cfg, lay, cl, asm = model, layout, cluster, assumptions
    tp, pp, dp, b = lay.tp, lay.pp, derived["dp"], lay.micro_batch
    m, k, gbs = derived["num_micro_batches"], derived["itc_group_size"], derived["global_batch"]
    world, gpn = cl.world_size, cl.gpus_per_node
    latency = asm.collective_latency_us * 1e-6
    stages = stage_layout(cfg, pp)
    params = stage_parameters(cfg, tp, pp)
    recompute = derived["recompute"]
    sv, st = sequence_parts(cfg, lay.precision)
    s = sv + st
    heads = 2 if lay.itc_heads == "both" else 1
    embeddings = 2 * heads
    accum = lay.itc_accumulate_features
    itc_rows = b * m if accum else b  # local rows of one contrastive batch
    fp8 = lay.precision == "fp8"

    # ---- parameters ----
    plan.parameters = {
        "model_total": count_parameters(cfg),
        "model_total_padded_vocab": count_parameters(cfg, cfg.padded_vocab_size(tp)),
        "active_per_token": cfg.num_layers * (4 * cfg.hidden_size ** 2
                                              + 2 * cfg.hidden_size * cfg.ffn_hidden_size),
        "per_stage_rank": params,
    }

    # ---- memory ----
    capacity = cl.gpu_memory_gb * GB
    overhead = int(asm.overhead_gb * GB)
    mem_stages = []
    for st_, p in zip(stages, params):
        weights = BF16_BYTES * p["total"] + (2 * p["gemm"] if fp8 else 0)
        grads = FP32_BYTES * p["trainable"]
        optimizer = 3 * FP32_BYTES * p["trainable"]
        if lay.distributed_optimizer:
            optimizer = -(-optimizer // dp)
        in_flight = min(pp - st_.index, m)
        n_rc = 0 if recompute is None else (st_.num_layers if recompute[0] == "uniform"
                                            else recompute[1])
        full = [layer_activation_bytes(cfg, tp, s, b, entry=(st_.has_entry and i ==
                                                              cfg.num_sep_layers - st_.first_layer))
                for i in range(st_.num_layers)]
        kept = sum(BF16_BYTES * cfg.hidden_size * s * b if i < n_rc else full[i]
                   for i in range(st_.num_layers))
        per_micro = kept
        if st_.is_first:  # bf16 images (Conv2d input), token ids (int64) and the pad mask
            per_micro += b * (BF16_BYTES * cfg.in_channels * cfg.image_size ** 2
                              + 10 * cfg.max_text_len)
        working = max(full[:n_rc]) if n_rc else 0  # one recomputed layer re-materialised
        loss_bytes = 0
        if st_.is_last:  # VL final LayerNorm input, and the fp32 loss of one contrastive batch
            per_micro += (BF16_BYTES * cfg.hidden_size + LN_STATS_BYTES) * s * b
            group_rows = k * itc_rows
            loss_bytes = heads * (2 * 2 * FP32_BYTES * itc_rows * group_rows
                                  + 2 * FP32_BYTES * group_rows * cfg.embed_dim)
        activations = in_flight * per_micro + working + loss_bytes
        total = weights + grads + optimizer + activations + overhead
        mem_stages.append({
            "stage": st_.index, "layers": [st_.first_layer, st_.first_layer + st_.num_layers],
            "params": p["total"], "trainable_params": p["trainable"],
            "weights_bytes": weights, "grads_bytes": grads, "optimizer_bytes": optimizer,
            "activation_bytes_per_micro_batch": per_micro, "in_flight_micro_batches": in_flight,
            "recomputed_layers": n_rc, "recompute_working_bytes": working,
            "loss_bytes": loss_bytes, "activations_bytes": activations,
            "overhead_bytes": overhead, "total_bytes": total,
        })
    peak = max(mem_stages, key=lambda x: x["total_bytes"])
    plan.memory = {"per_stage": mem_stages, "peak_stage": peak["stage"],
                   "peak_bytes": peak["total_bytes"], "capacity_bytes": int(capacity),
                   "fits": peak["total_bytes"] <= capacity,
                   "headroom_bytes": int(capacity) - peak["total_bytes"]}

    # ---- communication ----
    def bw(inter: bool) -> float:
        return cl.inter_node_gbps if inter else cl.intra_node_gbps

    d = cfg.hidden_size
    comm: Dict[str, object] = {}
    # TP: per layer, per part of the packed sequence: forward all-reduces after Out and FC2
    # (bf16 [s_part, b, d]) and 2 fp32 statistics all-reduces ([s_part, b, 1]) in each sharded
    # Sub-LN; backward all-reduces of the input gradients of Q, K, V and FC1 and 1 per Sub-LN
    # (its two partial sums together, [s_part, b, 2]).
    big_fwd, small = 2 * BF16_BYTES * s * b * d, 2 * 2 * FP32_BYTES * s * b
    tp_stages = []
    for st_ in stages:
        n_rc = mem_stages[st_.index]["recomputed_layers"]
        fwd_passes = st_.num_layers + n_rc  # recomputed layers run their forward twice
        rows = []
        if tp > 1:
            rows.append(_collective("all_reduce fwd (Out, FC2)", 4 * fwd_passes,
                                    big_fwd * fwd_passes,
                                    ring_all_reduce_bytes(big_fwd * fwd_passes, tp),
                                    "intra-node", bw(False), latency))
            rows.append(_collective("all_reduce bwd (Q, K, V, FC1 input grads)",
                                    8 * st_.num_layers, 2 * big_fwd * st_.num_layers,
                                    ring_all_reduce_bytes(2 * big_fwd * st_.num_layers, tp),
                                    "intra-node", bw(False), latency))
            rows.append(_collective("all_reduce Sub-LN statistics fwd", 8 * fwd_passes,
                                    small * fwd_passes,
                                    ring_all_reduce_bytes(small * fwd_passes, tp),
                                    "intra-node", bw(False), latency))
            rows.append(_collective("all_reduce Sub-LN statistics bwd", 4 * st_.num_layers,
                                    small * st_.num_layers,
                                    ring_all_reduce_bytes(small * st_.num_layers, tp),
                                    "intra-node", bw(False), latency))
            if st_.is_first:
                emb = BF16_BYTES * cfg.max_text_len * b * d
                rows.append(_collective("all_reduce vocab-parallel embedding fwd", 1, emb,
                                        ring_all_reduce_bytes(emb, tp), "intra-node",
                                        bw(False), latency))
        tp_stages.append({"stage": st_.index, "per_micro_batch": rows,
                          "bytes_sent_per_micro_batch": sum(r["bytes_sent"] for r in rows),
                          "time_s_per_micro_batch": sum(r["time_s"] for r in rows),
                          "bytes_sent_per_step": m * sum(r["bytes_sent"] for r in rows),
                          "count_per_step": m * sum(r["count"] for r in rows)})
    per_layer = {"forward": {"count": 12, "payload_bytes": big_fwd + small},
                 "backward": {"count": 12, "payload_bytes": 2 * big_fwd + small}}
    for v in per_layer.values():
        v["bytes_sent"] = ring_all_reduce_bytes(v["payload_bytes"], tp)
    comm["tp"] = {"group_size": tp, "link": "intra-node" if tp > 1 else None,
                  "per_layer_per_micro_batch": per_layer if tp > 1 else None,
                  "per_stage": tp_stages}

    # PP: one bf16 [s, b, d] activation forward and its gradient backward per boundary and
    # micro-batch; rank r of stage i talks to r + TP·DP.
    hop = BF16_BYTES * s * b * d
    boundaries = []
    for i in range(pp - 1):
        inter = any((r + tp * dp * i) // gpn != (r + tp * dp * (i + 1)) // gpn
                    for r in range(tp * dp))
        boundaries.append({"stages": [i, i + 1], "link": _link(inter),
                           "bytes_per_micro_batch_each_way": hop,
                           "time_s_per_transfer": latency + hop / (bw(inter) * GB)})
    p2p_transfer = max((x["time_s_per_transfer"] for x in boundaries), default=0.0)
    comm["pp"] = {"boundaries": boundaries, "bytes_sent_per_rank_per_step": (
        2 * m * hop if pp > 2 else m * hop if pp == 2 else 0),
        "note": "a middle stage sends M activations forward and M gradients backward; "
                "first and last stages send one direction"}

    # DP: fp32 gradients of the trainable parameters (grad_reduce_in_fp32); the distributed
    # optimizer reduce-scatters them and all-gathers the updated bf16 parameters.
    dp_inter = _spans_nodes(_all_dp_groups(tp, pp, world), gpn)
    dp_stages = []
    for st_, p in zip(stages, params):
        grad_payload = FP32_BYTES * p["trainable"]
        if dp == 1:
            rows = []
        elif lay.distributed_optimizer:
            par_payload = BF16_BYTES * p["trainable"]
            rows = [_collective("reduce_scatter grads (fp32)", 1, grad_payload,
                                (dp - 1) * grad_payload / dp, _link(dp_inter), bw(dp_inter),
                                latency),
                    _collective("all_gather params (bf16)", 1, par_payload,
                                (dp - 1) * par_payload / dp, _link(dp_inter), bw(dp_inter),
                                latency)]
        else:
            rows = [_collective("all_reduce grads (fp32)", 1, grad_payload,
                                ring_all_reduce_bytes(grad_payload, dp), _link(dp_inter),
                                bw(dp_inter), latency)]
        dp_stages.append({"stage": st_.index, "collectives": rows,
                          "bytes_sent_per_step": sum(r["bytes_sent"] for r in rows),
                          "time_s": sum(r["time_s"] for r in rows)})
    comm["dp"] = {"group_size": dp, "link": _link(dp_inter) if dp > 1 else None,
                  "distributed_optimizer": lay.distributed_optimizer, "per_stage": dp_stages}

    # ITC (last stage): per contrastive batch each embedding is all-gathered (fwd) and
    # reduce-scattered (bwd) over the group; global ITC is the same with k = DP.
    dp_groups = _all_dp_groups(tp, pp, world)
    itc_groups = [g[i:i + k] for g in dp_groups for i in range(0, dp, k)]
    itc_inter = _spans_nodes(itc_groups, gpn)
    batches = 1 if accum else m

    def itc_entry(size: int, inter: bool) -> Dict[str, object]:
        per_batch = itc_bytes_per_rank(size, itc_rows, cfg.embed_dim, ITC_BYTES_PER_ELEMENT,
                                       embeddings)
        count = 2 * embeddings * batches if size > 1 else 0
        return {"group_size": size, "link": _link(inter) if size > 1 else None,
                "collectives_per_step": count,
                "bytes_per_contrastive_batch": per_batch,
                "bytes_sent_per_step": per_batch * batches,
                "time_s": count * latency + per_batch * batches / (bw(inter) * GB),
                "negatives_per_sample": size * itc_rows - 1}

    gba = itc_entry(k, itc_inter)
    glob = itc_entry(dp, dp_inter)
    comm["itc"] = {
        "heads": heads, "embeddings": embeddings, "embed_dim": cfg.embed_dim,
        "bytes_per_element": ITC_BYTES_PER_ELEMENT, "rows_per_contrastive_batch": itc_rows,
        "contrastive_batches_per_step": batches, "gba": gba, "global": glob,
        "global_over_gba": (glob["bytes_sent_per_step"] / gba["bytes_sent_per_step"]
                            if gba["bytes_sent_per_step"] else None),
        "gba_inter_node_bytes_per_step": gba["bytes_sent_per_step"] if itc_inter else 0,
    }
    plan.communication = comm

    # ---- FLOPs ----
    model_f = forward_flops_per_sample(cfg, cfg.vision_seq_len, cfg.max_text_len, k * itc_rows,
                                       heads)
    hw_f = forward_flops_per_sample(cfg, sv, st, k * itc_rows, heads)
    L = cfg.num_layers
    fwd_model_sample = (L * (model_f["layer_gemm"] + model_f["layer_attention"])
                        + model_f["embed"] + model_f["heads"] + model_f["loss"])
    model_step = 3 * fwd_model_sample * gbs
    stage_rows = []
    peak_bf16 = cl.peak_tflops * 1e12
    peak_gemm = peak_bf16 * (2 if fp8 else 1)
    for st_ in stages:
        n_rc = mem_stages[st_.index]["recomputed_layers"]
        passes = 3 + (1 if accum else 0)  # fwd + 2x bwd (+ the cached-feature forward)
        gemm = (passes * st_.num_layers + n_rc) * hw_f["layer_gemm"] * b // tp
        attn = (passes * st_.num_layers + n_rc) * hw_f["layer_attention"] * b // tp
        other = 0
        if st_.is_first:
            other += passes * hw_f["embed"] * b
        if st_.is_last:
            other += passes * hw_f["heads"] * b + 3 * hw_f["loss"] * b
        t = (gemm / peak_gemm + (attn + other) / peak_bf16) / asm.mfu
        stage_rows.append({"stage": st_.index, "flops_per_micro_batch": gemm + attn + other,
                           "gemm_flops": gemm, "attention_flops": attn, "other_flops": other,
                           "compute_time_s_per_micro_batch": t})
    hw_step = sum(r["flops_per_micro_batch"] for r in stage_rows) * tp * dp * m
    plan.flops = {
        "forward_per_sample": model_f, "model_flops_per_step": model_step,
        "hardware_flops_per_step": hw_step, "per_stage_rank": stage_rows,
        "six_n_t": (6 * plan.parameters["active_per_token"]
                    * (cfg.vision_seq_len + cfg.max_text_len) * gbs),
    }

    # ---- time ----
    slots = []
    for st_ in stages:
        t = stage_rows[st_.index]["compute_time_s_per_micro_batch"]
        t += tp_stages[st_.index]["time_s_per_micro_batch"]
        if st_.is_last and not accum:
            t += gba["time_s"] / m
        slots.append(t)
    slot = max(slots)
    pipeline = (m + pp - 1) * slot
    p2p = 2 * (m + pp - 1) * p2p_transfer if pp > 1 else 0.0
    dp_time = max(x["time_s"] for x in dp_stages) * (1 - asm.dp_overlap)
    itc_once = gba["time_s"] if accum else 0.0
    step = pipeline + p2p + dp_time + itc_once
    compute_only = (m + pp - 1) * max(r["compute_time_s_per_micro_batch"] for r in stage_rows)
    plan.time = {
        "step_time_s": step, "compute_s": compute_only,
        "tp_comm_s": (m + pp - 1) * max(x["time_s_per_micro_batch"] for x in tp_stages),
        "itc_s": gba["time_s"], "pp_p2p_s": p2p, "dp_comm_s": dp_time,
        "pipeline_bubble_fraction": (pp - 1) / (m + pp - 1),
        "samples_per_s": gbs / step,
        "mfu": model_step / (step * world * peak_gemm),
        "peak_tflops_used": peak_gemm / 1e12,
    }
    return plan


# -- recommendation -------------------------------------------------------------------------------
@dataclass
class Recommendation:
    """Result of :func:`recommend`: the fastest plan that fits, and every candidate."""

    best: Optional[Plan]
    candidates: List[Plan]

    def rows(self) -> List[Dict[str, object]]:
        """One row per candidate: its summary, and why it was rejected (if it was)."""
        out = []
        for p in self.candidates:
            row = p.summary()
            if not p.valid:
                row["rejected"] = "invalid: " + "; ".join(p.errors)
            elif not p.memory["fits"]:
                row["rejected"] = "does not fit: " + _memory_reason(p)
            out.append(row)
        return out

    def to_dict(self) -> Dict[str, object]:
        """JSON-ready form."""
        return {"best": self.best.summary() if self.best else None,
                "best_layout": dataclasses.asdict(self.best.layout) if self.best else None,
                "candidates": self.rows()}


def _memory_reason(p: Plan) -> str:
    st = p.memory["per_stage"][p.memory["peak_stage"]]
    return (f"stage {st['stage']} needs {st['total_bytes'] / GB:.1f} GB > "
            f"{p.cluster.gpu_memory_gb:g} GB (weights {st['weights_bytes'] / GB:.1f}, grads "
            f"{st['grads_bytes'] / GB:.1f}, optimizer {st['optimizer_bytes'] / GB:.1f}, "
            f"activations {st['activations_bytes'] / GB:.1f}, overhead "
            f"{st['overhead_bytes'] / GB:.1f})")


def recommend(model: M2ModelConfig, template: Layout = Layout(), cluster: Cluster = Cluster(),
              assumptions: Assumptions = Assumptions(), model_name: str = "custom",
              tp_choices: Sequence[int] = (1, 2, 4, 8)) -> Recommendation:
    """Search TP ∈ ``tp_choices`` (within a node) × PP ∈ divisors of the layer count ×
    distributed optimizer on/off × recomputation on/off, keeping the rest of ``template``
    (micro-batch, global batch, ITC settings, precision), and pick the valid plan that fits
    memory with the shortest step time (ties: less memory)."""
    pps = [p for p in range(1, model.num_layers + 1) if model.num_layers % p == 0]
    candidates = []
    for tp in tp_choices:
        if tp > cluster.gpus_per_node:
            continue
        for pp in pps:
            for dist_opt in (False, True):
                for rc in (False, True):
                    lay = dataclasses.replace(template, tp=tp, pp=pp,
                                              distributed_optimizer=dist_opt, recompute=rc,
                                              recompute_num_layers=None)
                    candidates.append(make_plan(model, lay, cluster, assumptions, model_name))
    fitting = [p for p in candidates if p.fits]
    best = min(fitting, key=lambda p: (p.time["step_time_s"], p.memory["peak_bytes"]),
               default=None)
    return Recommendation(best, candidates)


# -- process groups on a fake backend -------------------------------------------------------------
def build_groups(plan: Plan, ranks: Sequence[int]) -> Dict[str, object]:
    """Create this layout's process groups for each of ``ranks`` of the full world on CPU.

    For each rank, in this process: ``torch.distributed`` is initialised with the ``fake``
    backend (``torch.testing._internal.distributed.fake_pg``: a process group of the full
    world size that performs no communication), megatron-core's
    ``parallel_state.initialize_model_parallel(tp, pp)`` builds its groups and
    :func:`megatron_m2.parallel.groups.create_itc_groups` builds the ITC sub-mesh (node
    membership from ``LOCAL_WORLD_SIZE`` = GPUs per node, as under torchrun). The ranks of
    this rank's TP, PP, DP and ITC groups are then compared with :func:`rank_groups`.

    Two things differ from a real run, both forced by a backend without peers:
    ``create_gloo_process_groups=False`` (gloo cannot be created on a fake store; the gloo
    groups are copies of the same rank lists), and the one object collective of
    ``create_itc_groups`` (``all_gather_object`` of every rank's DP group, which a fake backend
    leaves unanswered) is answered from megatron-core's ``RankGenerator`` — after checking that
    this rank's own entry equals the DP group megatron-core just created. Everything else
    (every ``new_group``, the ITC grouping and its node-alignment check) runs unchanged.

    Returns ``{"backend": "fake", "ranks": [...], "consistent": bool}``; each rank's entry
    holds the groups built and any ``mismatches`` with the plan's arithmetic. Must run in a
    process where ``torch.distributed`` is not initialised.
    """
    if not plan.valid:
        raise ConfigError("cannot build the groups of an invalid layout: "
                          + "; ".join(plan.errors))
    import os
    import warnings as _warnings

    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore")
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from .parallel.groups import create_itc_groups

        try:
            from torch.testing._internal.distributed.fake_pg import FakeStore
        except ImportError as e:  # torch without the fake backend
            return _check_with_rank_generator(plan, ranks, f"no fake backend in this torch ({e})")

    if dist.is_initialized():
        raise RuntimeError("build_groups needs a process without an initialised "
                           "torch.distributed (it creates fake worlds of the plan's size)")
    lay, cl = plan.layout, plan.cluster
    world, tp, pp, dp = cl.world_size, lay.tp, lay.pp, plan.derived["dp"]
    generator = ps.RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order=RANK_ORDER)
    dp_of = {}
    for g in generator.get_ranks("dp"):
        for r in g:
            dp_of[r] = list(g)
    results = []
    saved_env = os.environ.get("LOCAL_WORLD_SIZE")
    real_gather = dist.all_gather_object
    try:
        os.environ["LOCAL_WORLD_SIZE"] = str(cl.gpus_per_node)
        for rank in ranks:
            if not 0 <= rank < world:
                raise ValueError(f"rank {rank} is outside the world of {world}")
            dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
            try:
                ps.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             pipeline_model_parallel_size=pp,
                                             create_gloo_process_groups=False)
                built_dp = dist.get_process_group_ranks(ps.get_data_parallel_group())

                def simulated_gather(output, obj, group=None, _me=rank):
                    if group is not None or list(obj) != dp_of[_me]:
                        raise RuntimeError(f"unexpected all_gather_object({obj!r}, group="
                                           f"{group!r}) on the fake backend")
                    output[:] = [dp_of[r] for r in range(world)]

                dist.all_gather_object = simulated_gather
                try:
                    itc = create_itc_groups(lay.itc_group_size, lay.itc_aggregate_nodes)
                finally:
                    dist.all_gather_object = real_gather
                built = {
                    "rank": rank, "node": rank // cl.gpus_per_node,
                    "tp_group": dist.get_process_group_ranks(
                        ps.get_tensor_model_parallel_group()),
                    "pp_group": dist.get_process_group_ranks(
                        ps.get_pipeline_model_parallel_group()),
                    "dp_group": built_dp,
                    "itc_group": (dist.get_process_group_ranks(itc.group)
                                  if itc.group is not None else [rank]),
                    "itc_group_size": itc.size, "itc_num_groups": itc.num_groups,
                    "dp_ranks_per_node": itc.dp_ranks_per_node,
                }
            finally:
                if ps.model_parallel_is_initialized():
                    ps.destroy_model_parallel()
                dist.destroy_process_group()
            expected = plan.rank_groups(rank)
            mismatches = [f"{key}: built {built[key]} vs planned {expected[key]}"
                          for key in ("tp_group", "pp_group", "dp_group", "itc_group")
                          if list(built[key]) != list(expected[key])]
            if built["itc_group_size"] != plan.derived["itc_group_size"]:
                mismatches.append(f"itc_group_size: built {built['itc_group_size']} vs planned "
                                  f"{plan.derived['itc_group_size']}")
            itc_nodes = sorted({r // cl.gpus_per_node for r in built["itc_group"]})
            built["itc_nodes"] = itc_nodes
            planned_link = plan.communication["itc"]["gba"]["link"]
            if planned_link == "intra-node" and len(itc_nodes) > 1:
                mismatches.append(f"ITC group spans nodes {itc_nodes} but the plan says "
                                  f"intra-node")
            built["mismatches"] = mismatches
            results.append(built)
    finally:
        dist.all_gather_object = real_gather
        if saved_env is None:
            os.environ.pop("LOCAL_WORLD_SIZE", None)
        else:
            os.environ["LOCAL_WORLD_SIZE"] = saved_env
    return {"backend": "fake", "world_size": world, "ranks": results,
            "consistent": all(not r["mismatches"] for r in results)}


def _check_with_rank_generator(plan: Plan, ranks: Sequence[int], reason: str
                               ) -> Dict[str, object]:
    """Fallback of :func:`build_groups` without a fake backend: megatron-core's
    ``RankGenerator`` (what ``initialize_model_parallel`` builds its groups from) gives the TP,
    PP and DP groups; the ITC groups come from
    :func:`~megatron_m2.parallel.groups.resolve_itc_group_size` and the node-alignment check of
    ``create_itc_groups``. No process group is created."""
    from megatron.core import parallel_state as ps

    from .parallel.groups import _check_aligned, resolve_itc_group_size

    lay, cl = plan.layout, plan.cluster
    gen = ps.RankGenerator(tp=lay.tp, ep=1, dp=plan.derived["dp"], pp=lay.pp, cp=1,
                           order=RANK_ORDER)
    by_kind = {kind: {r: list(g) for g in gen.get_ranks(kind) for r in g}
               for kind in ("tp", "pp", "dp")}
    nodes = [cl.node_of(r) for r in range(cl.world_size)]
    results = []
    for rank in ranks:
        dp = by_kind["dp"][rank]
        per_node = sum(1 for r in dp if nodes[r] == nodes[rank])
        k = resolve_itc_group_size(len(dp), per_node, lay.itc_group_size,
                                   lay.itc_aggregate_nodes)
        start = dp.index(rank) // k * k
        itc = dp[start:start + k]
        if lay.itc_group_size is None:
            _check_aligned(itc, tuple(dp), nodes)
        built = {"rank": rank, "node": nodes[rank], "tp_group": by_kind["tp"][rank],
                 "pp_group": by_kind["pp"][rank], "dp_group": dp, "itc_group": itc,
                 "itc_group_size": k, "itc_nodes": sorted({nodes[r] for r in itc})}
        expected = plan.rank_groups(rank)
        built["mismatches"] = [f"{key}: built {built[key]} vs planned {expected[key]}"
                               for key in ("tp_group", "pp_group", "dp_group", "itc_group")
                               if built[key] != expected[key]]
        results.append(built)
    return {"backend": "rank-generator", "reason": reason, "world_size": cl.world_size,
            "ranks": results, "consistent": all(not r["mismatches"] for r in results)}


# -- input helpers --------------------------------------------------------------------------------
def load_model_config(path: str) -> M2ModelConfig:
    """An :class:`M2ModelConfig` from a JSON file of its fields (a ``params`` entry, as
    ``python -m megatron_m2.flavors --json`` prints, is ignored)."""
    with open(path) as f:
        d = json.load(f)
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object of M2ModelConfig fields")
    d.pop("params", None)
    return M2ModelConfig.from_dict(d)


def resolve_model(flavor: Optional[str] = None, config_path: Optional[str] = None
                  ) -> Tuple[str, M2ModelConfig]:
    """``(name, config)`` from a flavor name or a model-config JSON file."""
    if config_path:
        return "custom", load_model_config(config_path)
    name = (flavor or "tiny").lower()
    return name, get_flavor(name)


__all__ += ["resolve_model", "StageShape", "sequence_parts", "short_ranks"]


# -- text report ----------------------------------------------------------------------------------
def _gb(x: float) -> str:
    return f"{x / GB:.2f} GB"


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:,.1f}" if ms >= 10 or ms == 0 else f"{ms:.3f}"


def _mb(x: float) -> str:
    return f"{x / 1e6:,.2f} MB"


def format_plan(plan: Plan) -> str:
    """A readable multi-line report of one plan."""
    lay, cl = plan.layout, plan.cluster
    lines = [f"M2-Encoder {plan.model_name}: {count_parameters(plan.model):,} parameters; "
             f"{cl.nodes} nodes x {cl.gpus_per_node} GPUs ({cl.world_size}), "
             f"{cl.gpu_memory_gb:g} GB each",
             f"layout: TP={lay.tp} PP={lay.pp} DP={plan.derived.get('dp', '?')}, micro-batch "
             f"{lay.micro_batch}, global batch {plan.derived.get('global_batch', '?')}, "
             f"{lay.precision}, distributed optimizer "
             f"{'on' if lay.distributed_optimizer else 'off'}, recompute "
             f"{'on' if lay.recompute else 'off'}, itc heads {lay.itc_heads}"]
    if not plan.valid:
        lines.append("INVALID layout:")
        lines += [f"  - {e}" for e in plan.errors]
        return "\n".join(lines)
    d = plan.derived
    rc = d["recompute"]
    lines.append(f"  micro-batches per step M={d['num_micro_batches']}, ITC group k="
                 f"{d['itc_group_size']} ({d['dp_ranks_per_node']} DP ranks per node)"
                 + (f", recompute {rc[0]} {rc[1]} layer(s)" if rc else ""))
    lines.append("  m2-pretrain " + " ".join(plan.training_args()))
    for w in plan.warnings:
        lines.append(f"  warning: {w}")

    mem = plan.memory
    lines.append("")
    lines.append(f"memory per GPU (peak stage {mem['peak_stage']}): {_gb(mem['peak_bytes'])} of "
                 f"{cl.gpu_memory_gb:g} GB -> {'FITS' if mem['fits'] else 'DOES NOT FIT'}")
    lines.append(f"  {'stage':>5} {'params':>14} {'weights':>10} {'grads':>10} {'optim':>10} "
                 f"{'activ.':>10} {'overhead':>9} {'total':>10}")
    for st in mem["per_stage"]:
        lines.append(f"  {st['stage']:>5} {st['params']:>14,} "
                     f"{st['weights_bytes'] / GB:>10.2f} {st['grads_bytes'] / GB:>10.2f} "
                     f"{st['optimizer_bytes'] / GB:>10.2f} {st['activations_bytes'] / GB:>10.2f} "
                     f"{st['overhead_bytes'] / GB:>9.2f} {st['total_bytes'] / GB:>10.2f}")
    st = mem["per_stage"][mem["peak_stage"]]
    lines.append(f"  activations: {_gb(st['activation_bytes_per_micro_batch'])} per micro-batch "
                 f"x {st['in_flight_micro_batches']} in flight"
                 + (f", {st['recomputed_layers']} recomputed layer(s) keep only their input"
                    if st["recomputed_layers"] else ""))

    comm = plan.communication
    lines.append("")
    lines.append("communication per rank per step:")
    tp_peak = max(comm["tp"]["per_stage"], key=lambda x: x["bytes_sent_per_step"])
    if lay.tp > 1:
        lines.append(f"  TP  (t={lay.tp}, intra-node): {tp_peak['count_per_step']:,} all-reduces,"
                     f" {_mb(tp_peak['bytes_sent_per_step'])} sent (stage {tp_peak['stage']})")
        pl = comm["tp"]["per_layer_per_micro_batch"]
        lines.append(f"      per layer and micro-batch: forward {pl['forward']['count']} "
                     f"({_mb(pl['forward']['bytes_sent'])} sent), backward "
                     f"{pl['backward']['count']} ({_mb(pl['backward']['bytes_sent'])} sent)")
        for r in tp_peak["per_micro_batch"]:
            lines.append(f"      {r['op']}: {r['count']} x per micro-batch, "
                         f"{_mb(r['bytes_sent'])} sent")
    else:
        lines.append("  TP  none (TP=1)")
    if comm["pp"]["boundaries"]:
        links = sorted({x["link"] for x in comm["pp"]["boundaries"]})
        hop = comm["pp"]["boundaries"][0]["bytes_per_micro_batch_each_way"]
        lines.append(f"  PP  p2p {_mb(hop)} per micro-batch each way, {'/'.join(links)}; "
                     f"the busiest stage sends "
                     f"{_mb(comm['pp']['bytes_sent_per_rank_per_step'])} per step")
    else:
        lines.append("  PP  none (PP=1)")
    dpc = max(comm["dp"]["per_stage"], key=lambda x: x["bytes_sent_per_step"])
    if comm["dp"]["group_size"] > 1:
        ops = " + ".join(r["op"] for r in dpc["collectives"])
        lines.append(f"  DP  (n={comm['dp']['group_size']}, {comm['dp']['link']}): {ops}: "
                     f"{_mb(dpc['bytes_sent_per_step'])} (stage {dpc['stage']})")
    else:
        lines.append("  DP  none (DP=1)")
    itc = comm["itc"]
    g, gl = itc["gba"], itc["global"]
    ratio = itc["global_over_gba"]
    lines.append(f"  ITC GBA k={g['group_size']} ({g['link'] or 'no gather'}): "
                 f"{_mb(g['bytes_sent_per_step'])}; global ITC k={gl['group_size']} "
                 f"({gl['link'] or 'no gather'}): {_mb(gl['bytes_sent_per_step'])}"
                 + (f" -> {ratio:.1f}x less" if ratio else ""))
    lines.append(f"      {itc['embeddings']} fp32 embeddings of {itc['embed_dim']} x "
                 f"{itc['rows_per_contrastive_batch']} rows, "
                 f"{itc['contrastive_batches_per_step']} contrastive batch(es) per step; "
                 f"negatives per sample {g['negatives_per_sample']} "
                 f"(global {gl['negatives_per_sample']})")

    fl, tm = plan.flops, plan.time
    lines.append("")
    lines.append(f"FLOPs per step: model {fl['model_flops_per_step'] / 1e15:,.1f} PFLOP "
                 f"(6 x {plan.parameters['active_per_token'] / 1e9:.2f} B active params x tokens "
                 f"= {fl['six_n_t'] / 1e15:,.1f} PFLOP + attention, embeddings, heads, loss); "
                 f"hardware {fl['hardware_flops_per_step'] / 1e15:,.1f} PFLOP")
    lines.append(f"step time {_ms(tm['step_time_s'])} ms = compute {_ms(tm['compute_s'])} "
                 f"(MFU {plan.assumptions.mfu:g} while computing, bubble "
                 f"{tm['pipeline_bubble_fraction']:.0%}) + TP {_ms(tm['tp_comm_s'])} + ITC "
                 f"{_ms(tm['itc_s'])} + PP {_ms(tm['pp_p2p_s'])} + DP {_ms(tm['dp_comm_s'])} ms "
                 f"(not overlapped)")
    lines.append(f"  {tm['samples_per_s']:,.0f} samples/s, MFU {tm['mfu']:.1%} of "
                 f"{tm['peak_tflops_used']:g} TFLOP/s per GPU")
    return "\n".join(lines)


def format_recommendation(rec: Recommendation, limit: Optional[int] = None) -> str:
    """The search table: fitting layouts fastest first (the first ``limit``), then those that
    do not fit with their memory, then the invalid ones grouped by reason."""
    rows = rec.rows()
    ok = sorted((r for r in rows if "rejected" not in r), key=lambda r: r["step_time_s"])
    bad = [r for r in rows if "rejected" in r]
    lines = [f"searched {len(rows)} layouts: {len(ok)} fit, "
             f"{sum(1 for r in bad if r['valid'])} do not fit, "
             f"{sum(1 for r in bad if not r['valid'])} invalid"]
    lines.append(f"  {'layout':<16} {'k':>3} {'memory':>10} {'step ms':>10} {'samples/s':>10} "
                 f"{'MFU':>6}")
    for r in ok[:limit]:
        lines.append(f"  {r['layout']:<16} {r['itc_group_size']:>3} {r['memory_gb']:>7.1f} GB "
                     f"{r['step_time_s'] * 1e3:>10.1f} {r['samples_per_s']:>10,.0f} "
                     f"{r['mfu']:>6.1%}")
    if limit is not None and len(ok) > limit:
        lines.append(f"  ... {len(ok) - limit} more that fit")
    for r in (r for r in bad if r["valid"]):
        lines.append(f"  {r['layout']:<16} {r['rejected']}")
    invalid: Dict[str, List[str]] = {}
    for r in (r for r in bad if not r["valid"]):
        invalid.setdefault(r["rejected"], []).append(r["layout"])
    for reason, keys in invalid.items():
        lines.append(f"  {', '.join(keys)}:\n      {reason}")
    if rec.best:
        lines.append(f"recommended: {rec.best.layout.key()}")
    else:
        lines.append("no layout fits")
    return "\n".join(lines)
