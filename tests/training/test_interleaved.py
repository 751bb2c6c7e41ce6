"""Interleaved (virtual) pipeline stages: ``--num-layers-per-virtual-pipeline-stage``.

A tiny model of 6 + 2 layers, PP = 2 with chunks of 2 layers (2 chunks per rank: rank 0 holds
layers 0-1 and 4-5, rank 1 layers 2-3 and 6-7, the VL layers in the last chunk so both ITC
heads stay on), 4 micro-batches per step (a multiple of PP, as megatron's interleaved schedule
needs): ten steps must follow the single-process run within 1e-4 relative, the criterion of
tests/training/test_layout_parity.py (the same operations in the same order per micro-batch;
measured: bitwise equal). A checkpoint of the interleaved run loads into a PP = 1 run with the
same weights (canonical names do not depend on the chunks). Validation refuses layouts the
schedule cannot run, with one message each.
"""

import pytest

from megatron_m2.config import ConfigError
from megatron_m2.training.arguments import parse_args
from megatron_m2.training.validation import validate_args
from tests.helpers.distributed import run_distributed

pytestmark = pytest.mark.slow

MODEL = '{"num_sep_layers": 6, "num_vl_layers": 2}'
COMMON = ["--flavor", "tiny", "--model-config", MODEL, "--synthetic",
          "--synthetic-num-samples", "40", "--global-batch-size", "8", "--micro-batch-size", "2",
          "--seed", "3", "--lr", "5e-4", "--lr-decay-style", "constant", "--itc-group-size", "-1"]
INTERLEAVED = ["--pipeline-model-parallel-size", "2",
               "--num-layers-per-virtual-pipeline-stage", "2"]
STEPS = 10


def _run(flags, save=None, load=None, steps=STEPS):
    from megatron_m2.model.init import iter_canonical_params
    from megatron_m2.training.trainer import Trainer

    extra = (["--save", save, "--train-iters", str(steps)] if save else []) + (
        ["--load", load] if load else [])
    args = parse_args(COMMON + flags + extra)
    validate_args(args, args.pipeline_model_parallel_size)
    trainer = Trainer(args)
    losses = [] if load else [trainer.train_step()["loss"] for _ in range(steps)]
    if save:
        trainer.save()
        trainer.close()
    layers = [(c.layer_offset, len(c.encoder.layers)) for c in trainer.chunks]
    weights = {n: p.detach().numpy().copy() for c in trainer.chunks
               for _, n, p in iter_canonical_params(c)}
    return losses, layers, weights


def test_interleaved_pipeline_matches_one_process(tmp_path):
    ref, _, _ = run_distributed(_run, world_size=1, flags=[])[0]
    results = run_distributed(_run, world_size=2, flags=INTERLEAVED)
    assert [r[1] for r in results] == [[(0, 2), (4, 2)], [(2, 2), (6, 2)]]
    assert len(set(ref)) == STEPS  # the weights move every step
    for losses, _, _ in results:
        for step, (a, b) in enumerate(zip(losses, ref), 1):
            assert abs(a - b) <= 1e-4 * abs(b), (step, a, b)


def test_interleaved_checkpoint_loads_into_one_process(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    saved = run_distributed(_run, world_size=2, flags=INTERLEAVED, save=ckpt, steps=2)
    weights = {**saved[0][2], **saved[1][2]}
    _, _, loaded = run_distributed(_run, world_size=1, flags=[], load=ckpt)[0]
    assert set(loaded) == set(weights)
    for name, w in weights.items():
        assert (loaded[name] == w).all(), name


@pytest.mark.parametrize("flags,world,message", [
    (["--num-layers-per-virtual-pipeline-stage", "2"], 1, "needs --pipeline-model-parallel"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"], 2,
     "into at least 2 chunks"),
    (INTERLEAVED + ["--micro-batch-size", "8"], 2, "groups of --pipeline-model-parallel-size"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"], 2,
     "backbone/VL boundary in the last model chunk"),
])
def test_validation(flags, world, message):
    with pytest.raises(ConfigError, match=message):
        validate_args(parse_args(COMMON + flags), world)
