"""``--trim-text-padding``: each step's captions run at the global batch's longest caption.

The length rule is pinned by hand-worked cases; on the real trainer with the bundled demo
captions (9 tokens on average against 32 rows) the trimmed run must give the untrimmed run's
losses within 1e-5 relative over a few steps: padding is masked, zeroed and never pooled, so
the two differ only in float summation order (~1e-7 per step). Parallel layouts with trimming
(message shapes that change per step, odd text lengths under sequence parallelism, DP ranks
with different local longest captions) are in ``test_layout_parity.py``.
"""

from pathlib import Path

import pytest
import torch

from megatron_m2.training.text_trim import caption_extent, trim_text_padding, trimmed_length
from tests.helpers.distributed import run_distributed

DEMO = Path(__file__).resolve().parents[2] / "data" / "emoji_demo"


def _batch(lengths, padded=8):
    ids = torch.full((len(lengths), padded), 3)
    pad = torch.ones(len(lengths), padded, dtype=torch.bool)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.arange(10, 10 + n)
        pad[i, :n] = False
    return {"text_ids": ids, "text_pad_mask": pad, "images": torch.zeros(len(lengths), 3, 4, 4)}


@pytest.mark.parametrize("longest,padded,mbs,align,want", [
    (17, 32, 4, 0, 17),   # no FP8: the longest caption itself
    (17, 32, 4, 16, 20),  # FP8: 4 rows per position, so a multiple of 4 positions
    (17, 32, 32, 16, 17),  # 32 rows per position are already a multiple of 16
    (17, 32, 3, 16, 32),  # 3 rows per position: a multiple of 16 positions, capped at 32
    (31, 32, 8, 16, 32),  # rounded up past the loader's length: capped
    (0, 32, 4, 0, 1),     # no text at all still leaves one row
])
def test_trimmed_length(longest, padded, mbs, align, want):
    assert trimmed_length(longest, padded, mbs, align) == want


def test_trim_cuts_every_micro_batch_to_the_longest_caption():
    batches = [_batch([2, 5]), _batch([3, 1])]
    assert caption_extent(batches) == 5
    out = trim_text_padding(batches, micro_batch=2)
    for b, o in zip(batches, out):
        assert o["text_ids"].shape == (2, 5) and o["text_pad_mask"].shape == (2, 5)
        assert torch.equal(o["text_ids"], b["text_ids"][:, :5])
        assert torch.equal(o["text_pad_mask"], b["text_pad_mask"][:, :5])
        assert o["images"] is b["images"]  # other entries untouched
    full = [_batch([8, 1])]
    assert trim_text_padding(full, micro_batch=2) is full  # nothing to cut


def _losses(trim, steps=3):
    from megatron_m2.training.arguments import parse_args
    from megatron_m2.training.trainer import Trainer

    argv = ["--flavor", "tiny", "--data-path", str(DEMO / "train"), "--tokenizer-model",
            str(DEMO / "tokenizer.model"), "--num-workers", "0", "--micro-batch-size", "8",
            "--global-batch-size", "16", "--train-iters", str(steps), "--lr", "1e-3",
            "--lr-decay-style", "constant", "--randaugment", "none", "--seed", "5"]
    trainer = Trainer(parse_args(argv + (["--trim-text-padding"] if trim else [])))
    lengths = []
    for _ in range(steps):  # the lengths the trainer prepares, then the step itself
        lengths.append(int(trainer._prepare(trainer._microbatches())[0]["text_ids"].shape[1]))
    trainer = Trainer(parse_args(argv + (["--trim-text-padding"] if trim else [])))
    return lengths, [trainer.train_step()["loss"] for _ in range(steps)]


@pytest.mark.skipif(not (DEMO / "train.bin").is_file(), reason="bundled demo set missing")
def test_trimmed_training_equals_padded_training():
    (full_len, full), (trim_len, trimmed) = (run_distributed(_losses, world_size=1, trim=t)[0]
                                             for t in (False, True))
    assert set(full_len) == {32}
    assert max(trim_len) < 32  # the demo's captions are short: trimming really cuts
    for a, b in zip(trimmed, full):
        assert abs(a - b) <= 1e-5 * abs(b), (trimmed, full)
