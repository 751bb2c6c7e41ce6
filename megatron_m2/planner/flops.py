"""FLOPs: per sample (:func:`forward_flops_per_sample`), per step, and per stage and TP rank.

Model FLOPs count the real sequence without recomputation (the MFU numerator); hardware FLOPs
count what each stage runs: the FP8-padded sequence, recomputed layers' extra forward and the
cached-feature forward of ``--itc-accumulate-features``.
"""

from __future__ import annotations

from typing import Dict, Tuple

from ..config import M2ModelConfig
from .context import Context
from .memory import StageShape, active_parameters_per_token


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


def peak_flops(ctx: Context) -> Tuple[float, float]:
    """``(bf16, gemm)`` peak FLOP/s per GPU: the dense BF16 peak, and that of the GEMMs of
    the layout's precision (FP8: twice the BF16 peak)."""
    peak_bf16 = ctx.cluster.peak_tflops * 1e12
    return peak_bf16, peak_bf16 * (2 if ctx.fp8 else 1)


def flops_section(ctx: Context) -> Dict[str, object]:
    """The plan's ``flops``: forward FLOPs of a sample, model and hardware FLOPs per step,
    ``6·N·T`` (N = active parameters per token), and each stage's FLOPs per micro-batch on one
    TP rank with their compute time (:func:`stage_flops`)."""
    cfg, gbs = ctx.cfg, ctx.gbs
    group_batch = ctx.k * ctx.itc_rows
    model_f = forward_flops_per_sample(cfg, cfg.vision_seq_len, cfg.max_text_len, group_batch,
                                       ctx.heads)
    hw_f = forward_flops_per_sample(cfg, ctx.sv, ctx.st, group_batch, ctx.heads)
    fwd_model_sample = (cfg.num_layers * (model_f["layer_gemm"] + model_f["layer_attention"])
                        + model_f["embed"] + model_f["heads"] + model_f["loss"])
    model_step = 3 * fwd_model_sample * gbs
    stage_rows = [stage_flops(ctx, st_, hw_f) for st_ in ctx.stages]
    hw_step = sum(r["flops_per_micro_batch"] for r in stage_rows) * ctx.tp * ctx.dp * ctx.m
    return {
        "forward_per_sample": model_f, "model_flops_per_step": model_step,
        "hardware_flops_per_step": hw_step, "per_stage_rank": stage_rows,
        "six_n_t": (6 * active_parameters_per_token(cfg)
                    * (cfg.vision_seq_len + cfg.max_text_len) * gbs),
    }


def stage_flops(ctx: Context, st_: StageShape, hw_f: Dict[str, int]) -> Dict[str, object]:
    """FLOPs of one micro-batch on one TP rank of stage ``st_``, and their time at
    ``mfu × peak`` (GEMMs at the precision's peak, the rest at the BF16 peak).

    Every layer runs forward and backward (3 × forward), plus one forward per recomputed
    layer and, with feature accumulation, one more forward of the whole stage; the loss's
    logits run 3 × forward once.
    """
    b, tp = ctx.b, ctx.tp
    n_rc = ctx.recomputed_layers(st_)
    passes = 3 + (1 if ctx.accum else 0)  # fwd + 2x bwd (+ the cached-feature forward)
    gemm = (passes * st_.num_layers + n_rc) * hw_f["layer_gemm"] * b // tp
    attn = (passes * st_.num_layers + n_rc) * hw_f["layer_attention"] * b // tp
    other = 0
    if st_.is_first:
        other += passes * hw_f["embed"] * b
    if st_.is_last:
        other += passes * hw_f["heads"] * b + 3 * hw_f["loss"] * b
    peak_bf16, peak_gemm = peak_flops(ctx)
    t = (gemm / peak_gemm + (attn + other) / peak_bf16) / ctx.assumptions.mfu
    return {"stage": st_.index, "flops_per_micro_batch": gemm + attn + other,
            "gemm_flops": gemm, "attention_flops": attn, "other_flops": other,
            "compute_time_s_per_micro_batch": t}
