"""Retrieval recall and zero-shot accuracy: exact against a naive full-matrix reference, chunked
and over real gloo processes, in bounded memory."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_m2.eval import format_table, retrieval_metrics, zero_shot_accuracy
from megatron_m2.utils.memory import PeakTensorMemory
from tests.helpers.distributed import run_distributed

KEYS = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_recall"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The blocks here are tiny: on a busy machine, OpenMP threads waiting on each other cost
    10x the work itself (3000 x 5000: 17 s on 2 threads vs 1.9 s on one)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# -- data and references ------------------------------------------------------------------------
def make_data(seed=0, n_images=37, max_captions=5, dim=16, ties=False):
    """Images with 1..max_captions captions each (shuffled), captions near their image.

    With ``ties``, embeddings are small integers: every dot product is exact whatever the
    summation order, and many scores tie, which exercises the tie rule.
    """
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, max_captions + 1, (n_images,), generator=g)
    t2i = torch.repeat_interleave(torch.arange(n_images), counts)
    t2i = t2i[torch.randperm(t2i.numel(), generator=g)]
    if ties:
        img = torch.randint(-1, 2, (n_images, dim), generator=g).float()
        txt = img[t2i] + torch.randint(-1, 2, (t2i.numel(), dim), generator=g).float()
        return img, txt, t2i
    img = F.normalize(torch.randn(n_images, dim, generator=g), dim=-1)
    txt = F.normalize(img[t2i] + 0.3 * torch.randn(t2i.numel(), dim, generator=g), dim=-1)
    return img, txt, t2i


def naive_metrics(img, txt, t2i, ks=(1, 5, 10)):
    """Full similarity matrix, stable argsort: ties go to the lower index."""
    sim = img @ txt.T
    n_img, n_txt = sim.shape
    i2t_order = torch.argsort(-sim, dim=1, stable=True)
    t2i_order = torch.argsort(-sim.T, dim=1, stable=True)
    out = {}
    for k in ks:
        hit = (t2i[i2t_order[:, :k]] == torch.arange(n_img)[:, None]).any(1)
        out[f"i2t_r{k}"] = 100.0 * int(hit.sum()) / n_img
    for k in ks:
        hit = (t2i_order[:, :k] == t2i[:, None]).any(1)
        out[f"t2i_r{k}"] = 100.0 * int(hit.sum()) / n_txt
    out["mean_recall"] = sum(out.values()) / len(out)
    return out


def naive_zero_shot(img, cls, labels, ks=(1, 5)):
    order = torch.argsort(-(img @ cls.T), dim=1, stable=True)
    return {f"top{k}": 100.0 * int((order[:, :k] == labels[:, None]).any(1).sum()) / len(labels)
            for k in ks}


# -- single process -----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk_size", [1, 3, 16, 1000])
def test_matches_naive_reference(seed, chunk_size):
    img, txt, t2i = make_data(seed)
    got = retrieval_metrics(img, txt, t2i, chunk_size=chunk_size)
    assert list(got) == KEYS
    assert got == naive_metrics(img, txt, t2i)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 7, 1000])
def test_ties_follow_the_documented_rule(chunk_size):
    """Exact ties rank the lower global index first, whatever the chunking."""
    img, txt, t2i = make_data(3, n_images=29, dim=4, ties=True)
    sim = img @ txt.T
    assert sim.unique().numel() < sim.numel() // 10  # plenty of ties
    ks = (1, 2, 3, 5, 10)
    assert retrieval_metrics(img, txt, t2i, ks=ks, chunk_size=chunk_size) == \
        naive_metrics(img, txt, t2i, ks)


def test_rank_keys_order_scores_then_index():
    """The 64-bit keys sort like (score descending, index ascending); -0.0 equals +0.0."""
    from megatron_m2.eval.retrieval import _rank_keys

    g = torch.Generator().manual_seed(13)
    scores = torch.cat([torch.randn(200, generator=g) * 10.0 ** torch.randint(-30, 30, (200,)),
                        torch.tensor([0.0, -0.0, 0.0, -0.0, 1.0, -1.0, 1.0, float("inf"),
                                      -float("inf"), 1e-45, -1e-45])])
    scores = scores[torch.randperm(scores.numel(), generator=g)]
    index = torch.randperm(scores.numel(), generator=g) * 1000 + 7
    keys = _rank_keys(scores, index)
    by_key = torch.argsort(keys, descending=True)
    # Reference: stable sort by index, then stable sort by score descending (-0.0 == 0.0).
    by_index = torch.argsort(index, stable=True)
    reference = by_index[torch.argsort(-scores[by_index], stable=True)]
    assert torch.equal(by_key, reference)


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_k_larger_than_gallery(chunk_size):
    img, txt, t2i = make_data(4, n_images=6, max_captions=2)
    ks = (1, 7, 50)
    got = retrieval_metrics(img, txt, t2i, ks=ks, chunk_size=chunk_size)
    assert got == naive_metrics(img, txt, t2i, ks)
    assert got["i2t_r50"] == got["t2i_r50"] == 100.0


def test_perfect_retrieval_is_100():
    img, _, t2i = make_data(5, n_images=40, max_captions=4)
    got = retrieval_metrics(img, img[t2i].clone(), t2i, chunk_size=7)
    assert got == {k: 100.0 for k in KEYS}


def test_permuted_captions():
    """One caption per image, carrying the embedding of image perm[j]: only fixed points hit."""
    g = torch.Generator().manual_seed(6)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    perm = torch.tensor([0, 2, 1, 3, 5, 4])  # fixed points 0 and 3
    got = retrieval_metrics(img, img[perm].clone(), torch.arange(6), ks=(1,), chunk_size=4)
    assert got == {"i2t_r1": 100.0 * 2 / 6, "t2i_r1": 100.0 * 2 / 6, "mean_recall": 100.0 * 2 / 6}


def _unit(deg):
    rad = math.radians(deg)
    return [math.cos(rad), math.sin(rad)]


def test_hand_computed_example():
    """2-D unit vectors: similarity falls with the angle, so rankings are read off the angles.

    Images at 0°, 40°, 100°; captions c0 (image 0) at 0°, c1 (image 1) at 75°, c2 (image 2) at
    10°, c3 (image 0) at 95°.
    T→I, images ordered by angular distance: c0 → I0 (rank 1); c1 → I2 25°, I1 35° (rank 2);
    c2 → I0 10°, I1 30°, I2 90° (rank 3); c3 → I2 5°, I1 55°, I0 95° (rank 3).
    I→T: I0 → c0 first (hit at 1; c3 is its other caption); I1 → c2 30°, c1 35° (rank 2);
    I2 → c3 5°, c1 25°, c2 90° (rank 3).
    """
    img = torch.tensor([_unit(0), _unit(40), _unit(100)])
    txt = torch.tensor([_unit(0), _unit(75), _unit(10), _unit(95)])
    t2i = torch.tensor([0, 1, 2, 0])
    expected = {"i2t_r1": 100 / 3, "i2t_r2": 200 / 3, "i2t_r3": 100.0,
                "t2i_r1": 25.0, "t2i_r2": 50.0, "t2i_r3": 100.0, "mean_recall": 62.5}
    for chunk_size in (1, 2, 10):
        got = retrieval_metrics(img, txt, t2i, ks=(1, 2, 3), chunk_size=chunk_size)
        assert got == pytest.approx(expected)


@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_zero_shot_matches_naive(chunk_size):
    g = torch.Generator().manual_seed(7)
    img = F.normalize(torch.randn(53, 16, generator=g), dim=-1)
    cls = F.normalize(torch.randn(11, 16, generator=g), dim=-1)
    labels = torch.randint(0, 11, (53,), generator=g)
    got = zero_shot_accuracy(img, cls, labels, chunk_size=chunk_size)
    assert list(got) == ["top1", "top5"]
    assert got == naive_zero_shot(img, cls, labels)
    assert zero_shot_accuracy(cls[labels].clone(), cls, labels, chunk_size=chunk_size) == \
        {"top1": 100.0, "top5": 100.0}


def test_invalid_inputs():
    img, txt, t2i = make_data(8, n_images=5, max_captions=2)
    bad = t2i.clone()
    bad[bad == 4] = 3  # image 4 loses its captions
    with pytest.raises(ValueError, match="without a caption"):
        retrieval_metrics(img, txt, bad)
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(img, txt, torch.where(t2i == 0, 5, t2i))
    with pytest.raises(ValueError, match="image_offset"):
        retrieval_metrics(img, txt, t2i, image_offset=3)
    with pytest.raises(ValueError, match="widths"):
        retrieval_metrics(img, txt[:, :3], t2i)
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(img, txt, t2i, ks=(0,))
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics(img, txt, t2i, chunk_size=0)


def test_memory_is_bounded():
    """3000 × 5000 with chunk 256 never comes near the 60 MB full similarity matrix."""
    g = torch.Generator().manual_seed(9)
    n_img, n_txt, dim = 3000, 5000, 32
    img = F.normalize(torch.randn(n_img, dim, generator=g), dim=-1)
    t2i = torch.arange(n_txt) % n_img
    txt = F.normalize(img[t2i] + torch.randn(n_txt, dim, generator=g), dim=-1)
    with PeakTensorMemory() as mem:
        retrieval_metrics(img, txt, t2i, chunk_size=256)
    full = n_img * n_txt * 4
    # Score block 256² × 4 B + running top-10 keys and labels of 5000 queries (~0.8 MB) and
    # their merge buffers: a few MB.
    assert mem.peak_bytes < full / 10, (mem.peak_bytes, full)


def test_format_table():
    en = {"i2t_r1": 91.234, "i2t_r5": 99.0, "i2t_r10": 99.9, "t2i_r1": 80.0, "t2i_r5": 95.5,
          "t2i_r10": 97.25, "mean_recall": 93.8}
    zh = dict(en, i2t_r1=88.0)
    del zh["t2i_r10"]
    text = format_table({"en": en, "zh": zh})
    lines = text.splitlines()
    assert lines[0].split() == ["I→T", "R@1", "I→T", "R@5", "I→T", "R@10", "T→I", "R@1", "T→I",
                                "R@5", "T→I", "R@10", "MR"]
    assert set(lines[1]) == {"-"}
    assert lines[2].split() == ["en", "91.23", "99.00", "99.90", "80.00", "95.50", "97.25",
                                "93.80"]
    assert lines[3].split() == ["zh", "88.00", "99.00", "99.90", "80.00", "95.50", "-", "93.80"]
    assert len({len(line) for line in (lines[0], lines[2], lines[3])}) == 1  # aligned
    assert format_table({"in1k": {"top1": 50.0, "top5": 75.0}}).splitlines()[0].split() == \
        ["Top-1", "Top-5"]


# -- distributed (2 real gloo processes) --------------------------------------------------------
DIST_KS = (1, 2, 5, 10)
# (img_cut, txt_cut, chunk_size, give_offset): rank 0 holds images [:img_cut] and captions
# [:txt_cut]. Uneven shards, captions whose image lives on the other rank, a rank with no
# captions at all (txt_cut=None: all on rank 0), chunks smaller and larger than the shards.
DIST_SPLITS = [(9, 40, 4, True), (15, None, 3, False), (1, 7, 1000, True)]


def _zero_shot_data():
    g = torch.Generator().manual_seed(10)
    img = F.normalize(torch.randn(41, 8, generator=g), dim=-1)
    cls = F.normalize(torch.randn(9, 8, generator=g), dim=-1)
    return img, cls, torch.randint(0, 9, (41,), generator=g)


def _dist_all():
    """Every distributed case in one spawn (process start-up dominates the cost)."""
    import torch.distributed as dist

    group, rank = dist.group.WORLD, dist.get_rank()
    out = {"retrieval": {}}
    for ties in (False, True):
        img, txt, t2i = make_data(12, n_images=23, dim=4 if ties else 16, ties=ties)
        for img_cut, txt_cut, chunk_size, give_offset in DIST_SPLITS:
            txt_cut = len(txt) if txt_cut is None else txt_cut
            i0, i1 = [(0, img_cut), (img_cut, len(img))][rank]
            t0, t1 = [(0, txt_cut), (txt_cut, len(txt))][rank]
            out["retrieval"][f"{ties}-{img_cut}-{txt_cut}-{chunk_size}"] = retrieval_metrics(
                img[i0:i1], txt[t0:t1], t2i[t0:t1], ks=DIST_KS, chunk_size=chunk_size,
                group=group, image_offset=i0 if give_offset else None)
    img, cls, labels = _zero_shot_data()
    lo, hi = [(0, 17), (17, 41)][rank]
    out["zero_shot"] = zero_shot_accuracy(img[lo:hi], cls, labels[lo:hi], chunk_size=5,
                                          group=group)
    # Rank 1 claims its images start at 2 instead of 4: every rank must raise, none may hang.
    img, txt, t2i = make_data(11, n_images=8)
    sl, offset = [(slice(0, 4), 0), (slice(4, 8), 2)][rank]
    mine = slice(None) if rank == 0 else slice(0, 0)
    try:
        retrieval_metrics(img[sl], txt[mine], t2i[mine], group=group, image_offset=offset)
        out["bad_offset"] = None
    except ValueError as e:
        out["bad_offset"] = str(e)
    return out


@pytest.fixture(scope="module")
def dist_results():
    return run_distributed(_dist_all, 2)


@pytest.mark.parametrize("ties", [False, True])
def test_distributed_equals_single_process(dist_results, ties):
    img, txt, t2i = make_data(12, n_images=23, dim=4 if ties else 16, ties=ties)
    expected = retrieval_metrics(img, txt, t2i, ks=DIST_KS)
    assert expected == naive_metrics(img, txt, t2i, DIST_KS)
    for img_cut, txt_cut, chunk_size, _ in DIST_SPLITS:
        key = f"{ties}-{img_cut}-{len(txt) if txt_cut is None else txt_cut}-{chunk_size}"
        assert [r["retrieval"][key] for r in dist_results] == [expected, expected], key


def test_distributed_zero_shot(dist_results):
    img, cls, labels = _zero_shot_data()
    expected = zero_shot_accuracy(img, cls, labels)
    assert [r["zero_shot"] for r in dist_results] == [expected, expected]


def test_distributed_invalid_input_raises_on_every_rank(dist_results):
    messages = [r["bad_offset"] for r in dist_results]
    assert all(m is not None and "image_offset" in m for m in messages), messages
