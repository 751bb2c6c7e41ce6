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

In the fused image–text pass (``forward(..., fused=True)`` or
``layout=PackedLayout.fused(s_v)``, for the masked objectives) the last stage returns instead
``{"fused_hidden": [s_v + s_t, b, d]}``: the packed sequence after the VL stack's final
LayerNorm, computed with full attention across both modalities.

Runtime state (:class:`~megatron_m2.model.multiway.MultiwayState`, ``model.multiway_state``):
one object per model stage, created here and handed to every multiway module of the stage when
the block is built (``get_m2_block_spec(..., state=)``). :meth:`M2EncoderModel.forward` sets
its :class:`~megatron_m2.model.multiway.PackedLayout` once at the start of each forward, and the
backbone output reaches the backbone heads through it: the first VL layer records it, the model
takes it after the block. Nothing else is written during a forward.
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
from .multiway import Modality, MultiwayState, PackedLayout, _init_device
from .sequence_parallel import SequenceSharding, gather_parts, pad_text_mask, scatter_parts
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

    ``multiway_state`` is this stage's :class:`MultiwayState`, shared by reference with all its
    multiway modules: the layout of the current forward and the backbone output on its way to
    the backbone heads (module docstring).
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
        # Starts at the training layout; every forward sets its own (forward, default_layout).
        self.multiway_state = MultiwayState(layout=PackedLayout.both(config.vision_seq_len))
        spec = get_m2_block_spec(self.model_cfg.num_sep_layers, self.model_cfg.num_vl_layers,
                                 self.layer_offset, num_local, transformer_impl,
                                 state=self.multiway_state)
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
        # The backbone output is recorded only where the heads that read it live.
        self.multiway_state.capture_backbone = post_process and any(
            isinstance(m, M2VLEntryLayer) for m in self.encoder.layers)

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
        return self.multiway_state.capture_backbone

    def default_layout(self, images: Optional[torch.Tensor] = None,
                       text_ids: Optional[torch.Tensor] = None) -> PackedLayout:
        """The layout :meth:`forward` assumes when none is given: images only → vision only,
        text only → text only, otherwise (both, or a later pipeline stage given neither) both
        modalities with s_v vision rows, the training layout."""
        if images is not None and text_ids is None:
            return PackedLayout.vision_only()
        if images is None and text_ids is not None:
            return PackedLayout.text_only()
        return PackedLayout.both(self.config.vision_seq_len)

    @contextlib.contextmanager
    def using_layout(self, layout: PackedLayout):
        """Set the layout for calls of this stage's modules made outside :meth:`forward` (a
        single layer, in tests and measurements); the previous layout is restored after."""
        state = self.multiway_state
        saved = state.layout
        state.layout = layout
        try:
            yield
        finally:
            state.layout = saved

    # -- forward -----------------------------------------------------------------------------
    def forward(self, images: Optional[torch.Tensor] = None,
                text_ids: Optional[torch.Tensor] = None,
                text_pad_mask: Optional[torch.Tensor] = None,
                layout: Optional[PackedLayout] = None, fused: bool = False,
                image_mask: Optional[torch.Tensor] = None, patch_scores: bool = False,
                keep_index: Optional[torch.Tensor] = None):
        """Run this stage.

        On the first stage ``images`` ``[b, 3, H, W]`` and/or ``text_ids`` ``[b, s_t]`` are
        embedded; later stages read the tensor given to :meth:`set_input_tensor`.
        ``text_pad_mask`` (``[b, s_t]``, True at padding) is needed on every stage that has text.
        ``layout`` (what the packed sequence holds) defaults to :meth:`default_layout`; later
        stages see no inputs and must be told when it is not the training layout.

        The layout is written to ``multiway_state`` here, once, before anything runs, and stays
        there until the next forward: activation recomputation re-runs layers during the
        backward and reads it then (a training step's forwards all use one layout).

        ``fused=True`` (the same as ``layout=PackedLayout.fused(s_v)``) runs the fused
        image–text pass of the masked objectives: the packed ``[image; text]`` sequence with
        full attention across both modalities (padded text keys masked), each token through its
        modality's branch in the backbone and through the shared branch A in the VL layers.
        Every pipeline stage must be given it (later stages see no inputs).

        A mixed layout (:meth:`PackedLayout.mixed`, ``contrastive_batch = c``) runs both in one
        batch: samples ``[:c]`` the contrastive pass, samples ``[c:]`` the fused pass.
        ``image_mask`` (``[b, num_patches]``, True = masked, first stage) replaces masked
        patches by the mask token (masked image modelling). ``patch_scores=True`` adds, in the
        contrastive layout with both modalities, ``"patch_scores"`` ``[b, num_patches]``: the
        cosine similarity of each patch, through the VL image head, to its caption's VL
        embedding (the text-guided relevance of SyCoCa's attentive masking).

        Returns the hidden states ``[s, b, d]`` on non-last stages; on the last stage a dict of
        embeddings (contrastive layouts) or, in the fused pass, ``{"fused_hidden": h}`` with
        ``h`` ``[s_v + s_t, b, d]`` after the VL stack's final LayerNorm (what masked-modelling
        heads read: rows ``[:s_v]`` image, the rest text); a mixed layout returns the
        embeddings of samples ``[:c]`` and ``fused_hidden`` of samples ``[c:]``.

        Under sequence parallelism (``config.sequence_parallel``) the stages exchange, and the
        layers see, this TP rank's shard of the sequence (each modality part padded to a
        multiple of TP and split along the sequence,
        :mod:`~megatron_m2.model.sequence_parallel`); the last stage gathers the parts back, so
        the outputs are the same.

        ``keep_index`` (LongTensor ``[b, k]``, first stage; patch dropout in contrastive
        training) keeps [CLS] and those k patches of each image
        (:meth:`~.embeddings.M2Embeddings.embed_image`): the vision part has ``1 + k`` rows,
        and so must the layout (the default layout with both modalities has them; later
        stages must be given it).
        """
        if fused:
            if layout is not None and not layout.full_attention:
                raise ValueError(f"fused=True contradicts the layout {layout}")
            layout = layout or PackedLayout.fused(self.config.vision_seq_len)
        if layout is None:
            layout = self.default_layout(images, text_ids)
            if keep_index is not None and layout.modality is Modality.BOTH:
                layout = PackedLayout.both(1 + keep_index.shape[1])
        if keep_index is not None and self.pre_process and (
                layout.modality is Modality.TEXT or (layout.modality is Modality.BOTH and (
                    layout.vision_len != 1 + keep_index.shape[1]))):
            raise ValueError(f"keep_index keeps {keep_index.shape[1]} patches: the layout "
                             f"needs {1 + keep_index.shape[1]} vision rows, got {layout}")
        if layout.full_attention and self.pre_process and (images is None or text_ids is None):
            raise ValueError("the fused pass needs both images and text_ids")
        sharding = self._sequence_sharding(layout, images, text_ids, text_pad_mask, keep_index)
        self.multiway_state.begin(layout, sharding)
        x = self.embeddings(images, text_ids, text_pad_mask, image_mask, keep_index) if (
            self.pre_process) else None
        attention_mask = text_pad_mask
        if sharding is not None:
            # Each part padded to a multiple of TP and split along the sequence; padded text
            # rows join the text padding mask (padded vision rows: MultiwayState.vision_pad).
            attention_mask = pad_text_mask(text_pad_mask, self._batch(images, text_ids,
                                                                      text_pad_mask),
                                           sharding, next(self.parameters()).device)
            x = scatter_parts(x, sharding) if x is not None else None
        h = self.encoder(x, attention_mask=attention_mask)
        if not self.post_process:
            return h
        if sharding is not None:  # the whole sequence, unpadded, on every TP rank
            h = gather_parts(h, sharding)
        if not layout.full_attention:
            out = self._heads(h)
            if patch_scores and "vl_image_feats" in out and "vl_text_feats" in out:
                split = layout.vision_rows(h.shape[0])
                patches = F.normalize(self.itc_vl_image_proj(h[1:split]), dim=-1)  # [P, b, e]
                out["patch_scores"] = torch.einsum("pbe,be->bp", patches,
                                                   out["vl_text_feats"]).detach()
            return out
        c = layout.contrastive_batch
        if not c:
            self.multiway_state.take_backbone()  # nothing was recorded; closes recording
            return {"fused_hidden": h}
        hc, hf = torch.split(h, [c, h.shape[1] - c], dim=1)
        out = self._heads(hc, contrastive_batch=c)
        out["fused_hidden"] = hf
        return out

    @staticmethod
    def _batch(images, text_ids, text_pad_mask) -> int:
        for t in (text_pad_mask, text_ids, images):
            if t is not None:
                return t.shape[0]
        raise ValueError("no input gives the batch size")

    def _sequence_sharding(self, layout: PackedLayout, images, text_ids, text_pad_mask,
                           keep_index) -> Optional[SequenceSharding]:
        """How this forward's sequence is split across the TP group under sequence parallelism
        (None without it). The vision rows come from the layout (both modalities), the images
        (first stage) or the configured s_v; the text rows from the padding mask (every stage
        with text is given it) or the token ids."""
        if not self.config.sequence_parallel:
            return None
        vision = text = 0
        if layout.modality is Modality.BOTH:
            vision = layout.vision_len
        elif layout.modality is Modality.VISION:
            if keep_index is not None:
                vision = 1 + keep_index.shape[1]
            elif images is not None:
                p = self.model_cfg.patch_size
                vision = 1 + (images.shape[-2] // p) * (images.shape[-1] // p)
            else:
                vision = self.config.vision_seq_len
        if layout.modality is not Modality.VISION:
            if text_pad_mask is not None:
                text = text_pad_mask.shape[1]
            elif text_ids is not None:
                text = text_ids.shape[1]
            else:
                raise ValueError("with sequence parallelism every pipeline stage needs "
                                 "text_pad_mask when the sequence holds text (its length "
                                 "decides the text part's padding)")
        tp = self.pg_collection.tp
        return SequenceSharding(torch.distributed.get_world_size(tp), vision, text, tp)

    def _heads(self, h: torch.Tensor, contrastive_batch: Optional[int] = None
               ) -> Dict[str, torch.Tensor]:
        s = h.shape[0]
        split = self.multiway_state.layout.vision_rows(s)
        has_image, has_text = split > 0, split < s
        out: Dict[str, torch.Tensor] = {"logit_scale": self.logit_scale,
                                        "logit_vl_scale": self.logit_vl_scale}

        def pool(hidden, proj, row):
            return F.normalize(proj(hidden[row]), dim=-1)

        if has_image:
            out["vl_image_feats"] = pool(h, self.itc_vl_image_proj, 0)
        if has_text:
            out["vl_text_feats"] = pool(h, self.itc_vl_text_proj, split)
        # The backbone output of this forward, recorded by the first VL layer (if this stage
        # holds it; None otherwise).
        hb = self.multiway_state.take_backbone()
        if hb is not None and self.multiway_state.sharding is not None:
            hb = gather_parts(hb, self.multiway_state.sharding)
        if hb is not None and contrastive_batch is not None:  # a mixed batch: its first samples
            hb = hb[:, :contrastive_batch]
        if hb is not None:
            if has_image:
                out["image_feats"] = pool(hb, self.itc_image_proj, 0)
            if has_text:
                out["text_feats"] = pool(hb, self.itc_text_proj, split)
        return out
