"""Conversion between the formats: official release ↔ our training checkpoints ↔ one file.

Three formats hold the same weights:

``official``
    A release checkpoint of the official (torchscale) M2-Encoder (:mod:`.official`): ``torch.save``
    pickles (``.pt``/``.pth``/``.ckpt``/``.bin``), possibly wrapped and prefixed, or
    ``.safetensors``. Official checkpoints carry no architecture; it is given by a flavor or a
    config.
``ours``
    Our training checkpoint (:mod:`.distributed`): a save root with a tracker and ``iter_N/``
    holding ``meta.json`` and one ``model_ppNNN.safetensors`` per pipeline stage (canonical
    names, full TP=1 tensors, fp32). This module reads and writes the model part only; such a
    checkpoint loads with ``load_checkpoint`` onto any TP/PP layout.
``single``
    One safetensors file for serving (:mod:`.single_file`).

All three are read into the same *canonical* state dict: ``{our full parameter name: tensor}``,
exactly the parameters of a single-device :class:`~megatron_m2.model.M2EncoderModel`, with
``cfg.vocab_size`` text-embedding rows (:func:`~megatron_m2.checkpoint.format.validate_state_dict`
checks its key set and every shape against the config), plus any registered parameter groups.
Training-only groups travel from ours to ours; exports leave them out unless asked.

Command line: ``m2-convert`` / ``tools/convert_checkpoint.py`` (:mod:`megatron_m2.cli.convert`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..config import ConfigError, M2ModelConfig
from .atomic import publish_checkpoint
from .errors import ConversionError, StateDictKeyError, first_few
from .format import (
    META_FILE,
    TMP_SUFFIX,
    TOKENIZER_FILE,
    ParameterGroup,
    canonicalize,
    drop_training_only,
    expected_shapes,
    group_of,
    groups_record,
    iter_dir,
    key_mapping,
    layer_index,
    layout_record,
    model_only_meta,
    parameter_groups,
    recorded_groups,
    stage_file,
    stage_files,
    tokenizer_record,
    validate_state_dict,
)
from .meta import resolve_checkpoint
from .official import (
    from_official,
    load_official,
    resize_release_positions,
    save_official,
    summarize_unused_keys,
    to_official,
)
from .single_file import file_groups, read_single_file, save_single_file
from .tensors import load_tensors, parse_dtype, save_tensors, standalone

logger = logging.getLogger(__name__)

__all__ = ["FORMATS", "pipeline_stage_layers", "read_checkpoint", "write_model_checkpoint",
           "read_any", "convert"]

FORMATS = ("official", "ours", "single")
"""The formats :func:`convert` reads and writes."""


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

    from ..model.transformer_config import to_transformer_config

    config = to_transformer_config(cfg, tp, pp, use_cpu_initialization=True)
    stages = []
    for rank in range(pp):
        offset = get_transformer_layer_offset(config, None, rank)
        stages.append(range(offset, offset + get_num_layers_to_build(config, None, rank)))
    return stages


def _stage_of(key: str, layer_stage: Mapping[int, int], pp: int,
              groups: Optional[Sequence[ParameterGroup]]) -> int:
    layer = layer_index(key)
    if layer is not None:
        return layer_stage[layer]
    group = group_of(key, groups)
    if group is not None:
        return 0 if group.stage == "first" else pp - 1
    if key.startswith("embeddings."):
        return 0
    return pp - 1  # ITC heads, logit scales, the VL stack's final LayerNorm


# -- ours ----------------------------------------------------------------------------------------
def read_checkpoint(path: str, verify: bool = True, include_training: bool = False
                    ) -> Tuple[Dict[str, torch.Tensor], M2ModelConfig, Optional[bytes],
                               Dict[str, Any]]:
    """The weights of one of our checkpoints: ``(state_dict, cfg, tokenizer_bytes, meta)``.

    ``path`` is a save root (its tracker names the checkpoint) or an ``iter_N`` directory.
    Every ``model_pp*.safetensors`` stage file is merged into one canonical state dict (fp32),
    validated against the ``model_config`` of ``meta.json``. ``tokenizer_bytes`` is the
    checkpoint's ``tokenizer.model`` (None without one). Optimizer and RNG states are not read.
    Training-only parameter groups (registered, or recorded in ``meta.json``) are left out
    unless ``include_training``.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ConversionError: no stage files, a tensor in two stage files, or no/invalid config.
        StateDictKeyError: weights missing or unknown.
    """
    directory, meta = resolve_checkpoint(path)
    meta_path = os.path.join(directory, META_FILE)
    if not isinstance(meta.get("model_config"), dict):
        raise ConversionError(f"{meta_path}: no model_config")
    try:
        cfg = M2ModelConfig.from_dict(meta["model_config"])
    except (ConfigError, TypeError) as exc:
        raise ConversionError(f"{meta_path}: invalid model_config: {exc}") from None
    groups = recorded_groups(meta.get("parameter_groups"), meta_path)
    files = stage_files(os.listdir(directory), "model")
    if not files:
        raise ConversionError(f"{directory}: no model_pp*.safetensors weight files")
    state_dict: Dict[str, torch.Tensor] = {}
    for fn in files:
        part = load_tensors(os.path.join(directory, fn), verify)
        twice = sorted(set(part) & set(state_dict))
        if twice:
            raise ConversionError(f"{directory}/{fn}: tensor(s) also in another stage file: "
                                  f"{first_few(twice, 4)}")
        state_dict.update(part)
    if not include_training:
        state_dict, _ = drop_training_only(state_dict, groups, f"checkpoint {directory}")
    validate_state_dict(state_dict, cfg, f"checkpoint {directory}", groups)
    tok_path = os.path.join(directory, TOKENIZER_FILE)
    tokenizer = open(tok_path, "rb").read() if os.path.exists(tok_path) else None
    logger.info("read %d tensors from checkpoint %s (%d stage file(s))", len(state_dict),
                directory, len(files))
    return state_dict, cfg, tokenizer, meta


def write_model_checkpoint(root: str, state_dict: Mapping[str, torch.Tensor],
                           cfg: M2ModelConfig, pp: int = 1, tp: int = 1,
                           tokenizer_bytes: Optional[bytes] = None, step: int = 0, *,
                           flavor: Optional[str] = None, source: Optional[str] = None,
                           text_style: Optional[str] = None,
                           groups: Optional[Sequence[ParameterGroup]] = None) -> str:
    """Write a model-only checkpoint in our format under save root ``root``; returns its dir.

    The result is what ``save_checkpoint`` writes minus optimizer and RNG states:
    ``iter_{step}/model_ppNNN.safetensors`` (fp32, canonical names, each tensor in the file of
    the pipeline stage that owns it: embeddings on stage 0; layers by megatron's uniform split,
    :func:`pipeline_stage_layers`; ITC heads, logit scales and the VL final LayerNorm on the last
    stage; parameter groups where they say), ``meta.json``, ``tokenizer.model`` when given, then
    the tracker. Written to ``iter_N.tmp/``, fsynced, renamed, and only then is the tracker
    replaced, as :func:`~megatron_m2.checkpoint.save_checkpoint` does. ``load_checkpoint(root,
    model)`` loads it onto any TP/PP layout; ``tp``/``pp`` are recorded as ``layout`` and
    decide the stage files.

    Args:
        state_dict: canonical weights, or a full model's ``state_dict()`` (see
            :func:`~megatron_m2.checkpoint.format.canonicalize`); parameter groups in it
            (``groups``, default: the registered ones), training-only too, are kept.
        flavor, source: recorded in ``meta.json`` (``flavor``; ``args.converted_from``).
        text_style: the tokenizer's text style, recorded with it in ``meta.json``
            (``tokenizer``); None: the model's default.

    Raises:
        ConfigError: ``tp`` does not divide the heads or the FFN width, or ``pp`` the layers.
        StateDictKeyError, ConversionError: the state dict does not match ``cfg``.
    """
    if step < 0:
        raise ConversionError(f"step must be >= 0, got {step}")
    weights = canonicalize(state_dict, cfg, include_training=True, groups=groups)
    stages = pipeline_stage_layers(cfg, pp, tp)
    layer_stage = {g: rank for rank, layers in enumerate(stages) for g in layers}
    files: List[Dict[str, torch.Tensor]] = [{} for _ in range(pp)]
    for key, value in weights.items():
        files[_stage_of(key, layer_stage, pp, groups)][key] = standalone(value, torch.float32)

    tmp = iter_dir(root, step) + TMP_SUFFIX
    os.makedirs(root, exist_ok=True)
    if os.path.exists(tmp):  # left by an interrupted write
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    for rank, part in enumerate(files):
        path = os.path.join(tmp, stage_file("model", rank))
        save_tensors(path, part)
        logger.info("  stage %d: %s (%d tensors)", rank, os.path.basename(path), len(part))
    meta = model_only_meta(cfg.to_dict(), step, layout_record(tp, pp), flavor, source,
                           tokenizer_record(tokenizer_bytes, text_style),
                           groups_record(weights, groups))
    with open(os.path.join(tmp, META_FILE), "w") as f:
        json.dump(meta, f, indent=1)
    if tokenizer_bytes is not None:
        with open(os.path.join(tmp, TOKENIZER_FILE), "wb") as f:
            f.write(tokenizer_bytes)
    from ..utils.files import apply_umask

    for fn in os.listdir(tmp):
        apply_umask(os.path.join(tmp, fn))
    final = publish_checkpoint(root, step)
    logger.info("wrote checkpoint %s (layout tp=%d pp=%d, %d tensors%s)", final, tp, pp,
                len(weights), ", with tokenizer.model" if tokenizer_bytes is not None else "")
    return final


# -- conversion ----------------------------------------------------------------------------------
def _read_official(path: str, cfg: Optional[M2ModelConfig]):
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
                              f"config (wrong flavor or config?): {first_few(wrong, 4)}")
    validate_state_dict(state_dict, cfg, path)
    return state_dict, {"unused_official_keys": summarize_unused_keys(official),
                        "resized": resized}


def read_any(fmt: str, path: str, cfg: Optional[M2ModelConfig] = None, verify: bool = True,
             include_training: bool = False
             ) -> Tuple[Dict[str, torch.Tensor], M2ModelConfig, Optional[bytes], Dict[str, Any]]:
    """Read ``path`` in format ``fmt`` into ``(canonical state dict, cfg, tokenizer, info)``.

    ``cfg`` is required for (and only used with) ``official`` inputs, which carry none.
    ``info`` holds what the source says about itself (``meta.json`` for ours), with
    ``text_style``: the recorded text style of the tokenizer (None when the source records
    none; ours and single files written by this version do); for official
    inputs, what reading it involved: ``unused_official_keys`` (the release's weights that
    inference does not use, skipped: :func:`~megatron_m2.checkpoint.summarize_unused_keys`)
    and ``resized`` (``{key: [rows before, rows after]}`` for a vision position table fitted to
    ``cfg``'s resolution, :func:`~megatron_m2.checkpoint.resize_release_positions`).
    ``known_groups`` lists the parameter groups of the input (registered, or recorded in it);
    ``left_out`` counts the tensors of training-only groups left out (``{prefix: n}``; kept
    with ``include_training``).
    """
    if fmt == "official":
        state_dict, info = _read_official(path, cfg)
        tokenizer, groups = None, list(parameter_groups())
    elif fmt == "ours":
        state_dict, cfg, tokenizer, meta = read_checkpoint(path, verify, include_training=True)
        groups = recorded_groups(meta.get("parameter_groups"), path)
        info = dict(meta, text_style=(meta.get("tokenizer") or {}).get("text_style"))
    elif fmt == "single":
        state_dict, cfg, tokenizer, metadata = read_single_file(path, verify,
                                                                include_training=True)
        groups = file_groups(metadata, path)
        info = {"text_style": metadata.get("tokenizer_text_style")}
    else:
        raise ConversionError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    left_out: Dict[str, int] = {}
    if not include_training:
        state_dict, left_out = drop_training_only(state_dict, groups, path)
    info.update(known_groups=groups, left_out=left_out)
    return state_dict, cfg, tokenizer, info


def convert(src: str, dst: str, input_path: str, output_path: str,
            cfg: Optional[M2ModelConfig] = None, tokenizer_bytes: Optional[bytes] = None,
            tp: int = 1, pp: int = 1, dtype: Union[None, str, torch.dtype] = None,
            flavor: Optional[str] = None, text_style: Optional[str] = None,
            verify: bool = True, include_training: bool = False) -> Dict[str, Any]:
    """Convert ``input_path`` (format ``src``) to ``output_path`` (format ``dst``).

    ``cfg`` is needed for official inputs only. ``tokenizer_bytes`` replaces the input's
    tokenizer (ours and single carry one; official cannot). ``tp``/``pp`` apply to ``dst ==
    "ours"``, ``dtype`` to single and official outputs. ``text_style`` is recorded with the
    tokenizer (default: what the input records when its tokenizer is kept, else the tokenizer
    model's default, :func:`~megatron_m2.data.tokenizer.default_text_style`). Training-only
    parameter groups are kept in ours outputs, and in single and official ones only with
    ``include_training``.

    Returns:
        A summary dict (``m2-convert`` prints it as JSON): ``from``, ``to``, ``input``,
        ``output``, ``tensors``, ``parameters``, ``tokenizer``, with ``tp``/``pp`` for ours
        outputs; for official inputs also ``unused_official_keys`` (``{"count": N, "groups":
        {module: n}}``, the release's weights that inference does not use, skipped) and
        ``resized`` (``{key: [rows before, rows after]}``, empty when nothing was resized);
        ``left_out`` (``{prefix: tensors}``) when training-only groups were left out.
    """
    for name, fmt in (("source", src), ("destination", dst)):
        if fmt not in FORMATS:
            raise ConversionError(f"unknown {name} format {fmt!r}; choose from "
                                  f"{', '.join(FORMATS)}")
    if dst == "ours" and dtype is not None and parse_dtype(dtype) != torch.float32:
        raise ConversionError("our checkpoints store fp32 weights; --dtype applies to single "
                              "and official outputs")
    if dst != "ours" and (tp, pp) != (1, 1):
        raise ConversionError("tp/pp apply to --to ours only (the other formats are unsplit)")
    if dst == "ours" and cfg is not None:  # fail on the layout before reading a large input
        cfg.validate_parallel(tp, pp)
    state_dict, cfg, tokenizer, info = read_any(src, input_path, cfg, verify,
                                                include_training=include_training or
                                                dst == "ours")
    groups = info["known_groups"]
    if tokenizer_bytes is not None:
        tokenizer = tokenizer_bytes
    elif text_style is None:
        text_style = info.get("text_style")
    if flavor is None:
        flavor = info.get("flavor")
    if dst == "official":
        save_official(output_path, to_official(state_dict, cfg, include_training, groups),
                      dtype)
        if tokenizer is not None:
            logger.info("note: official checkpoints hold no tokenizer; it was not written")
    elif dst == "ours":
        write_model_checkpoint(output_path, state_dict, cfg, pp=pp, tp=tp,
                               tokenizer_bytes=tokenizer, flavor=flavor,
                               source=f"{src}:{os.path.abspath(input_path)}",
                               text_style=text_style, groups=groups)
    else:
        save_single_file(output_path, state_dict, cfg, tokenizer, dtype, text_style=text_style,
                         include_training=include_training, groups=groups)
    summary = {"from": src, "to": dst, "input": input_path, "output": output_path,
               "tensors": len(state_dict),
               "parameters": sum(t.numel() for t in state_dict.values()),
               "tokenizer": tokenizer is not None and dst != "official",
               "text_style": (tokenizer_record(tokenizer, text_style)["text_style"]
                              if tokenizer is not None and dst != "official" else None),
               **({"tp": tp, "pp": pp} if dst == "ours" else {})}
    if src == "official":  # what was skipped or adapted on the way in
        summary.update(unused_official_keys=info["unused_official_keys"],
                       resized=info["resized"])
    if info["left_out"]:
        summary["left_out"] = info["left_out"]
    return summary
