"""``m2-train-tokenizer`` / ``tools/train_tokenizer.py``: a bilingual SentencePiece tokenizer with
the official M2-Encoder special pieces.

Examples::

    m2-train-tokenizer --input captions.jsonl extra_zh.txt --model-prefix out/m2_sp \\
        --vocab-size 32000 --max-sentences 2000000
    m2-train-tokenizer --input 'shards/{000..099}.tar' train_imgs.tsv train.csv ...

Inputs are read by the same reader as ``m2-preprocess`` (JSONL manifests, webdataset /
img2dataset shards, Chinese-CLIP, OpenCLIP CSV; the same ``--input-format`` / ``--csv-*`` /
``--texts`` flags) without reading image data; any other file (``.txt``) holds one caption per
line. Every caption is normalised with ``normalize_caption`` (the ``normalized`` text style, the
default of trained tokenizers). The model has the pieces ``<|endoftext|>``, ``[SEP]``, ``[CLS]``,
``[MASK]``, ``[UNK]`` and byte fallback; load it with ``megatron_m2.data.tokenizer.M2Tokenizer``.

Prints a one-line JSON summary: ``{"model": ..., "vocab_size": ..., "sentences": ...}``.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import List, Optional

from .common import ArgumentParser, run_cli

__all__ = ["main", "build_parser"]

PROG = "m2-train-tokenizer"


def build_parser() -> ArgumentParser:
    from ..data.records import INPUT_FORMATS

    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                       epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--input", nargs="+", required=True,
                   help="caption sources: any m2-preprocess input, or text files (one caption "
                        "per line)")
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, required=True,
                   help="target vocabulary size (soft limit for small corpora)")
    p.add_argument("--max-sentences", type=int, default=None,
                   help="train on a seeded random sample of at most this many captions")
    p.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"])
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--han-as-characters", action="store_true",
                   help="encode Chinese one character per token: no learned piece joins a Han "
                        "character to anything else (other scripts get pieces as usual)")
    g = p.add_argument_group("reading inputs (as m2-preprocess)")
    g.add_argument("--input-format", default="auto", choices=INPUT_FORMATS)
    g.add_argument("--texts", default=None, help="Chinese-CLIP captions JSONL")
    g.add_argument("--csv-img-key", default="filepath")
    g.add_argument("--csv-caption-key", nargs="+", default=["title"], metavar="[LANG=]COLUMN")
    g.add_argument("--csv-separator", default=None,
                   help="field separator (default: ',' for .csv, a tab for .tsv)")
    return p


def _main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from ..data.records import ReaderOptions, check_inputs, expand_inputs
    from ..data.tokenizer import M2Tokenizer, read_caption_file, train_tokenizer

    reader = ReaderOptions(input_format=args.input_format, texts=args.texts,
                           csv_img_key=args.csv_img_key, csv_caption_keys=args.csv_caption_key,
                           csv_separator=args.csv_separator)
    inputs = expand_inputs(args.input)
    check_inputs(inputs, reader, plain_text=True)
    # Read the corpus here (not inside train_tokenizer) so the summary can report its size.
    captions = [text for path in inputs for text in read_caption_file(path, reader)]
    model = train_tokenizer(captions, args.model_prefix, args.vocab_size,
                            max_sentences=args.max_sentences, model_type=args.model_type,
                            character_coverage=args.character_coverage, seed=args.seed,
                            han_as_characters=args.han_as_characters)
    tok = M2Tokenizer(model)
    sentences = len(captions) if args.max_sentences is None else min(len(captions),
                                                                        args.max_sentences)
    sys.stdout.write(json.dumps({"model": model, "vocab_size": tok.vocab_size,
                                 "sentences": sentences, "specials": tok.special_ids},
                                ensure_ascii=False) + "\n")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``m2-train-tokenizer``."""
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
