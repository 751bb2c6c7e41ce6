"""M2's full pretraining objective: ``L = L_ITC + λ1·L_CMIM + λ2·L_CMLM`` (``--objective m2``).

* **ITC**: GBA-ITC exactly as ``--objective itc`` (:class:`~.itc.ITCObjective`, which this
  class extends: ITC groups, heads, feature accumulation, temperature clamp).
* **CMLM** (``--cmlm-weight`` λ2): the caption with whole words masked at ``--mvlm-prob``
  (BERT 80/10/10; :func:`megatron_m2.data.masking.mask_text`) goes through the fused pass with
  its intact image; a vocabulary-parallel head (optionally tied to the text embedding,
  ``--cmlm-tie-embeddings``) predicts the original pieces at the masked positions.
* **CMIM** (``--cmim-weight`` λ1): the image with ``--image-mask-patches`` patches masked
  (masked patches become the mask token) goes through the fused pass with its intact caption.
  Masking (``--image-mask-style``): BEiT block-wise
  (:func:`megatron_m2.data.masking.block_masks`), or SyCoCa's text-guided attentive masking
  (:func:`megatron_m2.data.masking.attentive_mask` of each patch's cosine similarity to its
  caption through the VL heads, ``patch_scores``, from a forward-only contrastive pass: the
  first phase of feature accumulation, or a pass of its own); a head predicts, at the
  masked patches, the codebook index of a frozen BEiT-v2 VQ-KD tokenizer (``--mim-target
  vqkd``, ``--visual-tokenizer``) or the per-patch normalised pixels (``pixel``).

One step is one schedule over micro-batches of ``b·(1 + n)`` model samples (n = the masked
passes turned on): each micro-batch is ``[contrastive b | CMLM b | CMIM b]`` in the mixed
layout (:meth:`~megatron_m2.model.multiway.PackedLayout.mixed`), so pipeline parallelism,
recomputation and DP see one forward per micro-batch. Masks depend only on ``(--seed, the
sample's global position in the run)``: the same under any TP/PP/DP layout and after a resume.
With ``--itc-accumulate-features`` the first phase embeds the contrastive samples only and the
masked losses are added in the second.

Metrics logged: ``loss_itc`` and ITC's own, ``loss_cmlm``/``acc_cmlm``,
``loss_cmim``/``acc_cmim`` (``acc_cmim`` for VQ-KD targets only).
"""

from __future__ import annotations

import logging
from typing import Dict, List, Tuple

import torch

from ..config import ConfigError
from ..data.masking import IGNORE_INDEX, block_masks, mask_text
from .base import ObjectiveContext
from .itc import ITCObjective
from .masked import (
    PixelHead,
    VocabParallelHead,
    default_mask_patches,
    masked_rows,
    patch_pixel_targets,
)

logger = logging.getLogger("megatron_m2.objectives.m2")

__all__ = ["M2Objective", "masked_settings"]


def masked_settings(args) -> Dict[str, object]:
    """The masked objectives' settings from the arguments, defaults filled in (torch-free)."""
    return {"cmlm_weight": 1.0 if args.cmlm_weight is None else float(args.cmlm_weight),
            "cmim_weight": 1.0 if args.cmim_weight is None else float(args.cmim_weight),
            "mvlm_prob": float(args.mvlm_prob), "mim_target": args.mim_target}


class M2Objective(ITCObjective):
    name = "m2"
    metrics = ITCObjective.metrics + ("loss_itc", "loss_cmlm", "acc_cmlm", "loss_cmim",
                                      "acc_cmim")
    console_metrics = ("loss_itc", "loss_cmlm", "loss_cmim")

    def __init__(self, ctx: ObjectiveContext):
        super().__init__(ctx)
        args, model = ctx.args, ctx.model
        settings = masked_settings(args)
        self.cmlm_weight = settings["cmlm_weight"]
        self.cmim_weight = settings["cmim_weight"]
        self.mvlm_prob = settings["mvlm_prob"]
        self.mim_target = settings["mim_target"]
        self.seed = int(args.seed)
        self.bf16 = bool(args.bf16)
        self.passes: List[str] = [name for name, w in (("cmlm", self.cmlm_weight),
                                                       ("cmim", self.cmim_weight)) if w > 0]
        cfg = model.model_cfg
        self.cfg = cfg
        self.s_v = model.config.vision_seq_len
        grid = cfg.image_size // cfg.patch_size
        self.grid = (grid, grid)
        self.num_patches = grid * grid
        self.mask_patches = (args.image_mask_patches if args.image_mask_patches is not None
                             else default_mask_patches(self.num_patches))
        self.mask_style = args.image_mask_style
        self.temperature = float(args.attentive_mask_temperature)
        if self.mask_style == "attentive" and "cmim" in self.passes:
            self.scoring_keys = ("patch_scores",)
        self._text_masking_setup(ctx.tokenizer)
        self.vqkd = None
        if "cmim" in self.passes and ctx.is_first_stage:
            # The release's mask token is frozen for contrastive training; CMIM trains it.
            ctx.first_chunk.embeddings.mask_token.requires_grad_(True)
        if ctx.is_last_stage:
            self._build_heads(model, args)

    # -- set-up ----------------------------------------------------------------------------
    def _text_masking_setup(self, tokenizer) -> None:
        from ..data.masking import PIECE_SPECIAL, PIECE_START, word_start_table

        cfg = self.cfg
        if tokenizer is not None:
            if tokenizer.mask_id is None:
                raise ConfigError("--objective m2 with CMLM needs a [MASK] piece in the "
                                  "tokenizer; this one has none (m2-train-tokenizer adds it)")
            self.word_starts = word_start_table(tokenizer)
            self.mask_id = int(tokenizer.mask_id)
            self.special_ids = sorted(int(i) for i in tokenizer.special_ids.values())
        else:
            # Synthetic data has no tokenizer: every non-special id is a word, and the last
            # vocabulary id stands for [MASK].
            self.mask_id = cfg.vocab_size - 1
            self.special_ids = sorted({cfg.eos_token_id, cfg.cls_token_id, self.mask_id})
            table = torch.full((cfg.vocab_size,), PIECE_START, dtype=torch.int8)
            table[self.special_ids] = PIECE_SPECIAL
            self.word_starts = table

    def _build_heads(self, model, args) -> None:
        from megatron.core import parallel_state as ps

        from ..model.init import full_init_tensor, local_shard

        cfg, config = self.cfg, model.config
        tp_group = ps.get_tensor_model_parallel_group()
        tp, tp_rank = ps.get_tensor_model_parallel_world_size(), \
            ps.get_tensor_model_parallel_rank()
        d = cfg.hidden_size
        heads = {}
        if "cmlm" in self.passes:
            tied = (self.ctx.first_chunk.embeddings.text_embed.weight if args.cmlm_tie_embeddings
                    else None)
            heads["cmlm_head"] = VocabParallelHead(d, cfg.vocab_size, config, tp_group, tied)
        if "cmim" in self.passes:
            if self.mim_target == "vqkd":
                self.vqkd = self._load_visual_tokenizer(args, model)
                heads["cmim_head"] = VocabParallelHead(d, self.vqkd.codebook_size, config,
                                                       tp_group)
            else:
                dev = model.itc_vl_image_proj.weight.device
                heads["cmim_head"] = PixelHead(d, cfg.patch_size ** 2 * cfg.in_channels,
                                               device=dev, dtype=config.params_dtype)
        dev = model.itc_vl_image_proj.weight.device
        for name, head in heads.items():
            head.to(dev)
            model.add_module(name, head)
            # Deterministic, layout-independent initial values (as the model's own weights):
            # N(0, init_method_std) weights, zero biases; TP shards are slices of the full one.
            for pname, p in head.named_parameters():
                canon = f"{name}.{pname}"
                shape = list(p.shape)
                if getattr(p, "tensor_model_parallel", False):
                    shape[p.partition_dim] = head.num_classes
                full = full_init_tensor(canon, tuple(shape), cfg, self.seed)
                with torch.no_grad():
                    p.copy_(local_shard(full, p, tp_rank, tp).to(p.dtype))
        self.masked_heads = heads

    def _load_visual_tokenizer(self, args, model):
        from ..model.vqkd import open_visual_tokenizer

        # validate_args has read this file (and checked its grid and codebook) on every rank.
        vqkd = open_visual_tokenizer(args.visual_tokenizer, args.visual_tokenizer_heads)
        vqkd.eval().requires_grad_(False)
        vqkd.to(model.itc_vl_image_proj.weight.device)
        logger.info("VQ-KD visual tokenizer from %s: %d codes of dimension %d",
                    args.visual_tokenizer, vqkd.codebook_size, vqkd.config.code_dim)
        return vqkd

    # -- the batch -------------------------------------------------------------------------
    def batch_multiple(self, contrastive_only: bool = False) -> int:
        return 1 if contrastive_only else 1 + len(self.passes)

    def prepare_batch(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        positions = batch["sample_positions"].tolist()
        out = dict(batch)
        if "cmlm" in self.passes:
            ids, labels = mask_text(batch["text_ids"], batch["text_pad_mask"],
                                    self.word_starts, self.mvlm_prob, self.mask_id,
                                    self.cfg.vocab_size, special_ids=self.special_ids,
                                    seed=self.seed, sample_indices=positions)
            out["cmlm_ids"], out["cmlm_labels"] = ids, labels
        if "cmim" in self.passes:
            if self.mask_style == "block":
                out["cmim_mask"] = block_masks(self.seed, positions, self.grid,
                                               self.mask_patches)
            if self.ctx.is_last_stage:
                images = batch["images"]
                if self.vqkd is not None:
                    dev = next(self.vqkd.parameters()).device
                    # Under --bf16 on GPUs the tokenizer's encoder runs in bf16 autocast, as
                    # BEiT-v2's own pretraining runs it (its task layer stays fp32 either way).
                    autocast = torch.autocast(dev.type, dtype=torch.bfloat16,
                                              enabled=dev.type == "cuda" and self.bf16)
                    with torch.no_grad(), autocast:
                        # The model's images are normalised to [-1, 1] (mean = std = 0.5),
                        # what VQ-KD's default pre-processing makes of [0, 1] images.
                        feats = self.vqkd.encode_features(images.to(dev).float(),
                                                          pre_process=False)
                    with torch.no_grad():  # the nearest code in fp32, outside autocast
                        out["cmim_targets"] = self.vqkd.quantize_features(feats.float()).view(
                            images.shape[0], -1)
                else:
                    out["cmim_targets"] = patch_pixel_targets(images, self.cfg.patch_size)
        return out

    def apply_scores(self, batches, scores) -> None:
        """Attentive masking: each sample masks the patches most similar to its caption
        (``patch_scores``), top-k, or Gumbel top-k at ``--attentive-mask-temperature`` with
        the sample's own noise stream (seed, position)."""
        from ..data.masking import attentive_mask, make_generator

        for batch, score in zip(batches, scores):
            rows = []
            for pos, s in zip(batch["sample_positions"].tolist(), score["patch_scores"]):
                gen = make_generator(self.seed, pos, "attentive") if self.temperature else None
                rows.append(attentive_mask(s.float(), self.mask_patches,
                                           temperature=self.temperature or None,
                                           generator=gen))
            batch["cmim_mask"] = torch.stack(rows)

    def model_inputs(self, batch, contrastive_only: bool = False):
        from ..model.multiway import PackedLayout

        if contrastive_only or not self.passes:
            inputs = super().model_inputs(batch)
            if self.scoring_keys:
                inputs["patch_scores"] = True
            return inputs
        images, ids, pad = batch["images"], batch["text_ids"], batch["text_pad_mask"]
        b = images.shape[0]
        all_images, all_ids, masks = [images], [ids], []
        no_mask = torch.zeros(b, self.num_patches, dtype=torch.bool)
        for name in self.passes:
            all_images.append(images)
            all_ids.append(batch["cmlm_ids"] if name == "cmlm" else ids)
            masks.append(batch["cmim_mask"] if name == "cmim" else no_mask)
        inputs = {"images": torch.cat(all_images), "text_ids": torch.cat(all_ids),
                  "text_pad_mask": pad.repeat(1 + len(self.passes), 1),
                  "layout": PackedLayout.mixed(self.s_v, b)}
        if "cmim" in self.passes:
            inputs["image_mask"] = torch.cat([no_mask] + masks)
        return inputs

    # -- the loss --------------------------------------------------------------------------
    def _masked_losses(self, outputs, batch) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        fused = outputs["fused_hidden"]  # [s, n·b, d]
        b = fused.shape[1] // len(self.passes)
        parts = dict(zip(self.passes, torch.split(fused, b, dim=1)))
        total = fused.new_zeros(())
        metrics: Dict[str, torch.Tensor] = {}
        if "cmlm" in parts:
            labels = batch["cmlm_labels"].to(fused.device)
            where = labels != IGNORE_INDEX
            rows = masked_rows(parts["cmlm"][self.s_v:], where)
            loss, acc = self.masked_heads["cmlm_head"].loss(rows, labels[where])
            total = total + self.cmlm_weight * loss
            metrics["loss_cmlm"], metrics["acc_cmlm"] = loss.detach(), acc
        if "cmim" in parts:
            where = batch["cmim_mask"].to(fused.device)
            rows = masked_rows(parts["cmim"][1:self.s_v], where)  # patch rows (after [CLS])
            targets = batch["cmim_targets"].to(fused.device)[where]
            head = self.masked_heads["cmim_head"]
            if isinstance(head, VocabParallelHead):
                loss, acc = head.loss(rows, targets)
                metrics["acc_cmim"] = acc
            else:
                loss = head.loss(rows, targets)
            total = total + self.cmim_weight * loss
            metrics["loss_cmim"] = loss.detach()
        return total, metrics

    def loss(self, outputs, batch=None):
        itc, metrics = super().loss({k: v for k, v in outputs.items() if k != "fused_hidden"})
        metrics["loss_itc"] = itc.detach()
        if not self.passes:
            return itc, metrics
        masked, more = self._masked_losses(outputs, batch)
        metrics.update(more)
        return itc + masked, metrics

    def cached_loss(self, cached, backward_scale):
        loss, grads, metrics = super().cached_loss(cached, backward_scale)
        metrics = dict(metrics, loss_itc=loss.detach())
        return loss, grads, metrics

    def residual_loss(self, outputs, batch):
        if not self.passes:
            return None, {}
        return self._masked_losses(outputs, batch)

    def describe(self) -> str:
        parts = [super().describe()]
        if "cmlm" in self.passes:
            parts.append(f"CMLM λ={self.cmlm_weight:g} (mvlm_prob {self.mvlm_prob:g}, "
                         "whole words)")
        if "cmim" in self.passes:
            parts.append(f"CMIM λ={self.cmim_weight:g} ({self.mim_target} targets, "
                         f"{self.mask_patches}/{self.num_patches} patches, "
                         f"{self.mask_style} masking)")
        return " + ".join(parts)
