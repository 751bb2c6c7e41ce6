"""Command-line arguments of ``m2-pretrain``.

Flag names follow Megatron-LM where the concept exists (``--tensor-model-parallel-size``,
``--micro-batch-size``, ``--global-batch-size``, ``--lr``, ...). :func:`validate_args` checks
everything that can be checked from the arguments and the world size alone, so that a wrong
configuration fails identically on every rank *before* the first collective.
"""

from __future__ import annotations

import argparse
import os
from typing import Dict, List, Optional, Tuple

from ..config import ConfigError
from ..flavors import FLAVORS, get_flavor

__all__ = ["build_parser", "parse_args", "validate_args", "parse_data_path", "parse_split",
           "parse_randaugment", "recompute_options", "fp8_options", "have_transformer_engine",
           "scheduler_settings", "output_dirs"]


def parse_data_path(items: List[str]) -> List[Tuple[float, str]]:
    """``[PREFIX ...]`` or ``[W1 PREFIX1 W2 PREFIX2 ...]`` → ``[(weight, prefix)]``; every
    prefix must have its ``.bin`` and ``.idx``."""
    def is_number(x):
        try:
            float(x)
            return True
        except ValueError:
            return False

    if len(items) % 2 == 0 and all(is_number(w) for w in items[::2]):
        pairs = [(float(w), p) for w, p in zip(items[::2], items[1::2])]
    elif not any(is_number(x) for x in items):
        pairs = [(1.0, p) for p in items]
    else:
        raise ConfigError("--data-path takes 'PREFIX ...' or 'WEIGHT PREFIX WEIGHT PREFIX ...'")
    for w, prefix in pairs:
        if w < 0:
            raise ConfigError(f"--data-path weight {w} of {prefix} is negative")
        for ext in (".bin", ".idx"):
            if not os.path.exists(prefix + ext):
                raise ConfigError(f"--data-path {prefix}: {prefix + ext} does not exist")
    return pairs


def parse_split(split: str) -> List[float]:
    try:
        parts = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError:
        raise ConfigError(f"--split {split!r} is not a comma-separated list of numbers") from None
    if not 1 <= len(parts) <= 3 or any(x < 0 for x in parts) or parts[0] <= 0:
        raise ConfigError(f"--split {split!r}: up to three non-negative fractions, train > 0")
    return parts


def parse_randaugment(value: str) -> Optional[Tuple[int, int]]:
    if value.lower() == "none":
        return None
    try:
        n, m = (int(x) for x in value.split(","))
    except ValueError:
        raise ConfigError(f"--randaugment {value!r}: expected 'N,M' or 'none'") from None
    return n, m


def build_parser() -> argparse.ArgumentParser:
    from ..cli.common import ArgumentParser

    p = ArgumentParser(
        prog="m2-pretrain",
        description="Pretrain M2-Encoder with TP x PP x DP on megatron-core.")

    g = p.add_argument_group("model")
    g.add_argument("--flavor", default="tiny", choices=sorted(FLAVORS),
                   help="architecture preset (`python -m megatron_m2.flavors` describes them)")
    g.add_argument("--transformer-impl", default="local", choices=["local", "te"],
                   help="layer implementation: pure torch or Transformer Engine")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="override the flavor's vocabulary size (must match the tokenizer)")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard optimizer states over the data-parallel group")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0,
                   help="collective timeout: a dead rank ends the job instead of hanging it")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=8)
    g.add_argument("--global-batch-size", type=int, default=16)
    g.add_argument("--train-iters", type=int, default=100)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true",
                   help="BF16 mixed precision: bf16 weights, activations and gradients; fp32 "
                        "gradient reduction, main weights and AdamW states")

    g = p.add_argument_group("FP8 (Transformer Engine; with --bf16 --transformer-impl te)")
    g.add_argument("--fp8-format", default=None, choices=["e4m3", "hybrid"],
                   help="FP8 GEMMs in the transformer layers' linears: e4m3 everywhere, or "
                        "hybrid (e4m3 forward, e5m2 gradients). Embeddings and ITC heads stay "
                        "BF16 on purpose (small GEMMs; the contrastive logits are "
                        "precision-sensitive)")
    g.add_argument("--fp8-recipe", default="delayed",
                   choices=["delayed", "tensorwise", "blockwise", "mxfp8"],
                   help="scaling recipe (Hopper: delayed, tensorwise, blockwise; mxfp8 needs "
                        "Blackwell)")
    g.add_argument("--fp8-margin", type=int, default=0, help="scaling-factor margin (delayed)")
    g.add_argument("--fp8-amax-history-len", type=int, default=1,
                   help="amax history length (delayed)")
    g.add_argument("--fp8-amax-compute-algo", default="most_recent",
                   choices=["most_recent", "max"], help="amax from the history (delayed)")

    g = p.add_argument_group("activation recomputation")
    g.add_argument("--recompute-activations", action="store_true",
                   help="shorthand for --recompute-granularity full --recompute-method uniform "
                        "--recompute-num-layers 1 (every layer keeps only its input and is "
                        "re-run in the backward). Unlike Megatron-LM this is not 'selective': "
                        "megatron's selective recompute targets its own core attention, and "
                        "the M2 layer has its own block-diagonal attention")
    g.add_argument("--recompute-granularity", default=None, choices=["full"],
                   help="'full': recompute whole transformer layers in the backward. With "
                        "--itc-heads both the first VL layer must stay outside the recomputed "
                        "layers (its input feeds the backbone heads): use the block method")
    g.add_argument("--recompute-method", default=None, choices=["uniform", "block"],
                   help="uniform: checkpoint the input of every chunk of "
                        "--recompute-num-layers layers; block: recompute only the first "
                        "--recompute-num-layers layers of each pipeline stage")
    g.add_argument("--recompute-num-layers", type=int, default=None,
                   help="layers per recomputed chunk (uniform) or recomputed layers per "
                        "pipeline stage (block)")

    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-style", default="cosine",
                   choices=["constant", "linear", "cosine", "inverse-square-root"])
    g.add_argument("--lr-decay-iters", type=int, default=None,
                   help="steps of the LR decay (default: --train-iters)")
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.98)
    g.add_argument("--adam-eps", type=float, default=1e-6)
    g.add_argument("--clip-grad", type=float, default=1.0, help="0 disables clipping")

    g = p.add_argument_group("contrastive loss (GBA-ITC)")
    g.add_argument("--itc-heads", default="both", choices=["both", "vl"],
                   help="average the backbone and VL head losses, or VL head only")
    g.add_argument("--itc-group-size", type=int, default=None,
                   help="k: DP ranks per ITC group (-1: all, i.e. global ITC). Default: the DP "
                        "ranks of one node")
    g.add_argument("--itc-aggregate-nodes", type=int, default=None,
                   help="k in nodes (-1: all nodes), node-aligned; excludes --itc-group-size")
    g.add_argument("--itc-accumulate-features", action="store_true",
                   help="batch (feature) accumulation: one contrastive batch of k*M*b pairs "
                        "over the step's M micro-batches at one micro-batch's activation memory")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="indexed dataset prefixes, optionally weighted: 'PREFIX ...' or "
                        "'W1 PREFIX1 W2 PREFIX2 ...'")
    g.add_argument("--split", default="100,0,0",
                   help="train,valid,test fractions of every --data-path dataset")
    g.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece model of the captions (sets the vocabulary size)")
    g.add_argument("--caption-lang", default="balanced",
                   choices=["any", "en", "zh", "balanced"],
                   help="which caption of a sample to train on")
    g.add_argument("--randaugment", default="2,7",
                   help="RandAugment 'N,M' of the train transform, or 'none'")
    g.add_argument("--num-workers", type=int, default=2, help="data loader worker processes")
    g.add_argument("--skip-bad-samples", type=int, default=0, metavar="N",
                   help="replace a sample that cannot be read or decoded by the next good one, "
                        "counting them, at most N over the run (0: the first one stops the run, "
                        "naming it)")
    g.add_argument("--allow-dataset-mismatch", action="store_true",
                   help="train on datasets whose card (PREFIX.meta.json) names another "
                        "tokenizer, text style or text length than this run's (a warning "
                        "instead of an error)")
    g.add_argument("--synthetic", action="store_true",
                   help="train on a deterministic synthetic image-text set")
    g.add_argument("--synthetic-num-samples", type=int, default=None,
                   help="size of the synthetic set (default: one global batch, i.e. a fixed "
                        "batch to overfit)")

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="directory to save checkpoints to")
    g.add_argument("--save-interval", type=int, default=None,
                   help="save every N steps (and at the end of training)")
    g.add_argument("--load", default=None,
                   help="checkpoint directory (or save root with a tracker) to resume from; "
                        "may have been written with another TP/PP/DP layout")
    g.add_argument("--finetune", action="store_true",
                   help="start a new run from --load's weights: step 0, fresh optimizer, LR "
                        "schedule and data order, RNG states not restored")
    g.add_argument("--no-load-optim", action="store_true",
                   help="resume at --load's step with fresh AdamW states; the LR schedule "
                        "follows this command line at that step")
    g.add_argument("--no-load-rng", action="store_true", help="do not restore RNG states")
    g.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="resume or fine-tune --load with another --tokenizer-model than the one "
                        "it was trained with (its token embeddings then mean other pieces)")
    g.add_argument("--no-verify-checksums", action="store_true",
                   help="load --load without checking every tensor against the checksum "
                        "recorded when it was saved (faster; a corrupt file then goes unnoticed)")
    g.add_argument("--override-opt-param-scheduler", action="store_true",
                   help="on resume, take the LR/weight-decay schedule (--lr, --min-lr, "
                        "--lr-warmup-iters, --lr-decay-iters/--train-iters, --lr-decay-style, "
                        "--weight-decay) from this command line, continuing at the "
                        "checkpoint's step")
    g.add_argument("--use-checkpoint-opt-param-scheduler", action="store_true",
                   help="on resume, keep the checkpoint's schedule whatever this command line "
                        "says. Without either flag a schedule that differs from the "
                        "checkpoint's is an error")

    g = p.add_argument_group("evaluation")
    g.add_argument("--valid-data-path", default=None,
                   help="indexed dataset prefix for held-out retrieval evaluation")
    g.add_argument("--eval-interval", type=int, default=None,
                   help="evaluate every N steps (and at the end) when --valid-data-path is set")
    g.add_argument("--eval-max-samples", type=int, default=0,
                   help="evaluate on at most this many validation samples (0: all)")

    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--log-json", default=None, help="write one JSON line per step to this file")
    g.add_argument("--tensorboard-dir", default=None, help="write TensorBoard scalars here")
    g.add_argument("--loss-curve", default=None,
                   help="PNG of the loss (and eval) curves at the end (default: SAVE/"
                        "loss_curve.png when --save is set)")

    g = p.add_argument_group("ending a run early (Megatron-LM's flags; the run saves and exits 0)")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on --exit-signal (Slurm sends SIGTERM before a time limit or a "
                        "preemption), finish the step, save a checkpoint and exit 0 on every "
                        "rank")
    g.add_argument("--exit-signal", default="SIGTERM",
                   choices=["SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"],
                   help="the signal --exit-signal-handler acts on")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="stop (saving a checkpoint) once this process has trained this long")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="stop (saving a checkpoint) after a step divisible by this")

    g = p.add_argument_group("failure handling")
    g.add_argument("--on-nonfinite", default="stop", choices=["stop", "skip"],
                   help="a NaN/inf loss stops the run (no checkpoint is written) or skips the "
                        "step (no update)")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def scheduler_settings(args: argparse.Namespace) -> Dict[str, object]:
    """The LR / weight-decay schedule of the command line, exactly as megatron-core's
    ``OptimizerParamScheduler`` holds it (and saves it in a checkpoint's ``meta.json``)."""
    decay_iters = args.lr_decay_iters or args.train_iters
    return {"max_lr": float(args.lr), "min_lr": float(args.min_lr),
            "lr_warmup_steps": args.lr_warmup_iters,
            "lr_decay_steps": max(decay_iters, args.lr_warmup_iters + 1),
            "lr_decay_style": args.lr_decay_style, "start_wd": float(args.weight_decay),
            "end_wd": float(args.weight_decay), "wd_incr_steps": decay_iters,
            "wd_incr_style": "constant"}


_SCHEDULE_FLAGS = {"max_lr": "--lr", "min_lr": "--min-lr", "lr_warmup_steps": "--lr-warmup-iters",
                   "lr_decay_steps": "--lr-decay-iters/--train-iters",
                   "lr_decay_style": "--lr-decay-style", "start_wd": "--weight-decay",
                   "end_wd": "--weight-decay", "wd_incr_steps": "--lr-decay-iters/--train-iters",
                   "wd_incr_style": "weight-decay style"}


def output_dirs(args: argparse.Namespace) -> Dict[str, str]:
    """``{flag: directory}`` of every directory the run writes into."""
    dirs = {}
    if args.save:
        dirs["--save"] = args.save
    for flag, path in (("--log-json", args.log_json), ("--loss-curve", args.loss_curve)):
        if path:
            dirs[flag] = os.path.dirname(os.path.abspath(path))
    if args.tensorboard_dir:
        dirs["--tensorboard-dir"] = args.tensorboard_dir
    return dirs


def _prepare_output_dirs(args: argparse.Namespace) -> None:
    """Create the run's output folders and check that they take files, so that a first run
    into a fresh folder works and a read-only or mistyped one fails now, not at the first save
    after hours of training."""
    import tempfile

    for flag, d in output_dirs(args).items():
        if os.path.exists(d) and not os.path.isdir(d):
            raise ConfigError(f"{flag}: {d} exists and is not a directory")
        try:
            os.makedirs(d, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=d, prefix=".m2-write-test-"):
                pass
        except OSError as e:
            raise ConfigError(f"{flag}: cannot write into {d} ({e.strerror or e})") from None
    if args.log_json and os.path.isdir(args.log_json):
        raise ConfigError(f"--log-json {args.log_json} is a directory; give a file name")


def _validate_numbers(args: argparse.Namespace) -> None:
    import math

    for flag, value in (("--lr", args.lr), ("--min-lr", args.min_lr),
                        ("--weight-decay", args.weight_decay), ("--clip-grad", args.clip_grad),
                        ("--adam-eps", args.adam_eps)):
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{flag} must be a finite number >= 0, got {value}")
    if args.min_lr > args.lr:
        raise ConfigError(f"--min-lr ({args.min_lr}) is above --lr ({args.lr})")
    for flag, value in (("--adam-beta1", args.adam_beta1), ("--adam-beta2", args.adam_beta2)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{flag} must be in [0, 1), got {value}")
    for flag, value, low in (("--lr-warmup-iters", args.lr_warmup_iters, 0),
                             ("--num-workers", args.num_workers, 0),
                             ("--skip-bad-samples", args.skip_bad_samples, 0),
                             ("--log-interval", args.log_interval, 1),
                             ("--eval-max-samples", args.eval_max_samples, 0)):
        if value < low:
            raise ConfigError(f"{flag} must be >= {low}, got {value}")
    if args.lr_decay_iters is not None and args.lr_decay_iters < 1:
        raise ConfigError(f"--lr-decay-iters must be >= 1, got {args.lr_decay_iters}")
    if args.eval_interval is not None and args.eval_interval < 1:
        raise ConfigError(f"--eval-interval must be >= 1, got {args.eval_interval}")
    if args.exit_interval is not None and args.exit_interval < 1:
        raise ConfigError(f"--exit-interval must be >= 1, got {args.exit_interval}")
    if args.exit_duration_in_mins is not None and not args.exit_duration_in_mins > 0:
        raise ConfigError(f"--exit-duration-in-mins must be > 0, got "
                          f"{args.exit_duration_in_mins}")


def _validate_data(args: argparse.Namespace, cfg) -> None:
    """Datasets exist, are valid, hold samples (also after --split), and were made with this
    run's tokenizer and text length (their cards); the tokenizer loads."""
    from ..data.identity import check_datasets, tokenizer_identity
    from ..data.indexed import read_index, split_ranges
    from ..data.tokenizer import M2Tokenizer

    tokenizer = M2Tokenizer(args.tokenizer_model)
    identity = tokenizer_identity(tokenizer)
    identity.pop("text_style")  # the data's: it says how its captions were made
    train = [prefix for _, prefix in parse_data_path(args.data_path)] if args.data_path else []
    split = parse_split(args.split) if train else None
    # In full (linear in the index, vectorised; the data file is not read): pointers and lengths
    # inside the .bin, modes, every sample captions then one image. A bad index fails here,
    # naming the dataset, not in a loader worker when the bad sample comes up.
    for prefix in train:
        n = read_index(prefix, full=True).num_samples
        if n == 0:
            raise ConfigError(f"--data-path {prefix}: {prefix}.idx holds no samples")
        lo, hi = split_ranges(n, split)[0]
        if hi <= lo:
            raise ConfigError(f"--split {args.split} leaves no training sample of {prefix} "
                              f"({n} samples)")
    valid = [args.valid_data_path] if args.valid_data_path else []
    for prefix in valid:
        if read_index(prefix, full=True).num_samples == 0:
            raise ConfigError(f"--valid-data-path {prefix}: {prefix}.idx holds no samples")
    langs = [args.caption_lang] if args.caption_lang in ("en", "zh") else []
    against = f"this run (--tokenizer-model {args.tokenizer_model}, text length " \
              f"{cfg.max_text_len})"
    check_datasets(train + valid, identity, cfg.max_text_len, langs, against=against,
                   allow=args.allow_dataset_mismatch, languages_of=train)


def _validate_resumed_tokenizer(args: argparse.Namespace, directory: str, meta: Dict) -> None:
    """The checkpoint's token embeddings belong to its tokenizer: another one (even of the same
    vocabulary size) would silently give every id another meaning."""
    import hashlib

    if not args.tokenizer_model or args.allow_tokenizer_mismatch:
        return
    saved = (meta.get("tokenizer") or {}).get("sha256")
    saved_file = os.path.join(directory, "tokenizer.model")
    if saved is None and os.path.isfile(saved_file):
        with open(saved_file, "rb") as f:
            saved = hashlib.sha256(f.read()).hexdigest()
    if saved is None:
        return  # the checkpoint records no tokenizer (e.g. converted without one)
    with open(args.tokenizer_model, "rb") as f:
        mine = hashlib.sha256(f.read()).hexdigest()
    if mine != saved:
        raise ConfigError(
            f"--tokenizer-model {args.tokenizer_model} (sha256 {mine[:12]}…) is not the "
            f"tokenizer of the checkpoint {directory} (sha256 {saved[:12]}…; its copy is "
            f"{saved_file}): the token embeddings would take other ids. Use that tokenizer, or "
            "pass --allow-tokenizer-mismatch to train on anyway")


def _validate_save(args: argparse.Namespace) -> None:
    """A --save folder that already holds checkpoints is written into only by a run that
    resumes from it: a new run there would replace them (the first save of step N overwrites
    its iter_N, the tracker then names the new run's)."""
    from .checkpoint_meta import complete_iterations, holds_checkpoint

    if not args.save or not holds_checkpoint(args.save):
        return
    save = os.path.realpath(args.save)
    load = os.path.realpath(args.load) if args.load else None
    if load and (load == save or load.startswith(save + os.sep)):
        return
    steps = complete_iterations(args.save)
    newest = f" (newest: iter_{steps[-1]:07d})" if steps else ""
    raise ConfigError(f"--save {args.save} already holds checkpoints{newest}: resume from them "
                      f"with --load {args.save}, or save into another folder (this run would "
                      "overwrite them)")


def _validate_resume(args: argparse.Namespace, cfg) -> None:
    """``--load``: the checkpoint's model fits this run's, and its LR schedule is the command
    line's unless the flags say which one wins (Megatron-LM's rule)."""
    from .checkpoint_meta import check_tensor_file, holds_checkpoint, resolve_checkpoint

    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise ConfigError("--override-opt-param-scheduler and "
                          "--use-checkpoint-opt-param-scheduler exclude each other")
    if args.finetune and not args.load:
        raise ConfigError("--finetune needs --load (the checkpoint to start from)")
    if not args.load or not holds_checkpoint(args.load):
        return
    try:
        directory, meta = resolve_checkpoint(args.load)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--load {args.load}: {e}") from None
    # Every tensor file's framing now (cheap: headers only), so that a truncated or garbled
    # shard is named before start-up rather than after it.
    for fn in sorted(os.listdir(directory)):
        if fn.endswith(".safetensors"):
            check_tensor_file(os.path.join(directory, fn))
    saved = meta.get("model_config", {})
    wrong = [f"{k} {saved[k]} (this run: {getattr(cfg, k)})" for k in (
        "hidden_size", "num_attention_heads", "ffn_hidden_size", "num_sep_layers",
        "num_vl_layers", "embed_dim", "image_size", "patch_size", "max_text_len")
        if k in saved and saved[k] != getattr(cfg, k)]
    if wrong:
        raise ConfigError(f"--load {directory}: the checkpoint's model differs from --flavor "
                          f"{args.flavor}: {', '.join(wrong)}")
    _validate_resumed_tokenizer(args, directory, meta)
    if args.finetune or args.no_load_optim or "scheduler" not in meta or (
            args.override_opt_param_scheduler or args.use_checkpoint_opt_param_scheduler):
        return
    mine, theirs = scheduler_settings(args), meta["scheduler"]
    ignored = set()
    if mine["lr_decay_style"] == theirs.get("lr_decay_style") == "constant":
        ignored |= {"lr_decay_steps", "min_lr"}  # no decay: its length and floor do not matter
    if mine["wd_incr_style"] == theirs.get("wd_incr_style") == "constant":
        ignored.add("wd_incr_steps")
    diff = [f"{_SCHEDULE_FLAGS[k]}: checkpoint {theirs[k]}, now {v}"
            for k, v in mine.items() if k in theirs and k not in ignored and theirs[k] != v]
    if diff:
        raise ConfigError(
            f"--load {directory}: the LR schedule differs from the checkpoint's ("
            f"{'; '.join(dict.fromkeys(diff))}); pass --override-opt-param-scheduler to follow "
            f"this command line from step {meta.get('step')}, --use-checkpoint-opt-param-"
            f"scheduler to keep the checkpoint's, or --finetune to start a new run from its "
            f"weights")


def recompute_options(args: argparse.Namespace) -> Dict[str, object]:
    """The megatron ``TransformerConfig`` recompute fields the flags ask for (empty: none)."""
    if args.recompute_activations:
        return {"recompute_granularity": "full", "recompute_method": "uniform",
                "recompute_num_layers": 1}
    if args.recompute_granularity is None:
        return {}
    return {"recompute_granularity": args.recompute_granularity,
            "recompute_method": args.recompute_method,
            "recompute_num_layers": args.recompute_num_layers}


def _validate_recompute(args: argparse.Namespace, cfg, pp: int) -> None:
    explicit = [flag for flag, value in (
        ("--recompute-granularity", args.recompute_granularity),
        ("--recompute-method", args.recompute_method),
        ("--recompute-num-layers", args.recompute_num_layers)) if value is not None]
    if args.recompute_activations and explicit:
        raise ConfigError(f"--recompute-activations is a shorthand for full/uniform/1 "
                          f"recomputation; it excludes {', '.join(explicit)}")
    if args.recompute_granularity is None:
        if explicit:
            raise ConfigError(f"{', '.join(explicit)} needs --recompute-granularity full")
        if not args.recompute_activations:
            return
    elif args.recompute_method is None or args.recompute_num_layers is None:
        raise ConfigError("--recompute-granularity full needs --recompute-method (uniform or "
                          "block) and --recompute-num-layers")
    opts = recompute_options(args)
    method, n = opts["recompute_method"], opts["recompute_num_layers"]
    per_stage = cfg.num_layers // pp
    if not 1 <= n <= per_stage:
        raise ConfigError(f"--recompute-num-layers ({n}) must be between 1 and the layers per "
                          f"pipeline stage ({per_stage})")
    if method == "uniform" and per_stage % n:
        raise ConfigError(f"--recompute-method uniform: --recompute-num-layers ({n}) must "
                          f"divide the layers per pipeline stage ({per_stage})")


def have_transformer_engine() -> bool:
    """Whether Transformer Engine is importable (checked without importing it or torch)."""
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


FP8_ALIGN = {"delayed": 16, "tensorwise": 16, "blockwise": 16, "mxfp8": 32}
"""FP8 GEMMs need every GEMM dimension divisible by this (per recipe)."""


def fp8_options(args: argparse.Namespace) -> Dict[str, object]:
    """megatron ``TransformerConfig`` FP8 fields of the run (empty without ``--fp8-format``)."""
    if not getattr(args, "fp8_format", None):
        return {}
    return {"fp8": args.fp8_format, "fp8_recipe": args.fp8_recipe,
            "fp8_margin": args.fp8_margin, "fp8_amax_history_len": args.fp8_amax_history_len,
            "fp8_amax_compute_algo": args.fp8_amax_compute_algo}


def _validate_fp8(args: argparse.Namespace, cfg) -> None:
    """FP8 needs TE, the TE layer spec, BF16, and GEMM shapes FP8 kernels accept.

    Token counts: each branch's linears see ``s_part × micro_batch`` rows (vision part
    ``s_v = 1 + patches``, text part ``max_text_len``), which must be divisible by the recipe's
    alignment, as must the hidden, FFN and head widths; a micro-batch size that is a multiple
    of the alignment always works.
    """
    if not args.fp8_format:
        return
    if not have_transformer_engine():
        raise ConfigError("--fp8-format needs Transformer Engine, which is not installed; run "
                          "in the Docker image or train in BF16 (--bf16 without --fp8-format)")
    if args.transformer_impl != "te":
        raise ConfigError("--fp8-format needs --transformer-impl te (FP8 GEMMs are Transformer "
                          "Engine linears)")
    if not args.bf16:
        raise ConfigError("--fp8-format needs --bf16 (FP8 GEMMs inside BF16 mixed precision)")
    align = FP8_ALIGN[args.fp8_recipe]
    tp = args.tensor_model_parallel_size
    widths = {"hidden size": cfg.hidden_size, "FFN width / TP": cfg.ffn_hidden_size // tp,
              "hidden size / TP": cfg.hidden_size // tp}
    bad = [f"{k} {v}" for k, v in widths.items() if v % align]
    if bad:
        raise ConfigError(f"--fp8-recipe {args.fp8_recipe}: GEMM widths must be multiples of "
                          f"{align}: {', '.join(bad)}")
    mbs = args.micro_batch_size
    rows = {"vision": cfg.vision_seq_len * mbs, "text": cfg.max_text_len * mbs}
    bad = [f"{k} {n // mbs} tokens x {mbs} = {n}" for k, n in rows.items() if n % align]
    if bad:
        raise ConfigError(f"--fp8-format: each branch's GEMM rows must be a multiple of {align} "
                          f"({'; '.join(bad)}); use a --micro-batch-size that is a multiple "
                          f"of {align}")


def validate_args(args: argparse.Namespace, world_size: int) -> None:
    """Raise :class:`ConfigError` with one clear message if the run cannot work."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise ConfigError("--tensor-model-parallel-size and --pipeline-model-parallel-size "
                          "must be >= 1")
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by "
                          f"--tensor-model-parallel-size ({tp}) x "
                          f"--pipeline-model-parallel-size ({pp})")
    dp = world_size // (tp * pp)
    overrides = {"vocab_size": args.vocab_size} if args.vocab_size else {}
    cfg = get_flavor(args.flavor, **overrides)
    cfg.validate_parallel(tp, pp)
    mbs, gbs = args.micro_batch_size, args.global_batch_size
    if mbs < 1 or gbs < 1:
        raise ConfigError("--micro-batch-size and --global-batch-size must be >= 1")
    if gbs % (mbs * dp):
        raise ConfigError(f"--global-batch-size ({gbs}) must be divisible by "
                          f"--micro-batch-size ({mbs}) x data-parallel size ({dp})")
    if args.itc_group_size is not None and args.itc_aggregate_nodes is not None:
        raise ConfigError("--itc-group-size and --itc-aggregate-nodes are mutually exclusive")
    if args.itc_group_size is not None:
        k = dp if args.itc_group_size == -1 else args.itc_group_size
        if k < 1 or dp % k:
            raise ConfigError(f"--itc-group-size ({args.itc_group_size}) must divide the "
                              f"data-parallel size ({dp})")
    if args.save_interval is not None and args.save_interval < 1:
        raise ConfigError("--save-interval must be >= 1")
    if args.save_interval and not args.save:
        raise ConfigError("--save-interval needs --save")
    if args.load and not os.path.exists(args.load):
        raise ConfigError(f"--load {args.load} does not exist")
    if args.valid_data_path:
        if not args.tokenizer_model:
            raise ConfigError("--valid-data-path needs --tokenizer-model")
        for ext in (".bin", ".idx"):
            if not os.path.exists(args.valid_data_path + ext):
                raise ConfigError(f"--valid-data-path {args.valid_data_path}: "
                                  f"{args.valid_data_path + ext} does not exist")
    if args.train_iters < 1:
        raise ConfigError("--train-iters must be >= 1")
    _validate_numbers(args)
    if args.synthetic == bool(args.data_path):
        raise ConfigError("pass exactly one of --data-path and --synthetic")
    if args.data_path:
        parse_data_path(args.data_path)
        if not args.tokenizer_model:
            raise ConfigError("--data-path needs --tokenizer-model")
        parse_split(args.split)
        ra = parse_randaugment(args.randaugment)
        if ra is not None and not (ra[0] >= 0 and 0 <= ra[1] <= 30):
            raise ConfigError(f"--randaugment {args.randaugment}: N >= 0 operations of "
                              "magnitude M in 0..30")
    if args.tokenizer_model:
        if not os.path.exists(args.tokenizer_model):
            raise ConfigError(f"--tokenizer-model {args.tokenizer_model} does not exist")
        _validate_data(args, cfg)
    _validate_resume(args, cfg)
    if args.transformer_impl == "te" and not have_transformer_engine():
        raise ConfigError("--transformer-impl te needs Transformer Engine, which is not "
                          "installed; use --transformer-impl local (or run in the Docker image)")
    _validate_fp8(args, cfg)
    if pp > 1 and args.itc_heads == "both":
        per_stage = cfg.num_layers // pp
        if cfg.num_vl_layers > per_stage:
            raise ConfigError(
                f"--itc-heads both needs the backbone/VL boundary on the last pipeline stage, "
                f"but {pp} stages of {per_stage} layers put VL layers on earlier stages; "
                f"use fewer stages or --itc-heads vl")
    _validate_recompute(args, cfg, pp)
    _validate_save(args)
    _prepare_output_dirs(args)  # last: nothing is created for a run that cannot start
