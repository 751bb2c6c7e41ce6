"""The parallel layout of a run and every rule it must obey, in one torch-free place.

A layout is how one model is spread over the ranks of a job (TP × PP × DP, micro- and global
batch, the GBA-ITC groups, precision, recomputation): :class:`ParallelLayout`.
:func:`check_layout` applies every rule that can be decided from the architecture and the
layout alone and returns **all** errors (not just the first), the warnings and the derived
sizes (DP, micro-batches per step, ITC group size k, recomputation) in a :class:`LayoutCheck`.

Its callers:

* ``m2-pretrain``'s argument validation (:func:`megatron_m2.training.validation.validate_args`)
  builds the layout from its flags and the launcher's world and raises the errors;
* :meth:`megatron_m2.config.M2ModelConfig.validate_parallel` (model building, conversion)
  applies the architecture's split rules (:func:`model_split_errors`);
* :func:`megatron_m2.parallel.groups.create_itc_groups` sizes and checks the ITC groups with
  :func:`resolve_itc_group_size` and :func:`misaligned_itc_group` on the real node map;
* the planner (:mod:`megatron_m2.planner`) validates every layout it plans or searches with
  :func:`check_layout`, so the command it prints is one ``m2-pretrain`` accepts.

Node membership: ranks are laid out node by node (torchrun, Slurm), ``gpus_per_node`` ranks per
node; ``None`` (unknown, e.g. argument validation outside a launcher) skips the rules that need
it (TP inside a node, node-derived ITC group size and alignment), which the runtime then
applies on the real node map.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import ConfigError

__all__ = [
    "ParallelLayout", "LayoutCheck", "check_layout", "model_split_errors", "dp_groups",
    "resolve_itc_group_size", "misaligned_itc_group", "short_ranks", "FP8_ALIGN",
    "PRECISIONS", "RECOMPUTE_METHODS", "patch_dropout_fp8_error", "patch_keep_count",
]

FP8_ALIGN = {"delayed": 16, "tensorwise": 16, "blockwise": 16, "mxfp8": 32}
"""FP8 GEMMs need every GEMM dimension divisible by this (per recipe). The model does not pad
the packed sequence: each branch's linears see ``s_part × micro_batch`` rows as they are."""
PRECISIONS = ("fp32", "bf16", "fp8")
RECOMPUTE_METHODS = ("uniform", "block")


def patch_keep_count(num_patches: int, ratio: float) -> int:
    """Patches kept per image by patch dropout at ``ratio``: ``round((1 - ratio) · P)``
    (halves rounded up), at least 1. The vision sequence then holds ``1 + keep`` rows ([CLS]
    is always kept). Torch-free: the data path, the layout rules and the planner share it."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"patch dropout ratio must be in [0, 1), got {ratio}")
    return max(1, min(int(num_patches), int(math.floor((1.0 - ratio) * num_patches + 0.5))))


@dataclass(frozen=True)
class ParallelLayout:
    """How one model is parallelised and trained; fields follow ``m2-pretrain``'s flags.

    ``recompute_method``/``recompute_num_layers``: ``None`` (off), ``"uniform"`` (checkpoint
    every chunk of N layers) or ``"block"`` (the first N layers of each stage), as megatron's
    full recomputation. ``precision="fp8"`` means BF16 with FP8 GEMMs (Transformer Engine
    layers, ``transformer_impl="te"``).
    """

    tp: int = 1
    pp: int = 1
    world_size: int = 1
    micro_batch: int = 8
    global_batch: int = 8
    precision: str = "fp32"
    fp8_recipe: str = "delayed"
    transformer_impl: str = "local"
    itc_heads: str = "both"
    itc_group_size: Optional[int] = None
    itc_aggregate_nodes: Optional[int] = None
    itc_accumulate_features: bool = False
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    distributed_optimizer: bool = False
    gpus_per_node: Optional[int] = None
    """Ranks per node (torchrun's ``LOCAL_WORLD_SIZE``); ``None``: unknown."""
    layers_per_virtual_stage: Optional[int] = None
    """``--num-layers-per-virtual-pipeline-stage``: interleaved pipeline with model chunks of
    this many layers (``None``: one chunk per stage)."""
    image_mask_ratio: float = 0.0
    """``--image-mask-ratio``: patch dropout's training steps have ``1 + keep`` vision rows."""
    sequence_parallel: bool = False
    """``--sequence-parallel``: activations outside the tensor-parallel regions sharded along
    the sequence across the TP group (each modality part padded to a multiple of TP)."""

    @property
    def dp(self) -> int:
        """Data-parallel size (0 when the world does not split into TP × PP)."""
        mp = self.tp * self.pp
        return self.world_size // mp if mp > 0 and self.world_size % mp == 0 else 0


@dataclass
class LayoutCheck:
    """Result of :func:`check_layout`."""

    errors: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    derived: Dict[str, object] = field(default_factory=dict)
    """``dp``, ``num_micro_batches``, ``dp_ranks_per_node`` (when nodes are known),
    ``itc_group_size``, ``recompute`` (``(method, layers)`` or ``None``)."""

    @property
    def valid(self) -> bool:
        return not self.errors

    def message(self) -> str:
        """All errors in one line."""
        return "; ".join(self.errors)


# -- rank arithmetic (megatron-core's ``tp-cp-ep-dp-pp`` order) ------------------------------
def dp_groups(tp: int, pp: int, world_size: int) -> List[List[int]]:
    """Global ranks of every data-parallel group: ``rank = tp_rank + TP·(dp_rank + DP·pp_rank)``."""
    dp = world_size // (tp * pp)
    return [[t + tp * j + tp * dp * p for j in range(dp)] for p in range(pp) for t in range(tp)]


def short_ranks(ranks: Sequence[int], limit: int = 8) -> str:
    """A rank list for messages: in full up to ``limit`` ranks, else its ends and length."""
    ranks = list(ranks)
    if len(ranks) <= limit:
        return str(ranks)
    return f"[{', '.join(map(str, ranks[:limit // 2]))}, ..., {ranks[-1]}] ({len(ranks)} ranks)"


# -- the rules ------------------------------------------------------------------------------------
def model_split_errors(cfg, tp: int, pp: int) -> List[str]:
    """The architecture splits ``tp`` × ``pp`` ways: heads and FFN over TP, layers over PP."""
    if tp < 1 or pp < 1:
        return ["--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1"]
    errors = []
    if cfg.num_attention_heads % tp:
        errors.append(f"tensor-model-parallel-size ({tp}) must divide num_attention_heads "
                      f"({cfg.num_attention_heads})")
    if cfg.ffn_hidden_size % tp:
        errors.append(f"tensor-model-parallel-size ({tp}) must divide ffn_hidden_size "
                      f"({cfg.ffn_hidden_size})")
    if cfg.num_layers % pp:
        errors.append(f"pipeline-model-parallel-size ({pp}) must divide the number of layers "
                      f"({cfg.num_sep_layers} + {cfg.num_vl_layers} = {cfg.num_layers})")
    return errors


def resolve_itc_group_size(dp_size: int, dp_ranks_per_node: int,
                           group_size: Optional[int] = None,
                           aggregate_nodes: Optional[int] = None) -> int:
    """k (DP ranks per ITC group) from the user's choice; raises ``ConfigError`` naming it.

    Args:
        dp_size: N, the data-parallel size.
        dp_ranks_per_node: DP ranks (of one DP group) per node.
        group_size: k in DP ranks (-1: all N). Excludes ``aggregate_nodes``.
        aggregate_nodes: k in nodes (-1: all nodes), i.e. k = nodes × DP ranks per node.
        With neither, k is one node's DP ranks (node-aligned), capped at N.
    """
    k, error = _itc_group_size(dp_size, dp_ranks_per_node, group_size, aggregate_nodes)
    if error:
        raise ConfigError(error)
    return k


def _itc_group_size(dp: int, per_node: Optional[int], group_size: Optional[int],
                    aggregate_nodes: Optional[int]) -> Tuple[Optional[int], Optional[str]]:
    """``(k, None)`` or ``(None, error)``; ``(None, None)`` when k depends on the (unknown)
    node map."""
    if group_size is not None and aggregate_nodes is not None:
        return None, "--itc-group-size and --itc-aggregate-nodes are mutually exclusive"
    if group_size is not None:
        k = dp if group_size == -1 else group_size
        if not 1 <= k <= dp:
            return None, (f"--itc-group-size ({group_size}) must divide the data-parallel size "
                          f"({dp}): k must lie in [1, {dp}]")
        if dp % k:
            return None, (f"--itc-group-size ({group_size}) must divide the data-parallel size "
                          f"({dp})")
        return k, None
    if aggregate_nodes is not None and aggregate_nodes != -1 and aggregate_nodes < 1:
        return None, f"--itc-aggregate-nodes must be -1 or >= 1, got {aggregate_nodes}"
    if aggregate_nodes == -1:
        return dp, None
    if per_node is None:
        return None, None
    if aggregate_nodes is not None:
        k = aggregate_nodes * per_node
        what = f"--itc-aggregate-nodes ({aggregate_nodes}) x {per_node} DP ranks per node"
    else:
        k = min(per_node, dp)
        what = f"one node's DP ranks ({per_node})"
    if not 1 <= k <= dp:
        return None, f"ITC group size {what} = {k} must lie in [1, data-parallel size {dp}]"
    if dp % k:
        return None, f"ITC group size {what} = {k} must divide the data-parallel size ({dp})"
    return k, None


def misaligned_itc_group(groups: Sequence[Sequence[int]], k: int,
                         nodes: Sequence[int]) -> Optional[str]:
    """The first ITC group (k consecutive ranks of a DP group) that spans several nodes while
    holding only part of one node's DP ranks, as a message; ``None`` if all are node-aligned.
    ``nodes[rank]`` is the node of a global rank."""
    for dp in groups:
        for i in range(0, len(dp), k):
            ranks = list(dp[i:i + k])
            spanned = sorted({nodes[r] for r in ranks})
            if len(spanned) == 1:
                continue
            for n in spanned:
                on_node = [r for r in dp if nodes[r] == n]
                if not set(on_node) <= set(ranks):
                    return (f"ITC group {short_ranks(ranks)} is not node-aligned: it holds part "
                            f"of node {n}'s DP ranks {short_ranks(on_node)}")
    return None


def _recompute_errors(cfg, lay: ParallelLayout) -> Tuple[Optional[Tuple[str, int]], List[str]]:
    method, n = lay.recompute_method, lay.recompute_num_layers
    if method is None:
        return None, ([] if n is None else ["--recompute-num-layers needs a recompute method"])
    if method not in RECOMPUTE_METHODS:
        return None, [f"--recompute-method must be uniform or block, got {method!r}"]
    per_stage = cfg.num_layers // lay.pp
    what = "pipeline stage"
    if lay.layers_per_virtual_stage:  # megatron recomputes per model chunk
        per_stage, what = lay.layers_per_virtual_stage, "virtual pipeline stage (model chunk)"
    if n is None or not 1 <= n <= per_stage:
        return None, [f"--recompute-num-layers ({n}) must be between 1 and the layers per "
                      f"{what} ({per_stage})"]
    if method == "uniform" and per_stage % n:
        return None, [f"--recompute-method uniform: --recompute-num-layers ({n}) must divide "
                      f"the layers per {what} ({per_stage})"]
    return (method, n), []


def _fp8_errors(cfg, lay: ParallelLayout) -> List[str]:
    """FP8 GEMMs: Transformer Engine layers, and every GEMM dimension a multiple of the
    recipe's alignment — hidden and FFN widths (per TP rank) and each branch's rows
    ``s_part × micro_batch`` (vision ``1 + patches``, text ``max_text_len``)."""
    if lay.transformer_impl != "te":
        return ["--fp8-format needs --transformer-impl te (FP8 GEMMs are Transformer Engine "
                "linears)"]
    if lay.fp8_recipe not in FP8_ALIGN:
        return [f"--fp8-recipe must be one of {', '.join(FP8_ALIGN)}, got {lay.fp8_recipe!r}"]
    align, tp, mbs = FP8_ALIGN[lay.fp8_recipe], lay.tp, lay.micro_batch
    errors = []
    widths = {"hidden size": cfg.hidden_size, "FFN width / TP": cfg.ffn_hidden_size // tp,
              "hidden size / TP": cfg.hidden_size // tp}
    bad = [f"{k} {v}" for k, v in widths.items() if v % align]
    if bad:
        errors.append(f"--fp8-recipe {lay.fp8_recipe}: GEMM widths must be multiples of "
                      f"{align}: {', '.join(bad)}")
    # Each branch's linears see a whole part (gathered along the sequence under sequence
    # parallelism, which pads each part to a multiple of TP).
    part = (lambda n: -(-n // tp) * tp) if lay.sequence_parallel else (lambda n: n)
    rows = {"vision": part(cfg.vision_seq_len) * mbs, "text": part(cfg.max_text_len) * mbs}
    bad = [f"{k} {n // mbs} tokens x {mbs} = {n}" for k, n in rows.items() if n % align]
    if bad:
        errors.append(f"--fp8-format: each branch's GEMM rows must be a multiple of {align} "
                      f"({'; '.join(bad)}); use a --micro-batch-size that is a multiple of "
                      f"{align}")
    masked = patch_dropout_fp8_error(cfg, lay.image_mask_ratio, mbs, align,
                                     tp if lay.sequence_parallel else 1)
    if masked:
        errors.append(masked)
    return errors


def patch_dropout_fp8_error(cfg, ratio: float, micro_batch: int, align: int,
                            sequence_shards: int = 1) -> Optional[str]:
    """With FP8, patch dropout's training steps give the vision branch's GEMMs
    ``(1 + keep) × micro_batch`` rows (the part padded to a multiple of ``sequence_shards``
    under sequence parallelism), which must be a multiple of ``align``: the message if not."""
    if not 0.0 < ratio < 1.0:
        return None
    rows = 1 + patch_keep_count(cfg.vision_seq_len - 1, ratio)
    rows = -(-rows // sequence_shards) * sequence_shards
    if rows * micro_batch % align == 0:
        return None
    return (f"--image-mask-ratio {ratio} with --fp8-format: the vision branch's GEMMs get "
            f"{rows} tokens x {micro_batch} rows, not a multiple of {align}; use a "
            f"--micro-batch-size that is a multiple of {align}")


def _itc_rules(lay: ParallelLayout, dp: int, check: LayoutCheck) -> None:
    gpn = lay.gpus_per_node
    groups = dp_groups(lay.tp, lay.pp, lay.world_size)
    per_node = None
    if gpn:
        counts = set()
        for g in groups:
            counts.update(Counter(r // gpn for r in g).values())
        per_node = min(counts)
        check.derived["dp_ranks_per_node"] = per_node
        node_derived = lay.itc_group_size is None and lay.itc_aggregate_nodes != -1
        if len(counts) > 1 and node_derived:
            check.errors.append(f"ranks see different numbers of their DP group's ranks on their "
                                f"node ({sorted(counts)}): a node-derived ITC group size is "
                                f"ambiguous")
            return
    k, error = _itc_group_size(dp, per_node, lay.itc_group_size, lay.itc_aggregate_nodes)
    if error:
        check.errors.append(error)
        return
    if k is None:
        return
    check.derived["itc_group_size"] = k
    if gpn:
        bad = misaligned_itc_group(groups, k, [r // gpn for r in range(lay.world_size)])
        if bad and lay.itc_group_size is None:
            check.errors.append(bad)
        elif bad:
            check.warnings.append(f"{bad}; an explicit --itc-group-size may straddle nodes, but "
                                  f"its gathers then use the inter-node link")
    if k == 1:
        check.warnings.append("ITC group k = 1: each rank's contrastive loss sees only its own "
                              "pairs (no gathered negatives)")


def _virtual_stage_rules(cfg, lay: ParallelLayout, check: LayoutCheck) -> Optional[int]:
    """Interleaved pipeline (megatron-core's interleaved 1F1B): chunks of
    ``layers_per_virtual_stage`` layers, ``L / (PP · chunk)`` per rank, at least two, and the
    step's micro-batches a multiple of PP (megatron's schedule runs them in groups of PP).
    Returns the chunks per rank (``None`` without interleaving or on error)."""
    n = lay.layers_per_virtual_stage
    if n is None:
        return None
    errors = check.errors
    pp = lay.pp
    if n < 1:
        errors.append(f"--num-layers-per-virtual-pipeline-stage must be >= 1, got {n}")
        return None
    if pp < 2:
        errors.append("--num-layers-per-virtual-pipeline-stage needs "
                      "--pipeline-model-parallel-size >= 2 (it interleaves pipeline stages)")
        return None
    per_stage = cfg.num_layers // pp
    if cfg.num_layers % pp or per_stage % n or per_stage // n < 2:
        errors.append(f"--num-layers-per-virtual-pipeline-stage {n} must divide the "
                      f"{per_stage} layers per pipeline stage into at least 2 chunks")
        return None
    m = check.derived.get("num_micro_batches")
    if m is not None and m % pp:
        errors.append(f"an interleaved pipeline runs micro-batches in groups of "
                      f"--pipeline-model-parallel-size ({pp}): {m} micro-batches per step "
                      f"(--global-batch-size / (--micro-batch-size x DP)) must be a multiple")
    check.derived["virtual_stages"] = per_stage // n
    return per_stage // n


def check_layout(cfg, lay: ParallelLayout) -> LayoutCheck:
    """Every rule of ``lay`` for the architecture ``cfg`` (an
    :class:`~megatron_m2.config.M2ModelConfig`): all errors, warnings and derived sizes."""
    check = LayoutCheck()
    errors = check.errors
    tp, pp, world = lay.tp, lay.pp, lay.world_size
    if tp < 1 or pp < 1:
        errors.append("--tensor-model-parallel-size and --pipeline-model-parallel-size must be "
                      ">= 1")
        return check
    if world < 1 or world % (tp * pp):
        errors.append(f"world size {world} is not divisible by --tensor-model-parallel-size "
                      f"({tp}) x --pipeline-model-parallel-size ({pp})")
    errors.extend(model_split_errors(cfg, tp, pp))
    if lay.sequence_parallel and tp < 2:
        errors.append("--sequence-parallel shards activations across the tensor-parallel group: "
                      f"it needs --tensor-model-parallel-size >= 2, got {tp}")
    gpn = lay.gpus_per_node
    if gpn is not None and (gpn < 1 or tp > gpn or gpn % tp):
        errors.append(f"tensor-model-parallel-size ({tp}) must divide the ranks per node "
                      f"({gpn}): a TP group must lie within one node (its all-reduces run "
                      f"every layer)")
    if lay.precision not in PRECISIONS:
        errors.append(f"precision must be one of {', '.join(PRECISIONS)}, got "
                      f"{lay.precision!r}")
    if lay.itc_heads not in ("both", "vl"):
        errors.append(f"--itc-heads must be 'both' or 'vl', got {lay.itc_heads!r}")
    mbs, gbs = lay.micro_batch, lay.global_batch
    if mbs < 1 or gbs < 1:
        errors.append("--micro-batch-size and --global-batch-size must be >= 1")
    if errors:
        return check

    dp = world // (tp * pp)
    check.derived["dp"] = dp
    if gbs % (mbs * dp):
        errors.append(f"--global-batch-size ({gbs}) must be divisible by --micro-batch-size "
                      f"({mbs}) x data-parallel size ({dp})")
    else:
        check.derived["num_micro_batches"] = gbs // (mbs * dp)
    _itc_rules(lay, dp, check)
    chunks = _virtual_stage_rules(cfg, lay, check)
    if pp > 1 and lay.itc_heads == "both" and chunks:
        last = lay.layers_per_virtual_stage
        if cfg.num_vl_layers > last:
            errors.append(f"--itc-heads both needs the backbone/VL boundary in the last model "
                          f"chunk, but chunks of {last} layers "
                          f"(--num-layers-per-virtual-pipeline-stage) put VL layers in earlier "
                          f"ones; use larger chunks or --itc-heads vl")
    elif pp > 1 and lay.itc_heads == "both":
        per_stage = cfg.num_layers // pp
        if cfg.num_vl_layers > per_stage:
            errors.append(f"--itc-heads both needs the backbone/VL boundary on the last pipeline "
                          f"stage, but {pp} stages of {per_stage} layers put VL layers on "
                          f"earlier stages; use fewer stages or --itc-heads vl")
    check.derived["recompute"], recompute_errors = _recompute_errors(cfg, lay)
    errors.extend(recompute_errors)
    if lay.precision == "fp8":
        errors.extend(_fp8_errors(cfg, lay))
    m = check.derived.get("num_micro_batches")
    if m is not None and pp > 1 and m < pp:
        check.warnings.append(f"{m} micro-batches per step for {pp} pipeline stages: the "
                              f"pipeline never fills (bubble {(pp - 1) / (m + pp - 1):.0%})")
    return check
