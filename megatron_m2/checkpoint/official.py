"""The official M2-Encoder release: reading and writing its files, and its key layout.

Both directions work on *full* tensors: the state dict of a single-device model (TP=1, PP=1),
or one gathered to that layout. The renaming is driven by the key table of
:mod:`megatron_m2.checkpoint.format` (``(ours, official)`` key patterns expanded for a given
:class:`~megatron_m2.config.M2ModelConfig` by :func:`~megatron_m2.checkpoint.format.key_mapping`);
:func:`to_official` and :func:`from_official` both read that list, so the two directions cannot
drift apart. Registered parameter groups keep their names in both layouts; :func:`to_official`
leaves training-only ones out unless asked.

Layout differences handled here:

* layer ``g`` of our single ``encoder`` block is ``backbone.encoder.layers.{g}`` for
  ``g < L_sep`` and ``backbone_vl.layers.{g - L_sep}`` otherwise;
* the backbone's final LayerNorm lives in our first VL layer (``backbone_final_layernorm``);
* our text embedding may have more rows than ``cfg.vocab_size`` (vocabulary padded for tensor
  parallelism; the pad rows are zero and never read): :func:`to_official` drops them,
  :func:`from_official` adds zero rows when given a ``target`` with a larger table;
* our ``state_dict()`` also holds entries that are not weights: megatron's ``*._extra_state``
  (``None`` for the local linears, FP8 metadata for Transformer Engine ones).
  :func:`to_official` skips them; :func:`from_official` takes them from ``target`` so that a strict
  ``model.load_state_dict(from_official(ckpt, cfg, target=model.state_dict()))`` succeeds.

Official checkpoints are ``torch.save`` pickles (or ``.safetensors``), possibly wrapped
(``state_dict``, ``module``, ``model``) and with a ``_forward_module.`` key prefix;
:func:`unwrap_official` removes both. The release's module also defines weights that our
inference graph does not use (:data:`RELEASE_UNUSED_KEYS`: ``norm``, ``pooler.dense``, the
training-only ``visual_tokenizer``); :func:`from_official` accepts and skips them
(:func:`unused_official_keys` lists them), and refuses any key the release never defines.
Release *training* checkpoints may hold a vision position table for another resolution;
:func:`resize_release_positions` adapts it as the release's loader does.

Safety: nothing is ever fully unpickled. Pickled checkpoints are read with
``torch.load(..., weights_only=True)``, whose restricted unpickler accepts tensors and plain
containers only; a file that needs any other global is refused
(:class:`~megatron_m2.checkpoint.UnsafeCheckpointError`) before that global is imported or
called (:func:`load_official`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch.nn import functional as F

from ..config import M2ModelConfig
from .atomic import atomic_write
from .errors import ConversionError, StateDictKeyError, UnsafeCheckpointError, first_few
from .format import (
    TEXT_EMBED_KEY,
    ParameterGroup,
    drop_training_only,
    expand_pattern,
    group_of,
    is_extra_state,
    key_mapping,
)
from .tensors import load_tensors, parse_dtype, save_tensors, standalone

logger = logging.getLogger(__name__)

__all__ = ["PICKLE_EXTENSIONS", "RELEASE_UNUSED_KEYS", "unused_official_keys",
           "summarize_unused_keys", "resize_release_positions", "unwrap_official", "to_official",
           "from_official", "load_official", "save_official"]

PICKLE_EXTENSIONS = (".pt", ".pth", ".ckpt", ".bin")
"""File name endings read as ``torch.save`` pickles (with the restricted unpickler)."""

# -- keys of the release that inference does not use ---------------------------------------------
RELEASE_UNUSED_KEYS: Tuple[Tuple[str, Optional[Tuple[str, ...]]], ...] = (
    # (official key pattern, shape in units of the config: "d" = hidden size). A pattern ending in
    # ".*" covers every key below that module, whatever its shape.
    ("norm.{p}", ("d",)),                 # VLMo.norm, LayerNorm(d): built, never applied
    ("pooler.dense.weight", ("d", "d")),  # heads.Pooler, Linear(d, d) + tanh: no ITC path uses it
    ("pooler.dense.bias", ("d",)),
    ("visual_tokenizer.*", None),         # BEiT-v2 VQ-KD tokenizer of the masked-image objective,
                                          # built for training only (absent when test_only)
)
"""Keys the release's ``VLMo`` module defines that our inference graph does not use. A release
checkpoint may hold them; they are accepted (``norm``/``pooler`` shapes checked), skipped and
listed, grouped by module (``norm``, ``pooler.dense``, ``visual_tokenizer``)."""

VISION_POS_KEY = "backbone.encoder.embed_positions.A.weight"
_VISION_POS_PREFIX_ROWS = 3  # fairseq's 2 offset rows + the CLS position precede the patch grid


def _unused_exact_and_prefixes() -> Tuple[Dict[str, Tuple[str, ...]], Tuple[str, ...]]:
    exact: Dict[str, Tuple[str, ...]] = {}
    prefixes = []
    for pattern, dims in RELEASE_UNUSED_KEYS:
        if pattern.endswith(".*"):
            prefixes.append(pattern[:-1])
        else:
            exact.update((key, dims) for key, _ in expand_pattern(pattern, pattern, {}))
    return exact, tuple(prefixes)


_UNUSED_EXACT, _UNUSED_PREFIXES = _unused_exact_and_prefixes()


def _unused_group(key: str) -> Optional[str]:
    """The module of :data:`RELEASE_UNUSED_KEYS` that ``key`` belongs to, or None."""
    if key in _UNUSED_EXACT:
        return key.rsplit(".", 1)[0]
    prefix = next((p for p in _UNUSED_PREFIXES if key.startswith(p)), None)
    return None if prefix is None else prefix[:-1]


def unused_official_keys(keys: Iterable[str]) -> List[str]:
    """The keys among ``keys`` that the release defines but our inference graph does not use
    (:data:`RELEASE_UNUSED_KEYS`), sorted. Decided by name only: shapes are checked by
    :func:`from_official`."""
    return sorted(k for k in keys if _unused_group(k) is not None)


def summarize_unused_keys(keys: Iterable[str]) -> Dict[str, Any]:
    """A short report of unused release keys: ``{"count": N, "groups": {module: n}}``.

    Keys not in :data:`RELEASE_UNUSED_KEYS` are not counted. The report has at most one entry per
    table module, however large the checkpoint.
    """
    groups: Dict[str, int] = {}
    for key in keys:
        group = _unused_group(key)
        if group is not None:
            groups[group] = groups.get(group, 0) + 1
    return {"count": sum(groups.values()), "groups": dict(sorted(groups.items()))}


def _check_unused_shapes(official: Mapping[str, Any], cfg: M2ModelConfig) -> None:
    size = {"d": cfg.hidden_size}
    wrong = []
    for key, dims in _UNUSED_EXACT.items():
        if key in official:
            expected = tuple(size[d] for d in dims)
            shape = tuple(getattr(official[key], "shape", ()))
            if shape != expected:
                wrong.append(f"{key} {shape} (expected {expected})")
    if wrong:
        raise ValueError(f"from_official: {len(wrong)} shape mismatch(es) in weights the release "
                         f"defines but inference does not use (wrong config?): "
                         f"{first_few(wrong, 4)}")


# -- the vision position table of release training checkpoints -----------------------------------
def resize_release_positions(official: Mapping[str, Any], cfg: M2ModelConfig
                             ) -> Tuple[Dict[str, Any], Dict[str, List[int]]]:
    """Fit the vision position table to ``cfg``'s resolution, as the release's loader does.

    The release trains at a lower resolution than it evaluates, so its training checkpoints may
    hold a vision position table (``backbone.encoder.embed_positions.A.weight``) with fewer rows
    than ``cfg.vision_pos_table``. Like the release's ``convert_pl_ckpt``, the first 3 rows (2
    offset rows and the CLS position) are kept and the square patch grid behind them is resized
    with ``F.interpolate(mode="area")`` in float32 (then cast back); a larger table is truncated to
    its first rows. (The release's DeepSpeed path area-resizes a larger square grid instead;
    training below the evaluation resolution, as the release does, only makes smaller tables.)

    Returns:
        ``(state dict, resized)``: a new dict (the same tensors but the resized one) and
        ``{key: [rows before, rows after]}``, empty when nothing was resized.

    Raises:
        ValueError: a smaller table whose rows past the first 3 do not form a square grid.
    """
    table = official.get(VISION_POS_KEY)
    want = cfg.vision_pos_table
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[0] == want:
        return dict(official), {}  # absent or not a table: the key and shape checks report it
    rows = table.shape[0]
    if rows > want:
        resized = table[:want]
    else:
        patches = rows - _VISION_POS_PREFIX_ROWS
        side, target = math.isqrt(max(patches, 0)), cfg.image_size // cfg.patch_size
        if patches <= 0 or side * side != patches:
            raise ValueError(
                f"{VISION_POS_KEY} has {rows} rows; expected {want} (3 + {cfg.num_patches} "
                f"patches), or 3 + a square patch grid to resize from (a release training "
                f"checkpoint at another resolution)")
        dim = table.shape[1]
        grid = table[_VISION_POS_PREFIX_ROWS:].float().reshape(1, side, side, dim)
        grid = F.interpolate(grid.permute(0, 3, 1, 2), size=(target, target), mode="area")
        grid = grid.to(table.dtype).permute(0, 2, 3, 1).reshape(-1, dim)
        resized = torch.cat([table[:_VISION_POS_PREFIX_ROWS], grid], dim=0)
    logger.info("resized %s from %d to %d rows (%s)", VISION_POS_KEY, rows, want,
                "truncated" if rows > want else "patch grid area-interpolated")
    out = dict(official)
    out[VISION_POS_KEY] = resized
    return out, {VISION_POS_KEY: [rows, want]}


# -- unwrapping a release checkpoint -------------------------------------------------------------
_WRAPPER_KEYS = ("state_dict", "module", "model")
_OFFICIAL_PREFIX = "_forward_module."


def unwrap_official(obj: Any) -> Dict[str, Any]:
    """The flat official state dict inside a loaded release checkpoint.

    Descends into the first of ``state_dict`` (Lightning), ``module`` (DeepSpeed), ``model`` that
    is present, as the release's loader does, repeatedly (wrappers may nest), and strips the
    ``_forward_module.`` key prefix (Lightning's DeepSpeed wrapper). Everything beside the chosen
    wrapper (epoch, optimizer and scheduler states, hyper-parameters) is left behind. A flat state
    dict is returned as a new dict with the same values. Keys are not filtered: the release's
    unused keys (:data:`RELEASE_UNUSED_KEYS`) are kept for :func:`from_official` to check and skip.

    Raises:
        ValueError: not a mapping, a wrapper entry that holds no mapping, a non-string key, or a
            key present both with and without the prefix.
    """
    while isinstance(obj, Mapping):
        wrapper = next((k for k in _WRAPPER_KEYS if k in obj), None)
        if wrapper is None:
            break
        if not isinstance(obj[wrapper], Mapping):
            raise ValueError(f"the checkpoint's {wrapper!r} entry holds "
                             f"{type(obj[wrapper]).__name__}, not a state dict")
        obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a (possibly wrapped) state dict, got {type(obj).__name__}")
    out: Dict[str, Any] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise ValueError(f"state dict keys must be strings, got {key!r}")
        name = key[len(_OFFICIAL_PREFIX):] if key.startswith(_OFFICIAL_PREFIX) else key
        if name in out:
            raise ValueError(f"key {name!r} occurs both with and without the "
                             f"{_OFFICIAL_PREFIX!r} prefix")
        out[name] = value
    return out


# -- conversion ----------------------------------------------------------------------------------
def _check_keys(what: str, present: Iterable[str], expected: Iterable[str]) -> None:
    present, expected = set(present), set(expected)
    if present != expected:
        raise StateDictKeyError(what, missing=expected - present, unexpected=present - expected)


def to_official(state_dict: Mapping[str, Any], cfg: M2ModelConfig,
                include_training: bool = False,
                groups: Optional[Sequence[ParameterGroup]] = None) -> Dict[str, torch.Tensor]:
    """Rename our full (TP=1, PP=1) state dict to the official M2-Encoder layout.

    Args:
        state_dict: ``model.state_dict()`` of a single-device model (or one gathered to that
            layout). megatron's ``*._extra_state`` entries are skipped.
        cfg: the architecture; it fixes the exact key set expected.
        include_training: keep registered training-only parameter groups (under their own
            names, as other registered groups are); by default they are left out.
        groups: the parameter groups to recognise (default: the registered ones).

    Returns:
        A new dict ``{official key: tensor}``; tensors are shared with the input except the text
        embedding, whose vocabulary padding rows (beyond ``cfg.vocab_size``) are dropped (a copy,
        so that saving it does not serialise the padded storage).

    Raises:
        StateDictKeyError: a weight of the model is missing or a key is unknown.
        ValueError: the text embedding has fewer than ``cfg.vocab_size`` rows.
    """
    mapping = key_mapping(cfg)
    weights: Dict[str, Any] = {}
    skipped = 0
    for key, value in state_dict.items():
        if is_extra_state(key):
            skipped += 1
            continue
        weights[key] = value
    if not include_training:
        weights, _ = drop_training_only(weights, groups, source="to_official")
    carried = {k: v for k, v in weights.items() if group_of(k, groups) is not None}
    _check_keys("to_official: our state dict does not match the M2 layout",
                set(weights) - set(carried), (ours for ours, _ in mapping))

    out = {official: weights[ours] for ours, official in mapping}
    text = out["backbone.text_embed.weight"]
    if text.shape[0] < cfg.vocab_size:
        raise ValueError(f"{TEXT_EMBED_KEY} has {text.shape[0]} rows, fewer than vocab_size "
                         f"({cfg.vocab_size})")
    if text.shape[0] > cfg.vocab_size:
        out["backbone.text_embed.weight"] = text[:cfg.vocab_size].clone()
    out.update(carried)
    logger.debug("to_official: %d tensors converted, %d non-weight entries skipped", len(out),
                 skipped)
    return out


def from_official(state_dict: Any, cfg: M2ModelConfig,
                  target: Union[Mapping[str, Any], torch.nn.Module, None] = None
                  ) -> Dict[str, Any]:
    """Rename an official M2-Encoder checkpoint to our full (TP=1, PP=1) layout.

    The keys of :data:`RELEASE_UNUSED_KEYS` (``norm.*``, ``pooler.dense.*``,
    ``visual_tokenizer.*``) are accepted and skipped (``norm``/``pooler`` shapes checked; see
    :func:`unused_official_keys` to list them); any other key the mapping does not know is refused.
    A vision position table of another resolution is resized first
    (:func:`resize_release_positions`). Keys of registered parameter groups keep their names.

    Args:
        state_dict: the official weights, possibly still wrapped as released (see
            :func:`unwrap_official`, applied here).
        cfg: the architecture; it fixes the exact key set expected.
        target: optional destination, a model or its ``state_dict()``. When given, the result
            has exactly ``target``'s keys, so that a strict ``load_state_dict`` works: the text
            embedding is zero-padded to ``target``'s (vocabulary-padded) row count, non-weight
            entries (``*._extra_state``) and registered parameter groups the checkpoint lacks
            are taken from ``target`` (groups it has but ``target`` lacks are left out), and
            every shape is checked against ``target``. Without it the result holds only the
            weights, with ``cfg.vocab_size`` text rows; megatron accepts the absent
            ``_extra_state`` entries, so ``model.load_state_dict(result)`` works at TP=1.

    Returns:
        A new dict ``{our key: tensor}``, sharing tensors with the input (except a padded text
        embedding).

    Raises:
        StateDictKeyError: an official weight is missing or a key is unknown, or ``target`` holds
            weights this mapping does not know (or lacks some it produces).
        ValueError: the text embedding does not have ``cfg.vocab_size`` rows, an unused
            ``norm``/``pooler`` weight or the vision position table has an impossible shape, or
            a shape differs from ``target``'s.
    """
    official, _ = resize_release_positions(unwrap_official(state_dict), cfg)
    unused = unused_official_keys(official)
    _check_unused_shapes(official, cfg)
    mapping = key_mapping(cfg)
    carried = {k: v for k, v in official.items() if group_of(k) is not None}
    _check_keys("from_official: the checkpoint does not match the official M2 layout",
                set(official) - set(unused) - set(carried), (off for _, off in mapping))
    if unused:
        logger.debug("from_official: skipped %d key(s) inference does not use: %s", len(unused),
                     summarize_unused_keys(unused)["groups"])
    out: Dict[str, Any] = {ours: official[off] for ours, off in mapping}
    out.update(carried)
    rows = out[TEXT_EMBED_KEY].shape[0]
    if rows != cfg.vocab_size:
        raise ValueError(f"backbone.text_embed.weight has {rows} rows, expected vocab_size "
                         f"({cfg.vocab_size})")
    if target is None:
        return out

    if isinstance(target, torch.nn.Module):
        target = target.state_dict()
    # Sort the target's entries into weights (must be exactly ours) and extra state.
    extras = [key for key in target if is_extra_state(key)]
    target_weights = {key for key in target if not is_extra_state(key)}
    for key in set(carried) - target_weights:  # a group the target model does not have
        del out[key]
    held = {group_of(k).prefix for k in out if group_of(k) is not None}
    extras += [k for k in target_weights  # a group the checkpoint lacks: the target's values
               if group_of(k) is not None and group_of(k).prefix not in held]
    _check_keys("from_official: the target model's weights do not match the M2 layout",
                target_weights - set(extras), set(out))

    text, target_rows = out[TEXT_EMBED_KEY], target[TEXT_EMBED_KEY].shape[0]
    if target_rows > text.shape[0]:  # vocabulary padded for tensor parallelism: zero rows
        pad = text.new_zeros((target_rows - text.shape[0],) + tuple(text.shape[1:]))
        out[TEXT_EMBED_KEY] = torch.cat([text, pad], dim=0)
    for key in extras:  # no official counterpart here: keep the destination's own value
        out[key] = target[key]

    mismatched = [f"{k} {tuple(out[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
                  if isinstance(v, torch.Tensor) and isinstance(out[k], torch.Tensor)
                  and out[k].shape != v.shape]
    if mismatched:
        raise ValueError(f"from_official: {len(mismatched)} shape mismatch(es) (checkpoint vs "
                         f"target): {first_few(mismatched)}")
    return out


# -- reading and writing release files ----------------------------------------------------------
_REFUSED_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")
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
    (:func:`unwrap_official`): a plain state dict, a Lightning
    checkpoint (``state_dict`` beside epoch, optimizer, scheduler, callback and loop states and
    ``hyper_parameters``) or a DeepSpeed ``mp_rank_00_model_states.pt`` (``module`` beside
    ``param_shapes``, ``ds_config``, ... and Lightning's client state). Non-tensor entries next to
    the weights are ignored. The weights the release defines but inference does not use
    (:data:`RELEASE_UNUSED_KEYS`) are kept and logged at INFO; :func:`from_official` skips them.

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
                    first_few(ignored, 4))
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
    cast = None if dtype is None else parse_dtype(dtype)
    tensors = {k: standalone(v, cast) for k, v in state_dict.items()}
    if path.endswith(".safetensors"):
        atomic_write(path, lambda tmp: save_tensors(tmp, tensors, metadata={"format": "pt"}))
    else:
        atomic_write(path, lambda tmp: torch.save(tensors, tmp))
    logger.info("wrote official checkpoint %s (%d tensors)", path, len(tensors))
