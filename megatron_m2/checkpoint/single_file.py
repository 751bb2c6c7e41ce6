"""The single inference file: one safetensors file with weights, config and tokenizer.

Tensors are stored under their canonical names (TP=1, PP=1, vocabulary unpadded); the file's
metadata (str → str) holds ``format`` (:data:`~megatron_m2.checkpoint.format.SINGLE_FILE_FORMAT`),
``format_version`` (:data:`~megatron_m2.checkpoint.format.SINGLE_FILE_VERSION`), ``model_config``
(JSON), and with a tokenizer ``tokenizer_model_b64`` (the SentencePiece model, base64) and
``tokenizer_text_style``. A file that keeps registered parameter groups (training-only ones only
when asked) records them in ``parameter_groups`` (JSON); files without groups do not have the
entry.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..config import M2ModelConfig
from .atomic import atomic_write
from .errors import ConversionError
from .format import (
    SINGLE_FILE_FORMAT,
    SINGLE_FILE_VERSION,
    ParameterGroup,
    canonicalize,
    drop_training_only,
    groups_record,
    recorded_groups,
    tokenizer_record,
    validate_state_dict,
)
from .tensors import TensorFile, parse_dtype, save_tensors, standalone

logger = logging.getLogger(__name__)

__all__ = ["save_single_file", "load_single_file", "read_single_file", "file_groups"]


def save_single_file(path: str, state_dict: Mapping[str, torch.Tensor], cfg: M2ModelConfig,
                     tokenizer_bytes: Optional[bytes] = None,
                     dtype: Union[None, str, torch.dtype] = None,
                     text_style: Optional[str] = None, include_training: bool = False,
                     groups: Optional[Sequence[ParameterGroup]] = None) -> None:
    """Write the serving checkpoint: one safetensors file with weights, config and tokenizer.

    Tensors are stored under their canonical names (TP=1, PP=1, vocabulary unpadded) in
    ``dtype`` (fp32 by default; bf16 or fp16). Metadata (str → str): ``format``
    (:data:`SINGLE_FILE_FORMAT`), ``format_version`` (:data:`SINGLE_FILE_VERSION`),
    ``model_config`` (JSON of ``cfg``) and, with a tokenizer, ``tokenizer_model_b64`` (the
    SentencePiece model, base64) and ``tokenizer_text_style`` (``text_style``, or the model's
    default). Training-only parameter groups (of ``groups``, default: the registered ones) are
    left out unless ``include_training``. The write is atomic; the file gets the process umask's
    permissions.
    """
    cast = parse_dtype(dtype)
    weights = canonicalize(state_dict, cfg, include_training=include_training, groups=groups)
    tensors = {k: standalone(v, cast) for k, v in weights.items()}
    metadata = {"format": SINGLE_FILE_FORMAT, "format_version": SINGLE_FILE_VERSION,
                "model_config": json.dumps(cfg.to_dict(), sort_keys=True)}
    if tokenizer_bytes is not None:
        metadata["tokenizer_model_b64"] = base64.b64encode(tokenizer_bytes).decode("ascii")
        metadata["tokenizer_text_style"] = tokenizer_record(tokenizer_bytes,
                                                            text_style)["text_style"]
    record = groups_record(tensors, groups)
    if record:
        metadata["parameter_groups"] = json.dumps(record, sort_keys=True)
    atomic_write(path, lambda tmp: save_tensors(tmp, tensors, metadata=metadata))
    logger.info("wrote single-file checkpoint %s (%d tensors, %s%s)", path, len(tensors),
                str(cast).replace("torch.", ""),
                ", with tokenizer" if tokenizer_bytes is not None else "")


def load_single_file(path: str, verify: bool = True, include_training: bool = False
                     ) -> Tuple[Dict[str, torch.Tensor], M2ModelConfig, Optional[bytes]]:
    """Read a file written by :func:`save_single_file`: ``(state_dict, cfg, tokenizer_bytes)``.

    Tensors keep their stored dtype (:func:`read_single_file` also returns the file's
    metadata); each is checked against its recorded checksum (``verify``). Training-only
    parameter groups the file holds are left out unless ``include_training``.
    """
    state_dict, cfg, tokenizer, _ = read_single_file(path, verify, include_training)
    return state_dict, cfg, tokenizer


def read_single_file(path: str, verify: bool = True, include_training: bool = False
                     ) -> Tuple[Dict[str, torch.Tensor], M2ModelConfig, Optional[bytes],
                                Dict[str, str]]:
    """:func:`load_single_file`, plus the file's metadata.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        IntegrityError: not a readable safetensors file, or a tensor that does not match its
            recorded checksum.
        ConversionError: a wrong ``format`` or ``format_version``, or an invalid config,
            tokenizer or parameter-group entry.
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
    groups = file_groups(metadata, path)
    state_dict = f.load_all()  # the (large) tensors last, once the file is known to fit
    if not include_training:
        state_dict, _ = drop_training_only(state_dict, groups, path)
    validate_state_dict(state_dict, cfg, path, groups)
    logger.info("read %d tensors from single-file checkpoint %s", len(state_dict), path)
    return state_dict, cfg, tokenizer, metadata


def file_groups(metadata: Mapping[str, str], path: str) -> List[ParameterGroup]:
    """The parameter groups a single file's ``metadata`` records, with the registered ones
    (:func:`~megatron_m2.checkpoint.format.recorded_groups`).

    Raises:
        ConversionError: an invalid ``parameter_groups`` entry.
    """
    record = None
    if "parameter_groups" in metadata:
        try:
            record = json.loads(metadata["parameter_groups"])
        except ValueError as exc:
            raise ConversionError(f"{path}: invalid parameter_groups metadata: {exc}") from None
    return recorded_groups(record, path)
