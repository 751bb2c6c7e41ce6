"""Parameters and memory: what each pipeline stage holds and what one GPU of it needs.

The model stage by stage (:func:`stage_layout`, :func:`stage_parameters`), the bytes a layer
saves for its backward (:func:`layer_activation_bytes`), and the ``parameters`` and ``memory``
sections of a plan: bf16 weights (plus FP8 copies), fp32 gradients (``grad_reduce_in_fp32``),
Adam's fp32 master weights and two moments (sharded over DP with the distributed optimizer),
the activations of the micro-batches in flight and the fp32 contrastive loss, plus a fixed
overhead.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from ..config import M2ModelConfig
from ..flavors import count_parameters
from .context import Context, StageShape, stage_layout
from .inputs import BF16_BYTES, FP32_BYTES, GB, LN_STATS_BYTES, patch_keep_count
from .objective import (
    MaskedSettings,
    head_classes,
    head_parameters,
    vqkd_parameters,
    vqkd_working_bytes,
)


def _branch_layer_params(cfg: M2ModelConfig, tp: int) -> int:
    """One branch of one layer on one TP rank.

    Column-parallel Q, K, V, FC1 (weight and bias sharded), row-parallel Out, FC2 (weight
    sharded, bias replicated), LN1 and LN2 replicated, the Sub-LN LayerNorms LNinner (width d)
    and LNffn (width d_ffn) sharded like their inputs. At TP=1 this is the per-branch layer of
    :func:`megatron_m2.flavors.count_parameters`.
    """
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    column = 3 * (d * d // tp + d // tp) + (d * f // tp + f // tp)
    row = (d * d // tp + d) + (f * d // tp + d)
    norms = 2 * 2 * d + 2 * d // tp + 2 * f // tp
    return column + row + norms


def _branch_gemm_weights(cfg: M2ModelConfig, tp: int) -> int:
    """GEMM weight elements of one branch of one layer on one TP rank: (4d² + 2·d·d_ffn)/TP."""
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    return (4 * d * d + 2 * d * f) // tp


def stage_parameters(cfg: M2ModelConfig, tp: int, pp: int,
                     obj: Optional[MaskedSettings] = None,
                     layers_per_virtual_stage: Optional[int] = None) -> List[Dict[str, int]]:
    """Parameters one TP rank of each stage holds: ``total``, ``trainable`` and ``gemm``.

    * layers: 2 branches each; the shared VL layers' branch B is frozen (never sees data);
    * the stage holding the first VL layer adds the backbone's final LayerNorm (2 branches);
    * first stage: patch Conv2d (weight + bias), CLS token, the frozen mask token, the
      vocabulary-parallel text table (``padded_vocab / TP`` rows), both position tables;
    * last stage: the VL final LayerNorm (branch B frozen), four ITC heads (d × embed_dim,
      no bias) and the two log-temperatures.

    ``gemm`` counts the GEMM weights of the trained branches (the tensors FP8 keeps cast
    copies of). Summed over stages at TP=1 ``total`` equals
    :func:`~megatron_m2.flavors.count_parameters`.

    With ``obj`` (``--objective m2``) the last stage adds the masked heads
    (:func:`~megatron_m2.planner.objective.head_parameters`, trained; ``masked_heads``) and,
    for VQ-KD targets, the frozen fp32 tokenizer (``vqkd``, outside ``total``: no gradient,
    no optimizer state); CMIM trains the first stage's mask token.

    With ``layers_per_virtual_stage`` (an interleaved pipeline) each pipeline rank holds its
    model chunks' layers (:func:`stage_layout`): the same number of layers per rank, but the
    VL layers and the first VL layer on the rank whose chunk holds them.
    """
    d, e = cfg.hidden_size, cfg.embed_dim
    branch, gemm = _branch_layer_params(cfg, tp), _branch_gemm_weights(cfg, tp)
    out = []
    for st in stage_layout(cfg, pp, layers_per_virtual_stage):
        total = 2 * branch * st.num_layers
        frozen = branch * st.num_vl
        gemms = gemm * (2 * st.num_sep + st.num_vl)
        if st.has_entry:
            total += 2 * 2 * d
        if st.is_first:
            total += (cfg.in_channels * cfg.patch_size ** 2 * d + d + 2 * d
                      + cfg.padded_vocab_size(tp) // tp * d
                      + (cfg.vision_pos_table + cfg.text_pos_table) * d)
            frozen += d
        if st.is_last:
            total += 2 * 2 * d + 4 * d * e + 2
            frozen += 2 * d
        row = {"total": total, "trainable": total - frozen, "gemm": gemms}
        if obj is not None:
            heads = sum(head_parameters(cfg, obj, tp).values()) if st.is_last else 0
            row["total"] += heads
            row["trainable"] += heads + (d if st.is_first and obj.cmim else 0)
            row["masked_heads"] = heads
            row["vqkd"] = vqkd_parameters() if st.is_last and obj.vqkd else 0
        out.append(row)
    return out


def sequence_parts(cfg: M2ModelConfig, precision: str,
                   image_mask_ratio: float = 0.0) -> Tuple[int, int]:
    """Tokens of the vision and text parts of the packed sequence in a training step: ``1 +
    P`` and ``s_t``, or under patch dropout ``1 + keep`` vision rows
    (:func:`~megatron_m2.planner.inputs.patch_keep_count`). The model never pads them for the
    precision: FP8 instead needs a micro-batch whose rows ``tokens × micro_batch`` are aligned
    (a layout rule, :func:`megatron_m2.layout.check_layout`). Sequence parallelism pads each
    part to a multiple of TP (:attr:`Context.s_p <megatron_m2.planner.context.Context.s_p>`)."""
    if image_mask_ratio:
        return 1 + patch_keep_count(cfg.num_patches, image_mask_ratio), cfg.max_text_len
    return cfg.vision_seq_len, cfg.max_text_len


def layer_activation_bytes(cfg: M2ModelConfig, tp: int, tokens: int, batch: int,
                           entry: bool = False, sequence_parallel: bool = False) -> int:
    """Bytes one layer saves for its backward, for ``batch`` samples of ``tokens`` tokens.

    Counted tensor by tensor for the local layer spec in bf16 (h = d, f = d_ffn, a = heads,
    t = TP). Without sequence parallelism LN1/LN2 and the inputs of the column-parallel
    linears are replicated across TP ranks:

    * LN1 input 2h, LN1 output (input of Q, K, V, shared by the three) 2h, LN2 input 2h,
      LN2 output (FC1 input) 2h: ``8h`` replicated;
    * attention: q, k, v and the output saved by SDPA ``8h/t``, its fp32 logsumexp ``4a/t``
      (fused kernels keep no s × s matrix, so Korthikanti et al.'s ``5as/h`` term is absent,
      and the block-diagonal split would make it ``a(s_v² + s_t²)/(s·h)`` anyway);
    * LNinner reads the attention output (already saved) and its output feeds Out: ``2h/t``;
      the FFN saves the GELU input, the LNffn input and the FC2 input: ``6f/t``. Sharded or
      not, a Sub-LN keeps only its input and two fp32 statistics per token
      (:class:`~megatron_m2.model.multiway.TPLayerNorm`);
    * LayerNorm statistics: 8 bytes (fp32 mean and rstd) per token per LayerNorm, four of them.

    Per token: ``8h + (10h + 6f + 4a)/t + 32`` (for f = 4h: 42h at TP=1, 25h at TP=2).
    No dropout (probabilities are 0). The first VL layer adds the backbone's final LayerNorm:
    ``2h + 8``.

    With ``sequence_parallel`` (TP ≥ 2) ``tokens`` is the padded sequence (each part padded
    to a multiple of t, :mod:`megatron_m2.model.sequence_parallel`) and each rank holds
    ``tokens / t`` rows between the TP regions: LN1 and LN2 run on the shard, so their inputs
    and outputs (8h) and statistics (2 × 8) are divided by t; megatron's column-parallel
    linears save their *shard* input and all-gather it again in the backward, so nothing
    gathered is kept; the attention, LNinner's output and the FFN tensors are the gathered
    part's columns on this rank as before; the Sub-LNs run on the gathered whole part, so
    their statistics (2 × 8) stay per token of the whole padded sequence. Per padded token:
    ``(8h + 16 + 10h + 6f + 4a)/t + 16``; the first VL layer's backbone LayerNorm runs on the
    shard too: ``(2h + 8)/t``.

    ``tests/tools/test_plan.py`` checks the total against the bytes autograd actually saves
    for the tiny flavor at TP=1, TP=2 and TP=2 with sequence parallelism.
    """
    h, f, a = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads
    if sequence_parallel:
        sharded = 8 * h + 2 * LN_STATS_BYTES + 10 * h + 6 * f + 4 * a
        if entry:
            sharded += 2 * h + LN_STATS_BYTES
        rows = tokens * batch
        return sharded * rows // tp + 2 * LN_STATS_BYTES * rows
    per_token = 8 * h + (10 * h + 6 * f + 4 * a) // tp + 4 * LN_STATS_BYTES
    if entry:
        per_token += 2 * h + LN_STATS_BYTES
    return per_token * tokens * batch


def active_parameters_per_token(cfg: M2ModelConfig) -> int:
    """GEMM weights one token goes through: one branch of every layer, ``L·(4d² + 2·d·d_ffn)``."""
    return cfg.num_layers * (4 * cfg.hidden_size ** 2 + 2 * cfg.hidden_size * cfg.ffn_hidden_size)


def parameters_section(ctx: Context) -> Dict[str, object]:
    """The plan's ``parameters``: model totals, active parameters per token, each stage's."""
    cfg = ctx.cfg
    return {
        "model_total": count_parameters(cfg),
        "model_total_padded_vocab": count_parameters(cfg, cfg.padded_vocab_size(ctx.tp)),
        "active_per_token": active_parameters_per_token(cfg),
        "per_stage_rank": ctx.params,
    }


def memory_section(ctx: Context) -> Dict[str, object]:
    """The plan's ``memory``: every stage's bytes per GPU (:func:`stage_memory`), the fullest
    stage and whether it fits the GPU."""
    capacity = ctx.cluster.gpu_memory_gb * GB
    overhead = int(ctx.assumptions.overhead_gb * GB)
    mem_stages = [stage_memory(ctx, st_, p, overhead) for st_, p in zip(ctx.stages, ctx.params)]
    peak = max(mem_stages, key=lambda x: x["total_bytes"])
    return {"per_stage": mem_stages, "peak_stage": peak["stage"],
            "peak_bytes": peak["total_bytes"], "capacity_bytes": int(capacity),
            "fits": peak["total_bytes"] <= capacity,
            "headroom_bytes": int(capacity) - peak["total_bytes"]}


def stage_memory(ctx: Context, st_: StageShape, p: Dict[str, int],
                 overhead: int) -> Dict[str, object]:
    """Bytes one GPU of stage ``st_`` (holding the parameters ``p``) needs at its peak.

    Weights ``2·total`` (+ ``2·gemm`` FP8 copies), gradients ``4·trainable``, optimizer
    ``12·trainable`` (÷ DP, rounded up, with the distributed optimizer); activations: one
    micro-batch's (:func:`micro_batch_activations`) × the micro-batches in flight
    (:func:`in_flight_micro_batches`; 1F1B: ``min(PP − stage, M)``), plus one re-materialised
    recomputed layer and, on the last stage, the loss of one contrastive batch
    (:func:`loss_bytes`). With an interleaved pipeline of v chunks per rank the schedule holds
    chunk-micro-batches, each ``1/v`` of the stage's micro-batch (the stage's layers and
    extras spread evenly over its chunks). ``--objective m2`` adds,
    on the last stage, the masked heads' logits (:func:`masked_loss_bytes`) and the frozen
    VQ-KD: its fp32 weights (``4·vqkd``, in ``weights``) and the transient working set of its
    no-grad forward (:func:`~megatron_m2.planner.objective.vqkd_working_bytes`), which runs
    before the schedule: the activations are the larger of the two. The scoring pass of
    ``--image-mask-style attentive`` (forward only, b contrastive columns, before the
    schedule) keeps no activations; its one layer's transient is below the training
    schedule's, and its scores (``[M, b, P]`` fp32) are negligible: nothing is added.
    """
    weights = (BF16_BYTES * p["total"] + (2 * p["gemm"] if ctx.fp8 else 0)
               + FP32_BYTES * p.get("vqkd", 0))
    grads = FP32_BYTES * p["trainable"]
    optimizer = 3 * FP32_BYTES * p["trainable"]
    if ctx.layout.distributed_optimizer:
        optimizer = -(-optimizer // ctx.dp)
    in_flight = in_flight_micro_batches(ctx.pp, st_.index, ctx.m, ctx.v)
    n_rc = ctx.recomputed_layers(st_)
    per_micro, working = micro_batch_activations(ctx, st_, n_rc)
    per_chunk = -(-per_micro // ctx.v)
    loss = loss_bytes(ctx) if st_.is_last else 0
    masked = masked_loss_bytes(ctx) if st_.is_last else 0
    vqkd = (vqkd_working_bytes(ctx.cfg, ctx.b) if st_.is_last and ctx.obj is not None
            and ctx.obj.vqkd else 0)
    # VQ-KD runs before the schedule (Trainer._prepare), when no activation is held yet.
    activations = max(in_flight * per_chunk + working + loss + masked, vqkd)
    total = weights + grads + optimizer + activations + overhead
    chunks = [list(c) for c in st_.chunks] or [[st_.first_layer,
                                                st_.first_layer + st_.num_layers]]
    out = {
        "stage": st_.index, "layers": [chunks[0][0], chunks[-1][1]], "chunks": chunks,
        "params": p["total"], "trainable_params": p["trainable"],
        "weights_bytes": weights, "grads_bytes": grads, "optimizer_bytes": optimizer,
        "activation_bytes_per_micro_batch": per_micro,
        "activation_bytes_per_chunk_micro_batch": per_chunk, "virtual_stages": ctx.v,
        "in_flight_micro_batches": in_flight,
        "recomputed_layers": n_rc, "recompute_working_bytes": working,
        "loss_bytes": loss, "activations_bytes": activations,
        "overhead_bytes": overhead, "total_bytes": total,
    }
    if ctx.obj is not None:
        out.update(masked_loss_bytes=masked, vqkd_working_bytes=vqkd,
                   vqkd_weight_bytes=FP32_BYTES * p.get("vqkd", 0), columns=ctx.cols)
    return out


def in_flight_micro_batches(pp: int, stage: int, m: int, v: int = 1) -> int:
    """(Chunk-)micro-batches whose activations pipeline rank ``stage`` holds at its peak.

    megatron-core's ``get_pp_rank_microbatches`` (``pipeline_parallel/schedules.py``) runs
    ``W`` warmup forwards, then one forward before each backward, so ``W + 1`` are in flight
    (all ``M·v`` when ``W`` reaches them). 1F1B: ``W = PP − stage − 1``, i.e.
    ``min(PP − stage, M)`` micro-batches of the whole stage. Interleaved 1F1B
    (``forward_backward_pipelining_with_interleaving``, v model chunks per rank, micro-batches
    in groups of ``microbatch_group_size_per_vp_stage`` = PP):
    ``W = (PP − stage − 1)·2 + (v − 1)·PP``, each a chunk of ``L / (PP·v)`` layers; rank 0
    holds ``(PP − 1)·2 + (v − 1)·PP + 1`` of them."""
    if pp <= 1:
        return min(1, m)
    warmup = pp - stage - 1 if v <= 1 else (pp - stage - 1) * 2 + (v - 1) * pp
    return min(warmup + 1, m * v)


def recomputed_layer_flags(ctx: Context, st_: StageShape) -> List[bool]:
    """For each layer of ``st_`` (chunk by chunk) whether it is recomputed: all of them
    (uniform), or the first N of each model chunk (block; one chunk without interleaving)."""
    n = st_.num_layers // ctx.v
    if ctx.recompute is None:
        return [False] * st_.num_layers
    if ctx.recompute[0] == "uniform":
        return [True] * st_.num_layers
    return [i % n < ctx.recompute[1] for i in range(st_.num_layers)]


def micro_batch_activations(ctx: Context, st_: StageShape, n_rc: int) -> Tuple[int, int]:
    """``(saved, working)``: the bytes stage ``st_`` keeps for one micro-batch's backward, and
    those of one recomputed layer re-materialised during it.

    Each layer keeps :func:`layer_activation_bytes` (of the padded sequence ``s_p`` under
    sequence parallelism), a recomputed one (the first ``N`` of each chunk,
    :func:`recomputed_layer_flags`; ``n_rc`` of them) only its bf16 input (the rank's shard
    under sequence parallelism); the first stage adds the bf16 images (Conv2d input), the
    int64 token ids and the pad mask (and patch dropout's int64 kept-patch indices); the last
    the VL final LayerNorm's input and statistics (on the shard under sequence parallelism).
    Everything is per column: ``b·(1 + n)`` of them under ``--objective m2``, whose layers
    also keep :func:`mixed_layer_extra_bytes`.
    """
    cfg, s, b, shard = ctx.cfg, ctx.s_p, ctx.cols, ctx.shard
    ids = st_.layer_ids()
    full = [layer_activation_bytes(cfg, ctx.tp, s, b, entry=(k == cfg.num_sep_layers),
                                   sequence_parallel=ctx.sp)
            + mixed_layer_extra_bytes(cfg, ctx.tp, s, ctx.b, ctx.passes) for k in ids]
    flags = recomputed_layer_flags(ctx, st_)  # n_rc of them
    saved = sum(BF16_BYTES * cfg.hidden_size * s * b // shard if rc else full_i
                for rc, full_i in zip(flags, full))
    if st_.is_first:
        saved += b * (BF16_BYTES * cfg.in_channels * cfg.image_size ** 2
                      + 10 * cfg.max_text_len)
        if ctx.layout.image_mask_ratio:
            saved += b * 8 * (ctx.sv - 1)  # the kept patches' int64 indices
        if ctx.obj is not None and ctx.obj.cmim:
            saved += b * cfg.num_patches  # the bool image mask of every column
    if st_.is_last:
        saved += (BF16_BYTES * cfg.hidden_size + LN_STATS_BYTES) * s * b // shard
    working = max((f for rc, f in zip(flags, full) if rc), default=0)
    return saved, working


def mixed_layer_extra_bytes(cfg: M2ModelConfig, tp: int, tokens: int, batch: int,
                            passes: int) -> int:
    """What a layer saves beyond :func:`layer_activation_bytes` (of all ``batch·(1 + passes)``
    columns) in the mixed layout of ``--objective m2`` (``batch`` contrastive columns, then
    ``passes·batch`` fused ones): the fused columns' q, k and v concatenated over both parts for
    the one full attention (``6h/t`` per token; the per-part projections stay alive through the
    contrastive columns' views of them) and the attention output of every column concatenated
    again before LNinner (``2h/t``). The fused attention keeps no s × s matrix (SDPA's fused
    kernels with a key mask; only the logsumexp, already counted per token). 0 for ``itc``."""
    if not passes:
        return 0
    h = cfg.hidden_size
    return (2 * h * tokens * batch * (1 + passes) + 6 * h * tokens * batch * passes) // tp


def masked_loss_bytes(ctx: Context) -> int:
    """The masked heads' loss of one micro-batch on the last stage (``--objective m2``): the
    fp32 copy of the fused columns' final hidden states the trainer hands the loss
    (``4·s·n·b·d``); per head, the rows it reads, gathered in fp32 and cast to bf16 for the
    linear (``(4 + 2)·rows·d``), and per output element on this TP rank the bf16 linear output,
    its fp32 copy (logits, or predicted pixels) and, for the vocabulary-parallel cross-entropy,
    the fp32 softmax it keeps for the backward: ``rows·cols·(2 + 4 + 4)`` (pixels:
    ``(2 + 4)``). rows: ``b·round(mvlm_prob·s_t)`` (CMLM), ``b·image_mask_patches`` (CMIM)."""
    obj = ctx.obj
    if obj is None:
        return 0
    cfg, b, d = ctx.cfg, ctx.b, ctx.cfg.hidden_size
    total = FP32_BYTES * ctx.s * obj.passes * b * d
    for name, cols in head_classes(cfg, obj, ctx.tp).items():
        rows = b * (obj.cmlm_rows(cfg) if name == "cmlm" else obj.cmim_rows())
        per_element = BF16_BYTES + FP32_BYTES + (
            0 if name == "cmim" and obj.mim_target == "pixel" else FP32_BYTES)
        total += rows * ((FP32_BYTES + BF16_BYTES) * d + cols * per_element)
    return total


def loss_bytes(ctx: Context) -> int:
    """The fp32 contrastive loss of one batch on the last stage, per head: logits and
    log-softmax of both directions (``2·2·4·rows·group_rows``) and the gathered image and text
    embeddings (``2·4·group_rows·embed_dim``), with ``group_rows = k × rows``."""
    group_rows = ctx.k * ctx.itc_rows
    return ctx.heads * (2 * 2 * FP32_BYTES * ctx.itc_rows * group_rows
                        + 2 * FP32_BYTES * group_rows * ctx.cfg.embed_dim)
