"""The planner's inputs: the cluster, the layout, the model's knobs, and the units.

:class:`Cluster` (the machines), :class:`Layout` (how the model is parallelised and trained,
m2-pretrain's flags), :class:`Assumptions` (the knobs of the time and memory model), the byte
and rank-order constants every section shares, and the model-config loaders of ``m2-plan``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from ..config import M2ModelConfig, load_model_config
from ..flavors import get_flavor
from ..layout import patch_keep_count  # noqa: F401 - the planner's name for it

GB = 10 ** 9
"""One gigabyte (decimal), the unit of the memory report and of the bandwidths (GB/s)."""
BF16_BYTES = 2
FP32_BYTES = 4
ITC_BYTES_PER_ELEMENT = FP32_BYTES
"""The trainer casts the last stage's outputs to fp32 before the loss, so the ITC gathers move
fp32 embeddings whatever the training precision."""
RANK_ORDER = "tp-cp-ep-dp-pp"
"""megatron-core's default rank order (TP fastest, PP slowest)."""
LN_STATS_BYTES = 8
"""fp32 mean and reciprocal standard deviation a LayerNorm saves per token (GPU kernels)."""


CPU_DECODE_SAMPLES_PER_CORE = 300.0
"""Samples/s one CPU core's loader worker delivers on the CPU decode path: Pillow decode of a
stored JPEG + RandomResizedCrop + flip + RandAugment(2, 7) at 224 px + caption padding + batch
hand-over. Measured with ``tools/bench_data.py --decode`` (docs/data.md): about 300/s per core
on 256 px photo-like JPEGs (the loader's CPU ms/sample), less on larger stored images (the
preprocessor keeps up to 512 px)."""


@dataclass(frozen=True)
class Cluster:
    """The machines: ``nodes`` × ``gpus_per_node`` GPUs.

    Bandwidths are per GPU and direction: NVLink 4 on H100 SXM gives 450 GB/s; one 400 Gb/s
    InfiniBand NIC per GPU gives 50 GB/s. ``peak_tflops`` is the dense BF16 peak (H100 SXM:
    989); FP8 GEMMs run at twice that. ``fp32_peak_tflops`` is the FP32 peak (H100 SXM: 67,
    without TF32, PyTorch's default for matmuls): the frozen VQ-KD of ``--objective m2`` runs
    in fp32 without ``--bf16`` only (under ``--bf16``, which every planned command carries, its
    encoder runs in bf16 autocast at ``peak_tflops``), so no planned layout uses it.

    ``cpu_cores_per_gpu`` (a DGX H100/H200: 112 cores for 8 GPUs, 14; 12 leaves the training
    processes theirs) and ``cpu_decode_samples_per_core`` (what one loader worker delivers on
    the CPU decode path, see :data:`CPU_DECODE_SAMPLES_PER_CORE`) size the data loading.
    """

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    intra_node_gbps: float = 450.0
    inter_node_gbps: float = 50.0
    peak_tflops: float = 989.0
    fp32_peak_tflops: float = 67.0
    cpu_cores_per_gpu: float = 12.0
    cpu_decode_samples_per_core: float = CPU_DECODE_SAMPLES_PER_CORE

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
    ``objective`` and the masked-modelling fields are ``--objective`` and its flags
    (:mod:`megatron_m2.planner.objective`).

    The scale features, named like m2-pretrain's flags: ``image_mask_ratio``
    (``--image-mask-ratio``, FLIP's patch dropout: the vision part keeps
    :func:`patch_keep_count` patches plus [CLS]; the plan is for the masked phase of a run that
    ends with ``--image-mask-ratio-until-iter``), ``sequence_parallel``
    (``--sequence-parallel``), ``layers_per_virtual_stage``
    (``--num-layers-per-virtual-pipeline-stage``: an interleaved pipeline),
    ``overlap_grad_reduce`` / ``overlap_param_gather`` (``--overlap-grad-reduce``,
    ``--overlap-param-gather``) and ``ddp_bucket_size`` (``--ddp-bucket-size``, elements per
    gradient bucket; ``None``: megatron-core's default, :func:`ddp_bucket_elements`).
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
    objective: str = "itc"
    """``--objective``: ``itc`` (GBA-ITC) or ``m2`` (GBA-ITC + CMLM + CMIM; the fields below,
    m2-pretrain's masked-modelling flags, matter with ``m2`` only)."""
    cmlm_weight: Optional[float] = None
    cmim_weight: Optional[float] = None
    mvlm_prob: float = 0.5
    mim_target: str = "vqkd"
    visual_tokenizer: Optional[str] = None
    visual_tokenizer_heads: Optional[int] = None
    image_mask_patches: Optional[int] = None
    cmlm_tie_embeddings: bool = False
    image_mask_style: str = "block"
    """``--image-mask-style``: ``block`` (BEiT block-wise) or ``attentive`` (text-guided: the
    patches most similar to the caption, scored by a forward-only contrastive pass)."""
    attentive_mask_temperature: float = 0.0
    image_mask_ratio: float = 0.0
    """``--image-mask-ratio``: patch dropout in training steps (``--objective itc`` only)."""
    sequence_parallel: bool = False
    """``--sequence-parallel``: activations outside the TP regions sharded along the sequence
    (each modality part padded to a multiple of TP); needs TP >= 2."""
    layers_per_virtual_stage: Optional[int] = None
    """``--num-layers-per-virtual-pipeline-stage``: model chunks of this many layers,
    ``L / (PP·n)`` per pipeline rank (megatron-core's interleaved 1F1B)."""
    overlap_grad_reduce: bool = False
    """``--overlap-grad-reduce``: gradient buckets reduced during the last micro-batch's
    backward."""
    overlap_param_gather: bool = False
    """``--overlap-param-gather`` (needs ``distributed_optimizer``): the parameter all-gather
    hidden behind the next step's first forward."""
    ddp_bucket_size: Optional[int] = None
    """``--ddp-bucket-size``: elements per gradient bucket with ``overlap_grad_reduce``."""

    def key(self) -> str:
        """Short label, e.g. ``TP2 PP1 DO+ RC-``; the scale features add ``SP+`` (sequence
        parallelism), ``VPn`` (n layers per model chunk) and ``OG+`` / ``OP+`` (overlapped
        gradient reduce / parameter gather) when on."""
        key = (f"TP{self.tp} PP{self.pp} DO{'+' if self.distributed_optimizer else '-'} "
               f"RC{'+' if self.recompute else '-'}")
        if self.sequence_parallel:
            key += " SP+"
        if self.layers_per_virtual_stage is not None:
            key += f" VP{self.layers_per_virtual_stage}"
        if self.overlap_grad_reduce:
            key += " OG+"
        if self.overlap_param_gather:
            key += " OP+"
        return key


@dataclass(frozen=True)
class Assumptions:
    """Knobs of the time and memory model that are not facts of the layout.

    * ``mfu``: fraction of the dense peak the kernels reach while computing (all of a step's
      FLOPs run at ``mfu × peak``).
    * ``overhead_gb``: fixed memory per GPU outside the model: CUDA context (~0.5 GB), cuBLAS
      and NCCL workspaces and buffers, allocator slack.
    * ``collective_latency_us``: fixed cost of every collective and p2p transfer.
    * ``dp_overlap``: ``None`` (the default) derives the exposed data-parallel time from the
      layout (``--overlap-grad-reduce``, ``--overlap-param-gather``, the buckets and the
      pipeline's drain: :func:`megatron_m2.planner.timing.dp_exposure`); a number in [0, 1]
      overrides it with a measured fraction of the DP traffic hidden, for calibration.
    """

    mfu: float = 0.4
    overhead_gb: float = 3.0
    collective_latency_us: float = 10.0
    dp_overlap: Optional[float] = None


def ddp_bucket_elements(dp: int, bucket_size: Optional[int] = None) -> int:
    """Elements per gradient bucket of megatron-core's DDP with ``overlap_grad_reduce``:
    ``--ddp-bucket-size``, or its default ``max(40M, 1M × DP)``
    (``DistributedDataParallel.__init__``: large enough for ring chunks of
    ``bucket / DP`` to stay bandwidth-bound)."""
    return int(bucket_size) if bucket_size is not None else max(40_000_000, 1_000_000 * dp)


def resolve_model(flavor: Optional[str] = None, config_path: Optional[str] = None
                  ) -> Tuple[str, M2ModelConfig]:
    """``(name, config)`` from a flavor name or a model-config JSON file."""
    if config_path:
        return "custom", load_model_config(config_path)  # the fields in full (defaults: 0.4b)
    name = (flavor or "tiny").lower()
    return name, get_flavor(name)

