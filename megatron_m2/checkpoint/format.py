"""The on-disk schema of every checkpoint format, in one place (torch-free at import).

A training checkpoint (:mod:`.distributed`; :mod:`.conversion` writes the model part only)::

    <save root>/
        latest_checkpointed_iteration.txt     TRACKER: the step of the newest complete checkpoint
        iter_0000100/                         iter_dir(root, step), written as iter_N.tmp/
            meta.json                         META_FILE: training_meta() / model_only_meta()
            model_pp000.safetensors           stage_file("model", 0): fp32 weights of stage 0
            optim_pp000.safetensors           stage_file("optim", 0): optim_key(state, name)
            rng_rank00000.safetensors / .json rng_file(rank): per-rank RNG states
            tokenizer.model                   TOKENIZER_FILE, when the run has a tokenizer

Every checkpoint file carries the run and step that wrote it (:data:`RUN_ID_KEY`,
:data:`STEP_KEY`) and per-tensor checksums (:mod:`.tensors`). A single inference file is one
safetensors file whose metadata says :data:`SINGLE_FILE_FORMAT` / :data:`SINGLE_FILE_VERSION`.

Tensors are stored under *canonical* names: the unsplit model's parameter names (global layer
index ``encoder.layers.{g}.``), full TP=1 shapes, ``cfg.vocab_size`` text-embedding rows. The
key table (:data:`GLOBAL_KEYS`, :data:`LAYER_KEYS`, :data:`LAYER_STACKS`) lists every canonical
name with its official-release counterpart; :func:`key_mapping` expands it for a config and
:func:`expected_shapes` gives each name its shape.

Parameters a later training objective adds (say a masked-language-model head ``cmlm_head.*``)
are declared with :func:`register_parameter_group`. Training checkpoints save, reshard and
resume them like any weight (and record the groups they hold in ``meta.json``, so that a
process that did not register them still reads the file); exports (single file, official
layout) leave training-only groups out unless asked; a checkpoint without them still loads for
inference and conversion, and a run that has them starts them fresh from such a checkpoint.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import re
import string
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ..config import M2ModelConfig
from .errors import ConversionError, StateDictKeyError, first_few

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION", "TRACKER", "META_FILE", "TOKENIZER_FILE", "TMP_SUFFIX", "RUN_ID_KEY",
    "STEP_KEY", "SINGLE_FILE_FORMAT", "SINGLE_FILE_VERSION", "MODEL_CONFIG_MUST_MATCH",
    "iter_dir", "iter_step", "stage_file", "stage_files", "rng_file", "optim_key",
    "layout_record", "training_meta", "model_only_meta", "tokenizer_record",
    "GLOBAL_KEYS", "LAYER_KEYS", "LAYER_STACKS", "TEXT_EMBED_KEY", "expand_pattern",
    "key_mapping", "layer_index", "expected_shapes", "is_extra_state", "strip_vocab_padding",
    "ParameterGroup", "register_parameter_group", "unregister_parameter_group",
    "parameter_groups", "group_of", "groups_record", "recorded_groups", "drop_training_only",
    "validate_state_dict", "canonicalize",
]

# -- files ---------------------------------------------------------------------------------------
FORMAT_VERSION = 1
"""``format_version`` of the ``meta.json`` of a training checkpoint."""
TRACKER = "latest_checkpointed_iteration.txt"
"""The tracker file of a save root: the step of its newest complete checkpoint."""
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.model"
TMP_SUFFIX = ".tmp"
"""A checkpoint is written into ``iter_N.tmp/`` and renamed when complete."""
RUN_ID_KEY, STEP_KEY = "m2_run_id", "m2_step"
"""Metadata entries of every checkpoint file: the run and step that wrote it."""
SINGLE_FILE_FORMAT = "megatron_m2.single_file"
"""Value of the ``format`` metadata entry of a single-file checkpoint."""
SINGLE_FILE_VERSION = "1"
"""Value of its ``format_version`` entry (the only version this package reads)."""
MODEL_CONFIG_MUST_MATCH = ("hidden_size", "num_attention_heads", "ffn_hidden_size",
                           "num_sep_layers", "num_vl_layers", "embed_dim", "vocab_size",
                           "image_size", "patch_size")
"""``model_config`` fields of ``meta.json`` a run loading the checkpoint must share."""

_ITER_RE = re.compile(r"^iter_(\d{7,})$")


def iter_dir(root: str, step: int) -> str:
    """``root/iter_NNNNNNN``: the directory of the checkpoint of ``step``."""
    return os.path.join(root, f"iter_{step:07d}")


def iter_step(name: str) -> Optional[int]:
    """The step of an ``iter_N`` directory name (None for any other name)."""
    m = _ITER_RE.match(name)
    return int(m.group(1)) if m else None


def stage_file(kind: str, pp: int) -> str:
    """``{kind}_ppNNN.safetensors``: the ``model`` or ``optim`` file of pipeline stage ``pp``."""
    return f"{kind}_pp{pp:03d}.safetensors"


def stage_files(names: Iterable[str], kind: str) -> List[str]:
    """The ``kind`` stage files among ``names`` (a directory listing), sorted."""
    return sorted(fn for fn in names if fn.startswith(kind + "_pp") and fn.endswith(".safetensors"))


def rng_file(rank: int) -> str:
    """``rng_rankNNNNN``: the RNG states of a rank, as ``.safetensors`` (torch) + ``.json``."""
    return f"rng_rank{rank:05d}"


def optim_key(state: str, name: str) -> str:
    """The entry of an optimizer stage file: ``exp_avg``, ``exp_avg_sq`` or ``step`` of the
    parameter ``name``."""
    return f"{state}/{name}"


# -- meta.json -----------------------------------------------------------------------------------
def layout_record(tp: int, pp: int, dp: Optional[int] = None,
                  world: Optional[int] = None) -> Dict[str, int]:
    """``meta.json``'s ``layout``; a model-only checkpoint records no ``dp``/``world`` (it never
    equals a running layout, so no per-rank RNG files are looked for)."""
    out = {"tp": tp, "pp": pp}
    if dp is not None:
        out.update(dp=dp, world=world)
    return out


def training_meta(meta: Mapping[str, Any], step: int, scheduler: Mapping[str, Any],
                  layout: Mapping[str, int], has_optimizer: bool,
                  groups: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """``meta.json`` of a training checkpoint: the run's ``meta`` (run_id, model_config, args,
    consumed_samples, flavor, tokenizer) with the step, format version, scheduler state, layout,
    whether optimizer states were saved and, when it holds any, its parameter groups."""
    out = dict(meta, step=step, format_version=FORMAT_VERSION, scheduler=dict(scheduler),
               layout=dict(layout), has_optimizer=has_optimizer or None)
    if groups:
        out["parameter_groups"] = dict(groups)
    return out


def model_only_meta(model_config: Mapping[str, Any], step: int, layout: Mapping[str, int],
                    flavor: Optional[str], source: Optional[str],
                    tokenizer: Optional[Mapping[str, Any]],
                    groups: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """``meta.json`` of a model-only checkpoint: the keys a training one has, less the scheduler
    (a run resuming from it starts its schedule fresh) and the run id."""
    out = {"model_config": dict(model_config),
           "args": {"converted_from": source} if source else {},
           "consumed_samples": 0,
           "flavor": flavor,
           "step": step,
           "format_version": FORMAT_VERSION,
           "layout": dict(layout),
           "has_optimizer": None,
           "tokenizer": tokenizer}
    if groups:
        out["parameter_groups"] = dict(groups)
    return out


def tokenizer_record(tokenizer_bytes: Optional[bytes], text_style: Optional[str]
                     ) -> Optional[Dict[str, Any]]:
    """``meta.json``'s ``tokenizer``: the identity of a tokenizer kept with weights (SHA-256,
    vocabulary, special ids and its text style: ``text_style`` or the model's default); None
    without a tokenizer."""
    if tokenizer_bytes is None:
        return None
    from ..data.identity import tokenizer_identity
    from ..data.tokenizer import M2Tokenizer

    return tokenizer_identity(M2Tokenizer.from_bytes(tokenizer_bytes, text_style=text_style))


# -- the key table -------------------------------------------------------------------------------
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

TEXT_EMBED_KEY = "embeddings.text_embed.weight"
_LAYER_RE = re.compile("^" + re.escape(LAYER_STACKS[0][1]).replace(r"\{g\}", r"(\d+)"))
_EXTRA_STATE_SUFFIX = "_extra_state"


def expand_pattern(ours: str, official: str, fixed: Mapping[str, Any]) -> List[Tuple[str, str]]:
    """All ``(ours, official)`` pairs of one pattern row, placeholders not in ``fixed``
    ranging over their values (``X``: A/B, ``p``: weight/bias, ``h``: the ITC heads)."""
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
        pairs += expand_pattern(ours, official, fixed)
    stack_layers = {"sep": range(cfg.num_sep_layers),
                    "vl": range(cfg.num_sep_layers, cfg.num_layers)}
    for stack, ours_prefix, official_prefix in LAYER_STACKS:
        for i, g in enumerate(stack_layers[stack]):
            layer = dict(fixed, g=g, i=i)
            for ours, official in LAYER_KEYS:
                pairs += expand_pattern(ours_prefix + ours, official_prefix + official, layer)
    return pairs


def layer_index(key: str) -> Optional[int]:
    """The global layer index of a canonical per-layer key (None outside the layers)."""
    m = _LAYER_RE.match(key)
    return int(m.group(1)) if m else None


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
    (TP=1, ``cfg.vocab_size`` text rows); computed from the config, nothing is allocated.
    Registered parameter groups are not included (see :class:`ParameterGroup`)."""
    return {ours: _expected_shape(ours, cfg) for ours, _ in key_mapping(cfg)}


def is_extra_state(key: str) -> bool:
    """Whether ``key`` is megatron's ``*._extra_state`` entry (not a weight)."""
    return key.rsplit(".", 1)[-1] == _EXTRA_STATE_SUFFIX


def strip_vocab_padding(name: str, t, cfg: M2ModelConfig):
    """``t`` without the vocabulary padding rows (tensor parallelism) when ``name`` is the
    text embedding; any other tensor unchanged."""
    if name == TEXT_EMBED_KEY:
        return t[:cfg.vocab_size]
    group = group_of(name)
    if group is not None and name in group.vocab_rows:
        return t[:cfg.vocab_size]
    return t


# -- parameter groups ----------------------------------------------------------------------------
ShapesFn = Callable[[M2ModelConfig], Mapping[str, Tuple[int, ...]]]


@dataclasses.dataclass(frozen=True)
class ParameterGroup:
    """Parameters outside the key table, all named ``prefix...`` (canonical names).

    Attributes:
        prefix: the names' common start, e.g. ``"cmlm_head."``; no base key starts with it.
        training_only: exports (single file, official layout) leave the group out unless
            asked; training checkpoints always keep it.
        shapes: ``cfg -> {canonical name: full shape}``, when known: a group present in a
            state dict must then be exactly these keys and shapes. None: any key under the
            prefix is accepted (a group recorded in a checkpoint but not registered here).
        stage: the pipeline stage whose file holds it in model-only checkpoints: ``"first"``
            (with the embeddings) or ``"last"`` (with the ITC heads).
        vocab_rows: names of tensors whose first dimension is the vocabulary, padded to a
            multiple of TP in the model as the text embedding is: saved with ``vocab_size``
            rows (:func:`strip_vocab_padding`), padded again when loaded.
    """

    prefix: str
    training_only: bool = True
    shapes: Optional[ShapesFn] = None
    stage: str = "last"
    description: str = ""
    vocab_rows: Tuple[str, ...] = ()

    def owns(self, key: str) -> bool:
        return key.startswith(self.prefix)

    def record(self) -> Dict[str, Any]:
        """What a checkpoint records of the group (``meta.json``'s ``parameter_groups``)."""
        return {"training_only": self.training_only, "stage": self.stage}


_GROUPS: Dict[str, ParameterGroup] = {}


def _base_roots() -> List[str]:
    """The literal starts of the key table's names, ours and official (before the first
    placeholder): a group's keys pass unchanged through both layouts."""
    patterns = [name for pair in GLOBAL_KEYS for name in pair]
    patterns += [prefix for _, ours, official in LAYER_STACKS for prefix in (ours, official)]
    return sorted({p.split("{", 1)[0] for p in patterns})


def _check_prefix(prefix: str, others: Iterable[str]) -> Optional[str]:
    if not isinstance(prefix, str) or not re.fullmatch(r"[A-Za-z0-9_.]+", prefix):
        return f"parameter group prefix {prefix!r}: expected letters, digits, '_' and '.'"
    for root in _base_roots():
        if prefix.startswith(root) or root.startswith(prefix):
            return (f"parameter group prefix {prefix!r} overlaps the model's own keys "
                    f"({root!r}...)")
    for other in others:
        if prefix.startswith(other) or other.startswith(prefix):
            return f"parameter group prefix {prefix!r} overlaps the group {other!r}"
    return None


def register_parameter_group(prefix: str, *, training_only: bool = True,
                             shapes: Optional[ShapesFn] = None, stage: str = "last",
                             description: str = "", replace: bool = False,
                             vocab_rows: Iterable[str] = ()) -> ParameterGroup:
    """Declare parameters outside the key table (see :class:`ParameterGroup`); returns it.

    Registering the same definition again is a no-op; another definition of a registered
    prefix needs ``replace=True``.

    Raises:
        ValueError: a malformed prefix, one overlapping the model's keys or another group, or
            an unknown ``stage``.
    """
    group = ParameterGroup(prefix, training_only, shapes, stage, description,
                           tuple(vocab_rows))
    if any(not name.startswith(prefix) for name in group.vocab_rows):
        raise ValueError(f"parameter group {prefix!r}: vocab_rows {group.vocab_rows} must be "
                         "names under the prefix")
    if stage not in ("first", "last"):
        raise ValueError(f"parameter group {prefix!r}: stage must be 'first' or 'last', "
                         f"got {stage!r}")
    if prefix in _GROUPS and (_GROUPS[prefix] == group or replace):
        _GROUPS[prefix] = group
        return group
    problem = _check_prefix(prefix, _GROUPS)
    if problem:
        raise ValueError(problem)
    _GROUPS[prefix] = group
    return group


def unregister_parameter_group(prefix: str) -> None:
    """Forget the group ``prefix`` (a no-op when it is not registered)."""
    _GROUPS.pop(prefix, None)


def parameter_groups() -> Tuple[ParameterGroup, ...]:
    """The registered groups."""
    return tuple(_GROUPS.values())


def group_of(key: str, groups: Optional[Sequence[ParameterGroup]] = None
             ) -> Optional[ParameterGroup]:
    """The group (registered ones by default) that owns ``key``, or None."""
    for group in parameter_groups() if groups is None else groups:
        if group.owns(key):
            return group
    return None


def groups_record(keys: Iterable[str], groups: Optional[Sequence[ParameterGroup]] = None
                  ) -> Dict[str, Dict[str, Any]]:
    """``{prefix: record}`` of the groups owning at least one of ``keys`` (empty when none:
    files without groups are written exactly as before groups existed)."""
    out: Dict[str, Dict[str, Any]] = {}
    for key in keys:
        group = group_of(key, groups)
        if group is not None:
            out.setdefault(group.prefix, group.record())
    return dict(sorted(out.items()))


def recorded_groups(record: Any, where: str) -> List[ParameterGroup]:
    """The registered groups plus those a file records (``parameter_groups``) that this process
    did not register (without shapes: their keys are accepted as they are).

    Raises:
        ConversionError: a malformed record.
    """
    groups = list(parameter_groups())
    if record is None:
        return groups
    if not isinstance(record, Mapping):
        raise ConversionError(f"{where}: invalid parameter_groups entry (not an object)")
    for prefix, entry in record.items():
        if prefix in _GROUPS:
            continue
        if not isinstance(entry, Mapping) or entry.get("stage", "last") not in ("first", "last"):
            raise ConversionError(f"{where}: invalid parameter_groups entry {prefix!r}")
        problem = _check_prefix(prefix, [g.prefix for g in groups])
        if problem:
            raise ConversionError(f"{where}: {problem}")
        groups.append(ParameterGroup(prefix, bool(entry.get("training_only", True)),
                                     stage=entry.get("stage", "last")))
    return groups


def drop_training_only(state_dict: Mapping[str, Any],
                       groups: Optional[Sequence[ParameterGroup]] = None, source: str = ""
                       ) -> Tuple[Dict[str, Any], Dict[str, int]]:
    """``(state_dict without training-only groups, {prefix: tensors left out})``; what was
    left out is logged at INFO."""
    kept: Dict[str, Any] = {}
    left_out: Dict[str, int] = {}
    for key, value in state_dict.items():
        group = group_of(key, groups)
        if group is not None and group.training_only:
            left_out[group.prefix] = left_out.get(group.prefix, 0) + 1
        else:
            kept[key] = value
    if left_out:
        logger.info("%sleft out %d training-only tensor(s): %s", f"{source}: " if source else "",
                    sum(left_out.values()),
                    ", ".join(f"{prefix}* ({n})" for prefix, n in sorted(left_out.items())))
    return kept, dict(sorted(left_out.items()))


# -- the canonical state dict --------------------------------------------------------------------
def validate_state_dict(state_dict: Mapping[str, Any], cfg: M2ModelConfig,
                        source: str = "state dict",
                        groups: Optional[Sequence[ParameterGroup]] = None) -> None:
    """Check that ``state_dict`` is exactly the canonical state dict of ``cfg``, plus any
    parameters of ``groups`` (the registered ones by default).

    Raises:
        StateDictKeyError: keys are missing or unknown (the message lists the first few), or a
            group's keys differ from its registered ones.
        ConversionError: a value is not a floating-point tensor, or a shape differs from
            :func:`expected_shapes` or a group's shapes (the message names the keys).
    """
    import torch

    groups = parameter_groups() if groups is None else groups
    shapes = expected_shapes(cfg)
    grouped = {k for k in state_dict if group_of(k, groups) is not None}
    present, expected = set(state_dict) - grouped, set(shapes)
    if present != expected:
        raise StateDictKeyError(f"{source} does not match the M2 layout of this model config",
                                missing=expected - present, unexpected=present - expected)
    for group in groups:
        keys = {k for k in grouped if group.owns(k)}
        if keys and group.shapes is not None:
            want = {k: tuple(s) for k, s in group.shapes(cfg).items()}
            if keys != set(want):
                raise StateDictKeyError(f"{source}: parameter group {group.prefix}* does not "
                                        f"match its registered keys", missing=set(want) - keys,
                                        unexpected=keys - set(want))
            shapes.update(want)
    not_float = sorted(k for k, v in state_dict.items()
                       if not (isinstance(v, torch.Tensor) and v.is_floating_point()))
    if not_float:
        raise ConversionError(f"{source}: {len(not_float)} entr(y/ies) not a floating-point "
                              f"tensor: {first_few(not_float)}")
    wrong = [f"{k} {tuple(state_dict[k].shape)} (expected {shape})"
             for k, shape in shapes.items() if tuple(state_dict[k].shape) != shape]
    if wrong:
        raise ConversionError(f"{source}: {len(wrong)} shape mismatch(es) with the model config "
                              f"(wrong flavor or config?): {first_few(wrong, 4)}")


def canonicalize(state_dict: Mapping[str, Any], cfg: M2ModelConfig,
                 source: str = "state dict", include_training: bool = False,
                 groups: Optional[Sequence[ParameterGroup]] = None) -> Dict[str, Any]:
    """The canonical state dict of a full (TP=1, PP=1) model's ``state_dict()``.

    Drops megatron's ``*._extra_state`` entries, vocabulary padding rows of the text embedding
    and (unless ``include_training``) training-only parameter groups, then
    :func:`validate_state_dict`. Tensors are shared with the input.
    """
    import torch

    out = {k: v for k, v in state_dict.items() if not is_extra_state(k)}
    if not include_training:
        out, _ = drop_training_only(out, groups, source)
    text = out.get(TEXT_EMBED_KEY)
    if isinstance(text, torch.Tensor) and text.dim() == 2 and text.shape[0] > cfg.vocab_size:
        out[TEXT_EMBED_KEY] = text[:cfg.vocab_size]
    validate_state_dict(out, cfg, source, groups)
    return out
