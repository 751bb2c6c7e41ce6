"""The ``m2-pretrain`` training loop on megatron-core.

Order of start-up (each step fails fast with one message rather than hanging a collective):

1. parse and validate arguments against the world size from the launcher environment;
2. ``torch.distributed`` (NCCL on GPUs; gloo + the CPU compatibility layer on CPUs);
3. megatron-core model-parallel groups, seeds;
4. this rank's pipeline stage of M2-Encoder, wrapped in megatron DDP;
5. megatron optimizer (AdamW; no weight decay on biases, norms, position tables, tokens and
   logit scales) and megatron's LR schedule;
6. steps through megatron-core's forward/backward schedule.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import warnings
from functools import partial
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from ..config import ConfigError

logger = logging.getLogger("megatron_m2.train")

__all__ = ["main", "pretrain", "no_weight_decay"]


def _quiet_imports() -> None:
    # megatron-core warns at import that TE/apex are missing; on CPU that is the expected state.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
    warnings.filterwarnings("ignore", message=".*transformer_engine.*not installed.*")


def no_weight_decay(param: torch.nn.Parameter, name: str) -> bool:
    """Parameters excluded from weight decay: biases, norms (all 1-D), position tables,
    [CLS]/mask tokens and logit scales."""
    return (param.ndim <= 1 or name.endswith(".bias") or "embed_positions" in name
            or "cls_token" in name or "mask_token" in name or "logit_scale" in name
            or "logit_vl_scale" in name)


def _setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S")
    # megatron-core logs its full configs and bucket layouts at INFO; keep its warnings only.
    logging.getLogger("megatron").setLevel(logging.WARNING)


def _fail(msg: str) -> None:
    sys.stderr.write(f"m2-pretrain: error: {msg}\n")
    sys.stderr.flush()
    raise SystemExit(2)


def _forward_step(data_iterator, model, heads: str, itc_group):
    from ..loss import itc_loss

    batch = next(data_iterator)
    unwrapped = model.module if hasattr(model, "module") else model
    if unwrapped.pre_process:
        out = model(batch["images"], batch["text_ids"], batch["text_pad_mask"])
    else:
        out = model(text_pad_mask=batch["text_pad_mask"],
                    split_position=unwrapped.config.vision_seq_len)

    def loss_func(outputs):
        loss, metrics = itc_loss(outputs, group=itc_group, heads=heads)
        metrics = {k: v.detach() for k, v in metrics.items()}
        metrics["loss"] = loss.detach()
        return loss, metrics

    return out, loss_func


def pretrain(args) -> List[Dict[str, float]]:
    """Run training as configured by ``args`` (from :func:`arguments.parse_args`).

    Returns the per-step log records (on every rank; figures are global averages).
    """
    _quiet_imports()
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from ..flavors import get_flavor
    from ..model import build_model
    from ..parallel.distributed import (
        discover_env,
        init_distributed,
        initialize_model_parallel,
        set_seed,
    )
    from .arguments import validate_args
    from .synthetic import SyntheticImageText, microbatches

    env = discover_env()
    _setup_logging(env.rank)
    try:
        validate_args(args, env.world_size)
    except (ConfigError, KeyError) as e:
        _fail(str(e).strip("'\""))

    init_distributed(timeout_s=args.distributed_timeout_minutes * 60)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    initialize_model_parallel(tp, pp)
    dp = ps.get_data_parallel_world_size()
    dp_rank = ps.get_data_parallel_rank()
    set_seed(args.seed)

    overrides = {"vocab_size": args.vocab_size} if args.vocab_size else {}
    cfg = get_flavor(args.flavor, **overrides)
    dtype_kwargs = {"bf16": True, "params_dtype": torch.float32} if args.bf16 else {}
    model = build_model(cfg, tp, pp, seed=args.seed, transformer_impl=args.transformer_impl,
                        **dtype_kwargs)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("flavor %s: TP=%d PP=%d DP=%d, %.2fM parameters on this rank", args.flavor,
                tp, pp, dp, n_params / 1e6)

    config = model.config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=args.use_distributed_optimizer)
    ddp_model = DistributedDataParallel(config, ddp_config, model)

    opt_config = OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, bf16=args.bf16, params_dtype=torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer)
    no_wd = ParamKey(with_name_predicate=ParamWithNamePredicate(name="m2_no_wd",
                                                                fn=no_weight_decay))
    optimizer = get_megatron_optimizer(opt_config, [ddp_model],
                                       config_overrides={no_wd: {"wd_mult": 0.0}})
    decay_iters = args.lr_decay_iters or args.train_iters
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if args.lr_warmup_iters else args.lr, max_lr=args.lr,
        min_lr=args.min_lr, lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=max(decay_iters, args.lr_warmup_iters + 1),
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay,
        end_wd=args.weight_decay, wd_incr_steps=decay_iters, wd_incr_style="constant")

    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = ddp_model.no_sync
    config.finalize_model_grads_func = finalize_model_grads

    num_samples = args.synthetic_num_samples or args.global_batch_size
    dataset = SyntheticImageText(cfg, num_samples, seed=args.seed)
    num_micro = args.global_batch_size // (args.micro_batch_size * dp)
    seq_len = cfg.vision_seq_len + cfg.max_text_len
    forward_backward = get_forward_backward_func()
    itc_group = ps.get_data_parallel_group()
    forward_step = partial(_forward_step, heads=args.itc_heads, itc_group=itc_group)
    is_logger_rank = (ps.is_pipeline_last_stage(ignore_virtual=True)
                      and ps.get_tensor_model_parallel_rank() == 0)

    records: List[Dict[str, float]] = []
    log_file = open(args.log_json, "w") if (args.log_json and env.rank == 0) else None
    t_start = time.perf_counter()
    t_last, last_step = t_start, 0
    try:
        for step in range(args.train_iters):
            ddp_model.zero_grad_buffer()
            optimizer.zero_grad()
            data = microbatches(dataset, step, args.global_batch_size, args.micro_batch_size,
                                dp_rank, dp)
            losses = forward_backward(
                forward_step_func=forward_step, data_iterator=data, model=[ddp_model],
                num_microbatches=num_micro, seq_length=seq_len,
                micro_batch_size=args.micro_batch_size, forward_only=False)
            ok, grad_norm, _ = optimizer.step()
            if ok:
                scheduler.step(increment=1)
            # Global mean loss: average the last stage's micro-batch losses over DP ranks.
            local = torch.zeros(2, dtype=torch.float64)
            if is_logger_rank and losses:
                local[0] = sum(float(m["loss"]) for m in losses) / len(losses)
                local[1] = 1.0
            dist.all_reduce(local)
            loss = float(local[0] / local[1])
            lr = optimizer.param_groups[0]["lr"]
            rec = {"step": step + 1, "loss": loss, "lr": lr,
                   "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}
            records.append(rec)
            if not math.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {step + 1}")
            if (step + 1) % args.log_interval == 0 or step + 1 == args.train_iters:
                now = time.perf_counter()
                sps = (step + 1 - last_step) * args.global_batch_size / (now - t_last)
                eta = (args.train_iters - step - 1) * (now - t_start) / (step + 1)
                rec["samples_per_s"] = sps
                t_last, last_step = now, step + 1
                logger.info("step %5d/%d | loss %.4f | lr %.3e | grad-norm %.3f | "
                            "%.1f samples/s | ETA %ds", step + 1, args.train_iters, loss, lr,
                            rec["grad_norm"], sps, eta)
            if log_file:
                log_file.write(json.dumps(rec) + "\n")
                log_file.flush()
    finally:
        if log_file:
            log_file.close()
    return records


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``m2-pretrain`` / ``python -m megatron_m2.pretrain``."""
    from .arguments import parse_args

    args = parse_args(argv)
    try:
        pretrain(args)
    finally:
        from ..parallel.distributed import destroy
        destroy()
    return 0
