"""Sharded, atomic, layout-independent training checkpoints (collective save and load).

Layout of ``<save>/`` (file names and ``meta.json`` fields: :mod:`megatron_m2.checkpoint.format`)::

    latest_checkpointed_iteration.txt     tracker: the newest *complete* checkpoint
    iter_0000100/
        meta.json                         step, consumed samples, scheduler, args, model config
        model_pp000.safetensors           fp32 weights of pipeline stage 0 (canonical names, full)
        optim_pp000.safetensors           AdamW states of stage 0
        rng_rank00000.safetensors / .json per-rank RNG states
        tokenizer.model                   the run's tokenizer, when it has one

Tensors are stored under their *canonical* names (the unsplit model's: global layer index) and
full TP=1 shapes (vocabulary padding dropped), gathered over the tensor-parallel group and
written by one rank per pipeline stage; distributed-optimizer states are first reassembled over
the data-parallel group, so a checkpoint does not depend on whether the optimizer was
distributed. Weights are fp32: under ``--bf16`` they are the optimizer's fp32 main weights (the
bf16 parameters are their rounding), so bf16 and fp32 runs load each other's checkpoints.
Loading slices what each rank needs from whichever stage file holds it, so a checkpoint loads
onto any TP / PP / DP layout, with or without the distributed optimizer. Everything is
safetensors or JSON: loading never unpickles anything.

Atomicity: all ranks write into ``iter_N.tmp/``; after a barrier, rank 0 fsyncs, renames it to
``iter_N/`` and then rewrites the tracker (write + fsync + rename). A crash or kill at any
point leaves the tracker naming the previous complete checkpoint; a stale ``.tmp`` is removed
by the next save.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from .atomic import fsync_file, publish_checkpoint
from .errors import CheckpointError
from .format import (
    META_FILE,
    MODEL_CONFIG_MUST_MATCH,
    RUN_ID_KEY,
    STEP_KEY,
    TMP_SUFFIX,
    TOKENIZER_FILE,
    group_of,
    groups_record,
    iter_dir,
    layout_record,
    optim_key,
    parameter_groups,
    rng_file,
    stage_file,
    stage_files,
    strip_vocab_padding,
    training_meta,
)
from .meta import latest_iteration, resolve_checkpoint
from .tensors import TensorFile, save_tensors

logger = logging.getLogger(__name__)

__all__ = ["save_checkpoint", "load_checkpoint", "load_model_weights",
           "optimizer_state_holders", "FAULT_INJECTION_ENV"]

FAULT_INJECTION_ENV = "M2_FAULT_INJECT"
"""Fault injection for tests: ``checkpoint_write:STEP`` kills the process (SIGKILL) after it
has written its first file of the checkpoint of step STEP; ``checkpoint_enospc:STEP:RANK``
makes rank RANK's disk full while it saves step STEP. Unset in normal runs."""


def _maybe_inject_fault(step: int) -> None:
    spec = os.environ.get(FAULT_INJECTION_ENV, "")
    if spec == f"checkpoint_write:{step}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _maybe_inject_enospc(step: int, rank: int, path: str) -> None:
    """``checkpoint_enospc:STEP:RANK``: that rank's disk is full while it saves step STEP."""
    if os.environ.get(FAULT_INJECTION_ENV, "") == f"checkpoint_enospc:{step}:{rank}":
        import errno

        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


# -- which tensors: model params and the optimizer states behind them --------------------------
def _optimizers(optimizer) -> List:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def optimizer_state_holders(optimizer) -> Iterator[Tuple[torch.nn.Parameter, torch.Tensor,
                                                Optional[Tuple[int, int]], object]]:
    """``(model param, param holding the optimizer state, flat range or None, torch optimizer)``.

    The holder is the model param itself (fp32 optimizer), its fp32 main copy (mixed
    precision), or this DP rank's flat shard of it (distributed optimizer, with the range of the
    flattened param that the shard covers).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    for opt in _optimizers(optimizer):
        inner = opt.optimizer
        if isinstance(opt, DistributedOptimizer):
            pairs = list(zip(opt.model_float16_groups, opt.shard_fp32_from_float16_groups)) + \
                list(zip(opt.model_fp32_groups, opt.shard_fp32_groups))
            for model_group, shard_group in pairs:
                for mp, sp in zip(model_group, shard_group):
                    r = opt._get_model_param_range_map(mp)["param"]
                    yield mp, sp, (r.start, r.end), inner
        elif isinstance(opt, Float16OptimizerWithFloat16Params):
            for model_group, main_group in zip(opt.float16_groups, opt.fp32_from_float16_groups):
                for mp, main in zip(model_group, main_group):
                    yield mp, main, None, inner
            for group in opt.fp32_from_fp32_groups:
                for p in group:
                    yield p, p, None, inner
        else:
            for group in inner.param_groups:
                for p in group["params"]:
                    yield p, p, None, inner


def _tp_gather(t: torch.Tensor, like: torch.nn.Parameter, tp_group) -> torch.Tensor:
    if not getattr(like, "tensor_model_parallel", False) or dist.get_world_size(tp_group) == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(parts, t.contiguous(), group=tp_group)
    return torch.cat(parts, dim=like.partition_dim)


def _is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(opt, DistributedOptimizer) for opt in _optimizers(optimizer))


def _dp_assemble(mp: torch.nn.Parameter, holder, rng, state, dp_group
                 ) -> Tuple[Dict[str, torch.Tensor], Optional[torch.Tensor]]:
    """Full (TP-local) main weight and AdamW states of ``mp`` from each DP rank's flat shard
    (distributed optimizer); also the step. Every DP rank calls it for every parameter, in the
    same order, whether or not its shard covers ``mp``.

    One all-reduce (sum) of ``[exp_avg | exp_avg_sq | main | owners, with_state, step]``: the
    shards are disjoint and zero elsewhere, so the sum is their concatenation, exactly.
    """
    n = mp.numel()
    buf = torch.zeros(3 * n + 3, dtype=torch.float32)
    if holder is not None:
        lo, hi = rng
        buf[3 * n] = 1.0
        buf[2 * n + lo:2 * n + hi] = holder.detach().reshape(-1).float().cpu()
        if state.get("exp_avg") is not None:
            buf[lo:hi] = state["exp_avg"].detach().reshape(-1).float().cpu()
            buf[n + lo:n + hi] = state["exp_avg_sq"].detach().reshape(-1).float().cpu()
            buf[3 * n + 1] = 1.0
            buf[3 * n + 2] = float(state.get("step", 0))
    dist.all_reduce(buf, group=dp_group)
    owners, with_state, step_sum = buf[3 * n:].tolist()
    if not owners:
        return {}, None
    if with_state not in (0.0, owners):
        raise RuntimeError(f"optimizer state of a parameter exists on {with_state:.0f} of the "
                           f"{owners:.0f} data-parallel ranks holding its shards")
    entries = {"main": buf[2 * n:3 * n].view(mp.shape)}
    step = None
    if with_state:
        entries["exp_avg"] = buf[:n].view(mp.shape)
        entries["exp_avg_sq"] = buf[n:2 * n].view(mp.shape)
        step = torch.tensor(step_sum / with_state)
    return entries, step


class _Stage:
    """This rank's model chunks seen as one stage: one chunk, or the chunks of an interleaved
    pipeline (a list), parameters in chunk order (the same on every rank of a stage)."""

    def __init__(self, model):
        self.chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        self.model_cfg = self.chunks[0].model_cfg

    def parameters(self):
        for chunk in self.chunks:
            yield from chunk.parameters()


def _as_stage(model) -> _Stage:
    return model if isinstance(model, _Stage) else _Stage(model)


def _full_name_map(model) -> Dict[int, str]:
    from ..model.init import canonical_name

    return {id(p): canonical_name(n, chunk.layer_offset)
            for chunk in _as_stage(model).chunks for n, p in chunk.named_parameters()}


# -- save --------------------------------------------------------------------------------------
def save_checkpoint(root: str, step: int, model, optimizer, scheduler, meta: Dict,
                    tokenizer_path: Optional[str] = None) -> str:
    """Write the checkpoint of ``step`` (collective: every rank calls it). Returns its dir.

    A rank that cannot write its files (a full disk, a quota) makes every rank raise one
    :class:`~megatron_m2.checkpoint.CheckpointError` naming the rank and the file; the partial
    ``iter_N.tmp`` is removed and the tracker keeps naming the last good checkpoint.
    Parameters of registered groups (:func:`~megatron_m2.checkpoint.register_parameter_group`)
    are saved like any other; ``meta.json`` records the groups the model holds.
    """
    model = _as_stage(model)
    from megatron.core import parallel_state as ps

    rank = dist.get_rank()
    final, tmp = iter_dir(root, step), iter_dir(root, step) + TMP_SUFFIX
    # Every file names the run and step it belongs to: a checkpoint mixing two runs' files
    # (say, two runs sharing a save folder) is refused when loaded.
    stamp = {RUN_ID_KEY: str(meta.get("run_id")), STEP_KEY: str(step)}
    error = None
    if rank == 0:
        try:
            os.makedirs(root, exist_ok=True)
            if os.path.exists(tmp):  # left by a crashed save (one run per folder: the lock)
                shutil.rmtree(tmp)
            os.makedirs(tmp)
        except OSError as e:
            error = _describe(e, rank)
    _all_or_none(error, root, step)

    tp_group = ps.get_tensor_model_parallel_group()
    dp_group = ps.get_data_parallel_group()
    writer = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    pp = ps.get_pipeline_model_parallel_rank()
    cfg = model.model_cfg
    names = _full_name_map(model)
    groups = _groups_of_all_stages(names.values())

    holders = {id(mp): (holder, rng, inner)
               for mp, holder, rng, inner in optimizer_state_holders(optimizer)}
    distributed = _is_distributed(optimizer)
    optim, main = {}, {}
    for mp in model.parameters():  # the same order on every rank: collectives match
        name = names[id(mp)]
        holder, rng, inner = holders.get(id(mp), (None, None, None))
        state = inner.state.get(holder, {}) if holder is not None else {}
        if distributed:
            entries, adam_step = _dp_assemble(mp, holder, rng, state, dp_group)
        elif holder is not None:
            entries = {"exp_avg": state.get("exp_avg"), "exp_avg_sq": state.get("exp_avg_sq")}
            if holder is not mp:
                entries["main"] = holder
            entries = {k: t.detach().cpu() for k, t in entries.items() if t is not None}
            adam_step = torch.as_tensor(state["step"]) if "step" in state else None
        else:
            continue
        for key, t in entries.items():
            t = strip_vocab_padding(name, _tp_gather(t, mp, tp_group), cfg).contiguous()
            if key == "main":
                main[name] = t
            else:
                optim[optim_key(key, name)] = t
        if adam_step is not None:
            optim[optim_key("step", name)] = adam_step.detach().float().cpu()
    # The weights are the optimizer's fp32 main copies where it keeps them (--bf16: the model's
    # bf16 parameters are their rounding), so any run, bf16 or fp32, loads the exact weights.
    weights = {}
    for p in model.parameters():
        name = names[id(p)]
        if name in main:
            weights[name] = main[name].float()
        else:
            weights[name] = strip_vocab_padding(
                name, _tp_gather(p.detach().float().cpu(), p, tp_group), cfg).contiguous()

    try:
        _write_files(tmp, step, rank, writer, pp, weights, optim, stamp, meta, scheduler,
                     bool(optim), tokenizer_path, groups)
        error = None
    except OSError as e:  # a full disk, a quota, a vanished mount: named, nothing half-kept
        error = _describe(e, rank)
    _all_or_none(error, root, step)
    if rank == 0:
        try:
            publish_checkpoint(root, step)
            error = None
        except OSError as e:
            error = _describe(e, rank)
    _all_or_none(error, root, step)
    if rank == 0:
        logger.info("saved checkpoint %s", final)
    return final


def _groups_of_all_stages(names: Iterable[str]) -> Dict[str, Dict]:
    """``meta.json``'s ``parameter_groups``: the registered groups any stage holds (collective
    when groups are registered: the registry is the same on every rank)."""
    if not parameter_groups():
        return {}
    records: List[Optional[Dict]] = [None] * dist.get_world_size()
    dist.all_gather_object(records, groups_record(names))
    merged: Dict[str, Dict] = {}
    for record in records:
        merged.update(record or {})
    return dict(sorted(merged.items()))


def _write_files(tmp, step, rank, writer, pp, weights, optim, stamp, meta, scheduler,
                 has_optimizer, tokenizer_path, groups) -> None:
    """This rank's files of the checkpoint: the stage's weights and optimizer states (one
    writer per stage), its RNG states, and (rank 0) meta.json and the tokenizer."""
    if writer:
        path = os.path.join(tmp, stage_file("model", pp))
        save_tensors(path, weights, stamp)  # with per-tensor checksums, umask permissions
        fsync_file(path)
        _maybe_inject_fault(step)
        if optim:
            path = os.path.join(tmp, stage_file("optim", pp))
            save_tensors(path, optim, stamp)
            fsync_file(path)

    # Per-rank RNG states (exact resume on the same layout).
    rng_path = os.path.join(tmp, rng_file(rank))
    _maybe_inject_enospc(step, rank, rng_path + ".safetensors")
    save_tensors(rng_path + ".safetensors", {"torch": torch.get_rng_state()}, stamp)
    np_state = np.random.get_state()
    with open(rng_path + ".json", "w") as f:
        json.dump({"python": [random.getstate()[0], list(random.getstate()[1]),
                              random.getstate()[2]],
                   "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]),
                             int(np_state[3]), float(np_state[4])]}, f)
    if rank == 0:
        full_meta = training_meta(meta, step, scheduler.state_dict(), _running_layout(),
                                  has_optimizer, groups)
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(full_meta, f, indent=1, default=str)
        if tokenizer_path:
            shutil.copyfile(tokenizer_path, os.path.join(tmp, TOKENIZER_FILE))


def _running_layout() -> Dict[str, int]:
    from megatron.core import parallel_state as ps

    return layout_record(ps.get_tensor_model_parallel_world_size(),
                         ps.get_pipeline_model_parallel_world_size(),
                         ps.get_data_parallel_world_size(), dist.get_world_size())


def _describe(e: OSError, rank: int) -> str:
    where = f"{e.filename}: " if e.filename else ""
    return f"rank {rank}: {where}{e.strerror or e}"


def _all_or_none(error: Optional[str], root: str, step: int) -> None:
    """Collective: every rank learns whether any rank failed its part of the save. If one did,
    the partial ``iter_N.tmp`` is removed and every rank raises one error naming the failure;
    the tracker still names the last good checkpoint."""
    errors: List[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [e for e in errors if e]
    if not failed:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(iter_dir(root, step) + TMP_SUFFIX, ignore_errors=True)
    dist.barrier()
    try:
        last = latest_iteration(root)
    except (OSError, ValueError):
        last = None
    good = f"the last good checkpoint is {iter_dir(root, last)}" if last is not None else \
        "there is no earlier checkpoint"
    raise CheckpointError(f"saving the checkpoint of step {step} failed ({failed[0]}); the "
                          f"partial save was removed and {good}")


# -- load --------------------------------------------------------------------------------------
class _StageFiles:
    """Lazy access to tensors spread over the per-stage safetensors files of a checkpoint, each
    verified against its recorded checksum the first time it is read (``verify``)."""

    def __init__(self, directory: str, kind: str, verify: bool = True,
                 meta: Optional[Mapping] = None):
        self.where: Dict[str, str] = {}
        self._files: Dict[str, TensorFile] = {}
        self._verified: set = set()
        for fn in stage_files(os.listdir(directory), kind):
            path = os.path.join(directory, fn)
            f = self._files[path] = TensorFile(path, verify)
            _check_stamp(path, f.metadata(), meta)
            for k in f.keys():
                if k in self.where:
                    raise CheckpointError(f"{path}: tensor {k!r} is also in {self.where[k]}")
                self.where[k] = path

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str) -> torch.Tensor:
        f = self._files[self.where[key]]
        if key in self._verified:  # read again (e.g. for the optimizer's main copy)
            return f.get(key, verify=False)
        t = f.get(key)
        self._verified.add(key)
        return t

    __getitem__ = get


def _check_stamp(path: str, metadata: Mapping[str, str], meta: Optional[Mapping]) -> None:
    """A file written by another run or step than the checkpoint's meta.json says is refused
    (files of older versions carry no stamp)."""
    if not meta or RUN_ID_KEY not in metadata or meta.get("run_id") is None:
        return
    mine = (str(meta.get("run_id")), str(meta.get("step")))
    theirs = (metadata[RUN_ID_KEY], metadata.get(STEP_KEY))
    if theirs != mine:
        raise CheckpointError(
            f"{path} was written by run {theirs[0]} at step {theirs[1]}, but its checkpoint's "
            f"meta.json by run {mine[0]} at step {mine[1]}: a mixed checkpoint (two runs "
            "writing into one save folder?); use another checkpoint")


def load_model_weights(model, weights: Mapping[str, torch.Tensor],
                       source: str = "weights") -> None:
    """Copy canonical full tensors (TP=1 names and shapes, vocabulary unpadded) into this
    rank's stage of ``model``, slicing them for its tensor-parallel rank.

    ``weights`` needs ``in`` and ``[]`` only (a state dict, or a checkpoint's stage files read
    tensor by tensor); ``source`` names it in errors. A registered parameter group
    (:func:`~megatron_m2.checkpoint.register_parameter_group`) that ``weights`` lacks entirely
    keeps its current (initial) values, with a warning: a checkpoint written before the group
    existed still loads.
    """
    model = _as_stage(model)
    from megatron.core import parallel_state as ps

    from ..model.init import local_shard

    tp_size = ps.get_tensor_model_parallel_world_size()
    tp_rank = ps.get_tensor_model_parallel_rank()
    names = _full_name_map(model)
    fresh = _absent_groups(names.values(), weights, source)
    missing = sorted(n for n in names.values() if n not in weights and n not in fresh)
    if missing:
        raise CheckpointError(f"{source} lacks {len(missing)} weight(s) of this stage, e.g. "
                              f"{missing[:3]}")
    with torch.no_grad():
        for p in model.parameters():
            name = names[id(p)]
            if name in fresh:
                continue
            full = weights[name]  # read (and verified) first: its errors name the file
            try:
                p.copy_(local_shard(full.to(p.dtype), p, tp_rank, tp_size))
            except (ValueError, RuntimeError) as e:
                raise CheckpointError(f"{source}: weight {name!r}: {e}") from None


def _absent_groups(names: Iterable[str], weights, source: str) -> set:
    """The names of the registered groups that ``weights`` lacks entirely (logged)."""
    by_group: Dict[str, List[str]] = {}
    for name in names:
        group = group_of(name)
        if group is not None:
            by_group.setdefault(group.prefix, []).append(name)
    fresh = set()
    for prefix, keys in sorted(by_group.items()):
        if not any(k in weights for k in keys):
            logger.warning("%s has no %s* parameters (written before that group existed?): "
                           "they keep their initial values", source, prefix)
            fresh.update(keys)
    return fresh


def load_checkpoint(path: str, model, optimizer=None, scheduler=None,
                    load_optimizer: bool = True, load_rng: bool = True,
                    verify: bool = True) -> Dict:
    """Load ``path`` (a checkpoint dir, or a save root with a tracker) into this rank's stage.

    Returns the checkpoint's ``meta.json``. Weights (and optimizer states, when present and
    asked for) are sliced for this rank's TP/PP/DP position, so the layout may differ from the
    one that saved it. RNG states are restored only on an identical layout. Every tensor read is
    checked against the checksum recorded when it was saved (``verify``; an
    :class:`~megatron_m2.checkpoint.IntegrityError` names the file and tensor). Registered
    parameter groups the checkpoint lacks start fresh (:func:`load_model_weights`).
    """
    model = _as_stage(model)
    from megatron.core import parallel_state as ps

    from ..model.init import local_shard

    directory, meta = resolve_checkpoint(path)
    cfg = model.model_cfg
    saved_cfg = meta.get("model_config", {})
    for key in MODEL_CONFIG_MUST_MATCH:
        if key in saved_cfg and saved_cfg[key] != getattr(cfg, key):
            raise CheckpointError(f"checkpoint {directory}: model {key}={saved_cfg[key]} does "
                                  f"not match this run's {getattr(cfg, key)}")
    tp_group = ps.get_tensor_model_parallel_group()
    tp_size, tp_rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    weights = _StageFiles(directory, "model", verify, meta)
    load_model_weights(model, weights, source=f"checkpoint {directory}")
    names = _full_name_map(model)

    if optimizer is not None:
        optim = _StageFiles(directory, "optim", verify, meta) if load_optimizer else None
        if optim is not None and not optim.where:
            logger.warning("checkpoint %s has no optimizer state; starting it fresh", directory)
        for mp, holder, rng, inner in optimizer_state_holders(optimizer):
            name = names.get(id(mp))
            if name is None or name not in weights:  # a group the checkpoint lacks: fresh
                continue

            def piece(full):
                t = local_shard(full, mp, tp_rank, tp_size)
                if rng is not None:
                    t = t.reshape(-1)[rng[0]:rng[1]]
                return t.to(holder.device).to(holder.dtype).reshape(holder.shape).clone()

            if holder is not mp:
                # fp32 main weights (mixed precision, distributed optimizer) follow the loaded
                # weights at full precision, also with --no-load-optim: the next step would
                # otherwise write the stale initial main weights back into the model.
                with torch.no_grad():
                    holder.copy_(piece(weights.get(name)))
            if optim is None or optim_key("exp_avg", name) not in optim:
                continue
            state = inner.state.setdefault(holder, {})
            state["exp_avg"] = piece(optim.get(optim_key("exp_avg", name)))
            state["exp_avg_sq"] = piece(optim.get(optim_key("exp_avg_sq", name)))
            if optim_key("step", name) in optim:
                state["step"] = optim.get(optim_key("step", name)).clone()
        if load_optimizer and scheduler is not None and "scheduler" in meta:
            scheduler.load_state_dict(meta["scheduler"])

    layout = meta.get("layout", {})
    same_layout = layout == _running_layout()
    if load_rng and same_layout:
        base = os.path.join(directory, rng_file(dist.get_rank()))
        rng_states = TensorFile(base + ".safetensors", verify)
        _check_stamp(rng_states.path, rng_states.metadata(), meta)
        torch.set_rng_state(rng_states.load_all()["torch"])
        try:
            with open(base + ".json") as f:
                st = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{base}.json: unreadable RNG state ({e})") from None
        random.setstate((st["python"][0], tuple(st["python"][1]), st["python"][2]))
        n = st["numpy"]
        np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    elif load_rng:
        logger.info("layout changed (%s -> now): RNG states not restored", layout)
    logger.info("loaded checkpoint %s (step %s)", directory, meta.get("step"))
    return meta
