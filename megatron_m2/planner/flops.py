"""FLOPs: per sample (:func:`forward_flops_per_sample`, and :func:`masked_flops_per_sample` for
``--objective m2``), per step, and per stage and TP rank.

Model FLOPs (the MFU numerator) count every FLOP a step needs once: forward and backward of all
columns (the contrastive one and, under ``m2``, the fused ones), the heads and losses, and the
frozen VQ-KD's forward; not recomputation, not the cached-feature forward of
``--itc-accumulate-features`` nor the scoring pass of ``--image-mask-style attentive`` (both one
forward of the contrastive columns), not work replicated on the TP ranks. Hardware FLOPs count
what each stage's TP rank runs, recomputation, those extra forwards and replicas included.

Patch dropout (``--image-mask-ratio``) shortens the vision part to ``1 + keep`` rows in both
(its GEMM and attention terms shrink; the patch Conv2d still embeds every patch, before the
kept ones are gathered). Sequence parallelism's padding rows (each part padded to a multiple of
TP) are computed too: hardware FLOPs only.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from ..config import M2ModelConfig
from .context import Context
from .memory import StageShape, active_parameters_per_token
from .objective import MaskedSettings, head_classes, vqkd_forward_flops


def forward_flops_per_sample(cfg: M2ModelConfig, vision_tokens: int, text_tokens: int,
                             itc_batch: int, heads: int) -> Dict[str, int]:
    """Forward FLOPs of one sample, by part (a multiply-add is 2 FLOPs).

    * ``layer_gemm`` (per layer): every token goes through one branch's Q, K, V, Out, FC1, FC2:
      ``2·s·(4d² + 2·d·d_ffn)`` with s = s_v + s_t — i.e. 2 × active parameters × tokens;
    * ``layer_attention`` (per layer): QKᵀ and attention × V of the two blocks:
      ``4·d·(s_v² + s_t²)`` (padded text positions are computed and masked);
    * ``embed``: the patch Conv2d, ``2·patches·(3·p²)·d`` (the text table is a lookup);
    * ``heads``: four ``d × embed_dim`` projections of one [CLS] row each;
    * ``loss``: the logits of each head in both directions against the group batch,
      ``heads·2·2·itc_batch·embed_dim``.

    Biases, LayerNorms, GELU and softmax are left out (under 1 % at these widths).
    Training multiplies every part by 3 (forward + backward = 2 × forward).
    """
    d, f, e = cfg.hidden_size, cfg.ffn_hidden_size, cfg.embed_dim
    s = vision_tokens + text_tokens
    return {
        "layer_gemm": 2 * s * (4 * d * d + 2 * d * f),
        "layer_attention": 4 * d * (vision_tokens ** 2 + text_tokens ** 2),
        "embed": 2 * cfg.num_patches * cfg.in_channels * cfg.patch_size ** 2 * d,
        "heads": 4 * 2 * d * e,
        "loss": heads * 2 * 2 * itc_batch * e,
    }


def masked_flops_per_sample(cfg: M2ModelConfig, vision_tokens: int, text_tokens: int,
                            obj: Optional[MaskedSettings], tp: int = 1) -> Dict[str, int]:
    """Forward FLOPs ``--objective m2`` adds per sample (all zero for ``itc``, ``obj=None``).

    * ``fused_layer_gemm`` / ``fused_layer_attention`` (per layer): the n fused columns, each
      ``2·s·(4d² + 2·d·d_ffn)`` and, with full attention over the s = s_v + s_t tokens,
      ``4·d·s²`` (instead of the contrastive column's ``4·d·(s_v² + s_t²)``);
    * ``fused_embed``: the patch Conv2d of the n fused columns' images;
    * ``cmlm_head`` / ``cmim_head``: ``2·rows·d·cols`` with rows the masked positions
      (``round(mvlm_prob·s_t)``, ``image_mask_patches``) and cols the head's output columns on
      one TP rank (``tp=1``: the whole head; :func:`~megatron_m2.planner.objective.head_classes`);
    * ``vqkd``: the frozen tokenizer's forward over the sample's image (forward only: training
      does not multiply it by 3; :func:`~megatron_m2.planner.objective.vqkd_forward_flops`).
    """
    keys = ("fused_layer_gemm", "fused_layer_attention", "fused_embed", "cmlm_head",
            "cmim_head", "vqkd")
    if obj is None:
        return dict.fromkeys(keys, 0)
    d, f, n = cfg.hidden_size, cfg.ffn_hidden_size, obj.passes
    s = vision_tokens + text_tokens
    cols = head_classes(cfg, obj, tp)
    return {
        "fused_layer_gemm": n * 2 * s * (4 * d * d + 2 * d * f),
        "fused_layer_attention": n * 4 * d * s * s,
        "fused_embed": n * 2 * cfg.num_patches * cfg.in_channels * cfg.patch_size ** 2 * d,
        "cmlm_head": 2 * obj.cmlm_rows(cfg) * d * cols.get("cmlm", 0),
        "cmim_head": 2 * obj.cmim_rows() * d * cols.get("cmim", 0),
        "vqkd": vqkd_forward_flops(cfg) if obj.vqkd else 0,
    }


def peak_flops(ctx: Context) -> Tuple[float, float]:
    """``(bf16, gemm)`` peak FLOP/s per GPU: the dense BF16 peak, and that of the GEMMs of
    the layout's precision (FP8: twice the BF16 peak)."""
    peak_bf16 = ctx.cluster.peak_tflops * 1e12
    return peak_bf16, peak_bf16 * (2 if ctx.fp8 else 1)


def flops_section(ctx: Context) -> Dict[str, object]:
    """The plan's ``flops``: forward FLOPs of a sample, model and hardware FLOPs per step,
    ``6·N·T`` (N = active parameters per token, T the tokens the layers process: every column's),
    and each stage's FLOPs per micro-batch on one TP rank with their compute time
    (:func:`stage_flops`). ``--objective m2`` adds ``masked_forward_per_sample``
    (:func:`masked_flops_per_sample`) and ``vqkd_flops_per_step`` (inside the model FLOPs)."""
    cfg, gbs = ctx.cfg, ctx.gbs
    group_batch = ctx.k * ctx.itc_rows
    # The model FLOPs count the rows a step needs (patch dropout's 1 + keep vision rows); the
    # hardware FLOPs those the layers process (sequence parallelism's padding included).
    model_f = forward_flops_per_sample(cfg, ctx.sv, ctx.st, group_batch, ctx.heads)
    hw_f = forward_flops_per_sample(cfg, ctx.sv_p, ctx.st_p, group_batch, ctx.heads)
    masked_model = masked_flops_per_sample(cfg, ctx.sv, ctx.st, ctx.obj)
    hw_f.update(masked_flops_per_sample(cfg, ctx.sv_p, ctx.st_p, ctx.obj, ctx.tp))
    fwd_model_sample = (cfg.num_layers * (model_f["layer_gemm"] + model_f["layer_attention"]
                                          + masked_model["fused_layer_gemm"]
                                          + masked_model["fused_layer_attention"])
                        + model_f["embed"] + model_f["heads"] + model_f["loss"]
                        + masked_model["fused_embed"] + masked_model["cmlm_head"]
                        + masked_model["cmim_head"])
    vqkd_step = masked_model["vqkd"] * gbs
    model_step = 3 * fwd_model_sample * gbs + vqkd_step
    stage_rows = [stage_flops(ctx, st_, hw_f) for st_ in ctx.stages]
    hw_step = sum(r["flops_per_micro_batch"] for r in stage_rows) * ctx.tp * ctx.dp * ctx.m
    out = {
        "forward_per_sample": model_f, "model_flops_per_step": model_step,
        "hardware_flops_per_step": hw_step, "per_stage_rank": stage_rows,
        "six_n_t": (6 * active_parameters_per_token(cfg) * ctx.s * gbs * (1 + ctx.passes)),
    }
    if ctx.obj is not None:
        out.update(masked_forward_per_sample=masked_model, vqkd_flops_per_step=vqkd_step)
    return out


def stage_flops(ctx: Context, st_: StageShape, hw_f: Dict[str, int]) -> Dict[str, object]:
    """FLOPs of one micro-batch on one TP rank of stage ``st_``, and their time at
    ``mfu × peak`` (GEMMs at the precision's peak, the rest at the BF16 peak).

    Every layer runs forward and backward (3 × forward), plus one forward per recomputed
    layer and, with feature accumulation or the scoring pass of ``--image-mask-style
    attentive`` (without accumulation), one more forward of the whole stage (of the
    contrastive columns only: the fused ones run in the training forward;
    ``extra_forward_flops``); the loss's logits run 3 × forward once. The attentive score
    itself (the patch rows through the VL image projection, ``2·P·d·e`` per sample on the last
    stage) is left out in both passes alike (0.5 % of a 0.4b column's forward, 0.07 % at
    10b).
    ``--objective m2``: the fused columns' layers and Conv2d (3 × forward,
    + recomputation), on the last stage the masked heads (3 × forward, on this rank's output
    columns; in ``other_flops``, at the BF16 peak: they are not Transformer Engine GEMMs) and
    the VQ-KD forward (``vqkd_flops``, at the BF16 peak: under ``--bf16`` its encoder runs in
    bf16 autocast, the task layer and code search, 1 % of it, in fp32; its time,
    ``vqkd_time_s_per_micro_batch``, is outside the compute time of the schedule's slot: the
    trainer computes the targets of every micro-batch before the schedule).
    """
    b, tp = ctx.b, ctx.tp
    n_rc = ctx.recomputed_layers(st_)
    # fwd + 2x bwd (+ the cached-feature forward, or the attentive scoring pass)
    extra = 1 if ctx.accum or ctx.scoring_pass else 0
    passes = 3 + extra
    runs, fused_runs = passes * st_.num_layers + n_rc, 3 * st_.num_layers + n_rc
    gemm = (runs * hw_f["layer_gemm"] + fused_runs * hw_f.get("fused_layer_gemm", 0)) * b // tp
    attn = (runs * hw_f["layer_attention"]
            + fused_runs * hw_f.get("fused_layer_attention", 0)) * b // tp
    other = vqkd = 0
    if st_.is_first:
        other += (passes * hw_f["embed"] + 3 * hw_f.get("fused_embed", 0)) * b
    if st_.is_last:
        other += passes * hw_f["heads"] * b + 3 * hw_f["loss"] * b
        other += 3 * (hw_f.get("cmlm_head", 0) + hw_f.get("cmim_head", 0)) * b
        vqkd = hw_f.get("vqkd", 0) * b
    peak_bf16, peak_gemm = peak_flops(ctx)
    mfu = ctx.assumptions.mfu
    t = (gemm / peak_gemm + (attn + other) / peak_bf16) / mfu
    # One forward of the micro-batch (every column, no recomputation, no extra pass): the
    # window that hides the parameter all-gather of --overlap-param-gather; the backward
    # (with its recomputation) hides the gradient reduce of --overlap-grad-reduce.
    f_gemm = st_.num_layers * (hw_f["layer_gemm"] + hw_f.get("fused_layer_gemm", 0)) * b // tp
    f_attn = st_.num_layers * (hw_f["layer_attention"]
                               + hw_f.get("fused_layer_attention", 0)) * b // tp
    f_other = ((hw_f["embed"] + hw_f.get("fused_embed", 0)) * b if st_.is_first else 0) + (
        (hw_f["heads"] + hw_f["loss"] + hw_f.get("cmlm_head", 0) + hw_f.get("cmim_head", 0))
        * b if st_.is_last else 0)
    t_fwd = (f_gemm / peak_gemm + (f_attn + f_other) / peak_bf16) / mfu
    e_gemm = extra * st_.num_layers * hw_f["layer_gemm"] * b // tp
    e_rest = extra * (st_.num_layers * hw_f["layer_attention"] * b // tp
                      + (hw_f["embed"] * b if st_.is_first else 0)
                      + (hw_f["heads"] * b if st_.is_last else 0))
    t_extra = (e_gemm / peak_gemm + e_rest / peak_bf16) / mfu
    row = {"stage": st_.index, "flops_per_micro_batch": gemm + attn + other + vqkd,
           "gemm_flops": gemm, "attention_flops": attn, "other_flops": other,
           "compute_time_s_per_micro_batch": t,
           "forward_time_s_per_micro_batch": t_fwd,
           "backward_time_s_per_micro_batch": max(0.0, t - t_fwd - t_extra)}
    if ctx.obj is not None:
        row["vqkd_flops"] = vqkd
        row["vqkd_time_s_per_micro_batch"] = vqkd / (vqkd_peak(ctx) * ctx.assumptions.mfu)
        # The extra forward of the contrastive columns (inside the figures above).
        row["extra_forward_flops"] = extra * (
            (st_.num_layers * (hw_f["layer_gemm"] + hw_f["layer_attention"])) * b // tp
            + (hw_f["embed"] * b if st_.is_first else 0)
            + (hw_f["heads"] * b if st_.is_last else 0))
    return row


def vqkd_peak(ctx: Context) -> float:
    """FLOP/s peak of the frozen VQ-KD's forward: the BF16 peak under ``--bf16`` (every
    planned command: its encoder runs in bf16 autocast), else the FP32 one (no TF32)."""
    if ctx.layout.precision in ("bf16", "fp8"):
        return ctx.cluster.peak_tflops * 1e12
    return ctx.cluster.fp32_peak_tflops * 1e12
