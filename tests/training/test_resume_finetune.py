"""Resume and fine-tune with Megatron-LM's semantics, first runs into fresh folders, and the
logit-scale clamp after the optimizer step.

* a resumed run whose LR schedule differs from the checkpoint's fails validation with one
  message naming the flags; ``--use-checkpoint-opt-param-scheduler`` keeps the old schedule (lr 0
  past its end, with a warning), ``--override-opt-param-scheduler`` follows the new one from the
  checkpoint's step (the same learning rates as a run that had it from the start);
* ``--finetune`` starts at step 0 from the checkpoint's weights with a fresh optimizer;
* ``--save DIR --log-json DIR/log.jsonl`` on a fresh DIR is created by validation;
* the log-temperature is clamped to ``[0, ln 100]`` after each step, on the parameter and on the
  optimizer's copy of it (fp32 main weight shard under ``--bf16 --use-distributed-optimizer``),
  while the loss keeps its gradient.
"""

import logging
import math
import os

import pytest
import torch

from megatron_m2.config import ConfigError
from megatron_m2.training.arguments import parse_args
from megatron_m2.training.validation import validate_args
from tests.helpers.distributed import run_distributed

pytestmark = pytest.mark.slow

BASE = ["--flavor", "tiny", "--synthetic", "--synthetic-num-samples", "16",
        "--global-batch-size", "8", "--micro-batch-size", "8", "--lr", "1e-3",
        "--lr-decay-style", "cosine", "--seed", "3", "--log-interval", "1"]


def _trainer(flags, world_size=1):
    from megatron_m2.training.trainer import Trainer

    args = parse_args(BASE + flags)
    validate_args(args, world_size)
    return Trainer(args)


def _weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def _lrs(trainer, steps):
    return [trainer.train_step()["lr"] for _ in range(steps)]


def _scenarios(ckpt):
    warnings = []

    class Collect(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    logging.getLogger("megatron_m2").addHandler(Collect(level=logging.WARNING))
    out = {}
    first = _trainer(["--train-iters", "4", "--save", ckpt])
    out["first_lrs"] = _lrs(first, 4)
    first.save()
    first.close()  # release the save folder's lock (the runs below reuse the folder)
    saved = _weights(first)

    # A flipped byte in the saved weights: --load refuses it, naming the file and tensor.
    import shutil

    from megatron_m2.checkpoint import IntegrityError
    from tests.tools.test_convert_checkpoint import _flip_a_data_byte

    bad = ckpt + "-bad"
    shutil.copytree(ckpt, bad)
    _flip_a_data_byte(os.path.join(bad, "iter_0000004", "model_pp000.safetensors"))
    try:
        _trainer(["--train-iters", "4", "--load", bad])
        out["flipped"] = "loaded"
    except IntegrityError as e:
        out["flipped"] = str(e)
    out["flipped_unverified_step"] = _trainer(["--train-iters", "4", "--load", bad,
                                               "--no-verify-checksums"]).step
    # A checkpoint mixing two runs' files (another run's optimizer state, same step): refused.
    twin = _trainer(["--train-iters", "4", "--save", ckpt + "-twin"])
    _lrs(twin, 4)
    twin.save()
    twin.close()
    mixed = ckpt + "-mixed"
    shutil.copytree(ckpt, mixed)
    shutil.copyfile(os.path.join(ckpt + "-twin", "iter_0000004", "optim_pp000.safetensors"),
                    os.path.join(mixed, "iter_0000004", "optim_pp000.safetensors"))
    from megatron_m2.checkpoint import CheckpointError

    try:
        _trainer(["--train-iters", "4", "--load", mixed])
        out["mixed"] = "loaded"
    except CheckpointError as e:
        out["mixed"] = str(e)
    # The tracker lost: the run resumes at the newest complete checkpoint, not at step 0.
    lost = ckpt + "-lost"
    shutil.copytree(ckpt, lost)
    os.remove(os.path.join(lost, "latest_checkpointed_iteration.txt"))
    out["lost_tracker_step"] = _trainer(["--train-iters", "4", "--load", lost]).step

    keep = _trainer(["--train-iters", "6", "--load", ckpt, "--use-checkpoint-opt-param-scheduler",
                     "--clip-grad", "0.5"])
    out["keep_step"] = keep.step
    out["keep_lrs"] = _lrs(keep, 2)
    out["warnings"] = list(warnings)

    override = _trainer(["--train-iters", "8", "--load", ckpt, "--override-opt-param-scheduler"])
    out["override_step"], out["override_consumed"] = override.step, override.consumed_samples
    out["override_lrs"] = _lrs(override, 4)
    out["straight_lrs"] = _lrs(_trainer(["--train-iters", "8"]), 8)

    tune = _trainer(["--train-iters", "3", "--load", ckpt, "--finetune"])
    out["tune_step"], out["tune_consumed"] = tune.step, tune.consumed_samples
    out["tune_weights_equal"] = all(torch.equal(w, saved[n]) for n, w in _weights(tune).items())
    from megatron_m2.checkpoint import optimizer_state_holders

    out["tune_optimizer_state"] = sum(len(inner.state.get(h, {}))
                                      for _, h, _, inner in optimizer_state_holders(tune.optimizer))
    out["tune_lrs"] = _lrs(tune, 3)
    out["fresh_lrs"] = _lrs(_trainer(["--train-iters", "3"]), 3)
    return out


def test_resume_past_the_old_schedule_and_finetune(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    out = run_distributed(_scenarios, world_size=1, timeout=300, ckpt=ckpt)[0]
    # Checkpoint files get the umask's permissions (safetensors alone would make them 0600).
    mask = os.umask(0)
    os.umask(mask)
    modes = {str(f): oct(f.stat().st_mode & 0o777) for f in (tmp_path / "ckpt").rglob("*")
             if f.is_file()}
    assert modes and set(modes.values()) == {oct(0o666 & ~mask)}, modes
    assert "model_pp000.safetensors: tensor" in out["flipped"], out["flipped"]
    assert "does not match the checksum" in out["flipped"]
    assert out["flipped_unverified_step"] == 4
    assert out["lost_tracker_step"] == 4
    assert "optim_pp000.safetensors was written by run" in out["mixed"], out["mixed"]
    assert "a mixed checkpoint" in out["mixed"]
    assert any("is missing: using" in w for w in out["warnings"]), out["warnings"]
    # The first run's cosine schedule ends at lr 0 at its last step.
    assert out["first_lrs"][-1] == 0.0
    # Keeping the checkpoint's schedule past its end: lr 0, and a warning saying so.
    assert out["keep_step"] == 4 and out["keep_lrs"] == [0.0, 0.0]
    assert any("steps 5-6 would not learn" in w for w in out["warnings"]), out["warnings"]
    assert any("--clip-grad 1.0 -> 0.5" in w and "differ from the checkpoint" in w
               for w in out["warnings"]), out["warnings"]
    # Overriding: the new schedule from step 4 on, exactly as a run that had it from the start.
    assert (out["override_step"], out["override_consumed"]) == (4, 32)
    assert all(lr > 0 for lr in out["override_lrs"][:-1])
    assert out["override_lrs"] == out["straight_lrs"][4:]
    # Fine-tuning: step 0, the saved weights, no optimizer state, the fresh schedule.
    assert (out["tune_step"], out["tune_consumed"]) == (0, 0)
    assert out["tune_weights_equal"] and out["tune_optimizer_state"] == 0
    assert out["tune_lrs"] == out["fresh_lrs"]

    # Without either flag a changed schedule is one clear error, before anything starts.
    with pytest.raises(ConfigError) as e:
        validate_args(parse_args(BASE + ["--train-iters", "8", "--load", ckpt]), 1)
    msg = str(e.value)
    assert "the LR schedule differs from the checkpoint's" in msg
    assert "--lr-decay-iters/--train-iters: checkpoint 4, now 8" in msg
    assert "--override-opt-param-scheduler" in msg and "--finetune" in msg
    # The same schedule resumes without flags; a constant schedule may change its length.
    validate_args(parse_args(BASE + ["--train-iters", "4", "--load", ckpt]), 1)
    for flags, message in (
            (["--finetune"], "--finetune needs --load"),
            (["--load", ckpt, "--override-opt-param-scheduler",
              "--use-checkpoint-opt-param-scheduler"], "exclude each other"),
            (["--load", ckpt, "--flavor", "0.4b"], "the checkpoint's model differs")):
        with pytest.raises(ConfigError, match=message):
            validate_args(parse_args(BASE + ["--train-iters", "4"] + flags), 1)


def test_fresh_output_folders_are_created_and_checked(tmp_path):
    """``--save DIR --log-json DIR/log.jsonl`` (what the Slurm recipes pass) on a fresh DIR."""
    save = tmp_path / "fresh" / "run"
    args = parse_args(BASE + ["--train-iters", "2", "--save", str(save), "--log-json",
                              str(save / "log.jsonl"), "--tensorboard-dir", str(save / "tb")])
    validate_args(args, 1)
    assert save.is_dir() and (save / "tb").is_dir() and os.listdir(save) == ["tb"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="--save: .*file exists and is not a directory"):
        validate_args(parse_args(BASE + ["--save", str(tmp_path / "file")]), 1)
    # A folder nobody can create files in (procfs refuses even root): refused now, not at the
    # first save after hours of training.
    with pytest.raises(ConfigError, match="--tensorboard-dir: cannot write into /proc/self/m2"):
        validate_args(parse_args(BASE + ["--tensorboard-dir", "/proc/self/m2"]), 1)


def _clamp(flags):
    from megatron_m2.checkpoint import optimizer_state_holders
    from megatron_m2.loss import LOGIT_SCALE_MAX

    trainer = _trainer(["--train-iters", "2", "--lr", "1e-2"] + flags,
                       world_size=int(os.environ["WORLD_SIZE"]))
    params = {"logit_scale": trainer.model.logit_scale,
              "logit_vl_scale": trainer.model.logit_vl_scale}
    ids = {id(p) for p in params.values()}
    holders = [h for p, h, _, _ in optimizer_state_holders(trainer.optimizer) if id(p) in ids]
    with torch.no_grad():  # overshoot: above ln 100 in the parameter and the optimizer's copy
        for t in list(params.values()) + holders:
            t.fill_(5.0)
    trainer.train_step()
    return {"max": LOGIT_SCALE_MAX,
            "params": {k: float(p.float()) for k, p in params.items()},
            "holders": [v for h in holders for v in h.float().reshape(-1).tolist()],
            "grads": {k: float(p.main_grad.float().abs().sum()) for k, p in params.items()}}


@pytest.mark.parametrize("flags,world", [([], 1),
                                         (["--bf16", "--use-distributed-optimizer",
                                           "--micro-batch-size", "4"], 2)],
                         ids=["fp32", "bf16-distributed-optimizer"])
def test_logit_scale_clamped_after_the_step(flags, world):
    results = run_distributed(_clamp, world_size=world, timeout=300, flags=flags)
    # Every optimizer copy of the two scales (one rank's shard under the distributed
    # optimizer) holds the bound exactly.
    holders = [v for out in results for v in out["holders"]]
    assert len(holders) == 2 and all(v == pytest.approx(results[0]["max"], abs=1e-6)
                                     for v in holders)
    for out in results:
        top = out["max"]
        # bf16 rounds ln 100 = 4.6052 to 4.6250, fp32 to 4.6051702; the fp32 main copy holds
        # the bound as fp32 represents it.
        tol = 0.02 if "--bf16" in flags else 1e-6
        assert all(0.0 <= v <= top + tol for v in out["params"].values()), out
        # The loss saw the overshooting scale and gave it a gradient (no clamp in the loss).
        assert all(g > 0 for g in out["grads"].values()), out
        assert math.isclose(max(out["params"].values()), top, abs_tol=tol + 1e-6), out


def _early_exits(save):
    out = {}
    for flags in (["--exit-interval", "3"], ["--exit-duration-in-mins", "1e-9"]):
        trainer = _trainer(["--train-iters", "8", "--save", os.path.join(save, flags[0])]
                           + flags)
        out[flags[0]] = len(trainer.train())
        trainer.close()
    return out


def test_exit_interval_and_duration_stop_and_save(tmp_path):
    out = run_distributed(_early_exits, world_size=1, timeout=300, save=str(tmp_path))[0]
    assert out == {"--exit-interval": 3, "--exit-duration-in-mins": 1}
    for flag, step in (("--exit-interval", 3), ("--exit-duration-in-mins", 1)):
        tracker = tmp_path / flag / "latest_checkpointed_iteration.txt"
        assert tracker.read_text().strip() == str(step)
