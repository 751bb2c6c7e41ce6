"""Conversion between our state dict and the official M2-Encoder checkpoint layout.

Both directions work on *full* tensors: the state dict of a single-device model (TP=1, PP=1),
or one gathered to that layout. The renaming is driven by one table of ``(ours, official)`` key
patterns (:data:`GLOBAL_KEYS`, :data:`LAYER_KEYS`, :data:`LAYER_STACKS`), expanded for a given
:class:`~megatron_m2.config.M2ModelConfig` into the exact list of key pairs
(:func:`key_mapping`); :func:`to_official` and :func:`from_official` both read that list, so the
two directions cannot drift apart.

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

Official checkpoints are ``torch.save`` pickles, possibly wrapped (``state_dict``, ``module``,
``model``) and with a ``_forward_module.`` key prefix; :func:`unwrap_official` removes both. The
release's module also defines weights that our inference graph does not use
(:data:`RELEASE_UNUSED_KEYS`: ``norm``, ``pooler.dense``, the training-only ``visual_tokenizer``);
:func:`from_official` accepts and skips them (:func:`unused_official_keys` lists them), and refuses
any key the release never defines. Release *training* checkpoints may hold a vision position table
for another resolution; :func:`resize_release_positions` adapts it as the release's loader does.
"""

from __future__ import annotations

import itertools
import logging
import math
import string
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch.nn import functional as F

from ..config import M2ModelConfig
from ..errors import UserError

logger = logging.getLogger(__name__)

__all__ = ["StateDictKeyError", "GLOBAL_KEYS", "LAYER_KEYS", "LAYER_STACKS", "key_mapping",
           "RELEASE_UNUSED_KEYS", "unused_official_keys", "summarize_unused_keys",
           "resize_release_positions", "unwrap_official", "to_official", "from_official"]

# -- the mapping table ---------------------------------------------------------------------------
# Placeholders: {X} multiway branch, {p} weight/bias, {h} ITC head, {g} our global layer index,
# {i} the layer index inside an official stack, {Lsep} = cfg.num_sep_layers.
_PLACEHOLDER_VALUES: Dict[str, Tuple[str, ...]] = {
    "X": ("A", "B"),
    "p": ("weight", "bias"),
    "h": ("image", "text", "vl_image", "vl_text"),
}

GLOBAL_KEYS: Tuple[Tuple[str, str], ...] = (
    ("embeddings.vision_proj.{p}", "backbone.vision_embed.proj.{p}"),
    ("embeddings.cls_token", "backbone.vision_embed.cls_token"),
    ("embeddings.mask_token", "backbone.vision_embed.mask_token"),
    ("embeddings.text_embed.weight", "backbone.text_embed.weight"),
    ("embeddings.embed_positions.{X}.weight", "backbone.encoder.embed_positions.{X}.weight"),
    ("encoder.layers.{Lsep}.backbone_final_layernorm.{X}.{p}",
     "backbone.encoder.layer_norm.{X}.{p}"),
    ("encoder.final_layernorm.{X}.{p}", "backbone_vl.layer_norm.{X}.{p}"),
    ("itc_{h}_proj.weight", "itc_{h}_proj.fc.weight"),
    ("logit_scale", "logit_scale"),
    ("logit_vl_scale", "logit_vl_scale"),
)
"""Keys outside the per-layer modules: ``(ours, official)``."""

LAYER_KEYS: Tuple[Tuple[str, str], ...] = (
    ("input_layernorm.{X}.{p}", "self_attn_layer_norm.{X}.{p}"),
    ("self_attention.linear_q.{X}.{p}", "self_attn.q_proj.{X}.{p}"),
    ("self_attention.linear_k.{X}.{p}", "self_attn.k_proj.{X}.{p}"),
    ("self_attention.linear_v.{X}.{p}", "self_attn.v_proj.{X}.{p}"),
    ("self_attention.inner_norm.{X}.{p}", "self_attn.inner_attn_ln.{X}.{p}"),
    ("self_attention.linear_proj.{X}.{p}", "self_attn.out_proj.{X}.{p}"),
    ("pre_mlp_layernorm.{X}.{p}", "final_layer_norm.{X}.{p}"),
    # torchscale wraps the whole FFN in one MultiwayWrapper: the branch letter comes first.
    ("mlp.linear_fc1.{X}.{p}", "ffn.{X}.fc1.{p}"),
    ("mlp.ffn_norm.{X}.{p}", "ffn.{X}.ffn_layernorm.{p}"),
    ("mlp.linear_fc2.{X}.{p}", "ffn.{X}.fc2.{p}"),
)
"""Keys inside one transformer layer, relative to the layer prefixes of :data:`LAYER_STACKS`."""

LAYER_STACKS: Tuple[Tuple[str, str, str], ...] = (
    # (which layers, our prefix, official prefix)
    ("sep", "encoder.layers.{g}.", "backbone.encoder.layers.{i}."),
    ("vl", "encoder.layers.{g}.", "backbone_vl.layers.{i}."),
)
"""Layer prefixes of the two official stacks: ``backbone`` (the ``L_sep`` multiway layers) and
``backbone_vl`` (the ``L_vl`` shared layers, numbered from 0 again)."""

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

TEXT_EMBED_KEY = "embeddings.text_embed.weight"
VISION_POS_KEY = "backbone.encoder.embed_positions.A.weight"
_VISION_POS_PREFIX_ROWS = 3  # fairseq's 2 offset rows + the CLS position precede the patch grid

_EXTRA_STATE_SUFFIX = "_extra_state"

class StateDictKeyError(UserError, KeyError):
    """Keys are missing from, or unknown to, a state dict being converted.

    ``missing`` and ``unexpected`` hold the full sorted lists; the message names the first few.
    """

    def __init__(self, what: str, missing: Iterable[str] = (), unexpected: Iterable[str] = ()):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing key(s): {_first_few(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected key(s): "
                         f"{_first_few(self.unexpected)}")
        self.message = f"{what}: " + "; ".join(parts)
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would repr() the message (quotes, escaped newlines)
        return self.message


def _first_few(keys: Sequence[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def _expand(ours: str, official: str, fixed: Mapping[str, Any]) -> List[Tuple[str, str]]:
    """All ``(ours, official)`` pairs of one pattern row, placeholders not in ``fixed``
    ranging over :data:`_PLACEHOLDER_VALUES`."""
    names = {f for _, f, _, _ in string.Formatter().parse(ours + official) if f}
    free = sorted(names - set(fixed))
    unknown = [n for n in free if n not in _PLACEHOLDER_VALUES]
    if unknown:  # a typo in the table, not a user error
        raise AssertionError(f"unknown placeholder(s) {unknown} in {ours!r} / {official!r}")
    pairs = []
    for values in itertools.product(*(_PLACEHOLDER_VALUES[n] for n in free)):
        subst = dict(fixed, **dict(zip(free, values)))
        pairs.append((ours.format(**subst), official.format(**subst)))
    return pairs


def key_mapping(cfg: M2ModelConfig) -> List[Tuple[str, str]]:
    """Every ``(our key, official key)`` pair of the full model described by ``cfg``."""
    fixed = {"Lsep": cfg.num_sep_layers}
    pairs: List[Tuple[str, str]] = []
    for ours, official in GLOBAL_KEYS:
        pairs += _expand(ours, official, fixed)
    stack_layers = {"sep": range(cfg.num_sep_layers),
                    "vl": range(cfg.num_sep_layers, cfg.num_layers)}
    for stack, ours_prefix, official_prefix in LAYER_STACKS:
        for i, g in enumerate(stack_layers[stack]):
            layer = dict(fixed, g=g, i=i)
            for ours, official in LAYER_KEYS:
                pairs += _expand(ours_prefix + ours, official_prefix + official, layer)
    return pairs


# -- keys of the release that inference does not use ---------------------------------------------
def _unused_exact_and_prefixes() -> Tuple[Dict[str, Tuple[str, ...]], Tuple[str, ...]]:
    exact: Dict[str, Tuple[str, ...]] = {}
    prefixes = []
    for pattern, dims in RELEASE_UNUSED_KEYS:
        if pattern.endswith(".*"):
            prefixes.append(pattern[:-1])
        else:
            exact.update((key, dims) for key, _ in _expand(pattern, pattern, {}))
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
                         f"{_first_few(wrong, 4)}")


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
def _is_extra_state(key: str) -> bool:
    return key.rsplit(".", 1)[-1] == _EXTRA_STATE_SUFFIX


def _check_keys(what: str, present: Iterable[str], expected: Iterable[str]) -> None:
    present, expected = set(present), set(expected)
    if present != expected:
        raise StateDictKeyError(what, missing=expected - present, unexpected=present - expected)


def to_official(state_dict: Mapping[str, Any], cfg: M2ModelConfig) -> Dict[str, torch.Tensor]:
    """Rename our full (TP=1, PP=1) state dict to the official M2-Encoder layout.

    Args:
        state_dict: ``model.state_dict()`` of a single-device model (or one gathered to that
            layout). megatron's ``*._extra_state`` entries are skipped.
        cfg: the architecture; it fixes the exact key set expected.

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
        if _is_extra_state(key):
            skipped += 1
            continue
        weights[key] = value
    _check_keys("to_official: our state dict does not match the M2 layout",
                weights, (ours for ours, _ in mapping))

    out = {official: weights[ours] for ours, official in mapping}
    text = out["backbone.text_embed.weight"]
    if text.shape[0] < cfg.vocab_size:
        raise ValueError(f"{TEXT_EMBED_KEY} has {text.shape[0]} rows, fewer than vocab_size "
                         f"({cfg.vocab_size})")
    if text.shape[0] > cfg.vocab_size:
        out["backbone.text_embed.weight"] = text[:cfg.vocab_size].clone()
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
    (:func:`resize_release_positions`).

    Args:
        state_dict: the official weights, possibly still wrapped as released (see
            :func:`unwrap_official`, applied here).
        cfg: the architecture; it fixes the exact key set expected.
        target: optional destination, a model or its ``state_dict()``. When given, the result
            has exactly ``target``'s keys, so that a strict ``load_state_dict`` works: the text
            embedding is zero-padded to ``target``'s (vocabulary-padded) row count, non-weight
            entries (``*._extra_state``) are taken from ``target``, and every shape is checked
            against ``target``. Without it the result holds only the weights, with
            ``cfg.vocab_size`` text rows; megatron accepts the absent ``_extra_state`` entries,
            so ``model.load_state_dict(result)`` works at TP=1.

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
    _check_keys("from_official: the checkpoint does not match the official M2 layout",
                set(official) - set(unused), (off for _, off in mapping))
    if unused:
        logger.debug("from_official: skipped %d key(s) inference does not use: %s", len(unused),
                     summarize_unused_keys(unused)["groups"])
    out: Dict[str, Any] = {ours: official[off] for ours, off in mapping}
    rows = out[TEXT_EMBED_KEY].shape[0]
    if rows != cfg.vocab_size:
        raise ValueError(f"backbone.text_embed.weight has {rows} rows, expected vocab_size "
                         f"({cfg.vocab_size})")
    if target is None:
        return out

    if isinstance(target, torch.nn.Module):
        target = target.state_dict()
    # Sort the target's entries into weights (must be exactly ours) and extra state.
    ours_keys = set(out)
    extras = [key for key in target if _is_extra_state(key)]
    target_weights = {key for key in target if not _is_extra_state(key)}
    _check_keys("from_official: the target model's weights do not match the M2 layout",
                target_weights, ours_keys)

    text, target_rows = out[TEXT_EMBED_KEY], target[TEXT_EMBED_KEY].shape[0]
    if target_rows > text.shape[0]:  # vocabulary padded for tensor parallelism: zero rows
        pad = text.new_zeros((target_rows - text.shape[0],) + tuple(text.shape[1:]))
        out[TEXT_EMBED_KEY] = torch.cat([text, pad], dim=0)
    for key in extras:  # no official counterpart: keep the destination's own value
        out[key] = target[key]

    mismatched = [f"{k} {tuple(out[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
                  if isinstance(v, torch.Tensor) and isinstance(out[k], torch.Tensor)
                  and out[k].shape != v.shape]
    if mismatched:
        raise ValueError(f"from_official: {len(mismatched)} shape mismatch(es) (checkpoint vs "
                         f"target): {_first_few(mismatched)}")
    return out
