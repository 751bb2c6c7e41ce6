"""Where a rank is in a run, in words (for failure messages), and the run's early-exit and
resume notices.

:data:`PHASE` names what this rank is doing, naming the process groups involved: the one-line
message of a collective that fails or times out (a peer died or hung) says where it happened.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

logger = logging.getLogger("megatron_m2.train")

__all__ = ["PHASE", "phase", "ranks", "ExitConditions", "warn_changed_args", "plot_curves",
           "start_run"]

PHASE = ["start-up (process groups, model)"]
"""What this rank is doing, in words naming the process groups involved: the one-line message
of a collective that fails or times out (a peer died or hung) says where it happened."""


@contextlib.contextmanager
def phase(what: str):
    """Mark ``what`` as the current phase. On an exception the phase stays set (no finally):
    the failure message names where it happened."""
    previous = PHASE[0]
    PHASE[0] = what
    yield
    PHASE[0] = previous


def ranks(group) -> str:
    """``"ranks [0, 1]"`` of a process group (the world for None)."""
    try:
        return f"ranks {dist.get_process_group_ranks(group or dist.group.WORLD)}"
    except (RuntimeError, ValueError):
        return "its ranks"


class ExitConditions:
    """Megatron-LM's ways of ending a run early, cleanly (the loop then saves, with --save,
    and the process exits 0): ``--exit-signal-handler`` (the signal of ``--exit-signal``, e.g.
    Slurm's SIGTERM before a time limit or a preemption, received by any rank),
    ``--exit-duration-in-mins`` (training time of this process, any rank), ``--exit-interval``
    (a step divisible by it). The first two differ between ranks, so they are agreed on with
    one all-reduce per step, and only when they are enabled."""

    def __init__(self, args, t_start: float):
        import signal

        self.args, self.t_start = args, t_start
        self.received: Optional[str] = None
        self._previous = None
        self._signal = getattr(signal, args.exit_signal)
        if args.exit_signal_handler:
            self._previous = signal.signal(self._signal, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        import signal

        if self.received is None:
            logger.warning("received %s: finishing step and stopping", signal.Signals(signum).name)
        self.received = signal.Signals(signum).name

    def reason(self, step: int) -> Optional[str]:
        a = self.args
        if a.exit_signal_handler or a.exit_duration_in_mins:
            elapsed = (time.perf_counter() - self.t_start) / 60
            flags = torch.tensor([float(self.received is not None),
                                  float(bool(a.exit_duration_in_mins)
                                        and elapsed >= a.exit_duration_in_mins)])
            with phase("the exit check (all ranks)"):
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            if flags[0]:
                return f"{a.exit_signal} received (--exit-signal-handler)"
            if flags[1]:
                return f"--exit-duration-in-mins {a.exit_duration_in_mins:g} reached"
        if a.exit_interval and step % a.exit_interval == 0 and step < a.train_iters:
            return f"--exit-interval {a.exit_interval}"
        return None

    def close(self) -> None:
        import signal

        if self._previous is not None:
            signal.signal(self._signal, self._previous)


_RUN_ONLY_ARGS = frozenset({
    "load", "save", "save_interval", "finetune", "no_load_optim", "no_load_rng",
    "override_opt_param_scheduler", "use_checkpoint_opt_param_scheduler", "log_json",
    "tensorboard_dir", "loss_curve", "log_interval", "eval_interval", "num_workers",
    "distributed_timeout_minutes", "train_iters", "allow_dataset_mismatch",
    "no_verify_checksums", "exit_signal_handler", "exit_signal", "exit_duration_in_mins",
    "exit_interval", "allow_tokenizer_mismatch", "skip_bad_samples"})
"""Arguments expected to change between a run and its resumption (not worth a warning)."""


def warn_changed_args(saved: Dict, now: Dict) -> None:
    """One warning (rank 0) listing the arguments that differ from the checkpoint's run."""
    changed = [f"--{k.replace('_', '-')} {saved[k]!r} -> {now[k]!r}" for k in sorted(now)
               if k in saved and k not in _RUN_ONLY_ARGS and saved[k] != now[k]]
    if changed and dist.get_rank() == 0:
        logger.warning("resuming with arguments that differ from the checkpoint's run: %s",
                       "; ".join(changed))


def plot_curves(records: List[Dict], path: str) -> None:
    """Loss per step and, when evaluated, the mean recall per language."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    steps = [r["step"] for r in records if math.isfinite(r["loss"])]
    ax.plot(steps, [r["loss"] for r in records if math.isfinite(r["loss"])], color="tab:blue",
            label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.grid(alpha=0.3)
    evals = [r for r in records if "eval" in r]
    if evals:
        ax2 = ax.twinx()
        for lang, color in (("en", "tab:orange"), ("zh", "tab:red")):
            pts = [(r["step"], r["eval"][lang]["mean_recall"]) for r in evals
                   if lang in r["eval"]]
            if pts:
                ax2.plot(*zip(*pts), marker="o", color=color, label=f"mean recall ({lang})")
        ax2.set_ylabel("held-out mean recall (%)")
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.set_title("M2-Encoder training")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def start_run(save: Optional[str]) -> Tuple[str, object]:
    """``(run id, save-folder lock or None)``: rank 0's run id on every rank and, with
    ``save``, the save folder's lock (rank 0 takes it; every rank fails alike when another run
    holds it). Collective."""
    from ..checkpoint import SaveLock, SaveLockError

    box, lock = [None, None], None
    if dist.get_rank() == 0:
        import uuid

        box[0] = uuid.uuid4().hex[:12]
        if save:
            try:
                lock = SaveLock.acquire(save, box[0])
            except SaveLockError as e:
                box[1] = str(e)
    with phase("start-up (run id and save-folder lock, all ranks)"):
        dist.broadcast_object_list(box, src=0)
    if box[1]:
        raise SaveLockError(box[1])
    logger.info("run %s%s", box[0], f", saving into {save}" if save else "")
    return box[0], lock
