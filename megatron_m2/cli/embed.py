"""``m2-embed``: embed a corpus (an image folder, an indexed dataset or a text file) into an
embedding store for ``m2-serve``.

Examples::

    # every image under photos/ (recursive), with an exact FAISS index
    m2-embed --load model.safetensors --images photos/ --output stores/photos --index flat

    # the images of an indexed dataset (items carry each sample's first caption)
    m2-embed --load runs/demo --dataset data/emoji_demo/test --output stores/test-images

    # its Chinese captions, as stored (token ids)
    m2-embed --load runs/demo --dataset data/emoji_demo/test --field text --lang zh \\
        --output stores/test-zh

    # a text file, one caption a line (English or Chinese)
    m2-embed --load runs/demo --texts captions.txt --output stores/captions

    # several processes (or GPUs) share the chunks; rank 0 writes the store
    torchrun --nproc-per-node 2 -m megatron_m2.cli.embed --load runs/demo \\
        --images photos/ --output stores/photos

The work is done in chunks of --chunk-size items, each saved under OUTPUT/parts/ as soon as it
is embedded. Running the same command again after an interruption (Ctrl-C, a killed job)
embeds only the missing chunks; a different model, source, chunk size or dtype is refused
(--force starts over). When every chunk is there they are merged into the store
(store.json, embeddings.safetensors, items.jsonl, index.faiss with --index) and parts/ is
removed. Items that cannot be embedded (unreadable images, blank lines) are listed in
OUTPUT/rejects.jsonl with the reason. A summary is printed as one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Optional, Sequence

from .common import ArgumentParser, add_model_arguments, init_world, load_encoder, run_cli

logger = logging.getLogger("m2-embed")

PROG = "m2-embed"

COLLECTIVE_TIMEOUT_S = 6 * 3600.0
"""How long a rank waits for the others under torchrun (the ranks that finish their chunks
first wait for the slowest before rank 0 merges). torchrun stops every rank when one fails, so a
long wait never outlives a dead peer."""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                       epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    g = p.add_argument_group("source (exactly one)")
    g.add_argument("--images", default=None, metavar="DIR",
                   help="a folder of images, searched recursively (.jpg .jpeg .png .bmp .gif "
                        ".webp .tif .tiff); ids are the paths relative to DIR")
    g.add_argument("--dataset", default=None, metavar="PREFIX",
                   help="an indexed dataset (PREFIX.bin / PREFIX.idx); ids are sample numbers")
    g.add_argument("--texts", default=None, metavar="FILE",
                   help="a UTF-8 text file, one caption a line; ids are line numbers (from 1)")
    g.add_argument("--field", default="image", choices=["image", "text"],
                   help="with --dataset: embed its images, or its captions in --lang")
    g.add_argument("--lang", default=None, choices=["en", "zh"],
                   help="with --dataset --field text: the caption language")

    g = add_model_arguments(p, "store")
    g.add_argument("--batch-size", type=int, default=64, help="items per forward pass")

    g = p.add_argument_group("output")
    g.add_argument("--output", required=True, metavar="DIR",
                   help="the store directory (created; an unfinished job there is resumed)")
    g.add_argument("--chunk-size", type=int, default=1024,
                   help="items per part file: the unit of resumption and of the work shared "
                        "between ranks")
    g.add_argument("--index", default=None, choices=["flat", "hnsw", "ivf"],
                   help="also build a FAISS index: flat (exact), hnsw or ivf (approximate); "
                        "needs faiss-cpu")
    g.add_argument("--hnsw-m", type=int, default=None, metavar="M",
                   help="with --index hnsw: links per node (default: 32)")
    g.add_argument("--ivf-lists", type=int, default=None, metavar="N",
                   help="with --index ivf: number of lists (default: 4 sqrt(rows))")
    g.add_argument("--force", action="store_true",
                   help="discard what --output holds (an unfinished job or a store) and start "
                        "over")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _validate(args) -> Optional[str]:
    sources = [f for f in ("images", "dataset", "texts") if getattr(args, f)]
    if len(sources) != 1:
        return ("exactly one source is needed: --images DIR, --dataset PREFIX or --texts FILE"
                + (f" (got {', '.join('--' + s for s in sources)})" if sources else ""))
    if args.batch_size < 1:
        return f"--batch-size must be >= 1, got {args.batch_size}"
    if args.chunk_size < 1:
        return f"--chunk-size must be >= 1, got {args.chunk_size}"
    if not args.dataset and (args.field != "image" or args.lang):
        return "--field and --lang go with --dataset"
    if args.field == "text" and not args.lang:
        return "--field text needs --lang en or zh"
    if args.field == "image" and args.lang:
        return "--lang goes with --field text"
    if args.hnsw_m is not None and (args.index != "hnsw" or args.hnsw_m < 1):
        return "--hnsw-m needs --index hnsw and a value >= 1"
    if args.ivf_lists is not None and (args.index != "ivf" or args.ivf_lists < 1):
        return "--ivf-lists needs --index ivf and a value >= 1"
    return None


def _check_inputs(args) -> None:
    """What can be checked before the model is loaded (one line each, naming the path)."""
    from ..data.indexed import read_index
    from ..errors import UserError

    if not os.path.exists(args.load):
        raise FileNotFoundError(f"--load {args.load}: no such checkpoint directory or file")
    if args.images and not os.path.isdir(args.images):
        if os.path.exists(args.images):
            raise UserError(f"--images {args.images}: not a directory")
        raise FileNotFoundError(f"--images {args.images}: no such directory")
    if args.texts and not os.path.isfile(args.texts):
        if os.path.exists(args.texts):
            raise UserError(f"--texts {args.texts}: not a file (expected one caption a line)")
        raise FileNotFoundError(f"--texts {args.texts}: no such file")
    if args.dataset:
        read_index(args.dataset, full=False)
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UserError(f"--output {args.output}: exists and is not a directory")
    if args.index:
        try:
            import faiss  # noqa: F401
        except ImportError:
            raise UserError("--index needs FAISS: pip install faiss-cpu (or "
                             "megatron_m2[serve])") from None


def _source(args, tokenizer):
    from ..serving.embed import DatasetSource, ImageFolderSource, TextFileSource

    if args.images:
        return ImageFolderSource(args.images, exclude=args.output)
    if args.dataset:
        return DatasetSource(args.dataset, field=args.field, lang=args.lang, tokenizer=tokenizer)
    return TextFileSource(args.texts)


def _main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    error = _validate(args)
    if error:
        parser.error(error)
    _check_inputs(args)
    t0 = time.perf_counter()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed")

    from ..serving.embed import embed_corpus

    rank, world, group = init_world(COLLECTIVE_TIMEOUT_S)
    enc = load_encoder(args, args.batch_size)
    source = _source(args, enc.tokenizer)
    try:
        summary = embed_corpus(enc, source, args.output, load=args.load,
                               chunk_size=args.chunk_size, batch_size=args.batch_size,
                               dtype=args.dtype, index_type=args.index,
                               index_options={"hnsw_m": args.hnsw_m,
                                              "ivf_lists": args.ivf_lists},
                               force=args.force, progress=not args.no_progress, group=group)
    except KeyboardInterrupt:
        if rank == 0 and os.path.isdir(os.path.join(args.output, "parts")):
            logger.info("the finished chunks are kept in %s; run the same command again to "
                        "resume", os.path.join(args.output, "parts"))
        raise
    if rank == 0:
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        if summary["status"] == "complete":
            logger.info("%s is already a complete store of this model and source (%s %s "
                        "embeddings); nothing to do (--force rebuilds it)", args.output,
                        summary["embedded"], summary["kind"])
        elif summary["rejected"]:
            logger.info("%d of %d items rejected: see %s", summary["rejected"],
                        summary["total"], summary["rejects"])
        sys.stdout.write(json.dumps(summary, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``m2-embed``."""
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
