"""A fine-grained probe built from an indexed emoji dataset: **counting** and **spatial
relations**, scored by image→text ranking among a few candidate captions.

Nothing is downloaded: the emoji come from an image–text dataset made by
``tools/make_demo_dataset.py`` (the bundled ``data/emoji_demo``). Each sample's English and
Chinese captions are decoded and matched against that tool's caption templates
(:data:`DEMO_TEMPLATES`) to recover the emoji's name per language; the emoji itself is cut out
of its 64×64 tile (the pixels that differ from the light-grey background).

From these, :func:`build_probe` draws, deterministically from ``seed``, items of two kinds on a
``canvas_size`` canvas of the demo's background colour:

* ``counting``: n ∈ {1, 2, 3, 4} copies of one emoji at random, non-overlapping positions (at
  least :data:`GAP` pixels apart); candidates are the captions for n = 1..4
  (:data:`COUNT_TEMPLATES`: "three {name} emoji" / "三个{name}的表情符号"), the answer is the
  drawn n. Counts cycle 1, 2, 3, 4 over the items, so each is a quarter of them. Only emoji
  whose drawing is one blob are used (an emoji that shows two hearts would make the count
  ambiguous).
* ``relations``: two different emoji side by side, left/right or above/below (alternating);
  candidates are "{A} to the left of {B}" and "{B} to the left of {A}" ("{A}在{B}的左边"; above:
  "{A} above {B}", "{A}在{B}的上面"), the answer is the one matching the drawing. Which of the
  two candidates is right alternates too.

:func:`evaluate_probe` embeds each image (``encoder.encode_image``) and its candidates
(``encoder.encode_text``) with the encoder interface of :mod:`megatron_m2.eval.tasks`, and
counts an item correct when its right candidate has the highest cosine similarity. **Ties**
share the credit: if the right candidate ties with ``k - 1`` others at the top, the item counts
``1/k`` (the expected score of breaking the tie at random), so an encoder that gives every
candidate the same score scores exactly chance: 25 % counting, 50 % relations. Items are split
over ``shard = (index, count)`` and the correct counts summed over ``group``.
"""

from __future__ import annotations

import io
import logging
import random
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["DEMO_TEMPLATES", "COUNT_WORDS", "COUNT_TEMPLATES", "RELATION_TEMPLATES", "KINDS",
           "ProbeEmoji", "ProbeItem", "EmojiProbe", "parse_name", "build_probe",
           "evaluate_probe", "count_blobs", "foreground_mask"]

KINDS = ("counting", "relations")

DEMO_TEMPLATES: Dict[str, Tuple[str, ...]] = {
    "en": ("an emoji of {name}", "{name}", "a picture of {name}", "an icon of {name}"),
    "zh": ("{name}的表情符号", "{name}", "一个{name}的图标", "{name}的图片"),
}
"""The caption templates of ``tools/make_demo_dataset.py`` (``TEMPLATES``; a test keeps them
equal). Flags are named "{place} flag" / "{place}旗帜" there, which is part of the name here."""

COUNT_WORDS: Dict[str, Tuple[str, ...]] = {
    "en": ("one", "two", "three", "four"),
    "zh": ("一", "两", "三", "四"),
}
COUNT_TEMPLATES: Dict[str, str] = {"en": "{count} {name} emoji", "zh": "{count}个{name}的表情符号"}
"""Counting captions; the count comes first so that truncation to a short text length keeps it."""

RELATION_TEMPLATES: Dict[str, Dict[str, str]] = {
    "left": {"en": "{a} to the left of {b}", "zh": "{a}在{b}的左边"},
    "above": {"en": "{a} above {b}", "zh": "{a}在{b}的上面"},
}

BACKGROUND = (0xE0, 0xE0, 0xE0)
"""The demo dataset's background (``#e0e0e0``)."""
THRESHOLD = 40
"""A pixel is part of an emoji when a channel differs from the background by more than this
(the tiles are JPEG: the background around an emoji is not exactly flat)."""
GAP = 12
"""Minimum distance in pixels between the boxes of two drawn emoji."""
BLOB_DILATE = 5
"""Mask dilation (a ``MaxFilter`` size) before blobs are counted: nearby parts of one drawing
(an outline and its fill, anti-aliased gaps) join. Less than :data:`GAP`, so separate emoji stay
separate."""


@dataclass
class ProbeEmoji:
    """One emoji of the dataset: its names, its sample and its cut-out drawing."""

    sample: int
    names: Dict[str, str]
    sprite: object  # PIL RGB image, the tile cropped to the emoji's box
    mask: object  # PIL "L" image, 255 where the sprite is drawn
    blobs: int


@dataclass(frozen=True)
class ProbeItem:
    """One probe image: what is drawn where, its candidate captions and the right one."""

    kind: str
    emoji: Tuple[int, ...]
    """Index into :attr:`EmojiProbe.emoji` of each drawn copy."""
    boxes: Tuple[Tuple[int, int, int, int], ...]
    """``(left, top, right, bottom)`` (right/bottom exclusive) of each drawn copy."""
    candidates: Dict[str, Tuple[str, ...]]
    answer: int
    count: int = 0
    """counting: the number of copies."""
    relation: str = ""
    """relations: ``left`` (``emoji[0]`` is left of ``emoji[1]``) or ``above``."""


@dataclass
class EmojiProbe:
    """The emoji pool and the items of every kind; :meth:`image` draws an item."""

    emoji: List[ProbeEmoji]
    items: Dict[str, List[ProbeItem]]
    languages: Tuple[str, ...]
    canvas_size: int
    seed: int
    skipped: Dict[str, int] = field(default_factory=dict)

    def image(self, item: ProbeItem):
        """The item's canvas (PIL RGB)."""
        from PIL import Image

        canvas = Image.new("RGB", (self.canvas_size, self.canvas_size), BACKGROUND)
        for e, box in zip(item.emoji, item.boxes):
            canvas.paste(self.emoji[e].sprite, box[:2], self.emoji[e].mask)
        return canvas

    def summary(self) -> Dict[str, object]:
        return {"emoji": len(self.emoji), "items": {k: len(v) for k, v in self.items.items()},
                "canvas_size": self.canvas_size, "seed": self.seed, "skipped": dict(self.skipped)}


# -- building -----------------------------------------------------------------------------------
def _template_patterns(lang: str):
    """(regex, template) per template, the most specific (longest fixed text) first."""
    out = []
    for t in DEMO_TEMPLATES[lang]:
        pre, post = t.split("{name}")
        out.append((len(pre) + len(post),
                    re.compile("^" + re.escape(pre) + "(.+?)" + re.escape(post) + "$", re.S)))
    return [p for _, p in sorted(out, key=lambda x: -x[0])]


def parse_name(caption: str, lang: str) -> Optional[str]:
    """The emoji name in a demo caption (the most specific template that matches), or None."""
    caption = caption.strip()
    for pattern in _template_patterns(lang):
        m = pattern.match(caption)
        if m and m.group(1).strip():
            return m.group(1).strip()
    return None


def foreground_mask(image) -> np.ndarray:
    """Bool ``[H, W]``: pixels of an RGB image that differ from :data:`BACKGROUND`."""
    arr = np.asarray(image.convert("RGB"), dtype=np.int16)
    return (np.abs(arr - np.array(BACKGROUND, dtype=np.int16)) > THRESHOLD).any(axis=-1)


def count_blobs(mask: np.ndarray, dilate: int = BLOB_DILATE) -> int:
    """Number of 8-connected blobs of a bool mask after a ``dilate``-wide max filter."""
    from PIL import Image, ImageFilter

    if dilate > 1:
        im = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(dilate))
        mask = np.asarray(im) > 0
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    blobs = 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        blobs += 1
        seen[y, x] = True
        todo = deque([(y, x)])
        while todo:
            cy, cx = todo.popleft()
            for ny in (cy - 1, cy, cy + 1):
                for nx in (cx - 1, cx, cx + 1):
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        todo.append((ny, nx))
    return blobs


def _cut_out(image_bytes: bytes):
    """(sprite, mask, blobs) of a demo tile, or None when nothing differs from the background."""
    from PIL import Image

    with Image.open(io.BytesIO(image_bytes)) as im:
        rgb = im.convert("RGB")
    fg = foreground_mask(rgb)
    if not fg.any():
        return None
    ys, xs = np.nonzero(fg)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    mask = Image.fromarray(fg.astype(np.uint8) * 255).crop(box)
    return rgb.crop(box), mask, count_blobs(fg[box[1]:box[3], box[0]:box[2]])


def _load_emoji(prefix: str, tokenizer, languages: Sequence[str], max_samples: int = 0):
    from ..data.indexed import ImageTextIndexedDataset

    reader = ImageTextIndexedDataset(prefix)
    n = min(len(reader), max_samples) if max_samples else len(reader)
    pool: List[ProbeEmoji] = []
    skipped = {"missing_language": 0, "no_template": 0, "empty_image": 0}
    for i in range(n):
        sample = reader[i]
        names: Dict[str, str] = {}
        unmatched = False
        for lang, ids in sample.captions:
            if lang in languages and lang not in names:
                name = parse_name(tokenizer.decode(ids), lang)
                if name is None:
                    unmatched = True
                else:
                    names[lang] = name
        if len(names) < len(languages):
            skipped["no_template" if unmatched else "missing_language"] += 1
            continue
        cut = _cut_out(sample.image)
        if cut is None:
            skipped["empty_image"] += 1
            continue
        pool.append(ProbeEmoji(i, names, *cut))
    return pool, skipped


def _place(rng: random.Random, sizes: Sequence[Tuple[int, int]], canvas: int,
           tries: int = 500) -> List[Tuple[int, int, int, int]]:
    """Random boxes of ``sizes`` inside the canvas, pairwise at least :data:`GAP` apart."""
    for _ in range(tries if all(w <= canvas and h <= canvas for w, h in sizes) else 0):
        boxes: List[Tuple[int, int, int, int]] = []
        for w, h in sizes:
            for _ in range(100):
                x, y = rng.randint(0, canvas - w), rng.randint(0, canvas - h)
                b = (x, y, x + w, y + h)
                if all(b[0] >= o[2] + GAP or o[0] >= b[2] + GAP or b[1] >= o[3] + GAP
                       or o[1] >= b[3] + GAP for o in boxes):
                    boxes.append(b)
                    break
            else:
                break
        if len(boxes) == len(sizes):
            return boxes
    raise ValueError(f"cannot place {len(sizes)} emoji of sizes {list(sizes)} on a "
                     f"{canvas}x{canvas} canvas {GAP} px apart; use a larger canvas")


def _pair(rng: random.Random, first, second, relation: str, canvas: int):
    """Boxes of two sprites, ``first`` left of (above) ``second`` with a random gap, the other
    coordinate jittered by at most a quarter of the smaller sprite (so the pair reads as side by
    side, not diagonal)."""
    (w1, h1), (w2, h2) = first, second
    along = 0 if relation == "left" else 1
    s1, s2 = (w1, w2) if along == 0 else (h1, h2)
    c1, c2 = (h1, h2) if along == 0 else (w1, w2)
    room = canvas - s1 - s2 - GAP
    if room < 0 or max(c1, c2) > canvas:
        raise ValueError(f"a {canvas}x{canvas} canvas cannot hold two emoji side by side")
    gap = GAP + rng.randint(0, room)
    start = rng.randint(0, canvas - s1 - s2 - gap)
    jitter = min(c1, c2) // 4
    centre = rng.randint(max(c1, c2) // 2 + jitter, canvas - (max(c1, c2) + 1) // 2 - jitter)
    a = (start, centre - c1 // 2 + rng.randint(-jitter, jitter))
    b = (start + s1 + gap, centre - c2 // 2 + rng.randint(-jitter, jitter))
    if along == 1:
        a, b = a[::-1], b[::-1]
    return (a[0], a[1], a[0] + w1, a[1] + h1), (b[0], b[1], b[0] + w2, b[1] + h2)


def _counting_item(i: int, rng: random.Random, pool: List[ProbeEmoji], usable: List[int],
                   languages, canvas: int) -> ProbeItem:
    n = 1 + i % 4
    e = rng.choice(usable)
    size = pool[e].sprite.size
    boxes = _place(rng, [size] * n, canvas)
    candidates = {lang: tuple(COUNT_TEMPLATES[lang].format(count=w, name=pool[e].names[lang])
                              for w in COUNT_WORDS[lang]) for lang in languages}
    return ProbeItem("counting", (e,) * n, tuple(boxes), candidates, n - 1, count=n)


def _relations_item(i: int, rng: random.Random, pool: List[ProbeEmoji], languages,
                    canvas: int) -> ProbeItem:
    relation = ("left", "above")[i % 2]
    right_first = (i // 2) % 2 == 0  # whether candidate 0 is the right one
    while True:
        a, b = rng.sample(range(len(pool)), 2)
        if all(pool[a].names[lang] != pool[b].names[lang] for lang in languages):
            break
    boxes = _pair(rng, pool[a].sprite.size, pool[b].sprite.size, relation, canvas)
    # a is drawn first (left/above); the right caption is "a <relation> b".
    cands = {}
    for lang in languages:
        t = RELATION_TEMPLATES[relation][lang]
        na, nb = pool[a].names[lang], pool[b].names[lang]
        good, bad = t.format(a=na, b=nb), t.format(a=nb, b=na)
        cands[lang] = (good, bad) if right_first else (bad, good)
    return ProbeItem("relations", (a, b), boxes, cands, 0 if right_first else 1,
                     relation=relation)


def build_probe(prefix: str, tokenizer, items: int = 200, seed: int = 0,
                canvas_size: int = 224, languages: Sequence[str] = ("en", "zh"),
                kinds: Sequence[str] = KINDS, max_samples: int = 0) -> EmojiProbe:
    """The probe of ``items`` items per kind from the indexed dataset ``prefix``.

    ``tokenizer`` decodes the stored captions (an :class:`~megatron_m2.data.tokenizer.
    M2Tokenizer` or a path to its SentencePiece model: the dataset's tokenizer). Samples whose
    captions match no demo template, lack a language, or whose image is blank are skipped and
    counted in :attr:`EmojiProbe.skipped`. Item ``i`` of a kind is drawn from its own RNG
    (``seed``, kind, ``i``), so a smaller ``items`` gives a prefix of a larger one.
    """
    if isinstance(tokenizer, (str, bytes)) or hasattr(tokenizer, "__fspath__"):
        from ..data.tokenizer import M2Tokenizer

        tokenizer = M2Tokenizer(tokenizer)
    languages = tuple(languages)
    for lang in languages:
        if lang not in DEMO_TEMPLATES:
            raise ValueError(f"probe language {lang!r}: expected one of "
                             f"{', '.join(DEMO_TEMPLATES)}")
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"probe kind {kind!r}: expected one of {', '.join(KINDS)}")
    pool, skipped = _load_emoji(prefix, tokenizer, languages, max_samples)
    if sum(skipped.values()):
        logger.info("%s: %d sample(s) skipped for the probe (%s)", prefix,
                    sum(skipped.values()), ", ".join(f"{k} {v}" for k, v in skipped.items() if v))
    usable = [j for j, e in enumerate(pool) if e.blobs == 1]
    if "counting" in kinds and items and not usable:
        raise ValueError(f"{prefix}: no emoji usable for the counting probe (none whose "
                         "captions match the demo templates and whose drawing is one blob)")
    if "relations" in kinds and items and len(pool) < 2:
        raise ValueError(f"{prefix}: the relations probe needs at least two emoji")
    out: Dict[str, List[ProbeItem]] = {}
    for kind in kinds:
        made = []
        for i in range(items):
            rng = random.Random(f"{seed}:{kind}:{i}")
            if kind == "counting":
                made.append(_counting_item(i, rng, pool, usable, languages, canvas_size))
            else:
                made.append(_relations_item(i, rng, pool, languages, canvas_size))
        out[kind] = made
    return EmojiProbe(pool, out, languages, canvas_size, seed, skipped)


# -- scoring ------------------------------------------------------------------------------------
def _credit(scores: torch.Tensor, answer: int) -> float:
    """1/k if the right candidate is among the k candidates at the top score, else 0."""
    top = scores == scores.max()
    return 1.0 / int(top.sum()) if bool(top[answer]) else 0.0


def evaluate_probe(encoder, probe: EmojiProbe, shard: Tuple[int, int] = (0, 1), group=None,
                   batch_size: int = 64, progress: bool = False) -> Dict[str, Dict[str, dict]]:
    """Accuracy per kind and language: ``{kind: {lang: {"accuracy": %, "correct", "items",
    "candidates", "chance": %}}}``. ``correct`` may be fractional (ties share the credit, see
    the module docstring); with ``group`` every rank gets the same figures."""
    from .tasks import _progress, shard_range

    results: Dict[str, Dict[str, dict]] = {}
    for kind, items in probe.items.items():
        part = shard_range(len(items), *shard)
        mine = items[part.start:part.stop]
        correct = torch.zeros(len(probe.languages), dtype=torch.float64)
        it = _progress(range(0, len(mine), batch_size), -(-len(mine) // batch_size),
                       f"{kind} probe", progress)
        for lo in it:
            chunk = mine[lo:lo + batch_size]
            images = encoder.encode_image(torch.stack(
                [encoder.transform(probe.image(item)) for item in chunk])).float()
            for li, lang in enumerate(probe.languages):
                texts = [t for item in chunk for t in item.candidates[lang]]
                emb = encoder.encode_text(texts).float()
                k = 0
                for j, item in enumerate(chunk):
                    m = len(item.candidates[lang])
                    scores = emb[k:k + m] @ images[j]
                    k += m
                    correct[li] += _credit(scores, item.answer)
        if group is not None:
            import torch.distributed as dist

            correct = correct.to(_group_device(group))
            dist.all_reduce(correct, group=group)
            correct = correct.cpu()
        n_cand = len(items[0].candidates[probe.languages[0]]) if items else 0
        results[kind] = {}
        for li, lang in enumerate(probe.languages):
            c = float(correct[li])
            results[kind][lang] = {
                "accuracy": 100.0 * c / len(items) if items else 0.0,
                "correct": c, "items": len(items), "candidates": n_cand,
                "chance": 100.0 / n_cand if n_cand else 0.0}
    return results


def _group_device(group) -> torch.device:
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
