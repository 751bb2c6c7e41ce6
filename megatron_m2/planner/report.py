"""Text reports: :func:`format_plan` (one plan, section by section) and
:func:`format_recommendation` (the search table)."""

from __future__ import annotations

from typing import Dict, List, Optional

from ..flavors import count_parameters
from .inputs import GB
from .plan import Plan
from .search import Recommendation


def _gb(x: float) -> str:
    return f"{x / GB:.2f} GB"


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:,.1f}" if ms >= 10 or ms == 0 else f"{ms:.3f}"


def _mb(x: float) -> str:
    return f"{x / 1e6:,.2f} MB"


def format_plan(plan: Plan) -> str:
    """A readable multi-line report of one plan."""
    lines = _header_lines(plan)
    if not plan.valid:
        lines.append("INVALID layout:")
        lines += [f"  - {e}" for e in plan.errors]
        return "\n".join(lines)
    for section in (_layout_lines, _memory_lines, _communication_lines, _time_lines,
                    _decode_lines):
        lines += section(plan)
    return "\n".join(lines)


def _header_lines(plan: Plan) -> List[str]:
    lay, cl = plan.layout, plan.cluster
    return [f"M2-Encoder {plan.model_name}: {count_parameters(plan.model):,} parameters; "
            f"{cl.nodes} nodes x {cl.gpus_per_node} GPUs ({cl.world_size}), "
            f"{cl.gpu_memory_gb:g} GB each",
            f"layout: TP={lay.tp} PP={lay.pp} DP={plan.derived.get('dp', '?')}, micro-batch "
            f"{lay.micro_batch}, global batch {plan.derived.get('global_batch', '?')}, "
            f"{lay.precision}, distributed optimizer "
            f"{'on' if lay.distributed_optimizer else 'off'}, recompute "
            f"{'on' if lay.recompute else 'off'}, itc heads {lay.itc_heads}"
            + (f", objective {lay.objective}" if lay.objective != "itc" else "")]


def _layout_lines(plan: Plan) -> List[str]:
    d = plan.derived
    rc = d["recompute"]
    lines = [f"  micro-batches per step M={d['num_micro_batches']}, ITC group k="
             f"{d['itc_group_size']} ({d['dp_ranks_per_node']} DP ranks per node)"
             + (f", recompute {rc[0]} {rc[1]} layer(s)" if rc else "")]
    lines.append("  m2-pretrain " + " ".join(plan.training_args()))
    for w in plan.warnings:
        lines.append(f"  warning: {w}")
    return lines


def _memory_lines(plan: Plan) -> List[str]:
    mem, cl = plan.memory, plan.cluster
    lines = [""]
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
    if "columns" in st:
        last = mem["per_stage"][-1]
        p = plan.parameters["per_stage_rank"][-1]
        b = plan.layout.micro_batch
        lines.append(f"  objective {plan.layout.objective}: {st['columns']} columns per "
                     f"micro-batch ({b} contrastive + {st['columns'] - b} fused); last stage: "
                     f"masked heads {p['masked_heads']:,} params, their logits "
                     f"{_gb(last['masked_loss_bytes'])}"
                     + (f", VQ-KD {_gb(last['vqkd_weight_bytes'])} (fp32 weights) + "
                        f"{_gb(last['vqkd_working_bytes'])} (its forward)"
                        if last["vqkd_weight_bytes"] else ""))
        if plan.layout.image_mask_style == "attentive" and last.get("columns"):
            lines.append("  attentive masking: "
                         + ("scores from feature accumulation's first phase"
                            if plan.layout.itc_accumulate_features else
                            f"a forward-only scoring pass of the {b} contrastive columns "
                            "(one layer's transient, no activations kept)"))
    return lines


def _communication_lines(plan: Plan) -> List[str]:
    return (["", "communication per rank per step:"] + _tp_lines(plan) + _pp_dp_lines(plan)
            + _itc_lines(plan))


def _tp_lines(plan: Plan) -> List[str]:
    tp, comm = plan.layout.tp, plan.communication
    if tp <= 1:
        return ["  TP  none (TP=1)"]
    tp_peak = max(comm["tp"]["per_stage"], key=lambda x: x["bytes_sent_per_step"])
    pl = comm["tp"]["per_layer_per_micro_batch"]
    lines = [f"  TP  (t={tp}, intra-node): {tp_peak['count_per_step']:,} all-reduces,"
             f" {_mb(tp_peak['bytes_sent_per_step'])} sent (stage {tp_peak['stage']})",
             f"      per layer and micro-batch: forward {pl['forward']['count']} "
             f"({_mb(pl['forward']['bytes_sent'])} sent), backward "
             f"{pl['backward']['count']} ({_mb(pl['backward']['bytes_sent'])} sent)"]
    for r in tp_peak["per_micro_batch"]:
        lines.append(f"      {r['op']}: {r['count']} x per micro-batch, "
                     f"{_mb(r['bytes_sent'])} sent")
    return lines


def _pp_dp_lines(plan: Plan) -> List[str]:
    comm = plan.communication
    lines = []
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
    return lines


def _itc_lines(plan: Plan) -> List[str]:
    itc = plan.communication["itc"]
    g, gl = itc["gba"], itc["global"]
    ratio = itc["global_over_gba"]
    return [f"  ITC GBA k={g['group_size']} ({g['link'] or 'no gather'}): "
            f"{_mb(g['bytes_sent_per_step'])}; global ITC k={gl['group_size']} "
            f"({gl['link'] or 'no gather'}): {_mb(gl['bytes_sent_per_step'])}"
            + (f" -> {ratio:.1f}x less" if ratio else ""),
            f"      {itc['embeddings']} fp32 embeddings of {itc['embed_dim']} x "
            f"{itc['rows_per_contrastive_batch']} rows, "
            f"{itc['contrastive_batches_per_step']} contrastive batch(es) per step; "
            f"negatives per sample {g['negatives_per_sample']} "
            f"(global {gl['negatives_per_sample']})"]


def _time_lines(plan: Plan) -> List[str]:
    fl, tm = plan.flops, plan.time
    masked = (f", masked heads, VQ-KD forward {fl['vqkd_flops_per_step'] / 1e15:,.2f}"
              if "vqkd_flops_per_step" in fl else "")
    extra = sum(r.get("extra_forward_flops", 0) for r in fl["per_stage_rank"])
    hw_note = (" (incl. the attentive scoring pass)"
               if extra and plan.layout.image_mask_style == "attentive"
               and not plan.layout.itc_accumulate_features else "")
    return ["",
            f"FLOPs per step: model {fl['model_flops_per_step'] / 1e15:,.1f} PFLOP "
            f"(6 x {plan.parameters['active_per_token'] / 1e9:.2f} B active params x tokens "
            f"= {fl['six_n_t'] / 1e15:,.1f} PFLOP + attention, embeddings, heads, "
            f"loss{masked}); hardware {fl['hardware_flops_per_step'] / 1e15:,.1f} PFLOP"
            f"{hw_note}",
            f"step time {_ms(tm['step_time_s'])} ms = compute {_ms(tm['compute_s'])} "
            f"(MFU {plan.assumptions.mfu:g} while computing, bubble "
            f"{tm['pipeline_bubble_fraction']:.0%}) + TP {_ms(tm['tp_comm_s'])} + ITC "
            f"{_ms(tm['itc_s'])} + PP {_ms(tm['pp_p2p_s'])} + DP {_ms(tm['dp_comm_s'])}"
            + (f" + VQ-KD {_ms(tm['vqkd_s'])}" if tm.get("vqkd_s") else "")
            + (f" + attentive scores PP {_ms(tm['attentive_scores_s'])}"
               if tm.get("attentive_scores_s") else "")
            + " ms (not overlapped)",
            f"  {tm['samples_per_s']:,.0f} samples/s, MFU {tm['mfu']:.1%} of "
            f"{tm['peak_tflops_used']:g} TFLOP/s per GPU"]


def _decode_lines(plan: Plan) -> List[str]:
    d = plan.decode
    if not d:
        return []
    need, have = d["cpu_cores_needed_per_gpu"], d["cpu_cores_for_workers_per_gpu"]
    verdict = (f"the CPU path fits: --num-workers {d['num_workers']}" if d["image_decode"] == "cpu"
               else f"the CPU path would need {need / max(have, 1e-9):.1f}x the cores: use "
                    "--image-decode gpu (nvJPEG; with --randaugment none)")
    return ["",
            f"data loading: {d['samples_per_s_per_gpu']:,.0f} samples/s per GPU (global batch / "
            f"step time / DP: every rank loads its replica's batch); CPU decode at "
            f"{d['cpu_decode_samples_per_core']:,.0f} samples/s per core needs {need:.1f} "
            f"cores per GPU of {d['cpu_cores_per_gpu']:g} ({have:g} for loader workers): "
            f"{verdict}"]


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
