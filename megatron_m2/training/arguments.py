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
from ..flavors import FLAVORS

__all__ = ["build_parser", "parse_args", "parse_data_path", "parse_split",
           "parse_randaugment", "parse_crop_scale", "recompute_options", "recompute_setting",
           "fp8_options",
           "parallel_layout", "model_config",
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


def parse_crop_scale(value: str) -> Tuple[float, float]:
    """``--crop-scale 'MIN,MAX'``: RandomResizedCrop's area-fraction bounds, 0 < MIN <= MAX <= 1."""
    try:
        lo, hi = (float(x) for x in value.split(","))
    except ValueError:
        raise ConfigError(f"--crop-scale {value!r}: expected 'MIN,MAX', e.g. '0.8,1.0'") from None
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"--crop-scale {value!r}: need 0 < MIN <= MAX <= 1")
    return lo, hi


def build_parser() -> argparse.ArgumentParser:
    from ..cli.common import ArgumentParser
    from ..objectives import objective_names

    p = ArgumentParser(
        prog="m2-pretrain",
        description="Pretrain M2-Encoder with TP x PP x DP on megatron-core.")

    g = p.add_argument_group("model")
    g.add_argument("--flavor", default="tiny", choices=sorted(FLAVORS),
                   help="architecture preset (`m2-plan --list-flavors` describes them)")
    g.add_argument("--transformer-impl", default="local", choices=["local", "te"],
                   help="layer implementation: pure torch or Transformer Engine")
    g.add_argument("--model-config", default=None, metavar="JSON",
                   help="M2ModelConfig fields over --flavor's: a JSON file or an inline JSON "
                        "object (`m2-plan --list-flavors --json` prints the fields; a "
                        "checkpoint's meta.json works too)")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="override the flavor's vocabulary size (must match the tokenizer)")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="interleaved pipeline (Megatron-LM's flag): each pipeline rank holds "
                        "several model chunks of this many layers, which shrinks the pipeline "
                        "bubble by the number of chunks at the cost of more p2p messages")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="Megatron's sequence parallelism: the activations outside the "
                        "tensor-parallel regions (LayerNorms, residuals, pipeline messages) "
                        "are sharded along the sequence across the TP group instead of "
                        "replicated; each modality part is padded to a multiple of TP "
                        "(needs --tensor-model-parallel-size >= 2)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard optimizer states over the data-parallel group")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="reduce gradients bucket by bucket during the backward pass "
                        "(megatron-core DDP), instead of all at once after it")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="with --use-distributed-optimizer: all-gather the updated parameters "
                        "bucket by bucket during the next forward pass, instead of inside the "
                        "optimizer step")
    g.add_argument("--ddp-bucket-size", type=int, default=None,
                   help="elements per gradient bucket with --overlap-grad-reduce (default: "
                        "megatron-core's, max(4e7, 1e6 x DP))")
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

    g = p.add_argument_group("objective")
    g.add_argument("--objective", default="itc", choices=objective_names(),
                   help="training objective (megatron_m2.objectives): itc is M2's GBA-ITC "
                        "contrastive loss; m2 is M2's full recipe, GBA-ITC + λ1·CMIM + "
                        "λ2·CMLM (the masked-modelling flags below)")

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

    g = p.add_argument_group("masked modelling (--objective m2: GBA-ITC + CMLM + CMIM)")
    g.add_argument("--cmlm-weight", type=float, default=None,
                   help="λ of cross-modal masked language modelling (masked caption pieces "
                        "predicted from the fused image+caption pass; 0 turns it off). "
                        "Default 1.0 with --objective m2")
    g.add_argument("--cmim-weight", type=float, default=None,
                   help="λ of cross-modal masked image modelling (masked patches predicted "
                        "from the fused pass; 0 turns it off). Default 1.0 with --objective m2")
    g.add_argument("--mvlm-prob", type=float, default=0.5,
                   help="share of caption pieces masked (whole words, BERT 80/10/10) in the "
                        "CMLM pass (the release's mvlm_prob)")
    g.add_argument("--mim-target", default="vqkd", choices=["vqkd", "pixel"],
                   help="CMIM targets: the codebook indices of a frozen BEiT-v2 VQ-KD visual "
                        "tokenizer (--visual-tokenizer), or per-patch normalised pixels (no "
                        "extra weights)")
    g.add_argument("--visual-tokenizer", default=None, metavar="PATH",
                   help="VQ-KD weights: BEiT-v2's tokenizer file, or a release training "
                        "checkpoint (its visual_tokenizer.* weights are found by prefix)")
    g.add_argument("--visual-tokenizer-heads", type=int, default=None,
                   help="attention heads of the VQ-KD encoder (not stored in its weights; "
                        "default width / 64, BEiT-v2's)")
    g.add_argument("--image-mask-patches", type=int, default=None,
                   help="patches masked per image in the CMIM pass (BEiT block-wise masking). "
                        "Default: the release's 80 of 196, scaled to the patch grid")
    g.add_argument("--image-mask-style", default="block", choices=["block", "attentive"],
                   help="which patches CMIM masks: BEiT block-wise (random blocks), or "
                        "SyCoCa's text-guided attentive masking (the patches most similar to "
                        "the caption in the VL embedding space, from a forward-only "
                        "contrastive pass; free with --itc-accumulate-features, whose first "
                        "phase is that pass)")
    g.add_argument("--attentive-mask-temperature", type=float, default=0.0,
                   help="attentive masking: 0 masks the top patches; T > 0 samples them with "
                        "probabilities softmax(score / T) (Gumbel top-k)")
    g.add_argument("--cmlm-tie-embeddings", action="store_true",
                   help="CMLM head shares the text embedding matrix (needs the embeddings and "
                        "the heads on one pipeline stage: PP=1)")

    g = p.add_argument_group("patch dropout (FLIP; contrastive training, --objective itc)")
    g.add_argument("--image-mask-ratio", type=float, default=0.0, metavar="R",
                   help="drop a random fraction R (0 <= R < 1) of each image's patch tokens "
                        "in training steps ([CLS] kept; a per-sample subset drawn from the "
                        "seed and the sample's position): the vision sequence shrinks to "
                        "1 + round((1 - R) x patches) rows. Evaluation runs unmasked")
    g.add_argument("--image-mask-ratio-until-iter", type=int, default=None, metavar="N",
                   help="drop patches in steps 1..N only; the steps after N run unmasked "
                        "(FLIP's unmasked tuning at the end of training). Default: every step")

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
    g.add_argument("--caption-token-dropout", type=float, default=0.0, metavar="P",
                   help="replace each caption token by [MASK] with probability P while "
                        "training (word dropout: the text tower learns to match on the words "
                        "it knows when others are new; needs a tokenizer with [MASK])")
    g.add_argument("--trim-text-padding", action="store_true",
                   help="run each step's captions at the length of the global batch's longest "
                        "caption (one all-reduce per step) instead of the model's max_text_len: "
                        "the same loss (padding is masked) at a fraction of the text tower's "
                        "cost when captions are short")
    g.add_argument("--crop-scale", default="0.8,1.0", metavar="MIN,MAX",
                   help="RandomResizedCrop area-fraction bounds of the train transform "
                        "(1,1: no crop; the image is only resized)")
    g.add_argument("--hflip", type=float, default=0.5, metavar="P",
                   help="probability of a horizontal flip in the train transform (0 when "
                        "left and right carry meaning, e.g. arrows and pointing hands)")
    g.add_argument("--randaugment", default="2,7",
                   help="RandAugment 'N,M' of the train transform, or 'none'")
    g.add_argument("--num-workers", type=int, default=2, help="data loader worker processes")
    g.add_argument("--image-decode", choices=["cpu", "gpu"], default="cpu",
                   help="where training images are decoded and augmented: cpu (Pillow, in the "
                        "loader workers) or gpu (workers pass the JPEG bytes and crop/flip "
                        "parameters; nvJPEG via torchvision on the GPU; needs CUDA, torchvision "
                        "(the gpu-decode extra) and --randaugment none)")
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


def model_config(args: argparse.Namespace, **overrides):
    """The run's :class:`~megatron_m2.config.M2ModelConfig`: ``--flavor``, then
    ``--model-config``'s fields, then ``--vocab-size``, then ``overrides`` (e.g. the tokenizer's
    vocabulary and special ids)."""
    from ..config import M2ModelConfig, load_model_config
    from ..flavors import get_flavor

    cfg = get_flavor(args.flavor)
    if args.model_config:
        cfg = load_model_config(args.model_config, cfg)
    fields = cfg.to_dict()
    if args.vocab_size:
        fields["vocab_size"] = args.vocab_size
    fields.update(overrides)
    return M2ModelConfig.from_dict(fields)


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


def virtual_pipeline_size(args: argparse.Namespace, cfg) -> Optional[int]:
    """Model chunks per pipeline rank of ``--num-layers-per-virtual-pipeline-stage`` (None
    without it); validation has checked that the layers split."""
    n = args.num_layers_per_virtual_pipeline_stage
    if not n:
        return None
    return cfg.num_layers // args.pipeline_model_parallel_size // n


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


def recompute_setting(args: argparse.Namespace) -> Tuple[Optional[str], Optional[int]]:
    """``(method, layers)`` the recompute flags ask for (``(None, None)``: none); raises
    :class:`ConfigError` for flag combinations that mean nothing. Whether the layers fit the
    pipeline stages is a layout rule (:func:`megatron_m2.layout.check_layout`)."""
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
            return None, None
    elif args.recompute_method is None or args.recompute_num_layers is None:
        raise ConfigError("--recompute-granularity full needs --recompute-method (uniform or "
                          "block) and --recompute-num-layers")
    opts = recompute_options(args)
    return opts["recompute_method"], opts["recompute_num_layers"]


def fp8_options(args: argparse.Namespace) -> Dict[str, object]:
    """megatron ``TransformerConfig`` FP8 fields of the run (empty without ``--fp8-format``)."""
    if not getattr(args, "fp8_format", None):
        return {}
    return {"fp8": args.fp8_format, "fp8_recipe": args.fp8_recipe,
            "fp8_margin": args.fp8_margin, "fp8_amax_history_len": args.fp8_amax_history_len,
            "fp8_amax_compute_algo": args.fp8_amax_compute_algo}


def parallel_layout(args: argparse.Namespace, world_size: int,
                    gpus_per_node: Optional[int] = None):
    """The :class:`~megatron_m2.layout.ParallelLayout` of the command line on ``world_size``
    ranks (``gpus_per_node`` ranks per node, when the launcher says)."""
    from ..layout import ParallelLayout

    method, layers = recompute_setting(args)
    precision = "fp8" if args.fp8_format else "bf16" if args.bf16 else "fp32"
    return ParallelLayout(
        tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
        world_size=world_size, micro_batch=args.micro_batch_size,
        global_batch=args.global_batch_size, precision=precision, fp8_recipe=args.fp8_recipe,
        transformer_impl=args.transformer_impl, itc_heads=args.itc_heads,
        itc_group_size=args.itc_group_size, itc_aggregate_nodes=args.itc_aggregate_nodes,
        itc_accumulate_features=args.itc_accumulate_features, recompute_method=method,
        recompute_num_layers=layers, distributed_optimizer=args.use_distributed_optimizer,
        gpus_per_node=gpus_per_node,
        layers_per_virtual_stage=args.num_layers_per_virtual_pipeline_stage,
        image_mask_ratio=args.image_mask_ratio, sequence_parallel=args.sequence_parallel)
