"""The dry-run planner (megatron_m2/planner/, m2-plan), checked against independent
computations: flavor parameter counts, m2-pretrain's own argument validation, the ITC bytes
that megatron_m2.loss counts when its collectives run, the all-reduces and saved activations
of the real model, and the process groups megatron-core builds for a 256-GPU world.

The model-level checks run one rank of a fake ``torch.distributed`` world (no communication,
no peers) in this process.
"""

import contextlib
import dataclasses
import json
import subprocess
import sys

import pytest

from megatron_m2 import planner
from megatron_m2.config import ConfigError
from megatron_m2.flavors import FLAVORS, count_parameters, get_flavor
from megatron_m2.planner import GB, Assumptions, Cluster, Layout, make_plan, recommend
from tests.helpers.tools import ROOT, load_tool

pytestmark = [pytest.mark.filterwarnings("ignore:full scope is deprecated"),
              pytest.mark.filterwarnings("ignore:When using async grad allreduce"),
              pytest.mark.filterwarnings("ignore:When using sequence parallelism"),
              pytest.mark.filterwarnings("ignore:`torch.distributed.all_gather_into_tensor`"),
              pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_scatter_tensor`")]
C32 = Cluster(nodes=32, gpus_per_node=8)


def _plan(flavor="10b", cluster=C32, **layout):
    return make_plan(get_flavor(flavor), Layout(**layout), cluster, Assumptions(), flavor)


def _bench_itc():
    return load_tool("bench_itc")


# -- parameters and memory ------------------------------------------------------------------------
@pytest.mark.parametrize("flavor", sorted(FLAVORS))
def test_stage_parameters_sum_to_flavor_count(flavor):
    cfg = get_flavor(flavor)
    for pp in (p for p in range(1, cfg.num_layers + 1) if cfg.num_layers % p == 0):
        stages = planner.stage_parameters(cfg, 1, pp)
        assert sum(s["total"] for s in stages) == count_parameters(cfg)


def _per_branch_layer(cfg):
    """Independent: one extra layer adds 2 branches to count_parameters."""
    more = dataclasses.replace(cfg, num_sep_layers=cfg.num_sep_layers + 1)
    return (count_parameters(more) - count_parameters(cfg)) // 2


def test_weights_grads_optimizer_bytes_10b():
    cfg = get_flavor("10b")
    total = count_parameters(cfg)
    # Frozen: branch B of each VL layer, branch B of the VL final LayerNorm, the mask token.
    trainable = total - cfg.num_vl_layers * _per_branch_layer(cfg) - 2 * cfg.hidden_size \
        - cfg.hidden_size
    st = _plan().memory["per_stage"][0]
    assert st["params"] == total and st["trainable_params"] == trainable
    assert st["weights_bytes"] == 2 * total                     # bf16
    assert st["grads_bytes"] == 4 * trainable                   # fp32 main grads
    assert st["optimizer_bytes"] == 12 * trainable              # fp32 params + Adam m, v
    assert 20.3e9 < st["weights_bytes"] < 20.4e9


def test_distributed_optimizer_shards_optimizer_over_dp():
    for tp, pp in [(1, 1), (2, 2), (4, 8), (8, 1)]:
        off, on = _plan(tp=tp, pp=pp), _plan(tp=tp, pp=pp, distributed_optimizer=True)
        dp = on.derived["dp"]
        for a, b in zip(off.memory["per_stage"], on.memory["per_stage"]):
            assert b["optimizer_bytes"] == -(-a["optimizer_bytes"] // dp)
            assert (b["weights_bytes"], b["grads_bytes"]) == (a["weights_bytes"],
                                                              a["grads_bytes"])


@pytest.mark.parametrize("tp,pp,recompute", [(1, 1, False), (2, 2, False), (4, 4, True),
                                             (1, 2, True)])
def test_memory_monotonic_in_micro_batch(tp, pp, recompute):
    prev = None
    for mbs in (1, 2, 4, 8, 16, 32):
        p = _plan(tp=tp, pp=pp, micro_batch=mbs, recompute=recompute, global_batch=32 * 256)
        assert p.valid, p.errors
        peak = p.memory["per_stage"][0]
        if prev is not None:
            assert peak["activations_bytes"] > prev["activations_bytes"]
            assert peak["total_bytes"] > prev["total_bytes"]
        prev = peak


def test_recompute_and_tp_reduce_activations():
    base = _plan().memory["per_stage"][0]["activations_bytes"]
    assert _plan(recompute=True).memory["per_stage"][0]["activations_bytes"] < base / 3
    # Per layer 8h + 34h/t (f = 4h): 25/42 of TP=1 at TP=2, then towards the replicated 8h.
    tp = {t: _plan(tp=t).memory["per_stage"][0]["activations_bytes"] for t in (2, 4, 8)}
    assert 0.55 * base < tp[2] < 0.65 * base and 0.2 * base < tp[8] < tp[4] < 0.45 * base


def test_pipeline_first_stage_holds_pp_micro_batches():
    p = _plan(tp=4, pp=4)
    inflight = [s["in_flight_micro_batches"] for s in p.memory["per_stage"]]
    assert inflight == [4, 3, 2, 1]


# -- communication --------------------------------------------------------------------------------
def test_dp_ring_bytes():
    p = _plan()
    n, trainable = 256, p.memory["per_stage"][0]["trainable_params"]
    (ar,) = p.communication["dp"]["per_stage"][0]["collectives"]
    assert ar["bytes_sent"] == pytest.approx(2 * (n - 1) / n * 4 * trainable)
    assert p.communication["dp"]["link"] == "inter-node"
    rs, ag = _plan(distributed_optimizer=True).communication["dp"]["per_stage"][0]["collectives"]
    assert rs["bytes_sent"] == pytest.approx((n - 1) / n * 4 * trainable)
    assert ag["bytes_sent"] == pytest.approx((n - 1) / n * 2 * trainable)
    # One node: the DP group never leaves it.
    one = _plan(cluster=Cluster(nodes=1, gpus_per_node=8), tp=8)
    assert one.communication["dp"]["per_stage"][0]["collectives"] == []


def test_itc_ratio_is_bench_itcs():
    p = _plan()
    itc = p.communication["itc"]
    assert (itc["gba"]["group_size"], itc["global"]["group_size"]) == (8, 256)
    assert (itc["gba"]["link"], itc["global"]["link"]) == ("intra-node", "inter-node")
    a = _bench_itc().analytic(32, 8, 64, 1024)
    assert itc["global_over_gba"] == pytest.approx(a["reduction"]) == pytest.approx(255 / 7)
    assert a["global_bytes_per_rank"] / 2 ** 20 == 127.5 and a["gba_bytes_per_rank"] / 2 ** 20 \
        == 3.5
    # 4 fp32 embeddings (two heads) of 1024 x 8 rows, gathered and reduce-scattered.
    assert itc["gba"]["bytes_sent_per_step"] == 2 * 4 * 7 * 8 * 1024 * 4
    assert itc["gba_inter_node_bytes_per_step"] == 0


def test_pp_link_and_tp_counts():
    p = _plan(tp=4, pp=8)
    assert {b["link"] for b in p.communication["pp"]["boundaries"]} == {"inter-node"}
    one = _plan(cluster=Cluster(nodes=1, gpus_per_node=8), tp=2, pp=2)
    assert {b["link"] for b in one.communication["pp"]["boundaries"]} == {"intra-node"}
    cfg = get_flavor("10b")
    rows = p.communication["tp"]["per_stage"][1]["per_micro_batch"]
    assert len(rows) == 4  # no embedding all-reduce on a middle stage
    layers, s, b, d = 3, cfg.vision_seq_len + cfg.max_text_len, 8, cfg.hidden_size
    fwd = next(r for r in rows if r["op"].startswith("all_reduce fwd"))
    assert fwd["count"] == 4 * layers and fwd["payload_bytes"] == layers * 2 * 2 * s * b * d
    assert fwd["bytes_sent"] == pytest.approx(2 * 3 / 4 * fwd["payload_bytes"])


# -- validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("layout,cluster,fragment", [
    (dict(tp=3), C32, "must divide num_attention_heads"),
    (dict(pp=5), C32, "must divide the number of layers"),
    (dict(tp=16), Cluster(nodes=2, gpus_per_node=8), "must lie within one node"),
    (dict(global_batch=1000), C32, "must be divisible by --micro-batch-size"),
    (dict(itc_group_size=3), C32, "must divide the data-parallel size"),
    (dict(itc_group_size=4, itc_aggregate_nodes=1), C32, "mutually exclusive"),
    (dict(tp=1, pp=12), Cluster(nodes=3, gpus_per_node=8), "backbone/VL boundary"),
    (dict(tp=1, pp=8, recompute=True, recompute_num_layers=4), C32, "between 1 and the layers"),
    (dict(tp=4, pp=3), C32, "is not divisible by"),
])
def test_invalid_layouts_rejected(layout, cluster, fragment):
    p = _plan(cluster=cluster, **layout)
    assert not p.valid and p.memory is None
    assert any(fragment in e for e in p.errors), p.errors
    assert "INVALID" in planner.format_plan(p)


def test_all_errors_are_listed():
    p = _plan(tp=3, pp=5)
    assert len(p.errors) >= 3  # heads, ffn, layers (and the world size)
    with pytest.raises(ConfigError, match="invalid layout"):
        planner.build_groups(p, [0])


def _validate_with_m2_pretrain(plan, world):
    from megatron_m2.training.arguments import parse_args
    from megatron_m2.training.validation import validate_args

    try:
        validate_args(parse_args(plan.training_args() + ["--synthetic"]), world,
                      plan.cluster.gpus_per_node)
        return None
    except ConfigError as e:
        return str(e)


def test_validation_agrees_with_m2_pretrain():
    """On one 8-GPU node, the planner accepts a layout exactly when m2-pretrain's validate_args
    does, and m2-pretrain's message is the planner's errors, all of them, in order."""
    cl = Cluster(nodes=1, gpus_per_node=8)
    checked = 0
    for tp in (1, 2, 4, 8):
        for pp in (1, 2, 3, 6):
            for mbs, gbs in ((2, None), (2, 6)):
                for gs in (None, 3, -1):
                    for heads in ("both", "vl"):
                        for rc in (False, True):
                            lay = Layout(tp=tp, pp=pp, micro_batch=mbs, global_batch=gbs,
                                         itc_group_size=gs, itc_heads=heads, recompute=rc)
                            p = make_plan(get_flavor("tiny"), lay, cl, model_name="tiny")
                            msg = _validate_with_m2_pretrain(p, cl.world_size)
                            assert p.valid == (msg is None), (lay, p.errors, msg)
                            if msg is not None:
                                assert msg == "; ".join(p.errors), (lay, p.errors, msg)
                            checked += 1
    assert checked == 4 * 4 * 2 * 3 * 2 * 2


def test_explicit_misaligned_itc_group_warns_like_training():
    from megatron_m2.layout import misaligned_itc_group

    cl = Cluster(nodes=2, gpus_per_node=3)  # DP 6, groups of 2: [2, 3] straddles nodes 0, 1
    p = make_plan(get_flavor("tiny"), Layout(micro_batch=1, itc_group_size=2), cl)
    assert p.valid and any("not node-aligned" in w for w in p.warnings)
    assert p.communication["itc"]["gba"]["link"] == "inter-node"
    # The rule training applies: the same group, found by the shared check.
    assert "not node-aligned" in misaligned_itc_group([list(range(6))], 2, [0, 0, 0, 1, 1, 1])
    # The default (one node's DP ranks) is aligned.
    assert make_plan(get_flavor("tiny"), Layout(micro_batch=1), cl).derived["itc_group_size"] == 3


def test_itc_group_size_matches_resolve_itc_group_size():
    from megatron_m2.layout import resolve_itc_group_size

    for tp, pp in [(1, 1), (2, 1), (4, 2), (8, 4), (2, 8)]:
        for kw in (dict(), dict(itc_group_size=-1), dict(itc_aggregate_nodes=2)):
            p = _plan(tp=tp, pp=pp, **kw)
            per_node = p.derived["dp_ranks_per_node"]
            k = resolve_itc_group_size(p.derived["dp"], per_node, kw.get("itc_group_size"),
                                       kw.get("itc_aggregate_nodes"))
            assert p.derived["itc_group_size"] == k


# -- recommendation and CLI -----------------------------------------------------------------------
def test_recommendation_fits_and_reports_rejections():
    rec = recommend(get_flavor("10b"), Layout(), C32, model_name="10b")
    assert rec.best is not None and rec.best.fits
    assert rec.best.memory["peak_bytes"] <= 80 * GB
    fitting = [p for p in rec.candidates if p.fits]
    assert rec.best.time["step_time_s"] == min(p.time["step_time_s"] for p in fitting)
    rows = {r["layout"]: r for r in rec.rows()}
    # DP > 1: the search overlaps the gradient reduce (OG+).
    assert rows["TP1 PP1 DO- RC- OG+"]["rejected"].startswith("does not fit: stage 0 needs 184.")
    assert "invalid" in rows["TP1 PP3 DO- RC-"]["rejected"]


def test_not_fitting_layout_reported_with_numbers():
    p = _plan()  # 10b, TP=1, PP=1, no distributed optimizer
    assert p.valid and not p.fits
    assert p.memory["peak_bytes"] > 180 * GB
    text = planner.format_plan(p)
    assert "DOES NOT FIT" in text and "114.73" in text  # 12 B x 9.56 B trainable parameters


def _cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "plan.py"), *args],
                          capture_output=True, text=True, timeout=300)


def test_cli_json_10b_on_32x8():
    out = _cli("--flavor", "10b", "--nodes", "32", "--gpus-per-node", "8", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    plan = doc["plan"]
    assert plan["valid"] and plan["errors"] == []
    assert plan["model"]["params"] == count_parameters(get_flavor("10b"))
    itc = plan["communication"]["itc"]
    assert itc["gba"]["group_size"] == 8
    assert itc["global_over_gba"] == pytest.approx(_bench_itc().analytic(32, 8, 64, 1024)
                                                   ["reduction"], rel=1e-12)
    assert itc["gba"]["bytes_sent_per_step"] / itc["global"]["bytes_sent_per_step"] == \
        pytest.approx(1 / 36.43, rel=1e-3)
    assert not plan["fits"] and plan["memory"]["peak_bytes"] > 80e9
    best = doc["recommendation"]["plan"]
    assert best["fits"] and best["memory"]["peak_bytes"] <= 80e9
    assert doc["recommendation"]["best"]["layout"] == planner.Layout(
        **doc["recommendation"]["best_layout"]).key()


def test_cli_text_and_invalid_exit_status():
    out = _cli("--flavor", "10b", "--nodes", "32", "--recommend")
    assert out.returncode == 0 and "recommended:" in out.stdout and "FITS" in out.stdout
    bad = _cli("--flavor", "10b", "--nodes", "32", "--tp", "3", "--pp", "5")
    assert bad.returncode == 2
    assert "INVALID" in bad.stdout and "must divide num_attention_heads" in bad.stdout


def test_model_config_json(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps(dict(get_flavor("1b").to_dict(), params=1)))
    out = _cli("--model-config", str(path), "--nodes", "2", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["plan"]["model"]["params"] == count_parameters(
        get_flavor("1b"))


# -- against the real model and collectives (one rank of a fake world) ----------------------------
@pytest.fixture(scope="module")
def fake_backend():
    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg",
                                  reason="this torch has no fake process-group backend")
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("torch.distributed is already initialised in this process")
    return fake_pg


@contextlib.contextmanager
def _fake_world(fake_pg, rank, world, tp=1, pp=1):
    import warnings

    import torch.distributed as dist

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state as ps

        from megatron_m2.parallel import cpu_compat
    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=rank, world_size=world)
    was_on = cpu_compat.is_enabled()
    cpu_compat.enable()
    try:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp,
                                     pipeline_model_parallel_size=pp,
                                     create_gloo_process_groups=False)
        yield dist
    finally:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        dist.destroy_process_group()
        if not was_on:
            cpu_compat.disable()


def _tiny_model(tp, pp, **kwargs):
    import torch

    from megatron_m2.model import build_model

    return build_model(get_flavor("tiny"), tp, pp, bf16=True, params_dtype=torch.bfloat16,
                       **kwargs)


@pytest.mark.parametrize("rank,world,tp,pp", [(0, 1, 1, 1), (0, 4, 2, 2), (3, 4, 2, 2),
                                              (1, 2, 2, 1)])
def test_stage_parameters_match_the_built_model(fake_backend, rank, world, tp, pp):
    cfg = get_flavor("tiny")
    with _fake_world(fake_backend, rank, world, tp, pp):
        model = _tiny_model(tp, pp)
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stage = planner.rank_groups(tp, pp, world, world, 1, rank)["pp_rank"]
    expected = planner.stage_parameters(cfg, tp, pp)[stage]
    assert (total, trainable) == (expected["total"], expected["trainable"])


def test_tp_all_reduces_match_the_model(fake_backend):
    """Count and size every all-reduce of a TP=2 forward and backward (tiny flavor, bf16)."""
    import torch

    cfg = get_flavor("tiny")
    b = 2
    plan = make_plan(cfg, Layout(tp=2, micro_batch=b, global_batch=b),
                     Cluster(nodes=1, gpus_per_node=2))
    rows = plan.communication["tp"]["per_stage"][0]["per_micro_batch"]
    with _fake_world(fake_backend, 0, 2, tp=2) as dist:
        model = _tiny_model(2, 1)
        calls = []
        real = dist.all_reduce

        def counting(t, *a, **k):
            calls.append((t.numel() * t.element_size(), t.dtype))
            return real(t, *a, **k)

        g = torch.Generator().manual_seed(0)
        images = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g)
        ids = torch.randint(4, cfg.vocab_size, (b, cfg.max_text_len), generator=g)
        pad = torch.zeros(b, cfg.max_text_len, dtype=torch.bool)
        dist.all_reduce = counting
        try:
            out = model(images, ids, pad)
            n_fwd = len(calls)
            sum(v.float().sum() for k, v in out.items() if k.endswith("feats")).backward()
        finally:
            dist.all_reduce = real
    stats = [r for r in rows if "Sub-LN" in r["op"]]
    assert len(stats) == 2
    assert len(calls) == sum(r["count"] for r in rows)
    assert n_fwd == sum(r["count"] for r in rows if "fwd" in r["op"])
    assert sum(n for n, dt in calls[:n_fwd] if dt == torch.float32) == stats[0]["payload_bytes"]
    assert sum(n for n, dt in calls[n_fwd:] if dt == torch.float32) == stats[1]["payload_bytes"]
    assert sum(n for n, dt in calls if dt == torch.bfloat16) == sum(
        r["payload_bytes"] for r in rows if r not in stats)


def test_tp_collectives_match_the_model_with_sequence_parallelism(fake_backend):
    """TP=2 with --sequence-parallel: every all-gather, reduce-scatter and all-reduce of a
    forward and backward of the real model (megatron's collectives, counted where its linears
    and sequence mappings call them), against the planned rows: count and whole-tensor bytes
    per kind and phase. The tiny flavor's vision part (17 rows) is odd, so the padding to a
    multiple of TP is in the sizes."""
    import torch
    from megatron.core.tensor_parallel import layers, mappings

    from megatron_m2.parallel.distributed import set_seed

    cfg = get_flavor("tiny")
    b = 2
    plan = make_plan(cfg, Layout(tp=2, micro_batch=b, global_batch=b, sequence_parallel=True),
                     Cluster(nodes=1, gpus_per_node=2))
    assert plan.valid, plan.errors
    rows = plan.communication["tp"]["per_stage"][0]["per_micro_batch"]
    assert plan.communication["tp"]["rows_per_part"] == [
        -(-cfg.vision_seq_len // 2) * 2, -(-cfg.max_text_len // 2) * 2]
    calls = []

    def counting(kind, real, index):
        def call(*a, **k):
            t = a[index]  # the whole tensor: the gathered output, the scattered input
            calls.append((kind, t.numel() * t.element_size()))
            return real(*a, **k)
        return call

    with _fake_world(fake_backend, 0, 2, tp=2) as dist:
        set_seed(5)  # megatron's RNG tracker, which sequence parallelism forks
        model = _tiny_model(2, 1, sequence_parallel=True)
        patched = [(dist, "all_reduce", counting("all_reduce", dist.all_reduce, 0))]
        for mod in (mappings, layers):
            patched += [(mod, "dist_all_gather_func",
                         counting("all_gather", mod.dist_all_gather_func, 0)),
                        (mod, "dist_reduce_scatter_func",
                         counting("reduce_scatter", mod.dist_reduce_scatter_func, 1))]
        saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patched]
        g = torch.Generator().manual_seed(0)
        images = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g)
        ids = torch.randint(4, cfg.vocab_size, (b, cfg.max_text_len), generator=g)
        pad = torch.zeros(b, cfg.max_text_len, dtype=torch.bool)
        for mod, name, fn in patched:
            setattr(mod, name, fn)
        try:
            out = model(images, ids, pad)
            n_fwd = len(calls)
            sum(v.float().sum() for k, v in out.items() if k.endswith("feats")).backward()
        finally:
            for mod, name, fn in saved:
                setattr(mod, name, fn)

    def tally(selected):
        out = {}
        for kind, n in selected:
            count, total = out.get(kind, (0, 0))
            out[kind] = (count + 1, total + n)
        return out

    def planned(phase):
        out = {}
        for r in rows:
            if phase not in r["op"]:
                continue
            kind = r["op"].split()[0]
            count, total = out.get(kind, (0, 0))
            out[kind] = (count + r["count"], total + r["payload_bytes"])
        return out

    assert tally(calls[:n_fwd]) == planned("fwd")
    assert tally(calls[n_fwd:]) == planned("bwd")
    assert {r["op"].split()[0] for r in rows} == {"all_gather", "reduce_scatter", "all_reduce"}
    # The bytes on the wire: a ring all-gather or reduce-scatter sends (t - 1)/t of the whole
    # tensor, an all-reduce twice that.
    for r in rows:
        factor = 1.0 if r["op"].startswith("all_reduce") else 0.5
        assert r["bytes_sent"] == pytest.approx(factor * r["payload_bytes"])


@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (2, True)])
def test_layer_activations_match_saved_tensors(fake_backend, tp, sp):
    """The bytes autograd saves in one layer's forward (deduplicated by storage, parameters
    excluded) are within 1 % of layer_activation_bytes (the rest: LayerNorm statistics that
    CPU kernels keep in bf16, the text and padding masks).

    With sequence parallelism the layer is called as in training: on this rank's shard of the
    padded sequence (``⌈s_v/t⌉ + ⌈s_t/t⌉`` rows), with the model's sharding set and the text
    mask padded; the formula is evaluated on the padded sequence. The tiny flavor's 17 vision
    rows and a 31-token caption both need a padding row at t = 2."""
    import torch

    from megatron_m2.model.multiway import PackedLayout
    from megatron_m2.model.sequence_parallel import SequenceSharding, pad_text_mask

    cfg = get_flavor("tiny")
    sv, st, b = cfg.vision_seq_len, cfg.max_text_len - (1 if sp else 0), 4
    with _fake_world(fake_backend, 0, tp, tp=tp):
        from megatron.core import parallel_state as ps

        model = _tiny_model(tp, 1, sequence_parallel=sp)
        model.train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        sharding = SequenceSharding(tp, sv, st, ps.get_tensor_model_parallel_group()) if sp \
            else None
        tokens = sharding.rows if sp else sv + st  # the (padded) whole sequence
        rows = sharding.local_vision + sharding.local_text if sp else sv + st
        if sp:
            assert (sharding.vision_pad, sharding.text_pad) == (1, 1)
        for index in (0, cfg.num_sep_layers, cfg.num_sep_layers + 1):
            seen = {}

            def pack(t):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in params:
                    seen[ptr] = t.untyped_storage().nbytes()
                return t

            x = torch.randn(rows, b, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
            pad = torch.zeros(b, st, dtype=torch.bool)
            if sp:
                pad = pad_text_mask(pad, b, sharding)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                with model.using_layout(PackedLayout.both(sv)):
                    model.multiway_state.sharding = sharding
                    try:
                        model.encoder.layers[index](x, attention_mask=pad)
                    finally:
                        model.multiway_state.sharding = None
            expected = planner.layer_activation_bytes(cfg, tp, tokens, b,
                                                      entry=index == cfg.num_sep_layers,
                                                      sequence_parallel=sp)
            assert sum(seen.values()) == pytest.approx(expected, rel=0.01), index


def test_itc_bytes_match_comm_counter(fake_backend):
    """megatron_m2.loss counts what its gathers send; the plan predicts the same bytes."""
    import torch

    from megatron_m2.loss import cached_feature_loss, count_communication, itc_loss

    cfg = get_flavor("tiny")
    cl = Cluster(nodes=2, gpus_per_node=4)  # DP 8, ITC groups of one node: k = 4
    b, m = 3, 2

    def outputs():
        feats = {k: torch.nn.functional.normalize(torch.randn(b, cfg.embed_dim), dim=-1)
                 .requires_grad_(True) for k in ("image_feats", "text_feats", "vl_image_feats",
                                                 "vl_text_feats")}
        return dict(feats, logit_scale=torch.tensor(2.6, requires_grad=True),
                    logit_vl_scale=torch.tensor(2.6, requires_grad=True))

    plan = make_plan(cfg, Layout(micro_batch=b, global_batch=b * 8 * m), cl)
    acc = make_plan(cfg, Layout(micro_batch=b, global_batch=b * 8 * m,
                                itc_accumulate_features=True), cl)
    with _fake_world(fake_backend, 5, 8) as dist:
        counted = {}
        for which in ("gba", "global"):
            ranks = plan.rank_groups(5)["itc_group" if which == "gba" else "dp_group"]
            group = dist.new_group(ranks)
            with count_communication() as comm:
                for _ in range(m):
                    loss, _ = itc_loss(outputs(), group=group, heads="both")
                    loss.backward()
            counted[which] = comm
        scales = {k: torch.tensor(2.6, requires_grad=True)
                  for k in ("logit_scale", "logit_vl_scale")}
        group = dist.new_group(plan.rank_groups(5)["itc_group"])
        micro = [{k: v.detach() for k, v in outputs().items() if k.endswith("feats")}
                 for _ in range(m)]
        with count_communication() as comm_acc:
            cached_feature_loss(micro, scales, group=group, heads="both")
    itc = plan.communication["itc"]
    assert plan.rank_groups(5)["itc_group"] == [4, 5, 6, 7]
    for which in ("gba", "global"):
        assert counted[which].sent == itc[which]["bytes_sent_per_step"]
        assert len(counted[which].calls) == itc[which]["collectives_per_step"]
    assert comm_acc.sent == acc.communication["itc"]["gba"]["bytes_sent_per_step"] \
        == itc["gba"]["bytes_sent_per_step"]
    assert len(comm_acc.calls) == acc.communication["itc"]["gba"]["collectives_per_step"] == 8


def test_rank_groups_match_rank_generator():
    from megatron.core.parallel_state import RankGenerator

    for tp, pp in [(1, 1), (2, 2), (4, 8), (8, 4)]:
        dp = 256 // (tp * pp)
        gen = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order=planner.RANK_ORDER)
        for kind in ("tp", "pp", "dp"):
            for group in gen.get_ranks(kind):
                for r in group[:2]:
                    got = planner.rank_groups(tp, pp, 256, 8, 1, r)[f"{kind}_group"]
                    assert got == list(group), (tp, pp, kind, r)


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2), (4, 8)])
def test_build_groups_10b_32x8(fake_backend, tp, pp):
    plan = _plan(tp=tp, pp=pp, distributed_optimizer=True)
    out = planner.build_groups(plan, [0, 77, 255])
    assert out["backend"] == "fake" and out["world_size"] == 256
    assert out["consistent"], [r["mismatches"] for r in out["ranks"]]
    k = plan.derived["itc_group_size"]
    assert k == 8 // tp
    for r in out["ranks"]:
        assert r["itc_group_size"] == k and len(r["itc_group"]) == k
        assert r["itc_nodes"] == [r["rank"] // 8]  # the gather never leaves the node
        assert r["rank"] in r["tp_group"] and len(r["dp_group"]) == plan.derived["dp"]
    r77 = out["ranks"][1]
    if (tp, pp) == (1, 1):
        assert r77["itc_group"] == list(range(72, 80))
    if (tp, pp) == (2, 2):
        assert r77["itc_group"] == [73, 75, 77, 79] and r77["pp_group"] == [77, 205]


def test_rank_generator_fallback_agrees():
    plan = _plan(tp=2, pp=2)
    out = planner._check_with_rank_generator(plan, [0, 77, 255], "test")
    assert out["consistent"] and out["ranks"][1]["itc_group"] == [73, 75, 77, 79]
