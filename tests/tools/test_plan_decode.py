"""The planner's data-loading budget (the ``decode`` section): samples/s per GPU at the planned
step time against the CPU cores the CPU decode path needs, and the advice of --image-decode."""

import json
import subprocess
import sys

import pytest

from megatron_m2.flavors import get_flavor
from megatron_m2.planner import (
    CPU_DECODE_SAMPLES_PER_CORE,
    Assumptions,
    Cluster,
    Layout,
    format_plan,
    make_plan,
)
from tests.helpers.tools import ROOT


def _plan(cluster=Cluster(), **layout):
    return make_plan(get_flavor("0.4b"), Layout(**layout), cluster, Assumptions(), "0.4b")


def test_demand_is_global_batch_over_step_time_and_dp():
    plan = _plan(micro_batch=64, tp=2)
    d, t = plan.decode, plan.time
    dp = plan.derived["dp"]
    assert dp == 4
    assert d["samples_per_s_per_gpu"] == pytest.approx(plan.derived["global_batch"]
                                                       / t["step_time_s"] / dp)
    # Every rank of a model-parallel group loads its replica's batch: TP x the per-GPU share.
    assert d["samples_per_s_per_gpu"] == pytest.approx(t["samples_per_s"] / 8 * 2)
    assert d["cpu_cores_needed_per_gpu"] == pytest.approx(
        d["samples_per_s_per_gpu"] / CPU_DECODE_SAMPLES_PER_CORE)
    assert d["cpu_decode_samples_per_core"] == CPU_DECODE_SAMPLES_PER_CORE


@pytest.mark.parametrize("cores,rate,advice", [(64.0, 300.0, "cpu"), (4.0, 300.0, "gpu"),
                                               (12.0, 5000.0, "cpu")])
def test_advice_follows_the_cores(cores, rate, advice):
    plan = _plan(Cluster(cpu_cores_per_gpu=cores, cpu_decode_samples_per_core=rate),
                 micro_batch=64)
    d = plan.decode
    assert d["image_decode"] == advice
    assert (d["cpu_cores_needed_per_gpu"] > cores - 1) == (advice == "gpu")
    assert d["num_workers"] >= 1
    text = format_plan(plan)
    assert "data loading:" in text
    assert ("--image-decode gpu" in text) == (advice == "gpu")


def test_invalid_layout_has_no_decode_section():
    plan = _plan(tp=3)
    assert not plan.valid and plan.decode is None
    assert "data loading" not in format_plan(plan)


def test_cli_flags_and_json():
    out = subprocess.run(
        [sys.executable, "-m", "megatron_m2.cli.plan", "--flavor", "0.4b", "--micro-batch-size",
         "64", "--cpu-cores-per-gpu", "4", "--cpu-decode-samples-per-core", "250", "--json"],
        capture_output=True, text=True, check=True, cwd=ROOT, timeout=120).stdout
    r = json.loads(out)["plan"]
    assert r["cluster"]["cpu_cores_per_gpu"] == 4
    assert r["cluster"]["cpu_decode_samples_per_core"] == 250
    d = r["decode"]
    assert d["cpu_cores_needed_per_gpu"] == pytest.approx(d["samples_per_s_per_gpu"] / 250)
    assert d["image_decode"] == "gpu"
