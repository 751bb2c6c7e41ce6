"""Validation of ``m2-pretrain``'s arguments, before anything heavy is imported.

:func:`validate_args` checks everything that can be checked from the arguments, the launcher's
world (and node) size and the files the run reads or writes, so that a wrong configuration fails
identically on every rank *before* the first collective: the parallel layout
(:func:`megatron_m2.layout.check_layout`), numbers, datasets (in full) and their cards, the
checkpoint to resume and its schedule and tokenizer, the save folder, the output folders.
"""

from __future__ import annotations

import argparse
import os
from typing import Dict, Optional

from ..config import ConfigError
from .arguments import (
    model_config,
    output_dirs,
    parallel_layout,
    parse_crop_scale,
    parse_data_path,
    parse_randaugment,
    parse_split,
    scheduler_settings,
)

__all__ = ["validate_args", "have_transformer_engine"]


_SCHEDULE_FLAGS = {"max_lr": "--lr", "min_lr": "--min-lr", "lr_warmup_steps": "--lr-warmup-iters",
                   "lr_decay_steps": "--lr-decay-iters/--train-iters",
                   "lr_decay_style": "--lr-decay-style", "start_wd": "--weight-decay",
                   "end_wd": "--weight-decay", "wd_incr_steps": "--lr-decay-iters/--train-iters",
                   "wd_incr_style": "weight-decay style"}


def _validate_image_decode(args: argparse.Namespace, randaugment) -> None:
    """``--image-decode gpu``: CUDA, an importable torchvision, no RandAugment."""
    if getattr(args, "image_decode", "cpu") != "gpu":
        return
    if randaugment is not None:
        raise ConfigError(f"--image-decode gpu does not apply RandAugment (--randaugment "
                          f"{args.randaugment}): pass --randaugment none, or --image-decode cpu")
    from ..data.gpu_decode import gpu_decode_problem

    problem = gpu_decode_problem()
    if problem:
        raise ConfigError(f"--image-decode gpu needs a CUDA device and a torchvision built for "
                          f"this torch (pip install 'megatron_m2[gpu-decode]'): {problem}")


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
    from ..checkpoint.meta import complete_iterations, holds_checkpoint

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
    from ..checkpoint.meta import check_tensor_file, holds_checkpoint, resolve_checkpoint

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


MASKED_FLAGS = ("cmlm_weight", "cmim_weight", "visual_tokenizer", "visual_tokenizer_heads",
                "image_mask_patches", "cmlm_tie_embeddings")
"""Flags of the masked objectives (meaningful with --objective m2 only)."""


def _validate_masked(args: argparse.Namespace, cfg) -> None:
    """The masked objectives' settings (``--objective m2``; :mod:`megatron_m2.objectives.m2`).
    The VQ-KD file is read here, on every rank, so that a bad one fails everywhere alike."""
    import math

    if args.objective != "m2":
        given = [f"--{k.replace('_', '-')}" for k in MASKED_FLAGS
                 if getattr(args, k, None) not in (None, False)]
        if given:
            raise ConfigError(f"{', '.join(given)}: masked modelling needs --objective m2 "
                              f"(this run's objective is {args.objective!r})")
        return
    weights = {}
    for name in ("cmlm_weight", "cmim_weight"):
        w = getattr(args, name)
        w = 1.0 if w is None else w
        if not (math.isfinite(w) and w >= 0):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {w}")
        weights[name] = w
    if not any(weights.values()):
        raise ConfigError("--objective m2 with --cmlm-weight 0 and --cmim-weight 0 is GBA-ITC "
                          "alone: use --objective itc")
    if not 0 < args.mvlm_prob < 1:
        raise ConfigError(f"--mvlm-prob must be in (0, 1), got {args.mvlm_prob}")
    grid = cfg.image_size // cfg.patch_size
    if args.image_mask_patches is not None and not 1 <= args.image_mask_patches < grid * grid:
        raise ConfigError(f"--image-mask-patches must be in [1, {grid * grid - 1}] (a "
                          f"{grid}x{grid} patch grid), got {args.image_mask_patches}")
    if args.attentive_mask_temperature < 0 or not math.isfinite(
            args.attentive_mask_temperature):
        raise ConfigError(f"--attentive-mask-temperature must be >= 0, got "
                          f"{args.attentive_mask_temperature}")
    if args.image_mask_style == "attentive" and not weights["cmim_weight"]:
        raise ConfigError("--image-mask-style attentive with --cmim-weight 0: there is no "
                          "image masking")
    if args.cmlm_tie_embeddings:
        if not weights["cmlm_weight"]:
            raise ConfigError("--cmlm-tie-embeddings with --cmlm-weight 0: there is no CMLM "
                              "head to tie")
        if args.pipeline_model_parallel_size > 1:
            raise ConfigError("--cmlm-tie-embeddings needs the text embedding and the CMLM "
                              "head on one pipeline stage (--pipeline-model-parallel-size 1); "
                              "untied heads work with any PP")
    if weights["cmim_weight"] and args.mim_target == "vqkd":
        _validate_visual_tokenizer(args, cfg, grid)
    elif args.visual_tokenizer:
        raise ConfigError("--visual-tokenizer is read only with --mim-target vqkd and "
                          "--cmim-weight > 0")


def _validate_patch_dropout(args: argparse.Namespace, cfg) -> None:
    """``--image-mask-ratio`` (FLIP's patch dropout) and its unmasked phase; the objective
    must support it (:attr:`Objective.supports_patch_dropout`)."""
    import math

    ratio, until = args.image_mask_ratio, args.image_mask_ratio_until_iter
    if not (math.isfinite(ratio) and 0.0 <= ratio < 1.0):
        raise ConfigError(f"--image-mask-ratio must be in [0, 1), got {ratio}")
    if until is not None:
        if not ratio:
            raise ConfigError("--image-mask-ratio-until-iter needs --image-mask-ratio > 0")
        if until < 1:
            raise ConfigError(f"--image-mask-ratio-until-iter must be >= 1, got {until}")
    if ratio:
        from ..objectives import objective_class

        if not objective_class(args.objective).supports_patch_dropout:
            raise ConfigError(f"--image-mask-ratio (patch dropout) works with contrastive "
                              f"training only (--objective itc); objective {args.objective!r} "
                              "has no patch dropout (m2's contrastive and fused passes share "
                              "one full-length sequence)")
        if args.fp8_format:  # the layout rule check_layout applies, for this check alone
            from ..layout import FP8_ALIGN, patch_dropout_fp8_error

            tp = args.tensor_model_parallel_size
            error = patch_dropout_fp8_error(cfg, ratio, args.micro_batch_size,
                                            FP8_ALIGN.get(args.fp8_recipe, 16),
                                            tp if args.sequence_parallel else 1)
            if error:
                raise ConfigError(error)


def _validate_visual_tokenizer(args: argparse.Namespace, cfg, grid: int) -> None:
    path = args.visual_tokenizer
    if not path:
        raise ConfigError("--mim-target vqkd needs --visual-tokenizer PATH (BEiT-v2 VQ-KD "
                          "weights, or a release training checkpoint); --mim-target pixel "
                          "needs no weights")
    if not os.path.exists(path):
        raise ConfigError(f"--visual-tokenizer {path} does not exist")
    from ..model.vqkd import open_visual_tokenizer

    try:
        vqkd = open_visual_tokenizer(path, args.visual_tokenizer_heads)
    except (ValueError, RuntimeError, OSError) as e:
        raise ConfigError(f"--visual-tokenizer: {e}") from None
    tgrid = cfg.image_size // vqkd.config.patch_size
    if tgrid != grid:
        raise ConfigError(
            f"--visual-tokenizer {path}: its {vqkd.config.patch_size}-pixel patches make a "
            f"{tgrid}x{tgrid} grid of a {cfg.image_size}-pixel image, the model's "
            f"{cfg.patch_size}-pixel patches a {grid}x{grid} one: targets would not line up "
            "with the patches")
    tp = args.tensor_model_parallel_size
    if vqkd.codebook_size % tp:
        raise ConfigError(f"--visual-tokenizer {path}: {vqkd.codebook_size} codes do not "
                          f"split over --tensor-model-parallel-size {tp}")


def have_transformer_engine() -> bool:
    """Whether Transformer Engine is importable (checked without importing it or torch)."""
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


def _check_fp8_environment(args: argparse.Namespace) -> None:
    """FP8 needs Transformer Engine installed and BF16; its layer spec and GEMM shapes are
    layout rules."""
    if not args.fp8_format:
        return
    if not have_transformer_engine():
        raise ConfigError("--fp8-format needs Transformer Engine, which is not installed; run "
                          "in the Docker image or train in BF16 (--bf16 without --fp8-format)")
    if not args.bf16:
        raise ConfigError("--fp8-format needs --bf16 (FP8 GEMMs inside BF16 mixed precision)")


def validate_args(args: argparse.Namespace, world_size: int,
                  gpus_per_node: Optional[int] = None) -> None:
    """Raise :class:`ConfigError` with one clear message if the run cannot work on
    ``world_size`` ranks (``gpus_per_node`` per node, when known). The parallel layout's rules
    are :func:`megatron_m2.layout.check_layout`'s."""
    from ..layout import check_layout

    cfg = model_config(args)
    _check_fp8_environment(args)
    check = check_layout(cfg, parallel_layout(args, world_size, gpus_per_node))
    if check.errors:
        raise ConfigError(check.message())
    if args.itc_accumulate_features:
        from ..objectives import objective_class

        if not objective_class(args.objective).supports_feature_accumulation:
            raise ConfigError(f"--itc-accumulate-features: objective {args.objective!r} has no "
                              f"loss over a whole step's micro-batches")
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
        _validate_image_decode(args, ra)
        parse_crop_scale(getattr(args, "crop_scale", "0.8,1.0"))
        if not 0.0 <= getattr(args, "hflip", 0.5) <= 1.0:
            raise ConfigError(f"--hflip {args.hflip}: a probability in [0, 1]")
        if not 0.0 <= getattr(args, "caption_token_dropout", 0.0) < 1.0:
            raise ConfigError(f"--caption-token-dropout {args.caption_token_dropout}: a "
                              "probability in [0, 1)")
    if args.tokenizer_model:
        if not os.path.exists(args.tokenizer_model):
            raise ConfigError(f"--tokenizer-model {args.tokenizer_model} does not exist")
        _validate_data(args, cfg)
    _validate_resume(args, cfg)
    _validate_patch_dropout(args, cfg)
    _validate_masked(args, cfg)
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        raise ConfigError("--overlap-param-gather needs --use-distributed-optimizer (only the "
                          "distributed optimizer all-gathers parameters)")
    if args.ddp_bucket_size is not None and args.ddp_bucket_size < 1:
        raise ConfigError(f"--ddp-bucket-size must be >= 1, got {args.ddp_bucket_size}")
    if args.transformer_impl == "te" and not have_transformer_engine():
        raise ConfigError("--transformer-impl te needs Transformer Engine, which is not "
                          "installed; use --transformer-impl local (or run in the Docker image)")
    _validate_save(args)
    _prepare_output_dirs(args)  # last: nothing is created for a run that cannot start
