"""Every on-disk format of M2-Encoder weights, and the conversions between them.

=====================  ============================================================================
module                 holds
=====================  ============================================================================
``format``             the schema, in one place (torch-free): file and folder names, ``meta.json``
                       fields, canonical names and the key table, parameter groups
``meta``               where a checkpoint is and what its ``meta.json`` says (torch-free)
``lock``               one run per save folder (:class:`SaveLock`)
``tensors``            safetensors files with a SHA-256 per tensor
``atomic``             fsync, atomic writes, publishing a checkpoint behind its tracker
``distributed``        collective save / load of training checkpoints (any TP/PP/DP layout)
``official``           the official release: key layout, reading and writing its files
``single_file``        the single inference file
``conversion``         conversion between official, ours and single (``m2-convert``)
=====================  ============================================================================

Import what you need from this package (``from megatron_m2.checkpoint import load_checkpoint``):
names are resolved on first use, so importing the package, or the torch-free ``meta`` and
``format`` modules, does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Dict

_EXPORTS: Dict[str, tuple] = {
    "errors": ("CheckpointError", "IntegrityError", "ConversionError", "UnsafeCheckpointError",
               "StateDictKeyError"),
    "format": ("FORMAT_VERSION", "TRACKER", "SINGLE_FILE_FORMAT", "SINGLE_FILE_VERSION",
               "iter_dir", "key_mapping", "expected_shapes", "validate_state_dict",
               "canonicalize", "strip_vocab_padding", "ParameterGroup",
               "register_parameter_group", "unregister_parameter_group", "parameter_groups",
               "group_of"),
    "meta": ("latest_iteration", "resolve_checkpoint", "holds_checkpoint",
             "complete_iterations", "check_tensor_file"),
    "lock": ("LOCK_NAME", "SaveLock", "SaveLockError"),
    "tensors": ("CHECKSUM_KEY", "TensorFile", "save_tensors", "load_tensors", "tensor_digest"),
    "atomic": ("publish_checkpoint",),
    "distributed": ("save_checkpoint", "load_checkpoint", "load_model_weights",
                    "optimizer_state_holders", "FAULT_INJECTION_ENV"),
    "official": ("PICKLE_EXTENSIONS", "RELEASE_UNUSED_KEYS", "load_official", "save_official",
                 "to_official", "from_official", "unwrap_official", "unused_official_keys",
                 "summarize_unused_keys", "resize_release_positions"),
    "single_file": ("save_single_file", "load_single_file"),
    "conversion": ("FORMATS", "convert", "read_any", "read_checkpoint",
                   "write_model_checkpoint", "pipeline_stage_layers"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # resolved once
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
