"""Masking for CMLM/CMIM: whole-word grouping (English, Chinese), text masking rates and 80/10/10,
specials never masked, per-(seed, sample) determinism, BEiT block masks, SyCoCa attentive masks."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_m2.data import masking as M
from megatron_m2.data.indexed import MODE_TEXT_EN, MODE_TEXT_ZH, ImageTextIndexedDataset
from megatron_m2.data.tokenizer import M2Tokenizer

DEMO = Path(__file__).resolve().parents[2] / "data" / "emoji_demo"


@pytest.fixture(scope="module")
def tok():
    return M2Tokenizer(DEMO / "tokenizer.model")


@pytest.fixture(scope="module")
def table(tok):
    return M.word_start_table(tok)


@pytest.fixture(scope="module")
def specials(tok):
    return sorted(tok.special_ids.values())


@pytest.fixture(scope="module")
def pieces():
    """Piece lists (unframed) of the demo set's real English and Chinese train captions."""
    ds = ImageTextIndexedDataset(str(DEMO / "train"))
    out = {MODE_TEXT_EN: [], MODE_TEXT_ZH: []}
    for j in range(ds.num_sequences):
        seq, mode = ds.sequence(j)
        if mode in out:
            out[mode].append([int(i) for i in seq[1:-1]])  # drop [CLS] and <|endoftext|>
    assert len(out[MODE_TEXT_EN]) > 1000 and len(out[MODE_TEXT_ZH]) > 1000
    return out


def _batch(tok, piece_lists, length=52):
    return tok.pad([tok.frame(p, length) for p in piece_lists], length)


def _long_captions(tok, pieces, n, seed=0):
    """Real captions joined 3-6 at a time (mixed languages), so rates are measured on
    captions of 15-45 pieces."""
    rng = random.Random(seed)
    pool = pieces[MODE_TEXT_EN] + pieces[MODE_TEXT_ZH]
    out = []
    for _ in range(n):
        p = []
        for _ in range(rng.randint(3, 6)):
            p += rng.choice(pool)
        out.append(p[:50])
    return _batch(tok, out)


def _words(tok, table, text):
    """Decoded text of each word of a caption, and the piece lists per word."""
    ids, pm = tok([text])
    groups = M.whole_word_groups(ids[0], table, tok.special_ids.values(), pm[0])
    words = {}
    for i, w in zip(ids[0].tolist(), groups.tolist()):
        if w >= 0:
            words.setdefault(w, []).append(i)
    assert sorted(words) == list(range(len(words)))  # word indices 0..n-1, left to right
    return [tok.sp.decode(words[w]) for w in sorted(words)], [words[w] for w in sorted(words)]


def _mask(tok, table, ids, pm, rate, **kw):
    kw.setdefault("special_ids", tok.special_ids.values())
    return M.mask_text(ids, pm, table, rate, tok.mask_id, tok.vocab_size, **kw)


# ------------------------------------------------------------------------------------------------
# Word grouping


def test_constants():
    assert (M.MLM_PROB, M.MVLM_PROB, M.IMAGE_MASK_PATCHES, M.IMAGE_GRID) == (0.15, 0.5, 80,
                                                                            (14, 14))


@pytest.mark.parametrize("text", ["an emoji of grinning face", "a red car on the road",
                                  "smiling face with open hands"])
def test_english_words_are_space_separated_words(tok, table, text):
    words, groups = _words(tok, table, text)
    assert words == text.split()
    assert any(len(g) > 1 for g in groups) or text != "an emoji of grinning face"


@pytest.mark.parametrize("text", ["一个咧嘴笑的表情符号", "笑脸的表情符号", "红色的汽车"])
def test_chinese_every_piece_is_a_word(tok, table, text):
    ids = tok.encode(text)
    assert not any(tok.sp.is_byte(i) for i in ids)
    words, groups = _words(tok, table, text)
    assert "".join(words) == text
    # every CJK piece is its own word (a bare "▁" before it belongs to it)
    cjk = [[i for i in g if tok.sp.id_to_piece(i) != "▁"] for g in groups]
    assert [len(g) for g in cjk] == [1] * len(groups)
    assert sum(len(g) for g in groups) == len(ids)
    assert len(words) > 1


def test_mixed_script_and_punctuation_boundaries(tok, table):
    words, _ = _words(tok, table, "笑脸 smiling face 手机iPhone t-shirt")
    assert "smiling" in words and "face" in words  # multi-piece English words stay whole
    assert "iPhone" in words                        # Latin after CJK starts a word
    assert "机" in words or "手机" in words
    assert "-" in words and "shirt" in words        # punctuation is a word by itself


def test_byte_fallback_character_is_one_word(tok, table):
    rare = "龘"
    body = [i for i in tok.encode(rare) if tok.sp.id_to_piece(i) != "▁"]
    assert len(body) == 3 and all(tok.sp.is_byte(i) for i in body)  # not in the demo vocab
    words, groups = _words(tok, table, "笑" + rare + "脸")
    assert words == ["笑", rare, "脸"]
    emoji_words, _ = _words(tok, table, "a 😀 face")
    assert emoji_words == ["a", "😀", "face"]


def test_tokenizer_or_table_and_bool_table(tok, table):
    ids, pm = tok(["an emoji of grinning face", "一个咧嘴笑的表情符号"])
    g_tab = M.whole_word_groups(ids, table, tok.special_ids.values(), pm)
    assert torch.equal(M.whole_word_groups(ids, tok), g_tab)
    # A plain bool table (word start = leading "▁") treats a Chinese caption as one word.
    bool_table = torch.tensor([tok.sp.id_to_piece(i).startswith("▁")
                               for i in range(tok.vocab_size)])
    g_bool = M.whole_word_groups(ids, bool_table, tok.special_ids.values(), pm)
    assert int(g_bool[1].max()) == 0 and int(g_tab[1].max()) > 0
    assert torch.equal(g_bool[0], g_tab[0])
    # specials and padding are in no word
    assert ((g_tab == -1) == ((ids == tok.cls_id) | (ids == tok.eos_id))).all()


# ------------------------------------------------------------------------------------------------
# Text masking


@pytest.mark.parametrize("rate", [M.MLM_PROB, M.MVLM_PROB])
def test_rate_and_whole_words(tok, table, pieces, rate):
    ids, pm = _long_captions(tok, pieces, 600, seed=1)
    groups = M.whole_word_groups(ids, table, tok.special_ids.values(), pm)
    _, labels = _mask(tok, table, ids, pm, rate, seed=5, sample_indices=range(600))
    masked = labels != M.IGNORE_INDEX
    n_tok = (groups >= 0).sum(1)
    n_masked = masked.sum(1)
    total = n_masked.sum().item() / n_tok.sum().item()
    assert abs(total - rate) < 0.01, total
    for b in range(ids.shape[0]):
        g = groups[b]
        lengths = torch.bincount(g[g >= 0])
        # rounded to whole words: within one word of the exact count, never empty
        assert n_masked[b] >= 1
        assert abs(n_masked[b].item() - rate * n_tok[b].item()) <= lengths.max().item()
        for w in range(len(lengths)):  # all pieces of a word masked together, or none
            assert masked[b][g == w].unique().numel() == 1


def test_short_real_captions_whole_words(tok, table, pieces):
    caps = pieces[MODE_TEXT_EN][:300] + pieces[MODE_TEXT_ZH][:300]
    ids, pm = _batch(tok, caps)
    groups = M.whole_word_groups(ids, table, tok.special_ids.values(), pm)
    _, labels = _mask(tok, table, ids, pm, M.MLM_PROB, seed=0, sample_indices=range(len(caps)))
    masked = labels != M.IGNORE_INDEX
    multi = 0
    for b in range(len(caps)):
        words = groups[b][masked[b]].unique()
        assert words.numel() >= 1  # at least one word per caption
        for w in words:            # every piece of a masked word is masked
            assert masked[b][groups[b] == w].all()
            multi += int((groups[b] == w).sum() > 1)
    assert multi > 20  # multi-piece words were masked, so the check above had teeth


def test_never_masks_specials_or_padding(tok, table, pieces, specials):
    ids, pm = _long_captions(tok, pieces, 200, seed=2)
    ids[:50, 20] = tok.mask_id  # a literal special inside a caption
    for rate in (M.MLM_PROB, 1.0):
        inp, labels = _mask(tok, table, ids, pm, rate, seed=1, sample_indices=range(200))
        special_pos = torch.isin(ids, torch.tensor(specials)) | pm
        assert (labels[special_pos] == M.IGNORE_INDEX).all()
        assert torch.equal(inp[special_pos], ids[special_pos])
        # replacements are [MASK] or ordinary pieces, never other specials
        changed = inp != ids
        assert not torch.isin(inp[changed], torch.tensor(
            [s for s in specials if s != tok.mask_id])).any()
        assert (table[inp[changed & (inp != tok.mask_id)]] != M.PIECE_SPECIAL).all()
        if rate == 1.0:  # everything maskable is masked
            assert torch.equal(labels != M.IGNORE_INDEX, ~special_pos)
        assert torch.equal(labels[labels != M.IGNORE_INDEX], ids[labels != M.IGNORE_INDEX])


def test_80_10_10(tok, table, pieces):
    ids, pm = _long_captions(tok, pieces, 800, seed=3)
    inp, labels = _mask(tok, table, ids, pm, M.MVLM_PROB, seed=9, sample_indices=range(800))
    pos = labels != M.IGNORE_INDEX
    n = pos.sum().item()
    assert n > 8000
    as_mask = (inp[pos] == tok.mask_id).float().mean().item()
    kept = (inp[pos] == ids[pos]).float().mean().item()
    random_ = ((inp[pos] != tok.mask_id) & (inp[pos] != ids[pos])).float().mean().item()
    assert abs(as_mask - 0.8) < 0.02, as_mask
    assert abs(kept - 0.1) < 0.015, kept  # includes the rare random draw of the original
    assert abs(random_ - 0.1) < 0.015, random_
    assert (inp[~pos] == ids[~pos]).all()
    # random replacements are spread over the vocabulary, not one id
    assert inp[pos & (inp != tok.mask_id) & (inp != ids)].unique().numel() > 300


def test_replace_probs_option(tok, table, pieces):
    ids, pm = _long_captions(tok, pieces, 50, seed=4)
    inp, labels = _mask(tok, table, ids, pm, 0.5, seed=0, sample_indices=range(50),
                        replace_probs=(1.0, 0.0))
    pos = labels != M.IGNORE_INDEX
    assert (inp[pos] == tok.mask_id).all()
    inp0, labels0 = _mask(tok, table, ids, pm, 0.0, seed=0, sample_indices=range(50))
    assert torch.equal(inp0, ids) and (labels0 == M.IGNORE_INDEX).all()


def test_deterministic_per_seed_and_sample(tok, table, pieces):
    ids, pm = _long_captions(tok, pieces, 64, seed=5)
    idx = torch.arange(1000, 1064)
    a = _mask(tok, table, ids, pm, M.MLM_PROB, seed=7, sample_indices=idx)
    b = _mask(tok, table, ids, pm, M.MLM_PROB, seed=7, sample_indices=idx)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # other batch composition: a permuted subset, other captions around them
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))[:20]
    other_ids, other_pm = _long_captions(tok, pieces, 12, seed=6)
    mix_ids = torch.cat([other_ids[:5], ids[perm], other_ids[5:]])
    mix_pm = torch.cat([other_pm[:5], pm[perm], other_pm[5:]])
    mix_idx = torch.cat([torch.arange(5), idx[perm], torch.arange(5, 12)])
    c = _mask(tok, table, mix_ids, mix_pm, M.MLM_PROB, seed=7, sample_indices=mix_idx)
    assert torch.equal(c[0][5:25], a[0][perm]) and torch.equal(c[1][5:25], a[1][perm])
    # a single row ([L]) gives the same as in a batch
    one = _mask(tok, table, ids[3], pm[3], M.MLM_PROB, seed=7, sample_indices=[1003])
    assert torch.equal(one[1], a[1][3])
    # another seed or other sample indices: other masks
    d = _mask(tok, table, ids, pm, M.MLM_PROB, seed=8, sample_indices=idx)
    e = _mask(tok, table, ids, pm, M.MLM_PROB, seed=7, sample_indices=idx + 64)
    assert not torch.equal(d[1], a[1]) and not torch.equal(e[1], a[1])
    assert M.seed_for(7, 3) == M.seed_for(7, 3) != M.seed_for(7, 3, "image")
    # an explicit generator is reproducible too
    f = _mask(tok, table, ids, pm, M.MLM_PROB, generator=torch.Generator().manual_seed(1))
    g = _mask(tok, table, ids, pm, M.MLM_PROB, generator=torch.Generator().manual_seed(1))
    assert torch.equal(f[0], g[0])


# ------------------------------------------------------------------------------------------------
# Image masking


def _components(mask2d):
    seen = np.zeros_like(mask2d)
    h, w = mask2d.shape
    n = 0
    for i in range(h):
        for j in range(w):
            if mask2d[i, j] and not seen[i, j]:
                n += 1
                stack = [(i, j)]
                seen[i, j] = True
                while stack:
                    y, x = stack.pop()
                    for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                        if 0 <= yy < h and 0 <= xx < w and mask2d[yy, xx] and not seen[yy, xx]:
                            seen[yy, xx] = True
                            stack.append((yy, xx))
    return n


def test_block_mask_exact_count_blocks_in_bounds():
    top_up = []
    for seed in range(200):
        mask, blocks = M.block_mask(rng=seed, return_blocks=True)
        assert mask.dtype == torch.bool and mask.shape == (196,)
        assert int(mask.sum()) == M.IMAGE_MASK_PATCHES
        m2 = mask.view(14, 14).numpy()
        union = np.zeros((14, 14), dtype=bool)
        assert blocks
        for top, left, h, w in blocks:
            assert 0.3 - 1e-9 <= h / w <= 1 / 0.3 + 1e-9
            assert 16 <= h * w <= 80 and h < 14 and w < 14
            assert top >= 0 and left >= 0 and top + h <= 14 and left + w <= 14
            union[top:top + h, left:left + w] = True
        assert not (union & ~m2).any()       # every block is masked
        top_up.append(80 - union.sum())
        assert _components(m2) <= len(blocks)  # top-up grows blocks, adds no islands
    assert np.mean(top_up) < 10  # the mask is made of rectangles, not scattered patches


@pytest.mark.parametrize("grid,num", [((14, 14), 0), ((14, 14), 1), ((14, 14), 10),
                                      ((14, 14), 100), ((14, 14), 196), ((7, 9), 25)])
def test_block_mask_other_counts(grid, num):
    for seed in range(10):
        mask = M.block_mask(grid, num, rng=seed)
        assert mask.shape == (grid[0] * grid[1],) and int(mask.sum()) == num


def test_block_mask_seeds():
    a = M.block_mask(rng=1)
    assert torch.equal(a, M.block_mask(rng=np.random.default_rng(1)))
    assert not torch.equal(a, M.block_mask(rng=2))
    batch = M.block_masks(3, [10, 11, 12])
    assert batch.shape == (3, 196) and (batch.sum(1) == 80).all()
    assert torch.equal(M.block_masks(3, [12, 99])[0], batch[2])
    assert len({tuple(r.tolist()) for r in M.block_masks(0, range(50))}) == 50
    with pytest.raises(ValueError):
        M.block_mask(num_masked=197)


def test_attentive_mask_top_k():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(16, 196, generator=g)
    mask = M.attentive_mask(scores, 80)
    assert mask.shape == scores.shape and (mask.sum(1) == 80).all()
    for b in range(16):
        assert scores[b][mask[b]].min() > scores[b][~mask[b]].max()
    # ties: lower index first; NaN is lowest
    tied = torch.zeros(2, 10)
    tied[1, 7] = 1.0
    tied[1, 0] = float("nan")
    m = M.attentive_mask(tied, 3)
    assert m[0].nonzero().squeeze(1).tolist() == [0, 1, 2]
    assert m[1].nonzero().squeeze(1).tolist() == [1, 2, 7]
    assert torch.equal(M.attentive_mask(scores[0], 5), M.attentive_mask(scores[:1], 5)[0])


def test_attentive_mask_sampling():
    scores = torch.linspace(-3, 3, 196).expand(400, 196)
    g = torch.Generator().manual_seed(0)
    m = M.attentive_mask(scores, 80, temperature=1.0, generator=g)
    assert (m.sum(1) == 80).all()
    assert not torch.equal(m[0], m[1])  # sampled, not top-k
    freq = m.float().mean(0)
    assert freq[-20:].mean() > 0.9 > 0.1 > freq[:20].mean()  # high scores masked more often
    again = M.attentive_mask(scores, 80, temperature=1.0,
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(m, again)
    cold = M.attentive_mask(scores, 80, temperature=1e-6, generator=g)
    assert torch.equal(cold, M.attentive_mask(scores, 80))


def test_patch_keep_count():
    assert M.patch_keep_count(196, 0.5) == 98
    assert M.patch_keep_count(196, 0.75) == 49
    assert M.patch_keep_count(16, 0.5) == 8
    assert M.patch_keep_count(16, 0.0) == 16
    assert M.patch_keep_count(4, 0.99) == 1  # never an image of [CLS] alone
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError):
            M.patch_keep_count(16, bad)


def test_patch_keep_indices():
    a = M.patch_keep_indices(7, [5, 9, 5], 16, 8)
    assert a.dtype == torch.long and tuple(a.shape) == (3, 8)
    assert torch.equal(a[0], a[2])  # same (seed, position): same patches, whatever the batch
    assert torch.equal(M.patch_keep_indices(7, torch.tensor([9]), 16, 8)[0], a[1])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(M.patch_keep_indices(8, [5], 16, 8)[0], a[0])  # another seed
    for row in a:  # exactly k distinct patch indices, sorted ([CLS] is not a patch index)
        assert torch.equal(row, row.sort().values) and len(set(row.tolist())) == 8
        assert 0 <= int(row.min()) and int(row.max()) < 16
    many = M.patch_keep_indices(0, range(2000), 16, 4)
    freq = torch.bincount(many.reshape(-1), minlength=16).float() / 2000
    assert (freq - 0.25).abs().max() < 0.05  # each patch kept with probability k / P
    assert M.patch_keep_indices(0, [], 16, 4).shape == (0, 4)
    with pytest.raises(ValueError):
        M.patch_keep_indices(0, [1], 16, 17)
