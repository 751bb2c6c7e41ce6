"""One set of layout rules: the planner and ``m2-pretrain`` agree on every layout.

The property: over the planner's search space (TP, PP, DP via the cluster, micro- and global
batch, precision, recomputation, ITC group, ITC heads; and a sample of it under ``--objective
m2 --mim-target pixel`` with the masked flags), a layout the planner calls valid passes
``m2-pretrain``'s own argument validation when given the command the planner prints
(``Plan.training_args``) on the same world and node size, and a layout ``m2-pretrain`` accepts
is one the planner calls valid.
"""

import itertools
import random

import pytest

from megatron_m2.config import ConfigError
from megatron_m2.flavors import get_flavor
from megatron_m2.layout import ParallelLayout, check_layout
from megatron_m2.planner import Cluster, Layout, make_plan

FLAVORS = ("tiny", "0.4b")
CLUSTERS = (Cluster(nodes=1, gpus_per_node=2), Cluster(nodes=1, gpus_per_node=4),
            Cluster(nodes=2, gpus_per_node=4), Cluster(nodes=3, gpus_per_node=2),
            Cluster(nodes=2, gpus_per_node=8))
TPS, PPS, MBS = (1, 2, 4, 8), (1, 2, 3, 4, 6), (1, 2, 4, 8, 16)
GLOBAL = (None, 48)
PRECISIONS = ("bf16", "fp8")
RECOMPUTE = ((False, None), (True, None), (True, 1), (True, 2), (True, 7))
ITC = ((None, None), (-1, None), (1, None), (2, None), (3, None), (None, 1), (None, 2),
       (None, -1))
HEADS = ("both", "vl")


def _space():
    full = list(itertools.product(FLAVORS, CLUSTERS, TPS, PPS, MBS, GLOBAL, PRECISIONS,
                                  RECOMPUTE, ITC, HEADS))
    rng = random.Random(0)
    picked = rng.sample(full, 2500)
    # The layout that once made the planner print a command m2-pretrain rejected.
    picked.append(("0.4b", Cluster(nodes=1, gpus_per_node=8), 1, 1, 8, None, "fp8",
                   (False, None), (None, None), "both"))
    return picked


def _pretrain_accepts(plan, cluster, monkeypatch):
    from megatron_m2.training import validation
    from megatron_m2.training.arguments import parse_args

    monkeypatch.setattr(validation, "have_transformer_engine", lambda: True)
    args = parse_args(plan.training_args() + ["--synthetic"])
    try:
        validation.validate_args(args, cluster.world_size, cluster.gpus_per_node)
    except ConfigError as e:
        return str(e)
    return None


def test_planner_and_pretrain_agree_on_every_layout(monkeypatch):
    disagreements, valid = [], 0
    for (flavor, cluster, tp, pp, mbs, gbs, precision, (rc, rc_n), (k, agg),
         heads) in _space():
        lay = Layout(tp=tp, pp=pp, micro_batch=mbs, global_batch=gbs, precision=precision,
                     recompute=rc, recompute_num_layers=rc_n, itc_group_size=k,
                     itc_aggregate_nodes=agg, itc_heads=heads)
        plan = make_plan(get_flavor(flavor), lay, cluster, model_name=flavor)
        error = _pretrain_accepts(plan, cluster, monkeypatch)
        valid += plan.valid
        if plan.valid != (error is None):
            disagreements.append((flavor, cluster, lay, plan.errors, error))
    assert not disagreements, disagreements[:5]
    assert 100 < valid < 2400  # the space holds both kinds


M2_OBJECTIVES = (
    dict(objective="m2", mim_target="pixel"),
    dict(objective="m2", mim_target="pixel", cmim_weight=0.0, cmlm_tie_embeddings=True),
    dict(objective="m2", mim_target="pixel", cmlm_weight=0.0, image_mask_patches=8),
    dict(objective="m2", mim_target="pixel", cmlm_tie_embeddings=True, cmlm_weight=0.5),
    dict(objective="m2", mim_target="pixel", image_mask_style="attentive",
         attentive_mask_temperature=0.5),
    dict(objective="m2", mim_target="pixel", image_mask_style="attentive", cmim_weight=0.0),
)


def test_planner_and_pretrain_agree_under_objective_m2(monkeypatch):
    rng = random.Random(1)
    disagreements, valid = [], 0
    for (flavor, cluster, tp, pp, mbs, gbs, precision, (rc, rc_n), (k, agg),
         heads) in rng.sample(_space(), 400):
        lay = Layout(tp=tp, pp=pp, micro_batch=mbs, global_batch=gbs, precision=precision,
                     recompute=rc, recompute_num_layers=rc_n, itc_group_size=k,
                     itc_aggregate_nodes=agg, itc_heads=heads, **rng.choice(M2_OBJECTIVES))
        plan = make_plan(get_flavor(flavor), lay, cluster, model_name=flavor)
        error = _pretrain_accepts(plan, cluster, monkeypatch)
        valid += plan.valid
        if plan.valid != (error is None):
            disagreements.append((flavor, cluster, lay, plan.errors, error))
    assert not disagreements, disagreements[:5]
    assert 20 < valid < 380


def test_fp8_micro_batch_the_model_does_not_pad():
    # 0.4b: 197 vision tokens x 8 = 1576 rows, not a multiple of 16: invalid for both.
    plan = make_plan(get_flavor("0.4b"), Layout(precision="fp8", micro_batch=8),
                     Cluster(nodes=1, gpus_per_node=8))
    assert not plan.valid and any("197 tokens x 8" in e for e in plan.errors)
    assert make_plan(get_flavor("0.4b"), Layout(precision="fp8", micro_batch=16),
                     Cluster(nodes=1, gpus_per_node=8)).valid


def test_fp8_rows_of_sequence_parallel_parts():
    # Sequence parallelism pads each part to a multiple of TP, and a branch's linears see the
    # gathered part: 0.4b's 197 vision rows become 200 at TP = 4, and 200 x 4 is a multiple of
    # 16 where 197 x 4 is not.
    cfg = get_flavor("0.4b")
    base = dict(tp=4, world_size=4, precision="fp8", transformer_impl="te", micro_batch=4,
                global_batch=4)
    assert "197 tokens x 4" in check_layout(cfg, ParallelLayout(**base)).message()
    assert check_layout(cfg, ParallelLayout(**base, sequence_parallel=True)).valid


def test_check_layout_returns_every_error():
    cfg = get_flavor("tiny")  # 4 heads, 6 layers
    check = check_layout(cfg, ParallelLayout(tp=3, pp=4, world_size=24, micro_batch=4,
                                             global_batch=10))
    text = check.message()
    assert "num_attention_heads" in text and "number of layers" in text
    assert len(check.errors) >= 3 and not check.valid
    ok = check_layout(cfg, ParallelLayout(tp=2, pp=2, world_size=8, micro_batch=2,
                                          global_batch=8, gpus_per_node=4))
    # DP groups {0, 2}, {1, 3}, ... : both members on one node of 4, so k = 2 by default.
    assert ok.valid and ok.derived["dp"] == 2 and ok.derived["itc_group_size"] == 2
    assert ok.derived["num_micro_batches"] == 2


@pytest.mark.parametrize("lay,message", [
    (ParallelLayout(tp=8, world_size=16, gpus_per_node=4, micro_batch=1, global_batch=2),
     "must lie within one node"),
    (ParallelLayout(world_size=8, gpus_per_node=4, itc_aggregate_nodes=3, micro_batch=1,
                    global_batch=8), "must lie in [1, data-parallel size 8]"),
    (ParallelLayout(world_size=6, gpus_per_node=3, itc_group_size=2, micro_batch=1,
                    global_batch=6), None),  # explicit k straddling nodes: a warning
    (ParallelLayout(world_size=4, pp=2, recompute_method="uniform", recompute_num_layers=2,
                    micro_batch=1, global_batch=2), "must divide the layers per pipeline stage"),
    (ParallelLayout(world_size=2, sequence_parallel=True, micro_batch=1, global_batch=2),
     "--sequence-parallel shards activations across the tensor-parallel group"),
])
def test_layout_rules(lay, message):
    check = check_layout(get_flavor("tiny"), lay)
    if message is None:
        assert check.valid and any("not node-aligned" in w for w in check.warnings)
    else:
        assert message in check.message()
