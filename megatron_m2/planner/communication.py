"""Communication: the ring formulas and the ``communication`` section of a plan.

Per rank and step, for each process group: its collectives, payloads, bytes sent, link
(intra- or inter-node) and time (``count × latency + bytes / bandwidth``). TP all-reduces
(every layer), PP p2p transfers (every stage boundary), DP gradient collectives (once per
step) and the ITC gathers of the contrastive loss (GBA-ITC over k ranks, and global ITC over
DP for comparison).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from ..layout import dp_groups as all_dp_groups
from .context import Context
from .groups import spans_nodes
from .inputs import BF16_BYTES, FP32_BYTES, GB, ITC_BYTES_PER_ELEMENT
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
def _tp_payloads(ctx: Context) -> Tuple[int, int]:
    """``(big, small)``: the bytes of a bf16 ``[s, b, d]`` all-reduce of both parts of the
    packed sequence, and of the two fp32 statistics all-reduces ``[s_part, b, 1]``; b is the
    micro-batch's columns (``b·(1 + n)`` under ``--objective m2``)."""
    s, b = ctx.s, ctx.cols
    return 2 * BF16_BYTES * s * b * ctx.cfg.hidden_size, 2 * 2 * FP32_BYTES * s * b


def _tp_all_reduce(ctx: Context, op: str, count: int, payload: int) -> Dict[str, object]:
    return _collective(op, count, payload, ring_all_reduce_bytes(payload, ctx.tp), "intra-node",
                       ctx.bandwidth(False), ctx.latency)


def tp_collectives(ctx: Context, st_: StageShape) -> List[Dict[str, object]]:
    """The TP all-reduces of one micro-batch on stage ``st_`` (none at TP=1).

    Per layer, per part of the packed sequence: forward all-reduces after Out and FC2 (bf16
    ``[s_part, b, d]``) and 2 fp32 statistics all-reduces (``[s_part, b, 1]``) in each sharded
    Sub-LN; backward all-reduces of the input gradients of Q, K, V and FC1 and 1 per Sub-LN (its
    two partial sums together, ``[s_part, b, 2]``). Recomputed layers run their forward twice;
    the first stage adds the vocabulary-parallel embedding's forward all-reduce.
    """
    if ctx.tp <= 1:
        return []
    big_fwd, small = _tp_payloads(ctx)
    layers = st_.num_layers
    fwd_passes = layers + ctx.recomputed_layers(st_)
    rows = [
        _tp_all_reduce(ctx, "all_reduce fwd (Out, FC2)", 4 * fwd_passes, big_fwd * fwd_passes),
        _tp_all_reduce(ctx, "all_reduce bwd (Q, K, V, FC1 input grads)", 8 * layers,
                       2 * big_fwd * layers),
        _tp_all_reduce(ctx, "all_reduce Sub-LN statistics fwd", 8 * fwd_passes,
                       small * fwd_passes),
        _tp_all_reduce(ctx, "all_reduce Sub-LN statistics bwd", 4 * layers, small * layers),
    ]
    if st_.is_first:
        emb = BF16_BYTES * ctx.cfg.max_text_len * ctx.cols * ctx.cfg.hidden_size
        rows.append(_tp_all_reduce(ctx, "all_reduce vocab-parallel embedding fwd", 1, emb))
    if st_.is_last:
        rows += _masked_head_collectives(ctx)
    if ctx.scoring_pass:
        rows += _scoring_pass_collectives(ctx, st_)
    return rows


def _scoring_pass_collectives(ctx: Context, st_: StageShape) -> List[Dict[str, object]]:
    """The forward all-reduces of ``--image-mask-style attentive``'s scoring pass (without
    feature accumulation): one forward of the micro-batch's b contrastive columns, no
    recomputation."""
    s, b, d, layers = ctx.s, ctx.b, ctx.cfg.hidden_size, st_.num_layers
    big, small = 2 * BF16_BYTES * s * b * d, 2 * 2 * FP32_BYTES * s * b
    rows = [_tp_all_reduce(ctx, "all_reduce fwd (Out, FC2), attentive scoring pass",
                           4 * layers, big * layers),
            _tp_all_reduce(ctx, "all_reduce Sub-LN statistics fwd, attentive scoring pass",
                           8 * layers, small * layers)]
    if st_.is_first:
        rows.append(_tp_all_reduce(ctx, "all_reduce vocab-parallel embedding fwd, attentive "
                                   "scoring pass", 1,
                                   BF16_BYTES * ctx.cfg.max_text_len * b * d))
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
    """Every stage's TP all-reduces per micro-batch and per step, and those of one layer."""
    m = ctx.m
    tp_stages = []
    for st_ in ctx.stages:
        rows = tp_collectives(ctx, st_)
        tp_stages.append({"stage": st_.index, "per_micro_batch": rows,
                          "bytes_sent_per_micro_batch": sum(r["bytes_sent"] for r in rows),
                          "time_s_per_micro_batch": sum(r["time_s"] for r in rows),
                          "bytes_sent_per_step": m * sum(r["bytes_sent"] for r in rows),
                          "count_per_step": m * sum(r["count"] for r in rows)})
    big_fwd, small = _tp_payloads(ctx)
    per_layer = {"forward": {"count": 12, "payload_bytes": big_fwd + small},
                 "backward": {"count": 12, "payload_bytes": 2 * big_fwd + small}}
    for v in per_layer.values():
        v["bytes_sent"] = ring_all_reduce_bytes(v["payload_bytes"], ctx.tp)
    return {"group_size": ctx.tp, "link": "intra-node" if ctx.tp > 1 else None,
            "per_layer_per_micro_batch": per_layer if ctx.tp > 1 else None,
            "per_stage": tp_stages}


# -- PP --------------------------------------------------------------------------------------------
def pp_section(ctx: Context) -> Dict[str, object]:
    """One bf16 ``[s, b, d]`` activation forward and its gradient backward per boundary and
    micro-batch (b: the micro-batch's columns, ``b·(1 + n)`` under ``--objective m2``); rank r
    of stage i talks to r + TP·DP."""
    tp, dp, gpn, m, pp = ctx.tp, ctx.dp, ctx.gpn, ctx.m, ctx.pp
    hop = BF16_BYTES * ctx.s * ctx.cols * ctx.cfg.hidden_size
    boundaries = []
    for i in range(pp - 1):
        inter = any((r + tp * dp * i) // gpn != (r + tp * dp * (i + 1)) // gpn
                    for r in range(tp * dp))
        boundaries.append({"stages": [i, i + 1], "link": _link(inter),
                           "bytes_per_micro_batch_each_way": hop,
                           "time_s_per_transfer": ctx.latency + hop / (ctx.bandwidth(inter) * GB)})
    out = {"boundaries": boundaries, "bytes_sent_per_rank_per_step": (
        2 * m * hop if pp > 2 else m * hop if pp == 2 else 0),
        "note": "a middle stage sends M activations forward and M gradients backward; "
                "first and last stages send one direction"}
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
    hop = BF16_BYTES * ctx.s * ctx.b * ctx.cfg.hidden_size if ctx.scoring_pass else 0
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


def dp_collectives(ctx: Context, p: Dict[str, int]) -> List[Dict[str, object]]:
    """The DP collectives of a stage holding the parameters ``p``, once per step: fp32
    gradients of the trainable parameters (``grad_reduce_in_fp32``) all-reduced, or with the
    distributed optimizer reduce-scattered, then the updated bf16 parameters all-gathered."""
    dp, inter = ctx.dp, _dp_inter(ctx)
    link, bw, latency = _link(inter), ctx.bandwidth(inter), ctx.latency
    grad_payload = FP32_BYTES * p["trainable"]
    if dp == 1:
        return []
    if ctx.layout.distributed_optimizer:
        par_payload = BF16_BYTES * p["trainable"]
        return [_collective("reduce_scatter grads (fp32)", 1, grad_payload,
                            (dp - 1) * grad_payload / dp, link, bw, latency),
                _collective("all_gather params (bf16)", 1, par_payload,
                            (dp - 1) * par_payload / dp, link, bw, latency)]
    return [_collective("all_reduce grads (fp32)", 1, grad_payload,
                        ring_all_reduce_bytes(grad_payload, dp), link, bw, latency)]


def dp_section(ctx: Context) -> Dict[str, object]:
    """Every stage's DP collectives per step."""
    dp_stages = []
    for st_, p in zip(ctx.stages, ctx.params):
        rows = dp_collectives(ctx, p)
        dp_stages.append({"stage": st_.index, "collectives": rows,
                          "bytes_sent_per_step": sum(r["bytes_sent"] for r in rows),
                          "time_s": sum(r["time_s"] for r in rows)})
    return {"group_size": ctx.dp, "link": _link(_dp_inter(ctx)) if ctx.dp > 1 else None,
            "distributed_optimizer": ctx.layout.distributed_optimizer, "per_stage": dp_stages}


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
