"""Step time, pipeline bubble, throughput and MFU (the ``time`` section of a plan).

``slot`` = the slowest stage's compute + TP all-reduces (+ ITC on the last stage) per
micro-batch; ``step = (M + PP − 1)·slot + 2·(M + PP − 1)·p2p + (1 − dp_overlap)·DP`` (1F1B,
nothing overlapped: the trainer runs megatron DDP with ``overlap_grad_reduce=False``), plus the
one ITC exchange of the step with feature accumulation, plus (``--objective m2`` with VQ-KD
targets) the M tokenizer forwards the last stage runs before the schedule, plus (``--image-mask-
style attentive`` at PP > 1) the scoring pass's forward p2p transfers and the scores' broadcast.
The scoring pass's compute and TP all-reduces are in the stages' slot (as feature accumulation's
first phase): ``(M + PP − 1)`` ticks of one more forward, that pass's own fill and drain.
"""

from __future__ import annotations

import math
from typing import Dict

from .context import Context
from .flops import peak_flops


def _slot(ctx: Context, flops: Dict[str, object], comm: Dict[str, object]) -> float:
    """The slowest stage's time per micro-batch: compute + TP all-reduces, and on the last
    stage the ITC gathers of one contrastive batch (without feature accumulation)."""
    slots = []
    for st_ in ctx.stages:
        t = flops["per_stage_rank"][st_.index]["compute_time_s_per_micro_batch"]
        t += comm["tp"]["per_stage"][st_.index]["time_s_per_micro_batch"]
        if st_.is_last and not ctx.accum:
            t += comm["itc"]["gba"]["time_s"] / ctx.m
        slots.append(t)
    return max(slots)


def time_section(ctx: Context, flops: Dict[str, object],
                 comm: Dict[str, object]) -> Dict[str, object]:
    """The plan's ``time`` from its ``flops`` and ``communication`` sections."""
    m, pp = ctx.m, ctx.pp
    ticks = m + pp - 1  # 1F1B: M micro-batches + the PP − 1 bubble
    gba_s = comm["itc"]["gba"]["time_s"]
    pipeline = ticks * _slot(ctx, flops, comm)
    p2p_transfer = max((x["time_s_per_transfer"] for x in comm["pp"]["boundaries"]),
                       default=0.0)
    p2p = 2 * ticks * p2p_transfer if pp > 1 else 0.0
    dp_time = (max(x["time_s"] for x in comm["dp"]["per_stage"])
               * (1 - ctx.assumptions.dp_overlap))
    itc_once = gba_s if ctx.accum else 0.0
    # --objective m2 with VQ-KD targets: the last stage tokenizes every micro-batch's images
    # before the schedule (Trainer._prepare), serially: M forwards the pipeline waits for.
    vqkd = m * max(r.get("vqkd_time_s_per_micro_batch", 0.0) for r in flops["per_stage_rank"])
    attentive = comm["pp"].get("attentive")
    scores = 0.0
    if attentive and pp > 1:
        # The scoring pass's forward transfers (one direction), then the scores' broadcast.
        scores = (ticks * attentive["scoring_time_s_per_transfer"]
                  + attentive["scores_broadcast"]["time_s"])
    step = pipeline + p2p + dp_time + itc_once + vqkd + scores
    stage_rows = flops["per_stage_rank"]
    compute_only = ticks * max(r["compute_time_s_per_micro_batch"] for r in stage_rows)
    peak_gemm = peak_flops(ctx)[1]
    return {
        "step_time_s": step, "compute_s": compute_only,
        "tp_comm_s": ticks * max(x["time_s_per_micro_batch"] for x in comm["tp"]["per_stage"]),
        "itc_s": gba_s, "pp_p2p_s": p2p, "dp_comm_s": dp_time,
        **({"vqkd_s": vqkd} if ctx.obj is not None else {}),
        **({"attentive_scores_s": scores} if ctx.attentive else {}),
        "pipeline_bubble_fraction": (pp - 1) / ticks,
        "samples_per_s": ctx.gbs / step,
        "mfu": flops["model_flops_per_step"] / (step * ctx.world * peak_gemm),
        "peak_tflops_used": peak_gemm / 1e12,
    }


def decode_section(ctx: Context, step_time_s: float) -> Dict[str, object]:
    """The data-loading budget per GPU: the samples/s each GPU's loader must deliver at the
    planned step time, the CPU cores that takes on the CPU decode path (Pillow in the loader
    workers) against the cores the cluster has per GPU, and whether ``--image-decode gpu``
    (workers only read headers and pass the JPEG bytes; nvJPEG decodes on the GPU) is advised.

    Every rank runs its own loader for its micro-batches (DP ranks read their own slices; a
    model-parallel group's ranks all load the same batch), so the demand per GPU is the global
    batch per step over the data-parallel ranks, paid by every GPU: ``gbs / step / dp``. One
    core is kept for the training process itself.
    """
    cl = ctx.cluster
    per_gpu = ctx.gbs / step_time_s / ctx.dp
    cores = per_gpu / cl.cpu_decode_samples_per_core
    available = max(cl.cpu_cores_per_gpu - 1.0, 0.0)
    advise_gpu = cores > available
    return {
        "samples_per_s_per_gpu": per_gpu,
        "cpu_decode_samples_per_core": cl.cpu_decode_samples_per_core,
        "cpu_cores_needed_per_gpu": cores,
        "cpu_cores_per_gpu": cl.cpu_cores_per_gpu,
        "cpu_cores_for_workers_per_gpu": available,
        "num_workers": max(1, math.ceil(cores)),
        "image_decode": "gpu" if advise_gpu else "cpu",
    }
