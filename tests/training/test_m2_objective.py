"""``--objective m2``: GBA-ITC + CMLM + CMIM on the real trainer (objectives/m2.py).

* **Layouts**: one training step of the tiny flavor (CMLM on, CMIM with VQ-KD targets from the
  committed tiny BEiT-v2 tokenizer, 2 micro-batches so PP pipelines) at TP=2, TP=2 with
  sequence parallelism (the heads read the gathered sequence) and PP=2 against
  TP=1/PP=1: every logged loss (total, ITC, CMLM, CMIM) equal within ``LOSS_RTOL`` relative,
  and every gradient (each parameter's full tensor, gathered over TP and PP, the heads and the
  now-trainable mask token included) within ``GRAD_RTOL`` of the tensor's largest reference
  gradient (floor 1e-2). fp32; the layouts differ only in summation order (TP partial sums of
  the row-parallel linears and the sharded LayerNorms, the vocabulary-parallel softmax), which
  measures ~1e-7 here; a wrong shard, a missing all-reduce or a masking that depended on the
  layout is off by far more (a loss differs at 1e-2).
* **Resume**: 4 steps straight against 2 steps, save, resume, 2 steps: the losses of steps 3-4
  and every weight (heads included) bitwise equal (masks come from the samples' positions in
  the run, which the checkpoint restores); exports leave the heads out unless asked, and
  ``M2Encoder`` loads the export as before.
* Masks are a function of (seed, sample position): the same on every rank and layout.
* ``--cmlm-tie-embeddings``: the head owns only a bias; CMLM reaches the text embedding.
* Validation: masked flags without ``--objective m2``, both weights 0, tying under PP, a
  VQ-KD without file, a VQ-KD of another patch grid, a codebook that does not split over TP:
  one message each, before anything starts.
"""

import os

import pytest
import torch

from megatron_m2.config import ConfigError
from megatron_m2.training.arguments import parse_args
from megatron_m2.training.validation import validate_args
from tests.helpers.distributed import run_distributed

pytestmark = pytest.mark.slow

VQKD = os.path.join(os.path.dirname(__file__), "..", "fixtures", "vqkd", "tiny_vqkd.safetensors")
COMMON = ["--flavor", "tiny", "--synthetic", "--synthetic-num-samples", "40",
          "--global-batch-size", "8", "--seed", "3", "--lr", "5e-4", "--lr-decay-style",
          "constant", "--itc-group-size", "-1", "--clip-grad", "0", "--objective", "m2",
          "--visual-tokenizer", VQKD]
LOSSES = ("loss", "loss_itc", "loss_cmlm", "loss_cmim", "loss_backbone", "loss_vl")
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-5


def _full_grads(trainer):
    """{canonical name: full gradient} of every trainable parameter, gathered over TP and
    (as objects) over PP, on every rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_m2.checkpoint.format import strip_vocab_padding
    from megatron_m2.model.init import iter_canonical_params

    tp_group = ps.get_tensor_model_parallel_group()
    tp = ps.get_tensor_model_parallel_world_size()
    mine = {}
    for _, canon, p in iter_canonical_params(trainer.model):
        if not p.requires_grad:
            continue
        g = p.main_grad.detach().float().clone()
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(g) for _ in range(tp)]
            dist.all_gather(parts, g.contiguous(), group=tp_group)
            g = torch.cat(parts, dim=p.partition_dim)
        mine[canon] = strip_vocab_padding(canon, g, trainer.cfg)
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, mine)
    out = {}
    for d in everything:
        out.update(d)
    # numpy: tensors would leave the worker through shared memory, gone when it exits.
    return {k: v.numpy() for k, v in out.items()}


def _one_step(tp, pp, mbs, extra=()):
    from megatron_m2.training.trainer import Trainer

    args = parse_args(COMMON + list(extra) + ["--tensor-model-parallel-size", str(tp),
                                "--pipeline-model-parallel-size", str(pp),
                                "--micro-batch-size", str(mbs)])
    validate_args(args, tp * pp)
    trainer = Trainer(args)
    rec = trainer.train_step()
    return {"record": rec, "grads": _full_grads(trainer)}


@pytest.fixture(scope="module")
def reference():
    return run_distributed(_one_step, world_size=1, tp=1, pp=1, mbs=4)[0]


@pytest.mark.parametrize("tp,pp,extra",
                         [(2, 1, ()), (1, 2, ()), (2, 1, ("--sequence-parallel",))],
                         ids=["tp2", "pp2", "tp2_sequence_parallel"])
def test_losses_and_gradients_match_single_process(tp, pp, extra, reference):
    results = run_distributed(_one_step, world_size=tp * pp, tp=tp, pp=pp, mbs=4, extra=extra)
    ref_rec, ref_grads = reference["record"], reference["grads"]
    for key in LOSSES:
        assert key in ref_rec, key
    assert ref_rec["loss_cmlm"] > 1 and ref_rec["loss_cmim"] > 0.1  # the terms are there
    for res in results:  # every rank reports the same figures
        rec = res["record"]
        for key in LOSSES:
            assert abs(rec[key] - ref_rec[key]) <= LOSS_RTOL * abs(ref_rec[key]), (
                key, rec[key], ref_rec[key])
    grads = {k: torch.from_numpy(v) for k, v in results[0]["grads"].items()}
    ref_grads = {k: torch.from_numpy(v) for k, v in ref_grads.items()}
    assert set(grads) == set(ref_grads)
    assert any(k.startswith("cmlm_head.") for k in grads)
    assert any(k.startswith("cmim_head.") for k in grads)
    assert "embeddings.mask_token" in grads and float(ref_grads[
        "embeddings.mask_token"].abs().max()) > 0
    worst = 0.0
    for name, ref in ref_grads.items():
        g = grads[name]
        assert g.shape == ref.shape, name
        err = float((g - ref).abs().max()) / max(float(ref.abs().max()), 1e-2)
        worst = max(worst, err)
        assert err <= GRAD_RTOL, (name, err)
    print(f"TP={tp} PP={pp}: worst relative gradient difference {worst:.2e} over "
          f"{len(grads)} tensors")


# -- resume ----------------------------------------------------------------------------------
def _resume_run(ckpt):
    from megatron_m2.training.trainer import Trainer

    flags = COMMON + ["--micro-batch-size", "4", "--mim-target", "pixel"]
    flags = [f for f in flags if f not in ("--visual-tokenizer", VQKD)]
    straight = Trainer(parse_args(flags + ["--train-iters", "4"]))
    losses = [straight.train_step()["loss"] for _ in range(4)]
    weights = {n: p.detach().numpy().copy() for n, p in straight.model.named_parameters()}

    first = Trainer(parse_args(flags + ["--train-iters", "2", "--save", ckpt]))
    first.train()
    first.close()
    second = Trainer(parse_args(flags + ["--train-iters", "4", "--load", ckpt]))
    assert second.step == 2
    resumed = [second.train_step()["loss"] for _ in range(2)]
    after = {n: p.detach().numpy().copy() for n, p in second.model.named_parameters()}
    return losses, resumed, weights, after


def test_resume_is_bitwise_equal_to_a_straight_run(tmp_path):
    losses, resumed, weights, after = run_distributed(
        _resume_run, world_size=1, ckpt=str(tmp_path / "ckpt"))[0]
    assert resumed == losses[2:]
    assert set(weights) == set(after)
    assert any(n.startswith("cmim_head.") for n in after)
    for name, w in weights.items():
        assert (w == after[name]).all(), name

    # Exports leave the heads out unless asked; the model for users is unchanged.
    from megatron_m2.checkpoint import convert, load_single_file
    from megatron_m2.inference import M2Encoder

    single = str(tmp_path / "model.safetensors")
    summary = convert("ours", "single", str(tmp_path / "ckpt"), single)
    assert set(summary["left_out"]) == {"cmlm_head.", "cmim_head."}
    assert not any(k.startswith(("cmlm_head.", "cmim_head.")) for k in load_single_file(single)[0])
    full = str(tmp_path / "full.safetensors")
    convert("ours", "single", str(tmp_path / "ckpt"), full, include_training=True)
    assert any(k.startswith("cmlm_head.") for k in load_single_file(full,
                                                                     include_training=True)[0])
    encoder = M2Encoder.from_pretrained(single)
    assert not any(n.startswith(("cmlm_head", "cmim_head")) for n, _ in
                   encoder.model.named_parameters())


# -- masks, tying ------------------------------------------------------------------------------
def _prepared(tp):
    from megatron_m2.training.trainer import Trainer

    flags = COMMON + ["--micro-batch-size", "4", "--tensor-model-parallel-size", str(tp)]
    trainer = Trainer(parse_args(flags))
    batches = trainer._microbatches()
    return [{k: v.numpy() for k, v in b.items() if k in ("cmlm_ids", "cmlm_labels",
                                                           "cmim_mask", "sample_positions")}
            for b in batches]


def test_masks_depend_on_sample_positions_only():
    one = run_distributed(_prepared, world_size=1, tp=1)[0]
    two = run_distributed(_prepared, world_size=2, tp=2)
    for rank in two:
        for a, b in zip(one, rank):
            for k in a:
                assert (a[k] == b[k]).all(), k
    # DP=2: rank r's (only) micro-batch holds positions 4r..4r+3, the single process's
    # micro-batch r, with the same masks.
    dp = run_distributed(_prepared, world_size=2, tp=1)
    for r, rank in enumerate(dp):
        assert len(rank) == 1
        for k in rank[0]:
            assert (rank[0][k] == one[r][k]).all(), (r, k)
    first = one[0]
    assert first["sample_positions"].tolist() == [0, 1, 2, 3]
    assert (first["cmlm_labels"] != -100).any() and first["cmim_mask"].any()
    # Another position gets another mask.
    assert (one[0]["cmim_mask"] != one[1]["cmim_mask"]).any()


def _tied():
    from megatron_m2.training.trainer import Trainer

    trainer = Trainer(parse_args(COMMON + ["--micro-batch-size", "4", "--cmlm-tie-embeddings",
                                           "--cmim-weight", "0"]))
    head = trainer.model.cmlm_head
    names = [n for n, _ in head.named_parameters()]
    emb = trainer.model.embeddings.text_embed.weight
    before = emb.detach().clone()
    trainer.train_step()
    return names, float((emb.detach() - before).abs().max()), trainer.objective.passes


def test_tied_cmlm_head_uses_the_text_embedding():
    names, moved, passes = run_distributed(_tied, world_size=1)[0]
    assert names == ["linear.bias"] and passes == ["cmlm"]
    assert moved > 0


# -- validation ----------------------------------------------------------------------------------
def _check(flags, world=1):
    validate_args(parse_args(flags), world)


def test_validation_messages(tmp_path):
    base = ["--flavor", "tiny", "--synthetic", "--global-batch-size", "8",
            "--micro-batch-size", "4"]
    with pytest.raises(ConfigError, match="needs --objective m2"):
        _check(base + ["--cmlm-weight", "0.5"])
    with pytest.raises(ConfigError, match="use --objective itc"):
        _check(base + ["--objective", "m2", "--mim-target", "pixel", "--cmlm-weight", "0",
                       "--cmim-weight", "0"])
    with pytest.raises(ConfigError, match="needs --visual-tokenizer"):
        _check(base + ["--objective", "m2"])
    with pytest.raises(ConfigError, match="one pipeline stage"):
        _check(base + ["--objective", "m2", "--mim-target", "pixel", "--cmlm-tie-embeddings",
                       "--pipeline-model-parallel-size", "2"], world=2)
    with pytest.raises(ConfigError, match="mvlm-prob"):
        _check(base + ["--objective", "m2", "--mim-target", "pixel", "--mvlm-prob", "1"])
    with pytest.raises(ConfigError, match="image-mask-patches"):
        _check(base + ["--objective", "m2", "--mim-target", "pixel",
                       "--image-mask-patches", "16"])
    bogus = tmp_path / "bogus.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(bogus))
    with pytest.raises(ConfigError, match="holds no VQ-KD tokenizer"):
        _check(base + ["--objective", "m2", "--visual-tokenizer", str(bogus)])
    # The tiny VQ-KD has 16-pixel patches (a 4x4 grid at 64 px); a model of 8-pixel patches
    # has an 8x8 one.
    with pytest.raises(ConfigError, match="would not line up"):
        _check(base + ["--objective", "m2", "--visual-tokenizer", VQKD, "--model-config",
                       '{"patch_size": 8}'])
    # A codebook of 6 codes (the tiny one's first rows) does not split over TP=4.
    from safetensors.torch import load_file

    weights = load_file(VQKD)
    weights["model.quantize.embedding.weight"] = weights["model.quantize.embedding.weight"][:6]
    small = tmp_path / "six_codes.safetensors"
    save_file(weights, str(small))
    with pytest.raises(ConfigError, match="6 codes do not split over"):
        _check(base + ["--objective", "m2", "--visual-tokenizer", str(small),
                       "--tensor-model-parallel-size", "4"], world=4)
    _check(base + ["--objective", "m2", "--visual-tokenizer", VQKD])  # a valid one


# -- attentive masking ---------------------------------------------------------------------------
def _attentive(pp, accumulate):
    from megatron_m2.training.trainer import Trainer

    flags = COMMON + ["--micro-batch-size", "4", "--pipeline-model-parallel-size", str(pp),
                      "--image-mask-style", "attentive"]
    trainer = Trainer(parse_args(flags + (["--itc-accumulate-features"] if accumulate else [])))
    batches = trainer._microbatches()
    scores = trainer._from_last_stage(trainer.forward_only(batches, ("patch_scores",)),
                                      ("patch_scores",), len(batches))
    trainer.objective.apply_scores(batches, scores)
    masks = [b["cmim_mask"].numpy() for b in batches]
    records = [trainer.train_step() for _ in range(2)]
    return masks, [s["patch_scores"].numpy() for s in scores], records


def test_attentive_masking_masks_the_patches_nearest_the_caption():
    """SyCoCa's text-guided masking: each image masks the --image-mask-patches patches whose
    VL features are most similar to its caption's; the same on PP=2 (scores broadcast from the
    last stage), with or without feature accumulation (whose first phase gives the scores)."""
    masks, scores, records = run_distributed(_attentive, world_size=1, pp=1,
                                             accumulate=False)[0]
    for mask, score in zip(masks, scores):
        k = int(mask[0].sum())
        assert k == 7 and (mask.sum(1) == k).all()  # round(80/196 * 16) = round(6.53)
        top = torch.from_numpy(score).topk(k, dim=1).indices
        expect = torch.zeros(mask.shape, dtype=torch.bool).scatter_(1, top, True)
        assert (torch.from_numpy(mask) == expect).all()
    for accumulate in (False, True):
        results = run_distributed(_attentive, world_size=2, pp=2, accumulate=accumulate)
        for rank_masks, _, rank_records in results:
            assert all((a == b).all() for a, b in zip(rank_masks, masks))
            if accumulate:
                continue
            for rec, ref in zip(rank_records, records):
                for key in LOSSES:
                    assert abs(rec[key] - ref[key]) <= LOSS_RTOL * abs(ref[key]), key


# -- BF16 and recomputation ------------------------------------------------------------------------
def _bf16_records(extra):
    from megatron_m2.training.trainer import Trainer

    trainer = Trainer(parse_args(COMMON + ["--micro-batch-size", "4"] + extra))
    return [trainer.train_step() for _ in range(2)]


def test_bf16_with_recomputation_follows_fp32():
    """--bf16 with full recomputation (the fused columns are recomputed in the mixed layout):
    each loss within 2 % of the fp32 run's (bf16 rounding of ~1e-2 relative per matmul)."""
    fp32 = run_distributed(_bf16_records, world_size=1, extra=[])[0]
    bf16 = run_distributed(_bf16_records, world_size=1, extra=[
        "--bf16", "--recompute-granularity", "full", "--recompute-method", "block",
        "--recompute-num-layers", "2"])[0]
    for a, b in zip(bf16, fp32):
        for key in ("loss_itc", "loss_cmlm", "loss_cmim"):
            assert abs(a[key] - b[key]) <= 0.02 * abs(b[key]), (key, a[key], b[key])
