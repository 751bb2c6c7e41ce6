"""Overlapped data-parallel communication (``--overlap-grad-reduce``, ``--overlap-param-gather``).

Megatron-core DDP reduces the gradients bucket by bucket during the backward pass, and (with the
distributed optimizer) all-gathers the updated parameters bucket by bucket in the next forward's
pre-hooks. Both change when the communication happens, not what it computes: every element is
still the sum of the same DP=2 contributions and the optimizer applies the same arithmetic to
it, so over 10 steps of the tiny flavor (DP = 2 on gloo, buckets of 200 000 elements so the
3.7 M parameters form ~19 buckets and overlap really happens) the losses must be *equal* to the
run without overlap, with and without the distributed optimizer; the parameters after the run
(read under ``Trainer.params_synced``, as saving and evaluation do) too.

Gradient clipping is off: the distributed optimizer shards each bucket over the DP ranks, so
other buckets give other shards and the gradient norm is summed in another order; with
``--clip-grad 1`` the clip factor then differs in its last bits (measured: the step-2 loss
differs by 5e-8 relative), which is rounding, not overlap.
"""

import pytest

from megatron_m2.config import ConfigError
from megatron_m2.training.arguments import parse_args
from megatron_m2.training.validation import validate_args
from tests.helpers.distributed import run_distributed

pytestmark = pytest.mark.slow

COMMON = ["--flavor", "tiny", "--synthetic", "--synthetic-num-samples", "40",
          "--global-batch-size", "8", "--micro-batch-size", "2", "--seed", "3", "--lr", "5e-4",
          "--lr-decay-style", "constant", "--itc-group-size", "-1", "--clip-grad", "0"]
OVERLAP = ["--overlap-grad-reduce", "--ddp-bucket-size", "200000"]


def _run(flags):
    from megatron_m2.training.trainer import Trainer

    args = parse_args(COMMON + flags)
    validate_args(args, 2)
    trainer = Trainer(args)
    losses = [trainer.train_step()["loss"] for _ in range(10)]
    buckets = sum(len(g.buckets) for g in trainer.ddp_model.bucket_groups)
    with trainer.params_synced():
        weights = {n: p.detach().numpy().copy() for n, p in trainer.model.named_parameters()}
    return losses, weights, buckets


@pytest.mark.parametrize("distributed_optimizer", [False, True], ids=["ddp", "distopt"])
def test_overlap_gives_the_same_run(distributed_optimizer):
    base = ["--use-distributed-optimizer"] if distributed_optimizer else []
    over = base + OVERLAP + (["--overlap-param-gather"] if distributed_optimizer else [])
    ref = run_distributed(_run, world_size=2, flags=base)
    new = run_distributed(_run, world_size=2, flags=over)
    assert ref[0][2] == 1 and new[0][2] > 10  # one bucket without overlap; many with
    for (losses, weights, _), (ref_losses, ref_weights, _) in zip(new, ref):
        assert losses == ref_losses
        for name, w in ref_weights.items():
            assert (weights[name] == w).all(), name


def test_overlap_param_gather_needs_the_distributed_optimizer():
    with pytest.raises(ConfigError, match="needs --use-distributed-optimizer"):
        validate_args(parse_args(COMMON + ["--overlap-param-gather"]), 2)
