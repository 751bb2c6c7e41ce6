"""The forward-step functions megatron-core's schedule calls, and moving step outputs between
pipeline stages (used by :class:`~megatron_m2.training.trainer.Trainer`).

Each ``*_step(data_iterator, model, ...)`` is a ``forward_step_func``: it takes the next
prepared micro-batch, runs this rank's stage on the objective's
:meth:`~megatron_m2.objectives.Objective.model_inputs` and returns the output with the function
that turns the last stage's output into ``(loss, metrics)``.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List

import torch
import torch.distributed as dist

__all__ = ["from_last_stage", "params_synced"]


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _run_model(model, inputs):
    """Run this rank's stage on ``inputs`` (an objective's :meth:`model_inputs`)."""
    from ..parallel import cpu_compat

    unwrapped = _unwrap(model)
    if not unwrapped.pre_process:  # later stages read the previous stage's activations
        inputs = {k: inputs[k] for k in ("text_pad_mask", "layout", "patch_scores")
                  if k in inputs}
    # Batches come from the CPU (loader workers, synthetic set): move them to the model.
    device = next(unwrapped.parameters()).device
    if device.type != "cpu":
        inputs = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                  for k, v in inputs.items()}
    # The model's forward never asks for a CUDA device: skip the CPU layer's per-call hook.
    with cpu_compat.suspended():
        out = model(**inputs)
    if isinstance(out, dict):
        # Last stage: the loss runs in fp32 whatever the parameters' dtype (as megatron's
        # Float16Module returns fp32 outputs under --bf16); a no-op for an fp32 model.
        out = {k: v.float() for k, v in out.items()}
    return out


def _loss_step(data_iterator, model, objective, poison: bool = False):
    """forward_step_func of the plain step: the micro-batch's loss of ``objective``."""
    batch = next(data_iterator)
    out = _run_model(model, objective.model_inputs(batch))

    def loss_func(outputs):
        loss, metrics = objective.loss(outputs, batch)
        if poison:  # fault injection (tests of the non-finite-loss handling)
            loss = loss * float("nan")
        metrics = {k: v.detach() for k, v in metrics.items()}
        # A copy: megatron's schedule divides the returned loss by the number of micro-batches
        # in place, which would also scale a detached view of it.
        metrics["loss"] = loss.detach().clone()
        return loss, metrics

    return out, loss_func


def _keep_step(data_iterator, model, keys, objective):
    """forward_step_func of a forward-only pass of the contrastive inputs that keeps the
    outputs named ``keys`` (phase 1 of feature accumulation, and evaluation)."""
    out = _run_model(model, objective.model_inputs(next(data_iterator), contrastive_only=True))

    def keep(outputs):
        kept = {k: v.detach() for k, v in outputs.items() if k in keys}
        return torch.zeros((), device=next(iter(outputs.values())).device), kept

    return out, keep


def _inject_step(data_iterator, model, grads: List[Dict[str, torch.Tensor]], counter: List[int],
                 objective):
    """forward_step_func of phase 2: a surrogate whose gradient is the cached one, plus the
    objective's loss terms outside the cached loss (:meth:`Objective.residual_loss`).

    The schedule divides every micro-batch loss by M, so the surrogate is multiplied by M.
    """
    batch = next(data_iterator)
    out = _run_model(model, objective.model_inputs(batch))
    i = counter[0]
    counter[0] += 1

    def surrogate(outputs):
        g = grads[i]
        loss = sum((outputs[k] * g[k]).sum() for k in g) * len(grads)
        residual, metrics = objective.residual_loss(outputs, batch)
        metrics = {k: v.detach() for k, v in metrics.items()}
        if residual is not None:
            metrics["residual_loss"] = residual.detach().clone()
            loss = loss + residual
        return loss, metrics

    return out, surrogate


def from_last_stage(outputs, keys, count: int, is_last_stage: bool, device
                    ) -> List[Dict[str, torch.Tensor]]:
    """The outputs named ``keys`` of ``count`` micro-batches, which exist on the last
    pipeline stage, on every stage (broadcast over the pipeline group; CPU tensors)."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return [{k: o[k].detach().cpu() for k in keys} for o in outputs]
    group = ps.get_pipeline_model_parallel_group()
    src = ps.get_pipeline_model_parallel_last_rank()
    shapes = [None]
    if is_last_stage:
        shapes = [[{k: (tuple(o[k].shape), str(o[k].dtype)) for k in keys} for o in outputs]]
    dist.broadcast_object_list(shapes, src=src, group=group)
    out = []
    for i in range(count):
        item = {}
        for k in keys:
            shape, dtype = shapes[0][i][k]
            t = (outputs[i][k].detach().to(device).contiguous() if is_last_stage
                 else torch.empty(shape, dtype=getattr(torch, dtype.split(".")[-1]),
                                  device=device))
            dist.broadcast(t, src=src, group=group)
            item[k] = t.cpu()
        out.append(item)
    return out


@contextlib.contextmanager
def params_synced(ddp_models):
    """The model's parameters current inside the block. With --overlap-param-gather the
    optimizer step leaves the all-gather of the updated parameters to the next forward pass
    (forward pre-hooks, bucket by bucket); saving and evaluating read them before that, so they
    gather now (synchronously, as Megatron-LM does around its evaluation and saves)."""
    if not getattr(ddp_models[0], "use_forward_hook", False):
        yield
        return
    for m in ddp_models:
        m.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for m in ddp_models:
            m.enable_forward_pre_hook()
