"""ModuleSpecs of the M2 layer: a local (pure torch, runs on CPU) flavor and a Transformer
Engine flavor, named alike.

Every layer is a megatron-core ``TransformerLayer``; the multiway attention and MLP are our
modules whose linear classes come from the spec. The first shared-VL layer is an
:class:`M2VLEntryLayer`: it applies the backbone's final LayerNorm before entering the VL stack
and records that normalised sequence (the backbone output, whose [CLS] rows feed the backbone
ITC heads) in the model's :class:`~megatron_m2.model.multiway.MultiwayState`.

The specs carry that state: every multiway module of a model is built with the one
:class:`MultiwayState` object its model owns (``state=`` of the spec functions, passed on as a
ModuleSpec param). Specs made without it describe the layer but cannot be built.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional, Union

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from .attention import BlockDiagonalSDPA, M2SelfAttention, M2SelfAttentionSubmodules
from .mlp import M2MLP, M2MLPSubmodules
from .multiway import MultiwayLayerNorm, MultiwayState, TPLayerNorm, _require_state

__all__ = ["M2VLEntryLayer", "get_m2_layer_local_spec", "get_m2_layer_te_spec",
           "get_m2_block_spec", "HAVE_TE"]

try:  # Transformer Engine is optional: present on GPU clusters and in the Docker image.
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except Exception:  # pragma: no cover - depends on the environment
    HAVE_TE = False


class _SuppressUnknownMLPWarning(logging.Filter):
    """TransformerLayer logs a warning for every MLP class other than its own; ours is
    intentional (multiway Sub-LN MLP), so that one message is filtered out."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Unknown MLP type" not in record.getMessage()


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(
    _SuppressUnknownMLPWarning())


@dataclass
class M2VLEntrySubmodules(TransformerLayerSubmodules):
    backbone_final_layernorm: Union[ModuleSpec, type] = None


class M2VLEntryLayer(TransformerLayer):
    """First shared-VL layer: ``backbone`` final LayerNorm, then an ordinary layer.

    The normalised input of the VL stack (the backbone output) goes to
    :meth:`MultiwayState.record_backbone` of the model's state; the model takes it after the
    block (:meth:`MultiwayState.take_backbone`) for the backbone heads (the official
    ``cls_feats``). The layer keeps no reference to it.
    """

    def __init__(self, config, submodules: M2VLEntrySubmodules, *args,
                 state: Optional[MultiwayState] = None, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        self.backbone_final_layernorm = build_module(
            submodules.backbone_final_layernorm, config=config, hidden_size=config.hidden_size,
            eps=config.layernorm_epsilon)
        self.multiway_state = _require_state(state, type(self).__name__)

    def forward(self, *args, **kwargs):
        if args:
            hidden_states, args = args[0], args[1:]
        else:
            hidden_states = kwargs.pop("hidden_states")
        hidden_states = self.backbone_final_layernorm(hidden_states)
        self.multiway_state.record_backbone(hidden_states)
        output, context = super().forward(hidden_states, *args, **kwargs)
        # Also returned as the layer's context: under full activation recomputation the layer
        # runs inside megatron's checkpoint (under no_grad), whose outputs (hidden states,
        # context) are the tensors that get a graph. Returned as an output, the very tensor
        # recorded above gets the checkpoint's backward node, so the backbone heads get their
        # gradient path through it.
        return output, hidden_states if context is None else context


def _layer_spec(linear_col, linear_row, norm, core_attention, shared: bool, entry: bool,
                state: Optional[MultiwayState]):
    ln = ModuleSpec(module=MultiwayLayerNorm, params={"shared": shared, "state": state})
    fields = dict(
        input_layernorm=ln,
        self_attention=ModuleSpec(
            module=M2SelfAttention, params={"shared": shared, "state": state},
            submodules=M2SelfAttentionSubmodules(
                linear_q=linear_col, linear_k=linear_col, linear_v=linear_col,
                core_attention=core_attention, inner_norm=norm, linear_proj=linear_row)),
        self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=ln,
        mlp=ModuleSpec(module=M2MLP, params={"shared": shared, "state": state},
                       submodules=M2MLPSubmodules(linear_fc1=linear_col, ffn_norm=norm,
                                                  linear_fc2=linear_row)),
        mlp_bda=get_bias_dropout_add,
    )
    if entry:
        entry_ln = ModuleSpec(module=MultiwayLayerNorm, params={"shared": False, "state": state})
        return ModuleSpec(module=M2VLEntryLayer, params={"state": state},
                          submodules=M2VLEntrySubmodules(backbone_final_layernorm=entry_ln,
                                                         **fields))
    return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(**fields))


def get_m2_layer_local_spec(shared: bool = False, entry: bool = False,
                            state: Optional[MultiwayState] = None) -> ModuleSpec:
    """Pure-torch M2 layer: megatron-core column/row-parallel linears, SDPA attention."""
    return _layer_spec(ColumnParallelLinear, RowParallelLinear, TPLayerNorm, BlockDiagonalSDPA,
                       shared, entry, state)


def get_m2_layer_te_spec(shared: bool = False, entry: bool = False,
                         require_te: bool = True,
                         state: Optional[MultiwayState] = None) -> ModuleSpec:
    """Transformer Engine M2 layer: FP8-capable TE column/row-parallel linears per branch.

    Everything else is the local spec's, on purpose, so that the two specs have the same
    parameters (names and shapes; TE linears add only ``_extra_state`` entries, their FP8
    scaling metadata, which checkpoints skip) and checkpoints move between them:

    * Sub-LN and the input LayerNorms stay :class:`TPLayerNorm`/:class:`MultiwayLayerNorm`:
      the Sub-LN normalises over a width sharded across the TP group, which needs statistics
      reduced across ranks (TE's norm kernels are per rank), and per-branch LayerNorms are
      cheap next to the GEMMs;
    * attention stays :class:`BlockDiagonalSDPA` (two ``scaled_dot_product_attention`` calls,
      flash/cuDNN kernels on Hopper): the attention is block-diagonal per modality with a
      text padding mask, and SDPA is not a GEMM that FP8 would speed up.

    ``require_te=False`` builds the spec without Transformer Engine installed (the TE classes
    come from megatron-core and fail only when instantiated), for inspection and tests.
    """
    if require_te and not HAVE_TE:
        raise RuntimeError(
            "the Transformer Engine layer spec was requested but transformer_engine is not "
            "installed; use --transformer-impl local, or run in the Docker image")
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TERowParallelLinear,
    )

    return _layer_spec(TEColumnParallelLinear, TERowParallelLinear, TPLayerNorm,
                       BlockDiagonalSDPA, shared, entry, state)


def get_m2_block_spec(num_sep_layers: int, num_vl_layers: int, layer_offset: int,
                      num_local_layers: int, impl: str = "local",
                      state: Optional[MultiwayState] = None) -> TransformerBlockSubmodules:
    """Specs of the layers ``[layer_offset, layer_offset + num_local_layers)`` of the global
    stack (``num_sep_layers`` multiway layers, then ``num_vl_layers`` shared VL layers), plus the
    final LayerNorm of the VL stack (used only on the stage that holds the last layer), all built
    with the model's ``state``."""
    get = {"local": get_m2_layer_local_spec, "te": get_m2_layer_te_spec}[impl]
    specs: List[ModuleSpec] = []
    for g in range(layer_offset, layer_offset + num_local_layers):
        shared = g >= num_sep_layers
        specs.append(get(shared=shared, entry=(g == num_sep_layers), state=state))
    final_norm = ModuleSpec(module=MultiwayLayerNorm, params={"shared": True, "state": state})
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=final_norm)
