"""ONNX export of M2-Encoder's image and text towers, for serving without PyTorch.

::

    from megatron_m2.export_onnx import export_onnx

    summary = export_onnx("m2-0.4b.safetensors", "m2-0.4b-onnx")   # a path or an M2Encoder

writes a self-contained folder (``m2-convert --from single --to onnx`` does the same):

``image_encoder.onnx``
    input ``pixel_values``: float32 ``[batch, 3, S, S]``, preprocessed as
    :attr:`M2Encoder.transform <megatron_m2.inference.M2Encoder>` does (RGB, squash-resize to
    ``S x S`` with Pillow's BICUBIC, ``(x / 255 - 0.5) / 0.5``); output ``image_embeds``: float32
    ``[batch, D]``, L2-normalised.
``text_encoder.onnx``
    inputs ``input_ids``: int64 ``[batch, text_len]`` and ``text_pad_mask``: bool
    ``[batch, text_len]``, True at padding, exactly what
    :class:`~megatron_m2.data.tokenizer.M2Tokenizer` returns (``ids, pad = tokenizer(texts)``),
    with ``2 <= text_len <= max_text_len``; output ``text_embeds``: float32 ``[batch, D]``,
    L2-normalised.
``image_encoder.onnx.data``, ``text_encoder.onnx.data``
    a tower's weights as external data, to keep beside its ``.onnx`` file: with
    ``external_data=True``, and always for a tower whose weights exceed 1.5 GiB (ONNX's
    protobuf files are limited to 2 GiB).
``tokenizer.model``
    the checkpoint's SentencePiece model (absent when the checkpoint carries none).
``onnx_export.json``
    the manifest: model config, ``embed_dim``, ``image_size``, ``max_text_len``, ITC ``head``,
    ``logit_scale``, opset, every input and output (name, dtype, shape), the image and text
    preprocessing, file sizes and SHA-256 digests, and the parity measured at export.

The towers are the model :class:`~megatron_m2.inference.M2Encoder` runs (megatron-core layers at
TP=1 / PP=1), called exactly as :meth:`~megatron_m2.inference.M2Encoder.encode_image` and
:meth:`~megatron_m2.inference.M2Encoder.encode_text` call it, each output normalised again in
float32 as they do. Both axes ``batch`` and ``text_len`` are dynamic; the image side ``S`` is
fixed by the position table.

Exporter: ``torch.onnx.export(dynamo=True)`` (``torch.export`` in non-strict mode, translated by
onnxscript). The TorchScript-based exporter (``dynamo=False``) cannot trace the model:
megatron-core's parallel linears report ``_extra_state`` entries that are None in
``state_dict(keep_vars=True)``, which the tracer dereferences. The exported graphs carry no
debugging metadata (source paths and stack traces are stripped).

Opsets 18 to 22 are supported (:data:`MIN_OPSET`, :data:`MAX_OPSET`): the exporter has no
translations below 18, and at 23 attention becomes the ONNX ``Attention`` operator, whose
onnxruntime CPU kernel rejects the broadcast ``[batch, 1, 1, text_len]`` key-padding mask.

After writing, every file is checked with ``onnx.checker`` (``full_check``: types and shapes
inferred) and, unless ``verify=False``, run in onnxruntime (CPUExecutionProvider) on batches of
1 and 2 images and captions, the captions at the full and at a trimmed ``text_len``, against the
PyTorch towers: a maximum absolute difference above ``tolerance`` fails the export and nothing
is written. The folder is assembled in a temporary sibling directory and moved into place only
when everything passed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from .errors import UserError
from .inference import HEADS
from .version import __version__

logger = logging.getLogger(__name__)

__all__ = ["export_onnx", "ImageTower", "TextTower", "OnnxExportError", "OnnxParityError",
           "IMAGE_FILE", "TEXT_FILE", "TOKENIZER_FILE", "MANIFEST_FILE", "DEFAULT_OPSET",
           "MIN_OPSET", "MAX_OPSET", "IMAGE_INPUT", "IMAGE_OUTPUT", "TEXT_INPUTS", "TEXT_OUTPUT",
           "MANIFEST_FORMAT"]

IMAGE_FILE = "image_encoder.onnx"
TEXT_FILE = "text_encoder.onnx"
TOKENIZER_FILE = "tokenizer.model"
MANIFEST_FILE = "onnx_export.json"
MANIFEST_FORMAT = "m2-encoder-onnx/1"
"""``format`` of the manifest: a reader checks it before trusting the other fields."""

DEFAULT_OPSET = 18
"""ONNX opset written by default: the oldest one the exporter translates to, run by every
onnxruntime since 1.14."""
MIN_OPSET, MAX_OPSET = 18, 22
"""Supported opsets (see the module docstring for why not below 18 or at 23)."""

IMAGE_INPUT, IMAGE_OUTPUT = "pixel_values", "image_embeds"
TEXT_INPUTS, TEXT_OUTPUT = ("input_ids", "text_pad_mask"), "text_embeds"

DEFAULT_TOLERANCE = 1e-4
"""Largest absolute difference between onnxruntime and PyTorch embeddings accepted at export."""

_VERIFY_CAPTIONS = ("a photo of a cat sitting on a sofa", "一只猫坐在沙发上的照片")
_OUR_FILES = (IMAGE_FILE, IMAGE_FILE + ".data", TEXT_FILE, TEXT_FILE + ".data", TOKENIZER_FILE,
              MANIFEST_FILE)


class OnnxExportError(UserError, ValueError):
    """An ONNX export was asked for something it cannot do (an option out of range, an output
    that exists, a missing package); the message names the option, file or package."""


class OnnxParityError(RuntimeError):
    """An exported tower computes embeddings that differ from the PyTorch model's by more than
    the tolerance (a defect of the exporter or of the runtime, not of the input)."""


# -- the towers ------------------------------------------------------------------------------
class ImageTower(nn.Module):
    """``pixel_values [b, 3, S, S]`` → L2-normalised ``image_embeds [b, D]`` of ``head``, as
    :meth:`~megatron_m2.inference.M2Encoder.encode_image` computes them."""

    def __init__(self, model: nn.Module, head: str = "vl"):
        super().__init__()
        self.model = model
        self.key = HEADS[head][0]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.model(images=pixel_values)
        return F.normalize(feats[self.key].float(), dim=-1)


class TextTower(nn.Module):
    """``input_ids [b, L]`` and ``text_pad_mask [b, L]`` (True at padding) → L2-normalised
    ``text_embeds [b, D]`` of ``head``, as :meth:`~megatron_m2.inference.M2Encoder.encode_text`
    computes them."""

    def __init__(self, model: nn.Module, head: str = "vl"):
        super().__init__()
        self.model = model
        self.key = HEADS[head][1]

    def forward(self, input_ids: torch.Tensor, text_pad_mask: torch.Tensor) -> torch.Tensor:
        feats = self.model(text_ids=input_ids, text_pad_mask=text_pad_mask)
        return F.normalize(feats[self.key].float(), dim=-1)


# -- checks ----------------------------------------------------------------------------------
def _require(modules: Sequence[str], why: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise OnnxExportError(f"{why} needs the Python package(s) {', '.join(missing)}: "
                              f"pip install 'megatron_m2[onnx]'")


def _check_options(opset: int, head: Optional[str], tolerance: float) -> None:
    if isinstance(opset, bool) or not isinstance(opset, int) or not (
            MIN_OPSET <= opset <= MAX_OPSET):
        raise OnnxExportError(f"opset {opset!r} is not supported: choose {MIN_OPSET} to "
                              f"{MAX_OPSET} (below {MIN_OPSET} the exporter has no "
                              f"translations; at 23 onnxruntime's CPU Attention kernel rejects "
                              f"the text padding mask)")
    if head is not None and head not in HEADS:
        raise OnnxExportError(f"head must be one of {', '.join(sorted(HEADS))}, got {head!r}")
    if not tolerance > 0:
        raise OnnxExportError(f"tolerance must be positive, got {tolerance!r}")


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OnnxExportError(f"{out} is a file; the ONNX export writes a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OnnxExportError(f"{out} exists and is not empty; pass overwrite=True "
                              f"(m2-convert: --force) to write the export into it")


def _encoder(encoder_or_path, head: Optional[str], tokenizer_model: Optional[str],
             text_style: Optional[str], verify_checksums: bool):
    """``(M2Encoder viewing the model through ``head``, source path or None)``."""
    from .inference import M2Encoder

    if isinstance(encoder_or_path, M2Encoder):
        if tokenizer_model is not None or text_style is not None:
            raise OnnxExportError("tokenizer_model and text_style apply when exporting from a "
                                  "path; an M2Encoder already has its tokenizer")
        enc, source = encoder_or_path, None
    elif isinstance(encoder_or_path, (str, os.PathLike)):
        source = os.fspath(encoder_or_path)
        enc = M2Encoder.from_pretrained(source, device="cpu", dtype=torch.float32,
                                        tokenizer_model=tokenizer_model, text_style=text_style,
                                        verify_checksums=verify_checksums)
    else:
        raise TypeError(f"export_onnx needs an M2Encoder or a checkpoint path, got "
                        f"{type(encoder_or_path).__name__}")
    if enc.dtype != torch.float32 or enc.device.type != "cpu":
        raise OnnxExportError(f"the ONNX export runs an fp32 model on the CPU, but this "
                              f"M2Encoder is {enc.dtype} on {enc.device}: load it with "
                              f"M2Encoder.from_pretrained(path, device='cpu')")
    head = head or enc.head
    if head == "backbone" and not enc.model.has_backbone_heads:
        raise OnnxExportError("this model has no shared vision-language layers, so no "
                              "backbone head output: export head='vl'")
    if head != enc.head:  # a view of the same model through the other head
        enc = M2Encoder(enc.model, enc.cfg, enc.tokenizer, enc.device, enc.dtype, head,
                        enc.batch_size)
    return enc, source


# -- exporting -------------------------------------------------------------------------------
class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Keep the exporter's chatter out of the user's log: the registry warns once per
    torchvision operator it cannot register (this project has no torchvision; the graph never
    holds them), onnxscript's and onnx_ir's graph passes log every rewrite at INFO, torch's
    pytree helpers emit a FutureWarning of their own, and the naming of shared dynamic axes
    explains itself. Other warnings and errors still pass."""
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    drop = _DropMessages("torchvision is not installed")
    passes = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    levels = [lg.level for lg in passes]
    registry.addFilter(drop)
    for lg in passes:
        if lg.getEffectiveLevel() < logging.WARNING:
            lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)",
                                    category=FutureWarning)
            # Both text inputs share the axes "batch" and "text_len" (one Dim each): the
            # exporter names them once and says so for the second input.
            warnings.filterwarnings("ignore", message=r".*The axis name: .* will not be used",
                                    category=UserWarning)
            yield
    finally:
        registry.removeFilter(drop)
        for lg, level in zip(passes, levels):
            lg.setLevel(level)


def _strip_debug_metadata(model) -> None:
    """Remove the exporter's per-node and per-value debugging records (source file paths,
    stack traces, FX node text): they make up most of a small graph and say where it was
    built, which a serving artefact has no use for."""
    graphs = list(model.graphs()) + list(model.functions.values())
    for graph in graphs:
        for value in list(graph.inputs) + list(graph.outputs):
            value.metadata_props.clear()
        for node in graph:
            node.metadata_props.clear()
            for value in node.outputs:
                value.metadata_props.clear()
    for value in model.graph.initializers.values():
        value.metadata_props.clear()


def _export_tower(module: nn.Module, args: Tuple[torch.Tensor, ...], input_names: List[str],
                  output_name: str, dynamic_shapes: Dict[str, Dict[int, Any]], opset: int,
                  path: Path, external_data: Optional[bool], graph_name: str,
                  metadata: Dict[str, str]) -> None:
    with _quiet_exporter():
        program = torch.onnx.export(module, args, None, dynamo=True, opset_version=opset,
                                    input_names=input_names, output_names=[output_name],
                                    dynamic_shapes=dynamic_shapes, optimize=True, verbose=False)
    model = program.model
    _strip_debug_metadata(model)
    model.graph.name = graph_name
    model.doc_string = metadata["m2_encoder.description"]
    model.metadata_props.update(metadata)
    program.save(str(path), external_data=bool(external_data) or None)
    del program, model


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _io_spec(name: str, dtype: str, shape: Sequence[Union[str, int]]) -> Dict[str, Any]:
    return {"name": name, "dtype": dtype, "shape": list(shape)}


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# -- verification ----------------------------------------------------------------------------
def _verification_text(enc, count: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(ids, pad_mask)`` of ``count`` captions at the full ``max_text_len``: English and
    Chinese through the tokenizer, or framed random ids when the checkpoint has none."""
    cfg = enc.cfg
    if enc.tokenizer is not None:
        return enc.tokenizer(list(_VERIFY_CAPTIONS[:count]), max_length=cfg.max_text_len)
    g = torch.Generator().manual_seed(1)
    ids = torch.full((count, cfg.max_text_len), cfg.eos_token_id, dtype=torch.long)
    pad = torch.ones((count, cfg.max_text_len), dtype=torch.bool)
    for row in range(count):
        n = max(2, cfg.max_text_len - 2 * row - 1)
        ids[row, 1:n - 1] = torch.randint(0, cfg.vocab_size, (n - 2,), generator=g)
        ids[row, 0], ids[row, n - 1] = cfg.cls_token_id, cfg.eos_token_id
        pad[row, :n] = False
    return ids, pad


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the runtime's warnings are not the user's
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _verify(image_path: Path, text_path: Path, image: ImageTower, text: TextTower, enc,
            tolerance: float) -> Dict[str, Any]:
    """Run both files in onnxruntime on batches of 1 and 2 and compare with the PyTorch
    towers; returns the largest absolute differences, raises :class:`OnnxParityError` above
    ``tolerance``."""
    size = enc.cfg.image_size
    g = torch.Generator().manual_seed(0)
    worst = {"image": 0.0, "text": 0.0}
    session = _session(image_path)
    for n in (1, 2):
        x = torch.rand(n, 3, size, size, generator=g) * 2 - 1  # the normalised range
        with torch.no_grad():
            want = image(x)
        got = torch.from_numpy(session.run([IMAGE_OUTPUT], {IMAGE_INPUT: x.numpy()})[0])
        worst["image"] = max(worst["image"], float((got - want).abs().max()))
    del session
    session = _session(text_path)
    for n in (1, 2):
        ids, pad = _verification_text(enc, n)
        with torch.no_grad():
            want = text(ids, pad)
        used = max(2, int((~pad).sum(1).max()))
        for length in sorted({ids.shape[1], used}):  # full and trimmed text_len
            feed = {TEXT_INPUTS[0]: ids[:, :length].numpy(),
                    TEXT_INPUTS[1]: pad[:, :length].numpy()}
            got = torch.from_numpy(session.run([TEXT_OUTPUT], feed)[0])
            worst["text"] = max(worst["text"], float((got - want).abs().max()))
    del session
    for tower, path in (("image", image_path), ("text", text_path)):
        if not worst[tower] <= tolerance:
            raise OnnxParityError(f"{path.name}: onnxruntime's {tower} embeddings differ from "
                                  f"the PyTorch model's by {worst[tower]:.3g} > tolerance "
                                  f"{tolerance:g}")
    return {"image_max_abs_diff": worst["image"], "text_max_abs_diff": worst["text"],
            "batch_sizes": [1, 2], "tolerance": tolerance,
            "runtime": f"onnxruntime {_version('onnxruntime')} CPUExecutionProvider"}


# -- the manifest ----------------------------------------------------------------------------
def _preprocessing(enc) -> Dict[str, Any]:
    cfg, t = enc.cfg, enc.transform

    def per_channel(v):
        return [float(v)] * 3 if isinstance(v, (int, float)) else [float(c) for c in v]

    text: Dict[str, Any] = {
        "inputs": list(TEXT_INPUTS),
        "tokenizer": TOKENIZER_FILE if enc.tokenizer is not None else None,
        "text_style": enc.tokenizer.text_style if enc.tokenizer is not None else None,
        "framing": "[CLS] + pieces + <|endoftext|>, padded with pad_id to the batch's length",
        "cls_id": cfg.cls_token_id, "eos_id": cfg.eos_token_id, "pad_id": cfg.eos_token_id,
        "max_length": cfg.max_text_len,
        "pad_mask": "bool, True at padding (every position after the first <|endoftext|>)",
    }
    if enc.tokenizer is not None:
        official = enc.tokenizer.text_style == "official"
        text["truncation"] = ("keep the last pieces (left truncation)" if official else
                              "keep the first pieces (right truncation)")
        text["reference"] = ("megatron_m2.data.tokenizer.M2Tokenizer(tokenizer.model, "
                             f"max_length={cfg.max_text_len}, "
                             f"text_style={enc.tokenizer.text_style!r})")
    return {
        "image": {
            "input": IMAGE_INPUT,
            "color": "RGB; transparency composited onto white",
            "resize": {"size": [t.image_size, t.image_size], "interpolation": "bicubic",
                       "library": "Pillow (Image.resize, Image.Resampling.BICUBIC)",
                       "keep_aspect_ratio": False, "crop": None},
            "rescale": 1.0 / 255.0,
            "mean": per_channel(t.mean),
            "std": per_channel(t.std),
            "formula": "(pixel / 255 - mean) / std, per channel",
            "layout": "NCHW",
            "dtype": "float32",
            "reference": f"megatron_m2.data.transforms.eval_transform({t.image_size})",
        },
        "text": text,
    }


# -- the entry point -------------------------------------------------------------------------
def export_onnx(encoder_or_path, output_dir: Union[str, os.PathLike], *,
                opset: int = DEFAULT_OPSET, head: Optional[str] = None,
                external_data: Optional[bool] = None, verify: bool = True,
                tolerance: float = DEFAULT_TOLERANCE, overwrite: bool = False,
                tokenizer_model: Optional[str] = None, text_style: Optional[str] = None,
                verify_checksums: bool = True) -> Dict[str, Any]:
    """Export the image and text towers of an M2-Encoder to ONNX (see the module docstring for
    the folder written).

    Args:
        encoder_or_path: an fp32 CPU :class:`~megatron_m2.inference.M2Encoder`, or what
            :meth:`M2Encoder.from_pretrained <megatron_m2.inference.M2Encoder.from_pretrained>`
            reads (a ``--save`` directory, an ``iter_N`` directory, a ``.safetensors`` file;
            loading one creates the process-wide state ``M2Encoder`` needs).
        output_dir: the folder to write; it must not exist or be empty unless ``overwrite``.
        opset: ONNX opset, :data:`MIN_OPSET` to :data:`MAX_OPSET`.
        head: ITC head of the embeddings, ``"vl"`` or ``"backbone"`` (default: the encoder's
            own, ``"vl"`` for a path).
        external_data: True writes each tower's weights to ``<file>.onnx.data``; by default
            only towers over 1.5 GiB of weights do (they must: protobuf files stop at 2 GiB).
        verify: compare onnxruntime with PyTorch after export (needs onnxruntime).
        tolerance: the largest absolute embedding difference ``verify`` accepts.
        overwrite: write into a non-empty ``output_dir``, replacing the files of a previous
            export (other files are left alone).
        tokenizer_model: a SentencePiece model to use instead of the checkpoint's (paths only).
        text_style: the tokenizer's text style (paths only; default: the recorded one).
        verify_checksums: check the checkpoint's tensors against their recorded checksums.

    Returns:
        A summary: ``output``, ``opset``, ``head``, ``embed_dim``, ``image_size``,
        ``max_text_len``, ``logit_scale``, ``tokenizer`` (bool), ``text_style``, ``files``
        (``{name: bytes}``), ``parity`` (the differences measured, None without ``verify``)
        and ``seconds`` (``{"image", "text", "verify"}`` wall time).

    Raises:
        OnnxExportError: a bad option, an existing output, a missing package.
        OnnxParityError: onnxruntime disagrees with PyTorch beyond ``tolerance``.
    """
    _check_options(opset, head, tolerance)
    _require(("onnx", "onnxscript"), "the ONNX export")
    if verify:
        _require(("onnxruntime",), "checking the ONNX export (verify=False skips it)")
    out = Path(output_dir)
    _check_output(out, overwrite)
    enc, source = _encoder(encoder_or_path, head, tokenizer_model, text_style,
                           verify_checksums)
    cfg, model = enc.cfg, enc.model
    model.eval()
    image, text = ImageTower(model, enc.head).eval(), TextTower(model, enc.head).eval()
    logit_scale = enc.logit_scale
    common = {"m2_encoder.head": enc.head, "m2_encoder.embed_dim": str(cfg.embed_dim),
              "m2_encoder.logit_scale": repr(logit_scale),
              "m2_encoder.manifest": MANIFEST_FILE}

    out.parent.mkdir(parents=True, exist_ok=True)
    # Made with mkdir (not mkdtemp, whose 0700 would stay on the published folder).
    staging = out.parent / f".{out.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir()
    seconds: Dict[str, float] = {}
    try:
        from torch.export import Dim

        batch = Dim("batch", min=1)
        t0 = time.perf_counter()
        pixels = torch.zeros(2, 3, cfg.image_size, cfg.image_size)
        _export_tower(
            image, (pixels,), [IMAGE_INPUT], IMAGE_OUTPUT, {IMAGE_INPUT: {0: batch}}, opset,
            staging / IMAGE_FILE, external_data, "m2_image_encoder",
            dict(common, **{"m2_encoder.tower": "image", "m2_encoder.description": (
                f"M2-Encoder image tower: {IMAGE_INPUT} float32 [batch, 3, {cfg.image_size}, "
                f"{cfg.image_size}] -> {IMAGE_OUTPUT} float32 [batch, {cfg.embed_dim}], "
                f"L2-normalised ({enc.head} head)")}))
        seconds["image"] = time.perf_counter() - t0
        logger.info("ONNX: image tower exported in %.1f s", seconds["image"])

        t0 = time.perf_counter()
        ids, pad = _verification_text(enc, 2)
        text_axes: Dict[int, Any] = {0: batch}
        if cfg.max_text_len > 2:
            text_axes[1] = Dim("text_len", min=2, max=cfg.max_text_len)
        _export_tower(
            text, (ids, pad), list(TEXT_INPUTS), TEXT_OUTPUT,
            {TEXT_INPUTS[0]: text_axes, TEXT_INPUTS[1]: text_axes}, opset, staging / TEXT_FILE,
            external_data, "m2_text_encoder",
            dict(common, **{"m2_encoder.tower": "text", "m2_encoder.description": (
                f"M2-Encoder text tower: {TEXT_INPUTS[0]} int64 and {TEXT_INPUTS[1]} bool "
                f"(True at padding) [batch, text_len <= {cfg.max_text_len}] -> {TEXT_OUTPUT} "
                f"float32 [batch, {cfg.embed_dim}], L2-normalised ({enc.head} head)")}))
        seconds["text"] = time.perf_counter() - t0
        logger.info("ONNX: text tower exported in %.1f s", seconds["text"])

        import onnx

        for name in (IMAGE_FILE, TEXT_FILE):  # by path: external data and >2 GiB models too
            onnx.checker.check_model(str(staging / name), full_check=True)

        parity = None
        if verify:
            t0 = time.perf_counter()
            parity = _verify(staging / IMAGE_FILE, staging / TEXT_FILE, image, text, enc,
                             tolerance)
            seconds["verify"] = time.perf_counter() - t0
            logger.info("ONNX: onnxruntime matches PyTorch (max abs diff image %.2g, text "
                        "%.2g)", parity["image_max_abs_diff"], parity["text_max_abs_diff"])

        if enc.tokenizer is not None:
            (staging / TOKENIZER_FILE).write_bytes(enc.tokenizer.model_bytes())
        else:
            logger.warning("the checkpoint carries no tokenizer, so the export has no %s: "
                           "give one (m2-convert --tokenizer-model, or tokenizer_model=) to "
                           "make the folder self-contained", TOKENIZER_FILE)

        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                 for p in sorted(staging.iterdir())}
        text_len = "text_len" if cfg.max_text_len > 2 else cfg.max_text_len
        manifest = {
            "format": MANIFEST_FORMAT,
            "source": source,
            "model_config": cfg.to_dict(),
            "embed_dim": cfg.embed_dim,
            "image_size": cfg.image_size,
            "max_text_len": cfg.max_text_len,
            "head": enc.head,
            "logit_scale": logit_scale,
            "similarity": "logit_scale * image_embeds @ text_embeds.T (cosine similarities "
                          "scaled to logits)",
            "opset": opset,
            "image_encoder": {
                "file": IMAGE_FILE,
                "external_data": (IMAGE_FILE + ".data") if (IMAGE_FILE + ".data") in files
                else None,
                "inputs": [_io_spec(IMAGE_INPUT, "float32",
                                    ["batch", 3, cfg.image_size, cfg.image_size])],
                "outputs": [_io_spec(IMAGE_OUTPUT, "float32", ["batch", cfg.embed_dim])],
            },
            "text_encoder": {
                "file": TEXT_FILE,
                "external_data": (TEXT_FILE + ".data") if (TEXT_FILE + ".data") in files
                else None,
                "inputs": [_io_spec(TEXT_INPUTS[0], "int64", ["batch", text_len]),
                           _io_spec(TEXT_INPUTS[1], "bool", ["batch", text_len])],
                "outputs": [_io_spec(TEXT_OUTPUT, "float32", ["batch", cfg.embed_dim])],
                "text_len": {"min": 2, "max": cfg.max_text_len},
            },
            "preprocessing": _preprocessing(enc),
            "files": files,
            "parity": parity,
            "exporter": {"api": "torch.onnx.export(dynamo=True)",
                         "megatron_m2": __version__,
                         **{k: _version(k) for k in ("torch", "onnx", "onnxscript")}},
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False)
                                             + "\n", encoding="utf-8")
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.name in _OUR_FILES}
    return {"output": str(out), "opset": opset, "head": enc.head, "embed_dim": cfg.embed_dim,
            "image_size": cfg.image_size, "max_text_len": cfg.max_text_len,
            "logit_scale": logit_scale, "tokenizer": enc.tokenizer is not None,
            "text_style": enc.tokenizer.text_style if enc.tokenizer is not None else None,
            "files": sizes, "parity": parity,
            "seconds": {k: round(v, 2) for k, v in seconds.items()}}


def _publish(staging: Path, out: Path) -> None:
    """Move the finished export from ``staging`` to ``out``: a rename when ``out`` does not
    exist, else file by file, removing this export's files of a previous one that this one
    does not have (e.g. an external-data file)."""
    if not out.exists():
        os.replace(staging, out)
        return
    produced = {p.name for p in staging.iterdir()}
    for name in _OUR_FILES:
        if name not in produced and (out / name).is_file():
            (out / name).unlink()
    for name in sorted(produced, key=lambda n: n == MANIFEST_FILE):  # the manifest last
        os.replace(staging / name, out / name)
    staging.rmdir()
