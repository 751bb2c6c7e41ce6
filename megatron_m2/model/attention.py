"""Multiway self-attention of the M2 layer, built from megatron-core tensor-parallel linears.

Per branch m (A = vision, B = text; the VL layers use A for both):

    attn = MHA(Q_m(x), K_m(x), V_m(x))            # heads sharded across the TP group
    out  = Out_m(LNinner_m(attn))                  # Sub-LN over the concatenated heads

Q/K/V are column-parallel (each TP rank owns num_heads / tp heads), ``LNinner`` normalises over
the full width d with statistics reduced across the TP group (:class:`TPLayerNorm`), and ``Out``
is row-parallel. Attention is block-diagonal: vision tokens attend vision tokens, text tokens
attend text tokens, padded text keys masked. It is computed as two
``scaled_dot_product_attention`` calls, never as one masked (s_v + s_t)² matrix.

In the fused image–text pass (a layout with ``full_attention``, :meth:`PackedLayout.fused`)
Q/K/V, Sub-LN and ``Out`` still run part by part with each part's branch, but the attention is
one ``scaled_dot_product_attention`` over the whole ``[image; text]`` sequence: every query
attends to all vision keys and the unpadded text keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.utils import get_tensor_model_parallel_group_if_none
from torch import nn
from torch.nn import functional as F

from .multiway import (
    Modality,
    MultiwayState,
    MultiwayWrapper,
    PackedLayout,
    TPLayerNorm,
    _first,
    _init_device,
)

__all__ = ["M2SelfAttention", "M2SelfAttentionSubmodules", "BlockDiagonalSDPA",
           "multiway_linear", "multiway_sharded_norm", "fused_key_mask"]

_VISION_ONLY, _TEXT_ONLY = PackedLayout.vision_only(), PackedLayout.text_only()


def multiway_sharded_norm(spec, config, width: int, tp_group, shared: bool, *,
                          state: MultiwayState) -> MultiwayWrapper:
    """Two Sub-LN LayerNorms (one per branch) over a width sharded across the TP group."""
    return MultiwayWrapper(
        lambda: build_module(spec, width, config.layernorm_epsilon, tp_group=tp_group,
                             sharded=True, params_dtype=config.params_dtype,
                             device=_init_device(config)),
        state=state, shared=shared)


def multiway_linear(spec, config, in_size: int, out_size: int, parallel_mode: str, tp_group,
                    shared: bool, init_method=None, *, state: MultiwayState) -> MultiwayWrapper:
    """Two tensor-parallel linears (one per branch) with bias added inside (no bias skipping:
    the branches' biases differ, so the bias-dropout-add receives ``bias=None``)."""
    init_method = init_method or (lambda w: None)  # weights are set by model.init

    def factory():
        # The keyword set both megatron's local linears and its TE linears accept.
        kwargs = dict(config=config, init_method=init_method, bias=True, skip_bias_add=False,
                      is_expert=False, tp_group=tp_group)
        if parallel_mode == "column":
            return build_module(spec, in_size, out_size, gather_output=False, **kwargs)
        return build_module(spec, in_size, out_size, input_is_parallel=True, **kwargs)

    return MultiwayWrapper(factory, state=state, shared=shared)


class BlockDiagonalSDPA(nn.Module):
    """Block-diagonal attention over the packed sequence with torch SDPA (runs on CPU and GPU).

    Inputs are ``[s, b, heads, head_dim]`` laid out as ``layout`` says; ``text_pad_mask`` is
    ``[b, s_t]`` with ``True`` at padded text positions. Returns ``[s, b, heads * head_dim]``.
    Scale is head_dim^-0.5.
    """

    def __init__(self, config, layer_number: int = 1, **kwargs):
        super().__init__()
        self.dropout = config.attention_dropout

    @staticmethod
    def _sdpa(q, k, v, mask, dropout):
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return out.permute(2, 0, 1, 3)  # [s, b, h, d]

    def forward(self, q, k, v, text_pad_mask: Optional[torch.Tensor] = None, *,
                layout: PackedLayout, vision_pad: int = 0):
        """``layout``: what the rows hold (:class:`M2SelfAttention` calls it on one part of the
        sequence at a time, with ``vision_only()`` or ``text_only()``; in the fused pass on the
        whole sequence with the ``full_attention`` layout: one attention over all rows, keys
        masked only at padded text positions). ``vision_pad``: the last rows of the vision part
        are padding (sequence parallelism pads each part to a multiple of TP) and are masked
        out as keys, like padded text."""
        s = layout.vision_rows(q.shape[0])
        p = self.dropout if self.training else 0.0
        if layout.full_attention:
            return self._sdpa(q, k, v, fused_key_mask(text_pad_mask, s, vision_pad,
                                                      q.shape[1], q.shape[0] - s, q.device),
                              p).flatten(2)
        mask = None
        if text_pad_mask is not None and s < q.shape[0]:
            # SDPA bool mask: True = may attend. [b, 1, 1, s_t] broadcasts over heads/queries.
            mask = (~text_pad_mask.bool())[:, None, None, :]
        vmask = _vision_key_mask(s, vision_pad, q.device)
        if s <= 0:
            out = self._sdpa(q, k, v, mask, p)
        elif s >= q.shape[0]:
            out = self._sdpa(q, k, v, vmask, p)
        else:
            # torch.split, not slices: one backward node that concatenates (see MultiwayWrapper).
            sizes = [s, q.shape[0] - s]
            (qv, qt), (kv, kt), (vv, vt) = (torch.split(t, sizes, dim=0) for t in (q, k, v))
            out = torch.cat([self._sdpa(qv, kv, vv, vmask, p), self._sdpa(qt, kt, vt, mask, p)],
                            dim=0)
        return out.flatten(2)


def _vision_key_mask(vision_len: int, vision_pad: int, device) -> Optional[torch.Tensor]:
    """SDPA bool key mask ``[1, 1, 1, vision_len]`` hiding the last ``vision_pad`` rows (None
    when there are none)."""
    if vision_pad <= 0 or vision_len <= 0:
        return None
    keep = torch.arange(vision_len, device=device) < vision_len - vision_pad
    return keep[None, None, None, :]


def fused_key_mask(text_pad_mask: Optional[torch.Tensor], vision_len: int,
                   vision_pad: int = 0, batch: Optional[int] = None,
                   text_len: Optional[int] = None, device=None) -> Optional[torch.Tensor]:
    """SDPA bool key mask ``[b, 1, 1, vision_len + s_t]`` of the fused pass: True (may attend)
    at every vision key but the last ``vision_pad`` (padding) and every unpadded text key; None
    when nothing is masked. ``batch``, ``text_len`` and ``device`` are needed only for a vision
    padding without a text padding mask."""
    if text_pad_mask is None and vision_pad <= 0:
        return None
    if text_pad_mask is None:
        keep_text = torch.ones(batch, text_len, dtype=torch.bool, device=device)
    else:
        keep_text = ~text_pad_mask.bool()
    keep_vision = keep_text.new_ones(keep_text.shape[0], vision_len)
    if vision_pad > 0:
        keep_vision[:, vision_len - vision_pad:] = False
    return torch.cat([keep_vision, keep_text], dim=1)[:, None, None, :]


@dataclass
class M2SelfAttentionSubmodules:
    """Classes for the attention's parts: swapping these gives the local or the TE flavor."""

    linear_q: Union[ModuleSpec, type] = None
    linear_k: Union[ModuleSpec, type] = None
    linear_v: Union[ModuleSpec, type] = None
    core_attention: Union[ModuleSpec, type] = None
    inner_norm: Union[ModuleSpec, type] = None
    linear_proj: Union[ModuleSpec, type] = None


class M2SelfAttention(MegatronModule):
    """Multiway Sub-LN self-attention; returns ``(output, None)`` like megatron's attention."""

    def __init__(self, config, submodules: M2SelfAttentionSubmodules, layer_number: int = 1,
                 shared: bool = False, pg_collection=None,
                 state: Optional[MultiwayState] = None, **kwargs):
        super().__init__(config=config)
        tp_group = get_tensor_model_parallel_group_if_none(
            pg_collection.tp if pg_collection is not None else None)
        self.tp_group = tp_group
        tp = torch.distributed.get_world_size(tp_group)
        d = config.hidden_size
        self.num_heads_local = config.num_attention_heads // tp
        self.head_dim = config.kv_channels
        self.layer_number = layer_number
        for name in ("linear_q", "linear_k", "linear_v"):
            setattr(self, name, multiway_linear(getattr(submodules, name), config, d, d,
                                                "column", tp_group, shared, state=state))
        self.core_attention = build_module(submodules.core_attention, config=config,
                                           layer_number=layer_number)
        self.inner_norm = multiway_sharded_norm(submodules.inner_norm, config, d, tp_group,
                                                shared, state=state)
        self.linear_proj = multiway_linear(submodules.linear_proj, config, d, d, "row",
                                           tp_group, shared, state=state)

    def forward(self, hidden_states, attention_mask=None, **unused):
        layout = self.linear_q.state.layout
        if layout.full_attention:
            return self._fused_forward(hidden_states, attention_mask, layout), None
        # Each part of the packed sequence (vision rows, text rows) attends only to itself, so
        # the whole block runs part by part with that part's branch, and is concatenated once.
        outs = []
        vision_pad = self.linear_q.state.vision_pad
        for key, x, modality in self.linear_q.parts(hidden_states):
            q, k, v = self._qkv(key, x)
            # Vision parts have no padding mask (but sequence parallelism's padding rows).
            if modality is Modality.VISION:
                ctx = self.core_attention(q, k, v, text_pad_mask=None, layout=_VISION_ONLY,
                                          vision_pad=vision_pad)
            else:
                ctx = self.core_attention(q, k, v, text_pad_mask=attention_mask,
                                          layout=_TEXT_ONLY)
            outs.append(_first(self.linear_proj.branch(key)(self.inner_norm.branch(key)(ctx))))
        return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)), None

    def _qkv(self, key: str, x: torch.Tensor):
        """Q, K, V ``[s, b, heads / tp, head_dim]`` of one part with its branch (under
        sequence parallelism the column-parallel linears gather the part: ``s`` is the whole
        part's length, not the shard's)."""
        q, k, v = (_first(lin.branch(key)(x))
                   for lin in (self.linear_q, self.linear_k, self.linear_v))
        shape = (q.shape[0], q.shape[1], self.num_heads_local, self.head_dim)
        return q.view(shape), k.view(shape), v.view(shape)

    def _fused_forward(self, hidden_states, text_pad_mask, layout: PackedLayout):
        """The fused pass: Q/K/V per part with its branch, one attention over the whole
        sequence (padded text keys masked), Sub-LN and ``Out`` per part with its branch.

        A mixed layout (``layout.contrastive_batch = c > 0``) computes Q/K/V, Sub-LN and
        ``Out`` once for the whole batch; only the attention differs by sample: samples
        ``[:c]`` attend part by part (the contrastive pass), samples ``[c:]`` fully."""
        parts = self.linear_q.parts(hidden_states)
        vision_pad = self.linear_q.state.vision_pad
        qkv = [list(self._qkv(key, x)) for key, x, _ in parts]
        # The parts' whole lengths (under sequence parallelism, padded and gathered).
        sizes = [part[0].shape[0] for part in qkv]
        if vision_pad:
            layout = PackedLayout.mixed(sizes[0], layout.contrastive_batch)
        c = layout.contrastive_batch
        if c:
            b = hidden_states.shape[1]
            cols = [c, b - c]
            # Columns [:c]: each part attends only to itself (as in forward()).
            split = [[torch.split(t, cols, dim=1) for t in part_qkv] for part_qkv in qkv]
            block = []
            for (_, _, modality), part in zip(parts, split):
                q, k, v = (t[0] for t in part)
                mask = None if modality is Modality.VISION else (
                    text_pad_mask[:c] if text_pad_mask is not None else None)
                block.append(self.core_attention(
                    q, k, v, text_pad_mask=mask,
                    layout=_VISION_ONLY if modality is Modality.VISION else _TEXT_ONLY,
                    vision_pad=vision_pad))
            qkv = [[t[1] for t in part] for part in split]
            text_pad_mask = text_pad_mask[c:] if text_pad_mask is not None else None
        q, k, v = (qkv[0][i] if len(qkv) == 1 else torch.cat([t[i] for t in qkv], dim=0)
                   for i in range(3))
        ctx = self.core_attention(q, k, v, text_pad_mask=text_pad_mask, layout=layout,
                                  vision_pad=vision_pad)
        ctxs = torch.split(ctx, sizes, dim=0)
        if c:
            ctxs = [torch.cat([cb, cf], dim=1) for cb, cf in zip(block, ctxs)]
        outs = [_first(self.linear_proj.branch(key)(self.inner_norm.branch(key)(c_)))
                for (key, _, _), c_ in zip(parts, ctxs)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

__all__ += ["TPLayerNorm"]
