"""``m2-eval``: retrieval, zero-shot classification and the counting/relations probe of a
trained M2-Encoder.

Examples::

    # image<->text retrieval on an indexed dataset, English and Chinese captions
    m2-eval --load runs/demo --task retrieval --data data/emoji_demo/validation --json

    # ... with a picture of the top-5 images of 4 caption queries per language
    m2-eval --load runs/demo --task retrieval --data data/emoji_demo/test \\
        --retrieval-examples retrieval.png --retrieval-examples-queries 4 --seed 0

    # zero-shot classification on Fashion-MNIST (Debian dataset-fashion-mnist), both languages
    m2-eval --load runs/demo --task zeroshot --fashion-mnist

    # zero-shot on an image folder (one sub-folder per class) with class-name files
    m2-eval --load model.safetensors --task zeroshot --image-folder photos/ \\
        --classnames en=names_en.txt zh=names_zh.txt

    # retrieval results as LAION clip_benchmark files, one per language, in results/
    m2-eval --load runs/demo --task retrieval --data data/emoji_demo/test \\
        --format clip_benchmark --output results/

    # fine-grained probe (counting, left/right/above/below) drawn from the bundled emoji
    m2-eval --load runs/demo --task probe --data data/emoji_demo/test --probe-items 200

One process by default; under ``torchrun`` every rank embeds a shard of the images (and of
their captions) and the figures are computed jointly (``retrieval_metrics`` and
``zero_shot_accuracy`` are collectives over the world). ``--json`` prints one JSON object on
stdout (rank 0) instead of the table. Retrieval on a dataset with English and Chinese captions
also reports their cross-lingual agreement (``cross_lingual`` in the JSON object);
``--retrieval-examples`` is drawn by rank 0.

``--format clip_benchmark`` makes ``--json`` and ``--output`` write LAION clip_benchmark's
result objects instead (retrieval and zero-shot): one per language, metrics as fractions,
``--json`` one per line, ``--output`` one file each (a directory: clip_benchmark's file names;
see :mod:`megatron_m2.eval.clip_benchmark`).

Text is tokenized in the text style recorded with the checkpoint's tokenizer (the release's exact
tokenisation for converted official models; ``--text-style`` overrides). Retrieval checks the
dataset's card (``PREFIX.meta.json``): made with the model's tokenizer, text style and text
length, and holding captions in every ``--lang`` asked for (default: the languages it has);
``--allow-dataset-mismatch`` evaluates anyway.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

from ..data.indexed import DatasetError
from ..errors import UserError
from .common import ArgumentParser, add_model_arguments, init_world, load_encoder, run_cli

logger = logging.getLogger("m2-eval")

PROG = "m2-eval"

DEFAULT_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def build_parser() -> argparse.ArgumentParser:

    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                       epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    g = add_model_arguments(p, "use")
    g.add_argument("--batch-size", type=int, default=64, help="items per forward pass")

    g = p.add_argument_group("task")
    g.add_argument("--task", required=True, choices=["retrieval", "zeroshot", "probe"])
    g.add_argument("--lang", nargs="+", default=None,
                   help="caption / class-name languages to evaluate (default: retrieval, the "
                        "dataset's languages; zero-shot and probe, en zh)")
    g.add_argument("--max-samples", type=int, default=0,
                   help="evaluate at most this many images (0: all); probe: draw the emoji "
                        "from the first this many samples")

    g = p.add_argument_group("retrieval")
    g.add_argument("--data", default=None,
                   help="indexed dataset prefix (every caption of an image in the language "
                        "counts as a match)")
    g.add_argument("--chunk-size", type=int, default=4096,
                   help="similarity block size (bounds memory)")
    g.add_argument("--allow-dataset-mismatch", action="store_true",
                   help="evaluate on a dataset whose card names another tokenizer, text style "
                        "or text length than the model's (a warning instead of an error)")
    g.add_argument("--retrieval-examples", default=None, metavar="PNG",
                   help="also draw a picture of text->image retrieval: per language, the top-5 "
                        "images of a few caption queries (the same samples in every language, "
                        "drawn with --seed), the query's own image framed in green")
    g.add_argument("--retrieval-examples-queries", type=int, default=4, metavar="N",
                   help="queries per language in --retrieval-examples")
    g.add_argument("--font", default=None,
                   help="font file for --retrieval-examples (default: the first CJK font found, "
                        "else the bundled subset that covers the demo set's captions)")

    g = p.add_argument_group("probe (counting and spatial relations, --data an emoji dataset "
                             "made by tools/make_demo_dataset.py)")
    g.add_argument("--probe-items", type=int, default=200,
                   help="items per probe kind (counting, relations)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed the probe images (and the --retrieval-examples queries) are drawn "
                        "from")
    g.add_argument("--probe-canvas", type=int, default=224,
                   help="probe image side in pixels (the model's transform resizes it)")

    g = p.add_argument_group("zero-shot classification")
    g.add_argument("--fashion-mnist", nargs="?", const=DEFAULT_FASHION_MNIST, default=None,
                   metavar="DIR", help="Fashion-MNIST IDX files (without DIR: "
                                       f"{DEFAULT_FASHION_MNIST}, Debian's dataset-fashion-mnist)")
    g.add_argument("--fashion-mnist-split", default="test", choices=["train", "test"])
    g.add_argument("--image-folder", default=None,
                   help="one sub-folder per class (class order: sorted folder names)")
    g.add_argument("--classnames", nargs="+", default=None, metavar="LANG=FILE",
                   help="class-name file per language (JSON list or one name per line), in "
                        "the class order")
    g.add_argument("--templates", default="default",
                   help="'default' (80 prompt templates per language), 'none' (the bare class "
                        "name) or a file of templates with {c}")

    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    g.add_argument("--output", default=None,
                   help="also write the JSON object to this file (--format clip_benchmark: "
                        "one file per language: a directory gets clip_benchmark's file names, "
                        "a template names them with {dataset} {pretrained} {model} {language} "
                        "{task}, a file name gets _LANG before its extension when there are "
                        "several languages)")
    g.add_argument("--format", default="m2", choices=["m2", "clip_benchmark"],
                   help="JSON of --json and --output: m2 (one object, every language, "
                        "percent) or clip_benchmark (LAION clip_benchmark's result object per "
                        "language, fractions; retrieval and zero-shot)")
    g.add_argument("--dataset-name", default=None, metavar="NAME",
                   help="--format clip_benchmark: the records' dataset name (default: the "
                        "basename of --data or --image-folder; fashion_mnist)")
    g.add_argument("--pretrained-name", default=None, metavar="NAME",
                   help="--format clip_benchmark: the records' pretrained name (default: the "
                        "basename of --load)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _validate(args) -> Optional[str]:
    if args.batch_size < 1:
        return f"--batch-size must be >= 1, got {args.batch_size}"
    if args.max_samples < 0:
        return f"--max-samples must be >= 0, got {args.max_samples}"
    if args.task in ("retrieval", "probe") and not args.data:
        return f"--task {args.task} needs --data PREFIX (an indexed dataset)"
    if args.retrieval_examples and args.task != "retrieval":
        return "--retrieval-examples goes with --task retrieval"
    if args.retrieval_examples_queries < 1:
        return (f"--retrieval-examples-queries must be >= 1, got "
                f"{args.retrieval_examples_queries}")
    if args.task == "probe" and args.probe_items < 1:
        return f"--probe-items must be >= 1, got {args.probe_items}"
    if args.task == "zeroshot":
        sources = [s for s in (args.fashion_mnist, args.image_folder) if s]
        if len(sources) != 1:
            return "--task zeroshot needs exactly one of --fashion-mnist [DIR], --image-folder DIR"
        if args.image_folder and not args.classnames:
            return "--image-folder needs --classnames LANG=FILE [LANG=FILE ...]"
    if (args.dataset_name or args.pretrained_name) and args.format != "clip_benchmark":
        return ("--dataset-name and --pretrained-name name clip_benchmark records: add "
                "--format clip_benchmark")
    if args.format == "clip_benchmark":
        from ..eval.clip_benchmark import TASKS, check_output

        if args.task not in TASKS:
            return (f"--format clip_benchmark covers --task {' and '.join(TASKS)}, not "
                    f"--task {args.task}")
        if args.output:
            error = check_output(args.output)
            if error:
                return error
    if args.classnames:
        for item in args.classnames:
            if "=" not in item:
                return f"--classnames {item!r}: expected LANG=FILE"
    return None


def _check_inputs(args) -> None:
    """What can be checked before the model is loaded: the files named exist and the dataset
    is valid and not empty (one line each, naming the file)."""
    from ..data.indexed import read_index

    if not os.path.exists(args.load):
        raise FileNotFoundError(f"--load {args.load}: no such checkpoint directory or file")
    if args.data:
        if read_index(args.data, full=False).num_samples == 0:
            raise DatasetError(f"--data {args.data}: {args.data}.idx holds no samples")
    for path in [args.image_folder, args.font] + [i.split("=", 1)[1]
                                                  for i in args.classnames or []]:
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file or directory")


# -- retrieval ----------------------------------------------------------------------------------
def run_retrieval(enc, args, rank: int, world: int, group):
    """R@1/5/10 both ways and mean recall per language on ``args.data``, the cross-lingual
    agreement and the example queries of ``--retrieval-examples``
    (:func:`megatron_m2.eval.tasks.retrieval_report`)."""
    from ..data.identity import check_datasets, tokenizer_identity
    from ..eval.tasks import retrieval_report

    enc._need_tokenizer()
    check_datasets([args.data], tokenizer_identity(enc.tokenizer), enc.cfg.max_text_len,
                   languages=args.lang or (), allow=args.allow_dataset_mismatch,
                   against=f"the model {args.load} (its tokenizer, text style "
                           f"{enc.tokenizer.text_style}, text length {enc.cfg.max_text_len})")
    return retrieval_report(enc, args.data, args.lang, max_samples=args.max_samples,
                            shard=(rank, world), group=group, batch_size=args.batch_size,
                            chunk_size=args.chunk_size,
                            progress=rank == 0 and not args.no_progress,
                            example_queries=args.retrieval_examples_queries
                            if args.retrieval_examples else 0, seed=args.seed)


def draw_retrieval_examples(enc, args, report) -> Optional[dict]:
    """Rank 0's ``--retrieval-examples`` picture (:mod:`megatron_m2.eval.retrieval_examples`);
    None when no language has a query."""
    from ..eval.retrieval_examples import render_retrieval_examples

    if not any(report.examples.values()):
        logger.warning("--retrieval-examples: no caption queries to draw")
        return None
    counts = sorted({len(q) for q in report.examples.values()})
    title = (f"{os.path.basename(args.data)}: text-to-image top-5 of {'/'.join(map(str, counts))} "
             f"caption quer{'y' if counts == [1] else 'ies'} per language (seed {args.seed}), "
             f"{args.head} head of {os.path.basename(os.path.normpath(args.load))}")
    return render_retrieval_examples(args.data, report.examples, args.retrieval_examples,
                                     tokenizer=enc.tokenizer, font_path=args.font, title=title)


# -- zero-shot ----------------------------------------------------------------------------------
def _classnames(args) -> Dict[str, List[str]]:
    from ..eval import zeroshot

    if args.classnames:
        files = dict(item.split("=", 1) for item in args.classnames)
        missing = [lang for lang in args.lang if lang not in files]
        if missing:
            raise UsageError(f"no --classnames file for language(s) {', '.join(missing)}")
        return {lang: zeroshot.load_classnames(files[lang], lang) for lang in args.lang}
    return {lang: zeroshot.load_classnames("fashion_mnist", lang) for lang in args.lang}


def _templates(args, lang: str) -> List[str]:
    from ..eval import zeroshot

    if args.templates == "default":
        return zeroshot.load_templates(lang)
    if args.templates == "none":
        return ["{c}"]
    return zeroshot.load_templates(lang, path=args.templates)


def run_zeroshot(enc, args, rank: int, world: int, group) -> Dict[str, Dict[str, float]]:
    """Top-1/top-5 accuracy per language of prompt-ensembled class embeddings
    (:func:`megatron_m2.eval.tasks.evaluate_zero_shot_dataset`)."""
    from ..eval import datasets as eval_datasets
    from ..eval.tasks import evaluate_zero_shot_dataset

    if args.fashion_mnist:
        data = eval_datasets.FashionMNIST(args.fashion_mnist, split=args.fashion_mnist_split,
                                          limit=args.max_samples or None)
    else:
        data = eval_datasets.ImageFolder(args.image_folder, limit=args.max_samples or None)
    names = _classnames(args)
    n_classes = {len(v) for v in names.values()}
    if n_classes != {data.num_classes}:
        raise UsageError(f"the dataset has {data.num_classes} classes but the class-name lists "
                         f"have {', '.join(map(str, sorted(n_classes)))}")
    templates = {lang: _templates(args, lang) for lang in args.lang}
    return evaluate_zero_shot_dataset(enc, data, names, templates, shard=(rank, world),
                                      group=group, batch_size=args.batch_size,
                                      chunk_size=args.chunk_size,
                                      progress=rank == 0 and not args.no_progress,
                                      per_class=args.format == "clip_benchmark")


def clip_benchmark_records(enc, args, results) -> List[dict]:
    """``results`` as clip_benchmark result objects, one per language
    (:func:`megatron_m2.eval.clip_benchmark.make_records`)."""
    from ..eval import clip_benchmark

    if args.dataset_name:
        dataset = args.dataset_name
    elif args.task == "retrieval":
        dataset = clip_benchmark.dataset_name(args.data)
    elif args.fashion_mnist:
        dataset = "fashion_mnist"
    else:
        dataset = clip_benchmark.dataset_name(args.image_folder)
    return clip_benchmark.make_records(args.task, results, dataset=dataset,
                                       model=clip_benchmark.model_name(enc.cfg),
                                       pretrained=(args.pretrained_name or
                                                   clip_benchmark.pretrained_name(args.load)))


# -- probe --------------------------------------------------------------------------------------
def run_probe(enc, args, rank: int, world: int, group) -> Dict[str, Dict[str, dict]]:
    """Counting and relations accuracy per language on probe images drawn from the emoji of
    ``args.data`` (:mod:`megatron_m2.eval.probe`); captions are decoded with the model's
    tokenizer, so the dataset must have been made with it."""
    from ..data.identity import check_datasets, tokenizer_identity
    from ..eval.probe import build_probe, evaluate_probe

    enc._need_tokenizer()
    langs = args.lang or ["en", "zh"]
    check_datasets([args.data], tokenizer_identity(enc.tokenizer), languages=langs,
                   allow=args.allow_dataset_mismatch,
                   against=f"the model {args.load} (its tokenizer decodes the probe's names)")
    try:
        probe = build_probe(args.data, enc.tokenizer, items=args.probe_items, seed=args.seed,
                            canvas_size=args.probe_canvas, languages=langs,
                            max_samples=args.max_samples)
    except ValueError as e:
        raise UsageError(str(e)) from None
    logger.info("probe: %d emoji, %s items per kind, seed %d%s", len(probe.emoji),
                args.probe_items, args.seed,
                "".join(f", {v} {k}" for k, v in probe.skipped.items() if v))
    return evaluate_probe(enc, probe, shard=(rank, world), group=group,
                          batch_size=args.batch_size,
                          progress=rank == 0 and not args.no_progress)


def _probe_table(results: Dict[str, Dict[str, dict]]) -> str:
    kinds = list(results)
    langs = list(dict.fromkeys(lang for m in results.values() for lang in m))
    lines = ["        " + "".join(f"{k:>11}" for k in kinds)]
    for lang in langs:
        lines.append(f"{lang:<8}" + "".join(f"{results[k][lang]['accuracy']:11.2f}"
                                            for k in kinds))
    first = {k: next(iter(results[k].values())) for k in kinds}
    lines.append("chance  " + "".join(f"{first[k]['chance']:11.2f}" for k in kinds))
    lines.append("items   " + "".join(f"{first[k]['items']:11d}" for k in kinds))
    return "\n".join(lines)


def _table(results: Dict[str, Dict[str, float]], task: str) -> str:
    from ..eval.retrieval import format_table

    if task == "probe":
        return _probe_table(results)
    if task == "retrieval":
        from ..eval.retrieval import chance_recall

        rows = {lang: {k: v for k, v in m.items() if k not in ("images", "captions")}
                for lang, m in results.items()}
        sizes = {(m.get("images"), m.get("captions")) for m in results.values()}
        if len(sizes) == 1:
            images, captions = sizes.pop()
            if images and images == captions:  # one caption per image: R@k of chance is k / N
                rows["chance"] = chance_recall(images)
                return (format_table(rows) + "\nmean recall / chance: " + ", ".join(
                    f"{lang} {m['mean_recall'] / rows['chance']['mean_recall']:.1f}x"
                    for lang, m in results.items()))
        return format_table(rows)
    keys = sorted({k for m in results.values() for k in m if k.startswith("top")},
                  key=lambda k: int(k[3:]))
    lines = ["      " + "".join(f"{k:>9}" for k in keys) + "   images  templates"]
    for lang, m in results.items():
        lines.append(f"{lang:<6}" + "".join(f"{m[k]:9.2f}" for k in keys)
                     + f"{m['images']:9d}{m['templates']:11d}")
    return "\n".join(lines)


class UsageError(UserError, ValueError):
    """Options that do not fit the data (class names, languages)."""


def _main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    error = _validate(args)
    if error:
        parser.error(error)
    if args.task == "zeroshot" and args.lang is None:
        args.lang = ["en", "zh"]
    _check_inputs(args)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    if args.format != "m2" and not (args.json or args.output):
        logger.warning("--format %s applies to --json and --output; without either, the "
                       "table is printed as usual", args.format)
    import warnings

    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed")


    rank, world, group = init_world()
    t0 = time.perf_counter()
    enc = load_encoder(args, args.batch_size)
    report = None
    if args.task == "retrieval":
        report = run_retrieval(enc, args, rank, world, group)
        results = report.results
    else:
        results = {"zeroshot": run_zeroshot, "probe": run_probe}[args.task](enc, args, rank,
                                                                          world, group)
    record = {"task": args.task, "load": args.load, "head": args.head,
              "data": args.data or args.fashion_mnist or args.image_folder,
              "world_size": world, "seconds": round(time.perf_counter() - t0, 2),
              "results": results}
    if report is not None and report.cross_lingual is not None:
        record["cross_lingual"] = report.cross_lingual
    if report is not None and args.retrieval_examples and rank == 0:
        record["retrieval_examples"] = draw_retrieval_examples(enc, args, report)
    if args.task == "probe":
        record["probe"] = {"items": args.probe_items, "seed": args.seed,
                           "canvas": args.probe_canvas}
    records = (clip_benchmark_records(enc, args, results) if args.format == "clip_benchmark"
               else None)
    if rank == 0:
        if args.json and records is not None:
            from ..eval.clip_benchmark import dumps

            sys.stdout.write("".join(dumps(r) + "\n" for r in records))
        elif args.json:
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            unit = "%" if args.task == "retrieval" else "% accuracy"
            if args.task == "probe":
                unit = "% accuracy, chance = 1/candidates"
            sys.stdout.write(f"{args.task} on {record['data']} ({args.head} head, {unit}):\n"
                             f"{_table(results, args.task)}\n")
            if "cross_lingual" in record:
                from ..eval.retrieval import format_cross_lingual

                sys.stdout.write(f"\n{format_cross_lingual(record['cross_lingual'])}\n")
            if record.get("retrieval_examples"):
                pic = record["retrieval_examples"]
                sys.stdout.write(f"\nretrieval examples: {pic['path']} ({pic['width']}x"
                                 f"{pic['height']} px)\n")
        if args.output and records is not None:
            from ..eval.clip_benchmark import write_records

            paths = write_records(args.output, records, load=args.load)
            logger.info("clip_benchmark results: %s", ", ".join(paths))
        elif args.output:
            with open(args.output, "w") as f:
                json.dump(record, f, ensure_ascii=False, indent=1)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``m2-eval``."""
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
