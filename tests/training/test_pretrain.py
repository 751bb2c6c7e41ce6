"""End-to-end: the real ``m2-pretrain`` entry point under torchrun on CPU (gloo).

A fixed synthetic batch must be overfitted: loss falls by more than half. The runs are short
(20 steps) to keep the suite fast; the 100-step runs of the README behave the same way.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.helpers.distributed import free_port

pytestmark = pytest.mark.slow


def _torchrun(args, nproc=2, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", "-m", "megatron_m2.pretrain", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"], []],
                         ids=["tp2", "dp2"])
def test_overfits_fixed_synthetic_batch(tmp_path, layout):
    log = tmp_path / "log.jsonl"
    proc = _torchrun(["--flavor", "tiny", "--train-iters", "20", "--synthetic", "--log-interval",
                      "5", "--log-json", str(log), *layout])
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21))
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < 0.5 * first, (first, last)
    assert "samples/s" in proc.stderr and "ETA" in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--tensor-model-parallel-size", "3"], "not divisible by --tensor-model-parallel-size"),
    (["--global-batch-size", "10", "--micro-batch-size", "4"], "--global-batch-size (10)"),
    (["--itc-group-size", "3"], "--itc-group-size (3) must divide the data-parallel size (2)"),
])
def test_misconfiguration_fails_fast_on_every_rank(args, message):
    t0 = time.time()
    proc = _torchrun(["--synthetic", *args], timeout=120)
    assert proc.returncode != 0
    assert time.time() - t0 < 60
    # Every rank validates before any collective and prints the same one-line error; torchrun
    # may stop the second rank before it prints (it ends all ranks once one has failed).
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("m2-pretrain: error:")]
    assert 1 <= len(lines) <= 2 and message in lines[0], proc.stderr[-3000:]
    assert len(set(lines)) == 1
    # torchrun's closing summary names that line as the root cause (the ranks' error files),
    # and no rank printed a traceback of its own.
    assert f"traceback : {lines[0]}" in proc.stderr, proc.stderr[-3000:]
    assert "megatron_m2/" not in proc.stderr.split("Root Cause")[0].split("ChildFailedError")[0]


def test_trains_on_the_bundled_demo_set(tmp_path):
    """--data-path / --tokenizer-model / --split through the real entry point (2 DP ranks),
    into a save folder that does not exist yet and holds the JSON log (what the Slurm recipes
    pass on a first run)."""
    from pathlib import Path

    demo = Path(__file__).resolve().parents[2] / "data" / "emoji_demo"
    save = tmp_path / "fresh" / "run"
    log = save / "log.jsonl"
    proc = _torchrun(["--flavor", "tiny", "--data-path", "1.0", str(demo / "train"),
                      "--tokenizer-model", str(demo / "tokenizer.model"), "--split", "90,10,0",
                      "--train-iters", "3", "--micro-batch-size", "4", "--global-batch-size", "8",
                      "--num-workers", "1", "--save", str(save), "--log-json", str(log)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "training data: 1374 samples" in proc.stderr  # 90% of the 1527 train samples
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 3 and all(r["loss"] > 0 for r in records)
    meta = json.loads((save / "iter_0000003" / "meta.json").read_text())
    assert meta["tokenizer"]["text_style"] == "normalized"  # the demo data's, from its cards
