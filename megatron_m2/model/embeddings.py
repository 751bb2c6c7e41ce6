"""Patch and text embeddings of M2-Encoder (first pipeline stage).

* vision: Conv2d patch embedding + learned [CLS] token, learned absolute positions from a table
  of num_patches + 3 rows, read from index 2 (fairseq offset);
* text: token embedding (vocabulary-parallel across TP) + its own learned positions from a table
  of 1024 rows, also read from index 2; padded positions are zeroed, as the official encoder does;
* no embedding LayerNorm, no embedding scale;
* patch dropout (FLIP, ``keep_index``): after positions are added, each image keeps [CLS] and
  the given subset of its patches, which keep their own positions; the vision part shrinks to
  ``1 + k`` rows.

Output: the packed ``[s_v + s_t, b, d]`` sequence (either part may be absent).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.tensor_parallel import VocabParallelEmbedding
from torch import nn

from ..config import M2ModelConfig
from .multiway import _init_device

__all__ = ["M2Embeddings", "POSITION_OFFSET"]

POSITION_OFFSET = 2
"""Index of the first row the position tables are read from (fairseq convention)."""


class _Positions(nn.Module):
    def __init__(self, A: nn.Embedding, B: nn.Embedding):
        super().__init__()
        self.A, self.B = A, B


class M2Embeddings(nn.Module):
    def __init__(self, model_cfg: M2ModelConfig, config, tp_group):
        super().__init__()
        dev = _init_device(config)
        dt = config.params_dtype
        d = model_cfg.hidden_size
        tp = torch.distributed.get_world_size(tp_group) if tp_group is not None else 1
        self.vision_proj = nn.Conv2d(model_cfg.in_channels, d, model_cfg.patch_size,
                                     model_cfg.patch_size, device=dev, dtype=dt)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d, device=dev, dtype=dt))
        # Masked-image-modelling token of the release; unused by contrastive training.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d, device=dev, dtype=dt),
                                       requires_grad=False)
        self.text_embed = VocabParallelEmbedding(
            model_cfg.padded_vocab_size(tp), d, init_method=lambda w: None,
            config=config, tp_group=tp_group)
        self.embed_positions = _Positions(
            nn.Embedding(model_cfg.vision_pos_table, d, device=dev, dtype=dt),
            nn.Embedding(model_cfg.text_pos_table, d, device=dev, dtype=dt))
        self.vocab_size = model_cfg.vocab_size

    def embed_image(self, images: torch.Tensor, image_mask: Optional[torch.Tensor] = None,
                    keep_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[b, 3, H, W]`` → ``[1 + num_patches, b, d]`` (``[1 + k, b, d]`` with
        ``keep_index``).

        ``image_mask`` (``[b, num_patches]``, True = masked; masked image modelling) replaces
        the masked patches' embeddings by ``mask_token`` before positions are added, as BEiT
        does. ``keep_index`` (LongTensor ``[b, k]``, patch indices in ``[0, num_patches)``,
        sorted; patch dropout) keeps [CLS] and those k patches of each image, with their
        positions (``data.masking.patch_keep_indices`` draws them)."""
        x = self.vision_proj(images.to(self.vision_proj.weight.dtype))  # [b, d, h, w]
        x = x.flatten(2).permute(2, 0, 1)  # [p, b, d]
        if image_mask is not None:
            if tuple(image_mask.shape) != (x.shape[1], x.shape[0]):
                raise ValueError(f"image_mask of shape {tuple(image_mask.shape)} for "
                                 f"{x.shape[1]} images of {x.shape[0]} patches")
            w = image_mask.t().unsqueeze(-1).to(x.dtype)  # [p, b, 1]
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        cls = self.cls_token.expand(1, x.shape[1], -1).to(x.dtype)
        x = torch.cat([cls, x], dim=0)
        pos = torch.arange(POSITION_OFFSET, POSITION_OFFSET + x.shape[0], device=x.device)
        x = x + self.embed_positions.A(pos)[:, None, :]
        if keep_index is None:
            return x
        p, b = x.shape[0] - 1, x.shape[1]
        if keep_index.dim() != 2 or keep_index.shape[0] != b or not 1 <= keep_index.shape[1] <= p:
            raise ValueError(f"keep_index of shape {tuple(keep_index.shape)} for {b} images of "
                             f"{p} patches (expected [{b}, k], 1 <= k <= {p})")
        idx = keep_index.to(device=x.device, dtype=torch.long).t()  # [k, b]
        kept = torch.gather(x[1:], 0, idx.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        return torch.cat([x[:1], kept], dim=0)

    def embed_text(self, text_ids: torch.Tensor,
                   text_pad_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[b, s_t]`` token ids → ``[s_t, b, d]``."""
        x = self.text_embed(text_ids.t().contiguous())  # [s_t, b, d]
        pos = torch.arange(POSITION_OFFSET, POSITION_OFFSET + x.shape[0], device=x.device)
        x = x + self.embed_positions.B(pos)[:, None, :]
        if text_pad_mask is not None:
            x = x * (~text_pad_mask.bool()).t()[:, :, None].to(x.dtype)
        return x

    def forward(self, images=None, text_ids=None, text_pad_mask=None,
                image_mask=None, keep_index=None) -> torch.Tensor:
        parts = []
        if images is not None:
            parts.append(self.embed_image(images, image_mask, keep_index))
        if text_ids is not None:
            parts.append(self.embed_text(text_ids, text_pad_mask))
        if not parts:
            raise ValueError("M2Embeddings needs images, text_ids or both")
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
