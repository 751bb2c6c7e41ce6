"""``m2-convert`` / ``tools/convert_checkpoint.py``: convert M2-Encoder checkpoints between the
official release format, our training checkpoints and a single serving file (the library is
:mod:`megatron_m2.checkpoint`; ``docs/conversion.md`` describes the formats), and export ours or
single checkpoints to ONNX image and text encoders for serving (``--to onnx``, an output-only
format: :mod:`megatron_m2.export_onnx`)."""

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

ONNX = "onnx"
"""The output-only format: :mod:`megatron_m2.export_onnx`."""


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
  onnx      (output only; from ours or single) a folder for serving without PyTorch:
            image_encoder.onnx (pixel_values [batch, 3, S, S] -> image_embeds [batch, D]),
            text_encoder.onnx (input_ids, text_pad_mask [batch, text_len] -> text_embeds
            [batch, D]), both L2-normalised fp32 with a dynamic batch axis, tokenizer.model and
            onnx_export.json (preprocessing, names, logit scale). Checked with onnx.checker and
            against PyTorch in onnxruntime; needs pip install 'megatron_m2[onnx]'.

examples:
  m2-convert --from official --to ours --flavor 0.4b --input m2_encoder_0.4b.ckpt \\
      --output ckpt/m2-0.4b --tokenizer-model glm_sp.model --tp 2 --pp 2
  m2-convert --from ours --to single --input ckpt/m2-0.4b --output m2-0.4b.safetensors \\
      --dtype bf16
  m2-convert --from single --to official --input m2-0.4b.safetensors --output m2-0.4b.pt
  m2-convert --from single --to onnx --input m2-0.4b.safetensors --output m2-0.4b-onnx
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``m2-convert`` argument parser."""
    _quiet_megatron()
    from ..checkpoint import FORMATS
    from ..data.tokenizer import TEXT_STYLES
    from ..export_onnx import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET

    p = ArgumentParser(
        prog="m2-convert",
        description="Convert M2-Encoder checkpoints between the official release format, our "
                    "training checkpoints and a single serving file, or export them to ONNX.",
        epilog=_EPILOG)
    # onnx is listed for --from too, so that asking for it gets a reason, not "invalid choice".
    p.add_argument("--from", dest="src", required=True, choices=FORMATS + (ONNX,),
                   help="format of --input")
    p.add_argument("--to", dest="dst", required=True, choices=FORMATS + (ONNX,),
                   help="format of --output")
    p.add_argument("--input", required=True, help="checkpoint to read")
    p.add_argument("--output", required=True,
                   help="file (official, single), save root directory (ours) or folder (onnx) "
                        "to write")
    p.add_argument("--flavor", help="architecture of an official input (tiny, 0.4b, 1b, 10b)")
    p.add_argument("--model-config", metavar="JSON",
                   help="architecture of an official input: a JSON object or a .json file of "
                        "M2ModelConfig fields; with --flavor, overrides of its fields")
    p.add_argument("--tokenizer-model", metavar="PATH",
                   help="SentencePiece model to attach (replaces the input's; ours, single and "
                        "onnx outputs store it)")
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
    p.add_argument("--onnx-opset", type=int, default=DEFAULT_OPSET, metavar="N",
                   help=f"--to onnx: ONNX opset, {MIN_OPSET} to {MAX_OPSET}")
    p.add_argument("--head", choices=("vl", "backbone"), default="vl",
                   help="--to onnx: ITC head the encoders output: vl (after the shared "
                        "vision-language layers, what retrieval uses) or backbone")
    p.add_argument("--onnx-external-data", action="store_true",
                   help="--to onnx: write each encoder's weights to <file>.onnx.data beside it "
                        "(always done for an encoder over 1.5 GiB of weights)")
    p.add_argument("--no-onnx-verify", action="store_true",
                   help="--to onnx: skip running the export in onnxruntime against PyTorch "
                        "(onnx.checker still runs)")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing output file, write into a save root that "
                        "already holds a checkpoint, or into a non-empty onnx folder")
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
    if args.dst == ONNX:
        if os.path.isfile(out):
            raise _usage(f"{out} is a file; --to onnx writes a folder")
        if os.path.isdir(out) and os.listdir(out) and not args.force:
            raise _usage(f"{out} exists and is not empty; use --force to write the export "
                         f"into it (the files of a previous export are replaced)")
        return
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


def _check_onnx_args(parser: argparse.ArgumentParser, args) -> None:
    """The onnx options only with --to onnx, and what --to onnx refuses: it reads ours or
    single checkpoints and writes the fp32 model as it runs, unsplit."""
    from ..export_onnx import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET

    if args.dst != ONNX:
        if (args.onnx_opset, args.head, args.onnx_external_data, args.no_onnx_verify) != (
                DEFAULT_OPSET, "vl", False, False):
            parser.error("--onnx-opset/--head/--onnx-external-data/--no-onnx-verify apply to "
                         "--to onnx only")
        return
    if args.src == "official":
        parser.error("--to onnx reads ours or single checkpoints; convert the official "
                     "checkpoint first (--from official --to single)")
    if args.dtype not in (None, "fp32"):
        parser.error("--to onnx exports fp32 weights: --dtype fp32 only")
    if args.include_training_params:
        parser.error("--include-training-params applies to --to single/official (the onnx "
                     "encoders hold only what inference computes)")
    if not MIN_OPSET <= args.onnx_opset <= MAX_OPSET:
        parser.error(f"--onnx-opset {args.onnx_opset}: choose {MIN_OPSET} to {MAX_OPSET} "
                     f"(below {MIN_OPSET} the exporter has no translations; at 23 "
                     f"onnxruntime's CPU Attention kernel rejects the text padding mask)")


def _export_onnx(args) -> dict:
    """``--to onnx``: the export folder and its summary (:func:`~megatron_m2.export_onnx.
    export_onnx`), as the JSON line to print."""
    from ..export_onnx import export_onnx

    is_dir = os.path.isdir(args.input)
    if args.src == "single" and is_dir:
        raise _usage(f"--input {args.input} is a directory; --from single reads a file")
    if args.src == "ours" and not is_dir:
        raise _usage(f"--input {args.input} is a file; --from ours reads a save root or an "
                     f"iter_N directory")
    summary = export_onnx(args.input, args.output, opset=args.onnx_opset, head=args.head,
                          external_data=args.onnx_external_data or None,
                          verify=not args.no_onnx_verify, overwrite=args.force,
                          tokenizer_model=args.tokenizer_model, text_style=args.text_style,
                          verify_checksums=not args.no_verify_checksums)
    return {"from": args.src, "to": ONNX, "input": args.input, **summary}


def _main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="m2-convert: %(message)s", stream=sys.stderr)
    if args.src == ONNX:
        parser.error("--from onnx: ONNX is an output-only format (an export for serving that "
                     "cannot be read back); convert from ours or single")
    if args.src != "official" and (args.flavor or args.model_config):
        parser.error("--flavor/--model-config describe official inputs; ours and single "
                     "checkpoints carry their own config")
    if args.dst != "ours" and (args.tp, args.pp) != (1, 1):
        parser.error("--tp/--pp apply to --to ours only")
    if args.dst == "ours" and args.dtype not in (None, "fp32"):
        parser.error("--dtype applies to --to single/official (ours stores fp32)")
    _check_onnx_args(parser, args)
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
    if args.dst == ONNX:
        sys.stdout.write(json.dumps(_export_onnx(args)) + "\n")
        return 0
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
