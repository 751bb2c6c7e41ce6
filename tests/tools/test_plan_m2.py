"""The planner under ``--objective m2`` (GBA-ITC + CMLM + CMIM): the extra memory and FLOPs
against hand computations, ``itc`` figures unchanged, the VQ-KD size against the real module
and its time at the BF16 peak, one layer's saved activations in the mixed layout against
autograd, attentive masking's scoring pass (hardware FLOPs only), and the printed command
accepted by m2-pretrain's own parser and ``validate_args``."""

import dataclasses
import itertools
import json
from pathlib import Path

import pytest

from megatron_m2 import planner
from megatron_m2.config import ConfigError
from megatron_m2.flavors import get_flavor
from megatron_m2.planner import Assumptions, Cluster, Layout, make_plan
from megatron_m2.planner.objective import (
    VQKD,
    default_mask_patches,
    vqkd_forward_flops,
    vqkd_parameters,
)
from tests.tools.test_plan import _cli, _fake_world, _tiny_model, fake_backend  # noqa: F401

pytestmark = [pytest.mark.filterwarnings("ignore:full scope is deprecated"),
              pytest.mark.filterwarnings("ignore:When using async grad allreduce"),
              pytest.mark.filterwarnings("ignore:When using sequence parallelism"),
              pytest.mark.filterwarnings("ignore:`torch.distributed.all_gather_into_tensor`"),
              pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_scatter_tensor`")]
C4 = Cluster(nodes=4, gpus_per_node=8)
TINY_VQKD = str(Path(__file__).resolve().parents[1] / "fixtures" / "vqkd" / "tiny_vqkd.safetensors")


def _plan(flavor="0.4b", cluster=C4, **layout):
    return make_plan(get_flavor(flavor), Layout(**layout), cluster, Assumptions(), flavor)


def _pair(flavor="0.4b", cluster=C4, **layout):
    """The itc plan and the m2 plan (pixel targets unless given) of one layout."""
    m2 = dict(objective="m2", mim_target="pixel")
    m2.update({k: layout.pop(k) for k in list(layout) if k in (
        "mim_target", "visual_tokenizer", "cmlm_weight", "cmim_weight", "cmlm_tie_embeddings",
        "image_mask_patches", "mvlm_prob", "image_mask_style", "attentive_mask_temperature")})
    return _plan(flavor, cluster, **layout), _plan(flavor, cluster, **layout, **m2)


# -- itc unchanged --------------------------------------------------------------------------------
def test_itc_figures_unchanged_and_without_m2_entries():
    base = _plan(tp=2, pp=2)
    explicit = _plan(tp=2, pp=2, objective="itc")
    assert base.to_dict() == explicit.to_dict()
    cfg = get_flavor("0.4b")
    assert base.parameters["per_stage_rank"] == planner.stage_parameters(cfg, 2, 2)
    assert "masked_loss_bytes" not in base.memory["per_stage"][-1]
    assert "vqkd_flops_per_step" not in base.flops
    assert "--objective" not in base.training_args()


# -- parameters and memory ------------------------------------------------------------------------
def test_cmlm_and_pixel_head_parameter_bytes_by_hand():
    cfg = get_flavor("0.4b")
    d, v, p = cfg.hidden_size, cfg.vocab_size, cfg.patch_size
    itc, m2 = _pair(tp=2, pp=2)
    cmlm = -(-v // 2) * d + -(-v // 2)          # vocab-parallel weight [V/TP, d] + bias
    pixel = d * p * p * 3 + p * p * 3            # replicated d -> patch²·3
    last_i, last_m = itc.memory["per_stage"][-1], m2.memory["per_stage"][-1]
    assert m2.parameters["per_stage_rank"][-1]["masked_heads"] == cmlm + pixel
    assert last_m["params"] - last_i["params"] == cmlm + pixel
    assert last_m["weights_bytes"] - last_i["weights_bytes"] == 2 * (cmlm + pixel)
    assert last_m["grads_bytes"] - last_i["grads_bytes"] == 4 * (cmlm + pixel)
    assert last_m["optimizer_bytes"] - last_i["optimizer_bytes"] == 12 * (cmlm + pixel)
    # CMIM trains the first stage's mask token (d parameters).
    first_i, first_m = itc.memory["per_stage"][0], m2.memory["per_stage"][0]
    assert first_m["trainable_params"] - first_i["trainable_params"] == d
    # Tied to the text embedding (PP=1): only the bias is new.
    itc1, tied = _pair(tp=2, pp=1, cmlm_tie_embeddings=True, cmim_weight=0)
    assert tied.parameters["per_stage_rank"][-1]["masked_heads"] == -(-v // 2)


def test_vqkd_parameters_and_weights():
    torch = pytest.importorskip("torch")
    from megatron_m2.model.vqkd import VQKDConfig, VQKDTokenizer

    with torch.device("meta"):
        real = sum(t.numel() for t in VQKDTokenizer(VQKDConfig()).parameters())
    assert vqkd_parameters() == real and 85e6 < real < 87e6
    itc, m2 = _pair(tp=2, pp=2, mim_target="vqkd", visual_tokenizer="vqkd.pth")
    last = m2.memory["per_stage"][-1]
    cmlm = -(-get_flavor("0.4b").vocab_size // 2) * 769
    codes = VQKD.codebook_size // 2 * 769      # vocab-parallel d -> 8192 codes, + bias
    assert m2.parameters["per_stage_rank"][-1]["masked_heads"] == cmlm + codes
    assert last["vqkd_weight_bytes"] == 4 * real
    assert last["weights_bytes"] - itc.memory["per_stage"][-1]["weights_bytes"] == \
        2 * (cmlm + codes) + 4 * real
    # Frozen: no gradients, no optimizer state.
    assert last["grads_bytes"] - itc.memory["per_stage"][-1]["grads_bytes"] == 4 * (cmlm + codes)
    assert last["vqkd_working_bytes"] > 0
    assert any("is not here" in w for w in m2.warnings)


def test_activations_scale_with_columns_and_logits_by_hand():
    cfg = get_flavor("0.4b")
    b, tp = 8, 2
    itc, m2 = _pair(tp=tp, pp=2, micro_batch=b)
    s, d = cfg.vision_seq_len + cfg.max_text_len, cfg.hidden_size
    # Per layer: all 3b columns, plus the mixed layout's copies.
    layer = planner.layer_activation_bytes(cfg, tp, s, 3 * b)
    extra = (2 * d * s * 3 * b + 6 * d * s * 2 * b) // tp
    per_stage_layers = cfg.num_layers // 2
    first_i, first_m = itc.memory["per_stage"][0], m2.memory["per_stage"][0]
    layers_only = first_m["activation_bytes_per_micro_batch"] - 3 * b * (
        2 * 3 * cfg.image_size ** 2 + 10 * cfg.max_text_len) - 3 * b * cfg.num_patches
    assert layers_only == per_stage_layers * (layer + extra)
    assert first_m["activation_bytes_per_micro_batch"] > 3 * first_i[
        "activation_bytes_per_micro_batch"]
    # The fp32 fused hidden states (2 fused columns), then the heads: CMLM rows =
    # b·round(0.5·s_t), cols = ⌈V/TP⌉, bf16 + fp32 + softmax; pixel rows = b·80/196 of the
    # patches, cols = patch²·3, bf16 + fp32; rows gathered in fp32 and cast to bf16.
    rows_l, rows_i = b * round(0.5 * cfg.max_text_len), b * default_mask_patches(196)
    expected = (4 * s * 2 * b * d + rows_l * (6 * d + -(-cfg.vocab_size // tp) * 10)
                + rows_i * (6 * d + cfg.patch_size ** 2 * 3 * 6))
    assert m2.memory["per_stage"][-1]["masked_loss_bytes"] == expected
    # p2p messages and TP all-reduces are 3 columns wide.
    hop = lambda p: p.communication["pp"]["boundaries"][0]["bytes_per_micro_batch_each_way"]  # noqa
    assert hop(m2) == 3 * hop(itc)
    big = lambda p: p.communication["tp"]["per_stage"][0]["per_micro_batch"][0]["payload_bytes"]  # noqa
    assert big(m2) == 3 * big(itc)


@pytest.mark.parametrize("sp", [False, True])
def test_mixed_layer_activations_match_saved_tensors(fake_backend, sp):  # noqa: F811
    """One layer's saved bytes in the mixed layout (b contrastive + n·b fused columns) against
    layer_activation_bytes + mixed_layer_extra_bytes, as the itc test does for one pass; with
    sequence parallelism on this rank's shard of the padded sequence (17 → 18 vision rows),
    the formulas evaluated on the padded sequence."""
    import torch

    from megatron_m2.model.multiway import PackedLayout
    from megatron_m2.model.sequence_parallel import SequenceSharding, pad_text_mask
    from megatron_m2.planner.memory import mixed_layer_extra_bytes

    cfg = get_flavor("tiny")
    b, sv, st, tp = 4, cfg.vision_seq_len, cfg.max_text_len, 2
    with _fake_world(fake_backend, 0, tp, tp=tp):
        from megatron.core import parallel_state as ps

        model = _tiny_model(tp, 1, sequence_parallel=sp)
        model.train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        sharding = SequenceSharding(tp, sv, st, ps.get_tensor_model_parallel_group()) if sp \
            else None
        s = sharding.rows if sp else sv + st
        rows = sharding.local_vision + sharding.local_text if sp else s
        for n in (1, 2):
            seen = {}

            def pack(t):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in params:
                    seen[ptr] = t.untyped_storage().nbytes()
                return t

            cols = b * (1 + n)
            x = torch.randn(rows, cols, cfg.hidden_size, dtype=torch.bfloat16,
                            requires_grad=True)
            pad = torch.zeros(cols, st, dtype=torch.bool)
            if sp:
                pad = pad_text_mask(pad, cols, sharding)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                with model.using_layout(PackedLayout.mixed(sv, b)):
                    model.multiway_state.sharding = sharding
                    try:
                        model.encoder.layers[0](x, attention_mask=pad)
                    finally:
                        model.multiway_state.sharding = None
            expected = (planner.layer_activation_bytes(cfg, tp, s, cols, sequence_parallel=sp)
                        + mixed_layer_extra_bytes(cfg, tp, s, b, n))
            assert sum(seen.values()) == pytest.approx(expected, rel=0.01), n


# -- FLOPs and time -------------------------------------------------------------------------------
def test_flops_column_scaling_and_heads_by_hand():
    cfg = get_flavor("0.4b")
    b, tp = 8, 2
    itc, m2 = _pair(tp=tp, pp=2, micro_batch=b, mim_target="vqkd", visual_tokenizer="v.pth")
    d, f, sv, st = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vision_seq_len, cfg.max_text_len
    s, layers = sv + st, cfg.num_layers // 2
    for i, (ri, rm) in enumerate(zip(itc.flops["per_stage_rank"], m2.flops["per_stage_rank"])):
        # Linears: 3 columns instead of 1.
        assert rm["gemm_flops"] == 3 * ri["gemm_flops"]
        assert ri["gemm_flops"] == 3 * layers * 2 * s * (4 * d * d + 2 * d * f) * b // tp
        # Attention: the 2 fused columns attend over s² instead of s_v² + s_t².
        assert rm["attention_flops"] - ri["attention_flops"] == \
            3 * layers * 2 * 4 * d * s * s * b // tp
    last_i, last_m = itc.flops["per_stage_rank"][-1], m2.flops["per_stage_rank"][-1]
    rows_l, rows_i = round(0.5 * st), default_mask_patches(cfg.num_patches)
    heads = 3 * 2 * b * d * (rows_l * -(-cfg.vocab_size // tp) + rows_i * VQKD.codebook_size // tp)
    assert last_m["other_flops"] - last_i["other_flops"] == heads
    assert last_m["vqkd_flops"] == b * vqkd_forward_flops(cfg)
    # VQ-KD's forward ~ 2 x params x tokens (+ attention and the code search).
    assert vqkd_forward_flops(cfg) == pytest.approx(2 * vqkd_parameters() * 197, rel=0.15)
    assert m2.flops["vqkd_flops_per_step"] == vqkd_forward_flops(cfg) * m2.derived["global_batch"]
    # Model FLOPs: 3 x forward of every column and the heads, + the VQ-KD forward once.
    mf = m2.flops["masked_forward_per_sample"]
    fwd = (cfg.num_layers * (mf["fused_layer_gemm"] + mf["fused_layer_attention"])
           + mf["fused_embed"] + mf["cmlm_head"] + mf["cmim_head"])
    assert m2.flops["model_flops_per_step"] - itc.flops["model_flops_per_step"] == \
        (3 * fwd + mf["vqkd"]) * m2.derived["global_batch"]
    assert m2.time["step_time_s"] > itc.time["step_time_s"]
    assert m2.memory["peak_bytes"] > itc.memory["peak_bytes"]


def test_feature_accumulation_adds_a_forward_of_the_contrastive_columns_only():
    _, m2 = _pair(tp=1, pp=1, micro_batch=8)
    _, acc = _pair(tp=1, pp=1, micro_batch=8, itc_accumulate_features=True)
    r, ra = m2.flops["per_stage_rank"][0], acc.flops["per_stage_rank"][0]
    # Without: 3 passes of 3 columns (9); with: one more forward of the contrastive column (10).
    assert ra["gemm_flops"] * 9 == r["gemm_flops"] * 10


def test_attentive_scoring_pass_is_one_contrastive_forward_in_hardware_flops_only():
    cfg = get_flavor("0.4b")
    b, tp, pp = 8, 2, 2
    _, block = _pair(tp=tp, pp=pp, micro_batch=b)
    _, att = _pair(tp=tp, pp=pp, micro_batch=b, image_mask_style="attentive")
    assert att.valid, att.errors
    # The planner's own forward FLOPs of one contrastive column (one sample).
    fwd = planner.forward_flops_per_sample(cfg, cfg.vision_seq_len, cfg.max_text_len,
                                           att.derived["itc_group_size"] * b, 2)
    layers = cfg.num_layers // pp
    for st, (rb, ra) in enumerate(zip(block.flops["per_stage_rank"],
                                      att.flops["per_stage_rank"])):
        per_rank = (layers * (fwd["layer_gemm"] + fwd["layer_attention"]) * b // tp
                    + (fwd["embed"] * b if st == 0 else 0)
                    + (fwd["heads"] * b if st == pp - 1 else 0))
        assert ra["flops_per_micro_batch"] - rb["flops_per_micro_batch"] == per_rank
        assert ra["extra_forward_flops"] == per_rank and rb["extra_forward_flops"] == 0
        assert ra["compute_time_s_per_micro_batch"] > rb["compute_time_s_per_micro_batch"]
    # Per step: one forward of every sample's contrastive column (the embedding and the
    # heads run on every TP rank).
    gbs = att.derived["global_batch"]
    assert att.flops["hardware_flops_per_step"] - block.flops["hardware_flops_per_step"] == \
        gbs * (cfg.num_layers * (fwd["layer_gemm"] + fwd["layer_attention"])
               + tp * (fwd["embed"] + fwd["heads"]))
    # Not in model FLOPs (MFU), as feature accumulation's cached-feature forward.
    assert att.flops["model_flops_per_step"] == block.flops["model_flops_per_step"]
    assert att.time["step_time_s"] > block.time["step_time_s"]
    assert att.time["mfu"] < block.time["mfu"]
    # No activations kept: memory unchanged.
    assert att.memory["per_stage"] == block.memory["per_stage"]
    # PP: the pass's forward hop (b contrastive columns) and the fp32 scores' broadcast.
    pa = att.communication["pp"]["attentive"]
    hop = block.communication["pp"]["boundaries"][0]["bytes_per_micro_batch_each_way"]
    assert pa["scoring_hop_bytes"] * 3 == hop
    m = att.derived["num_micro_batches"]
    assert pa["scores_broadcast"]["payload_bytes"] == 4 * m * b * cfg.num_patches
    assert att.time["attentive_scores_s"] > 0
    assert "attentive" not in block.communication["pp"]
    # TP: the pass's forward all-reduces of b columns.
    assert any("attentive scoring pass" in r["op"]
               for r in att.communication["tp"]["per_stage"][0]["per_micro_batch"])


def test_attentive_with_feature_accumulation_adds_no_flops():
    _, block = _pair(tp=2, pp=2, micro_batch=8, itc_accumulate_features=True)
    _, att = _pair(tp=2, pp=2, micro_batch=8, itc_accumulate_features=True,
                   image_mask_style="attentive")
    assert att.flops == block.flops
    assert att.communication["tp"] == block.communication["tp"]
    assert att.memory == block.memory
    # Only the scores' broadcast from the last stage remains (PP > 1).
    pa = att.communication["pp"]["attentive"]
    assert pa["scoring_hop_bytes"] == 0 and pa["scores_broadcast"]["count"] > 0
    _, acc1 = _pair(tp=1, pp=1, micro_batch=8, itc_accumulate_features=True,
                    image_mask_style="attentive")
    _, blk1 = _pair(tp=1, pp=1, micro_batch=8, itc_accumulate_features=True)
    assert acc1.time["step_time_s"] == blk1.time["step_time_s"]


def test_vqkd_time_at_the_bf16_peak():
    cfg = get_flavor("0.4b")
    _, m2 = _pair(tp=2, pp=2, micro_batch=8, mim_target="vqkd", visual_tokenizer="v.pth")
    last = m2.flops["per_stage_rank"][-1]
    assert last["vqkd_time_s_per_micro_batch"] == pytest.approx(
        8 * vqkd_forward_flops(cfg) / (C4.peak_tflops * 1e12 * Assumptions().mfu))
    assert m2.time["vqkd_s"] == pytest.approx(
        m2.derived["num_micro_batches"] * last["vqkd_time_s_per_micro_batch"])
    # Planned commands carry --bf16: the fp32 peak does not matter.
    slow = dataclasses.replace(C4, fp32_peak_tflops=1.0)
    _, m2_slow = _pair(cluster=slow, tp=2, pp=2, micro_batch=8, mim_target="vqkd",
                       visual_tokenizer="v.pth")
    assert m2_slow.time == m2.time
    assert "--bf16" in m2.training_args()


# -- the command m2-pretrain runs -----------------------------------------------------------------
def _pretrain_error(plan, cluster, monkeypatch):
    from megatron_m2.training import validation
    from megatron_m2.training.arguments import parse_args

    monkeypatch.setattr(validation, "have_transformer_engine", lambda: True)
    args = parse_args(plan.training_args() + ["--synthetic"])
    try:
        validation.validate_args(args, cluster.world_size, cluster.gpus_per_node)
    except ConfigError as e:
        return str(e)
    return None


def test_planned_m2_commands_pass_validate_args(monkeypatch):
    pixel = _plan(tp=2, pp=2, objective="m2", mim_target="pixel", image_mask_patches=60,
                  cmlm_weight=0.5)
    assert pixel.valid, pixel.errors
    args = pixel.training_args()
    assert args[args.index("--objective") + 1] == "m2"
    assert args[args.index("--mim-target") + 1] == "pixel"
    assert "--cmlm-weight" in args and "--image-mask-patches" in args
    assert _pretrain_error(pixel, C4, monkeypatch) is None
    tiny = Cluster(nodes=1, gpus_per_node=4)
    vqkd = _plan("tiny", tiny, tp=2, objective="m2", visual_tokenizer=TINY_VQKD,
                 cmlm_tie_embeddings=True)
    assert vqkd.valid, vqkd.errors
    assert _pretrain_error(vqkd, tiny, monkeypatch) is None


def test_planned_attentive_commands_parse_and_pass_validate_args(monkeypatch):
    from megatron_m2.training.arguments import parse_args

    pixel = _plan(tp=2, pp=2, objective="m2", mim_target="pixel",
                  image_mask_style="attentive", attentive_mask_temperature=0.25)
    assert pixel.valid, pixel.errors
    args = parse_args(pixel.training_args() + ["--synthetic"])
    assert args.image_mask_style == "attentive" and args.attentive_mask_temperature == 0.25
    assert _pretrain_error(pixel, C4, monkeypatch) is None
    tiny = Cluster(nodes=1, gpus_per_node=4)
    vqkd = _plan("tiny", tiny, tp=2, objective="m2", visual_tokenizer=TINY_VQKD,
                 image_mask_style="attentive", itc_accumulate_features=True)
    assert vqkd.valid, vqkd.errors
    assert parse_args(vqkd.training_args()).image_mask_style == "attentive"
    assert _pretrain_error(vqkd, tiny, monkeypatch) is None
    # The default style prints nothing.
    assert "--image-mask-style" not in _plan(objective="m2", mim_target="pixel").training_args()


@pytest.mark.parametrize("opts,message", [
    (dict(image_mask_style="attentive", cmim_weight=0.0), "there is no image masking"),
    (dict(attentive_mask_temperature=-1.0), "--attentive-mask-temperature must be >= 0"),
    (dict(attentive_mask_temperature=float("inf")),
     "--attentive-mask-temperature must be >= 0"),
])
def test_attentive_errors_mirror_m2_pretrain(monkeypatch, opts, message):
    cluster = Cluster(nodes=1, gpus_per_node=4)
    plan = _plan("tiny", cluster, tp=2, objective="m2", mim_target="pixel", **opts)
    assert not plan.valid and any(message in e for e in plan.errors), plan.errors
    error = _pretrain_error(plan, cluster, monkeypatch)
    assert error is not None and message in error


OBJECTIVE_OPTIONS = [
    dict(objective="m2", mim_target="pixel"),
    dict(objective="m2", mim_target="pixel", cmlm_weight=0.0),
    dict(objective="m2", mim_target="pixel", cmlm_weight=0.0, cmim_weight=0.0),
    dict(objective="m2", mim_target="pixel", cmlm_tie_embeddings=True),
    dict(objective="m2", mim_target="pixel", cmim_weight=0.0, cmlm_tie_embeddings=True),
    dict(objective="m2", mim_target="pixel", cmlm_weight=-1.0),
    dict(objective="m2", mim_target="pixel", mvlm_prob=1.0),
    dict(objective="m2", mim_target="pixel", image_mask_patches=16),
    dict(objective="m2", mim_target="pixel", image_mask_patches=3),
    dict(objective="m2", mim_target="pixel", visual_tokenizer=TINY_VQKD),
    dict(objective="m2"),                                   # vqkd without a tokenizer
    dict(objective="m2", visual_tokenizer=TINY_VQKD),
    dict(objective="m2", visual_tokenizer=TINY_VQKD, cmim_weight=0.0),
    dict(objective="m2", cmim_weight=0.0),
    dict(objective="itc", cmlm_weight=1.0),
    dict(objective="itc", image_mask_patches=4),
    dict(objective="m2", mim_target="pixel", image_mask_style="attentive"),
    dict(objective="m2", mim_target="pixel", image_mask_style="attentive",
         attentive_mask_temperature=0.5, cmlm_weight=0.0),
    dict(objective="m2", mim_target="pixel", image_mask_style="attentive", cmim_weight=0.0),
    dict(objective="m2", mim_target="pixel", attentive_mask_temperature=-0.5),
    dict(objective="m2", visual_tokenizer=TINY_VQKD, image_mask_style="attentive"),
    dict(objective="itc", image_mask_style="attentive", attentive_mask_temperature=-1.0),
]


def test_planner_and_pretrain_agree_on_objective_flags(monkeypatch):
    cluster = Cluster(nodes=1, gpus_per_node=4)
    disagreements, valid = [], 0
    for opts, (tp, pp), accum in itertools.product(
            OBJECTIVE_OPTIONS, [(1, 1), (2, 1), (1, 2), (2, 2)], (False, True)):
        plan = _plan("tiny", cluster, tp=tp, pp=pp, micro_batch=2,
                     itc_accumulate_features=accum, **opts)
        error = _pretrain_error(plan, cluster, monkeypatch)
        valid += plan.valid
        if plan.valid != (error is None):
            disagreements.append((opts, tp, pp, accum, plan.errors, error))
    assert not disagreements, disagreements[:5]
    assert 20 < valid < len(OBJECTIVE_OPTIONS) * 8


def test_cli_m2_json_and_invalid_exit_status():
    out = _cli("--flavor", "0.4b", "--nodes", "4", "--objective", "m2", "--mim-target", "pixel",
               "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)["plan"]
    assert plan["valid"] and plan["layout"]["objective"] == "m2"
    assert plan["training_args"][-4:] == ["--objective", "m2", "--mim-target", "pixel"]
    assert plan["memory"]["per_stage"][0]["columns"] == 3 * 8
    text = _cli("--flavor", "0.4b", "--nodes", "4", "--objective", "m2", "--mim-target",
                "pixel")
    assert text.returncode == 0 and "24 columns per micro-batch" in text.stdout
    bad = _cli("--flavor", "0.4b", "--nodes", "4", "--pp", "2", "--objective", "m2",
               "--mim-target", "pixel", "--cmlm-tie-embeddings")
    assert bad.returncode == 2 and "--cmlm-tie-embeddings needs" in bad.stdout
    novq = _cli("--flavor", "0.4b", "--nodes", "4", "--objective", "m2")
    assert novq.returncode == 2 and "needs --visual-tokenizer" in novq.stdout


def test_recommendation_keeps_the_objective():
    rec = planner.recommend(get_flavor("0.4b"), Layout(objective="m2", mim_target="pixel"), C4,
                            model_name="0.4b")
    assert rec.best is not None and rec.best.layout.objective == "m2"
    assert all(dataclasses.replace(p.layout, tp=1, pp=1, distributed_optimizer=False,
                                   recompute=False, sequence_parallel=False,
                                   layers_per_virtual_stage=None, overlap_grad_reduce=False,
                                   overlap_param_gather=False) ==
               Layout(objective="m2", mim_target="pixel") for p in rec.candidates)
