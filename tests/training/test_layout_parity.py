"""Loss-curve parity across parallel layouts (TP, PP, DP) on the real trainer.

Ten steps of the tiny flavor from the same initial weights (layout-independent init) and the
same global batch of 8 synthetic pairs in 2 micro-batches (so PP layouts really pipeline), with
DP layouts using one ITC group spanning the DP ranks. Every layout computes the same loss
function on the same pairs, so the per-step losses must agree with (1,1,1) within 1e-4 relative
(fp32): the layouts differ only in summation order (TP partial sums, DP gradient averaging),
~1e-7 per step, which AdamW can amplify for near-zero gradients but not to 1e-4 in ten steps.
"""

import pytest

from tests.helpers.distributed import run_distributed

pytestmark = pytest.mark.slow

COMMON = ["--flavor", "tiny", "--synthetic", "--synthetic-num-samples", "40",
          "--global-batch-size", "8", "--seed", "3", "--lr", "5e-4", "--lr-decay-style",
          "constant", "--itc-group-size", "-1"]
STEPS = 10
LAYOUTS = {  # (TP, PP, DP, extra flags): micro-batch size (2 micro-batches per step)
    (1, 1, 1, ()): 4, (2, 1, 1, ()): 4, (1, 2, 1, ()): 4, (1, 1, 2, ()): 2, (2, 2, 1, ()): 4,
    # Sequence parallelism (the tiny flavor's vision part, 17 rows, is padded to 18): the
    # pipeline's messages are sequence shards, and the LayerNorm gradients are summed across
    # TP by megatron's finalize_model_grads.
    (2, 1, 1, ("--sequence-parallel",)): 4, (2, 2, 1, ("--sequence-parallel",)): 4,
    # --trim-text-padding against the untrimmed reference: the pipeline's message shape
    # changes from step to step, odd text lengths are padded for sequence parallelism, and DP
    # ranks whose own longest captions differ agree on the step's length.
    (2, 2, 1, ("--trim-text-padding", "--sequence-parallel")): 4,
    (1, 1, 2, ("--trim-text-padding",)): 2,
}


def _losses(tp, pp, mbs, extra=()):
    from megatron_m2.training.arguments import parse_args
    from megatron_m2.training.trainer import Trainer

    trainer = Trainer(parse_args(COMMON + list(extra) + [
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--micro-batch-size", str(mbs)]))
    return [trainer.train_step()["loss"] for _ in range(STEPS)]


@pytest.fixture(scope="module")
def reference():
    return run_distributed(_losses, world_size=1, tp=1, pp=1, mbs=4)[0]


@pytest.mark.parametrize("layout", [k for k in LAYOUTS if k != (1, 1, 1, ())],
                         ids=lambda t: "tp{}_pp{}_dp{}".format(*t[:3]) + "".join(
                             f"_{f.strip('-').replace('-', '_')}" for f in t[3]))
def test_loss_curve_matches_single_process(layout, reference):
    tp, pp, dp, extra = layout
    results = run_distributed(_losses, world_size=tp * pp * dp, tp=tp, pp=pp,
                              mbs=LAYOUTS[layout], extra=extra)
    losses = results[0]
    assert all(r == losses for r in results)  # every rank reports the same global loss
    assert reference[-1] < 0.5 * reference[0]  # it is learning, not a flat line
    for step, (a, b) in enumerate(zip(losses, reference), 1):
        assert abs(a - b) <= 1e-4 * abs(b), (layout, step, a, b)
