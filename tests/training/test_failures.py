"""Failure behaviour: validation of every misconfiguration, non-finite losses, a dead rank."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_m2.config import ConfigError
from megatron_m2.training.arguments import parse_args
from megatron_m2.training.validation import validate_args
from tests.helpers.distributed import free_port
from tests.training.test_checkpoint import _descendants


@pytest.mark.parametrize("argv,world,message", [
    (["--tensor-model-parallel-size", "8"], 8, "must divide num_attention_heads (4)"),
    (["--pipeline-model-parallel-size", "4"], 4, "must divide the number of layers"),
    (["--itc-group-size", "4", "--global-batch-size", "48"], 6,
     "--itc-group-size (4) must divide the data-parallel size"),
    (["--global-batch-size", "12", "--micro-batch-size", "4"], 2,
     "--global-batch-size (12) must be divisible"),
    (["--tensor-model-parallel-size", "2"], 3, "world size 3 is not divisible"),
    (["--save-interval", "5"], 1, "--save-interval needs --save"),
    (["--pipeline-model-parallel-size", "6", "--flavor", "0.4b"], 6,
     "--itc-heads both needs the backbone/VL boundary on the last pipeline stage"),
])
def test_misconfiguration_messages(argv, world, message):
    args = parse_args(["--synthetic"] + argv)
    with pytest.raises(ConfigError) as e:
        validate_args(args, world)
    assert message in str(e.value)


def test_data_path_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        validate_args(parse_args(["--data-path", str(tmp_path / "nope"), "--tokenizer-model",
                                  "x"]), 1)
    with pytest.raises(ConfigError, match="exactly one of --data-path and --synthetic"):
        validate_args(parse_args([]), 1)


def _cmd(args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
            f"--master-port={free_port()}", "-m", "megatron_m2.pretrain", "--flavor", "tiny",
            "--synthetic", "--global-batch-size", "8", "--micro-batch-size", "4",
            "--log-interval", "1", *args]


def _start_training(args, **env):
    """A long torchrun job, returned once it has logged step 3: ``(proc, worker pids)``."""
    proc = subprocess.Popen(_cmd(["--train-iters", "100000", *args]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", **env))
    lines = []
    for line in proc.stderr:  # wait until training runs
        lines.append(line)
        if "step     3/" in line:
            break
    workers = _descendants(proc.pid)
    assert workers, "".join(lines[-20:])
    return proc, workers


def _our_errors(stderr: str):
    """The ranks' one-line errors; and no rank printed a traceback through megatron_m2."""
    assert not [ln for ln in stderr.splitlines() if ln.lstrip().startswith("File ")
                and "megatron_m2" in ln], stderr[-3000:]
    return [ln for ln in stderr.splitlines() if ln.startswith("m2-pretrain: error:")]


def _alive(pids):
    return [p for p in pids if os.path.exists(f"/proc/{p}")
            and open(f"/proc/{p}/stat").read().split()[2] != "Z"]


@pytest.mark.slow
def test_nonfinite_loss_stop_writes_no_checkpoint(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", M2_FAULT_INJECT="nan_loss:3")
    proc = subprocess.run(_cmd(["--train-iters", "4", "--save", str(tmp_path / "c"),
                                "--save-interval", "2"]),
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0
    assert "non-finite loss at step 3" in proc.stderr
    assert (tmp_path / "c" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert sorted(os.listdir(tmp_path / "c")) == ["iter_0000002",
                                                  "latest_checkpointed_iteration.txt"]


@pytest.mark.slow
def test_nonfinite_loss_skip_continues(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", M2_FAULT_INJECT="nan_loss:3")
    log = tmp_path / "log.jsonl"
    proc = subprocess.run(_cmd(["--train-iters", "5", "--on-nonfinite", "skip", "--log-json",
                                str(log)]),
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r.get("skipped", False) for r in recs] == [False, False, True, False, False]
    assert all(r["loss"] == r["loss"] for r in recs if not r.get("skipped"))  # finite, not NaN


@pytest.mark.slow
def test_dead_rank_ends_the_job():
    """SIGKILL one rank mid-training: the job exits (non-zero) instead of hanging, and the
    surviving rank does not bury the real cause under a traceback: it says in one line that a
    peer failed (unless torchrun stopped it first), and torchrun's failure list names the
    killed rank."""
    proc, workers = _start_training(["--distributed-timeout-minutes", "1"])
    os.kill(max(workers), signal.SIGKILL)
    t0 = time.time()
    try:
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            for pid in _descendants(proc.pid) + [proc.pid]:
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert time.time() - t0 < 120
    rest = proc.stderr.read()
    ours = _our_errors(rest)
    assert all("a collective failed or timed out during" in ln for ln in ours), ours
    # torchrun lists every failed rank; which one it calls the root cause is a race between the
    # survivor's error file and torchrun's next poll of the killed process, so read the whole list
    summary = rest.split("megatron_m2.pretrain FAILED")[-1]
    assert "Signal 9 (SIGKILL)" in summary, rest[-3000:]


@pytest.mark.slow
def test_hung_peer_ends_the_job_within_the_timeout():
    """SIGSTOP one rank (a hung peer: alive, silent): every process group carries
    --distributed-timeout-minutes (megatron's groups and the ITC groups defaulted to 30 minutes),
    so the other rank's collective times out and names where it was, and the job ends."""
    timeout_min = 0.25
    proc, workers = _start_training(["--distributed-timeout-minutes", str(timeout_min),
                                     "--itc-group-size", "2"],
                                    TORCH_ELASTIC_SHUTDOWN_TIMEOUT="5")
    os.kill(max(workers), signal.SIGSTOP)
    t0 = time.time()
    try:
        proc.wait(timeout=120)
    finally:
        for pid in _descendants(proc.pid) + [proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    elapsed = time.time() - t0
    rest = proc.stderr.read()
    assert proc.returncode != 0
    # timeout (15 s) + torchrun's shutdown grace (5 s) + start-up slack; 30 min before
    assert elapsed < 4 * timeout_min * 60 + 5, elapsed
    ours = _our_errors(rest)
    assert ours and "a collective failed or timed out during the" in ours[0], rest[-3000:]
    assert "ranks [0, 1]" in ours[0] and "Timed out" in ours[0], ours[0]


@pytest.mark.slow
def test_second_run_into_a_save_folder_in_use_is_refused(tmp_path):
    """A live run holds the save folder's lock (here: this test process): another run refuses to
    start there, on every rank, with one line naming the holder."""
    from megatron_m2.checkpoint import SaveLock

    lock = SaveLock.acquire(str(tmp_path / "ckpt"), "holder-run")
    try:
        proc = subprocess.run(_cmd(["--train-iters", "2", "--save", str(tmp_path / "ckpt")]),
                              capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    finally:
        lock.release()
    assert proc.returncode != 0
    ours = _our_errors(proc.stderr)
    assert ours and "is in use by run holder-run" in ours[0], proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "ckpt")) == []  # nothing written


@pytest.mark.slow
def test_workers_exit_when_the_launcher_is_killed(tmp_path):
    """SIGKILL torchrun's agent mid-training: its workers (in sessions of their own) exit too
    instead of training on and saving into the folder; a new run then resumes there (the
    dead run's lock is stale)."""
    ckpt = tmp_path / "ckpt"
    proc, workers = _start_training(["--save", str(ckpt), "--save-interval", "2"])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 30
    while time.time() < deadline and _alive(workers):
        time.sleep(0.5)
    alive = _alive(workers)
    for w in alive:
        os.kill(w, signal.SIGKILL)
    assert not alive, "workers outlived their launcher"
    saved = (ckpt / "latest_checkpointed_iteration.txt").read_text().strip()
    time.sleep(2)
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == saved
    res = subprocess.run(_cmd(["--train-iters", str(int(saved) + 1), "--load", str(ckpt),
                               "--save", str(ckpt), "--use-checkpoint-opt-param-scheduler"]),
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "taking over the lock" in res.stderr
