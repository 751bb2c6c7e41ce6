"""M2-Encoder on megatron-core: embeddings → one TransformerBlock → CLS pooling → ITC heads.

The block holds ``L_sep`` multiway layers followed by ``L_vl`` shared VL layers (global layer
indices; with pipeline parallelism each stage builds its slice). Embeddings live on the first
pipeline stage, the VL final LayerNorm, pooling and the four ITC heads on the last.

Outputs (last stage) are L2-normalised embeddings:

* ``image_feats`` / ``text_feats``: [CLS] after the ``backbone`` stack → ``itc_{image,text}_proj``
  (the official ``cls_feats``);
* ``vl_image_feats`` / ``vl_text_feats``: [CLS] after the VL stack → ``itc_vl_{image,text}_proj``
  (the official ``cls_vlffn_feats``, what retrieval uses);
* ``logit_scale`` / ``logit_vl_scale``: the two learnable log-temperatures.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Optional

import torch
from megatron.core.enums import ModelType
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from torch import nn
from torch.nn import functional as F

from ..config import M2ModelConfig
from .embeddings import M2Embeddings
from .layer_specs import M2VLEntryLayer, get_m2_block_spec
from .multiway import SplitAware, _init_device
from .transformer_config import M2TransformerConfig

__all__ = ["M2EncoderModel"]


class M2EncoderModel(MegatronModule):
    """One pipeline stage of M2-Encoder.

    Args:
        config: megatron-core config from :func:`.transformer_config.to_transformer_config`.
        pre_process: this stage holds the embeddings (first stage).
        post_process: this stage holds pooling and heads (last stage).
        transformer_impl: ``"local"`` (pure torch) or ``"te"`` (Transformer Engine).
        pg_collection: process groups; defaults to megatron's global ``parallel_state``.
    """

    def __init__(self, config: M2TransformerConfig, pre_process: bool = True,
                 post_process: bool = True, transformer_impl: str = "local",
                 pg_collection: Optional[ProcessGroupCollection] = None,
                 vp_stage: Optional[int] = None):
        super().__init__(config=config)
        if config.m2 is None:
            raise ValueError("config.m2 is required: build it with to_transformer_config()")
        self.model_cfg: M2ModelConfig = config.m2
        self.model_type = ModelType.encoder_or_decoder
        # Read by megatron's finalize_model_grads under PP: no weights are tied across stages.
        self.share_embeddings_and_output_weights = False
        self.pre_process = pre_process
        self.post_process = post_process
        self.pg_collection = pg_collection or ProcessGroupCollection.use_mpu_process_groups()
        pp_rank = torch.distributed.get_rank(self.pg_collection.pp) if (
            self.pg_collection.pp is not None) else 0
        self.layer_offset = get_transformer_layer_offset(config, vp_stage, pp_rank)
        num_local = get_num_layers_to_build(config, vp_stage, pp_rank)
        spec = get_m2_block_spec(self.model_cfg.num_sep_layers, self.model_cfg.num_vl_layers,
                                 self.layer_offset, num_local, transformer_impl)
        if pre_process:
            self.embeddings = M2Embeddings(self.model_cfg, config, self.pg_collection.tp)
        self.encoder = TransformerBlock(config, spec, post_layer_norm=True,
                                        pre_process=pre_process, post_process=post_process,
                                        pg_collection=self.pg_collection, vp_stage=vp_stage)
        if post_process:
            dev, dt = _init_device(config), config.params_dtype
            d, e = self.model_cfg.hidden_size, self.model_cfg.embed_dim

            def head():
                return nn.Linear(d, e, bias=False, device=dev, dtype=dt)

            self.itc_image_proj, self.itc_text_proj = head(), head()
            self.itc_vl_image_proj, self.itc_vl_text_proj = head(), head()
            self.logit_scale = nn.Parameter(torch.empty((), device=dev, dtype=dt))
            self.logit_vl_scale = nn.Parameter(torch.empty((), device=dev, dtype=dt))
        # Plain references, not child modules: registering them would list their weights a
        # second time in state_dict()/sharded_state_dict().
        object.__setattr__(self, "_split_modules",
                           [m for m in self.modules() if isinstance(m, SplitAware)])
        object.__setattr__(self, "_entry", next(
            (m for m in self.encoder.layers if isinstance(m, M2VLEntryLayer)), None))

    # -- pipeline plumbing -----------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        """Receive the previous stage's activations (called by megatron's schedules)."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.encoder.set_input_tensor(input_tensor)

    @property
    def has_backbone_heads(self) -> bool:
        """Whether this stage can produce the backbone (``cls_feats``) embeddings: it must hold
        both the heads and the first VL layer."""
        return self.post_process and self._entry is not None

    @contextlib.contextmanager
    def split_position(self, position: int):
        """Temporarily set the vision/text split point of every multiway module."""
        saved = [m.split_position for m in self._split_modules]
        for m in self._split_modules:
            m.split_position = position
        try:
            yield
        finally:
            for m, s in zip(self._split_modules, saved):
                m.split_position = s

    # -- forward -----------------------------------------------------------------------------
    def forward(self, images: Optional[torch.Tensor] = None,
                text_ids: Optional[torch.Tensor] = None,
                text_pad_mask: Optional[torch.Tensor] = None,
                split_position: Optional[int] = None):
        """Run this stage.

        On the first stage ``images`` ``[b, 3, H, W]`` and/or ``text_ids`` ``[b, s_t]`` are
        embedded; later stages read the tensor given to :meth:`set_input_tensor`.
        ``text_pad_mask`` (``[b, s_t]``, True at padding) is needed on every stage that has text.
        ``split_position`` defaults to s_v when both modalities are present, else to the whole
        sequence (images only) or 0 (text only); later stages must be told when it differs
        from the training default.

        Returns the hidden states ``[s, b, d]`` on non-last stages and a dict of embeddings on
        the last stage.
        """
        if split_position is None:
            if images is not None and text_ids is None:
                split_position = 1 << 30
            elif images is None and text_ids is not None:
                split_position = 0
            else:
                split_position = self.config.vision_seq_len
        with self.split_position(split_position):
            x = self.embeddings(images, text_ids, text_pad_mask) if self.pre_process else None
            h = self.encoder(x, attention_mask=text_pad_mask)
            if not self.post_process:
                return h
            return self._heads(h, split_position)

    def _heads(self, h: torch.Tensor, split: int) -> Dict[str, torch.Tensor]:
        s = h.shape[0]
        split = min(split, s)
        has_image, has_text = split > 0, split < s
        out: Dict[str, torch.Tensor] = {"logit_scale": self.logit_scale,
                                        "logit_vl_scale": self.logit_vl_scale}

        def pool(hidden, proj, row):
            return F.normalize(proj(hidden[row]), dim=-1)

        if has_image:
            out["vl_image_feats"] = pool(h, self.itc_vl_image_proj, 0)
        if has_text:
            out["vl_text_feats"] = pool(h, self.itc_vl_text_proj, split)
        if self._entry is not None and self._entry.backbone_output is not None:
            hb = self._entry.backbone_output
            self._entry.backbone_output = None
            if has_image:
                out["image_feats"] = pool(hb, self.itc_image_proj, 0)
            if has_text:
                out["text_feats"] = pool(hb, self.itc_text_proj, split)
        return out
