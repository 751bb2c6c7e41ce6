"""Dataset identity: what an indexed dataset was made with, recorded beside its files.

A dataset's captions are token ids, meaningful only with the tokenizer that produced them and in
the text style it used (:data:`~megatron_m2.data.tokenizer.TEXT_STYLES`: which end of an
over-long caption is cut). ``m2-preprocess`` and ``m2-merge-datasets`` therefore write
``PREFIX.meta.json`` next to ``PREFIX.bin`` / ``PREFIX.idx`` (megatron-core's reader ignores it)::

    {"format": "megatron_m2.dataset", "format_version": 1,
     "tokenizer": {"sha256": ..., "vocab_size": ..., "cls_id": ..., "eos_id": ..., "pad_id": ...,
                   "specials": {...}, "text_style": "official" | "normalized"},
     "text_length": null | L, "max_caption_tokens": m, "samples": N,
     "captions": {"en": n_en, "zh": n_zh}, "created_by": "megatron_m2 X.Y.Z", "source": {...}}

``text_length`` is null when captions are stored whole (the default: any model text length works,
the cut happens when loading), or the length ``L`` they were cut to when stored (``m2-preprocess
--text-length``): a model that reads more than ``L`` tokens would see them cut short, so using
such a dataset with it is a mismatch.

Training (``m2-pretrain``), merging and evaluation (``m2-eval``) compare it with what they use
(:func:`check_datasets`) and refuse a mismatch with one message naming the dataset and what
differs; each has ``--allow-dataset-mismatch`` to go ahead anyway. A dataset without the file
(written by older versions or another tool) is accepted with a warning; ``m2-inspect-dataset
--write-card`` checks one against a tokenizer and writes its file.

Torch-free: argument validation calls this before anything heavy is imported.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np

from .indexed import MODE_IMAGE, MODE_TO_LANG, DatasetError, read_index

__all__ = ["CARD_SUFFIX", "CARD_FORMAT", "CARD_VERSION", "DatasetMismatchError", "card_path",
           "tokenizer_identity", "make_card", "write_card", "read_card", "tokenizer_differences",
           "check_datasets", "text_style_of", "MISMATCH_FLAG"]

logger = logging.getLogger(__name__)

CARD_SUFFIX = ".meta.json"
CARD_FORMAT = "megatron_m2.dataset"
CARD_VERSION = 1
MISMATCH_FLAG = "--allow-dataset-mismatch"
_TOKENIZER_KEYS = ("sha256", "vocab_size", "cls_id", "eos_id", "pad_id", "specials",
                   "text_style")


class DatasetMismatchError(DatasetError):
    """A dataset was made with another tokenizer, text style or text length than the one it is
    used with, or lacks a language it is asked for."""


def card_path(prefix: str) -> str:
    """``PREFIX.meta.json``."""
    return prefix + CARD_SUFFIX


def tokenizer_identity(tokenizer) -> Dict[str, object]:
    """What identifies a :class:`~megatron_m2.data.tokenizer.M2Tokenizer` for its token ids:
    the model's SHA-256, vocabulary size, special ids and text style."""
    d = tokenizer.to_dict()
    return {k: d[k] for k in _TOKENIZER_KEYS}


def make_card(prefixes: Union[str, Sequence[str]], tokenizer: Mapping[str, object],
              text_length: Optional[int] = None, source: Optional[Mapping[str, object]] = None
              ) -> Dict[str, object]:
    """The card of a dataset made of ``prefixes`` concatenated (one prefix: that dataset);
    sample and caption counts and the longest caption (framed, in tokens) are read from their
    indices. ``text_length``: what the captions were cut to when stored (None: whole)."""
    from ..version import __version__

    samples, longest, captions = 0, 0, Counter()
    for prefix in [prefixes] if isinstance(prefixes, str) else prefixes:
        index = read_index(prefix, full=False)
        modes, lengths = np.asarray(index.modes), np.asarray(index.lengths)
        samples += index.num_samples
        text = lengths[modes != MODE_IMAGE]
        longest = max(longest, int(text.max()) if text.size else 0)
        for mode, lang in MODE_TO_LANG.items():
            captions[lang] += int((modes == mode).sum())
    return {"format": CARD_FORMAT, "format_version": CARD_VERSION,
            "tokenizer": {k: tokenizer[k] for k in _TOKENIZER_KEYS if k in tokenizer},
            "text_length": None if text_length is None else int(text_length),
            "max_caption_tokens": longest, "samples": samples,
            "captions": {lang: n for lang, n in captions.items() if n},
            "created_by": f"megatron_m2 {__version__}", "source": dict(source or {})}


def write_card(prefix: str, card: Mapping[str, object]) -> str:
    """Write ``PREFIX.meta.json`` atomically (temporary file, fsync, rename); returns its path."""
    path = card_path(prefix)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(card, f, indent=1, ensure_ascii=False, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_card(prefix: str) -> Optional[Dict[str, object]]:
    """The card of ``prefix``, or None when it has none.

    Raises:
        DatasetError: the file exists but is not a card this version reads.
    """
    path = card_path(prefix)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            card = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"dataset {prefix!r}: unreadable {path}: {e}") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise DatasetError(f"dataset {prefix!r}: {path} is not a dataset card (format "
                           f"{card.get('format') if isinstance(card, dict) else None!r})")
    if card.get("format_version") != CARD_VERSION:
        raise DatasetError(f"dataset {prefix!r}: {path} has format_version "
                           f"{card.get('format_version')!r}; this version reads {CARD_VERSION}")
    if not isinstance(card.get("tokenizer"), dict) or "text_length" not in card:
        raise DatasetError(f"dataset {prefix!r}: {path} lacks its tokenizer or text_length")
    return card


def _short(value: object) -> str:
    text = str(value)
    return text[:12] + "…" if len(text) > 16 else text


def tokenizer_differences(have: Mapping[str, object], want: Mapping[str, object]) -> List[str]:
    """``"KEY have vs want"`` for each identity entry that differs (keys absent on either
    side are not compared)."""
    out = []
    for key in _TOKENIZER_KEYS:
        if key in have and key in want and have[key] != want[key]:
            name = key.replace("_", " ")
            out.append(f"{name} {_short(have[key])} vs {_short(want[key])}")
    return out


def _mismatch(prefix: str, problems: Sequence[str], hints: Sequence[str], against: str,
              allow: bool) -> None:
    if allow:
        logger.warning("dataset %s does not match %s: %s (allowed by %s)", prefix, against,
                       "; ".join(problems), MISMATCH_FLAG)
        return
    raise DatasetMismatchError(f"dataset {prefix} does not match {against}: "
                               f"{'; '.join(problems)}. To fix: {'; '.join(hints)}; or pass "
                               f"{MISMATCH_FLAG} to use it anyway")


def check_datasets(prefixes: Iterable[str], tokenizer: Optional[Mapping[str, object]] = None,
                   text_length: Optional[int] = None, languages: Sequence[str] = (),
                   against: str = "this run", allow: bool = False,
                   languages_of: Optional[Sequence[str]] = None
                   ) -> Dict[str, Optional[Dict[str, object]]]:
    """Check the cards of ``prefixes`` against each other and against what they are used with.

    Args:
        prefixes: dataset prefixes.
        tokenizer: :func:`tokenizer_identity` of the tokenizer in use (None: not compared).
        text_length: the model's text length (None: not compared); a dataset whose captions
            were cut shorter when stored is a mismatch.
        languages: languages every dataset (of ``languages_of``, default all) must have
            captions in.
        against: how messages name what the datasets are compared with.
        allow: log mismatches as warnings instead of raising.

    Returns:
        ``{prefix: card or None}``.

    Raises:
        DatasetMismatchError: one message for the first dataset that does not match.
        DatasetError: a card is unreadable.
    """
    cards = {p: read_card(p) for p in prefixes}
    legacy = [p for p, c in cards.items() if c is None]
    if legacy:
        logger.warning("dataset(s) %s have no %s card (written by another tool or an older "
                       "version): their tokenizer cannot be checked; `m2-inspect-dataset "
                       "--write-card` adds one", ", ".join(legacy), CARD_SUFFIX)
    first = next((p for p, c in cards.items() if c is not None), None)
    for prefix, card in cards.items():
        if card is None:
            continue
        # Against the tokenizer in use where given; what it does not fix (e.g. the text style
        # when it is left to the data) against the first dataset, so all datasets agree.
        want = {**cards[first]["tokenizer"], **(tokenizer or {})}
        problems, hints = [], []
        diff = tokenizer_differences(card["tokenizer"], want)
        if diff:
            problems.append("made with another tokenizer (" + ", ".join(diff) + ")")
            hints.append("preprocess it again with the tokenizer in use")
        cut = card["text_length"]
        if text_length is not None and cut is not None and cut < text_length:
            problems.append(f"its captions were cut to {cut} tokens when stored; the model "
                            f"reads {text_length}")
            hints.append("preprocess it again without --text-length (whole captions) or with "
                         f"--text-length {text_length}")
        have = card.get("captions", {})
        wanted = languages if languages_of is None or prefix in languages_of else ()
        missing = [lang for lang in wanted if not have.get(lang)]
        if missing:
            listed = ", ".join(f"{k} {v}" for k, v in have.items()) or "none"
            problems.append(f"no {'/'.join(missing)} captions (it has: {listed})")
            hints.append("ask for a language it has")
        if problems:
            _mismatch(prefix, problems, hints, against, allow)
    return cards


def text_style_of(cards: Mapping[str, Optional[Mapping[str, object]]]) -> Optional[str]:
    """The text style the datasets' captions were made in (None: no card says)."""
    styles = {c["tokenizer"].get("text_style") for c in cards.values() if c is not None}
    styles.discard(None)
    return styles.pop() if len(styles) == 1 else None
