#!/usr/bin/env python3
"""Train a bilingual SentencePiece tokenizer with the official M2-Encoder special pieces.

Inputs are plain text files (one caption per line) or JSONL manifests (``*.jsonl``/``*.ndjson``:
one record per line, captions taken from ``captions[i]["text"]``, ``caption_en`` and
``caption_zh``). Every caption is normalised with ``normalize_caption``. The model has the pieces
``<|endoftext|>``, ``[SEP]``, ``[CLS]``, ``[MASK]``, ``[UNK]`` and byte fallback; load it with
``megatron_m2.data.tokenizer.M2Tokenizer``.

Prints a one-line JSON summary: ``{"model": ..., "vocab_size": ..., "sentences": ...}``.

Example::

    python tools/train_tokenizer.py --input captions.jsonl extra_zh.txt \\
        --model-prefix out/m2_sp --vocab-size 32000 --max-sentences 2000000
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_m2.data.tokenizer import (  # noqa: E402
    M2Tokenizer,
    read_caption_file,
    train_tokenizer,
)


def main(argv=None) -> int:
    """Parse arguments, train, print the JSON summary."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, type=Path,
                   help="text files (one caption per line) and/or JSONL manifests")
    p.add_argument("--model-prefix", required=True,
                   help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, required=True,
                   help="target vocabulary size (soft limit for small corpora)")
    p.add_argument("--max-sentences", type=int, default=None,
                   help="train on a seeded random sample of at most this many captions")
    p.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"])
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)

    # Read the corpus here (not inside train_tokenizer) so the summary can report its size.
    captions = [text for path in args.input for text in read_caption_file(path)]
    model = train_tokenizer(captions, args.model_prefix, args.vocab_size,
                            max_sentences=args.max_sentences, model_type=args.model_type,
                            character_coverage=args.character_coverage, seed=args.seed)
    tok = M2Tokenizer(model)
    sentences = len(captions) if args.max_sentences is None else min(len(captions),
                                                                        args.max_sentences)
    print(json.dumps({"model": model, "vocab_size": tok.vocab_size, "sentences": sentences,
                      "specials": tok.special_ids}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
