"""Dry-run planner: memory, communication, FLOPs and step time of a TP × PP × DP layout.

Everything here is arithmetic on the architecture (:class:`~megatron_m2.config.M2ModelConfig`),
the layout (:class:`Layout`) and the cluster (:class:`Cluster`); nothing is allocated and no
hardware is needed. The package imports neither torch nor megatron-core, except
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
  SDPA attention, megatron DDP with ``grad_reduce_in_fp32=True`` (``--overlap-grad-reduce``
  and ``--overlap-param-gather`` as the layout says), the contrastive loss in fp32 on the
  last pipeline stage;
* the scale features m2-pretrain has, as :class:`Layout` fields named like its flags: patch
  dropout (``image_mask_ratio``: the masked steps' shorter vision part), sequence parallelism
  (``sequence_parallel``: each part padded to a multiple of TP and sharded between the TP
  regions), the interleaved pipeline (``layers_per_virtual_stage``) and the overlapped
  data-parallel communication (``overlap_grad_reduce``, ``overlap_param_gather``,
  ``ddp_bucket_size``).

Modules, one per concern:

* :mod:`~megatron_m2.planner.inputs`: :class:`Cluster`, :class:`Layout`, :class:`Assumptions`,
  the constants (``GB``, ``BF16_BYTES``, ...), :func:`load_model_config`, :func:`resolve_model`;
* :mod:`~megatron_m2.planner.validate`: :func:`~megatron_m2.planner.validate.validate`, the
  layout rules (errors, warnings, derived sizes);
* :mod:`~megatron_m2.planner.objective`: ``--objective itc``/``m2`` (GBA-ITC + CMLM + CMIM):
  its flags' rules and command line, the masked heads' and the frozen VQ-KD's sizes;
* :mod:`~megatron_m2.planner.context`: the sizes of a valid layout every section reads;
* :mod:`~megatron_m2.planner.memory`: the model stage by stage (:func:`stage_layout`,
  :func:`stage_parameters`), :func:`layer_activation_bytes`, the parameters and memory sections;
* :mod:`~megatron_m2.planner.communication`: the ring formulas, :func:`itc_bytes_per_rank`,
  the communication section (TP, PP, DP, ITC);
* :mod:`~megatron_m2.planner.flops`: :func:`forward_flops_per_sample`, FLOPs per step and stage;
* :mod:`~megatron_m2.planner.timing`: step time, pipeline bubble, the exposed DP time
  (:func:`~megatron_m2.planner.timing.dp_exposure`), throughput, MFU;
* :mod:`~megatron_m2.planner.groups`: :func:`rank_groups`, :func:`build_groups`;
* :mod:`~megatron_m2.planner.plan`: :class:`Plan` and :func:`make_plan`, one call per section;
* :mod:`~megatron_m2.planner.search`: :func:`recommend` → :class:`Recommendation`;
* :mod:`~megatron_m2.planner.report`: the text formatters.
* the data-loading budget (``decode`` section, :func:`~megatron_m2.planner.timing.decode_section`):
  samples/s per GPU against the CPU cores the CPU decode path needs.

Public API: :class:`Cluster`, :class:`Layout`, :class:`Assumptions`, :func:`make_plan` →
:class:`Plan`, :func:`recommend` → :class:`Recommendation`, :func:`rank_groups`,
:func:`build_groups`, the shared formulas (:func:`ring_all_reduce_bytes`,
:func:`ring_gather_bytes`, :func:`itc_bytes_per_rank`, :func:`stage_parameters`,
:func:`layer_activation_bytes`, :func:`in_flight_micro_batches`, :func:`patch_keep_count`,
:func:`ddp_bucket_elements`) and the text formatters :func:`format_plan`,
:func:`format_recommendation`.
"""

from __future__ import annotations

from ..layout import short_ranks
from .communication import itc_bytes_per_rank, ring_all_reduce_bytes, ring_gather_bytes
from .flops import forward_flops_per_sample
from .groups import _check_with_rank_generator as _check_with_rank_generator  # private; tests
from .groups import build_groups, rank_groups
from .inputs import (
    BF16_BYTES,
    CPU_DECODE_SAMPLES_PER_CORE,
    FP32_BYTES,
    GB,
    ITC_BYTES_PER_ELEMENT,
    RANK_ORDER,
    Assumptions,
    Cluster,
    Layout,
    ddp_bucket_elements,
    load_model_config,
    patch_keep_count,
    resolve_model,
)
from .memory import (
    StageShape,
    in_flight_micro_batches,
    layer_activation_bytes,
    mixed_layer_extra_bytes,
    sequence_parts,
    stage_layout,
    stage_parameters,
)
from .objective import MaskedSettings, masked_settings, vqkd_forward_flops, vqkd_parameters
from .plan import Plan, make_plan
from .report import format_plan, format_recommendation
from .search import Recommendation, recommend

__all__ = [
    "GB", "BF16_BYTES", "FP32_BYTES", "ITC_BYTES_PER_ELEMENT", "RANK_ORDER", "Cluster",
    "Layout", "Assumptions", "Plan", "Recommendation", "make_plan", "recommend",
    "rank_groups", "build_groups", "ring_all_reduce_bytes", "ring_gather_bytes",
    "itc_bytes_per_rank", "stage_layout", "stage_parameters", "layer_activation_bytes",
    "forward_flops_per_sample", "load_model_config", "format_plan", "format_recommendation",
    "resolve_model", "StageShape", "sequence_parts", "short_ranks",
    "MaskedSettings", "masked_settings", "mixed_layer_extra_bytes", "vqkd_parameters",
    "vqkd_forward_flops", "CPU_DECODE_SAMPLES_PER_CORE", "patch_keep_count",
    "ddp_bucket_elements", "in_flight_micro_batches",
]
