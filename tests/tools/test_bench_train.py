"""tools/bench_train.py: its plain baseline model, its report, and its plumbing end to end.

The figures themselves belong to the benchmark's output; here the plain model is checked against
the spec's reference forward (tests/model/test_official.py), and one tiny run checks the JSON
figures and ``--check`` (the plain model's first step equals ours).
"""

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers.tools import ROOT, load_tool
from tests.model.test_official import CFG, _batch, official_shapes, random_official
from tests.model.test_official import reference_forward as spec_forward

TOOL = ROOT / "tools" / "bench_train.py"


@pytest.fixture(scope="module")
def bench():
    return load_tool("bench_train")


def test_plain_model_has_the_official_layout(bench):
    model = bench.PlainM2(CFG)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official_shapes(CFG)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    # The shared VL stack's branch B and the mask token never see data, as in our model.
    assert frozen == {n for n in official_shapes(CFG)
                      if (n.startswith("backbone_vl.") and ".B." in n) or "mask_token" in n}


def test_plain_model_matches_the_spec_forward(bench):
    official = random_official(CFG, seed=3)
    model = bench.PlainM2(CFG)
    model.load_state_dict(official)
    images, ids, pad = _batch()
    ref = spec_forward(official, images, ids, pad)
    with torch.no_grad():
        out = model(images, ids, pad)
    assert set(out) == set(ref)
    for key in ref:
        torch.testing.assert_close(out[key].double(), ref[key], atol=1e-5, rtol=0,
                                   msg=lambda m, key=key: f"{key}: {m}")


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
