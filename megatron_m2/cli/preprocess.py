"""``m2-preprocess`` / ``tools/preprocess_data.py``: image–caption collections → indexed files.

Examples::

    m2-preprocess --input train.jsonl --output-prefix data/train \\
        --tokenizer-model tok.model --workers 8 --reject-log data/train.rejects.jsonl
    m2-preprocess --input 'shards/{000000..000099}.tar' ...        # webdataset / img2dataset
    m2-preprocess --input 'pipe:aws s3 cp s3://bucket/shard-{0..9}.tar -' ...
    m2-preprocess --input train_imgs.tsv ...       # Chinese-CLIP, captions in train_texts.jsonl
    m2-preprocess --input train.csv --csv-img-key filepath --csv-caption-key title ...

Every input record is written or rejected with a reason (``--reject-log``). The last line printed
is a JSON summary ``{"records": N, "written": W, "rejected": R}`` with N = W + R. The run fails
(exit status 2, nothing written under the output prefix) when it writes nothing or rejects more
than ``--max-reject-fraction`` of the records. An interrupted run resumes from its finished
chunks when rerun with the same arguments (``--no-resume`` starts over).

Text style: the official release's GLM tokenizer gets the release's exact tokenisation
(``official``), any other tokenizer ``normalized`` (NFC, collapsed whitespace, keep the start of
over-long captions); ``--text-style`` overrides. The dataset card ``PREFIX.meta.json`` records
the tokenizer, the style and the text length, and training and evaluation check them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import List, Optional

from .common import ArgumentParser, run_cli

__all__ = ["main", "build_parser"]

PROG = "m2-preprocess"


def build_parser() -> argparse.ArgumentParser:
    from ..data.preprocess import DEFAULT_MAX_REJECT_FRACTION
    from ..data.records import INPUT_FORMATS
    from ..data.tokenizer import DEFAULT_MAX_LENGTH, TEXT_STYLES

    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                       epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    g = p.add_argument_group("input and output")
    g.add_argument("--input", nargs="+", required=True,
                   help="JSONL manifests, webdataset .tar/.tar.gz shards (brace patterns, "
                        "pipe: commands and URLs as the webdataset library reads them), "
                        "Chinese-CLIP .tsv files, OpenCLIP .csv/.tsv tables")
    g.add_argument("--input-format", default="auto", choices=INPUT_FORMATS,
                   help="layout of the inputs; auto: by extension (a .tsv whose header names "
                        "--csv-img-key is CSV, any other .tsv Chinese-CLIP)")
    g.add_argument("--texts", default=None,
                   help="Chinese-CLIP captions JSONL; without it X_imgs.tsv pairs with "
                        "X_texts.jsonl (Chinese-CLIP's naming)")
    g.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx and "
                                                          "the dataset card PREFIX.meta.json")
    g.add_argument("--reject-log", default=None,
                   help="JSONL file with one line per rejected record (location, reason)")
    g.add_argument("--max-reject-fraction", type=float, default=DEFAULT_MAX_REJECT_FRACTION,
                   help="fail (exit 2, no output) when more than this share of the records is "
                        "rejected; 1 never fails on rejects")
    g.add_argument("--no-resume", action="store_true",
                   help="discard finished chunks of an interrupted run and start over")
    g = p.add_argument_group("CSV / TSV tables (OpenCLIP's conventions)")
    g.add_argument("--csv-img-key", default="filepath",
                   help="column of the image path (relative to the table's folder, or absolute)")
    g.add_argument("--csv-caption-key", nargs="+", default=["title"], metavar="[LANG=]COLUMN",
                   help="caption column(s); LANG=COLUMN gives a column its language (en, zh), "
                        "a bare COLUMN has --default-lang")
    g.add_argument("--csv-separator", default=None,
                   help="field separator (default: ',' for .csv, a tab for .tsv)")
    g = p.add_argument_group("processing")
    g.add_argument("--tokenizer-model", required=True, help="SentencePiece model")
    g.add_argument("--text-style", default=None, choices=TEXT_STYLES,
                   help="tokenisation of raw text (default: official for the release's GLM "
                        "tokenizer, normalized for any other)")
    g.add_argument("--text-length", type=int, default=None,
                   help="cut captions to this many tokens when storing them (the official "
                        f"models read {DEFAULT_MAX_LENGTH}); recorded in the dataset card, and "
                        "models reading more are refused (default: store captions whole, any "
                        "model text length works)")
    g.add_argument("--workers", type=int, default=1)
    g.add_argument("--chunk-size", type=int, default=1024, help="records per resumable chunk")
    g.add_argument("--max-image-size", type=int, default=512,
                   help="longer image side after re-encoding (pixels)")
    g.add_argument("--jpeg-quality", type=int, default=95)
    g.add_argument("--max-image-pixels", type=int, default=64_000_000,
                   help="reject larger decoded images (decompression bombs)")
    g.add_argument("--max-caption-chars", type=int, default=1000)
    g.add_argument("--default-lang", default=None, choices=["en", "zh", "other"],
                   help="language of captions that do not name one (default: zh for "
                        "Chinese-CLIP input, en otherwise)")
    return p


def _validate(args: argparse.Namespace) -> Optional[str]:
    for flag, value, low in (("--workers", args.workers, 1), ("--chunk-size", args.chunk_size, 1),
                             ("--max-image-size", args.max_image_size, 1),
                             ("--max-image-pixels", args.max_image_pixels, 1),
                             ("--max-caption-chars", args.max_caption_chars, 1),
                             ("--text-length", args.text_length or 2, 2)):
        if value < low:
            return f"{flag} must be >= {low}, got {value}"
    if not 1 <= args.jpeg_quality <= 100:
        return f"--jpeg-quality must be between 1 and 100, got {args.jpeg_quality}"
    if not 0.0 <= args.max_reject_fraction <= 1.0:
        return f"--max-reject-fraction must be between 0 and 1, got {args.max_reject_fraction}"
    return None


def _count_records(paths: List[str], formats) -> Optional[int]:
    """Records to expect (for the ETA); None when a shard or table makes it unknown upfront."""
    total = 0
    for p in paths:
        if formats[p] != "jsonl":
            return None
        with open(p, "rb") as f:
            total += sum(1 for line in f if line.strip())
    return total


def _main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    error = _validate(args)
    if error:
        parser.error(error)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    from tqdm import tqdm

    from ..data.preprocess import PreprocessConfig, PreprocessError, preprocess
    from ..data.records import ReaderOptions, check_inputs, expand_inputs
    from ..data.tokenizer import M2Tokenizer

    reader = ReaderOptions(input_format=args.input_format, default_lang=args.default_lang,
                           texts=args.texts, csv_img_key=args.csv_img_key,
                           csv_caption_keys=args.csv_caption_key,
                           csv_separator=args.csv_separator)
    inputs = expand_inputs(args.input)
    formats = check_inputs(inputs, reader)
    M2Tokenizer(args.tokenizer_model)  # a bad tokenizer fails here, not in every worker
    cfg = PreprocessConfig(
        tokenizer_model=args.tokenizer_model, text_style=args.text_style,
        text_length=args.text_length, max_image_size=args.max_image_size,
        jpeg_quality=args.jpeg_quality, max_image_pixels=args.max_image_pixels,
        max_caption_chars=args.max_caption_chars, workers=args.workers,
        chunk_size=args.chunk_size, max_reject_fraction=args.max_reject_fraction)
    bar = tqdm(total=_count_records(inputs, formats), unit="rec", desc="preprocess",
               dynamic_ncols=True, mininterval=1.0)
    seen = [0]

    def progress(done: int, rejected: int) -> None:
        bar.update(done - seen[0])
        seen[0] = done
        bar.set_postfix(rejected=rejected)

    try:
        summary = preprocess(inputs, args.output_prefix, cfg, reject_log=args.reject_log,
                             resume=not args.no_resume, progress=progress, reader=reader)
    except PreprocessError as exc:
        bar.close()
        sys.stdout.write(json.dumps(exc.summary.to_dict()) + "\n")
        raise
    bar.close()
    sys.stdout.write(json.dumps(summary.to_dict()) + "\n")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``m2-preprocess``."""
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
