"""Step time, pipeline bubble, exposed data-parallel time, throughput and MFU (the ``time``
section of a plan).

``slot`` = the slowest stage's compute + TP collectives (+ ITC on the last stage) per
micro-batch (all of a rank's model chunks);
``step = (M + (PP − 1)/v)·slot + 2·(v·M + PP − 1)·p2p + exposed DP`` (1F1B, v = 1; megatron's
interleaved 1F1B with v model chunks per rank shrinks the bubble to ``(PP − 1)/v`` slots and
sends v messages each way per micro-batch), the exposed DP time derived from the overlap
flags, the buckets and the pipeline's drain (:func:`dp_exposure`), plus the one ITC exchange of
the step with feature accumulation, plus (``--objective m2`` with VQ-KD targets) the M
tokenizer forwards the last stage runs before the schedule, plus (``--image-mask-style
attentive`` at PP > 1) the scoring pass's forward p2p transfers and the scores' broadcast.
The scoring pass's compute and TP collectives are in the stages' slot (as feature
accumulation's first phase): ``(M + PP − 1)`` ticks of one more forward, that pass's own fill
and drain.
"""

from __future__ import annotations

import math
from typing import Dict, List

from .context import Context
from .flops import peak_flops


def _stage_slots(ctx: Context, flops: Dict[str, object],
                 comm: Dict[str, object]) -> List[float]:
    """Each stage's time per micro-batch: compute + TP collectives, and on the last stage the
    ITC gathers of one contrastive batch (without feature accumulation)."""
    slots = []
    for st_ in ctx.stages:
        t = flops["per_stage_rank"][st_.index]["compute_time_s_per_micro_batch"]
        t += comm["tp"]["per_stage"][st_.index]["time_s_per_micro_batch"]
        if st_.is_last and not ctx.accum:
            t += comm["itc"]["gba"]["time_s"] / ctx.m
        slots.append(t)
    return slots


def _phase_windows(ctx: Context, flops: Dict[str, object], comm: Dict[str, object]):
    """``(forward, backward)`` wall time of one micro-batch on each stage: the stage's compute
    and TP time split in the ratio of its forward and backward compute (the TP collectives
    follow the GEMMs they serve: 1 : 2 like the FLOPs, recomputation on the backward's side)."""
    fwd, bwd = [], []
    for st_ in ctx.stages:
        row = flops["per_stage_rank"][st_.index]
        compute = row["compute_time_s_per_micro_batch"]
        wall = compute + comm["tp"]["per_stage"][st_.index]["time_s_per_micro_batch"]
        scale = wall / compute if compute else 0.0
        fwd.append(row["forward_time_s_per_micro_batch"] * scale)
        bwd.append(row["backward_time_s_per_micro_batch"] * scale)
    return fwd, bwd


def overlapped(comm: float, window: float, buckets: int) -> float:
    """What is left after ``window`` of a transfer of ``comm`` seconds in ``buckets`` equal
    buckets, when the buckets become ready (or are consumed) evenly over the window and go one
    at a time: ``max(comm/n, comm − window·(1 − 1/n))`` — never below one bucket, never above
    ``comm`` (one bucket: nothing hidden)."""
    n = max(int(buckets), 1)
    return max(comm / n, comm - window * (1 - 1 / n))


def dp_exposure(ctx: Context, flops: Dict[str, object], comm: Dict[str, object],
                p2p_transfer: float = 0.0) -> Dict[str, object]:
    """The data-parallel time a step waits for, stage by stage (megatron-core's DDP and
    distributed optimizer).

    megatron enables the gradient sync for the last micro-batch only. Its backward on pipeline
    rank r (``W_b``: the stage's share of the slot, :func:`_phase_windows`) is the window in
    which the rank's gradients appear; with v model chunks per rank the rank's chunks run
    their backward of that micro-batch ``PP`` chunk slots apart (``δ = slot_b / v``,
    ``slot_b`` = the slowest stage's backward + one p2p transfer), so the window spans
    ``W_b + (v − 1)·PP·δ``. Rank r's last backward ends ``r·δ`` before rank 0's (the pipeline's
    drain): that much of its traffic is hidden whatever the flags.

    Gradients (``G`` = the stage's reduce time, :func:`~megatron_m2.planner.communication.
    dp_collectives`, one collective per bucket):

    * with ``--overlap-grad-reduce`` each bucket is reduced as soon as its gradients are
      complete (``_make_backward_post_hook``), one after the other. With n buckets ready evenly
      over the window, the reduce either keeps up (only the last bucket, ``G/n``, is left) or
      runs back to back from the first bucket on: :func:`overlapped`
      ``= max(G/n, G − W·(1 − 1/n))`` — at most ``max(0, G − W) + G/n``, and ``G`` with one
      bucket. Rank 0 has the bucketed buffer; ranks r > 0 have one bucket per chunk
      (``DistributedDataParallel`` turns bucketing off there), so they overlap only across
      chunks. Exposed: ``max(0, overlapped(G, W, n) − r·δ)``;
    * without the flag the reduce runs after the schedule: ``max(0, G − r·δ)``.

    Parameters (distributed optimizer, ``A`` = the bf16 all-gather time): without
    ``--overlap-param-gather`` the optimizer step all-gathers them synchronously: ``A``; with it
    the first bucket's gather starts at the next ``zero_grad`` and each forward pre-hook waits
    for its bucket and dispatches the next, over the first micro-batch's forward (``W_f``,
    chunks spread like the backward's) and after the fill's ``r·δ_f``:
    ``max(0, overlapped(A, W_f + (v − 1)·PP·δ_f, n) − r·δ_f)``.

    The step waits for the slowest rank: ``exposed = max_r grads_r + max_r params_r``.
    ``Assumptions.dp_overlap`` (a measured fraction hidden), when set, replaces the derivation:
    ``(1 − dp_overlap) × max_r (G_r + A_r)``.
    """
    lay, v, pp = ctx.layout, ctx.v, ctx.pp
    fwd, bwd = _phase_windows(ctx, flops, comm)
    delta_f, delta_b = (max(fwd) + p2p_transfer) / v, (max(bwd) + p2p_transfer) / v
    stages = []
    for st_, row in zip(ctx.stages, comm["dp"]["per_stage"]):
        r, grads, params = st_.index, row["grads_time_s"], row["params_time_s"]
        buckets = max(row["buckets"], 1)
        window_b = bwd[r] + (v - 1) * pp * delta_b
        window_f = fwd[r] + (v - 1) * pp * delta_f
        g = overlapped(grads, window_b, buckets) if lay.overlap_grad_reduce else grads
        g = max(0.0, g - r * delta_b)
        if lay.overlap_param_gather:
            a = max(0.0, overlapped(params, window_f, buckets) - r * delta_f)
        else:
            a = params
        stages.append({"stage": r, "grads_time_s": grads, "params_time_s": params,
                       "buckets": row["buckets"], "forward_window_s": window_f,
                       "backward_window_s": window_b, "drain_s": r * delta_b,
                       "fill_s": r * delta_f, "grads_exposed_s": g, "params_exposed_s": a})
    traffic = max((x["grads_time_s"] + x["params_time_s"] for x in stages), default=0.0)
    override = ctx.assumptions.dp_overlap
    if override is not None:
        exposed = (1 - override) * traffic
    else:
        exposed = (max((x["grads_exposed_s"] for x in stages), default=0.0)
                   + max((x["params_exposed_s"] for x in stages), default=0.0))
    return {"traffic_s": traffic, "exposed_s": exposed, "hidden_s": traffic - exposed,
            "derived": override is None, "overlap_grad_reduce": lay.overlap_grad_reduce,
            "overlap_param_gather": lay.overlap_param_gather, "per_stage": stages}


def time_section(ctx: Context, flops: Dict[str, object],
                 comm: Dict[str, object]) -> Dict[str, object]:
    """The plan's ``time`` from its ``flops`` and ``communication`` sections."""
    m, pp, v = ctx.m, ctx.pp, ctx.v
    # 1F1B: M micro-batches + the PP − 1 bubble; interleaved: the bubble is (PP − 1)/v slots
    # of a whole-stage micro-batch (megatron's forward_backward_pipelining_with_interleaving).
    fill = (pp - 1) / v
    ticks = m + fill
    gba_s = comm["itc"]["gba"]["time_s"]
    slot = max(_stage_slots(ctx, flops, comm))
    pipeline = ticks * slot
    p2p_transfer = max((x["time_s_per_transfer"] for x in comm["pp"]["boundaries"]),
                       default=0.0)
    # One send each way per chunk and micro-batch, and per slot of the fill and drain.
    p2p_transfers = 2 * (v * m + pp - 1) if pp > 1 else 0
    p2p = p2p_transfers * p2p_transfer
    dp = dp_exposure(ctx, flops, comm, p2p_transfer)
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
    step = pipeline + p2p + dp["exposed_s"] + itc_once + vqkd + scores
    stage_rows = flops["per_stage_rank"]
    compute_only = ticks * max(r["compute_time_s_per_micro_batch"] for r in stage_rows)
    peak_gemm = peak_flops(ctx)[1]
    return {
        "step_time_s": step, "compute_s": compute_only,
        "tp_comm_s": ticks * max(x["time_s_per_micro_batch"] for x in comm["tp"]["per_stage"]),
        "itc_s": gba_s, "pp_p2p_s": p2p, "p2p_transfers_per_step": p2p_transfers,
        "dp_comm_s": dp["exposed_s"], "dp_traffic_s": dp["traffic_s"], "dp_overlap": dp,
        **({"vqkd_s": vqkd} if ctx.obj is not None else {}),
        **({"attentive_scores_s": scores} if ctx.attentive else {}),
        "virtual_stages": v, "pipeline_slot_s": slot, "pipeline_bubble_s": fill * slot,
        "pipeline_bubble_fraction": fill / ticks,
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
