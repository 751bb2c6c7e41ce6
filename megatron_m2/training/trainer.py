"""The ``m2-pretrain`` training loop on megatron-core.

Order of start-up (each step fails fast with one message rather than hanging a collective):

1. parse and validate arguments against the world size from the launcher environment;
2. ``torch.distributed`` (NCCL on GPUs; gloo + the CPU compatibility layer on CPUs);
3. megatron-core model-parallel groups, seeds;
4. this rank's pipeline stage of M2-Encoder, wrapped in megatron DDP, and the objective
   (``--objective``, :mod:`megatron_m2.objectives`; GBA-ITC creates its ITC groups);
5. megatron optimizer (AdamW; no weight decay on biases, norms, position tables, tokens and
   logit scales) and megatron's LR schedule;
6. steps through megatron-core's forward/backward schedule.

The step code knows objectives only through their interface
(:class:`megatron_m2.objectives.Objective`). A step is either one pass of the schedule over the
step's M micro-batches, each micro-batch's loss computed by the objective on the last stage, or,
with ``--itc-accumulate-features``, two-phase feature accumulation (GradCache): the objective's
outputs of all M micro-batches without a graph (schedule, ``forward_only``), the objective's
loss over the whole step and the gradients of the cached outputs, then the schedule again with
a surrogate loss that injects those gradients.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from functools import partial
from typing import Dict, List

import torch
import torch.distributed as dist

from ..config import ConfigError
from .run_state import (
    ExitConditions,
    phase,
    plot_curves,
    ranks,
    start_run,
    warn_changed_args,
)
from .steps import _inject_step, _keep_step, _loss_step, from_last_stage, params_synced
from .text_trim import fp8_align, trim_text_padding

logger = logging.getLogger("megatron_m2.train")

FAULT_ENV = "M2_FAULT_INJECT"
"""Fault injection for tests: ``nan_loss:STEP`` makes step STEP's loss NaN."""

__all__ = ["Trainer", "no_weight_decay"]


def _quiet_imports() -> None:
    # megatron-core warns at import that TE/apex are missing; on CPU that is the expected state.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
    warnings.filterwarnings("ignore", message=".*tp_group is None.*")


def no_weight_decay(param: torch.nn.Parameter, name: str) -> bool:
    """Parameters excluded from weight decay: biases, norms (all 1-D), position tables,
    [CLS]/mask tokens and logit scales."""
    return (param.ndim <= 1 or name.endswith(".bias") or "embed_positions" in name
            or "cls_token" in name or "mask_token" in name or "logit_scale" in name
            or "logit_vl_scale" in name)


class Trainer:
    """Everything a run needs, built once; :meth:`train_step` advances one global batch."""

    def __init__(self, args):
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

        from ..model import build_model
        from ..objectives import ObjectiveContext, build_objective
        from ..parallel.distributed import initialize_model_parallel, set_seed
        from .arguments import (
            fp8_options,
            model_config,
            recompute_options,
            scheduler_settings,
            virtual_pipeline_size,
        )
        from .synthetic import SyntheticImageText

        self.args = args
        tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
        # --num-layers-per-virtual-pipeline-stage: this many model chunks per pipeline rank.
        self.vpp = virtual_pipeline_size(args, model_config(args))
        initialize_model_parallel(tp, pp, virtual_pipeline_model_parallel_size=self.vpp)
        self.run_id, self._save_lock = start_run(args.save)
        self.dp = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        set_seed(args.seed)

        overrides = {}
        self.tokenizer = None
        if args.tokenizer_model:
            from ..data.identity import read_card, text_style_of
            from ..data.tokenizer import M2Tokenizer
            from .arguments import parse_data_path

            # The captions' text style is the data's (their cards say how they were made): it
            # decides which end of an over-long caption is cut when loading.
            prefixes = [p for _, p in parse_data_path(args.data_path)] if args.data_path else []
            prefixes += [args.valid_data_path] if args.valid_data_path else []
            style = text_style_of({p: read_card(p) for p in prefixes})
            self.tokenizer = M2Tokenizer(args.tokenizer_model, text_style=style)
            # The tokenizer defines the vocabulary and the special ids of the text tower.
            overrides.update(vocab_size=self.tokenizer.vocab_size,
                             eos_token_id=self.tokenizer.eos_id,
                             cls_token_id=self.tokenizer.cls_id)
        self.cfg = cfg = model_config(args, **overrides)
        # --bf16: bf16 weights and activations, fp32 main weights and states in the optimizer.
        params_dtype = torch.bfloat16 if args.bf16 else torch.float32
        if args.fp8_format and args.fp8_recipe == "mxfp8" and torch.cuda.is_available() and (
                torch.cuda.get_device_capability()[0] < 10):
            raise ConfigError(f"--fp8-recipe mxfp8 needs a Blackwell GPU (compute capability "
                              f"10+); this is {torch.cuda.get_device_name()}: use delayed, "
                              f"tensorwise or blockwise")
        build = partial(build_model, cfg, tp, pp, seed=args.seed,
                        transformer_impl=args.transformer_impl, bf16=args.bf16,
                        params_dtype=params_dtype, sequence_parallel=args.sequence_parallel,
                        **recompute_options(args), **fp8_options(args))
        # This rank's model chunks: one, or --num-layers-per-virtual-pipeline-stage's
        # interleaved chunks (chunk i holds global layers (i·PP + rank)·n ... + n).
        self.chunks = [build()] if not self.vpp else [
            build(vp_stage=i, virtual_pipeline_model_parallel_size=self.vpp,
                  # Megatron-LM's default for interleaving: unbatched p2p, overlapped with
                  # compute. Batched ops between the two ranks of PP=2 would pair an
                  # activation with a gradient (both go to the one neighbour).
                  batch_p2p_comm=False, overlap_p2p_comm=True)
            for i in range(self.vpp)]
        self.model = self.chunks[-1]  # the chunk with the heads, on the last stage
        self.is_last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        self.objective = build_objective(args.objective, ObjectiveContext(
            args=args, model=self.model, is_last_stage=self.is_last_stage,
            tokenizer=self.tokenizer,
            is_first_stage=ps.is_pipeline_first_stage(ignore_virtual=True),
            first_model=self.chunks[0]))
        # With the objective's heads.
        n_params = sum(p.numel() for c in self.chunks for p in c.parameters())
        # What every micro-batch holds (the synthetic set and the indexed datasets' loader).
        self.objective.check_fits(("images", "text_ids", "text_pad_mask"))
        logger.info("flavor %s: TP=%d PP=%d%s DP=%d, objective %s, %.2fM parameters on this "
                    "rank", args.flavor, tp, pp,
                    f" (interleaved, {self.vpp} chunks per rank)" if self.vpp else "", self.dp,
                    self.objective.describe(), n_params / 1e6)

        config = self.chunks[0].config  # the one megatron's schedule reads
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=args.overlap_grad_reduce,
            overlap_param_gather=args.overlap_param_gather, bucket_size=args.ddp_bucket_size,
            use_distributed_optimizer=args.use_distributed_optimizer)
        self.ddp_models = [DistributedDataParallel(c.config, ddp_config, c) for c in self.chunks]
        self.ddp_model = self.ddp_models[0]
        opt_config = OptimizerConfig(
            optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
            clip_grad=args.clip_grad, bf16=args.bf16, params_dtype=params_dtype,
            use_distributed_optimizer=args.use_distributed_optimizer)
        no_wd = ParamKey(with_name_predicate=ParamWithNamePredicate(name="m2_no_wd",
                                                                    fn=no_weight_decay))
        self.optimizer = get_megatron_optimizer(opt_config, self.ddp_models,
                                                config_overrides={no_wd: {"wd_mult": 0.0}})
        # Megatron-LM's rule on resume: a schedule that differs from the checkpoint's is an
        # error unless one of the flags picks a side. validate_args has checked it already,
        # with one message, ignoring what cannot change the curve (the length of a constant
        # schedule), so without --override-opt-param-scheduler the checkpoint's values are kept.
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if args.lr_warmup_iters else args.lr,
            override_opt_param_scheduler=args.override_opt_param_scheduler,
            use_checkpoint_opt_param_scheduler=not args.override_opt_param_scheduler,
            **scheduler_settings(args))
        from ..parallel import cpu_compat

        # The inner torch optimizer's per-parameter arithmetic needs no CUDA rewriting: its
        # step runs outside the CPU layer (torch step hooks; nothing on GPUs); megatron's own
        # step around it (buffers, clipping) keeps the layer.
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            cpu_compat.exempt_optimizer(opt.optimizer)
        config.grad_scale_func = self.optimizer.scale_loss
        no_sync = [m.no_sync for m in self.ddp_models]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        dp_ranks = ranks(ps.get_data_parallel_group())

        def finalize(*a, **k):  # the schedule's last step: the DP gradient all-reduce
            with phase(f"the gradient all-reduce of the data-parallel group ({dp_ranks})"):
                return finalize_model_grads(*a, **k)

        config.finalize_model_grads_func = finalize
        self._step_groups = ", ".join(
            [f"tensor-parallel {ranks(ps.get_tensor_model_parallel_group())}",
             f"pipeline {ranks(ps.get_pipeline_model_parallel_group())}"]
            + [f"{name} {ranks(g)}" for name, g in self.objective.process_groups().items()])

        self.num_micro = args.global_batch_size // (args.micro_batch_size * self.dp)
        self._loader = None  # real data: built at the first step (after a possible resume)
        if args.synthetic:
            num_samples = args.synthetic_num_samples or args.global_batch_size
            self.dataset = SyntheticImageText(cfg, num_samples, seed=args.seed)
        else:
            self.dataset = self._build_train_dataset()
        self.forward_backward = get_forward_backward_func()
        self.is_logger_rank = self.is_last_stage and ps.get_tensor_model_parallel_rank() == 0
        self.step = 0
        self.consumed_samples = 0  # global samples of the steps taken (the data position)
        self.skipped_steps = 0
        self.bad_samples = 0  # samples skipped as unreadable (--skip-bad-samples), all replicas
        self._bad_this_step = 0
        self._counts_data = (ps.get_tensor_model_parallel_rank() == 0
                             and ps.is_pipeline_first_stage(ignore_virtual=True))
        self.evaluator = None
        if args.valid_data_path:
            from .evaluation import Evaluator, ScheduleEncoder

            encoder = ScheduleEncoder(self.forward_only, cfg, self.tokenizer,
                                      args.micro_batch_size, self.is_last_stage,
                                      batches_multiple=pp if self.vpp else 1)
            self.evaluator = Evaluator(encoder, args.valid_data_path,
                                       max_samples=args.eval_max_samples,
                                       report=self.is_logger_rank)
        if args.load:
            self._resume(args.load)

    def close(self) -> None:
        """Release what the run holds outside the process (the save folder's lock)."""
        if self._save_lock is not None:
            self._save_lock.release()
            self._save_lock = None

    # -- checkpoints -----------------------------------------------------------------------
    def _resume(self, path: str) -> None:
        """Load ``--load``: everything (resume), weights and step (``--no-load-optim``), or
        weights only as the start of a new run (``--finetune``)."""
        from ..checkpoint import holds_checkpoint, load_checkpoint

        a = self.args
        if not holds_checkpoint(path):
            logger.info("--load %s holds no checkpoint yet: starting from scratch", path)
            return
        meta = load_checkpoint(path, self.chunks, self.optimizer,
                               None if (a.finetune or a.no_load_optim) else self.scheduler,
                               load_optimizer=not (a.no_load_optim or a.finetune),
                               load_rng=not (a.no_load_rng or a.finetune),
                               verify=not a.no_verify_checksums)
        if a.finetune:
            logger.info("--finetune: starting a new run at step 0 from the weights of %s", path)
            return
        self.step = int(meta["step"])
        self.consumed_samples = int(meta.get("consumed_samples",
                                             self.step * a.global_batch_size))
        if a.no_load_optim:  # fresh AdamW states; the command line's schedule at this step
            self.scheduler.step(increment=self.step)
        warn_changed_args(meta.get("args", {}), vars(a))
        decay_end = self.scheduler.lr_decay_steps
        if a.train_iters > decay_end and self.scheduler.min_lr == 0.0 and dist.get_rank() == 0:
            logger.warning("the LR schedule ends at step %d (lr %g from then on) but "
                           "--train-iters is %d: steps %d-%d would not learn; pass "
                           "--override-opt-param-scheduler to follow this command line's "
                           "schedule", decay_end, self.scheduler.min_lr, a.train_iters,
                           decay_end + 1, a.train_iters)

    def params_synced(self):
        """Context: the parameters current inside it (see :func:`.steps.params_synced`)."""
        return params_synced(self.ddp_models)

    def save(self) -> str:
        """Write a checkpoint of the current step (collective)."""
        with self.params_synced():
            return self._save()

    def _save(self) -> str:
        from ..checkpoint import save_checkpoint

        meta = {"model_config": self.cfg.to_dict(), "args": vars(self.args),
                "run_id": self.run_id,
                "consumed_samples": self.consumed_samples, "flavor": self.args.flavor,
                "tokenizer": self.tokenizer.to_dict() if self.tokenizer else None}
        with phase(f"saving the checkpoint of step {self.step}"):
            return save_checkpoint(self.args.save, self.step, self.chunks, self.optimizer,
                                   self.scheduler, meta, tokenizer_path=self.args.tokenizer_model)

    def _build_train_dataset(self):
        from ..data.dataset import BlendedDataset, ImageTextDataset, split_ranges
        from ..data.indexed import ImageTextIndexedDataset
        from ..data.transforms import train_transform
        from .arguments import parse_crop_scale, parse_data_path, parse_randaugment, parse_split

        a, cfg = self.args, self.cfg
        transform = train_transform(cfg.image_size, parse_crop_scale(a.crop_scale), hflip=a.hflip,
                                    randaugment=parse_randaugment(a.randaugment))
        self._image_decoder = None
        if getattr(a, "image_decode", "cpu") == "gpu":  # workers pass bytes + crop/flip params
            from ..data.gpu_decode import EncodedTrainTransform, GpuBatchDecoder

            transform = EncodedTrainTransform.from_train_transform(transform)
            self._image_decoder = GpuBatchDecoder.for_transform(
                transform, torch.device("cuda", torch.cuda.current_device()))
        split = parse_split(a.split)
        parts, weights = [], []
        for w, prefix in parse_data_path(a.data_path):
            n = len(ImageTextIndexedDataset(prefix))
            parts.append(ImageTextDataset(prefix, self.tokenizer, transform, cfg.max_text_len,
                                          caption_policy=a.caption_lang, seed=a.seed,
                                          sample_range=split_ranges(n, split)[0],
                                          skip_bad=a.skip_bad_samples > 0,
                                          token_dropout=a.caption_token_dropout))
            weights.append(w)
        blend = BlendedDataset(parts, weights)
        logger.info("training data: %d samples from %d dataset(s) (%s)", len(blend), len(parts),
                    ", ".join(f"{p.prefix}: {len(p)}" for p in parts))
        return blend

    # -- one step --------------------------------------------------------------------------
    def _microbatches(self) -> List[Dict[str, torch.Tensor]]:
        a = self.args
        if a.synthetic:
            from .synthetic import microbatches

            batches = list(microbatches(self.dataset, self.step, a.global_batch_size,
                                        a.micro_batch_size, self.dp_rank, self.dp))
            return self._prepare(batches)
        if self._loader is None:
            from ..data.dataset import GlobalBatchSampler, build_loader

            # Position = samples consumed by the steps already taken: exact after a resume.
            sampler = GlobalBatchSampler(len(self.dataset), a.global_batch_size,
                                         a.micro_batch_size, self.dp_rank, self.dp, seed=a.seed,
                                         consumed_samples=self.consumed_samples)
            self._loader = iter(build_loader(self.dataset, sampler, a.num_workers))
        from ..data.dataset import BadSampleError, worker_error_message

        try:
            batches = [next(self._loader) for _ in range(self.num_micro)]
        except BadSampleError as e:  # raised in a loader worker: keep its own message
            raise BadSampleError(worker_error_message(e) + " (--skip-bad-samples N skips up to "
                                 "N such samples)") from None
        for b in batches:
            b.pop("lang", None)
            bad = b.pop("bad_samples", None)
            if bad is not None:
                self._bad_this_step += int(bad.sum())
            if self._image_decoder is not None:  # --image-decode gpu: JPEG bytes -> images
                self._image_decoder(b)
        return self._prepare(batches)

    def _prepare(self, batches):
        """Each micro-batch with its samples' global positions in the run's sample stream
        (``sample_positions``: the sampler's rule, micro-batch m of DP rank r holds positions
        ``consumed + m·b·N + r·b + [0, b)``), as the objective prepares it."""
        b, out = self.args.micro_batch_size, []
        if self.args.trim_text_padding:  # a collective: every rank, once per step
            batches = trim_text_padding(batches, b, fp8_align(self.args))
        for m, batch in enumerate(batches):
            lo = self.consumed_samples + m * b * self.dp + self.dp_rank * b
            batch["sample_positions"] = torch.arange(lo, lo + b)
            out.append(self.objective.prepare_batch(batch))
        return out

    def _schedule(self, step_func, batches, forward_only: bool, multiple: int = 1):
        with phase(f"the forward/backward schedule ({self._step_groups})"):
            return self._run_schedule(step_func, batches, forward_only, multiple)

    def _run_schedule(self, step_func, batches, forward_only: bool, multiple: int = 1):
        # The model sees `multiple` samples per data sample (the objective's passes): the
        # pipeline's messages are that many columns wide, and as long as the objective says.
        # An interleaved pipeline calls each model chunk once per micro-batch, each with its
        # own iterator over the same micro-batches.
        data = ([iter(batches) for _ in self.ddp_models] if len(self.ddp_models) > 1
                else iter(batches))
        return self.forward_backward(
            forward_step_func=step_func, data_iterator=data, model=self.ddp_models,
            num_microbatches=len(batches), seq_length=self.objective.seq_length(batches),
            micro_batch_size=self.args.micro_batch_size * multiple, forward_only=forward_only)

    def forward_only(self, batches, keys) -> List[Dict[str, torch.Tensor]]:
        """The outputs named ``keys`` of every micro-batch in ``batches`` in the contrastive
        layout (one forward-only pass of the schedule; the outputs exist on the last pipeline
        stage, ``[]`` elsewhere).

        Runs without autograd: megatron's forward-only schedule does not disable it itself,
        and a graph kept alive per micro-batch until the pass ends would cost the activation
        memory feature accumulation exists to save (and evaluation would keep graphs too)."""
        with torch.no_grad():
            return self._schedule(partial(_keep_step, keys=frozenset(keys),
                                          objective=self.objective), batches,
                                  forward_only=True,
                                  multiple=self.objective.batch_multiple(contrastive_only=True))

    def _accumulated_losses(self, batches):
        """Two-phase step of feature accumulation (GradCache): cache the objective's outputs
        of every micro-batch, its loss and their gradients over the whole step, then re-run the
        micro-batches injecting those gradients. Returns this rank's ``(losses, metrics)``."""
        scoring = tuple(self.objective.scoring_keys)
        cached = self.forward_only(batches, tuple(self.objective.outputs) + scoring)
        if scoring:
            self.objective.apply_scores(batches, self._from_last_stage(cached, scoring,
                                                                        len(batches)))
        grads: List[Dict[str, torch.Tensor]] = []
        losses, metrics = [], []
        if self.is_last_stage:
            backward_scale = float(self.optimizer.get_loss_scale())
            loss, grads, m = self.objective.cached_loss(cached, backward_scale)
            losses, metrics = [float(loss)], [m]
        out = self._schedule(partial(_inject_step, grads=grads, counter=[0],
                                     objective=self.objective), batches, forward_only=False,
                             multiple=self.objective.batch_multiple())
        if self.is_last_stage and out and all("residual_loss" in o for o in out):
            # The loss terms outside the cached one, per micro-batch: averaged, added.
            losses = [losses[0] + sum(float(o["residual_loss"]) for o in out) / len(out)]
            metrics = [{**metrics[0], **{k: v for k, v in o.items() if k != "residual_loss"}}
                       for o in out]
        return losses, metrics

    def _from_last_stage(self, outputs, keys, count: int) -> List[Dict[str, torch.Tensor]]:
        return from_last_stage(outputs, keys, count, self.is_last_stage,
                               next(self.model.parameters()).device)

    def train_step(self) -> Dict[str, float]:
        """Forward, backward and optimizer step on the next global batch; returns its record."""
        for m in self.ddp_models:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        batches = self._microbatches()
        poison = os.environ.get(FAULT_ENV, "") == f"nan_loss:{self.step + 1}"
        if self.objective.scoring_keys and not self.args.itc_accumulate_features:
            keys = tuple(self.objective.scoring_keys)
            with phase("the scoring pass of the objective (forward only)"):
                scores = self.forward_only(batches, keys)
            self.objective.apply_scores(batches, self._from_last_stage(scores, keys,
                                                                        len(batches)))
        if self.args.itc_accumulate_features:
            losses, metrics = self._accumulated_losses(batches)
        else:
            out = self._schedule(partial(_loss_step, objective=self.objective, poison=poison),
                                 batches, forward_only=False,
                                 multiple=self.objective.batch_multiple())
            losses = [float(m["loss"]) for m in out] if self.is_last_stage else []
            metrics = out if self.is_last_stage else []
        # Global mean loss and metrics over the DP ranks, and whether any rank saw a non-finite
        # loss; the decision below is then identical on every rank.
        # A metric is reported when the logger ranks have it for every micro-batch (slots
        # 4 + n + j count the ranks that have it), not just because this rank has none.
        n_metrics = len(self.objective.metrics)
        local = torch.zeros(4 + 2 * n_metrics, dtype=torch.float64)
        if self.is_logger_rank and losses:
            local[0], local[1] = sum(losses) / len(losses), 1.0
            for j, k in enumerate(self.objective.metrics):
                if metrics and all(k in m for m in metrics):
                    local[4 + j] = sum(float(m[k]) for m in metrics) / len(metrics)
                    local[4 + n_metrics + j] = 1.0
        if any(not math.isfinite(x) for x in losses):
            local[2] = 1.0
        if self._counts_data:  # one rank per data-parallel replica loads distinct samples
            local[3] = self._bad_this_step
        self._bad_this_step = 0
        with phase("the loss all-reduce over all ranks"):
            dist.all_reduce(local)
        self._note_bad_samples(int(local[3]))
        loss = float(local[0] / local[1])
        step_metrics = {k: float(local[4 + j] / local[4 + n_metrics + j])
                        for j, k in enumerate(self.objective.metrics)
                        if local[4 + n_metrics + j] > 0}
        self.step += 1
        self.consumed_samples += self.args.global_batch_size
        if local[2] > 0:
            if self.args.on_nonfinite == "stop":
                raise FloatingPointError(
                    f"non-finite loss at step {self.step}; stopping before the optimizer step "
                    f"(no checkpoint written). Use --on-nonfinite skip to skip such steps.")
            self.skipped_steps += 1
            logger.warning("non-finite loss at step %d: step skipped (%d so far)", self.step,
                           self.skipped_steps)
            return {"step": self.step, "loss": float("nan"), "skipped": True,
                    "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": float("nan")}
        with phase("the optimizer step (gradient norm over the model-parallel group, "
                    "parameter all-gather of the distributed optimizer)"):
            ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.objective.after_optimizer_step(self.optimizer)
            self.scheduler.step(increment=1)
        rec = {"step": self.step, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
               "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
               **step_metrics}
        if self.bad_samples:
            rec["bad_samples"] = self.bad_samples
        return rec

    def _note_bad_samples(self, count: int) -> None:
        """Samples skipped this step (all replicas): counted, logged, and at most
        --skip-bad-samples over the run."""
        if not count:
            return
        self.bad_samples += count
        logger.warning("step %d: %d bad sample(s) skipped (%d of at most %d so far)",
                       self.step + 1, count, self.bad_samples, self.args.skip_bad_samples)
        if self.bad_samples > self.args.skip_bad_samples:
            from ..data.dataset import BadSampleError

            raise BadSampleError(f"{self.bad_samples} bad samples so far, more than "
                                 f"--skip-bad-samples {self.args.skip_bad_samples} (the "
                                 "warnings above name them)")

    # -- the loop --------------------------------------------------------------------------
    def evaluate(self) -> Dict[str, Dict[str, float]]:
        """Held-out retrieval per language (every rank gets the same figures)."""
        from ..eval.retrieval import chance_recall, format_table

        with phase(f"held-out evaluation at step {self.step}"), self.params_synced():
            results = self.evaluator.evaluate(torch.nn.ModuleList(self.ddp_models))
        rows = dict(results)
        sizes = set(self.evaluator.chance_sizes())
        if len(sizes) == 1:  # one caption per image: R@k of a random ranking is k / N
            rows["chance"] = chance_recall(sizes.pop())
        logger.info("held-out retrieval at step %d (VL head, %%):\n%s", self.step,
                    format_table(rows))
        return results

    def train(self) -> List[Dict[str, float]]:
        a = self.args
        records: List[Dict[str, float]] = []
        rank0 = dist.get_rank() == 0
        # A resumed run appends to its log; a new one (also --finetune) starts it afresh.
        log_file = open(a.log_json, "a" if self.step else "w") if (a.log_json and rank0) else None
        tb = None
        if a.tensorboard_dir and rank0:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(a.tensorboard_dir)
        t_start = time.perf_counter()
        first_step = self.step  # after a resume, ETA counts only this run's steps
        t_last, last_step = t_start, self.step
        stop = ExitConditions(a, t_start)
        try:
            while self.step < a.train_iters:
                rec = self.train_step()
                records.append(rec)
                if rec["step"] % a.log_interval == 0 or rec["step"] == a.train_iters:
                    now = time.perf_counter()
                    sps = (rec["step"] - last_step) * a.global_batch_size / (now - t_last)
                    eta = ((a.train_iters - rec["step"]) * (now - t_start)
                           / (rec["step"] - first_step))
                    rec["samples_per_s"] = sps
                    t_last, last_step = now, rec["step"]
                    # The parts of the loss the objective names (m2: itc, cmlm, cmim).
                    parts = "".join(f" | {k} {rec[k]:.4f}"
                                    for k in self.objective.console_metrics if k in rec)
                    logger.info("step %5d/%d | loss %.4f | lr %.3e | grad-norm %.3f | "
                                "%.1f samples/s | ETA %ds%s", rec["step"], a.train_iters,
                                rec["loss"], rec["lr"], rec["grad_norm"], sps, eta, parts)
                if self.evaluator and ((a.eval_interval and rec["step"] % a.eval_interval == 0)
                                       or rec["step"] == a.train_iters):
                    rec["eval"] = self.evaluate()
                if tb:
                    for key in ("loss", "lr", "grad_norm", "samples_per_s",
                                *self.objective.metrics):
                        if key in rec and math.isfinite(rec[key]):
                            tb.add_scalar(f"train/{key}", rec[key], rec["step"])
                    for lang, m in rec.get("eval", {}).items():
                        for key, v in m.items():
                            tb.add_scalar(f"eval_{lang}/{key}", v, rec["step"])
                if log_file:
                    log_file.write(json.dumps(rec) + "\n")
                    log_file.flush()
                if a.save and a.save_interval and rec["step"] % a.save_interval == 0:
                    self.save()
                reason = stop.reason(self.step)
                if reason:
                    logger.info("stopping after step %d: %s%s", self.step, reason,
                                "; saving a checkpoint" if a.save else " (no --save: nothing "
                                "saved)")
                    break
            if a.save and not (a.save_interval and self.step % a.save_interval == 0):
                self.save()
        finally:
            stop.close()
            if log_file:
                log_file.close()
            if tb:
                tb.close()
        curve = a.loss_curve or (os.path.join(a.save, "loss_curve.png") if a.save else None)
        if curve and rank0 and records:
            plot_curves(records, curve)
            logger.info("loss curve written to %s", curve)
        return records
