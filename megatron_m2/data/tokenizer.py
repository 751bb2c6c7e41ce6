"""Bilingual SentencePiece tokenizer with the official M2-Encoder text framing.

The official M2-Encoder release tokenizes with the GLM-10B-Chinese SentencePiece model (115,244
pieces) and frames every caption as ``[CLS] + pieces + <|endoftext|>``, padded with
``<|endoftext|>`` to 52 tokens. :class:`M2Tokenizer` reproduces that framing for *any*
SentencePiece model that contains the pieces ``[CLS]`` and ``<|endoftext|>`` (found by name, so a
model trained with :func:`train_tokenizer`, whose special ids are small, works the same way as the
official one).

Because the pad id equals the EOS id, padding cannot be recovered from the ids alone; every batch
therefore comes with an explicit padding mask: ``pad_mask[b, s]`` is True at padding positions, the
real tokens being ``[CLS]``, the pieces and the *first* ``<|endoftext|>``.

Text normalisation is deliberately not part of :meth:`M2Tokenizer.encode`, which stays identical to
``SentencePieceProcessor.encode`` so that official token ids are reproduced bit for bit; data
preprocessing calls :func:`normalize_caption` before tokenizing.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import sentencepiece as spm

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

CLS_PIECE = "[CLS]"
EOT_PIECE = "<|endoftext|>"
SEP_PIECE = "[SEP]"
MASK_PIECE = "[MASK]"
UNK_PIECE = "[UNK]"
# Same order as in the official GLM model (ids 50000..50004 there), so a trained model lists the
# same special pieces in the same relative order.
SPECIAL_PIECES: Tuple[str, ...] = (EOT_PIECE, SEP_PIECE, CLS_PIECE, MASK_PIECE, UNK_PIECE)
DEFAULT_MAX_LENGTH = 52
MANIFEST_SUFFIXES = (".jsonl", ".ndjson")

PathLike = Union[str, "os.PathLike[str]"]


def normalize_caption(text: str) -> str:
    """Normalise a caption before tokenization: Unicode NFC, whitespace runs collapsed, stripped.

    NFC only recomposes canonically equivalent sequences (e.g. ``e`` + combining acute -> ``é``), so
    it never changes what a caption says; the compatibility folding (full-width -> ASCII, ligatures)
    is left to the SentencePiece model's own ``nmt_nfkc`` normaliser, as in the official model.
    ``str.split`` treats every Unicode whitespace (ideographic space U+3000, NBSP, tabs, newlines)
    as a separator, which matters because the official model keeps repeated spaces as extra ``▁``
    pieces.
    """
    return " ".join(unicodedata.normalize("NFC", text).split())


class M2Tokenizer:
    """SentencePiece tokenizer producing M2-Encoder text inputs and padding masks.

    Args:
        model_path: path to a SentencePiece ``.model`` file containing the pieces ``[CLS]`` and
            ``<|endoftext|>`` (the official ``glm_sp.model`` or one from :func:`train_tokenizer`).
        max_length: default framed length (``[CLS]`` + pieces + ``<|endoftext|>`` + padding); the
            official models use 52.

    Raises:
        ValueError: if a required special piece is missing from the model, or ``max_length < 2``.
    """

    def __init__(self, model_path: PathLike, max_length: int = DEFAULT_MAX_LENGTH,
                 model_proto: Optional[bytes] = None):
        self._model_path = str(model_path)
        self._max_length = self._check_length(max_length)
        self._proto = model_proto
        if model_proto is not None:
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        else:
            self._sp = spm.SentencePieceProcessor(model_file=self._model_path)
        self._sha256: Optional[str] = None
        self._specials: Dict[str, int] = {}
        for piece in SPECIAL_PIECES:
            pid = self._find_piece(piece)
            if pid is not None:
                self._specials[piece] = pid
        for required in (CLS_PIECE, EOT_PIECE):
            if required not in self._specials:
                raise ValueError(
                    f"SentencePiece model {self._model_path!r} has no piece {required!r}; "
                    f"M2Tokenizer needs {CLS_PIECE!r} and {EOT_PIECE!r} (train one with "
                    "megatron_m2.data.tokenizer.train_tokenizer)")
        # Ids never shown by decode(): the framing specials plus SentencePiece's control pieces.
        self._skip_ids = frozenset(self._specials.values()) | frozenset(
            i for i in range(self.vocab_size) if self._sp.is_control(i))

    @classmethod
    def from_bytes(cls, model_proto: bytes, max_length: int = DEFAULT_MAX_LENGTH,
                   name: str = "<bytes>") -> "M2Tokenizer":
        """A tokenizer from a serialized SentencePiece model (e.g. one stored inside a
        checkpoint file); ``name`` stands in for the model path in messages and
        :meth:`to_dict`."""
        return cls(name, max_length, model_proto=bytes(model_proto))

    def model_bytes(self) -> bytes:
        """The serialized SentencePiece model (to store it next to weights)."""
        return self._proto if self._proto is not None else Path(self._model_path).read_bytes()

    def _find_piece(self, piece: str) -> Optional[int]:
        # piece_to_id answers unk_id for unknown pieces, so confirm the round trip.
        pid = self._sp.piece_to_id(piece)
        return pid if self._sp.id_to_piece(pid) == piece else None

    @staticmethod
    def _check_length(max_length: int) -> int:
        if int(max_length) < 2:
            raise ValueError(f"max_length must be >= 2 ([CLS] and <|endoftext|>), got {max_length}")
        return int(max_length)

    # ----------------------------------------------------------------------------------------
    # Properties

    @property
    def model_path(self) -> str:
        """Path the SentencePiece model was loaded from."""
        return self._model_path

    @property
    def vocab_size(self) -> int:
        """Number of pieces in the model (the text embedding must have at least this many rows)."""
        return self._sp.get_piece_size()

    @property
    def cls_id(self) -> int:
        """Id of ``[CLS]``, the first token of every framed caption."""
        return self._specials[CLS_PIECE]

    @property
    def eos_id(self) -> int:
        """Id of ``<|endoftext|>``, which ends every framed caption."""
        return self._specials[EOT_PIECE]

    @property
    def pad_id(self) -> int:
        """Padding id; equal to :attr:`eos_id`, as in the official release."""
        return self._specials[EOT_PIECE]

    @property
    def sep_id(self) -> Optional[int]:
        """Id of ``[SEP]`` if the model has it, else None."""
        return self._specials.get(SEP_PIECE)

    @property
    def mask_id(self) -> Optional[int]:
        """Id of ``[MASK]`` if the model has it, else None."""
        return self._specials.get(MASK_PIECE)

    @property
    def special_ids(self) -> Dict[str, int]:
        """Special piece name -> id, for the special pieces present in the model."""
        return dict(self._specials)

    @property
    def max_length(self) -> int:
        """Default framed (and padded) length."""
        return self._max_length

    @property
    def sp(self) -> spm.SentencePieceProcessor:
        """The underlying ``SentencePieceProcessor``."""
        return self._sp

    # ----------------------------------------------------------------------------------------
    # Encoding

    def encode(self, text: str) -> List[int]:
        """Piece ids of ``text``, exactly ``SentencePieceProcessor.encode(text)`` (no framing).

        No normalisation happens here beyond the model's own; call :func:`normalize_caption` first
        when preprocessing raw captions.
        """
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """:meth:`encode` for many texts at once."""
        return self._sp.encode(list(texts))

    def frame(self, piece_ids: Sequence[int], max_length: Optional[int] = None) -> List[int]:
        """``[CLS] + pieces + <|endoftext|>`` with the pieces truncated to fit; no padding."""
        length = self._max_length if max_length is None else self._check_length(max_length)
        pieces = [int(i) for i in piece_ids[: length - 2]]
        return [self.cls_id] + pieces + [self.eos_id]

    def __call__(self, texts: Union[str, Sequence[str]],
                 max_length: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Tokenize, frame and pad captions.

        Args:
            texts: one caption or a sequence of captions.
            max_length: padded length (default :attr:`max_length`).

        Returns:
            ``(ids, pad_mask)``: LongTensor ``[b, L]`` padded with :attr:`pad_id`, and BoolTensor
            ``[b, L]``, True at padding positions (after the first ``<|endoftext|>``).
        """
        if isinstance(texts, str):
            texts = [texts]
        length = self._max_length if max_length is None else self._check_length(max_length)
        return self.pad([self.frame(p, length) for p in self.encode_batch(texts)], length)

    def pad(self, framed: Sequence[Sequence[int]],
            max_length: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Pad already framed id lists (e.g. pre-tokenized captions from an indexed dataset).

        Each sequence must start with ``[CLS]`` and end with ``<|endoftext|>`` (as :meth:`frame`
        makes them); sequences longer than ``max_length`` are truncated the same way
        :meth:`frame` truncates, keeping the final ``<|endoftext|>``.

        Returns:
            ``(ids, pad_mask)`` as :meth:`__call__` does. The mask is built from each
            sequence's length, which marks the same positions as "after the first
            ``<|endoftext|>``" unless a caption spelled ``<|endoftext|>`` literally (it is a
            user-defined piece, so SentencePiece matches it inside text).

        Raises:
            ValueError: if a sequence is not framed.
        """
        # torch is imported here, not at module level, so that corpus preprocessing and the
        # tokenizer-training CLI (which only need ids as lists) start without paying for torch.
        import torch

        length = self._max_length if max_length is None else self._check_length(max_length)
        ids = torch.full((len(framed), length), self.pad_id, dtype=torch.long)
        pad_mask = torch.ones((len(framed), length), dtype=torch.bool)
        for row, seq in enumerate(framed):
            seq = np.asarray(seq, dtype=np.int64).reshape(-1)
            if seq.size < 2 or seq[0] != self.cls_id or seq[-1] != self.eos_id:
                raise ValueError(
                    f"sequence {row} is not framed as [CLS]({self.cls_id}) ... "
                    f"<|endoftext|>({self.eos_id}): starts {seq[:3].tolist()}, "
                    f"ends {seq[-3:].tolist()}")
            if seq.size > length:
                seq = np.concatenate([seq[: length - 1], seq[-1:]])
            ids[row, : seq.size] = torch.from_numpy(seq)
            pad_mask[row, : seq.size] = False
        return ids, pad_mask

    def decode(self, ids) -> Union[str, List[str]]:
        """Text of a framed or unframed id sequence, special pieces skipped.

        A 1-D sequence (list or tensor) gives a string; a 2-D one (batch) gives a list of strings.
        """
        if hasattr(ids, "tolist"):  # torch.Tensor or np.ndarray
            ids = ids.tolist()
        if len(ids) and isinstance(ids[0], (list, tuple)):
            return [self.decode(row) for row in ids]
        return self._sp.decode([int(i) for i in ids if int(i) not in self._skip_ids])

    # ----------------------------------------------------------------------------------------
    # Description

    def sha256(self) -> str:
        """SHA-256 of the model file (to record which tokenizer a checkpoint was trained with)."""
        if self._sha256 is None:
            self._sha256 = hashlib.sha256(self.model_bytes()).hexdigest()
        return self._sha256

    def to_dict(self) -> dict:
        """JSON-able description: path, checksum, vocabulary size, length and special ids."""
        return {
            "model_path": self._model_path,
            "sha256": self.sha256(),
            "vocab_size": self.vocab_size,
            "max_length": self._max_length,
            "cls_id": self.cls_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "specials": self.special_ids,
        }

    def __repr__(self) -> str:
        return (f"M2Tokenizer({self._model_path!r}, vocab_size={self.vocab_size}, "
                f"max_length={self._max_length}, cls_id={self.cls_id}, eos_id={self.eos_id})")


# --------------------------------------------------------------------------------------------
# Corpus reading


def _record_captions(record: dict) -> Iterator[str]:
    for cap in record.get("captions") or ():
        text = cap.get("text") if isinstance(cap, dict) else cap
        if isinstance(text, str):
            yield text
    for key in ("caption_en", "caption_zh"):
        if isinstance(record.get(key), str):
            yield record[key]


def read_caption_file(path: PathLike) -> Iterator[str]:
    """Normalised, non-empty caption texts of a corpus file.

    ``*.jsonl`` / ``*.ndjson`` files are manifests: one JSON object per line, whose captions are
    every ``captions[i]["text"]`` plus ``caption_en`` and ``caption_zh`` when present. Any other
    file is plain text with one caption per line.

    Raises:
        ValueError: on a manifest line that is not a JSON object.
    """
    path = Path(path)
    manifest = path.suffix.lower() in MANIFEST_SUFFIXES
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if manifest:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{lineno}: expected a JSON object")
                texts: Iterable[str] = _record_captions(record)
            else:
                texts = (line,)
            for text in texts:
                text = normalize_caption(text)
                if text:
                    yield text


def _iter_corpus(texts_or_files: Iterable[Union[str, os.PathLike]]) -> Iterator[str]:
    for item in texts_or_files:
        if isinstance(item, os.PathLike):
            yield from read_caption_file(item)
        else:
            text = normalize_caption(item)
            if text:
                yield text


def _sample(corpus: Iterator[str], max_sentences: Optional[int], seed: int) -> List[str]:
    if max_sentences is None:
        return list(corpus)
    # Reservoir sampling (seeded) keeps memory at max_sentences and the choice reproducible; the
    # sample is then put back into corpus order so the result does not depend on arrival order.
    rng = random.Random(seed)
    reservoir: List[Tuple[int, str]] = []
    for i, text in enumerate(corpus):
        if i < max_sentences:
            reservoir.append((i, text))
        else:
            j = rng.randint(0, i)
            if j < max_sentences:
                reservoir[j] = (i, text)
    return [text for _, text in sorted(reservoir)]


# --------------------------------------------------------------------------------------------
# Training


def train_tokenizer(texts_or_files: Iterable[Union[str, os.PathLike]], model_prefix: PathLike,
                    vocab_size: int, *, max_sentences: Optional[int] = None,
                    model_type: str = "unigram", character_coverage: float = 0.9995,
                    seed: int = 0, extra_options: Optional[dict] = None) -> str:
    """Train a bilingual SentencePiece model with the official model's special pieces.

    The model has ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2, then the user-defined pieces
    ``<|endoftext|>``, ``[SEP]``, ``[CLS]``, ``[MASK]``, ``[UNK]`` (ids 3..7), then 256 byte pieces
    (byte fallback: no text maps to ``<unk>``), then the learned pieces. Load it with
    :class:`M2Tokenizer`, which finds the specials by name.

    Args:
        texts_or_files: captions (``str``) and/or corpus files (``pathlib.Path`` or other
            ``os.PathLike``; read with :func:`read_caption_file`). Every caption goes through
            :func:`normalize_caption`; empty ones are dropped.
        model_prefix: writes ``{model_prefix}.model`` and ``{model_prefix}.vocab``.
        vocab_size: target size. It is a soft limit: a corpus too small to fill it gives a smaller
            model (logged) instead of an error.
        max_sentences: train on a seeded random sample of at most this many captions.
        model_type: SentencePiece model type (``unigram``; the official GLM model is ``bpe``).
        character_coverage: share of characters covered by character pieces; 0.9995 keeps the
            common CJK characters as pieces and leaves the rarest to byte fallback.
        seed: seed for the sample and for SentencePiece's random generator.
        extra_options: further ``SentencePieceTrainer.train`` options (override the defaults).

    Returns:
        Path of the written ``.model`` file.

    Raises:
        ValueError: on an empty corpus, or a ``vocab_size`` smaller than the specials, byte pieces
            and required characters together.
    """
    if isinstance(texts_or_files, str):
        raise TypeError("texts_or_files must be an iterable of captions or paths, not one str")
    if isinstance(texts_or_files, os.PathLike):
        texts_or_files = [texts_or_files]
    if max_sentences is not None and max_sentences < 1:
        raise ValueError(f"max_sentences must be positive, got {max_sentences}")
    sentences = _sample(_iter_corpus(texts_or_files), max_sentences, seed)
    if not sentences:
        raise ValueError("train_tokenizer: the corpus has no non-empty caption")

    options = dict(
        model_type=model_type,
        vocab_size=int(vocab_size),
        # Soft limit, so that a small corpus (CI, a few thousand captions) cannot crash training.
        hard_vocab_limit=False,
        character_coverage=character_coverage,
        byte_fallback=True,
        split_digits=True,  # as the official model: numbers are split into single digits
        # The official GLM model normalises with nmt_nfkc and keeps extra whitespace (measured on
        # glm_sp.model). Mirror both so that a caption is normalised the same way by either model.
        # NFKC subsumes the NFC of normalize_caption, and the training captions went through
        # normalize_caption as preprocessed captions will, so training and encoding agree.
        normalization_rule_name="nmt_nfkc",
        remove_extra_whitespaces=False,
        user_defined_symbols=list(SPECIAL_PIECES),
        # Determinism: one thread and no sentence sampling inside SentencePiece (the sample, if
        # any, was drawn above with a fixed seed).
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=1,
    )
    options.update(extra_options or {})

    spm.set_random_generator_seed(seed)
    buf = io.BytesIO()
    try:
        # model_writer + sentence_iterator keeps file paths out of the serialized trainer spec, so
        # the model bytes depend only on the corpus and the options.
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buf,
                                       **options)
    except RuntimeError as e:
        m = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", str(e))
        if m:
            raise ValueError(
                f"vocab_size {m.group(1)} is too small for this corpus: the special pieces, 256 "
                f"byte pieces and required characters need at least {m.group(2)}") from None
        raise

    model_bytes = buf.getvalue()
    model_path = Path(f"{model_prefix}.model")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    model_path.write_bytes(model_bytes)
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    with open(f"{model_prefix}.vocab", "w", encoding="utf-8") as f:
        for i in range(sp.get_piece_size()):
            f.write(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n")
    if sp.get_piece_size() < vocab_size:
        logger.warning("tokenizer vocabulary is %d pieces (asked for %d): the corpus is too small "
                       "to fill it", sp.get_piece_size(), vocab_size)
    logger.info("trained %s tokenizer %s: %d pieces from %d sentences", model_type, model_path,
                sp.get_piece_size(), len(sentences))
    return str(model_path)
