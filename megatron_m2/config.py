"""Typed configuration of the M2-Encoder architecture.

:class:`M2ModelConfig` holds the architecture (what a checkpoint needs to be rebuilt); how it is
parallelised and trained lives elsewhere (:mod:`megatron_m2.parallel`, :mod:`megatron_m2.training`).
:func:`megatron_m2.model.transformer_config.to_transformer_config` turns it into the megatron-core
``TransformerConfig`` our layer specs read. This module imports neither torch nor megatron-core,
so command-line validation is instant.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Optional

from .errors import ConfigError

__all__ = ["M2ModelConfig", "ConfigError", "load_model_config"]


@dataclass
class M2ModelConfig:
    """Architecture of one M2-Encoder flavor (BEiT-3 multiway encoder with Sub-LN).

    Defaults are the official 0.4B flavor.
    """

    hidden_size: int = 768
    """Model width d (both towers and the shared VL stack)."""
    num_attention_heads: int = 12
    """Attention heads per layer; head_dim = hidden_size / num_attention_heads."""
    ffn_hidden_size: int = 3072
    """FFN inner width d_ffn."""
    num_sep_layers: int = 9
    """L_sep: layers of the `backbone` stack; every module has a vision (A) and a text (B) copy."""
    num_vl_layers: int = 3
    """L_vl: layers of the `backbone_vl` stack, whose branch A serves both modalities."""
    embed_dim: int = 768
    """Width of the four ITC heads' outputs (the retrieval embedding)."""
    image_size: int = 224
    """Input image side (square) in pixels."""
    patch_size: int = 16
    """Patch side of the Conv2d patch embedding."""
    in_channels: int = 3
    """Image channels."""
    max_text_len: int = 52
    """Text tokens per caption, [CLS] + pieces + <|endoftext|> padded to this length."""
    vocab_size: int = 115_244
    """Tokenizer vocabulary (the official GLM SentencePiece model has 115,244 pieces)."""
    text_pos_table: int = 1024
    """Rows of the learned text position table (positions start at index 2, fairseq style)."""
    layernorm_epsilon: float = 1e-5
    """LayerNorm epsilon everywhere."""
    init_method_std: float = 0.02
    """Std of the normal init of linear weights, position tables, CLS token and ITC heads."""
    logit_scale_init: float = math.log(1 / 0.07)
    """Initial value of both learnable log-temperatures."""
    logit_scale_max: float = math.log(100.0)
    """Upper clamp of the log-temperatures in the loss (CLIP convention)."""
    eos_token_id: int = 50000
    """<|endoftext|>, also the padding id."""
    cls_token_id: int = 50002
    """[CLS], the first token of every caption; its output is the text embedding."""

    def __post_init__(self):
        self.validate()

    # -- derived sizes -------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """Total transformer layers (backbone + VL)."""
        return self.num_sep_layers + self.num_vl_layers

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def vision_seq_len(self) -> int:
        """s_v: CLS + patches; the split point of the packed multiway sequence."""
        return self.num_patches + 1

    @property
    def vision_pos_table(self) -> int:
        """Rows of the vision position table: num_patches + 1 (CLS) + 2 (fairseq offset)."""
        return self.num_patches + 3

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first inconsistent field."""
        positive = ["hidden_size", "num_attention_heads", "ffn_hidden_size", "num_sep_layers",
                    "embed_dim", "image_size", "patch_size", "max_text_len", "vocab_size"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_vl_layers < 1:
            raise ConfigError(f"num_vl_layers must be >= 1, got {self.num_vl_layers}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size ({self.hidden_size}) must be divisible by "
                              f"num_attention_heads ({self.num_attention_heads})")
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size ({self.image_size}) must be divisible by "
                              f"patch_size ({self.patch_size})")
        if self.max_text_len + 2 > self.text_pos_table:
            raise ConfigError(f"max_text_len ({self.max_text_len}) + 2 exceeds text_pos_table "
                              f"({self.text_pos_table})")
        for name in ("eos_token_id", "cls_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(f"{name} ({getattr(self, name)}) is outside the vocabulary "
                                  f"(vocab_size={self.vocab_size})")

    def validate_parallel(self, tensor_parallel: int, pipeline_parallel: int = 1) -> None:
        """Check that the architecture splits ``tensor_parallel`` × ``pipeline_parallel`` ways
        (the rules of :func:`megatron_m2.layout.model_split_errors`)."""
        from .layout import model_split_errors

        errors = model_split_errors(self, tensor_parallel, pipeline_parallel)
        if errors:
            raise ConfigError("; ".join(errors))

    def padded_vocab_size(self, tensor_parallel: int) -> int:
        """Vocabulary rounded up so that each TP rank holds an equal shard (pad rows are zero)."""
        return -(-self.vocab_size // tensor_parallel) * tensor_parallel

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "M2ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config field(s): {', '.join(unknown)}")
        return cls(**d)


def load_model_config(source: str, base: Optional[M2ModelConfig] = None) -> M2ModelConfig:
    """An :class:`M2ModelConfig` from ``--model-config``: a JSON file, or an inline JSON object,
    of its fields, applied over ``base`` (a flavor; none: the defaults). A ``params`` entry (as
    ``m2-plan --list-flavors --json`` prints) is ignored, and a checkpoint's ``meta.json`` works
    too (its ``model_config``). Raises :class:`ConfigError` naming the source."""
    inline = source.lstrip().startswith("{")
    where = "--model-config" if inline else f"--model-config {source}"
    try:
        if inline:
            fields = json.loads(source)
        else:
            with open(os.path.expanduser(source)) as f:
                fields = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: invalid JSON: {e}") from None
    except OSError as e:
        raise ConfigError(f"{where}: cannot read it ({e.strerror or e})") from None
    if not isinstance(fields, dict):
        raise ConfigError(f"{where}: expected a JSON object of M2ModelConfig fields")
    fields = dict(fields.get("model_config", fields))
    fields.pop("params", None)
    merged = dict(base.to_dict() if base is not None else {}, **fields)
    try:
        return M2ModelConfig.from_dict(merged)
    except (TypeError, ConfigError) as e:
        raise ConfigError(f"{where}: {e}") from None
