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


def _flop(x: float) -> str:
    """FLOPs as PFLOP, or TFLOP below 0.1 PFLOP."""
    return f"{x / 1e15:,.1f} PFLOP" if x >= 1e14 or x == 0 else f"{x / 1e12:,.1f} TFLOP"


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
            + (f", objective {lay.objective}" if lay.objective != "itc" else "")
            + "".join(f", {x}" for x in _scale_features(lay))]


def _scale_features(lay) -> List[str]:
    """The scale features that are on, as the header names them."""
    out = []
    if lay.sequence_parallel:
        out.append("sequence parallel")
    if lay.layers_per_virtual_stage is not None:
        out.append(f"interleaved pipeline ({lay.layers_per_virtual_stage} layers per chunk)")
    if lay.image_mask_ratio:
        out.append(f"patch dropout {lay.image_mask_ratio:g}")
    overlap = [name for name, on in (("grad reduce", lay.overlap_grad_reduce),
                                     ("param gather", lay.overlap_param_gather)) if on]
    if overlap:
        out.append("overlapped DP " + " + ".join(overlap))
    return out


def _layout_lines(plan: Plan) -> List[str]:
    d = plan.derived
    rc = d["recompute"]
    lines = [f"  micro-batches per step M={d['num_micro_batches']}, ITC group k="
             f"{d['itc_group_size']} ({d['dp_ranks_per_node']} DP ranks per node)"
             + (f", recompute {rc[0]} {rc[1]} layer(s)" if rc else "")]
    lay = plan.layout
    if d.get("virtual_stages"):
        lines.append(f"  interleaved 1F1B: {d['virtual_stages']} model chunks of "
                     f"{lay.layers_per_virtual_stage} layers per pipeline rank")
    if lay.image_mask_ratio:
        cfg = plan.model
        keep = d["vision_rows"] - 1
        lines.append(f"  patch dropout {lay.image_mask_ratio:g}: {keep} of {cfg.num_patches} "
                     f"patches kept, vision part {keep + 1} rows instead of "
                     f"{cfg.vision_seq_len} (the plan is for the masked steps; those after "
                     f"--image-mask-ratio-until-iter run unmasked)")
    if lay.sequence_parallel:
        rows = plan.communication["tp"]["rows_per_part"]
        lines.append(f"  sequence parallel: each part padded to a multiple of TP ({rows[0]} "
                     f"vision + {rows[1]} text rows), {(rows[0] + rows[1]) // lay.tp} rows per "
                     f"TP rank between the TP regions")
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
    if st["virtual_stages"] > 1:
        held = (f"{_gb(st['activation_bytes_per_micro_batch'])} per micro-batch, "
                f"{_gb(st['activation_bytes_per_chunk_micro_batch'])} per model chunk x "
                f"{st['in_flight_micro_batches']} chunk-micro-batches in flight "
                f"(interleaved 1F1B warmup + 1)")
    else:
        held = (f"{_gb(st['activation_bytes_per_micro_batch'])} per micro-batch x "
                f"{st['in_flight_micro_batches']} in flight")
    lines.append(f"  activations: {held}"
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
    what = ("collectives (sequence parallel: all-gathers and reduce-scatters for the "
            "all-reduces)" if comm["tp"]["sequence_parallel"] else "all-reduces")
    lines = [f"  TP  (t={tp}, intra-node): {tp_peak['count_per_step']:,} {what},"
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
        v = comm["pp"]["virtual_stages"]
        per = ("per micro-batch each way" if v == 1 else
               f"per message, {v} messages (one per model chunk) each way per micro-batch")
        lines.append(f"  PP  p2p {_mb(hop)} {per}, {'/'.join(links)}; the busiest stage "
                     f"sends {_mb(comm['pp']['bytes_sent_per_rank_per_step'])} per step")
    else:
        lines.append("  PP  none (PP=1)")
    dpc = max(comm["dp"]["per_stage"], key=lambda x: x["bytes_sent_per_step"])
    if comm["dp"]["group_size"] > 1:
        ops = " + ".join(r["op"] for r in dpc["collectives"])
        first = comm["dp"]["per_stage"][0]
        buckets = (f"; stage 0 in {first['buckets']} buckets of "
                   f"{first['bucket_elements'] / 1e6:,.0f}M elements"
                   if comm["dp"]["overlap_grad_reduce"] else "")
        lines.append(f"  DP  (n={comm['dp']['group_size']}, {comm['dp']['link']}): {ops}: "
                     f"{_mb(dpc['bytes_sent_per_step'])} (stage {dpc['stage']}){buckets}")
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
    masked = (f", masked heads, VQ-KD forward {_flop(fl['vqkd_flops_per_step'])}"
              if "vqkd_flops_per_step" in fl else "")
    extra = sum(r.get("extra_forward_flops", 0) for r in fl["per_stage_rank"])
    hw_note = (" (incl. the attentive scoring pass)"
               if extra and plan.layout.image_mask_style == "attentive"
               and not plan.layout.itc_accumulate_features else "")
    return ["",
            f"FLOPs per step: model {_flop(fl['model_flops_per_step'])} "
            f"(6 x {plan.parameters['active_per_token'] / 1e9:.2f} B active params x tokens "
            f"= {_flop(fl['six_n_t'])} + attention, embeddings, heads, "
            f"loss{masked}); hardware {_flop(fl['hardware_flops_per_step'])}"
            f"{hw_note}",
            f"step time {_ms(tm['step_time_s'])} ms = compute {_ms(tm['compute_s'])} "
            f"(MFU {plan.assumptions.mfu:g} while computing, bubble "
            f"{tm['pipeline_bubble_fraction']:.0%}) + TP {_ms(tm['tp_comm_s'])} + ITC "
            f"{_ms(tm['itc_s'])} + PP {_ms(tm['pp_p2p_s'])} + DP {_ms(tm['dp_comm_s'])}"
            + (f" + VQ-KD {_ms(tm['vqkd_s'])}" if tm.get("vqkd_s") else "")
            + (f" + attentive scores PP {_ms(tm['attentive_scores_s'])}"
               if tm.get("attentive_scores_s") else "")
            + f" ms ({_dp_overlap_note(plan)})",
            f"  {tm['samples_per_s']:,.0f} samples/s, MFU {tm['mfu']:.1%} of "
            f"{tm['peak_tflops_used']:g} TFLOP/s per GPU"] + _dp_lines(plan) + _bubble_lines(plan)


def _dp_overlap_note(plan: Plan) -> str:
    """The DP term of the step: exposed, out of how much traffic."""
    dp = plan.time["dp_overlap"]
    if plan.communication["dp"]["group_size"] <= 1:
        return "no DP traffic"
    if not dp["hidden_s"] > 0:
        return "DP not overlapped"
    return f"DP: exposed part of {_ms(dp['traffic_s'])} ms of traffic, {_ms(dp['hidden_s'])} hidden"


def _dp_lines(plan: Plan) -> List[str]:
    """How the exposed DP time comes about (the stages that set it)."""
    dp = plan.time["dp_overlap"]
    if plan.communication["dp"]["group_size"] <= 1:
        return []
    if not dp["derived"]:
        return [f"  DP overlap: --dp-overlap {plan.assumptions.dp_overlap:g} of the slowest "
                f"stage's {_ms(dp['traffic_s'])} ms hidden (an override of the derivation)"]

    def how(st: Dict[str, object], on: bool, flag: str, window: str, phase: str,
            slack: str) -> str:
        parts = []
        if on:
            parts.append(f"{flag}: {st['buckets']} bucket(s) over the {phase} "
                         f"{_ms(st[window])} ms")
        if st[slack] > 0:
            parts.append(f"{_ms(st[slack])} ms of the pipeline's "
                         f"{'drain' if slack == 'drain_s' else 'fill'}")
        return "; ".join(parts) or ("after the schedule" if slack == "drain_s"
                                    else "in the optimizer step")

    g = max(dp["per_stage"], key=lambda x: x["grads_exposed_s"])
    lines = [f"grads {_ms(g['grads_exposed_s'])} of {_ms(g['grads_time_s'])} ms exposed on "
             f"stage {g['stage']} (" + how(g, dp["overlap_grad_reduce"], "--overlap-grad-reduce",
                                           "backward_window_s", "last micro-batch's backward,",
                                           "drain_s") + ")"]
    if plan.layout.distributed_optimizer:
        a = max(dp["per_stage"], key=lambda x: x["params_exposed_s"])
        lines.append(f"params {_ms(a['params_exposed_s'])} of {_ms(a['params_time_s'])} ms "
                     f"exposed on stage {a['stage']} ("
                     + (how(a, True, "--overlap-param-gather", "forward_window_s",
                            "first micro-batch's forward,", "fill_s")
                        if dp["overlap_param_gather"] else "in the optimizer step") + ")")
    return ["  DP overlap: " + "; ".join(lines)]


def _bubble_lines(plan: Plan) -> List[str]:
    tm = plan.time
    if plan.layout.pp <= 1:
        return []
    v = tm["virtual_stages"]
    return [f"  pipeline bubble {_ms(tm['pipeline_bubble_s'])} ms = (PP - 1)"
            + (f"/{v}" if v > 1 else "") + f" slots of {_ms(tm['pipeline_slot_s'])} ms; p2p "
            f"{tm['p2p_transfers_per_step']} transfers per step"]


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
    w = max([16] + [len(r["layout"]) for r in rows])
    lines.append(f"  {'layout':<{w}} {'k':>3} {'memory':>10} {'step ms':>10} {'samples/s':>10} "
                 f"{'MFU':>6}")
    for r in ok[:limit]:
        lines.append(f"  {r['layout']:<{w}} {r['itc_group_size']:>3} {r['memory_gb']:>7.1f} GB "
                     f"{r['step_time_s'] * 1e3:>10.1f} {r['samples_per_s']:>10,.0f} "
                     f"{r['mfu']:>6.1%}")
    if limit is not None and len(ok) > limit:
        lines.append(f"  ... {len(ok) - limit} more that fit")
    for r in (r for r in bad if r["valid"]):
        lines.append(f"  {r['layout']:<{w}} {r['rejected']}")
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
