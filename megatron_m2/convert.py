"""Checkpoint conversion: official M2-Encoder release ↔ our training checkpoints ↔ one file.

Three formats hold the same weights:

``official``
    A release checkpoint of the official (torchscale) M2-Encoder: ``torch.save`` pickles
    (``.pt``/``.pth``/``.ckpt``/``.bin``), possibly wrapped and prefixed (see
    :func:`~megatron_m2.model.official.unwrap_official`), or ``.safetensors``. Official
    checkpoints carry no architecture; it is given by a flavor or a config.
``ours``
    Our training checkpoint (:mod:`megatron_m2.training.checkpointing`): a save root with a
    tracker and ``iter_N/`` holding ``meta.json`` and one ``model_ppNNN.safetensors`` per
    pipeline stage (canonical names, full TP=1 tensors, fp32). This module reads and writes the
    model part only; such a checkpoint loads with ``load_checkpoint`` onto any TP/PP layout.
``single``
    One safetensors file for serving: every tensor under its canonical name (TP=1, PP=1,
    vocabulary unpadded) and, in the file's metadata, the format tag, the model config and the
    SentencePiece model (base64) when there is one.

All three are read into the same *canonical* state dict: ``{our full parameter name: tensor}``,
exactly the parameters of a single-device :class:`~megatron_m2.model.M2EncoderModel`, with
``cfg.vocab_size`` text-embedding rows. :func:`validate_state_dict` checks its key set and every
shape against the config.

Safety: nothing is ever fully unpickled. Pickled official checkpoints are read with
``torch.load(..., weights_only=True)``, whose restricted unpickler accepts tensors and plain
containers only; a file that needs any other global is refused
(:class:`UnsafeCheckpointError`) before that global is imported or called. Everything else is
safetensors or JSON.

Command line: ``m2-convert`` / ``tools/convert_checkpoint.py``
(:mod:`megatron_m2.cli.convert`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import pickle
import re
import shutil
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from .config import ConfigError, M2ModelConfig
from .errors import UserError
from .model.init import _layer_index
from .model.official import (
    TEXT_EMBED_KEY,
    StateDictKeyError,
    _first_few,
    _is_extra_state,
    from_official,
    key_mapping,
    resize_release_positions,
    summarize_unused_keys,
    to_official,
    unwrap_official,
)
from .training.checkpointing import (
    FORMAT_VERSION,
    _fsync_dir,
    _fsync_file,
    iter_dir,
    publish_checkpoint,
    resolve_checkpoint,
)
from .utils.files import apply_umask
from .utils.tensor_files import TensorFile, load_tensors, save_tensors

logger = logging.getLogger(__name__)

__all__ = [
    "ConversionError", "UnsafeCheckpointError", "StateDictKeyError",
    "SINGLE_FILE_FORMAT", "SINGLE_FILE_VERSION", "FORMATS", "PICKLE_EXTENSIONS",
    "expected_shapes", "canonicalize", "validate_state_dict", "pipeline_stage_layers",
    "load_official", "save_official", "read_checkpoint", "write_model_checkpoint",
    "save_single_file", "load_single_file", "read_any", "convert",
]

SINGLE_FILE_FORMAT = "megatron_m2.single_file"
"""Value of the ``format`` metadata entry of a single-file checkpoint."""
SINGLE_FILE_VERSION = "1"
"""Value of its ``format_version`` entry (the only version this module reads)."""
FORMATS = ("official", "ours", "single")
"""The formats :func:`convert` reads and writes."""
PICKLE_EXTENSIONS = (".pt", ".pth", ".ckpt", ".bin")
"""File name endings read as ``torch.save`` pickles (with the restricted unpickler)."""

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
_REFUSED_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


class ConversionError(UserError, ValueError):
    """A checkpoint cannot be read or written as asked; the message names the file."""


class UnsafeCheckpointError(ConversionError):
    """A pickled checkpoint needs more than tensors and plain containers to load.

    Attributes:
        path: the refused file.
        refused_global: the ``module.name`` the restricted unpickler refused, when it said.
    """

    def __init__(self, path: str, refused_global: Optional[str], reason: str):
        self.path = path
        self.refused_global = refused_global
        what = (f"it references the global {refused_global!r}" if refused_global
                else f"the restricted unpickler stopped: {reason}")
        super().__init__(
            f"{path}: refused to load: {what}. Only plain tensors and containers (dict, list, "
            f"tuple, numbers, strings) are accepted from pickled checkpoints; nothing in the file "
            f"was executed. Convert it to .safetensors, or re-save a plain state dict, in an "
            f"environment you trust.")


# -- the canonical state dict --------------------------------------------------------------------
def _expected_shape(key: str, cfg: M2ModelConfig) -> Tuple[int, ...]:
    d, f, e, p = cfg.hidden_size, cfg.ffn_hidden_size, cfg.embed_dim, cfg.patch_size
    fixed = {
        "embeddings.vision_proj.weight": (d, cfg.in_channels, p, p),
        "embeddings.vision_proj.bias": (d,),
        "embeddings.cls_token": (1, 1, d),
        "embeddings.mask_token": (1, 1, d),
        TEXT_EMBED_KEY: (cfg.vocab_size, d),
        "embeddings.embed_positions.A.weight": (cfg.vision_pos_table, d),
        "embeddings.embed_positions.B.weight": (cfg.text_pos_table, d),
        "logit_scale": (),
        "logit_vl_scale": (),
    }
    if key in fixed:
        return fixed[key]
    if key.startswith("itc_"):
        return (e, d)
    is_weight = key.endswith(".weight")
    if ".linear_fc1." in key:
        return (f, d) if is_weight else (f,)
    if ".linear_fc2." in key:
        return (d, f) if is_weight else (d,)
    if ".ffn_norm." in key:
        return (f,)
    if any(f".linear_{n}." in key for n in ("q", "k", "v", "proj")):
        return (d, d) if is_weight else (d,)
    return (d,)  # every other LayerNorm: input, inner (Sub-LN), pre-MLP, final norms


def expected_shapes(cfg: M2ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Every canonical parameter name of the model described by ``cfg`` with its full shape
    (TP=1, ``cfg.vocab_size`` text rows); computed from the config, nothing is allocated."""
    return {ours: _expected_shape(ours, cfg) for ours, _ in key_mapping(cfg)}


def validate_state_dict(state_dict: Mapping[str, Any], cfg: M2ModelConfig,
                        source: str = "state dict") -> None:
    """Check that ``state_dict`` is exactly the canonical state dict of ``cfg``.

    Raises:
        StateDictKeyError: keys are missing or unknown (the message lists the first few).
        ConversionError: a value is not a floating-point tensor, or a shape differs from
            :func:`expected_shapes` (the message names the keys).
    """
    shapes = expected_shapes(cfg)
    present, expected = set(state_dict), set(shapes)
    if present != expected:
        raise StateDictKeyError(f"{source} does not match the M2 layout of this model config",
                                missing=expected - present, unexpected=present - expected)
    not_float = sorted(k for k, v in state_dict.items()
                       if not (isinstance(v, torch.Tensor) and v.is_floating_point()))
    if not_float:
        raise ConversionError(f"{source}: {len(not_float)} entr(y/ies) not a floating-point "
                              f"tensor: {_first_few(not_float)}")
    wrong = [f"{k} {tuple(state_dict[k].shape)} (expected {shape})"
             for k, shape in shapes.items() if tuple(state_dict[k].shape) != shape]
    if wrong:
        raise ConversionError(f"{source}: {len(wrong)} shape mismatch(es) with the model config "
                              f"(wrong flavor or config?): {_first_few(wrong, 4)}")


def canonicalize(state_dict: Mapping[str, Any], cfg: M2ModelConfig,
                 source: str = "state dict") -> Dict[str, torch.Tensor]:
    """The canonical state dict of a full (TP=1, PP=1) model's ``state_dict()``.

    Drops megatron's ``*._extra_state`` entries and vocabulary padding rows of the text
    embedding, then :func:`validate_state_dict`. Tensors are shared with the input.
    """
    out = {k: v for k, v in state_dict.items() if not _is_extra_state(k)}
    text = out.get(TEXT_EMBED_KEY)
    if isinstance(text, torch.Tensor) and text.dim() == 2 and text.shape[0] > cfg.vocab_size:
        out[TEXT_EMBED_KEY] = text[:cfg.vocab_size]
    validate_state_dict(out, cfg, source)
    return out


def pipeline_stage_layers(cfg: M2ModelConfig, pp: int, tp: int = 1) -> List[range]:
    """Global layer indices held by each of ``pp`` pipeline stages.

    The same assignment :class:`~megatron_m2.model.M2EncoderModel` builds (megatron-core's
    ``get_transformer_layer_offset`` / ``get_num_layers_to_build`` on our transformer config),
    computed without building a model or process groups.

    Raises:
        ConfigError: ``tp`` does not divide the heads or the FFN width, or ``pp`` does not
            divide the number of layers.
    """
    cfg.validate_parallel(tp, pp)
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from .model.transformer_config import to_transformer_config

    config = to_transformer_config(cfg, tp, pp, use_cpu_initialization=True)
    stages = []
    for rank in range(pp):
        offset = get_transformer_layer_offset(config, None, rank)
        stages.append(range(offset, offset + get_num_layers_to_build(config, None, rank)))
    return stages


def _stage_of(key: str, layer_stage: Mapping[int, int], pp: int) -> int:
    layer = _layer_index(key)
    if layer is not None:
        return layer_stage[layer]
    if key.startswith("embeddings."):
        return 0
    return pp - 1  # ITC heads, logit scales, the VL stack's final LayerNorm


def _standalone(t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``t`` (cast to ``dtype``) as a contiguous tensor owning its storage, so that it is
    written alone (no shared or oversized storage reaches the file)."""
    t = t.detach().to("cpu")
    if dtype is not None:
        t = t.to(dtype)
    t = t.contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset():
        t = t.clone()
    return t


def _parse_dtype(dtype: Union[None, str, torch.dtype]) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
    elif dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ConversionError(f"unsupported dtype {dtype!r}; choose fp32, bf16 or fp16")


def _tokenizer_record(tokenizer_bytes: Optional[bytes], text_style: Optional[str]
                      ) -> Optional[Dict[str, Any]]:
    """The identity of a tokenizer kept with weights (SHA-256, vocabulary, special ids and its
    text style: ``text_style`` or the model's default); None without a tokenizer."""
    if tokenizer_bytes is None:
        return None
    from .data.identity import tokenizer_identity
    from .data.tokenizer import M2Tokenizer

    return tokenizer_identity(M2Tokenizer.from_bytes(tokenizer_bytes, text_style=text_style))


def _atomic_write(path: str, write) -> None:
    """``write(tmp_path)``, fsync, then rename onto ``path`` (with the process umask's
    permissions: some writers create files private to their owner)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = path + ".tmp"
    try:
        write(tmp)
        apply_umask(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(parent)


# -- official ------------------------------------------------------------------------------------
# The release's config is a sacred config; a Lightning checkpoint keeps the module's init arguments
# under "hyper_parameters", so a run that hands sacred's read-only config to the module pickles
# these container classes there. They are read as the plain dict / list they wrap: the restricted
# unpickler resolves the names to the builtins, sacred is never imported, and every other global
# is still refused. (torch >= 2.6 maps a pickled name onto another callable; before, refused.)
_PLAIN_CONTAINER_ALIASES = ((dict, "sacred.config.custom_containers.ReadOnlyDict"),
                            (list, "sacred.config.custom_containers.ReadOnlyList"))


def _restricted_torch_load(path: str) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with :data:`_PLAIN_CONTAINER_ALIASES`."""
    aliases = contextlib.nullcontext()
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is not None and _torch_version() >= (2, 6):
        aliases = safe_globals(list(_PLAIN_CONTAINER_ALIASES))
    with aliases:
        return torch.load(path, map_location="cpu", weights_only=True)


def _torch_version() -> Tuple[int, ...]:
    match = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def load_official(path: str) -> Dict[str, torch.Tensor]:
    """The flat official state dict of a release checkpoint, read without unpickling code.

    ``.safetensors`` files are read with safetensors; anything else (``.pt``, ``.pth``,
    ``.ckpt``, ``.bin``) with ``torch.load(path, map_location="cpu", weights_only=True)``.
    Wrappers and the ``_forward_module.`` prefix are removed
    (:func:`~megatron_m2.model.official.unwrap_official`): a plain state dict, a Lightning
    checkpoint (``state_dict`` beside epoch, optimizer, scheduler, callback and loop states and
    ``hyper_parameters``) or a DeepSpeed ``mp_rank_00_model_states.pt`` (``module`` beside
    ``param_shapes``, ``ds_config``, ... and Lightning's client state). Non-tensor entries next to
    the weights are ignored. The weights the release defines but inference does not use
    (:data:`~megatron_m2.model.official.RELEASE_UNUSED_KEYS`) are kept and logged at INFO;
    :func:`~megatron_m2.model.official.from_official` skips them.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: the pickle needs a global other than tensors and plain
            containers (nothing in it is executed).
        ConversionError: the file holds no state dict.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        obj: Any = load_tensors(path)  # verified when it records checksums
    else:
        try:
            obj = _restricted_torch_load(path)
        except pickle.UnpicklingError as exc:
            text = str(exc)
            found = _REFUSED_GLOBAL_RE.search(text)
            reason = next((line.strip() for line in text.splitlines()
                           if "Unsupported" in line or "GLOBAL" in line), text.splitlines()[0])
            raise UnsafeCheckpointError(path, found.group(1) if found else None,
                                        reason) from None
        except (RuntimeError, EOFError, ValueError) as exc:  # not a torch/pickle file at all
            raise ConversionError(f"{path}: not a readable torch checkpoint: {exc}") from None
    try:
        flat = unwrap_official(obj)
    except ValueError as exc:
        raise ConversionError(f"{path}: {exc}") from None
    weights = {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}
    ignored = sorted(set(flat) - set(weights))
    if ignored:
        logger.info("%s: ignored %d non-tensor entr(y/ies): %s", path, len(ignored),
                    _first_few(ignored, 4))
    logger.info("read %d tensors from official checkpoint %s", len(weights), path)
    unused = summarize_unused_keys(weights)
    if unused["count"]:
        logger.info("%s: %d tensor(s) that the release's module defines but inference does not "
                    "use (skipped on conversion): %s", path, unused["count"],
                    ", ".join(f"{group}.* ({n})" for group, n in unused["groups"].items()))
    return weights


def save_official(path: str, state_dict: Mapping[str, torch.Tensor],
                  dtype: Union[None, str, torch.dtype] = None) -> None:
    """Write an official-layout state dict as a plain ``{key: tensor}`` dict.

    ``.safetensors`` paths are written with safetensors, anything else with ``torch.save``.
    ``dtype`` optionally casts every tensor (fp32, bf16, fp16). The write is atomic.
    """
    cast = None if dtype is None else _parse_dtype(dtype)
    tensors = {k: _standalone(v, cast) for k, v in state_dict.items()}
    if path.endswith(".safetensors"):
        _atomic_write(path, lambda tmp: save_tensors(tmp, tensors, metadata={"format": "pt"}))
    else:
        _atomic_write(path, lambda tmp: torch.save(tensors, tmp))
    logger.info("wrote official checkpoint %s (%d tensors)", path, len(tensors))


# -- ours ----------------------------------------------------------------------------------------
def read_checkpoint(path: str, verify: bool = True
                    ) -> Tuple[Dict[str, torch.Tensor], M2ModelConfig, Optional[bytes],
                                        Dict[str, Any]]:
    """The weights of one of our checkpoints: ``(state_dict, cfg, tokenizer_bytes, meta)``.

    ``path`` is a save root (its tracker names the checkpoint) or an ``iter_N`` directory.
    Every ``model_pp*.safetensors`` stage file is merged into one canonical state dict (fp32),
    validated against the ``model_config`` of ``meta.json``. ``tokenizer_bytes`` is the
    checkpoint's ``tokenizer.model`` (None without one). Optimizer and RNG states are not read.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ConversionError: no stage files, a tensor in two stage files, or no/invalid config.
        StateDictKeyError: weights missing or unknown.
    """
    directory, meta = resolve_checkpoint(path)
    meta_path = os.path.join(directory, "meta.json")
    if not isinstance(meta.get("model_config"), dict):
        raise ConversionError(f"{meta_path}: no model_config")
    try:
        cfg = M2ModelConfig.from_dict(meta["model_config"])
    except (ConfigError, TypeError) as exc:
        raise ConversionError(f"{meta_path}: invalid model_config: {exc}") from None
    files = sorted(fn for fn in os.listdir(directory)
                   if fn.startswith("model_pp") and fn.endswith(".safetensors"))
    if not files:
        raise ConversionError(f"{directory}: no model_pp*.safetensors weight files")
    state_dict: Dict[str, torch.Tensor] = {}
    for fn in files:
        part = load_tensors(os.path.join(directory, fn), verify)
        twice = sorted(set(part) & set(state_dict))
        if twice:
            raise ConversionError(f"{directory}/{fn}: tensor(s) also in another stage file: "
                                  f"{_first_few(twice, 4)}")
        state_dict.update(part)
    validate_state_dict(state_dict, cfg, f"checkpoint {directory}")
    tok_path = os.path.join(directory, "tokenizer.model")
    tokenizer = open(tok_path, "rb").read() if os.path.exists(tok_path) else None
    logger.info("read %d tensors from checkpoint %s (%d stage file(s))", len(state_dict),
                directory, len(files))
    return state_dict, cfg, tokenizer, meta


def write_model_checkpoint(root: str, state_dict: Mapping[str, torch.Tensor],
                           cfg: M2ModelConfig, pp: int = 1, tp: int = 1,
                           tokenizer_bytes: Optional[bytes] = None, step: int = 0, *,
                           flavor: Optional[str] = None, source: Optional[str] = None,
                           text_style: Optional[str] = None) -> str:
    """Write a model-only checkpoint in our format under save root ``root``; returns its dir.

    The result is what ``save_checkpoint`` writes minus optimizer and RNG states:
    ``iter_{step}/model_ppNNN.safetensors`` (fp32, canonical names, each tensor in the file of
    the pipeline stage that owns it: embeddings on stage 0; layers by megatron's uniform split,
    :func:`pipeline_stage_layers`; ITC heads, logit scales and the VL final LayerNorm on the last
    stage), ``meta.json``, ``tokenizer.model`` when given, then the tracker. Written to
    ``iter_N.tmp/``, fsynced, renamed, and only then is the tracker replaced, as
    :func:`~megatron_m2.training.checkpointing.save_checkpoint` does. ``load_checkpoint(root,
    model)`` loads it onto any TP/PP layout; ``tp``/``pp`` are recorded as ``layout`` and
    decide the stage files.

    Args:
        state_dict: canonical weights, or a full model's ``state_dict()`` (see
            :func:`canonicalize`).
        flavor, source: recorded in ``meta.json`` (``flavor``; ``args.converted_from``).
        text_style: the tokenizer's text style, recorded with it in ``meta.json``
            (``tokenizer``); None: the model's default.

    Raises:
        ConfigError: ``tp`` does not divide the heads or the FFN width, or ``pp`` the layers.
        StateDictKeyError, ConversionError: the state dict does not match ``cfg``.
    """
    if step < 0:
        raise ConversionError(f"step must be >= 0, got {step}")
    weights = canonicalize(state_dict, cfg)
    stages = pipeline_stage_layers(cfg, pp, tp)
    layer_stage = {g: rank for rank, layers in enumerate(stages) for g in layers}
    files: List[Dict[str, torch.Tensor]] = [{} for _ in range(pp)]
    for key, value in weights.items():
        files[_stage_of(key, layer_stage, pp)][key] = _standalone(value, torch.float32)

    tmp = iter_dir(root, step) + ".tmp"
    os.makedirs(root, exist_ok=True)
    if os.path.exists(tmp):  # left by an interrupted write
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    for rank, part in enumerate(files):
        path = os.path.join(tmp, f"model_pp{rank:03d}.safetensors")
        save_tensors(path, part)
        logger.info("  stage %d: %s (%d tensors)", rank, os.path.basename(path), len(part))
    # The keys save_checkpoint writes, less the scheduler (there is none to restore: a run
    # resuming from here starts its schedule fresh). layout has no "dp"/"world": it never equals
    # a running layout, so load_checkpoint does not look for the per-rank RNG files (none here).
    meta = {"model_config": cfg.to_dict(),
            "args": {"converted_from": source} if source else {},
            "consumed_samples": 0,
            "flavor": flavor,
            "step": step,
            "format_version": FORMAT_VERSION,
            "layout": {"tp": tp, "pp": pp},
            "has_optimizer": None,
            "tokenizer": _tokenizer_record(tokenizer_bytes, text_style)}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    if tokenizer_bytes is not None:
        with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
            f.write(tokenizer_bytes)
    for fn in os.listdir(tmp):
        apply_umask(os.path.join(tmp, fn))
    final = publish_checkpoint(root, step)
    logger.info("wrote checkpoint %s (layout tp=%d pp=%d, %d tensors%s)", final, tp, pp,
                len(weights), ", with tokenizer.model" if tokenizer_bytes is not None else "")
    return final


# -- single file ---------------------------------------------------------------------------------
def save_single_file(path: str, state_dict: Mapping[str, torch.Tensor], cfg: M2ModelConfig,
                     tokenizer_bytes: Optional[bytes] = None,
                     dtype: Union[None, str, torch.dtype] = None,
                     text_style: Optional[str] = None) -> None:
    """Write the serving checkpoint: one safetensors file with weights, config and tokenizer.

    Tensors are stored under their canonical names (TP=1, PP=1, vocabulary unpadded) in
    ``dtype`` (fp32 by default; bf16 or fp16). Metadata (str → str): ``format``
    (:data:`SINGLE_FILE_FORMAT`), ``format_version`` (:data:`SINGLE_FILE_VERSION`),
    ``model_config`` (JSON of ``cfg``) and, with a tokenizer, ``tokenizer_model_b64`` (the
    SentencePiece model, base64) and ``tokenizer_text_style`` (``text_style``, or the model's
    default). The write is atomic; the file gets the process umask's permissions.
    """
    cast = _parse_dtype(dtype)
    weights = canonicalize(state_dict, cfg)
    tensors = {k: _standalone(v, cast) for k, v in weights.items()}
    metadata = {"format": SINGLE_FILE_FORMAT, "format_version": SINGLE_FILE_VERSION,
                "model_config": json.dumps(cfg.to_dict(), sort_keys=True)}
    if tokenizer_bytes is not None:
        metadata["tokenizer_model_b64"] = base64.b64encode(tokenizer_bytes).decode("ascii")
        metadata["tokenizer_text_style"] = _tokenizer_record(tokenizer_bytes,
                                                             text_style)["text_style"]
    _atomic_write(path, lambda tmp: save_tensors(tmp, tensors, metadata=metadata))
    logger.info("wrote single-file checkpoint %s (%d tensors, %s%s)", path, len(tensors),
                str(cast).replace("torch.", ""),
                ", with tokenizer" if tokenizer_bytes is not None else "")


def load_single_file(path: str, verify: bool = True
                     ) -> Tuple[Dict[str, torch.Tensor], M2ModelConfig, Optional[bytes]]:
    """Read a file written by :func:`save_single_file`: ``(state_dict, cfg, tokenizer_bytes)``.

    Tensors keep their stored dtype (:func:`read_any` also returns the file's metadata); each
    is checked against its recorded checksum (``verify``).
    """
    state_dict, cfg, tokenizer, _ = _read_single(path, verify)
    return state_dict, cfg, tokenizer


def _read_single(path: str, verify: bool = True
                 ) -> Tuple[Dict[str, torch.Tensor], M2ModelConfig, Optional[bytes],
                            Dict[str, str]]:
    """:func:`load_single_file`, plus the file's metadata.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        IntegrityError: not a readable safetensors file, or a tensor that does not match its
            recorded checksum.
        ConversionError: a wrong ``format`` or ``format_version``, or an invalid config or
            tokenizer entry.
        StateDictKeyError: weights missing or unknown.
    """
    f = TensorFile(path, verify)
    metadata = f.metadata()
    fmt = metadata.get("format")
    if fmt != SINGLE_FILE_FORMAT:
        raise ConversionError(
            f"{path}: not a megatron_m2 single-file checkpoint (metadata format="
            f"{fmt!r}, expected {SINGLE_FILE_FORMAT!r})")
    version = metadata.get("format_version")
    if version != SINGLE_FILE_VERSION:
        raise ConversionError(
            f"{path}: unsupported single-file format_version {version!r} (this version "
            f"of megatron_m2 reads {SINGLE_FILE_VERSION!r})")
    try:
        cfg = M2ModelConfig.from_dict(json.loads(metadata["model_config"]))
    except KeyError:
        raise ConversionError(f"{path}: metadata has no model_config") from None
    except (ValueError, TypeError) as exc:
        raise ConversionError(f"{path}: invalid model_config metadata: {exc}") from None
    tokenizer = None
    if "tokenizer_model_b64" in metadata:
        try:
            tokenizer = base64.b64decode(metadata["tokenizer_model_b64"], validate=True)
        except ValueError as exc:
            raise ConversionError(f"{path}: invalid tokenizer_model_b64: {exc}") from None
    state_dict = f.load_all()  # the (large) tensors last, once the file is known to fit
    validate_state_dict(state_dict, cfg, path)
    logger.info("read %d tensors from single-file checkpoint %s", len(state_dict), path)
    return state_dict, cfg, tokenizer, metadata


# -- conversion ----------------------------------------------------------------------------------
def read_any(fmt: str, path: str, cfg: Optional[M2ModelConfig] = None, verify: bool = True
             ) -> Tuple[Dict[str, torch.Tensor], M2ModelConfig, Optional[bytes], Dict[str, Any]]:
    """Read ``path`` in format ``fmt`` into ``(canonical state dict, cfg, tokenizer, info)``.

    ``cfg`` is required for (and only used with) ``official`` inputs, which carry none.
    ``info`` holds what the source says about itself (``meta.json`` for ours), with
    ``text_style``: the recorded text style of the tokenizer (None when the source records
    none; ours and single files written by this version do); for official
    inputs, what reading it involved: ``unused_official_keys`` (the release's weights that
    inference does not use, skipped: :func:`~megatron_m2.model.official.summarize_unused_keys`)
    and ``resized`` (``{key: [rows before, rows after]}`` for a vision position table fitted to
    ``cfg``'s resolution, :func:`~megatron_m2.model.official.resize_release_positions`).
    """
    if fmt == "official":
        if cfg is None:
            raise ConversionError(f"{path}: official checkpoints carry no model config; give a "
                                  f"flavor or a model config")
        official = load_official(path)
        try:
            official, resized = resize_release_positions(official, cfg)
            state_dict = from_official(official, cfg)
        except StateDictKeyError as exc:
            raise StateDictKeyError(f"{path}: not an official M2 checkpoint of this config",
                                    exc.missing, exc.unexpected) from None
        except ValueError as exc:
            raise ConversionError(f"{path}: {exc}") from None
        expected = expected_shapes(cfg)
        wrong = [f"{off} {tuple(official[off].shape)} (expected {expected[ours]})"
                 for ours, off in key_mapping(cfg)
                 if tuple(official[off].shape) != expected[ours]]
        if wrong:
            raise ConversionError(f"{path}: {len(wrong)} shape mismatch(es) with the model "
                                  f"config (wrong flavor or config?): {_first_few(wrong, 4)}")
        validate_state_dict(state_dict, cfg, path)
        info = {"unused_official_keys": summarize_unused_keys(official), "resized": resized}
        return state_dict, cfg, None, info
    if fmt == "ours":
        state_dict, cfg, tokenizer, meta = read_checkpoint(path, verify)
        style = (meta.get("tokenizer") or {}).get("text_style")
        return state_dict, cfg, tokenizer, dict(meta, text_style=style)
    if fmt == "single":
        state_dict, cfg, tokenizer, metadata = _read_single(path, verify)
        return state_dict, cfg, tokenizer, {"text_style": metadata.get("tokenizer_text_style")}
    raise ConversionError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")


def convert(src: str, dst: str, input_path: str, output_path: str,
            cfg: Optional[M2ModelConfig] = None, tokenizer_bytes: Optional[bytes] = None,
            tp: int = 1, pp: int = 1, dtype: Union[None, str, torch.dtype] = None,
            flavor: Optional[str] = None, text_style: Optional[str] = None,
            verify: bool = True) -> Dict[str, Any]:
    """Convert ``input_path`` (format ``src``) to ``output_path`` (format ``dst``).

    ``cfg`` is needed for official inputs only. ``tokenizer_bytes`` replaces the input's
    tokenizer (ours and single carry one; official cannot). ``tp``/``pp`` apply to ``dst ==
    "ours"``, ``dtype`` to single and official outputs. ``text_style`` is recorded with the
    tokenizer (default: what the input records when its tokenizer is kept, else the tokenizer
    model's default, :func:`~megatron_m2.data.tokenizer.default_text_style`).

    Returns:
        A summary dict (``m2-convert`` prints it as JSON): ``from``, ``to``, ``input``,
        ``output``, ``tensors``, ``parameters``, ``tokenizer``, with ``tp``/``pp`` for ours
        outputs; for official inputs also ``unused_official_keys`` (``{"count": N, "groups":
        {module: n}}``, the release's weights that inference does not use, skipped) and
        ``resized`` (``{key: [rows before, rows after]}``, empty when nothing was resized).
    """
    for name, fmt in (("source", src), ("destination", dst)):
        if fmt not in FORMATS:
            raise ConversionError(f"unknown {name} format {fmt!r}; choose from "
                                  f"{', '.join(FORMATS)}")
    if dst == "ours" and dtype is not None and _parse_dtype(dtype) != torch.float32:
        raise ConversionError("our checkpoints store fp32 weights; --dtype applies to single "
                              "and official outputs")
    if dst != "ours" and (tp, pp) != (1, 1):
        raise ConversionError("tp/pp apply to --to ours only (the other formats are unsplit)")
    if dst == "ours" and cfg is not None:  # fail on the layout before reading a large input
        cfg.validate_parallel(tp, pp)
    state_dict, cfg, tokenizer, info = read_any(src, input_path, cfg, verify)
    if tokenizer_bytes is not None:
        tokenizer = tokenizer_bytes
    elif text_style is None:
        text_style = info.get("text_style")
    if flavor is None:
        flavor = info.get("flavor")
    if dst == "official":
        save_official(output_path, to_official(state_dict, cfg), dtype)
        if tokenizer is not None:
            logger.info("note: official checkpoints hold no tokenizer; it was not written")
    elif dst == "ours":
        write_model_checkpoint(output_path, state_dict, cfg, pp=pp, tp=tp,
                               tokenizer_bytes=tokenizer, flavor=flavor,
                               source=f"{src}:{os.path.abspath(input_path)}",
                               text_style=text_style)
    else:
        save_single_file(output_path, state_dict, cfg, tokenizer, dtype, text_style=text_style)
    summary = {"from": src, "to": dst, "input": input_path, "output": output_path,
               "tensors": len(state_dict),
               "parameters": sum(t.numel() for t in state_dict.values()),
               "tokenizer": tokenizer is not None and dst != "official",
               "text_style": (_tokenizer_record(tokenizer, text_style)["text_style"]
                              if tokenizer is not None and dst != "official" else None),
               **({"tp": tp, "pp": pp} if dst == "ours" else {})}
    if src == "official":  # what was skipped or adapted on the way in
        summary.update(unused_official_keys=info["unused_official_keys"],
                       resized=info["resized"])
    return summary
