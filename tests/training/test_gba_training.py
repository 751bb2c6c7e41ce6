"""GBA-ITC in the real trainer: layouts that see the same contrastive batch train identically.

Three steps of the tiny model, AdamW without clipping, from the same initial weights and global
batch of 8 pairs, must give the same per-step losses, gradient norms and final parameters as
one process with a micro-batch of 8:

* DP=2 x TP=2 with k = N = 2 (4 processes, micro-batch 4);
* DP=2 with k = 2 and feature accumulation over M = 2 micro-batches of 2 (k·M·b = 8).

Tolerance 1e-5 (fp32): the runs differ in summation order only. Gradient norms are compared as
well because Adam's update is invariant to a global gradient scale; a 1/N error would hide in
the parameters but not in the norms.
"""

import numpy as np
import pytest

from tests.helpers.distributed import run_distributed

pytestmark = pytest.mark.slow

COMMON = ["--flavor", "tiny", "--synthetic", "--global-batch-size", "8", "--lr", "1e-4",
          "--clip-grad", "0", "--seed", "11", "--lr-decay-style", "constant"]
STEPS = 3


def _train(argv):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_m2.training.arguments import parse_args
    from megatron_m2.training.trainer import Trainer
    from tests.model.common import gather_full

    trainer = Trainer(parse_args(COMMON + argv))
    records = [trainer.train_step() for _ in range(STEPS)]
    tp_group = ps.get_tensor_model_parallel_group()
    params = {n: gather_full(p, n, tp_group, trainer.cfg).numpy()
              for n, p in trainer.model.named_parameters()}
    return {"records": records, "params": params if dist.get_rank() == 0 else None}


def _compare(run, ref):
    for a, b in zip(run["records"], ref["records"]):
        assert abs(a["loss"] - b["loss"]) < 1e-5 * max(1.0, abs(b["loss"])), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-5 * max(1.0, b["grad_norm"]), (a, b)
    assert set(run["params"]) == set(ref["params"])
    worst = max(float(np.abs(run["params"][n] - ref["params"][n]).max()) for n in ref["params"])
    assert worst < 1e-5, worst


@pytest.fixture(scope="module")
def reference():
    return run_distributed(_train, world_size=1, argv=["--micro-batch-size", "8"])[0]


def test_dp2_tp2_global_itc_matches_one_process(reference):
    run = run_distributed(_train, world_size=4,
                          argv=["--tensor-model-parallel-size", "2", "--micro-batch-size", "4",
                                "--itc-group-size", "-1"])[0]
    _compare(run, reference)


def test_feature_accumulation_matches_one_big_batch(reference):
    run = run_distributed(_train, world_size=2,
                          argv=["--micro-batch-size", "2", "--itc-group-size", "2",
                                "--itc-accumulate-features"])[0]
    _compare(run, reference)
