"""The trainer's held-out evaluation is ``m2-eval``'s retrieval task: the same figures from the
parallel model through megatron's schedule (PP=2 × DP=2: forward-only pipeline, data-parallel
shards ranked over the DP group; TP=2 with sequence parallelism × PP=2: sequence shards through
the pipeline, gathered for the heads) as from ``M2Encoder`` on the checkpoint the run saved."""

from pathlib import Path

import pytest

from tests.helpers.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "data" / "emoji_demo"
N = 24
METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_recall")

pytestmark = pytest.mark.slow


LAYOUTS = {
    "pp2_dp2": ["--pipeline-model-parallel-size", "2"],
    "tp2_sp_pp2": ["--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2",
                   "--sequence-parallel"],
}


def _train(save, layout):
    from megatron_m2.training.arguments import parse_args
    from megatron_m2.training.trainer import Trainer
    from megatron_m2.training.validation import validate_args

    args = parse_args(["--flavor", "tiny", "--data-path", str(DEMO / "train"),
                       "--tokenizer-model", str(DEMO / "tokenizer.model"),
                       "--valid-data-path", str(DEMO / "validation"),
                       "--eval-max-samples", str(N), *layout,
                       "--micro-batch-size", "2", "--global-batch-size", "4",
                       "--train-iters", "2", "--num-workers", "0", "--save", save])
    validate_args(args, 4)
    trainer = Trainer(args)
    try:
        return trainer.train()[-1]["eval"]
    finally:
        trainer.close()


def _encoder_figures(save):
    from megatron_m2 import M2Encoder
    from megatron_m2.eval.tasks import evaluate_retrieval

    enc = M2Encoder.from_pretrained(save, head="vl")
    return evaluate_retrieval(enc, str(DEMO / "validation"), ["en", "zh"], max_samples=N)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_trainer_evaluation_equals_m2_eval_on_its_checkpoint(tmp_path, layout):
    if not (DEMO / "validation.idx").exists():
        pytest.skip("bundled demo data not found")
    save = str(tmp_path / "run")
    during = run_distributed(_train, world_size=4, timeout=600, save=save,
                             layout=LAYOUTS[layout])
    assert all(r == during[0] for r in during)  # every rank logs the same figures
    after = run_distributed(_encoder_figures, world_size=1, save=save)[0]
    assert set(during[0]) == set(after) == {"en", "zh"}
    for lang in ("en", "zh"):
        for key in METRICS:
            assert during[0][lang][key] == pytest.approx(after[lang][key], abs=1e-9), (lang, key)
