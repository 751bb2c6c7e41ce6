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

Two *text styles* turn raw text into pieces (:data:`TEXT_STYLES`):

``official``
    Exactly what the release's ``GLMChineseTokenizer`` (a Hugging Face slow tokenizer) does,
    id for id: the literal special tokens ``[CLS]``, ``<|endoftext|>``, ``[MASK]``, ``[UNK]`` are
    never split (whitespace around them is dropped), runs of 2-10 spaces become the
    ``<|blank_n|>`` pieces, no Unicode normalisation happens beyond the model's own, and an
    over-long caption is truncated on the **left** (the last pieces are kept).
``normalized``
    :func:`normalize_caption` (Unicode NFC, whitespace runs collapsed, stripped), then the plain
    SentencePiece encoding; an over-long caption keeps its **first** pieces. Better for training
    new models: the beginning of a caption usually says what the image shows, and whitespace
    noise of web captions does not reach the model.

The default follows the SentencePiece model (:func:`default_text_style`): ``official`` for the
release's GLM model (recognised by its ``<|blank_2|>`` ... ``<|blank_10|>`` pieces), ``normalized``
for every other model (e.g. one from :func:`train_tokenizer`). Datasets and checkpoints record the
style they were made with, and the tools that read them use that record.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import re
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import sentencepiece as spm

from ..errors import UserError

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

TEXT_STYLES: Tuple[str, ...] = ("official", "normalized")
"""Ways of turning raw text into pieces (see the module docstring)."""
# The release's tokenizer (transformers' slow tokenizer, tokenizer_config.json of the release)
# declares these as special tokens: it never splits them out of a text, and strips the whitespace
# around them. [SEP] is not among them, so SentencePiece itself handles it.
NO_SPLIT_PIECES: Tuple[str, ...] = (EOT_PIECE, CLS_PIECE, MASK_PIECE, UNK_PIECE)
BLANK_PIECES: Tuple[str, ...] = tuple(f"<|blank_{n}|>" for n in range(2, 11))
"""The GLM model's pieces for runs of 2..10 spaces (the release's ``encode_whitespaces``)."""


class TokenizerError(UserError, ValueError):
    """A tokenizer file cannot be used: not a SentencePiece model, or required pieces missing.
    The message names the file."""


def encode_whitespaces(text: str) -> str:
    """The release's ``encode_whitespaces``: each run of 2-10 spaces becomes ``<|blank_n|>``
    (longer runs are cut greedily from 10 down: 13 spaces give ``<|blank_10|><|blank_3|>``)."""
    for n in range(10, 1, -1):
        text = text.replace(" " * n, f"<|blank_{n}|>")
    return text

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
        text_style: ``"official"`` or ``"normalized"`` (see :data:`TEXT_STYLES`); None picks
            :func:`default_text_style` of the model.

    Raises:
        TokenizerError: the file is missing or not a SentencePiece model, or a required special
            piece is missing from the model.
        ValueError: ``max_length < 2`` or an unknown ``text_style``.
    """

    def __init__(self, model_path: PathLike, max_length: int = DEFAULT_MAX_LENGTH,
                 model_proto: Optional[bytes] = None, text_style: Optional[str] = None):
        self._model_path = str(model_path)
        self._max_length = self._check_length(max_length)
        self._proto = model_proto
        try:
            if model_proto is not None:
                self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
            else:
                if not os.path.exists(self._model_path):
                    raise TokenizerError(f"tokenizer model {self._model_path}: no such file")
                if os.path.isdir(self._model_path):
                    raise TokenizerError(f"tokenizer model {self._model_path} is a directory, "
                                         "not a SentencePiece .model file")
                self._sp = spm.SentencePieceProcessor(model_file=self._model_path)
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"tokenizer model {self._model_path}: not a SentencePiece "
                                 f"model ({str(e).splitlines()[0] if str(e) else e!r})") from None
        self._sha256: Optional[str] = None
        self._specials: Dict[str, int] = {}
        for piece in SPECIAL_PIECES:
            pid = self._find_piece(piece)
            if pid is not None:
                self._specials[piece] = pid
        for required in (CLS_PIECE, EOT_PIECE):
            if required not in self._specials:
                raise TokenizerError(
                    f"SentencePiece model {self._model_path!r} has no piece {required!r}; "
                    f"M2Tokenizer needs {CLS_PIECE!r} and {EOT_PIECE!r} (train one with "
                    "megatron_m2.data.tokenizer.train_tokenizer)")
        # Ids never shown by decode(): the framing specials plus SentencePiece's control pieces.
        self._skip_ids = frozenset(self._specials.values()) | frozenset(
            i for i in range(self.vocab_size) if self._sp.is_control(i))
        self._text_style = self._check_style(text_style) if text_style else \
            default_text_style(self._sp)
        no_split = [p for p in NO_SPLIT_PIECES if p in self._specials]
        self._no_split_re = re.compile("|".join(re.escape(p) for p in no_split))

    @classmethod
    def from_bytes(cls, model_proto: bytes, max_length: int = DEFAULT_MAX_LENGTH,
                   name: str = "<bytes>", text_style: Optional[str] = None) -> "M2Tokenizer":
        """A tokenizer from a serialized SentencePiece model (e.g. one stored inside a
        checkpoint file); ``name`` stands in for the model path in messages and
        :meth:`to_dict`."""
        return cls(name, max_length, model_proto=bytes(model_proto), text_style=text_style)

    def model_bytes(self) -> bytes:
        """The serialized SentencePiece model (to store it next to weights)."""
        return self._proto if self._proto is not None else Path(self._model_path).read_bytes()

    def _find_piece(self, piece: str) -> Optional[int]:
        # piece_to_id answers unk_id for unknown pieces, so confirm the round trip.
        pid = self._sp.piece_to_id(piece)
        return pid if self._sp.id_to_piece(pid) == piece else None

    @staticmethod
    def _check_style(text_style: str) -> str:
        if text_style not in TEXT_STYLES:
            raise ValueError(f"text_style must be one of {', '.join(TEXT_STYLES)}, got "
                             f"{text_style!r}")
        return text_style

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
    def text_style(self) -> str:
        """``"official"`` or ``"normalized"``: how raw text becomes pieces and which end of an
        over-long caption is kept (see :data:`TEXT_STYLES`)."""
        return self._text_style

    @property
    def sp(self) -> spm.SentencePieceProcessor:
        """The underlying ``SentencePieceProcessor``."""
        return self._sp

    # ----------------------------------------------------------------------------------------
    # Encoding

    def normalize(self, text: str) -> str:
        """The text as this style hands it to the encoder: :func:`normalize_caption` in the
        normalized style, unchanged in the official one. Empty means "no caption"."""
        return normalize_caption(text) if self._text_style == "normalized" else text

    def encode(self, text: str) -> List[int]:
        """Piece ids of ``text`` (no framing), in this tokenizer's text style.

        ``normalized``: ``SentencePieceProcessor.encode(normalize_caption(text))``.
        ``official``: the release's ``GLMChineseTokenizer.tokenize`` + ``convert_tokens_to_ids``:
        the text is cut at the literal special tokens (kept as their ids, whitespace around them
        dropped), every other part has its space runs turned into ``<|blank_n|>`` pieces and is
        encoded by SentencePiece on its own.
        """
        if self._text_style == "normalized":
            return self._sp.encode(normalize_caption(text))
        ids: List[int] = []
        pos, parts = 0, []
        for m in self._no_split_re.finditer(text) if self._no_split_re.pattern else ():
            parts += [text[pos:m.start()], m.group()]
            pos = m.end()
        parts.append(text[pos:])
        # parts alternate: text, special, text, ..., text. As transformers' slow tokenizers do
        # for special tokens given as plain strings, strip the whitespace next to each special.
        for i in range(1, len(parts), 2):
            parts[i - 1] = parts[i - 1].rstrip()
            parts[i + 1] = parts[i + 1].lstrip()
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(self._specials[part])
            elif part:
                ids.extend(self._sp.encode(encode_whitespaces(part)))
        return ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """:meth:`encode` for many texts at once."""
        if self._text_style == "normalized":
            return self._sp.encode([normalize_caption(t) for t in texts])
        return [self.encode(t) for t in texts]

    def _truncate(self, pieces: Sequence[int], keep: int) -> Sequence[int]:
        """``keep`` pieces of an over-long caption: the first ones (normalized style) or the
        last ones (official style, the release's ``truncation_side="left"``)."""
        if len(pieces) <= keep:
            return pieces
        return pieces[len(pieces) - keep:] if self._text_style == "official" else pieces[:keep]

    def frame(self, piece_ids: Sequence[int], max_length: Optional[int] = None) -> List[int]:
        """``[CLS] + pieces + <|endoftext|>`` with the pieces truncated to fit (which end is kept
        depends on the text style); no padding."""
        length = self._max_length if max_length is None else self._check_length(max_length)
        pieces = [int(i) for i in self._truncate(piece_ids, length - 2)]
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
        :meth:`frame` truncates (per text style), keeping ``[CLS]`` and the final
        ``<|endoftext|>``.

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
                seq = np.concatenate([seq[:1], self._truncate(seq[1:-1], length - 2), seq[-1:]])
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
            "text_style": self._text_style,
        }

    def __repr__(self) -> str:
        return (f"M2Tokenizer({self._model_path!r}, vocab_size={self.vocab_size}, "
                f"max_length={self._max_length}, cls_id={self.cls_id}, eos_id={self.eos_id}, "
                f"text_style={self._text_style!r})")


def default_text_style(sp: spm.SentencePieceProcessor) -> str:
    """``"official"`` for the release's GLM SentencePiece model (it has every ``<|blank_n|>``
    piece the release's whitespace encoding needs), ``"normalized"`` for any other model."""
    def has(piece: str) -> bool:
        return sp.id_to_piece(sp.piece_to_id(piece)) == piece

    return "official" if all(has(p) for p in BLANK_PIECES) else "normalized"


# --------------------------------------------------------------------------------------------
# Corpus reading


def read_caption_file(path: PathLike, reader=None) -> Iterator[str]:
    """Normalised, non-empty caption texts of a corpus file.

    Every layout preprocessing reads (JSONL manifests, webdataset shards, Chinese-CLIP, CSV;
    :func:`megatron_m2.data.records.iter_captions`, with ``reader`` its
    :class:`~megatron_m2.data.records.ReaderOptions`) gives the captions preprocessing would
    read from it (image data is not read); any other file (e.g. ``.txt``) is plain text with one
    caption per line. Records that preprocessing would reject for their structure are skipped.

    Raises:
        megatron_m2.data.records.InputError: a table without the caption column, and the like.
    """
    from .records import InputError, ReaderOptions, detect_format, iter_captions

    path = str(path)
    reader = reader or ReaderOptions()
    try:
        detect_format(path, reader)
        texts: Iterable[str] = (text for _, text in iter_captions(path, reader))
    except InputError:
        if reader.input_format != "auto":
            raise
        texts = _plain_lines(path)  # not a record layout: one caption per line
    for text in texts:
        text = normalize_caption(text)
        if text:
            yield text


def _plain_lines(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        yield from f


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


_HAN = re.compile(r"([\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f])")
"""One Han character (CJK Unified Ideographs, Extension A, compatibility, Extensions B-H)."""


def train_tokenizer(texts_or_files: Iterable[Union[str, os.PathLike]], model_prefix: PathLike,
                    vocab_size: int, *, max_sentences: Optional[int] = None,
                    model_type: str = "unigram", character_coverage: float = 0.9995,
                    seed: int = 0, han_as_characters: bool = False,
                    extra_options: Optional[dict] = None) -> str:
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
        han_as_characters: no piece joins a Han (Chinese) character to anything else, so Chinese
            is encoded one character per token, while other scripts get learned pieces as usual.
            Without it a small vocabulary on templated captions learns pieces such as
            ``箭头的图`` (a name's characters fused with a template's), which an unseen name
            made of known characters then shares nothing with. Training-time only (the training
            sentences get whitespace around each Han character, which pieces never span): the
            model encodes any text without preparation.
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
    if han_as_characters:  # whitespace around every Han character: no piece spans one
        sentences = [_HAN.sub(r" \1 ", t) for t in sentences]

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
