"""What every console script shares: the help formatter and the error contract.

Help: each flag's default is shown exactly once, by the formatter (``(default: X)``), so help
texts never state defaults themselves; flags whose default is "off" or "none" show none.
Errors: see :mod:`megatron_m2.errors` (one line ``m2-<tool>: error: ...``, exit status 2).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn, Optional, Tuple

from ..errors import error_line, run_cli

__all__ = ["ArgumentParser", "HelpFormatter", "run_cli", "shows_default",
           "add_model_arguments", "load_encoder", "init_world", "DTYPES"]

DTYPES = ("fp32", "bf16", "fp16")
"""Compute dtypes of ``--dtype`` (the tools that run an :class:`~megatron_m2.M2Encoder`)."""


def shows_default(action: argparse.Action) -> bool:
    """Whether ``--help`` shows this flag's default: not for switches, help-less or positional
    arguments, or defaults that mean "not set" (None, False, empty)."""
    if action.help in (None, argparse.SUPPRESS) or not action.option_strings:
        return False
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                           argparse._HelpAction, argparse._VersionAction)):
        return False
    return action.default not in (None, False, argparse.SUPPRESS, "", [], ())


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (examples keep their line breaks); each flag's
    default appended once as ``(default: X)`` (see :func:`shows_default`)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if shows_default(action) and "%(default)" not in text:
            default = action.default
            if isinstance(default, (list, tuple)):
                default = " ".join(str(x) for x in default)
            text += f" (default: {str(default).replace('%', '%%')})"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with the project's help formatter, whose usage errors are one
    line (``prog: error: ... (see prog --help)``, exit status 2) like every other user error."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(error_line(self.prog, f"{message} (see {self.prog} --help)") + "\n")
        sys.exit(2)


def add_model_arguments(parser: argparse.ArgumentParser, purpose: str):
    """The ``model`` argument group of every tool that runs an
    :class:`~megatron_m2.inference.M2Encoder` (m2-eval, m2-embed, m2-serve): ``--load``,
    ``--head``, ``--device``, ``--dtype``, ``--text-style``, ``--tokenizer-model``,
    ``--no-verify-checksums``. ``purpose`` ends the ``--head`` help ("which ITC head's
    embeddings to <purpose>"). Returns the group, for the tool's own model flags."""
    from ..data.tokenizer import TEXT_STYLES

    g = parser.add_argument_group("model")
    g.add_argument("--load", required=True,
                   help="checkpoint: a --save directory, an iter_N directory or a single "
                        ".safetensors export")
    g.add_argument("--head", default="vl", choices=["vl", "backbone"],
                   help=f"which ITC head's embeddings to {purpose}")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if any)")
    g.add_argument("--dtype", default="fp32", choices=DTYPES, help="compute dtype of the weights")
    g.add_argument("--text-style", default=None, choices=TEXT_STYLES,
                   help="tokenisation of raw text (default: the one recorded with the "
                        "checkpoint's tokenizer)")
    g.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece model overriding the one stored with the checkpoint")
    g.add_argument("--no-verify-checksums", action="store_true",
                   help="load --load without checking its tensors against their recorded "
                        "checksums (faster; corruption goes unnoticed)")
    return g


def load_encoder(args: argparse.Namespace, batch_size: int):
    """The :class:`~megatron_m2.inference.M2Encoder` that :func:`add_model_arguments`' flags
    describe, running ``batch_size`` items per forward pass."""
    import torch

    from ..inference import M2Encoder

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    return M2Encoder.from_pretrained(args.load, device=args.device, dtype=dtype, head=args.head,
                                     batch_size=batch_size,
                                     tokenizer_model=args.tokenizer_model,
                                     text_style=args.text_style,
                                     verify_checksums=not args.no_verify_checksums)


def init_world(timeout_s: Optional[float] = None) -> Tuple[int, int, Any]:
    """``(rank, world size, group or None)`` of a tool that shards its work over ranks
    (m2-eval, m2-embed): under a launcher (``WORLD_SIZE`` > 1) ``torch.distributed`` is
    initialised first (``timeout_s``: the collectives' timeout, default the project's); a
    single process gets ``(0, 1, None)``."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        from ..parallel.distributed import init_distributed

        if timeout_s is None:
            init_distributed()
        else:
            init_distributed(timeout_s=timeout_s)
    if dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    return 0, 1, None
