"""Masking for M2-Encoder's masked-modelling objectives: CMLM (text) and CMIM (image).

torch + numpy only. Everything here is deterministic per ``(seed, sample index)``: a sample's mask
comes from its own random stream (:func:`seed_for`, :func:`make_generator`), so it does not
depend on which other samples share its batch, on the batch size or on the data-parallel rank.

Text (CMLM, :func:`mask_text`)
    Whole-word masking of the caption pieces at :data:`MLM_PROB` (text-only input) or
    :data:`MVLM_PROB` (fused image+text input), BERT's 80/10/10 replacement. Words are found by
    :func:`whole_word_groups` from a per-vocabulary table of piece classes made once by
    :func:`word_start_table` (no string work at training time).

Image (CMIM)
    :func:`block_mask`: BEiT's block-wise masking on the 14x14 patch grid, exactly
    :data:`IMAGE_MASK_PATCHES` patches. :func:`attentive_mask`: SyCoCa's text-guided attentive
    masking (arXiv 2401.02137), the patches most relevant to the text.

Patch dropout (FLIP, contrastive training: ``--image-mask-ratio``)
    :func:`patch_keep_indices`: the sorted random subset of patches each image keeps.

Word rule (English and Chinese)
-------------------------------
SentencePiece marks a word start with ``▁`` (the space before it). Chinese has no spaces, so in a
Chinese caption only the first piece (or one after a space) carries ``▁``: the ``▁`` rule alone
would make a whole Chinese caption one word. Every piece is therefore given a class
(:data:`PIECE_CONT` ... :data:`PIECE_SPECIAL`), and a word starts before a piece when

1. it begins with ``▁`` (English words, and the first piece after a space), or
2. it is an *isolated* piece: its first character (after any ``▁``) is CJK (ideographs, CJK
   punctuation, kana, full-width forms), or it is made only of punctuation/symbol characters
   (Unicode categories P*, S*, e.g. ``,`` ``-`` emoji); such a piece is a word by itself, or
3. it is a plain continuation piece (letters/digits without ``▁``) that follows an isolated
   piece: a script change (``手机iPhone`` -> ``手`` ``机`` ``iPhone``; ``t-shirt`` -> ``t`` ``-``
   ``shirt``, as BERT splits punctuation),

except that a piece right after a bare ``▁`` piece (``▁`` ``emo`` ``ji``; also the GLM model's
``<|blank_n|>`` space pieces) and a UTF-8 continuation byte (``<0x80>`` ... ``<0xBF>``, byte
fallback) never start a word. Byte-fallback lead bytes ``<0xE3>`` ... ``<0xE9>`` (3-byte
characters U+3000-U+9FFF: CJK punctuation, kana, ideographs) are isolated, as the CJK piece they
stand for would be; ASCII punctuation bytes are isolated; other bytes are continuations.
Special pieces (``[CLS]``, ``<|endoftext|>``, ``[MASK]``, ..., SentencePiece control pieces and
``<unk>``) and padding belong to no word and end the word before them.

Why each CJK piece is a word: a unigram SentencePiece model's CJK pieces are frequent character
n-grams (``咧`` ``嘴`` ``笑`` ``的表情符号``), i.e. characters, words or short phrases, never parts
of a character; masking them whole is the character/piece-level analogue of Chinese whole-word
masking (true Chinese WWM needs a word segmenter, which a tokenizer table cannot provide), while a
multi-character piece is always masked together. Joining consecutive CJK pieces instead would
merge a whole clause into one "word" (there is no boundary marker to stop at).
"""

from __future__ import annotations

import hashlib
import math
import unicodedata
from typing import TYPE_CHECKING, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..layout import patch_keep_count  # noqa: F401 - the data path's name for it

if TYPE_CHECKING:
    from .tokenizer import M2Tokenizer

MLM_PROB = 0.15
"""Text masking rate for text-only input (the release's ``mlm_prob``)."""
MVLM_PROB = 0.5
"""Text masking rate for fused image+text input (the release's ``mvlm_prob``)."""
IMAGE_MASK_PATCHES = 80
"""Masked patches per image (80 of the 196 patches of a 224 px image with 16 px patches)."""
IMAGE_GRID = (14, 14)
"""Patch grid ``(H, W)`` of a 224 px image with 16 px patches."""

IGNORE_INDEX = -100
"""Label of positions that are not predicted (``torch.nn.functional.cross_entropy`` default)."""

# Piece classes (values of the word_start_table).
PIECE_CONT = 0
"""Continues the current word (letters/digits without ``▁``), unless it follows an isolated
piece."""
PIECE_START = 1
"""Starts a word (begins with ``▁``)."""
PIECE_ISOLATED = 2
"""A word by itself (CJK, punctuation, symbols); a continuation piece after it starts a word."""
PIECE_GLUE = 3
"""Never starts a word (UTF-8 continuation byte of byte fallback)."""
PIECE_SPACE = 4
"""A bare ``▁`` (or ``<|blank_n|>``): starts a word, and the next piece continues it."""
PIECE_SPECIAL = 5
"""Never masked, in no word (special/control/unknown pieces)."""

_CJK_RANGES = (
    (0x3000, 0x303F),    # CJK symbols and punctuation
    (0x3040, 0x30FF),    # hiragana, katakana
    (0x3400, 0x4DBF),    # CJK extension A
    (0x4E00, 0x9FFF),    # CJK unified ideographs
    (0xF900, 0xFAFF),    # CJK compatibility ideographs
    (0xFF00, 0xFFEF),    # half-width and full-width forms
    (0x20000, 0x2FA1F),  # CJK extensions B-F, compatibility supplement
    (0x30000, 0x323AF),  # CJK extensions G-H
)

IntOrGenerator = Union[int, np.random.Generator, None]


def is_cjk_char(ch: str) -> bool:
    """Whether the character is CJK (ideograph, CJK punctuation, kana or full-width form)."""
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _is_punct_or_symbol(text: str) -> bool:
    return bool(text) and all(unicodedata.category(c)[0] in "PS" for c in text)


def classify_piece(piece: str, is_byte: bool = False) -> int:
    """The class (``PIECE_*``) of one non-special SentencePiece piece (see the module docstring).

    ``is_byte``: the piece is a byte-fallback piece ``<0xNN>``.
    """
    if is_byte:
        b = int(piece[3:5], 16)
        if 0x80 <= b <= 0xBF:
            return PIECE_GLUE
        if 0xE3 <= b <= 0xE9:
            return PIECE_ISOLATED
        if b < 0x80 and _is_punct_or_symbol(chr(b)):
            return PIECE_ISOLATED
        return PIECE_CONT
    if piece.startswith("<|blank_") and piece.endswith("|>"):
        return PIECE_SPACE
    body = piece.lstrip("▁")
    if not body:
        return PIECE_SPACE if piece else PIECE_CONT
    if is_cjk_char(body[0]) or _is_punct_or_symbol(body):
        return PIECE_ISOLATED
    return PIECE_START if body != piece else PIECE_CONT


def word_start_table(tokenizer: "M2Tokenizer") -> torch.Tensor:
    """Per-vocabulary piece classes for whole-word grouping, computed once from a tokenizer.

    Returns a uint8 tensor ``[vocab_size]`` of ``PIECE_*`` values (the "word start" table: the
    rule of the module docstring needs a little more than one bit per piece). The tokenizer's
    special pieces, SentencePiece control pieces and ``<unk>`` are :data:`PIECE_SPECIAL`.
    ``table == PIECE_START`` etc. select classes; a plain bool table (True = word start) is
    accepted wherever this table is.
    """
    sp = tokenizer.sp
    specials = set(tokenizer.special_ids.values())
    out = np.empty(tokenizer.vocab_size, dtype=np.uint8)
    for i in range(tokenizer.vocab_size):
        if i in specials or sp.is_control(i) or sp.is_unknown(i):
            out[i] = PIECE_SPECIAL
        else:
            out[i] = classify_piece(sp.id_to_piece(i), is_byte=sp.is_byte(i))
    return torch.from_numpy(out)


def _as_class_table(table: Union[torch.Tensor, np.ndarray, Sequence]) -> torch.Tensor:
    t = torch.as_tensor(table)
    if t.dtype == torch.bool:
        return torch.where(t, PIECE_START, PIECE_CONT).to(torch.uint8)
    return t.to(torch.uint8)


def _special_tensor(special_ids: Optional[Iterable[int]]) -> torch.Tensor:
    if special_ids is None:
        return torch.zeros(0, dtype=torch.long)
    if isinstance(special_ids, torch.Tensor):
        return special_ids.reshape(-1).long().unique()
    return torch.tensor(sorted({int(i) for i in special_ids}), dtype=torch.long)


def whole_word_groups(ids: torch.Tensor, tokenizer_or_word_starts,
                      special_ids: Optional[Iterable[int]] = None,
                      pad_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Group the piece ids of framed captions into words.

    Args:
        ids: LongTensor ``[L]`` or ``[B, L]`` of framed captions (``[CLS] pieces <|endoftext|>``
            then padding).
        tokenizer_or_word_starts: an :class:`~megatron_m2.data.tokenizer.M2Tokenizer` (its
            :func:`word_start_table` is computed; do that once and pass the table instead in a
            training loop), or a table from :func:`word_start_table`, or a bool table
            ``[vocab]`` (True = a word starts at this piece; no script-change rule).
        special_ids: ids that belong to no word, besides the table's :data:`PIECE_SPECIAL`
            pieces; None with a tokenizer means its special ids.
        pad_mask: optional BoolTensor like ``ids``, True at padding (belongs to no word).

    Returns:
        LongTensor like ``ids``: the word index (0, 1, ... from the left, per caption) of each
        piece, -1 for special pieces and padding.
    """
    table = tokenizer_or_word_starts
    if hasattr(table, "sp") and hasattr(table, "special_ids"):
        if special_ids is None:
            special_ids = table.special_ids.values()
        table = word_start_table(table)
    table = _as_class_table(table)
    ids = torch.as_tensor(ids, dtype=torch.long)
    squeeze = ids.dim() == 1
    ids2 = ids.unsqueeze(0) if squeeze else ids
    if ids2.dim() != 2:
        raise ValueError(f"ids must be [L] or [B, L], got shape {tuple(ids.shape)}")
    if ids2.numel() and (int(ids2.min()) < 0 or int(ids2.max()) >= table.numel()):
        raise ValueError(f"ids out of range for a word table of {table.numel()} pieces")
    cls = table[ids2].long()
    special = _special_tensor(special_ids)
    if special.numel():
        cls = torch.where(torch.isin(ids2, special), PIECE_SPECIAL, cls)
    if pad_mask is not None:
        pm = torch.as_tensor(pad_mask, dtype=torch.bool)
        cls = torch.where(pm.unsqueeze(0) if squeeze else pm, PIECE_SPECIAL, cls)
    groups = _groups_from_classes(cls)
    return groups[0] if squeeze else groups


def _groups_from_classes(cls: torch.Tensor) -> torch.Tensor:
    """Word indices ``[B, L]`` (-1 outside words) from piece classes ``[B, L]``."""
    b, length = cls.shape
    cand = cls != PIECE_SPECIAL
    sentinel = torch.full((b, 1), PIECE_SPECIAL, dtype=cls.dtype)
    prev = torch.cat([sentinel, cls[:, :-1]], dim=1)
    # Class of the last non-glue piece before each position (PIECE_SPECIAL if none).
    pos = torch.arange(length).expand(b, length)
    last = torch.where(cls != PIECE_GLUE, pos, torch.full_like(pos, -1)).cummax(dim=1).values
    last_prev = torch.cat([torch.full((b, 1), -1, dtype=last.dtype), last[:, :-1]], dim=1)
    last_cls = torch.where(last_prev >= 0, cls.gather(1, last_prev.clamp(min=0)),
                           torch.full_like(cls, PIECE_SPECIAL))
    own = ((cls == PIECE_START) | (cls == PIECE_SPACE) | (cls == PIECE_ISOLATED)
           | ((cls == PIECE_CONT) & (last_cls == PIECE_ISOLATED)))
    start = cand & ((prev == PIECE_SPECIAL)
                    | (own & (prev != PIECE_SPACE) & (cls != PIECE_GLUE)))
    word = start.long().cumsum(dim=1) - 1
    return torch.where(cand, word, torch.full_like(word, -1))


# ------------------------------------------------------------------------------------------------
# Per-sample random streams


def seed_for(seed: int, sample_index: int, stream: str = "text") -> int:
    """A 63-bit seed for one sample's random stream, from the run seed and the sample's global
    index (e.g. its index in the dataset or the global batch position of the epoch).

    ``stream`` separates independent uses for one sample (``"text"``, ``"image"``). Stable
    across processes, platforms and Python versions (BLAKE2b, not ``hash``).
    """
    key = f"{int(seed)}:{int(sample_index)}:{stream}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def make_generator(seed: int, sample_index: int, stream: str = "text") -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`seed_for`."""
    return torch.Generator().manual_seed(seed_for(seed, sample_index, stream))


def _sample_generators(batch: int, generator, seed: Optional[int],
                       sample_indices: Optional[Sequence[int]], stream: str
                       ) -> List[torch.Generator]:
    if seed is not None or sample_indices is not None:
        if generator is not None:
            raise ValueError("pass either generator or seed and sample_indices, not both")
        if seed is None or sample_indices is None:
            raise ValueError("seed and sample_indices go together")
        idx = [int(i) for i in torch.as_tensor(sample_indices).reshape(-1).tolist()]
        if len(idx) != batch:
            raise ValueError(f"{len(idx)} sample_indices for a batch of {batch}")
        return [make_generator(seed, i, stream) for i in idx]
    if generator is None:
        return [torch.default_generator] * batch
    if isinstance(generator, torch.Generator):
        return [generator] * batch
    gens = list(generator)
    if len(gens) != batch:
        raise ValueError(f"{len(gens)} generators for a batch of {batch}")
    return gens


# ------------------------------------------------------------------------------------------------
# Text


def mask_text(ids: torch.Tensor, pad_mask: Optional[torch.Tensor], word_start, rate: float,
              mask_id: int, vocab_size: int, generator=None,
              special_ids: Optional[Iterable[int]] = None, *, seed: Optional[int] = None,
              sample_indices: Optional[Sequence[int]] = None,
              replace_probs: Tuple[float, float] = (0.8, 0.1)
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Whole-word masking with BERT's 80/10/10 replacement.

    Per caption: the maskable pieces are those not special (``special_ids`` and the table's
    :data:`PIECE_SPECIAL`) and not padding; they are grouped into words
    (:func:`whole_word_groups`). The words are put in random order and the first ``k`` taken,
    ``k >= 1`` being the count whose total pieces is closest to ``rate * maskable pieces`` (a tie
    between two counts is broken by a fair coin, which keeps the mean rate unbiased); so the
    masked share is ``rate`` up to half a word (at most one word for very short captions, which
    always get one). ``rate == 0`` masks nothing. Each masked
    piece independently becomes ``mask_id`` (80 %), a random piece (10 %; uniform over the
    non-special pieces of ``[0, vocab_size)``, the original possibly drawn) or stays (10 %).

    Randomness: with ``seed`` and ``sample_indices`` (one global index per row) each caption
    uses its own stream (:func:`make_generator` ``(seed, index, "text")``), so its mask depends
    only on ``(seed, index)`` and its ids, never on the rest of the batch. Alternatively
    ``generator``: one ``torch.Generator`` drawn from row after row (the result then depends on
    the batch), or a sequence of one generator per row. Neither: torch's global seed.

    Args:
        ids: LongTensor ``[B, L]`` (or ``[L]``) of framed captions.
        pad_mask: BoolTensor like ``ids``, True at padding, or None (padding is then found by
            its id: the pad id is ``<|endoftext|>``, a special id).
        word_start: a :func:`word_start_table` (or a bool word-start table) over the vocabulary.
        rate: share of the maskable pieces to mask, in [0, 1] (:data:`MLM_PROB`,
            :data:`MVLM_PROB`).
        mask_id: id of ``[MASK]``.
        vocab_size: random replacements are drawn from ``[0, vocab_size)``.
        special_ids: ids never masked nor drawn as replacements, besides the table's special
            pieces (e.g. ``tokenizer.special_ids.values()``).
        replace_probs: probabilities of ``[MASK]`` and of a random piece (the rest unchanged).

    Returns:
        ``(input_ids, labels)``, both like ``ids``: the masked input, and the original id at
        masked positions, :data:`IGNORE_INDEX` (-100) elsewhere.
    """
    if not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    p_mask, p_rand = (float(p) for p in replace_probs)
    if p_mask < 0 or p_rand < 0 or p_mask + p_rand > 1:
        raise ValueError(f"replace_probs must be two probabilities summing to <= 1, got "
                         f"{replace_probs}")
    table = _as_class_table(word_start)
    ids = torch.as_tensor(ids, dtype=torch.long)
    squeeze = ids.dim() == 1
    ids2 = ids.unsqueeze(0) if squeeze else ids
    pm = None
    if pad_mask is not None:
        pm = torch.as_tensor(pad_mask, dtype=torch.bool)
        pm = pm.unsqueeze(0) if squeeze else pm
    special = _special_tensor(special_ids)
    groups = whole_word_groups(ids2, table, special, pm)
    gens = _sample_generators(ids2.shape[0], generator, seed, sample_indices, "text")

    allowed = torch.ones(int(vocab_size), dtype=torch.bool)
    n_tab = min(int(vocab_size), table.numel())
    allowed[:n_tab] = table[:n_tab] != PIECE_SPECIAL
    allowed[special[(special >= 0) & (special < vocab_size)]] = False
    if 0 <= mask_id < vocab_size:
        allowed[mask_id] = False
    pool = allowed.nonzero().squeeze(1)
    if pool.numel() == 0:
        raise ValueError("no piece can be drawn as a random replacement")

    input_ids = ids2.clone()
    labels = torch.full_like(ids2, IGNORE_INDEX)
    for row in range(ids2.shape[0]):
        g = groups[row]
        n_words = int(g.max()) + 1 if g.numel() else 0
        if n_words <= 0 or rate == 0:
            continue
        lengths = torch.bincount(g[g >= 0], minlength=n_words)
        target = float(rate) * float(lengths.sum())
        perm = torch.randperm(n_words, generator=gens[row])
        cum = lengths[perm].cumsum(0).double()
        dist = (cum - target).abs()
        best = (dist <= dist.min() + 1e-9).nonzero().squeeze(1)  # one k, or two on a tie
        coin = torch.rand(1, generator=gens[row])
        k = int(best[-1] if best.numel() > 1 and coin < 0.5 else best[0]) + 1
        chosen = torch.zeros(n_words + 1, dtype=torch.bool)
        chosen[perm[:k]] = True
        masked = chosen[g]  # g == -1 indexes the trailing False
        pos = masked.nonzero().squeeze(1)
        u = torch.rand(pos.numel(), generator=gens[row])
        rand_ids = pool[torch.randint(pool.numel(), (pos.numel(),), generator=gens[row])]
        labels[row, pos] = ids2[row, pos]
        new = torch.where(u < p_mask, torch.full_like(rand_ids, int(mask_id)),
                          torch.where(u < p_mask + p_rand, rand_ids, ids2[row, pos]))
        input_ids[row, pos] = new
    if squeeze:
        return input_ids[0], labels[0]
    return input_ids, labels


# ------------------------------------------------------------------------------------------------
# Image


def _np_rng(rng: IntOrGenerator) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def block_mask(grid: Tuple[int, int] = IMAGE_GRID, num_masked: int = IMAGE_MASK_PATCHES,
               min_block: int = 16, max_block: Optional[int] = None, min_aspect: float = 0.3,
               rng: IntOrGenerator = None, return_blocks: bool = False):
    """BEiT's block-wise masking: exactly ``num_masked`` patches of a ``grid`` of patches.

    Rule (BEiT's ``MaskingGenerator`` loop, BEiT v2's exact count, with the rounding made
    strict): while fewer than ``num_masked`` patches are masked, up to 10 attempts are made to
    place one rectangle: area ``A`` uniform between ``min_block`` and ``min(max_block,
    remaining)`` (either may be the larger, as with Python's ``random.uniform`` in BEiT;
    ``max_block`` defaults to ``num_masked``), aspect
    ``r = exp(U(log min_aspect, -log min_aspect))``,
    ``h = round(sqrt(A r))``, ``w = round(sqrt(A / r))``, ``h < H`` and ``w < W`` (BEiT's
    strict bound), top-left uniform. An attempt is kept when the rectangle adds at least one and
    at most ``remaining`` new patches (overlap allowed, so the count never overshoots) and, beyond
    BEiT, when its rounded shape really lies within the bounds: ``min_aspect <= h / w <=
    1 / min_aspect`` and ``min_block <= h * w <= max_block``. When 10 attempts fail the loop
    stops and the mask is topped up one patch at a time, each a uniformly chosen unmasked patch
    4-adjacent to the mask (any unmasked patch if none is), which keeps the mask blocky where
    BEiT v2 adds scattered patches.

    Args:
        grid: ``(H, W)`` patches.
        num_masked: patches to mask, ``0 <= num_masked <= H * W``.
        min_block, max_block: rectangle area bounds in patches.
        min_aspect: aspect-ratio bound, ``0 < min_aspect <= 1``.
        rng: a ``numpy.random.Generator``, or a seed for one (e.g. :func:`seed_for`
            ``(seed, index, "image")``), or None (fresh entropy).
        return_blocks: also return the placed rectangles.

    Returns:
        BoolTensor ``[H * W]`` (row-major, True = masked); with ``return_blocks``, also the list
        of rectangles ``(top, left, h, w)`` that were placed (top-up patches not included).
    """
    height, width = (int(x) for x in grid)
    n = height * width
    num_masked = int(num_masked)
    if not 0 <= num_masked <= n:
        raise ValueError(f"num_masked must be in [0, {n}], got {num_masked}")
    if not 0 < min_aspect <= 1:
        raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect}")
    max_block = num_masked if max_block is None else int(max_block)
    gen = _np_rng(rng)
    mask = np.zeros((height, width), dtype=bool)
    log_aspect = (math.log(min_aspect), -math.log(min_aspect))
    blocks: List[Tuple[int, int, int, int]] = []
    count = 0
    while count < num_masked:
        remaining = num_masked - count
        hi = min(max_block, remaining)
        added = 0
        for _ in range(10):
            area = gen.uniform(min(min_block, hi), max(min_block, hi))
            aspect = math.exp(gen.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (0 < h < height and 0 < w < width):
                continue
            if not (min_aspect - 1e-9 <= h / w <= 1 / min_aspect + 1e-9
                    and min_block <= h * w <= max_block):
                continue
            top = int(gen.integers(0, height - h + 1))
            left = int(gen.integers(0, width - w + 1))
            new = h * w - int(mask[top:top + h, left:left + w].sum())
            if 0 < new <= remaining:
                mask[top:top + h, left:left + w] = True
                blocks.append((top, left, h, w))
                added = new
                break
        if added == 0:
            break
        count += added
    while count < num_masked:
        grown = np.zeros_like(mask)
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        frontier = np.flatnonzero(grown & ~mask)
        if frontier.size == 0:
            frontier = np.flatnonzero(~mask)
        mask.flat[int(frontier[gen.integers(frontier.size)])] = True
        count += 1
    out = torch.from_numpy(mask.reshape(-1).copy())
    return (out, blocks) if return_blocks else out


def block_masks(seed: int, sample_indices: Sequence[int], grid: Tuple[int, int] = IMAGE_GRID,
                num_masked: int = IMAGE_MASK_PATCHES, **kwargs) -> torch.Tensor:
    """:func:`block_mask` for a batch, one per-sample stream each (``seed_for(seed, index,
    "image")``): BoolTensor ``[B, H * W]``, row ``i`` depending only on ``(seed,
    sample_indices[i])``. ``kwargs`` go to :func:`block_mask`."""
    rows = [block_mask(grid, num_masked, rng=seed_for(seed, int(i), "image"), **kwargs)
            for i in sample_indices]
    if not rows:
        return torch.zeros(0, int(grid[0]) * int(grid[1]), dtype=torch.bool)
    return torch.stack(rows)


def attentive_mask(scores: torch.Tensor, num_masked: int = IMAGE_MASK_PATCHES,
                   temperature: Optional[float] = None,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """SyCoCa's text-guided attentive masking: mask the patches most relevant to the text.

    Args:
        scores: ``[B, N]`` (or ``[N]``) relevance of each patch to the caption, e.g. the
            text-[CLS] -> patch attention, or the cosine similarity of patch features to the
            text embedding. Higher = more relevant. NaN counts as the lowest score.
        num_masked: patches to mask per sample, ``0 <= num_masked <= N``.
        temperature: None or 0: deterministic top-``num_masked`` (ties broken by the lower
            patch index). ``> 0``: sample ``num_masked`` patches without replacement with
            probabilities ``softmax(scores / temperature)`` (Gumbel-top-k: the top-k of
            ``scores / temperature + Gumbel noise``), so lower scores are masked sometimes;
            large temperatures approach uniform random masking.
        generator: for the Gumbel noise (CPU generator; the noise is drawn on CPU and moved
            to ``scores.device``).

    Returns:
        BoolTensor like ``scores``, exactly ``num_masked`` True per row.
    """
    s = torch.as_tensor(scores)
    squeeze = s.dim() == 1
    s2 = (s.unsqueeze(0) if squeeze else s).float()
    if s2.dim() != 2:
        raise ValueError(f"scores must be [N] or [B, N], got shape {tuple(s.shape)}")
    n = s2.shape[1]
    k = int(num_masked)
    if not 0 <= k <= n:
        raise ValueError(f"num_masked must be in [0, {n}], got {num_masked}")
    s2 = torch.nan_to_num(s2, nan=-math.inf)
    if temperature:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        u = torch.rand(s2.shape, generator=generator).clamp_(1e-12, 1 - 1e-12)
        gumbel = -torch.log(-torch.log(u)).to(s2.device)
        s2 = s2 / float(temperature) + gumbel
    order = torch.sort(s2, dim=1, descending=True, stable=True).indices
    out = torch.zeros(s2.shape, dtype=torch.bool, device=s2.device)
    out.scatter_(1, order[:, :k], True)
    return out[0] if squeeze else out


# ------------------------------------------------------------------------------------------------
# Patch dropout (FLIP)


def patch_keep_indices(seed: int, positions: Sequence[int], num_patches: int,
                       keep: int) -> torch.Tensor:
    """FLIP's patch dropout: the patches each image keeps, as LongTensor ``[B, keep]`` of
    sorted indices into its ``num_patches`` patches (the [CLS] token is not a patch: it is
    always kept).

    Row ``i`` is a uniform random ``keep``-subset drawn from its own stream
    (:func:`make_generator` ``(seed, positions[i], "patch_dropout")``): it depends only on the
    run seed and the sample's global position, never on the batch, the layout or the phase of
    feature accumulation (both phases drop the same patches)."""
    if not 1 <= keep <= num_patches:
        raise ValueError(f"keep must be in [1, {num_patches}], got {keep}")
    rows = [torch.randperm(int(num_patches),
                           generator=make_generator(seed, int(p), "patch_dropout"))[:keep]
            for p in torch.as_tensor(positions).reshape(-1).tolist()]
    if not rows:
        return torch.zeros(0, int(keep), dtype=torch.long)
    return torch.stack(rows).sort(dim=1).values
