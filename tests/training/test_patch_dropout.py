"""FLIP-style patch dropout in contrastive training (``--image-mask-ratio``).

Checked:

* (the kept patches themselves, :func:`~megatron_m2.data.masking.patch_keep_indices`: a
  function of ``(seed, sample position)`` only, exactly k per image, sorted and distinct, are
  tested in ``tests/data/test_masking.py``);
* the model with ``keep_index`` equals the model run on embeddings gathered beforehand (an
  independent per-sample gather of the full embedding sequence fed through the same model);
  [CLS] and the kept patches keep their positions; keeping every patch changes nothing; a
  layout of the wrong length is refused;
* the real trainer (tiny flavor, synthetic data, r = 0.5 in steps 1-2, step 3 unmasked through
  ``--image-mask-ratio-until-iter 2``): TP=2, PP=2 (2 micro-batches, pipelined) and PP=2 with
  feature accumulation give one process's losses and gradient norms within 1e-5 relative;
  feature accumulation over M = 2 micro-batches equals one micro-batch of the same global batch
  (one contrastive batch); the schedule's sequence length follows the phase (9 + 32 rows, then
  17 + 32); patch dropout does change the loss;
* evaluation (:class:`~megatron_m2.training.evaluation.ScheduleEncoder` through the trainer's
  ``forward_only``) runs unmasked under ``--image-mask-ratio 0.5``;
* argument validation: the ratio's range, the unmasked phase's flag, ``--objective m2``.
"""

import pytest
import torch

from megatron_m2.config import ConfigError
from megatron_m2.data.masking import patch_keep_indices
from megatron_m2.flavors import FLAVORS
from megatron_m2.model import PackedLayout
from megatron_m2.training.arguments import parse_args
from megatron_m2.training.validation import validate_args
from tests.helpers.distributed import run_distributed
from tests.model.common import TINY, make_batch, probe_loss

COMMON = ["--flavor", "tiny", "--synthetic", "--global-batch-size", "8", "--lr", "1e-4",
          "--clip-grad", "0", "--seed", "11", "--lr-decay-style", "constant"]
DROP = ["--image-mask-ratio", "0.5", "--image-mask-ratio-until-iter", "2"]
STEPS = 3
RTOL = 1e-5


# -- the model ---------------------------------------------------------------------------------
def _gathered_by_hand(full: torch.Tensor, keep: torch.Tensor, s_v: int) -> torch.Tensor:
    """[CLS] and the kept patch rows of each sample of a full ``[s_v + s_t, b, d]`` sequence,
    sample by sample, then the text rows."""
    cols = [torch.cat([full[:1, i], full[1 + keep[i], i]]) for i in range(full.shape[1])]
    return torch.cat([torch.stack(cols, dim=1), full[s_v:]])


def test_model_with_keep_index_equals_pregathered_embeddings(dist_world_of_one):
    from megatron_m2.model import build_model

    torch.manual_seed(0)
    model = build_model(TINY, seed=5)
    images, ids, pad = make_batch(TINY, batch=3)
    s_v, num_patches = TINY.vision_seq_len, TINY.vision_seq_len - 1
    keep = patch_keep_indices(3, [0, 1, 2], num_patches, 2)
    emb = model.embeddings
    with torch.no_grad():
        full = emb(images, ids, pad)
        vision = emb.embed_image(images, keep_index=keep)
    assert vision.shape[0] == 1 + keep.shape[1]
    assert torch.equal(vision[0], full[0])  # [CLS] kept, with its position
    for i in range(3):
        assert torch.equal(vision[1:, i], full[1 + keep[i], i])  # kept patches, own positions

    out = model(images, ids, pad, keep_index=keep)  # default layout: both(1 + k)
    pre = _gathered_by_hand(full, keep, s_v)
    forward = emb.forward
    emb.forward = lambda *a, **k: pre
    try:
        with torch.no_grad():
            ref = model(images, ids, pad, layout=PackedLayout.both(1 + keep.shape[1]))
    finally:
        emb.forward = forward
    assert set(out) == set(ref)
    for k in ref:
        assert torch.allclose(out[k], ref[k], atol=1e-6, rtol=0), k
    with torch.no_grad():
        unmasked = model(images, ids, pad)
    assert not torch.allclose(out["vl_image_feats"], unmasked["vl_image_feats"], atol=1e-3)
    assert torch.equal(out["vl_text_feats"], unmasked["vl_text_feats"])  # text untouched

    probe_loss(out).backward()  # the gradient reaches the patch embedding through the gather
    assert emb.vision_proj.weight.grad.abs().sum() > 0 and emb.cls_token.grad.abs().sum() > 0

    with torch.no_grad():
        everything = model(images, ids, pad, keep_index=torch.arange(num_patches).expand(3, -1))
    for k in unmasked:
        assert torch.allclose(everything[k], unmasked[k], atol=1e-6, rtol=0), k
    with pytest.raises(ValueError, match="vision rows"):
        model(images, ids, pad, keep_index=keep, layout=PackedLayout.both(s_v))


# -- the trainer -------------------------------------------------------------------------------
def _steps(argv):
    """STEPS steps of a fresh Trainer: per-step loss, gradient norm and the schedule's sequence
    length (numbers only)."""
    from megatron_m2.training.trainer import Trainer

    trainer = Trainer(parse_args(COMMON + argv))
    out = []
    for _ in range(STEPS):
        seq = trainer.objective.seq_length(trainer._microbatches())
        rec = trainer.train_step()
        out.append({"loss": rec["loss"], "grad_norm": rec["grad_norm"], "seq": seq})
    return out, trainer


def _one_process():
    from megatron_m2.training.evaluation import ScheduleEncoder
    from megatron_m2.training.synthetic import microbatches

    runs = {}
    runs["mb8"], trainer = _steps(["--micro-batch-size", "8"] + DROP)
    # Evaluation's path (ScheduleEncoder -> Trainer.forward_only) under --image-mask-ratio 0.5
    # (before the next Trainer replaces the model-parallel groups).
    batch = next(iter(microbatches(trainer.dataset, 0, 8, 8, 0, 1)))
    images, ids, pad = batch["images"], batch["text_ids"], batch["text_pad_mask"]
    encoder = ScheduleEncoder(trainer.forward_only, trainer.cfg, None, 4, True)
    evaluated = encoder._run(images, ids, pad, "vl_image_feats")
    model = trainer.model
    keep = trainer.objective.prepare_batch(dict(batch, sample_positions=torch.arange(8)))
    with torch.no_grad():
        full = model(images, ids, pad)["vl_image_feats"]
        dropped = model(images, ids, pad, keep_index=keep["patch_keep_index"])["vl_image_feats"]
    runs["eval"] = {"vs_full": float((evaluated - full).abs().max()),
                    "vs_dropped": float((evaluated - dropped).abs().max()),
                    "keep_shape": list(keep["patch_keep_index"].shape)}
    runs["mb4"], _ = _steps(["--micro-batch-size", "4"] + DROP)
    runs["mb4_acc"], _ = _steps(["--micro-batch-size", "4", "--itc-accumulate-features"] + DROP)
    runs["unmasked"], _ = _steps(["--micro-batch-size", "8"])
    return runs


def _two_processes():
    import torch.distributed as dist

    runs = {}
    for name, argv in (("tp2_mb8", ["--tensor-model-parallel-size", "2",
                                    "--micro-batch-size", "8"]),
                       ("pp2_mb4", ["--pipeline-model-parallel-size", "2",
                                    "--micro-batch-size", "4"]),
                       ("pp2_mb4_acc", ["--pipeline-model-parallel-size", "2",
                                        "--micro-batch-size", "4",
                                        "--itc-accumulate-features"])):
        runs[name], _ = _steps(argv + DROP)
    return runs if dist.get_rank() == 0 else None


@pytest.fixture(scope="module")
def one():
    return run_distributed(_one_process, world_size=1)[0]


@pytest.fixture(scope="module")
def two():
    return run_distributed(_two_processes, world_size=2)[0]


def _same(run, ref):
    for step, (a, b) in enumerate(zip(run, ref), 1):
        for k in ("loss", "grad_norm"):
            assert abs(a[k] - b[k]) <= RTOL * max(1.0, abs(b[k])), (step, k, a[k], b[k])
        assert a["seq"] == b["seq"]


@pytest.mark.slow
def test_schedule_length_follows_the_phase(one):
    s_t = FLAVORS["tiny"].max_text_len  # 32; 16 patches, 8 kept
    assert [r["seq"] for r in one["mb8"]] == [9 + s_t, 9 + s_t, 17 + s_t]
    assert [r["seq"] for r in one["unmasked"]] == [17 + s_t] * STEPS
    assert abs(one["mb8"][0]["loss"] - one["unmasked"][0]["loss"]) > 1e-3  # it drops patches


@pytest.mark.slow
def test_feature_accumulation_equals_one_contrastive_batch(one):
    _same(one["mb4_acc"], one["mb8"])


@pytest.mark.slow
@pytest.mark.parametrize("name, ref", [("tp2_mb8", "mb8"), ("pp2_mb4", "mb4"),
                                       ("pp2_mb4_acc", "mb8")])
def test_tp_pp_match_one_process(two, one, name, ref):
    _same(two[name], one[ref])


@pytest.mark.slow
def test_evaluation_runs_unmasked(one):
    ev = one["eval"]
    assert ev["keep_shape"] == [8, 8]
    assert ev["vs_full"] < 1e-5 and ev["vs_dropped"] > 1e-3, ev


# -- validation --------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--image-mask-ratio", "1.0"], r"in \[0, 1\)"),
    (["--image-mask-ratio", "-0.1"], r"in \[0, 1\)"),
    (["--image-mask-ratio", "nan"], r"in \[0, 1\)"),
    (["--image-mask-ratio-until-iter", "3"], "needs --image-mask-ratio > 0"),
    (["--image-mask-ratio", "0.5", "--image-mask-ratio-until-iter", "0"], ">= 1"),
    (["--image-mask-ratio", "0.5", "--objective", "m2", "--mim-target", "pixel"],
     "contrastive training only"),
    (["--image-mask-ratio", "0.5", "--objective", "m2"], "contrastive training only"),
])
def test_validation(flags, message):
    with pytest.raises(ConfigError, match=message):
        validate_args(parse_args(COMMON + ["--micro-batch-size", "8"] + flags), 1)
    validate_args(parse_args(COMMON + ["--micro-batch-size", "8"] + DROP), 1)



def test_validation_fp8_alignment_of_the_shorter_vision_part():
    from megatron_m2.training.arguments import model_config
    from megatron_m2.training.validation import _validate_patch_dropout

    for mbs, ok in ((8, False), (16, True)):  # tiny, r = 0.5: 9 vision tokens per image
        args = parse_args(COMMON + ["--micro-batch-size", str(mbs), "--image-mask-ratio", "0.5",
                                    "--fp8-format", "hybrid"])
        if ok:
            _validate_patch_dropout(args, model_config(args))
        else:
            with pytest.raises(ConfigError, match="9 tokens x 8 rows, not a multiple of 16"):
                _validate_patch_dropout(args, model_config(args))


def test_bench_train_reports_patch_dropout(capsys):
    """tools/bench_train.py --image-mask-ratio: both rows side by side (figures made up)."""
    from tests.helpers.tools import load_tool

    bench = load_tool("bench_train")
    row = {"ours": 500.0, "plain": 400.0, "plain+layer": 440.0, "ours r=0.5": 300.0}
    bench.print_table({
        "flavor": "tiny", "params": 3_741_954, "global_batch_size": 16, "micro_batch_size": 8,
        "iters": 2, "warmup": 1, "threads": 2, "step_ms": row, "best_step_ms": row,
        "samples_per_s": {k: 16e3 / v for k, v in row.items()}, "ours_over_plain": 0.8,
        "plain_layer_over_plain": 0.909, "check": None, "tp": None,
        "patch_dropout": {"ratio": 0.5, "vision_seq_len": {"r=0": 17, "r=0.5": 9},
                          "step_ms": {"r=0": 500.0, "r=0.5": 300.0},
                          "best_step_ms": {"r=0": 500.0, "r=0.5": 300.0},
                          "samples_per_s": {"r=0": 32.0, "r=0.5": 53.3}, "speedup": 1.6667},
        "load_average": [1.0, 1.0], "cpu_count": 2})
    text = capsys.readouterr().out
    for needle in ("4 variants", "r=0: 17 vision rows", "r=0.5: 9 vision rows", "1.667x"):
        assert needle in text, needle
