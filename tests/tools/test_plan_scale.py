"""The planner's scale features, against independent computations: patch dropout
(``--image-mask-ratio``), sequence parallelism (``--sequence-parallel``), the interleaved
pipeline (``--num-layers-per-virtual-pipeline-stage``) and the overlapped data-parallel
communication (``--overlap-grad-reduce``, ``--overlap-param-gather``, ``--ddp-bucket-size``).

The saved activations and the TP collectives of sequence parallelism are measured on the real
model in ``tests/tools/test_plan.py`` (fake process-group backend); here: the FLOPs of patch
dropout from the per-sample formula, megatron-core's own schedule arithmetic (the interleaved
warmup count, the bubble), the exposed DP time's bounds and limits, the validation against
m2-pretrain's ``validate_args``, the search and the CLI.
"""

import dataclasses
import json
from types import SimpleNamespace

import pytest

from megatron_m2 import planner
from megatron_m2.config import ConfigError
from megatron_m2.flavors import count_parameters, get_flavor
from megatron_m2.planner import Assumptions, Cluster, Layout, make_plan
from megatron_m2.planner.inputs import ddp_bucket_elements, patch_keep_count
from megatron_m2.planner.memory import in_flight_micro_batches
from tests.tools.test_plan import _cli

C4 = Cluster(nodes=4, gpus_per_node=8)
C32 = Cluster(nodes=32, gpus_per_node=8)


def _plan(flavor="10b", cluster=C4, assumptions=Assumptions(), **layout):
    return make_plan(get_flavor(flavor), Layout(**layout), cluster, assumptions, flavor)


def _pretrain_error(plan):
    """m2-pretrain's verdict on the command the planner prints, on the plan's world."""
    from megatron_m2.training.arguments import parse_args
    from megatron_m2.training.validation import validate_args

    try:
        validate_args(parse_args(plan.training_args() + ["--synthetic"]),
                      plan.cluster.world_size, plan.cluster.gpus_per_node)
    except ConfigError as e:
        return str(e)
    return None


# -- patch dropout ---------------------------------------------------------------------------------
def test_patch_keep_count_is_the_data_pipelines():
    from megatron_m2.data.masking import patch_keep_count as data_keep_count

    for patches in (16, 196, 256, 576):
        for ratio in (0.0, 0.25, 0.5, 0.75, 0.9, 0.99):
            assert patch_keep_count(patches, ratio) == data_keep_count(patches, ratio)
    assert patch_keep_count(196, 0.5) == 98 and patch_keep_count(196, 0.75) == 49


def test_patch_dropout_shrinks_flops_by_the_formulas_ratio():
    """0.4b at r = 0.5: 98 of 196 patches, the vision part 99 rows instead of 197. The model
    FLOPs shrink by the ratio the per-sample formula gives for 99 + 52 rows against 197 + 52
    (linear and attention terms; the patch Conv2d still embeds every patch)."""
    cfg = get_flavor("0.4b")
    base, pd = _plan("0.4b", tp=2, pp=2), _plan("0.4b", tp=2, pp=2, image_mask_ratio=0.5)
    assert pd.valid, pd.errors
    assert pd.derived["vision_rows"] == 99 and base.derived["vision_rows"] == 197
    k = base.derived["itc_group_size"]

    def step(sv):
        f = planner.forward_flops_per_sample(cfg, sv, cfg.max_text_len, k * 8, 2)
        per = cfg.num_layers * (f["layer_gemm"] + f["layer_attention"]) + f["embed"] \
            + f["heads"] + f["loss"]
        return 3 * per * base.derived["global_batch"]

    ratio = step(99) / step(197)
    assert 0.55 < ratio < 0.65
    assert pd.flops["model_flops_per_step"] / base.flops["model_flops_per_step"] == \
        pytest.approx(ratio, rel=1e-12)
    assert pd.flops["model_flops_per_step"] == step(99)
    assert pd.flops["six_n_t"] * 249 == base.flops["six_n_t"] * 151
    # The embedding's Conv2d runs on all 196 patches either way.
    assert pd.flops["forward_per_sample"]["embed"] == base.flops["forward_per_sample"]["embed"]
    # Activations, TP payloads and the p2p message: per token, 151 of 249 tokens.
    a, b = (p.memory["per_stage"][1]["activation_bytes_per_micro_batch"] for p in (base, pd))
    assert b / a == pytest.approx(151 / 249)
    hop = [p.communication["pp"]["boundaries"][0]["bytes_per_micro_batch_each_way"]
           for p in (base, pd)]
    assert hop[1] * 249 == hop[0] * 151
    tp = [p.communication["tp"]["per_stage"][1]["bytes_sent_per_micro_batch"]
          for p in (base, pd)]
    assert tp[1] / tp[0] == pytest.approx(151 / 249)
    assert pd.time["step_time_s"] < base.time["step_time_s"]
    assert pd.training_args()[-2:] == ["--image-mask-ratio", "0.5"]
    assert _pretrain_error(pd) is None


def test_patch_dropout_rules_are_m2_pretrains():
    # The m2 objective has no patch dropout: the planner refuses it with m2-pretrain's words.
    m2 = _plan("0.4b", objective="m2", mim_target="pixel", image_mask_ratio=0.5)
    assert not m2.valid and len(m2.errors) == 1
    assert "--image-mask-ratio (patch dropout) works with contrastive training only" in \
        m2.errors[0] and "objective 'm2' has no patch dropout" in m2.errors[0]
    assert _pretrain_error(m2) == m2.errors[0]
    from megatron_m2.objectives import objective_class
    from megatron_m2.planner.validate import PATCH_DROPOUT_OBJECTIVES

    assert [o for o in ("itc", "m2") if objective_class(o).supports_patch_dropout] == \
        list(PATCH_DROPOUT_OBJECTIVES)
    bad = _plan("0.4b", image_mask_ratio=1.0)
    assert bad.errors == ["--image-mask-ratio must be in [0, 1), got 1.0"]
    assert _pretrain_error(bad) == bad.errors[0]
    # FP8: the vision branch's rows (1 + 98) x micro-batch must be a multiple of 16.
    fp8 = _plan("0.4b", precision="fp8", micro_batch=8, global_batch=256, image_mask_ratio=0.5)
    assert any("99 tokens x 8 rows" in e for e in fp8.errors), fp8.errors
    assert _plan("0.4b", precision="fp8", micro_batch=16, image_mask_ratio=0.5).valid


# -- sequence parallelism --------------------------------------------------------------------------
def test_sequence_parallel_needs_tp_2_like_m2_pretrain():
    p = _plan("0.4b", sequence_parallel=True)
    assert not p.valid and any("--sequence-parallel shards activations" in e for e in p.errors)
    assert _pretrain_error(p) == "; ".join(p.errors)
    ok = _plan("0.4b", tp=2, sequence_parallel=True)
    assert ok.valid and "--sequence-parallel" in ok.training_args()
    assert _pretrain_error(ok) is None


def test_sequence_parallel_activations_messages_and_tp_traffic_by_hand():
    """10b at TP=4: the parts padded to 200 + 52 rows; per layer and padded token
    ``(8h + 16 + 10h + 6f + 4a)/t + 16`` bytes instead of ``8h + (10h + 6f + 4a)/t + 32``; the
    p2p message a quarter of the padded sequence; the bf16 TP traffic 4/3 of the
    all-reduces' (Q, K and V gather their input each), on 252 instead of 249 rows."""
    cfg = get_flavor("10b")
    h, f, a, t, b = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads, 4, 8
    off, on = _plan(tp=t, pp=2), _plan(tp=t, pp=2, sequence_parallel=True)
    assert on.communication["tp"]["rows_per_part"] == [200, 52]
    s, s_p = 249, 252
    assert planner.layer_activation_bytes(cfg, t, s_p, b, sequence_parallel=True) == \
        ((8 * h + 16 + 10 * h + 6 * f + 4 * a) * s_p * b) // t + 16 * s_p * b
    assert planner.layer_activation_bytes(cfg, t, s_p, b, entry=True, sequence_parallel=True) \
        - planner.layer_activation_bytes(cfg, t, s_p, b, sequence_parallel=True) == \
        (2 * h + 8) * s_p * b // t
    per_layer_off = planner.layer_activation_bytes(cfg, t, s, b)
    per_layer_on = planner.layer_activation_bytes(cfg, t, s_p, b, sequence_parallel=True)
    assert 0.6 < per_layer_on / per_layer_off < 0.75  # the replicated 8h is gone
    mid_off, mid_on = (p.memory["per_stage"][0] for p in (off, on))
    assert mid_on["activations_bytes"] < mid_off["activations_bytes"]
    hop_off = off.communication["pp"]["boundaries"][0]["bytes_per_micro_batch_each_way"]
    hop_on = on.communication["pp"]["boundaries"][0]["bytes_per_micro_batch_each_way"]
    assert hop_off == 2 * s * b * h and hop_on == 2 * s_p * b * h // t
    bf16 = [sum(r["bytes_sent"] for r in p.communication["tp"]["per_stage"][1]["per_micro_batch"]
                if "Sub-LN" not in r["op"] and "embedding" not in r["op"]
                and "heads" not in r["op"]) for p in (off, on)]
    assert bf16[1] / bf16[0] == pytest.approx(4 / 3 * s_p / s)
    per_layer = on.communication["tp"]["per_layer_per_micro_batch"]
    assert (per_layer["forward"]["count"], per_layer["backward"]["count"]) == (20, 24)
    assert _pretrain_error(on) is None


# -- interleaved pipeline --------------------------------------------------------------------------
def _megatron_in_flight(pp, rank, m, v):
    """megatron-core's warmup count (``get_pp_rank_microbatches``, on a stand-in communicator
    of the rank's PP group) + the forward that precedes the first backward."""
    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches

    comm = SimpleNamespace(pp_group=SimpleNamespace(size=lambda: pp, rank=lambda: rank),
                           virtual_pipeline_model_parallel_size=v if v > 1 else None)
    total, all_warmup, warmup, _ = get_pp_rank_microbatches(m, v, pp, p2p_communicator=comm)
    return total if all_warmup else warmup + 1


@pytest.mark.parametrize("pp,v,m", [(2, 2, 4), (2, 2, 8), (4, 2, 8), (4, 2, 4), (4, 1, 8),
                                    (4, 3, 8), (8, 1, 4)])
def test_in_flight_micro_batches_follow_megatrons_schedule(pp, v, m):
    for rank in range(pp):
        assert in_flight_micro_batches(pp, rank, m, v) == _megatron_in_flight(pp, rank, m, v)
    if v > 1 and m * v > (pp - 1) * 2 + (v - 1) * pp:
        assert in_flight_micro_batches(pp, 0, m, v) == (pp - 1) * 2 + (v - 1) * pp + 1


def test_interleaved_pipeline_bubble_messages_and_memory():
    """10b, TP=4 × PP=4, M = 16: chunks of 3 layers, v = 2 per rank. The bubble is
    (PP − 1)/v slots of a whole-stage micro-batch (megatron's interleaved 1F1B: the bubble
    fraction of the ideal time (PP − 1)/(v·M)); each micro-batch sends v messages each way per
    rank; rank 0 holds (PP − 1)·2 + (v − 1)·PP + 1 chunk-micro-batches of 3 layers."""
    gbs = 16 * 8 * 2  # M = 16 micro-batches of 8 on DP = 2
    base = _plan(tp=4, pp=4, global_batch=gbs)
    vpp = _plan(tp=4, pp=4, global_batch=gbs, layers_per_virtual_stage=3)
    assert vpp.valid, vpp.errors
    pp, v, m = 4, 2, 16
    assert vpp.derived["virtual_stages"] == v and vpp.time["virtual_stages"] == v
    for p, chunks in ((base, 1), (vpp, v)):
        slot, bubble = p.time["pipeline_slot_s"], p.time["pipeline_bubble_s"]
        assert bubble == pytest.approx((pp - 1) / chunks * slot)
        assert bubble / (m * slot) == pytest.approx((pp - 1) / (chunks * m))
        assert p.time["pipeline_bubble_fraction"] == pytest.approx(
            (pp - 1) / chunks / (m + (pp - 1) / chunks))
        assert p.time["p2p_transfers_per_step"] == 2 * (chunks * m + pp - 1)
    assert vpp.time["pipeline_bubble_s"] < base.time["pipeline_bubble_s"]
    # Every chunk boundary, the last rank's back to rank 0 included.
    assert [b["stages"] for b in vpp.communication["pp"]["boundaries"]] == \
        [[0, 1], [1, 2], [2, 3], [3, 0]]
    assert vpp.communication["pp"]["bytes_sent_per_rank_per_step"] == \
        v * base.communication["pp"]["bytes_sent_per_rank_per_step"]
    st0 = vpp.memory["per_stage"][0]
    assert st0["chunks"] == [[0, 3], [12, 15]]
    assert st0["in_flight_micro_batches"] == (pp - 1) * 2 + (v - 1) * pp + 1 == 11
    assert st0["activation_bytes_per_chunk_micro_batch"] == \
        -(-st0["activation_bytes_per_micro_batch"] // v)
    assert st0["activations_bytes"] == 11 * st0["activation_bytes_per_chunk_micro_batch"]
    base0 = base.memory["per_stage"][0]
    assert base0["in_flight_micro_batches"] == 4
    assert st0["activation_bytes_per_micro_batch"] == base0["activation_bytes_per_micro_batch"]
    assert vpp.training_args()[-2:] == ["--num-layers-per-virtual-pipeline-stage", "3"]
    assert _pretrain_error(vpp) is None


def test_interleaved_stages_hold_their_chunks_layers():
    """With chunks the VL layers and the first VL layer sit where their chunk does; the stages
    still sum to the model, and hold what the non-interleaved split would not."""
    cfg = get_flavor("10b")  # 21 + 3 layers
    for pp, n in ((2, 3), (2, 6), (4, 3), (3, 4)):
        stages = planner.stage_layout(cfg, pp, n)
        ids = sorted(k for st in stages for k in st.layer_ids())
        assert ids == list(range(cfg.num_layers))
        assert [st.has_entry for st in stages].count(True) == 1
        assert sum(st.num_vl for st in stages) == cfg.num_vl_layers
        params = planner.stage_parameters(cfg, 1, pp, layers_per_virtual_stage=n)
        assert sum(p["total"] for p in params) == count_parameters(cfg)
    # PP=3 with chunks of 4: the last chunk (layers 20-23) is on rank 2, but layer 20 is sep.
    st = planner.stage_layout(cfg, 3, 4)
    assert st[2].chunks == ((8, 12), (20, 24)) and (st[2].num_sep, st[2].num_vl) == (5, 3)


# -- overlapped DP communication -------------------------------------------------------------------
def test_bucket_size_is_megatrons_default():
    assert ddp_bucket_elements(8) == 40_000_000 and ddp_bucket_elements(64) == 64_000_000
    assert ddp_bucket_elements(8, 1000) == 1000
    p = _plan(tp=4, pp=2, distributed_optimizer=True, overlap_grad_reduce=True)
    st0, st1 = p.communication["dp"]["per_stage"]
    trainable = p.memory["per_stage"][0]["trainable_params"]
    assert st0["bucket_elements"] == 40_000_000
    assert st0["buckets"] == -(-trainable // 40_000_000)
    assert st1["buckets"] == 1  # DistributedDataParallel: no bucketing on pp_rank > 0
    small = _plan(tp=4, pp=2, distributed_optimizer=True, overlap_grad_reduce=True,
                  ddp_bucket_size=10_000_000)
    assert small.communication["dp"]["per_stage"][0]["buckets"] == -(-trainable // 10_000_000)
    assert "--ddp-bucket-size" in small.training_args()


@pytest.mark.parametrize("layout", [dict(tp=1, pp=1, micro_batch=16),
                                    dict(tp=4, pp=2, micro_batch=8),
                                    dict(tp=2, pp=2, micro_batch=4, layers_per_virtual_stage=3)])
def test_overlap_reduces_the_exposed_dp_time_never_below_zero(layout):
    cfg = dict(flavor="0.4b", cluster=C4, distributed_optimizer=True, **layout)
    plain = _plan(**cfg)
    grads = _plan(**cfg, overlap_grad_reduce=True)
    both = _plan(**cfg, overlap_grad_reduce=True, overlap_param_gather=True)
    exposed = [p.time["dp_comm_s"] for p in (plain, grads, both)]
    assert exposed[0] > exposed[1] > exposed[2] >= 0
    for p in (plain, grads, both):
        dp = p.time["dp_overlap"]
        assert 0 <= dp["exposed_s"] <= dp["traffic_s"]
        for st in dp["per_stage"]:
            assert 0 <= st["grads_exposed_s"] <= st["grads_time_s"]
            assert 0 <= st["params_exposed_s"] <= st["params_time_s"]
    st0 = both.time["dp_overlap"]["per_stage"][0]
    # Rank 0: n buckets ready evenly over the last micro-batch's backward (consumed over the
    # first forward), one at a time: what the window cannot hide, at least the last bucket,
    # at most max(0, comm - window) + one bucket.
    g, a, n = st0["grads_time_s"], st0["params_time_s"], st0["buckets"]
    wb, wf = st0["backward_window_s"], st0["forward_window_s"]
    assert n > 1
    assert st0["grads_exposed_s"] == pytest.approx(max(g / n, g - wb * (1 - 1 / n)))
    assert st0["params_exposed_s"] == pytest.approx(max(a / n, a - wf * (1 - 1 / n)))
    assert g / n <= st0["grads_exposed_s"] <= max(0.0, g - wb) + g / n
    assert a / n <= st0["params_exposed_s"] <= max(0.0, a - wf) + a / n
    assert both.time["step_time_s"] < plain.time["step_time_s"]


def test_overlap_hides_all_but_one_bucket_behind_a_long_backward():
    """A long backward (0.4b, micro-batch 256) hides the gradient reduce of rank 0 but for its
    last bucket; a single-bucket reduce (bucket larger than the model) is not hidden at all."""
    p = _plan("0.4b", cluster=C4, micro_batch=256, overlap_grad_reduce=True)
    st0 = p.time["dp_overlap"]["per_stage"][0]
    assert st0["backward_window_s"] > st0["grads_time_s"] and st0["buckets"] > 1
    assert st0["grads_exposed_s"] == pytest.approx(st0["grads_time_s"] / st0["buckets"])
    one = _plan("0.4b", cluster=C4, micro_batch=256, overlap_grad_reduce=True,
                ddp_bucket_size=10 ** 10)
    st = one.time["dp_overlap"]["per_stage"][0]
    assert st["buckets"] == 1 and st["grads_exposed_s"] == pytest.approx(st["grads_time_s"])


def test_later_stages_reduce_in_the_pipelines_drain():
    """Rank i > 0 finishes its last backward i backward slots before rank 0 (i/v with v
    chunks): its reduce is exposed only beyond that, with or without the flag."""
    p = _plan(tp=4, pp=4, distributed_optimizer=True)
    stages = p.time["dp_overlap"]["per_stage"]
    slot_b = max(x["backward_window_s"] for x in stages) + max(
        b["time_s_per_transfer"] for b in p.communication["pp"]["boundaries"])
    for st in stages:
        assert st["grads_exposed_s"] == pytest.approx(
            max(0.0, st["grads_time_s"] - st["stage"] * slot_b))
    assert stages[0]["grads_exposed_s"] == stages[0]["grads_time_s"]


def test_interleaving_spreads_the_last_backward_over_the_drain():
    """With v chunks per rank the last micro-batch's backward reaches a rank's chunks PP chunk
    slots apart: its gradients appear over ``W_b + (v − 1)·PP·δ`` (δ = the slowest stage's
    backward + one p2p transfer, over v), and rank r's last backward ends r·δ before rank
    0's."""
    lay = dict(tp=4, pp=2, distributed_optimizer=True, overlap_grad_reduce=True,
               overlap_param_gather=True)
    flat, vpp = _plan(**lay), _plan(**lay, layers_per_virtual_stage=3)
    v, pp = 4, 2
    p2p = max(b["time_s_per_transfer"] for b in vpp.communication["pp"]["boundaries"])
    walls = []
    for fl, tp in zip(vpp.flops["per_stage_rank"], vpp.communication["tp"]["per_stage"]):
        scale = 1 + tp["time_s_per_micro_batch"] / fl["compute_time_s_per_micro_batch"]
        walls.append((fl["forward_time_s_per_micro_batch"] * scale,
                      fl["backward_time_s_per_micro_batch"] * scale))
    delta_b = (max(b for _, b in walls) + p2p) / v
    for st, (_, bwd) in zip(vpp.time["dp_overlap"]["per_stage"], walls):
        assert st["backward_window_s"] == pytest.approx(bwd + (v - 1) * pp * delta_b)
        assert st["drain_s"] == pytest.approx(st["stage"] * delta_b)
        n = st["buckets"]
        g = max(st["grads_time_s"] / n,
                st["grads_time_s"] - st["backward_window_s"] * (1 - 1 / n))
        assert st["grads_exposed_s"] == pytest.approx(max(0.0, g - st["drain_s"]))
    assert vpp.time["dp_overlap"]["per_stage"][1]["buckets"] == v  # one per chunk on rank 1
    assert vpp.time["dp_comm_s"] < flat.time["dp_comm_s"]


def test_dp_overlap_override_and_no_dp():
    over = _plan(tp=4, pp=2, assumptions=Assumptions(dp_overlap=0.25))
    dp = over.time["dp_overlap"]
    assert not dp["derived"] and dp["exposed_s"] == pytest.approx(0.75 * dp["traffic_s"])
    single = _plan(cluster=Cluster(nodes=1, gpus_per_node=8), tp=8, overlap_grad_reduce=True)
    assert single.time["dp_comm_s"] == 0 and single.communication["dp"]["per_stage"][0][
        "collectives"] == []


def test_overlap_param_gather_needs_the_distributed_optimizer_like_m2_pretrain():
    p = _plan(tp=4, pp=2, overlap_param_gather=True)
    assert p.errors == ["--overlap-param-gather needs --use-distributed-optimizer (only the "
                        "distributed optimizer all-gathers parameters)"]
    assert _pretrain_error(p) == p.errors[0]
    bucket = _plan(tp=4, pp=2, ddp_bucket_size=0)
    assert bucket.errors == ["--ddp-bucket-size must be >= 1, got 0"]
    assert _pretrain_error(bucket) == bucket.errors[0]
    ok = _plan(tp=4, pp=2, distributed_optimizer=True, overlap_grad_reduce=True,
               overlap_param_gather=True)
    assert ok.valid and _pretrain_error(ok) is None


# -- all together: the search, the command, the CLI ------------------------------------------------
def test_planned_commands_with_every_feature_pass_validate_args():
    cl = Cluster(nodes=1, gpus_per_node=8)
    checked = 0
    for tp, pp, n in ((2, 2, 1), (2, 2, None), (4, 2, 1), (2, 1, None)):
        for ratio in (0.0, 0.5):
            p = make_plan(get_flavor("tiny"), Layout(
                tp=tp, pp=pp, micro_batch=2, global_batch=2 * 8 // (tp * pp) * pp,
                sequence_parallel=True, layers_per_virtual_stage=n, image_mask_ratio=ratio,
                distributed_optimizer=True, overlap_grad_reduce=True,
                overlap_param_gather=True, itc_heads="vl"), cl, model_name="tiny")
            assert p.valid, p.errors
            assert _pretrain_error(p) is None, p.training_args()
            checked += 1
    assert checked == 8


def test_validation_of_the_scale_flags_agrees_with_m2_pretrain():
    """The planner accepts a layout with the scale flags exactly when m2-pretrain's
    ``validate_args`` accepts its command, and m2-pretrain's message (its first rule that
    fails) begins the planner's list of errors."""
    import itertools

    cl = Cluster(nodes=1, gpus_per_node=8)
    checked = valid = 0
    for tp, pp, n, sp, ratio, objective, dist_opt in itertools.product(
            (1, 2), (1, 2), (None, 1, 3), (False, True), (0.0, 0.5), ("itc", "m2"),
            (False, True)):
        lay = Layout(tp=tp, pp=pp, micro_batch=2, global_batch=2 * 8 // (tp * pp) * 2,
                     layers_per_virtual_stage=n, sequence_parallel=sp, image_mask_ratio=ratio,
                     objective=objective, mim_target="pixel", itc_heads="vl",
                     distributed_optimizer=dist_opt, overlap_grad_reduce=dist_opt,
                     overlap_param_gather=True)
        p = make_plan(get_flavor("tiny"), lay, cl, model_name="tiny")
        msg = _pretrain_error(p)
        assert p.valid == (msg is None), (lay, p.errors, msg)
        if msg is not None:
            assert "; ".join(p.errors).startswith(msg), (lay, p.errors, msg)
        checked += 1
        valid += p.valid
    assert checked == 192 and 10 < valid < 100


def test_search_tries_sequence_parallelism_interleaving_and_overlap():
    rec = planner.recommend(get_flavor("10b"), Layout(), C32, model_name="10b")
    lays = [p.layout for p in rec.candidates]
    assert any(x.sequence_parallel for x in lays)
    assert not any(x.sequence_parallel and x.tp < 2 for x in lays)
    vpp = [p for p in rec.candidates if p.layout.layers_per_virtual_stage]
    assert vpp and all(p.valid for p in vpp)
    fitting = [p for p in rec.candidates if p.fits]
    assert rec.best.time["step_time_s"] == min(p.time["step_time_s"] for p in fitting)
    assert rec.best.layout.overlap_grad_reduce and rec.best.layout.overlap_param_gather
    # The overlap flags are on only with DP > 1 (the parameter gather with the distributed
    # optimizer), and kept only where they shorten the step.
    for p in (p for p in rec.candidates if p.valid and not p.layout.layers_per_virtual_stage):
        lay = p.layout
        assert not lay.overlap_param_gather or lay.distributed_optimizer
        if p.derived["dp"] == 1:
            assert not lay.overlap_grad_reduce
            continue
        other = dataclasses.replace(lay, overlap_grad_reduce=not lay.overlap_grad_reduce,
                                    overlap_param_gather=(not lay.overlap_grad_reduce
                                                          and lay.distributed_optimizer))
        alt = make_plan(p.model, other, p.cluster, p.assumptions, "10b")
        assert p.time["step_time_s"] <= alt.time["step_time_s"]


def test_cli_scale_flags_text_and_json():
    args = ["--flavor", "10b", "--nodes", "4", "--tp", "4", "--pp", "2", "--sequence-parallel",
            "--overlap-grad-reduce", "--use-distributed-optimizer", "--overlap-param-gather",
            "--num-layers-per-virtual-pipeline-stage", "3"]
    out = _cli(*args, "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)["plan"]
    lay = plan["layout"]
    assert (lay["sequence_parallel"], lay["layers_per_virtual_stage"], lay["overlap_grad_reduce"],
            lay["overlap_param_gather"]) == (True, 3, True, True)
    assert plan["time"]["virtual_stages"] == 4 and plan["assumptions"]["dp_overlap"] is None
    assert plan["time"]["dp_overlap"]["derived"]
    text = _cli(*args)
    assert text.returncode == 0
    assert "interleaved 1F1B: 4 model chunks of 3 layers" in text.stdout
    assert "all_gather fwd (Q, K, V, FC1 inputs; sequence parallel)" in text.stdout
    assert "DP overlap: grads" in text.stdout and "(PP - 1)/4 slots" in text.stdout
    pd = _cli("--flavor", "0.4b", "--image-mask-ratio", "0.5")
    assert pd.returncode == 0 and "98 of 196 patches kept, vision part 99 rows" in pd.stdout
    bad = _cli("--flavor", "0.4b", "--overlap-param-gather")
    assert bad.returncode == 2 and "--overlap-param-gather needs" in bad.stdout
