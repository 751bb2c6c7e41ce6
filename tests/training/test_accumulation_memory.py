"""Feature accumulation keeps one micro-batch's activation memory (``--itc-accumulate-features``).

The first (caching) phase runs the forward-only schedule without autograd
(``Trainer.forward_only``). So with the same micro-batch, a step of M = 4 micro-batches peaks
like a step of M = 1: the step's largest schedule call (tensor bytes alive, measured with
``megatron_m2.utils.memory.PeakTensorMemory``) within 15 % at PP = 1 (the cached embeddings
and their gradients grow with M, a few KB here; measured +0.0 %), and the caching phase alone
within 15 % at PP = 2. (The second phase at PP > 1 is megatron's 1F1B, which holds up to PP
micro-batches in flight by design: at PP = 2 M = 4 peaks ~30 % above M = 1, the same as a step
without feature accumulation.) With autograd on in the caching phase the graph of every
micro-batch stays alive until the pass ends under PP (measured: PP = 2 caching phase M = 4 at
+57 % of M = 1; and 19.4 MiB instead of 7.9 MiB at PP = 1), which this bound catches.
"""

import pytest

from megatron_m2.training.arguments import parse_args
from tests.helpers.distributed import run_distributed

pytestmark = pytest.mark.slow


def _peaks(micro_batches, pp):
    """Peak tensor bytes of each schedule call of one step: [caching phase, second phase]."""
    from megatron_m2.training.trainer import Trainer
    from megatron_m2.utils.memory import PeakTensorMemory

    mbs = 4
    trainer = Trainer(parse_args([
        "--flavor", "tiny", "--synthetic", "--synthetic-num-samples", "64", "--seed", "3",
        "--global-batch-size", str(mbs * micro_batches), "--micro-batch-size", str(mbs),
        "--itc-group-size", "-1", "--itc-accumulate-features",
        "--pipeline-model-parallel-size", str(pp)]))
    peaks, schedule = [], trainer.forward_backward

    def measured(**kwargs):
        with PeakTensorMemory() as mem:
            out = schedule(**kwargs)
        peaks.append(mem.peak_bytes)
        return out

    trainer.forward_backward = measured
    trainer.train_step()
    return peaks


@pytest.mark.parametrize("pp", [1, 2])
def test_peak_memory_does_not_grow_with_micro_batches(pp):
    one = run_distributed(_peaks, world_size=pp, micro_batches=1, pp=pp)
    four = run_distributed(_peaks, world_size=pp, micro_batches=4, pp=pp)
    cache1, cache4 = max(r[0] for r in one), max(r[0] for r in four)
    step1, step4 = max(max(r) for r in one), max(max(r) for r in four)
    print(f"PP={pp}: caching phase M=1 {cache1 / 2**20:.2f} MiB, M=4 {cache4 / 2**20:.2f} MiB "
          f"({cache4 / cache1 - 1:+.1%}); whole step M=1 {step1 / 2**20:.2f} MiB, M=4 "
          f"{step4 / 2**20:.2f} MiB ({step4 / step1 - 1:+.1%})")
    assert cache4 <= 1.15 * cache1, (cache1, cache4)
    if pp == 1:
        assert step4 <= 1.15 * step1, (step1, step4)
