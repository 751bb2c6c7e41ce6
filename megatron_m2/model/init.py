"""Deterministic, layout-independent weight initialisation.

Every parameter is generated as its *full* (TP=1) tensor from a generator seeded by
``(seed, canonical name)``, where the canonical name is the parameter's name in the unsplit
model (global layer index). Each rank then keeps its tensor-parallel slice. Consequences:

* a TP shard equals the matching slice of the TP=1 weight, whatever the TP size;
* pipeline stages initialise their layers exactly as the single-stage model would;
* the result does not depend on construction order or on other parameters.

Rules (official M2-Encoder / torchscale Sub-LN recipe):

* LayerNorm weight 1, bias 0; all linear/conv biases 0;
* linear weights, conv patch projection, position tables, [CLS]/mask tokens, ITC heads:
  N(0, init_method_std);
* text token embedding: N(0, d^-0.5) (padding rows of a TP-padded vocabulary are 0);
* V, Out, FC1 and FC2 weights (both branches) multiplied by sqrt(log(2 L)), with L the depth of
  the stack they belong to (L_sep for the backbone, L_vl for the VL stack);
* both logit scales log(1 / 0.07).
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Iterator, Tuple

import torch

__all__ = ["canonical_name", "initialize_model", "full_init_tensor", "local_shard"]

_LAYER_RE = re.compile(r"^encoder\.layers\.(\d+)\.")
_SCALED = (".linear_v.", ".linear_proj.", ".linear_fc1.", ".linear_fc2.")


def canonical_name(name: str, layer_offset: int) -> str:
    """Map a stage-local parameter name to its name in the unsplit model."""
    m = _LAYER_RE.match(name)
    if not m:
        return name
    return f"encoder.layers.{int(m.group(1)) + layer_offset}." + name[m.end():]


def _layer_index(canonical: str):
    m = _LAYER_RE.match(canonical)
    return int(m.group(1)) if m else None


def full_init_tensor(canonical: str, shape: Tuple[int, ...], cfg, seed: int) -> torch.Tensor:
    """The full (TP=1, unpadded) initial value of parameter ``canonical``, in float32."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(canonical.encode())) % 2**62)
    if any("norm" in part for part in canonical.split(".")[:-1]):
        return (torch.ones if canonical.endswith(".weight") else torch.zeros)(shape)
    if canonical.endswith(".bias"):
        return torch.zeros(shape)
    if canonical in ("logit_scale", "logit_vl_scale"):
        return torch.full(shape, cfg.logit_scale_init)
    if canonical == "embeddings.text_embed.weight":
        return torch.randn(shape, generator=g) * cfg.hidden_size ** -0.5
    t = torch.randn(shape, generator=g) * cfg.init_method_std
    layer = _layer_index(canonical)
    if layer is not None and any(k in canonical for k in _SCALED):
        depth = cfg.num_sep_layers if layer < cfg.num_sep_layers else cfg.num_vl_layers
        t.mul_(math.sqrt(math.log(2 * depth)))
    return t


def local_shard(full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp_size: int):
    """Slice ``full`` the way megatron shards ``param`` (pads a vocabulary-parallel table)."""
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        if full.shape != param.shape:
            # TP=1 with a vocabulary padded to a multiple of 1: shapes already equal.
            raise ValueError(f"shape mismatch {tuple(full.shape)} vs {tuple(param.shape)}")
        return full
    dim = param.partition_dim
    per = param.shape[dim]
    total = per * tp_size
    if full.shape[dim] < total:  # padded vocabulary rows
        pad_shape = list(full.shape)
        pad_shape[dim] = total - full.shape[dim]
        full = torch.cat([full, torch.zeros(pad_shape, dtype=full.dtype)], dim=dim)
    return full.narrow(dim, tp_rank * per, per)


def _full_shape(name: str, param: torch.Tensor, tp_size: int, cfg) -> Tuple[int, ...]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    if name == "embeddings.text_embed.weight":
        shape[0] = cfg.vocab_size
    return tuple(shape)


def iter_canonical_params(model) -> Iterator[Tuple[str, str, torch.nn.Parameter]]:
    """Yield ``(local_name, canonical_name, parameter)`` for every parameter of a stage."""
    for name, p in model.named_parameters():
        yield name, canonical_name(name, model.layer_offset), p


@torch.no_grad()
def initialize_model(model, seed: int) -> None:
    """Initialise every parameter of an :class:`M2EncoderModel` stage in place."""
    cfg = model.model_cfg
    tp_group = model.pg_collection.tp
    tp_size = torch.distributed.get_world_size(tp_group)
    tp_rank = torch.distributed.get_rank(tp_group)
    for name, canon, p in iter_canonical_params(model):
        full = full_init_tensor(canon, _full_shape(name, p, tp_size, cfg), cfg, seed)
        p.copy_(local_shard(full, p, tp_rank, tp_size).to(p.dtype))
