"""The training objective in the plan: ``--objective itc`` (GBA-ITC) or ``m2`` (GBA-ITC + CMLM +
CMIM, :mod:`megatron_m2.objectives.m2`), torch-free.

Under ``m2`` every micro-batch of ``b`` samples is one forward over ``b·(1 + n)`` columns
(n = the masked passes turned on: ``[cmlm_weight > 0] + [cmim_weight > 0]``): ``b`` contrastive
columns (block-diagonal attention) and ``b`` fused columns per masked pass (full attention over
the ``s_v + s_t`` tokens). The last stage adds the heads (CMLM: vocabulary-parallel ``d → V``;
CMIM: vocabulary-parallel ``d → 8192`` VQ-KD codes or a replicated ``d → patch²·3`` pixel
regression) and, for VQ-KD targets, the frozen BEiT-v2 tokenizer (forward only; fp32 weights,
its encoder in bf16 autocast under ``--bf16``). With ``--image-mask-style attentive`` the CMIM
mask comes from per-patch relevance scores: a forward-only pass of the contrastive columns
(feature accumulation's first phase, or else an extra scoring pass of the schedule).

This module resolves the flags (:func:`masked_settings`), checks them with m2-pretrain's rules
(:func:`objective_errors`; the file-reading checks of ``--visual-tokenizer`` stay with
m2-pretrain), prints them back (:func:`objective_args`) and holds the sizes the memory and FLOPs
sections add: head parameters (:func:`head_parameters`), the VQ-KD's parameters, FLOPs and
working memory (:func:`vqkd_parameters`, :func:`vqkd_forward_flops`,
:func:`vqkd_working_bytes`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from ..config import M2ModelConfig
from .inputs import FP32_BYTES, Layout

OBJECTIVES = ("itc", "m2")
MIM_TARGETS = ("vqkd", "pixel")
MASK_STYLES = ("block", "attentive")
MASKED_FIELDS = ("cmlm_weight", "cmim_weight", "visual_tokenizer", "visual_tokenizer_heads",
                 "image_mask_patches", "cmlm_tie_embeddings")
"""The masked-modelling fields m2-pretrain accepts with ``--objective m2`` only."""


@dataclass(frozen=True)
class VQKDShape:
    """The frozen visual tokenizer the planner assumes: BEiT-v2's released VQ-KD (ViT-B/16 at
    224 pixels, 12 blocks of width 768, 12 heads, MLP 3072; task layer 768 → 768 → 32; codebook
    8192 × 32), the one M2-Encoder's recipe uses (:class:`megatron_m2.model.vqkd.VQKDConfig`'s
    defaults)."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp: int = 3072
    codebook_size: int = 8192
    code_dim: int = 32


VQKD = VQKDShape()


@dataclass(frozen=True)
class MaskedSettings:
    """``--objective m2``'s settings with m2-pretrain's defaults filled in."""

    cmlm_weight: float
    cmim_weight: float
    mvlm_prob: float
    mim_target: str
    mask_patches: int
    tie_embeddings: bool
    mask_style: str = "block"
    temperature: float = 0.0

    @property
    def cmlm(self) -> bool:
        return self.cmlm_weight > 0

    @property
    def cmim(self) -> bool:
        return self.cmim_weight > 0

    @property
    def passes(self) -> int:
        """n: the fused passes per sample (CMLM and/or CMIM)."""
        return int(self.cmlm) + int(self.cmim)

    @property
    def vqkd(self) -> bool:
        """The frozen VQ-KD tokenizer runs (CMIM with VQ-KD targets)."""
        return self.cmim and self.mim_target == "vqkd"

    @property
    def attentive(self) -> bool:
        """CMIM masks by text-guided attentive masking: it needs per-patch scores from a
        forward-only pass of the contrastive columns before the training forward."""
        return self.cmim and self.mask_style == "attentive"

    def cmlm_rows(self, cfg: M2ModelConfig) -> int:
        """Masked caption positions per sample: ``round(mvlm_prob · s_t)`` (an upper estimate:
        whole-word masking draws from the caption's pieces, at most s_t)."""
        return int(math.floor(self.mvlm_prob * cfg.max_text_len + 0.5)) if self.cmlm else 0

    def cmim_rows(self) -> int:
        """Masked patches per sample (``--image-mask-patches``)."""
        return self.mask_patches if self.cmim else 0


def default_mask_patches(num_patches: int) -> int:
    """The release's 80 masked patches of 196, scaled to ``num_patches`` (at least 1); the rule
    of :func:`megatron_m2.objectives.masked.default_mask_patches`."""
    return max(1, min(num_patches - 1, int(math.floor(80 / 196 * num_patches + 0.5))))


def _weight(w: Optional[float]) -> float:
    return 1.0 if w is None else float(w)


def masked_settings(cfg: M2ModelConfig, layout: Layout) -> Optional[MaskedSettings]:
    """The settings of ``--objective m2`` (None for ``itc``); assumes
    :func:`objective_errors` found none."""
    if layout.objective != "m2":
        return None
    patches = (layout.image_mask_patches if layout.image_mask_patches is not None
               else default_mask_patches(cfg.num_patches))
    return MaskedSettings(_weight(layout.cmlm_weight), _weight(layout.cmim_weight),
                          float(layout.mvlm_prob), layout.mim_target, int(patches),
                          bool(layout.cmlm_tie_embeddings), layout.image_mask_style,
                          float(layout.attentive_mask_temperature))


def objective_errors(cfg: M2ModelConfig, layout: Layout) -> Tuple[List[str], List[str]]:
    """``(errors, warnings)`` of the objective flags, by m2-pretrain's rules
    (``megatron_m2.training.validation``): masked flags need ``--objective m2``; weights finite
    and >= 0, not both 0; ``--mvlm-prob`` in (0, 1); ``--image-mask-patches`` in
    [1, patches − 1]; ``--attentive-mask-temperature`` finite and >= 0;
    ``--image-mask-style attentive`` needs CMIM (both ignored under ``itc``);
    ``--cmlm-tie-embeddings`` needs CMLM and PP=1; VQ-KD targets need ``--visual-tokenizer``
    (the planner assumes BEiT-v2's 8192 codes, which TP must divide), and
    ``--visual-tokenizer`` is read only with them. m2-pretrain also reads the file (its
    grid and codebook); the planner cannot, and warns when the file is not here."""
    errors: List[str] = []
    warnings: List[str] = []
    if layout.objective not in OBJECTIVES:
        return [f"objective must be one of {', '.join(OBJECTIVES)}, got "
                f"{layout.objective!r}"], []
    if layout.image_mask_style not in MASK_STYLES:  # m2-pretrain's parser refuses it
        errors.append(f"--image-mask-style must be one of {', '.join(MASK_STYLES)}, got "
                      f"{layout.image_mask_style!r}")
    if layout.objective != "m2":
        given = [f"--{k.replace('_', '-')}" for k in MASKED_FIELDS
                 if getattr(layout, k) not in (None, False)]
        if given:
            errors.append(f"{', '.join(given)}: masked modelling needs --objective m2 (this "
                          f"run's objective is {layout.objective!r})")
        return errors, warnings  # m2-pretrain ignores the mask style and temperature here
    weights = {}
    for name in ("cmlm_weight", "cmim_weight"):
        w = _weight(getattr(layout, name))
        if not (math.isfinite(w) and w >= 0):
            errors.append(f"--{name.replace('_', '-')} must be a finite number >= 0, got {w}")
        weights[name] = w if math.isfinite(w) and w >= 0 else 0.0
    if not errors and not any(weights.values()):
        errors.append("--objective m2 with --cmlm-weight 0 and --cmim-weight 0 is GBA-ITC "
                      "alone: use --objective itc")
    if not 0 < layout.mvlm_prob < 1:
        errors.append(f"--mvlm-prob must be in (0, 1), got {layout.mvlm_prob}")
    if layout.mim_target not in MIM_TARGETS:
        errors.append(f"--mim-target must be one of {', '.join(MIM_TARGETS)}, got "
                      f"{layout.mim_target!r}")
    grid = cfg.image_size // cfg.patch_size
    if layout.image_mask_patches is not None and not 1 <= layout.image_mask_patches < grid ** 2:
        errors.append(f"--image-mask-patches must be in [1, {grid * grid - 1}] (a "
                      f"{grid}x{grid} patch grid), got {layout.image_mask_patches}")
    temperature = float(layout.attentive_mask_temperature)
    if temperature < 0 or not math.isfinite(temperature):
        errors.append(f"--attentive-mask-temperature must be >= 0, got {temperature}")
    if layout.image_mask_style == "attentive" and not weights["cmim_weight"]:
        errors.append("--image-mask-style attentive with --cmim-weight 0: there is no image "
                      "masking")
    if layout.cmlm_tie_embeddings:
        if not weights["cmlm_weight"]:
            errors.append("--cmlm-tie-embeddings with --cmlm-weight 0: there is no CMLM head "
                          "to tie")
        elif layout.pp > 1:
            errors.append("--cmlm-tie-embeddings needs the text embedding and the CMLM head "
                          "on one pipeline stage (--pipeline-model-parallel-size 1); untied "
                          "heads work with any PP")
    if weights["cmim_weight"] and layout.mim_target == "vqkd":
        if not layout.visual_tokenizer:
            errors.append("--mim-target vqkd needs --visual-tokenizer PATH (BEiT-v2 VQ-KD "
                          "weights, or a release training checkpoint); --mim-target pixel "
                          "needs no weights")
        else:
            if VQKD.codebook_size % layout.tp:
                errors.append(f"--visual-tokenizer: {VQKD.codebook_size} codes do not split "
                              f"over --tensor-model-parallel-size {layout.tp}")
            if not os.path.exists(layout.visual_tokenizer):
                warnings.append(f"--visual-tokenizer {layout.visual_tokenizer} is not here; "
                                "m2-pretrain reads it (grid, codebook) where it runs")
            if cfg.image_size // VQKD.patch_size != grid:
                warnings.append(f"the planner assumes BEiT-v2's VQ-KD ({VQKD.patch_size}-pixel "
                                f"patches), whose grid on {cfg.image_size}-pixel images is not "
                                f"the model's {grid}x{grid}: m2-pretrain rejects such a "
                                "tokenizer, so --visual-tokenizer must be another one")
            warnings.append(f"VQ-KD figures assume BEiT-v2's tokenizer (ViT-B/16, "
                            f"{VQKD.codebook_size} codes): fp32 weights, its encoder in bf16 "
                            "autocast (--bf16)")
    elif layout.visual_tokenizer:
        errors.append("--visual-tokenizer is read only with --mim-target vqkd and "
                      "--cmim-weight > 0")
    return errors, warnings


def objective_args(layout: Layout) -> List[str]:
    """The m2-pretrain flags of the objective (none for the default ``itc``). Masked-modelling
    flags set under ``itc`` are printed too, so that m2-pretrain refuses them as the planner
    does."""
    args = [] if layout.objective == "itc" else ["--objective", layout.objective]
    for name in ("cmlm_weight", "cmim_weight"):
        if getattr(layout, name) is not None:
            args += [f"--{name.replace('_', '-')}", f"{getattr(layout, name):g}"]
    if layout.objective == "m2":
        if layout.mvlm_prob != 0.5:
            args += ["--mvlm-prob", f"{layout.mvlm_prob:g}"]
        if _weight(layout.cmim_weight) != 0:
            args += ["--mim-target", layout.mim_target]
    if layout.visual_tokenizer:
        args += ["--visual-tokenizer", layout.visual_tokenizer]
    if layout.visual_tokenizer_heads is not None:
        args += ["--visual-tokenizer-heads", str(layout.visual_tokenizer_heads)]
    if layout.image_mask_patches is not None:
        args += ["--image-mask-patches", str(layout.image_mask_patches)]
    if layout.image_mask_style != "block":
        args += ["--image-mask-style", layout.image_mask_style]
    if layout.attentive_mask_temperature != 0:
        args += ["--attentive-mask-temperature", repr(float(layout.attentive_mask_temperature))]
    if layout.cmlm_tie_embeddings:
        args.append("--cmlm-tie-embeddings")
    return args


# -- the heads ------------------------------------------------------------------------------------
def head_classes(cfg: M2ModelConfig, obj: MaskedSettings, tp: int) -> Dict[str, int]:
    """Output columns of each head on one TP rank: CMLM ``⌈V / TP⌉`` (vocabulary padded to a
    multiple of TP), CMIM ``8192 / TP`` (VQ-KD) or ``patch²·C`` (pixel, replicated)."""
    out = {}
    if obj.cmlm:
        out["cmlm"] = -(-cfg.vocab_size // tp)
    if obj.cmim:
        out["cmim"] = (VQKD.codebook_size // tp if obj.mim_target == "vqkd"
                       else cfg.patch_size ** 2 * cfg.in_channels)
    return out


def head_parameters(cfg: M2ModelConfig, obj: MaskedSettings, tp: int) -> Dict[str, int]:
    """Parameters of the masked heads on one TP rank of the last stage (all trained, bf16,
    in the optimizer): CMLM ``⌈V/TP⌉·d`` weight (none when tied to the text embedding) +
    ``⌈V/TP⌉`` bias; CMIM ``(8192/TP)·(d + 1)`` (VQ-KD) or ``(d + 1)·patch²·C`` (pixel)."""
    d = cfg.hidden_size
    out = {}
    for name, cols in head_classes(cfg, obj, tp).items():
        tied = name == "cmlm" and obj.tie_embeddings
        out[name] = (0 if tied else cols * d) + cols
    return out


# -- the frozen VQ-KD ------------------------------------------------------------------------------
def vqkd_parameters(v: VQKDShape = VQKD) -> int:
    """Parameters of the tokenizing half of VQ-KD (what :class:`~megatron_m2.model.vqkd.
    VQKDTokenizer` holds): patch Conv2d, [CLS], position table, ``depth`` pre-LN blocks (qkv
    without bias plus q and v biases, Out, MLP, two LayerNorms), ``fc_norm``, the task layer
    ``w → w → code_dim`` and the codebook. 86.7 M for BEiT-v2's."""
    w, m = v.width, v.mlp
    block = 2 * w + 3 * w * w + 2 * w + (w * w + w) + 2 * w + (w * m + m) + (m * w + w)
    grid = v.img_size // v.patch_size
    return (v.in_chans * v.patch_size ** 2 * w + w + w + (grid * grid + 1) * w
            + v.depth * block + 2 * w + (w * w + w) + (w * v.code_dim + v.code_dim)
            + v.codebook_size * v.code_dim)


def vqkd_forward_flops(cfg: M2ModelConfig, v: VQKDShape = VQKD) -> int:
    """Forward FLOPs of VQ-KD on one image of the model's grid (P patches, P + 1 tokens): the
    patch Conv2d ``2·P·C·p²·w``, per block the GEMMs ``2·(P+1)·(4w² + 2·w·m)`` and attention
    ``4·w·(P+1)²``, the task layer ``2·P·(w² + w·code_dim)`` and the nearest-code search
    ``2·P·codebook·code_dim``."""
    w, m, p = v.width, v.mlp, cfg.num_patches
    n = p + 1
    return (2 * p * v.in_chans * v.patch_size ** 2 * w
            + v.depth * (2 * n * (4 * w * w + 2 * w * m) + 4 * w * n * n)
            + 2 * p * (w * w + w * v.code_dim) + 2 * p * v.codebook_size * v.code_dim)


def vqkd_working_bytes(cfg: M2ModelConfig, batch: int, v: VQKDShape = VQKD) -> int:
    """Transient bytes of VQ-KD's no-grad forward over ``batch`` images on the last stage,
    counted in fp32 (an upper bound under ``--bf16``, whose autocast keeps the GEMM outputs in
    bf16; it caches no bf16 weight copies, the tokenizer's weights not requiring gradients):
    the fp32 images, the residual stream ``[b, P+1, w]``, and the largest of the attention
    phase (qkv, scaled q, and the ``[b, heads, P+1, P+1]`` scores and their softmax: the
    reference attention is not fused), the MLP phase (FC1 output and GELU) and the code search
    (``[b·P, codebook]`` distances, two buffers)."""
    p = cfg.num_patches
    n = p + 1
    images = FP32_BYTES * batch * cfg.in_channels * cfg.image_size ** 2
    stream = FP32_BYTES * batch * n * v.width
    attention = FP32_BYTES * batch * (4 * n * v.width + 2 * v.heads * n * n)
    mlp = FP32_BYTES * batch * 2 * n * v.mlp
    search = FP32_BYTES * 2 * batch * p * v.codebook_size
    return images + stream + max(attention, mlp, search)
