"""Multiway Sub-LN feed-forward block of the M2 layer.

Per branch m: ``FC2_m(LNffn_m(GELU(FC1_m(x))))``. FC1 is column-parallel, so each TP rank holds
d_ffn / tp hidden features; ``LNffn`` normalises over the full d_ffn with statistics reduced
across the TP group (:class:`~megatron_m2.model.multiway.TPLayerNorm`); FC2 is row-parallel.
GELU is the exact (erf) form, as in the official release.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.utils import get_tensor_model_parallel_group_if_none
from torch.nn import functional as F

from .attention import multiway_linear, multiway_sharded_norm
from .multiway import MultiwayState, _first

__all__ = ["M2MLP", "M2MLPSubmodules"]


@dataclass
class M2MLPSubmodules:
    linear_fc1: Union[ModuleSpec, type] = None
    ffn_norm: Union[ModuleSpec, type] = None
    linear_fc2: Union[ModuleSpec, type] = None


class M2MLP(MegatronModule):
    """Returns ``(output, None)`` like megatron's MLP (biases are added inside each branch)."""

    def __init__(self, config, submodules: M2MLPSubmodules, shared: bool = False,
                 tp_group=None, state: Optional[MultiwayState] = None, **kwargs):
        super().__init__(config=config)
        # TransformerLayer hands tp_group only to its own MLP class; fall back to megatron's
        # global TP group (what the parallel linears would use anyway).
        tp_group = get_tensor_model_parallel_group_if_none(tp_group)
        d, f = config.hidden_size, config.ffn_hidden_size
        self.linear_fc1 = multiway_linear(submodules.linear_fc1, config, d, f, "column",
                                          tp_group, shared, state=state)
        self.ffn_norm = multiway_sharded_norm(submodules.ffn_norm, config, f, tp_group, shared,
                                              state=state)
        self.linear_fc2 = multiway_linear(submodules.linear_fc2, config, f, d, "row",
                                          tp_group, shared, state=state)

    def forward(self, hidden_states: torch.Tensor, padding_mask=None, **unused):
        # Branch by branch on its part of the packed sequence; one concatenation at the end.
        outs = []
        for key, x, _ in self.linear_fc1.parts(hidden_states):
            h = F.gelu(_first(self.linear_fc1.branch(key)(x)))
            h = self.ffn_norm.branch(key)(h)
            outs.append(_first(self.linear_fc2.branch(key)(h)))
        return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)), None
