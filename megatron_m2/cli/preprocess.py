"""``m2-preprocess`` / ``tools/preprocess_data.py``: image–caption collections → indexed files.

Examples::

    m2-preprocess --input train.jsonl --output-prefix data/train \
        --tokenizer-model tok.model --workers 8 --reject-log data/train.rejects.jsonl
    m2-preprocess --input shards/{000..009}.tar ...          # webdataset shards
    m2-preprocess --input train_imgs.tsv --texts train_texts.jsonl ...   # Chinese-CLIP layout

The last line printed is a JSON summary ``{"records": N, "written": W, "rejected": R}`` with
N = W + R. An interrupted run resumes from its finished chunks when rerun with the same
arguments (``--no-resume`` starts over).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m2-preprocess", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("input and output")
    g.add_argument("--input", nargs="+", required=True,
                   help="JSONL manifests, webdataset .tar shards or a Chinese-CLIP .tsv")
    g.add_argument("--texts", default=None,
                   help="Chinese-CLIP captions JSONL (default: the .tsv path with .jsonl)")
    g.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    g.add_argument("--reject-log", default=None,
                   help="JSONL file with one line per rejected record (location, reason)")
    g.add_argument("--no-resume", action="store_true",
                   help="discard finished chunks of an interrupted run and start over")
    g = p.add_argument_group("processing")
    g.add_argument("--tokenizer-model", required=True, help="SentencePiece model")
    g.add_argument("--workers", type=int, default=1)
    g.add_argument("--chunk-size", type=int, default=1024, help="records per resumable chunk")
    g.add_argument("--max-image-size", type=int, default=512,
                   help="longer image side after re-encoding (pixels)")
    g.add_argument("--jpeg-quality", type=int, default=95)
    g.add_argument("--max-image-pixels", type=int, default=64_000_000,
                   help="reject larger decoded images (decompression bombs)")
    g.add_argument("--max-caption-chars", type=int, default=1000)
    g.add_argument("--default-lang", default="en", choices=["en", "zh", "other"],
                   help="language of captions that do not name one (webdataset txt)")
    return p


def _count_lines(paths: List[str]) -> Optional[int]:
    """Records to expect (for the ETA); None when a tar shard makes it unknown upfront."""
    total = 0
    for p in paths:
        if Path(p).suffix.lower() == ".tar":
            return None
        with open(p, "rb") as f:
            total += sum(1 for line in f if line.strip())
    return total


def main(argv: Optional[List[str]] = None) -> int:
    from tqdm import tqdm

    from ..data.preprocess import PreprocessConfig, preprocess

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    for path in args.input:
        if not Path(path).exists():
            sys.stderr.write(f"m2-preprocess: error: input {path} does not exist\n")
            return 2
    cfg = PreprocessConfig(
        tokenizer_model=args.tokenizer_model, max_image_size=args.max_image_size,
        jpeg_quality=args.jpeg_quality, max_image_pixels=args.max_image_pixels,
        max_caption_chars=args.max_caption_chars, default_lang=args.default_lang,
        workers=args.workers, chunk_size=args.chunk_size)
    total = _count_lines(args.input) if not any(
        p.endswith(".tsv") for p in args.input) else None
    bar = tqdm(total=total, unit="rec", desc="preprocess", dynamic_ncols=True,
               mininterval=1.0)
    seen = [0]

    def progress(done: int, rejected: int) -> None:
        bar.update(done - seen[0])
        seen[0] = done
        bar.set_postfix(rejected=rejected)

    summary = preprocess(args.input, args.output_prefix, cfg, reject_log=args.reject_log,
                         resume=not args.no_resume, texts=args.texts, progress=progress)
    bar.close()
    sys.stdout.write(json.dumps(summary.to_dict()) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
