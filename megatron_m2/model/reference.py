"""A plain single-device M2-Encoder in readable PyTorch: the reference for the megatron model.

:class:`ReferenceM2` is the same network as :class:`~megatron_m2.model.M2EncoderModel` written
the way one would without megatron-core: batch-first tensors, ``nn.Linear`` / ``nn.LayerNorm``,
:func:`torch.nn.functional.scaled_dot_product_attention`, one tower call per modality, no
tensor or pipeline parallelism. It has no dependency on megatron-core or on
``torch.distributed``, so it runs anywhere torch does. Uses:

* a readable statement of the architecture (the equations below, in code);
* the baseline of ``tools/bench_train.py`` (what megatron-core costs or saves);
* a parity check: loaded with the same weights, it gives the megatron model's outputs and
  gradients (``tests/model/test_reference.py``).

Architecture (``d`` hidden size, ``L_sep`` / ``L_vl`` layers, multiway branch ``A`` = vision,
``B`` = text; every layer is pre-LN with Sub-LN)::

    image  -> conv patches, [CLS] prepended, + vision positions (table rows 2..)  -> branch A
    text   -> token embedding + text positions (rows 2..), padded positions zeroed -> branch B
    layer(x, m)  = x + out_m(LN_m(MHA(q_m, k_m, v_m)(LN_m(x))))         Sub-LN attention
                 + fc2_m(LN_m(gelu(fc1_m(LN_m(x)))))                      Sub-LN FFN
    backbone     : L_sep layers on branch m, then a final LayerNorm_m     -> ITC head (per modality)
    backbone_vl  : L_vl layers on branch A for *both* modalities, final LN -> VL ITC head
    ITC head     : [CLS] row -> linear (no bias) -> L2 normalisation

The megatron model packs ``[vision; text]`` into one sequence with block-diagonal attention; the
reference runs image and text as two separate sequences, which is what that mask computes. Text
attention masks the padded keys (``text_pad_mask`` True = padding).

Fused image–text pass (:meth:`ReferenceM2.forward_fused`, the input of the masked objectives):
one batch-first sequence ``[image; text]``, full attention over it with padded text keys
masked; in ``backbone`` each token goes through its modality's branch (``A`` for the first
``s_v`` tokens, ``B`` for the rest) in every multiway module including the final LayerNorm, in
``backbone_vl`` branch ``A`` serves every token. Returns the hidden states after the VL final
LayerNorm. Branch B of the shared VL
stack never sees data and is frozen, as is the release's masked-image-modelling token.

Module and parameter names follow the official checkpoint (``backbone.encoder.layers.0.
self_attn.q_proj.A.weight``, ...), so the official weights load with a strict
``load_state_dict``, and the megatron model's through
:func:`megatron_m2.checkpoint.to_official` (:meth:`ReferenceM2.load_megatron_state_dict`).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..config import M2ModelConfig

__all__ = ["ReferenceM2", "Attention", "FeedForward", "Layer", "Stack", "VisionEmbedding",
           "Backbone", "ITCHead", "POSITION_OFFSET"]

POSITION_OFFSET = 2
"""First row of the position tables that is read (the release's fairseq convention)."""


def _multiway(make) -> nn.ModuleDict:
    """One module per multiway branch: ``"A"`` (vision; also the shared VL stack) and ``"B"``
    (text)."""
    return nn.ModuleDict({"A": make(), "B": make()})


def _split_apply(branches: nn.ModuleDict, x: torch.Tensor, split: int) -> torch.Tensor:
    """Branch ``A`` on tokens ``[:split]`` and ``B`` on the rest of a batch-first ``x``
    (``split >= x.shape[1]``: ``A`` on every token)."""
    if split >= x.shape[1]:
        return branches["A"](x)
    return torch.cat([branches["A"](x[:, :split]), branches["B"](x[:, split:])], dim=1)


class Attention(nn.Module):
    """Multiway Sub-LN self-attention: ``out_m(LN_m(MHA(q_m(x), k_m(x), v_m(x))))``.

    Args:
        d: hidden size; heads: attention heads (``d / heads`` per head); eps: LayerNorm epsilon.
    """

    def __init__(self, d: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            _multiway(lambda: nn.Linear(d, d)) for _ in range(4))
        self.inner_attn_ln = _multiway(lambda: nn.LayerNorm(d, eps=eps))

    def forward(self, x: torch.Tensor, m: str, attn_mask: Optional[torch.Tensor]
                ) -> torch.Tensor:
        """``x`` ``[b, s, d]`` through branch ``m``; ``attn_mask`` ``[b, 1, 1, s]`` bool, True
        where a key may be attended (None: every key)."""
        b, s, d = x.shape
        q, k, v = (proj[m](x).view(b, s, self.heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj[m](self.inner_attn_ln[m](ctx.transpose(1, 2).reshape(b, s, d)))

    def forward_fused(self, x: torch.Tensor, split: int, attn_mask: Optional[torch.Tensor]
                      ) -> torch.Tensor:
        """Fused pass: projections and Sub-LN of branch ``A`` on tokens ``[:split]`` and ``B`` on
        the rest, one attention over all tokens (``attn_mask`` ``[b, 1, 1, s]``)."""
        b, s, d = x.shape
        q, k, v = (_split_apply(proj, x, split).view(b, s, self.heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        ctx = ctx.transpose(1, 2).reshape(b, s, d)
        return _split_apply(self.out_proj, _split_apply(self.inner_attn_ln, ctx, split), split)


class FeedForward(nn.Module):
    """Sub-LN feed-forward of one branch: ``fc2(LN(gelu(fc1(x))))`` (exact, erf GELU)."""

    def __init__(self, d: int, f: int, eps: float):
        super().__init__()
        self.fc1, self.ffn_layernorm, self.fc2 = (nn.Linear(d, f), nn.LayerNorm(f, eps=eps),
                                                  nn.Linear(f, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ffn_layernorm(F.gelu(self.fc1(x))))


class Layer(nn.Module):
    """Pre-LN multiway layer: ``x + attn(LN(x))``, then ``x + ffn(LN(x))``, on branch ``m``."""

    def __init__(self, cfg: M2ModelConfig):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.layernorm_epsilon
        self.self_attn = Attention(d, cfg.num_attention_heads, eps)
        self.self_attn_layer_norm = _multiway(lambda: nn.LayerNorm(d, eps=eps))
        self.ffn = _multiway(lambda: FeedForward(d, cfg.ffn_hidden_size, eps))
        self.final_layer_norm = _multiway(lambda: nn.LayerNorm(d, eps=eps))

    def forward(self, x: torch.Tensor, m: str, attn_mask: Optional[torch.Tensor]
                ) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm[m](x), m, attn_mask)
        return x + self.ffn[m](self.final_layer_norm[m](x))

    def forward_fused(self, x: torch.Tensor, split: int, attn_mask: Optional[torch.Tensor]
                      ) -> torch.Tensor:
        """Fused pass: branch ``A`` on tokens ``[:split]``, ``B`` on the rest, full attention."""
        h = _split_apply(self.self_attn_layer_norm, x, split)
        x = x + self.self_attn.forward_fused(h, split, attn_mask)
        return x + _split_apply(self.ffn, _split_apply(self.final_layer_norm, x, split), split)


class Stack(nn.Module):
    """Layers and a final multiway LayerNorm (official ``backbone.encoder`` / ``backbone_vl``).

    ``positions=True`` adds the two position tables, which the official layout keeps in
    ``backbone.encoder`` (they are read by :class:`ReferenceM2`, not by the stack itself).
    """

    def __init__(self, cfg: M2ModelConfig, num_layers: int, positions: bool = False):
        super().__init__()
        d = cfg.hidden_size
        if positions:
            self.embed_positions = nn.ModuleDict({"A": nn.Embedding(cfg.vision_pos_table, d),
                                                  "B": nn.Embedding(cfg.text_pos_table, d)})
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(num_layers))
        self.layer_norm = _multiway(lambda: nn.LayerNorm(d, eps=cfg.layernorm_epsilon))

    def forward(self, x: torch.Tensor, m: str, attn_mask: Optional[torch.Tensor]
                ) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, m, attn_mask)
        return self.layer_norm[m](x)

    def forward_fused(self, x: torch.Tensor, split: int, attn_mask: Optional[torch.Tensor]
                      ) -> torch.Tensor:
        """Fused pass of the stack (branch ``A`` on tokens ``[:split]``, ``B`` on the rest)."""
        for layer in self.layers:
            x = layer.forward_fused(x, split, attn_mask)
        return _split_apply(self.layer_norm, x, split)


class VisionEmbedding(nn.Module):
    """Conv patch embedding (kernel = stride = patch size) with a [CLS] token prepended."""

    def __init__(self, cfg: M2ModelConfig):
        super().__init__()
        d = cfg.hidden_size
        self.proj = nn.Conv2d(cfg.in_channels, d, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        # Masked-image-modelling token of the release: unused by contrastive training.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d), requires_grad=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[b, C, H, W]`` -> ``[b, 1 + patches, d]``."""
        x = self.proj(images).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)


class Backbone(nn.Module):
    """Official ``backbone``: text and vision embeddings and the modality-specific stack."""

    def __init__(self, cfg: M2ModelConfig):
        super().__init__()
        self.text_embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.vision_embed = VisionEmbedding(cfg)
        self.encoder = Stack(cfg, cfg.num_sep_layers, positions=True)


class ITCHead(nn.Module):
    """ITC head: [CLS] row -> linear (no bias) -> L2 normalisation."""

    def __init__(self, d: int, e: int):
        super().__init__()
        self.fc = nn.Linear(d, e, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fc(x[:, 0]), dim=-1)


class ReferenceM2(nn.Module):
    """M2-Encoder in plain PyTorch on one device, official parameter names, batch-first.

    ``forward(images, text_ids, text_pad_mask)`` returns the output dict of
    :class:`~megatron_m2.model.M2EncoderModel` (with either modality alone, that modality's
    entries): ``image_feats`` / ``text_feats`` (backbone ITC heads), ``vl_image_feats`` /
    ``vl_text_feats`` (VL ITC heads), each ``[b, embed_dim]`` and unit-norm, and the two
    log-temperatures ``logit_scale`` / ``logit_vl_scale``. Parameters are initialised by
    PyTorch's defaults: load weights before comparing with anything.
    """

    OFFSET = POSITION_OFFSET

    def __init__(self, cfg: M2ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, e = cfg.hidden_size, cfg.embed_dim
        self.backbone = Backbone(cfg)
        self.backbone_vl = Stack(cfg, cfg.num_vl_layers)
        self.itc_image_proj, self.itc_text_proj = ITCHead(d, e), ITCHead(d, e)
        self.itc_vl_image_proj, self.itc_vl_text_proj = ITCHead(d, e), ITCHead(d, e)
        self.logit_scale = nn.Parameter(torch.tensor(cfg.logit_scale_init))
        self.logit_vl_scale = nn.Parameter(torch.tensor(cfg.logit_scale_init))
        # Branch B of the shared VL stack never sees data: frozen, as in the megatron model.
        for name, p in self.backbone_vl.named_parameters():
            if ".B." in name:
                p.requires_grad_(False)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding + [CLS] + vision positions: ``[b, 1 + patches, d]``."""
        x = self.backbone.vision_embed(images)
        table = self.backbone.encoder.embed_positions["A"].weight
        return x + table[self.OFFSET:self.OFFSET + x.shape[1]]

    def embed_text(self, text_ids: torch.Tensor, text_pad_mask: torch.Tensor) -> torch.Tensor:
        """Token embedding + text positions, padded positions zeroed: ``[b, s_t, d]``."""
        table = self.backbone.encoder.embed_positions["B"].weight
        x = self.backbone.text_embed(text_ids) + table[self.OFFSET:self.OFFSET + text_ids.shape[1]]
        return x * (~text_pad_mask)[..., None]

    def forward(self, images: Optional[torch.Tensor] = None,
                text_ids: Optional[torch.Tensor] = None,
                text_pad_mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Embeddings of ``images`` ``[b, C, H, W]`` and/or ``text_ids`` ``[b, s_t]`` (with
        ``text_pad_mask`` ``[b, s_t]``, True at padding; None: no padding)."""
        if images is None and text_ids is None:
            raise ValueError("ReferenceM2.forward needs images, text_ids or both")
        out = {"logit_scale": self.logit_scale, "logit_vl_scale": self.logit_vl_scale}
        towers = []
        if images is not None:
            towers.append(("image", self.embed_images(images), "A", None))
        if text_ids is not None:
            if text_pad_mask is None:
                text_pad_mask = torch.zeros_like(text_ids, dtype=torch.bool)
            key_mask = ~text_pad_mask[:, None, None, :]  # SDPA: True = may attend
            towers.append(("text", self.embed_text(text_ids, text_pad_mask), "B", key_mask))
        for name, x, m, mask in towers:
            x = self.backbone.encoder(x, m, mask)
            out[f"{name}_feats"] = getattr(self, f"itc_{name}_proj")(x)
            x = self.backbone_vl(x, "A", mask)
            out[f"vl_{name}_feats"] = getattr(self, f"itc_vl_{name}_proj")(x)
        return out

    def forward_fused(self, images: torch.Tensor, text_ids: torch.Tensor,
                      text_pad_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The fused image–text pass: hidden states ``[b, s_v + s_t, d]`` (image tokens first)
        after the VL stack's final LayerNorm. Every token attends to all image tokens and the
        unpadded text tokens; ``backbone`` uses branch ``A`` for image and ``B`` for text
        tokens, ``backbone_vl`` branch ``A`` for all."""
        if text_pad_mask is None:
            text_pad_mask = torch.zeros_like(text_ids, dtype=torch.bool)
        xv = self.embed_images(images)
        xt = self.embed_text(text_ids, text_pad_mask)
        s_v = xv.shape[1]
        keep = torch.cat([torch.ones(xv.shape[0], s_v, dtype=torch.bool, device=xv.device),
                          ~text_pad_mask], dim=1)
        mask = keep[:, None, None, :]  # SDPA: True = may attend
        x = torch.cat([xv, xt], dim=1)
        x = self.backbone.encoder.forward_fused(x, s_v, mask)
        return self.backbone_vl.forward_fused(x, x.shape[1], mask)

    # -- weights shared with the megatron model ----------------------------------------------------
    def load_megatron_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load the full (TP=1, PP=1, or gathered) state dict of the megatron model, renamed by
        :func:`~megatron_m2.checkpoint.to_official` (vocabulary padding rows dropped,
        ``_extra_state`` skipped); strict: every weight must be there."""
        from ..checkpoint import to_official

        self.load_state_dict(to_official(state_dict, self.cfg))

    def megatron_state_dict(self, target: Any = None) -> Dict[str, Any]:
        """This model's weights under the megatron model's names
        (:func:`~megatron_m2.checkpoint.from_official`; with ``target``, a megatron model or
        its state dict, ready for its strict ``load_state_dict``)."""
        from ..checkpoint import from_official

        return from_official(self.state_dict(), self.cfg, target=target)

    @classmethod
    def from_megatron(cls, model: nn.Module, cfg: Optional[M2ModelConfig] = None
                      ) -> "ReferenceM2":
        """A reference model holding a copy of ``model``'s weights (a single-device megatron
        model, TP=1 PP=1; ``cfg`` defaults to ``model.model_cfg``)."""
        cfg = cfg if cfg is not None else model.model_cfg
        ref = cls(cfg)
        ref.load_megatron_state_dict(model.state_dict())
        return ref
