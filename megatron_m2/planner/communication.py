"""Communication: the ring formulas and the ``communication`` section of a plan.

Per rank and step, for each process group: its collectives, payloads, bytes sent, link
(intra- or inter-node) and time (``count × latency + bytes / bandwidth``). TP all-reduces, or
all-gathers and reduce-scatters under sequence parallelism (every layer), PP p2p transfers
(every stage boundary, every model chunk's), DP gradient collectives (once per step, bucket by
bucket) and the ITC gathers of the contrastive loss (GBA-ITC over k ranks, and global ITC over
DP for comparison).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from ..layout import dp_groups as all_dp_groups
from .context import Context
from .groups import spans_nodes
from .inputs import BF16_BYTES, FP32_BYTES, GB, ITC_BYTES_PER_ELEMENT, ddp_bucket_elements
from .memory import StageShape


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


def _link(inter: bool) -> str:
    return "inter-node" if inter else "intra-node"


def _collective(op: str, count: int, payload: float, sent: float, link: str, bw_gbps: float,
                latency_s: float) -> Dict[str, object]:
    return {"op": op, "count": count, "payload_bytes": payload, "bytes_sent": sent,
            "link": link, "time_s": count * latency_s + sent / (bw_gbps * GB)}


def communication_section(ctx: Context) -> Dict[str, object]:
    """The plan's ``communication``: the ``tp``, ``pp``, ``dp`` and ``itc`` entries."""
    return {"tp": tp_section(ctx), "pp": pp_section(ctx), "dp": dp_section(ctx),
            "itc": itc_section(ctx)}


# -- TP --------------------------------------------------------------------------------------------
def _tp_payloads(ctx: Context, cols: Optional[int] = None) -> Tuple[int, int]:
    """``(big, small)`` of one layer: ``big`` = the bytes of a bf16 ``[s, b, d]`` tensor over
    both parts of the sequence, times 2 (the two row-parallel outputs, Out and FC2), and
    ``small`` = the fp32 statistics of the two Sub-LNs' forward (``2 × [s_part, b, 2]``);
    s = the rows the layers process (``s_p``: padded to a multiple of TP under sequence
    parallelism), b the micro-batch's columns (``b·(1 + n)`` under ``--objective m2``)."""
    s, b = ctx.s_p, ctx.cols if cols is None else cols
    return 2 * BF16_BYTES * s * b * ctx.cfg.hidden_size, 2 * 2 * FP32_BYTES * s * b


def _tp_all_reduce(ctx: Context, op: str, count: int, payload: int) -> Dict[str, object]:
    return _collective(op, count, payload, ring_all_reduce_bytes(payload, ctx.tp), "intra-node",
                       ctx.bandwidth(False), ctx.latency)


def _tp_gather(ctx: Context, op: str, count: int, payload: int) -> Dict[str, object]:
    """An all-gather or reduce-scatter over the TP group whose whole (gathered, or
    reduce-scattered) tensor is ``payload`` bytes: each rank sends ``(t − 1)/t`` of it."""
    return _collective(op, count, payload, ring_gather_bytes(payload // ctx.tp, ctx.tp),
                       "intra-node", ctx.bandwidth(False), ctx.latency)


SP = "sequence parallel"


def _layer_forward_collectives(ctx: Context, cols: int, passes: int,
                               suffix: str = "") -> List[Dict[str, object]]:
    """The TP collectives of ``passes`` layer forwards of ``cols`` columns.

    Without sequence parallelism, per layer and part: the row-parallel Out and FC2 all-reduce
    their bf16 ``[s_part, b, d]`` outputs (4 per layer). With it (megatron's
    ``LinearWithGradAccumulationAndAsyncCommunication`` and ``RowParallelLinear``): each
    column-parallel linear all-gathers its input part — Q, K and V are three linears, so
    4 all-gathers per part with FC1 (8 per layer, payload 4·big/2) — and Out and FC2
    reduce-scatter their outputs (4 per layer). Either way each sharded Sub-LN all-reduces
    2 fp32 statistics ``[s_part, b, 1]`` (8 per layer), on the gathered whole part."""
    big, small = _tp_payloads(ctx, cols)
    if ctx.sp:
        rows = [_tp_gather(ctx, f"all_gather fwd (Q, K, V, FC1 inputs; {SP}){suffix}",
                           8 * passes, 2 * big * passes),
                _tp_gather(ctx, f"reduce_scatter fwd (Out, FC2 outputs; {SP}){suffix}",
                           4 * passes, big * passes)]
    else:
        rows = [_tp_all_reduce(ctx, f"all_reduce fwd (Out, FC2){suffix}", 4 * passes,
                               big * passes)]
    rows.append(_tp_all_reduce(ctx, f"all_reduce Sub-LN statistics fwd{suffix}", 8 * passes,
                               small * passes))
    return rows


def _layer_backward_collectives(ctx: Context, layers: int) -> List[Dict[str, object]]:
    """The TP collectives of ``layers`` layer backwards of a micro-batch.

    Without sequence parallelism, per part: the input gradients of Q, K, V and FC1
    all-reduced (8 per layer, payload 2·big). With it: each column-parallel linear
    all-gathers its input again for its weight gradient (megatron saves the shard) and
    reduce-scatters its input gradient; Out and FC2 all-gather their output gradients: 12
    all-gathers (payload 3·big) and 8 reduce-scatters (payload 2·big) per layer. A ring
    all-gather plus reduce-scatter moves what one all-reduce moves, but Q, K and V are three
    linears that gather their common input three times (forward, and again in the backward):
    per layer the bf16 traffic is 8·(t − 1)/t·big with sequence parallelism against
    6·(t − 1)/t·big without (4/3; forward 3 vs 2, backward 5 vs 4). Each Sub-LN all-reduces
    its two partial sums ``[s_part, b, 2]`` (4 per layer)."""
    big, small = _tp_payloads(ctx)
    if ctx.sp:
        rows = [_tp_gather(ctx, f"all_gather bwd (Q, K, V, FC1 inputs again for the weight "
                                f"gradients; Out, FC2 output grads; {SP})", 12 * layers,
                           3 * big * layers),
                _tp_gather(ctx, f"reduce_scatter bwd (Q, K, V, FC1 input grads; {SP})",
                           8 * layers, 2 * big * layers)]
    else:
        rows = [_tp_all_reduce(ctx, "all_reduce bwd (Q, K, V, FC1 input grads)", 8 * layers,
                               2 * big * layers)]
    rows.append(_tp_all_reduce(ctx, "all_reduce Sub-LN statistics bwd", 4 * layers,
                               small * layers))
    return rows


def _sequence_ends(ctx: Context, st_: StageShape, cols: int, backward: bool,
                   suffix: str = "") -> List[Dict[str, object]]:
    """Sequence parallelism's collectives at the ends of the model, per forward of ``cols``
    columns (none without it): the first stage scatters the embeddings' output along the
    sequence (no communication forward; backward: one all-gather per part of the gradient);
    the last stage all-gathers each part of its output for the heads, and of the backbone
    output when its last chunk holds the first VL layer (the backbone heads read it); their
    backward keeps each rank's own rows (no communication)."""
    if not ctx.sp:
        return []
    whole = BF16_BYTES * ctx.s_p * cols * ctx.cfg.hidden_size
    rows = []
    if st_.is_first and backward:
        rows.append(_tp_gather(ctx, f"all_gather bwd (the embeddings' gradient; {SP})", 2,
                               whole))
    if st_.is_last:
        lo, hi = st_.chunks[-1] if st_.chunks else (st_.first_layer,
                                                    st_.first_layer + st_.num_layers)
        gathers = 1 + int(lo <= ctx.cfg.num_sep_layers < hi)
        rows.append(_tp_gather(ctx, f"all_gather fwd (the last stage's output"
                                    f"{' and the backbone output' if gathers > 1 else ''} for "
                                    f"the heads; {SP}){suffix}", 2 * gathers, gathers * whole))
    return rows


def tp_collectives(ctx: Context, st_: StageShape) -> List[Dict[str, object]]:
    """The TP collectives of one micro-batch on stage ``st_`` (none at TP=1).

    Per layer, per part of the packed sequence: without sequence parallelism, forward
    all-reduces after Out and FC2 (bf16 ``[s_part, b, d]``) and 2 fp32 statistics all-reduces
    (``[s_part, b, 1]``) in each sharded Sub-LN; backward all-reduces of the input gradients of
    Q, K, V and FC1 and 1 per Sub-LN (its two partial sums together, ``[s_part, b, 2]``). With
    sequence parallelism the bf16 all-reduces become megatron's all-gathers and
    reduce-scatters (:func:`_layer_forward_collectives`, :func:`_layer_backward_collectives`)
    over the padded parts, plus the sequence's scatter and gather at the model's ends
    (:func:`_sequence_ends`). Recomputed layers run their forward twice; the first stage adds
    the vocabulary-parallel embedding's forward all-reduce (before the sequence is
    scattered).
    """
    if ctx.tp <= 1:
        return []
    layers = st_.num_layers
    fwd_passes = layers + ctx.recomputed_layers(st_)
    rows = (_layer_forward_collectives(ctx, ctx.cols, fwd_passes)
            + _layer_backward_collectives(ctx, layers))
    if st_.is_first:
        emb = BF16_BYTES * ctx.cfg.max_text_len * ctx.cols * ctx.cfg.hidden_size
        rows.append(_tp_all_reduce(ctx, "all_reduce vocab-parallel embedding fwd", 1, emb))
    rows += _sequence_ends(ctx, st_, ctx.cols, backward=True)
    if st_.is_last:
        rows += _masked_head_collectives(ctx)
    if ctx.scoring_pass:
        rows += _scoring_pass_collectives(ctx, st_)
    return rows


def _scoring_pass_collectives(ctx: Context, st_: StageShape) -> List[Dict[str, object]]:
    """The forward collectives of ``--image-mask-style attentive``'s scoring pass (without
    feature accumulation): one forward of the micro-batch's b contrastive columns, no
    recomputation."""
    b, d, layers = ctx.b, ctx.cfg.hidden_size, st_.num_layers
    suffix = ", attentive scoring pass"
    rows = _layer_forward_collectives(ctx, b, layers, suffix)
    if st_.is_first:
        rows.append(_tp_all_reduce(ctx, "all_reduce vocab-parallel embedding fwd, attentive "
                                   "scoring pass", 1,
                                   BF16_BYTES * ctx.cfg.max_text_len * b * d))
    rows += _sequence_ends(ctx, st_, b, backward=False, suffix=suffix)
    return rows


def _masked_head_collectives(ctx: Context) -> List[Dict[str, object]]:
    """``--objective m2``'s vocabulary-parallel heads (CMLM; CMIM with VQ-KD targets), per
    micro-batch: megatron's ``vocab_parallel_cross_entropy`` all-reduces 3 fp32 ``[rows]``
    tensors (max, predicted logit, sum of exponentials) and the accuracy 2 more; the backward
    of the column-parallel head all-reduces its input gradient (bf16 ``[rows, d]``)."""
    obj = ctx.obj
    if obj is None:
        return []
    rows = 0
    if obj.cmlm:
        rows += ctx.b * obj.cmlm_rows(ctx.cfg)
    if obj.vqkd:
        rows += ctx.b * obj.cmim_rows()
    heads = int(obj.cmlm) + int(obj.vqkd)
    if not heads:
        return []
    return [_tp_all_reduce(ctx, "all_reduce masked heads: cross-entropy statistics fwd",
                           5 * heads, 5 * FP32_BYTES * rows),
            _tp_all_reduce(ctx, "all_reduce masked heads: input grads bwd", heads,
                           BF16_BYTES * rows * ctx.cfg.hidden_size)]


def tp_section(ctx: Context) -> Dict[str, object]:
    """Every stage's TP collectives per micro-batch and per step, and those of one layer."""
    m = ctx.m
    tp_stages = []
    for st_ in ctx.stages:
        rows = tp_collectives(ctx, st_)
        tp_stages.append({"stage": st_.index, "per_micro_batch": rows,
                          "bytes_sent_per_micro_batch": sum(r["bytes_sent"] for r in rows),
                          "time_s_per_micro_batch": sum(r["time_s"] for r in rows),
                          "bytes_sent_per_step": m * sum(r["bytes_sent"] for r in rows),
                          "count_per_step": m * sum(r["count"] for r in rows)})
    per_layer = None
    if ctx.tp > 1:
        per_layer = {}
        for phase, rows in (("forward", _layer_forward_collectives(ctx, ctx.cols, 1)),
                            ("backward", _layer_backward_collectives(ctx, 1))):
            per_layer[phase] = {"count": sum(r["count"] for r in rows),
                                "payload_bytes": sum(r["payload_bytes"] for r in rows),
                                "bytes_sent": sum(r["bytes_sent"] for r in rows)}
    return {"group_size": ctx.tp, "link": "intra-node" if ctx.tp > 1 else None,
            "sequence_parallel": ctx.sp, "rows_per_part": [ctx.sv_p, ctx.st_p],
            "per_layer_per_micro_batch": per_layer, "per_stage": tp_stages}


# -- PP --------------------------------------------------------------------------------------------
def pp_hop_bytes(ctx: Context, cols: Optional[int] = None) -> int:
    """One p2p message: the bf16 ``[s, b, d]`` activation (or its gradient) of a micro-batch,
    ``[s_p / t, b, d]`` (this rank's shard) under sequence parallelism."""
    cols = ctx.cols if cols is None else cols
    return BF16_BYTES * ctx.s_p * cols * ctx.cfg.hidden_size // ctx.shard


def pp_section(ctx: Context) -> Dict[str, object]:
    """One activation forward and its gradient backward per boundary and micro-batch
    (:func:`pp_hop_bytes`; b: the micro-batch's columns, ``b·(1 + n)`` under ``--objective
    m2``); rank r of stage i talks to r + TP·DP.

    With an interleaved pipeline (v chunks per rank) every micro-batch crosses every chunk
    boundary: v messages each way per rank and micro-batch, and the last rank sends its chunks'
    outputs on to rank 0 (the ``[PP − 1, 0]`` boundary). Per step, a middle rank sends
    ``2·v·M`` messages; at PP = 2 a rank sends ``(2v − 1)·M`` (v = 1: M, the first and last
    stages sending one direction)."""
    tp, dp, gpn, m, pp, v = ctx.tp, ctx.dp, ctx.gpn, ctx.m, ctx.pp, ctx.v
    hop = pp_hop_bytes(ctx)
    pairs = [(i, i + 1) for i in range(pp - 1)] + ([(pp - 1, 0)] if v > 1 else [])
    boundaries = []
    for i, j in pairs:
        inter = any((r + tp * dp * i) // gpn != (r + tp * dp * j) // gpn
                    for r in range(tp * dp))
        boundaries.append({"stages": [i, j], "link": _link(inter),
                           "bytes_per_micro_batch_each_way": hop,
                           "time_s_per_transfer": ctx.latency + hop / (ctx.bandwidth(inter) * GB)})
    messages = 0 if pp == 1 else (2 * v - 1) * m if pp == 2 else 2 * v * m
    out = {"boundaries": boundaries, "virtual_stages": v,
           "messages_per_micro_batch_each_way": v if pp > 1 else 0,
           "bytes_sent_per_rank_per_step": messages * hop,
           "note": "a middle stage sends M activations forward and M gradients backward (v "
                   "each per micro-batch with v model chunks per rank); without interleaving "
                   "the first and last stages send one direction"}
    if ctx.attentive:
        out["attentive"] = attentive_pp_entry(ctx, any(x["link"] == "inter-node"
                                                       for x in boundaries))
    return out


def attentive_pp_entry(ctx: Context, inter: bool) -> Dict[str, object]:
    """``--image-mask-style attentive`` on the pipeline group, per rank and step: without
    feature accumulation the scoring pass sends one bf16 ``[s, b, d]`` activation forward per
    boundary and micro-batch (``scoring_hop_bytes``, b contrastive columns); either way the last
    stage broadcasts the fp32 scores ``[M, b, P]`` to the other stages (``broadcast_object_list``
    of their shapes: 2 broadcasts, then one per micro-batch). Nothing at PP=1."""
    pp, m = ctx.pp, ctx.m
    hop = pp_hop_bytes(ctx, ctx.b) if ctx.scoring_pass else 0
    payload = FP32_BYTES * m * ctx.b * ctx.cfg.num_patches
    bcast = (_collective("broadcast attentive scores (fp32) from the last stage", m + 2,
                         payload, payload, _link(inter), ctx.bandwidth(inter), ctx.latency)
             if pp > 1 else None)
    return {"scoring_hop_bytes": hop if pp > 1 else 0,
            "scoring_time_s_per_transfer": (
                ctx.latency + hop / (ctx.bandwidth(inter) * GB) if pp > 1 and hop else 0.0),
            "scores_broadcast": bcast}


# -- DP --------------------------------------------------------------------------------------------
def _dp_inter(ctx: Context) -> bool:
    """Whether the DP groups span nodes."""
    return spans_nodes(all_dp_groups(ctx.tp, ctx.pp, ctx.world), ctx.gpn)


def dp_buckets(ctx: Context, st_: StageShape, trainable: int) -> Tuple[int, int]:
    """``(buckets, elements per bucket)`` of a stage's gradient buffer (megatron-core's DDP,
    one per model chunk). With ``--overlap-grad-reduce`` buckets hold
    :func:`~megatron_m2.planner.inputs.ddp_bucket_elements` (``--ddp-bucket-size``, default
    ``max(40M, 1M × DP)``) — on pipeline rank 0 only: ``DistributedDataParallel`` turns
    bucketing off on the other ranks ("data-parallel communication on these stages is not on
    the critical path"), which reduce each chunk's gradients in one bucket, as without the
    flag."""
    v = ctx.v
    if not (ctx.layout.overlap_grad_reduce and st_.index == 0):
        return v, -(-trainable // v)
    size = ddp_bucket_elements(ctx.dp, ctx.layout.ddp_bucket_size)
    return v * max(1, -(-trainable // (v * size))), size


def dp_collectives(ctx: Context, p: Dict[str, int],
                   st_: Optional[StageShape] = None) -> List[Dict[str, object]]:
    """The DP collectives of a stage holding the parameters ``p``, once per step: fp32
    gradients of the trainable parameters (``grad_reduce_in_fp32``) all-reduced, or with the
    distributed optimizer reduce-scattered, then the updated bf16 parameters all-gathered;
    one collective per bucket (:func:`dp_buckets`)."""
    dp, inter = ctx.dp, _dp_inter(ctx)
    link, bw, latency = _link(inter), ctx.bandwidth(inter), ctx.latency
    grad_payload = FP32_BYTES * p["trainable"]
    if dp == 1:
        return []
    buckets = dp_buckets(ctx, st_ or ctx.stages[0], p["trainable"])[0]
    if ctx.layout.distributed_optimizer:
        par_payload = BF16_BYTES * p["trainable"]
        rows = [_collective("reduce_scatter grads (fp32)", buckets, grad_payload,
                            (dp - 1) * grad_payload / dp, link, bw, latency),
                _collective("all_gather params (bf16)", buckets, par_payload,
                            (dp - 1) * par_payload / dp, link, bw, latency)]
        rows[0]["kind"], rows[1]["kind"] = "grads", "params"
        return rows
    row = _collective("all_reduce grads (fp32)", buckets, grad_payload,
                      ring_all_reduce_bytes(grad_payload, dp), link, bw, latency)
    row["kind"] = "grads"
    return [row]


def dp_section(ctx: Context) -> Dict[str, object]:
    """Every stage's DP collectives per step, their buckets and the overlap flags (the time
    they leave exposed is the ``time`` section's, :func:`~megatron_m2.planner.timing.
    dp_exposure`: it needs the compute that hides them)."""
    dp_stages = []
    for st_, p in zip(ctx.stages, ctx.params):
        rows = dp_collectives(ctx, p, st_)
        buckets, size = dp_buckets(ctx, st_, p["trainable"])
        dp_stages.append({"stage": st_.index, "collectives": rows,
                          "buckets": buckets if rows else 0, "bucket_elements": size,
                          "bytes_sent_per_step": sum(r["bytes_sent"] for r in rows),
                          "time_s": sum(r["time_s"] for r in rows),
                          "grads_time_s": sum(r["time_s"] for r in rows if r["kind"] == "grads"),
                          "params_time_s": sum(r["time_s"] for r in rows
                                               if r["kind"] == "params")})
    return {"group_size": ctx.dp, "link": _link(_dp_inter(ctx)) if ctx.dp > 1 else None,
            "distributed_optimizer": ctx.layout.distributed_optimizer,
            "overlap_grad_reduce": ctx.layout.overlap_grad_reduce,
            "overlap_param_gather": ctx.layout.overlap_param_gather,
            "per_stage": dp_stages}


# -- ITC -------------------------------------------------------------------------------------------
def _itc_entry(ctx: Context, size: int, inter: bool) -> Dict[str, object]:
    """The ITC gathers of one step over groups of ``size`` ranks (:func:`itc_bytes_per_rank`
    per contrastive batch; each embedding all-gathered forward, reduce-scattered backward)."""
    batches = 1 if ctx.accum else ctx.m
    per_batch = itc_bytes_per_rank(size, ctx.itc_rows, ctx.cfg.embed_dim, ITC_BYTES_PER_ELEMENT,
                                   ctx.embeddings)
    count = 2 * ctx.embeddings * batches if size > 1 else 0
    return {"group_size": size, "link": _link(inter) if size > 1 else None,
            "collectives_per_step": count,
            "bytes_per_contrastive_batch": per_batch,
            "bytes_sent_per_step": per_batch * batches,
            "time_s": count * ctx.latency + per_batch * batches / (ctx.bandwidth(inter) * GB),
            "negatives_per_sample": size * ctx.itc_rows - 1}


def itc_section(ctx: Context) -> Dict[str, object]:
    """The contrastive loss's gathers on the last stage: GBA-ITC over the ITC groups of k
    ranks, and global ITC (k = DP) for comparison."""
    k, dp = ctx.k, ctx.dp
    itc_groups = [g[i:i + k] for g in all_dp_groups(ctx.tp, ctx.pp, ctx.world)
                  for i in range(0, dp, k)]
    itc_inter = spans_nodes(itc_groups, ctx.gpn)
    gba = _itc_entry(ctx, k, itc_inter)
    glob = _itc_entry(ctx, dp, _dp_inter(ctx))
    return {
        "heads": ctx.heads, "embeddings": ctx.embeddings, "embed_dim": ctx.cfg.embed_dim,
        "bytes_per_element": ITC_BYTES_PER_ELEMENT, "rows_per_contrastive_batch": ctx.itc_rows,
        "contrastive_batches_per_step": 1 if ctx.accum else ctx.m, "gba": gba, "global": glob,
        "global_over_gba": (glob["bytes_sent_per_step"] / gba["bytes_sent_per_step"]
                            if gba["bytes_sent_per_step"] else None),
        "gba_inter_node_bytes_per_step": gba["bytes_sent_per_step"] if itc_inter else 0,
    }
