"""tools/bench_train.py: its plain baseline, its report, and its plumbing end to end.

The figures themselves belong to the benchmark's output. The plain model is
:mod:`megatron_m2.model.reference`, checked against the spec's forward and against our model in
tests/model/test_reference.py; here one tiny run checks the JSON figures and ``--check`` (the
plain model's first training step equals ours).
"""

import argparse
import json
import subprocess
import sys

import pytest

from megatron_m2.flavors import get_flavor
from tests.helpers.tools import ROOT, load_tool

TOOL = ROOT / "tools" / "bench_train.py"
CFG = get_flavor("tiny")


@pytest.fixture(scope="module")
def bench():
    return load_tool("bench_train")


def test_plain_baseline_is_the_reference_model(bench):
    """The benchmark's plain model is :class:`megatron_m2.model.reference.ReferenceM2` (its
    layout, spec forward and parity with our model: tests/model/test_reference.py)."""
    from megatron_m2.model.reference import ReferenceM2

    targs = bench.trainer_args(argparse.Namespace(flavor="tiny", global_batch_size=16,
                                                  micro_batch_size=8, warmup=1, iters=2), tp=1)
    plain = bench.PlainTrainer(CFG, targs)
    assert type(plain.model) is ReferenceM2
    trainable = {id(p) for p in plain.model.parameters() if p.requires_grad}
    assert {id(p) for p in plain.params} == trainable


def test_table_reports_every_figure(bench, capsys):
    figures = {
        "flavor": "tiny", "params": 3_741_954, "global_batch_size": 16, "micro_batch_size": 8,
        "iters": 2, "warmup": 1, "threads": 2,
        "step_ms": {"ours": 500.0, "plain": 400.0, "plain+layer": 440.0},
        "best_step_ms": {"ours": 480.0, "plain": 390.0, "plain+layer": 430.0},
        "samples_per_s": {"ours": 32.0, "plain": 40.0, "plain+layer": 36.36},
        "ours_over_plain": 0.8, "plain_layer_over_plain": 0.909,
        "check": {"ours_loss": 2.5, "plain_loss": 2.5, "loss_abs_diff": 0.0,
                  "ours_grad_norm": 3.0, "plain_grad_norm": 3.0, "grad_norm_rel_diff": 0.0,
                  "trainer_record_loss": 1.25, "micro_batches": 2, "ok": True},
        "tp": {"tp1": {"processes": 1, "threads_per_process": 2, "step_ms": 500.0,
                       "best_step_ms": 480.0, "samples_per_s": 32.0},
               "tp2": {"processes": 2, "threads_per_process": 1, "step_ms": 1000.0,
                       "best_step_ms": 990.0, "samples_per_s": 16.0,
                       "tp_all_reduces_per_step": 96},
               "tp2_over_tp1": 0.5},
        "load_average": [5.0, 6.0], "cpu_count": 2,
    }
    bench.print_table(figures)
    text = capsys.readouterr().out
    for needle in ("0.800 (BELOW the 0.9 target)", "-9.1%", "check:", ": OK",
                   "loss / 2 micro-batches", "TP=2 (gloo): 2 processes x 1 thread ",
                   "0.500x", "96 all-reduces", "NVLink", "load average 5.0 -> 6.0"):
        assert needle in text, needle


@pytest.mark.slow
def test_bench_train_json_and_check():
    # One thread: the figures do not matter here, and a shared CI box then cannot stall the
    # run in OpenMP barriers.
    run = subprocess.run([sys.executable, str(TOOL), "--iters", "2", "--warmup", "1",
                          "--skip-tp", "--json", "--check", "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    r = json.loads(run.stdout)
    assert r["flavor"] == "tiny" and r["global_batch_size"] == 16 and r["tp"] is None
    for table in ("step_ms", "best_step_ms", "samples_per_s"):
        assert set(r[table]) == {"ours", "plain", "plain+layer"}
        assert all(v > 0 for v in r[table].values())
    assert r["ours_over_plain"] == pytest.approx(
        r["samples_per_s"]["ours"] / r["samples_per_s"]["plain"], rel=1e-3)
    c = r["check"]
    assert c["ok"] and c["loss_abs_diff"] <= 1e-4 and c["grad_norm_rel_diff"] <= 1e-4
