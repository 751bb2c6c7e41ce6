"""Training-time loading: deterministic sampling, DP sharding, blending, caption policies,
worker processes."""

import gc
import io
import random
import signal
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_m2.data.dataset import (
    BlendedDataset,
    GlobalBatchSampler,
    ImageTextDataset,
    _collate,
    build_loader,
    split_ranges,
)
from megatron_m2.data.indexed import ImageTextWriter
from megatron_m2.data.tokenizer import M2Tokenizer
from megatron_m2.data.transforms import eval_transform, train_transform


def _jpeg(seed):
    arr = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def dataset_prefix(tmp_path_factory, tokenizer_model):
    tok = M2Tokenizer(tokenizer_model)
    prefix = str(tmp_path_factory.mktemp("ds") / "ds")
    with ImageTextWriter(prefix) as w:
        for i in range(12):
            caps = [("en", tok.frame(tok.encode(f"a photo of a cat {i}")))]
            if i % 3:
                caps.append(("zh", tok.frame(tok.encode("一只猫的照片"))))
            w.add_sample(_jpeg(i), caps)
    return prefix


def _ds(prefix, tok_path, **kw):
    return ImageTextDataset(prefix, M2Tokenizer(tok_path), train_transform(32, randaugment=(2, 7)),
                            text_length=16, seed=5, **kw)


def test_sample_is_deterministic_per_seed_epoch_index(dataset_prefix, tokenizer_model):
    ds = _ds(dataset_prefix, tokenizer_model)
    a, b = ds[(3, 0)], ds[(3, 0)]
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = ds[(3, 1)]  # another epoch: another augmentation
    assert not torch.equal(a["images"], c["images"])
    assert a["images"].shape == (3, 32, 32) and a["text_ids"].shape == (16,)
    tok = M2Tokenizer(tokenizer_model)
    assert a["text_ids"][0] == tok.cls_id and not a["text_pad_mask"][0]


def test_caption_policies(dataset_prefix, tokenizer_model):
    tok = M2Tokenizer(tokenizer_model)
    zh = torch.tensor(tok.pad([tok.frame(tok.encode("一只猫的照片"))], max_length=16)[0][0])
    only_zh = _ds(dataset_prefix, tokenizer_model, caption_policy="zh")
    for i in (1, 2, 4):
        assert torch.equal(only_zh[(i, 0)]["text_ids"], zh)
    assert only_zh[(0, 0)]["lang"] == 0  # no Chinese caption: falls back to English
    balanced = _ds(dataset_prefix, tokenizer_model, caption_policy="balanced")
    langs = [int(balanced[(1, e)]["lang"]) for e in range(40)]
    assert 10 < langs.count(1) < 30  # both languages drawn


def test_eval_mode_is_fixed(dataset_prefix, tokenizer_model):
    ds = ImageTextDataset(dataset_prefix, M2Tokenizer(tokenizer_model), eval_transform(32),
                          text_length=16, train=False)
    assert all(torch.equal(ds[(2, 0)][k], ds[(2, 7)][k]) for k in ("images", "text_ids"))


def test_caption_token_dropout(dataset_prefix, tokenizer_model):
    """Word dropout: inner tokens become [MASK] at about the asked rate, [CLS], the end token
    and the padding never do, one inner token always stays, the image and the caption choice
    are the ones without dropout, and the draw is the same on every call."""
    tok = M2Tokenizer(tokenizer_model)
    plain = _ds(dataset_prefix, tokenizer_model)
    dropped = _ds(dataset_prefix, tokenizer_model, token_dropout=0.5)
    masked = total = 0
    for i in range(12):
        for epoch in range(10):
            a, b = plain[(i, epoch)], dropped[(i, epoch)]
            assert torch.equal(a["images"], b["images"]) and a["lang"] == b["lang"]
            assert torch.equal(b["text_ids"], dropped[(i, epoch)]["text_ids"])
            n = int((~a["text_pad_mask"]).sum())
            assert b["text_ids"][0] == tok.cls_id and b["text_ids"][n - 1] == a["text_ids"][n - 1]
            assert torch.equal(a["text_pad_mask"], b["text_pad_mask"])
            assert torch.equal(a["text_ids"][n:], b["text_ids"][n:])
            inner_a, inner_b = a["text_ids"][1:n - 1], b["text_ids"][1:n - 1]
            changed = inner_a != inner_b
            assert (inner_b[changed] == tok.mask_id).all() and not changed.all()
            masked, total = masked + int(changed.sum()), total + len(inner_a)
    assert 0.35 < masked / total < 0.6, masked / total
    # Evaluation data is never dropped; bad rates fail.
    ev = ImageTextDataset(dataset_prefix, tok, eval_transform(32), text_length=16, train=False,
                          token_dropout=0.5)
    assert (ev[(1, 0)]["text_ids"] != tok.mask_id).all()
    with pytest.raises(ValueError, match="token_dropout"):
        _ds(dataset_prefix, tokenizer_model, token_dropout=1.0)


def test_split_ranges():
    assert split_ranges(100, [98, 1, 1]) == [(0, 98), (98, 99), (99, 100)]
    assert split_ranges(10, [1]) == [(0, 10), (10, 10), (10, 10)]
    with pytest.raises(ValueError):
        split_ranges(10, [0, 0, 0])


def test_sampler_dp_slices_union_is_global_batch():
    gb, mb = 8, 2
    per_rank = []
    for r in range(2):
        it = iter(GlobalBatchSampler(20, gb, mb, dp_rank=r, dp_size=2, seed=3))
        per_rank.append([next(it) for _ in range(2 * 3)])  # 3 steps of 2 micro-batches
    single = iter(GlobalBatchSampler(20, gb, mb * 2, dp_rank=0, dp_size=1, seed=3))
    for step in range(3):
        # Micro-batch m of both ranks = the m-th block of the global batch (rank 0 first).
        union = [k for m in range(2) for r in range(2) for k in per_rank[r][2 * step + m]]
        ref = [k for mbatch in [next(single), next(single)] for k in mbatch]
        assert union == ref
    # Epoch boundary: 20 samples, 8 per step -> step 3 crosses into epoch 1.
    keys = [k for mbatch in per_rank[0] + per_rank[1] for k in mbatch]
    assert {e for _, e in keys} == {0, 1}


def test_sampler_resume_from_consumed_samples():
    full = iter(GlobalBatchSampler(30, 6, 3, 0, 1, seed=9))
    batches = [next(full) for _ in range(10)]
    resumed = iter(GlobalBatchSampler(30, 6, 3, 0, 1, seed=9, consumed_samples=12))
    assert [next(resumed) for _ in range(6)] == batches[4:]


def test_blend_proportions_and_determinism():
    a, b = list(range(100)), list(range(1000, 1010))

    class L(list):
        def __getitem__(self, key):
            return list.__getitem__(self, key[0] if isinstance(key, tuple) else key)

    bl = BlendedDataset([L(a), L(b)], weights=[0.7, 0.3], size=1000)
    counts = np.bincount(bl.which, minlength=2)
    assert abs(counts[0] - 700) <= 1 and abs(counts[1] - 300) <= 1
    bl2 = BlendedDataset([L(a), L(b)], weights=[0.7, 0.3], size=1000)
    assert np.array_equal(bl.which, bl2.which) and np.array_equal(bl.index, bl2.index)
    assert bl[(1, 0)] in a + b


class _ProbeDataset(ImageTextDataset):
    """Also reports, from the process that computed the sample, whether megatron-core is loaded."""

    def get(self, i, epoch=0):
        out = super().get(i, epoch)
        out["megatron_loaded"] = torch.tensor(any(m.split(".")[0] == "megatron"
                                                  for m in sys.modules))
        return out


def test_loader_with_workers(dataset_prefix, tokenizer_model):
    # Batches of 32 images at 224 px (19 MB): with batches built in ordinary memory, tearing the
    # loader down while the workers prefetch made most workers die of SIGABRT.
    ds = _ProbeDataset(dataset_prefix, M2Tokenizer(tokenizer_model),
                       train_transform(224, randaugment=(2, 7)), text_length=16, seed=5)
    sampler = GlobalBatchSampler(len(ds), 32, 32, 0, 1, seed=1)
    loader = build_loader(ds, sampler, num_workers=2)
    it = iter(loader)
    b = next(it)
    assert b["images"].shape == (32, 3, 224, 224) and b["text_ids"].shape == (32, 16)
    ref = ds[GlobalBatchSampler(len(ds), 32, 32, 0, 1, seed=1).key(0)]
    assert torch.equal(b["images"][0], ref["images"])
    assert torch.equal(b["text_ids"][0], ref["text_ids"])
    # The workers read the indexed files without importing megatron-core.
    assert not b["megatron_loaded"].any()
    next(it)

    # Tear down while the workers are still prefetching: each exits cleanly.
    workers = list(it._workers)
    assert len(workers) == 2
    del it, loader, b
    gc.collect()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    random.seed(0)


class _AbortAtExitDataset(ImageTextDataset):
    """In a worker, registers an exit handler that aborts, as a faulty library teardown would."""

    def get(self, i, epoch=0):
        if torch.utils.data.get_worker_info() is not None and not getattr(self, "_armed", False):
            import atexit
            import os

            atexit.register(os.abort)
            self._armed = True
        return super().get(i, epoch)


def test_workers_end_without_interpreter_teardown(dataset_prefix, tokenizer_model):
    # A spawned process normally exits through interpreter finalisation and every library's exit
    # handlers, where a C++ destructor occasionally aborts a worker that was shut down while
    # prefetching. build_loader's workers end like forked ones (os._exit), so no handler runs.
    ds = _AbortAtExitDataset(dataset_prefix, M2Tokenizer(tokenizer_model), eval_transform(32),
                             text_length=16)

    def exitcodes(make_loader):
        loader = make_loader(GlobalBatchSampler(len(ds), 4, 4, 0, 1, seed=1))
        it = iter(loader)
        next(it)
        workers = list(it._workers)
        del it, loader  # no other reference: the workers are shut down here
        gc.collect()
        for w in workers:
            w.join(timeout=120)
        return [w.exitcode for w in workers]

    # The handler does run in a plain spawned worker ...
    assert exitcodes(lambda s: torch.utils.data.DataLoader(
        ds, batch_sampler=s, num_workers=1, collate_fn=_collate,
        multiprocessing_context="spawn")) == [-signal.SIGABRT]
    # ... and not in build_loader's.
    assert exitcodes(lambda s: build_loader(ds, s, num_workers=1)) == [0]


def test_collate_builds_worker_batches_in_shared_memory(dataset_prefix, tokenizer_model,
                                                        monkeypatch):
    ds = _ds(dataset_prefix, tokenizer_model)
    samples = [ds[(i, 0)] for i in range(3)]
    batch = _collate(samples)
    for k in samples[0]:
        assert torch.equal(batch[k], torch.stack([s[k] for s in samples]))
        assert not batch[k].is_shared()
    # In a worker process the batch is stacked straight into shared memory, so that handing it
    # to the result queue needs no copy (see _collate).
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    batch = _collate(samples)
    for k in samples[0]:
        assert torch.equal(batch[k], torch.stack([s[k] for s in samples]))
        assert batch[k].is_shared()
