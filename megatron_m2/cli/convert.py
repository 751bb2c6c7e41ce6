"""``m2-convert`` / ``tools/convert_checkpoint.py``: convert M2-Encoder checkpoints between the
official release format, our training checkpoints and a single serving file (the library is
:mod:`megatron_m2.checkpoint`; ``docs/conversion.md`` describes the formats)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from typing import Optional, Sequence

from ..checkpoint import holds_checkpoint
from ..config import M2ModelConfig, load_model_config
from .common import ArgumentParser, run_cli

__all__ = ["build_parser", "main"]


def _usage(message: str):
    """A :class:`~megatron_m2.checkpoint.ConversionError` (one line, exit 2) for a bad option."""
    from ..checkpoint import ConversionError

    return ConversionError(message)


def _quiet_megatron() -> None:
    # megatron-core warns at import that Transformer Engine / apex are missing: on a CPU box
    # that is the expected state, and a command-line tool's stderr is for the user.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")


_EPILOG = """\
formats:
  official  a release checkpoint of the official M2-Encoder (torch.save pickle: .pt .pth .ckpt
            .bin, or .safetensors); read with torch.load(weights_only=True) only: a pickle that
            needs anything but tensors and plain containers is refused. Carries no config: give
            --flavor or --model-config.
  ours      our training checkpoint: a save root (tracker + iter_N/) or an iter_N directory.
            Written model-only, loadable onto any TP/PP layout; --tp/--pp pick the layout
            recorded and the per-stage files.
  single    one safetensors file for serving: canonical TP=1 tensors, model config and
            tokenizer in its metadata.

examples:
  m2-convert --from official --to ours --flavor 0.4b --input m2_encoder_0.4b.ckpt \\
      --output ckpt/m2-0.4b --tokenizer-model glm_sp.model --tp 2 --pp 2
  m2-convert --from ours --to single --input ckpt/m2-0.4b --output m2-0.4b.safetensors \\
      --dtype bf16
  m2-convert --from single --to official --input m2-0.4b.safetensors --output m2-0.4b.pt
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``m2-convert`` argument parser."""
    _quiet_megatron()
    from ..checkpoint import FORMATS
    from ..data.tokenizer import TEXT_STYLES

    p = ArgumentParser(
        prog="m2-convert",
        description="Convert M2-Encoder checkpoints between the official release format, our "
                    "training checkpoints and a single serving file.",
        epilog=_EPILOG)
    p.add_argument("--from", dest="src", required=True, choices=FORMATS,
                   help="format of --input")
    p.add_argument("--to", dest="dst", required=True, choices=FORMATS,
                   help="format of --output")
    p.add_argument("--input", required=True, help="checkpoint to read")
    p.add_argument("--output", required=True,
                   help="file (official, single) or save root directory (ours) to write")
    p.add_argument("--flavor", help="architecture of an official input (tiny, 0.4b, 1b, 10b)")
    p.add_argument("--model-config", metavar="JSON",
                   help="architecture of an official input: a JSON object or a .json file of "
                        "M2ModelConfig fields; with --flavor, overrides of its fields")
    p.add_argument("--tokenizer-model", metavar="PATH",
                   help="SentencePiece model to attach (replaces the input's; ours and single "
                        "outputs store it)")
    p.add_argument("--text-style", choices=TEXT_STYLES, default=None,
                   help="text style recorded with the tokenizer (default: the input's record, "
                        "else the tokenizer model's default: official for the release's GLM "
                        "tokenizer)")
    p.add_argument("--tp", type=int, default=1,
                   help="--to ours: tensor-parallel size recorded in the layout")
    p.add_argument("--pp", type=int, default=1,
                   help="--to ours: pipeline stages, one weight file each")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"),
                   help="--to single/official: tensor dtype (default: fp32 for single, "
                        "unchanged for official)")
    p.add_argument("--include-training-params", action="store_true",
                   help="--to single/official: keep the parameters only training uses "
                        "(training-only parameter groups, e.g. a masked-language-model head); "
                        "ours outputs always keep them")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing output file, or write into a save root that "
                        "already holds a checkpoint")
    p.add_argument("--no-verify-checksums", action="store_true",
                   help="read the input without checking its tensors against the checksums "
                        "recorded when it was written (faster; corruption goes unnoticed)")
    p.add_argument("--quiet", action="store_true", help="only warnings and errors")
    return p


def _config_from_args(args) -> Optional[M2ModelConfig]:
    if args.flavor is None and args.model_config is None:
        return None
    base = None
    if args.flavor is not None:
        from ..flavors import get_flavor

        try:
            base = get_flavor(args.flavor)
        except KeyError as exc:
            raise _usage(str(exc.args[0])) from None
    if args.model_config is None:
        return base
    return load_model_config(args.model_config, base)


def _check_output(args) -> None:
    out = args.output
    if os.path.abspath(out) == os.path.abspath(args.input):
        raise _usage(f"--output {out} is the input")
    if args.force:
        return
    if args.dst == "ours":
        if holds_checkpoint(out):
            raise _usage(f"{out} already holds a checkpoint; use --force to add one "
                                  f"(the tracker will name the new one)")
        if os.path.isfile(out):
            raise _usage(f"{out} is a file; --to ours writes a save root directory")
    elif os.path.exists(out):
        raise _usage(f"{out} exists; use --force to overwrite it")


def _main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="m2-convert: %(message)s", stream=sys.stderr)
    if args.src != "official" and (args.flavor or args.model_config):
        parser.error("--flavor/--model-config describe official inputs; ours and single "
                     "checkpoints carry their own config")
    if args.dst != "ours" and (args.tp, args.pp) != (1, 1):
        parser.error("--tp/--pp apply to --to ours only")
    if args.dst == "ours" and args.dtype not in (None, "fp32"):
        parser.error("--dtype applies to --to single/official (ours stores fp32)")
    from ..checkpoint import convert

    cfg = _config_from_args(args)
    if args.src == "official" and cfg is None:
        parser.error("--from official needs --flavor or --model-config (official "
                     "checkpoints carry no architecture)")
    if args.dst == "ours" and cfg is not None:  # the layout first: it needs no file
        cfg.validate_parallel(args.tp, args.pp)
    if not os.path.exists(args.input):
        raise FileNotFoundError(f"--input {args.input}: no such file or directory")
    _check_output(args)
    tokenizer = None
    if args.tokenizer_model:
        from ..data.tokenizer import M2Tokenizer

        tokenizer = M2Tokenizer(args.tokenizer_model).model_bytes()  # a SentencePiece model?
    summary = convert(args.src, args.dst, args.input, args.output, cfg=cfg,
                      tokenizer_bytes=tokenizer, tp=args.tp, pp=args.pp, dtype=args.dtype,
                      flavor=args.flavor, text_style=args.text_style,
                      verify=not args.no_verify_checksums,
                      include_training=args.include_training_params)
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``m2-convert``: convert a checkpoint; prints a JSON summary line. Returns the exit code:
    0 done; 2 refused (a usage error, a missing, malformed or unsafe input, an existing
    output), with one line ``m2-convert: error: ...``."""
    return run_cli("m2-convert", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
