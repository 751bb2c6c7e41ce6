"""tools/bench_gpu.py: peaks by GPU name, the row arithmetic, and the CPU plumbing end to end.

The end-to-end run trains the tiny flavor in fp32 on CPU through the same spawned-worker path a
GPU run takes, and asks for FP8, which without Transformer Engine must come back as a skipped
row carrying m2-pretrain's message rather than a crash.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from megatron_m2.flavors import get_flavor
from megatron_m2.planner import Cluster, Layout, make_plan
from tests.helpers.tools import ROOT, load_tool

TOOL = ROOT / "tools" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench():
    return load_tool("bench_gpu")


def planner_flops(flavor: str, mbs: int, gbs: int) -> int:
    plan = make_plan(get_flavor(flavor), Layout(tp=1, pp=1, micro_batch=mbs, global_batch=gbs),
                     Cluster(nodes=1, gpus_per_node=1))
    assert not plan.errors
    return plan.flops["model_flops_per_step"]


@pytest.mark.parametrize("name, bf16, fp8", [
    ("NVIDIA H100 80GB HBM3", 989.0, 1979.0),
    ("NVIDIA H200", 989.0, 1979.0),
    ("NVIDIA A100-SXM4-80GB", 312.0, None),
    ("NVIDIA A100 80GB PCIe", 312.0, None),
])
def test_peak_table(bench, name, bf16, fp8):
    assert bench.table_peaks(name) == {"bf16": bf16, "fp8": fp8}
    peaks, source = bench.resolve_peaks("cuda", name, None, None)
    assert peaks == {"bf16": bf16, "fp8": fp8, "fp32": None} and name in source


@pytest.mark.parametrize("name", ["NVIDIA H100 PCIe", "NVIDIA H200 NVL", "NVIDIA L40S",
                                  "NVIDIA GH200 480GB"])
def test_gpus_outside_the_table_need_the_flag(bench, name):
    assert bench.table_peaks(name) is None
    with pytest.raises(ValueError, match="--peak-tflops"):
        bench.resolve_peaks("cuda", name, None, None)
    assert bench.resolve_peaks("cuda", name, 500.0, None)[0] == {"bf16": 500.0, "fp32": 500.0,
                                                                 "fp8": 1000.0}


def test_cpu_peak_only_from_the_flag(bench):
    assert bench.resolve_peaks("cpu", "AMD EPYC", None, None)[0] == {
        "bf16": None, "fp8": None, "fp32": None}
    assert bench.resolve_peaks("cpu", "AMD EPYC", 2.0, 3.0)[0] == {
        "bf16": 2.0, "fp32": 2.0, "fp8": 3.0}


def test_row_arithmetic(bench):
    flops = bench.model_flops_per_step("0.4b", 64, 128)
    assert flops == planner_flops("0.4b", 64, 128)
    job = {"flavor": "0.4b", "precision": "bf16", "mbs": 64, "gbs": 128}
    row = bench.make_row(job, {"status": "ok", "step_s": [0.3, 0.1, 0.2],
                               "peak_mem_bytes": 5e9, "params": 1}, flops, 989.0)
    assert row["step_ms"] == pytest.approx(200.0) and row["step_ms_min"] == pytest.approx(100.0)
    assert row["samples_per_s"] == pytest.approx(640.0)
    assert row["tflops"] == pytest.approx(flops / 0.2 / 1e12)
    assert row["mfu"] == pytest.approx(row["tflops"] / 989.0)
    assert row["peak_mem_gb"] == pytest.approx(5.0)
    skipped = bench.make_row(job, {"status": "skipped", "reason": "no TE"}, flops, 989.0)
    assert skipped["status"] == "skipped" and skipped["reason"] == "no TE"
    assert skipped["tflops"] is None and skipped["mfu"] is None


def test_trainer_argv_per_precision(bench):
    base = {"flavor": "tiny", "mbs": 4, "gbs": 8, "warmup": 1, "iters": 2}
    assert "--bf16" not in bench.trainer_argv(dict(base, precision="fp32"))
    assert "--bf16" in bench.trainer_argv(dict(base, precision="bf16"))
    fp8 = bench.trainer_argv(dict(base, precision="fp8"))
    assert "--bf16" in fp8 and fp8[fp8.index("--transformer-impl") + 1] == "te"
    assert fp8[-4:] == ["--fp8-format", "hybrid", "--fp8-recipe", "delayed"]


def test_variant_flags(bench):
    """Each scale-feature row asks m2-pretrain for its layout and flags; the interleaved row
    splits every stage into two chunks."""
    from megatron_m2.training.arguments import parse_args

    base = {"flavor": "0.4b", "mbs": 4, "gbs": 8, "warmup": 1, "iters": 2, "precision": "bf16"}
    args = {v: parse_args(bench.trainer_argv(dict(base, variant=v)))
            for v in bench.VARIANTS}
    assert args["base"].tensor_model_parallel_size == 1 and not args["base"].sequence_parallel
    assert args["tp2-sp"].tensor_model_parallel_size == 2 and args["tp2-sp"].sequence_parallel
    assert args["dp2-overlap"].overlap_grad_reduce and args["dp2-overlap"].overlap_param_gather
    assert args["patch-dropout"].image_mask_ratio == 0.5
    assert args["accumulate"].itc_accumulate_features
    vpp = args["pp2-vpp"]
    layers = get_flavor("0.4b").num_layers
    assert vpp.pipeline_model_parallel_size == 2
    assert layers // 2 // vpp.num_layers_per_virtual_pipeline_stage == 2


@pytest.mark.slow
def test_cpu_run_of_the_two_rank_variants():
    """Sequence parallelism, overlapped DP communication and the interleaved pipeline run
    through the tool's multi-process rows (two gloo ranks each); the patch-dropout row's model
    FLOPs are the planner's for the shorter sequence."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--device", "cpu", "--flavors", "tiny",
         "--precisions", "fp32", "--iters", "1", "--warmup", "1", "--micro-batch-size", "2",
         "--variants", "tp2-sp", "dp2-overlap", "pp2-vpp", "patch-dropout", "--json"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["variant"]: r for r in json.loads(proc.stdout)["rows"]}
    assert set(rows) == {"tp2-sp", "dp2-overlap", "pp2-vpp", "patch-dropout"}
    for name, r in rows.items():
        assert r["status"] == "ok", (name, r["reason"])
        assert r["step_ms"] > 0
    assert rows["tp2-sp"]["world"] == 2 and rows["tp2-sp"]["gbs"] == 2
    assert rows["dp2-overlap"]["gbs"] == 4  # one micro-batch per DP rank
    assert rows["pp2-vpp"]["gbs"] == 8  # 2 x PP micro-batches
    assert rows["patch-dropout"]["world"] == 1
    plan = make_plan(get_flavor("tiny"), Layout(micro_batch=2, global_batch=2,
                                                image_mask_ratio=0.5),
                     Cluster(nodes=1, gpus_per_node=1))
    assert rows["patch-dropout"]["flops_per_step"] == plan.flops["model_flops_per_step"]
    assert rows["patch-dropout"]["flops_per_step"] < planner_flops("tiny", 2, 2)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None,
                    reason="the FP8 row is skipped only where Transformer Engine is missing")
def test_cpu_run_reports_fp32_and_skips_fp8_without_te():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--device", "cpu", "--flavors", "tiny",
         "--precisions", "fp32", "fp8", "--iters", "2", "--warmup", "1",
         "--micro-batch-size", "4", "--global-batch-size", "4", "--json"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert report["device_type"] == "cpu" and report["torch"] and report["data"] == "cached"
    rows = {r["precision"]: r for r in report["rows"]}
    assert set(rows) == {"fp32", "fp8"} and len(report["rows"]) == 2

    r = rows["fp32"]
    assert r["status"] == "ok" and r["flavor"] == "tiny" and r["mbs"] == 4
    assert r["step_ms"] > 0 and r["samples_per_s"] > 0
    assert r["samples_per_s"] == pytest.approx(4 / (r["step_ms"] / 1e3), rel=1e-9)
    flops = planner_flops("tiny", 4, 4)
    assert r["flops_per_step"] == flops
    assert r["tflops"] > 0
    assert r["tflops"] == pytest.approx(flops / (r["step_ms"] / 1e3) / 1e12, rel=1e-9)
    assert r["mfu"] is None and r["peak_mem_gb"] is None  # CPU without --peak-tflops

    s = rows["fp8"]
    assert s["status"] == "skipped" and "Transformer Engine" in s["reason"]
    assert all(s[k] is None for k in ("step_ms", "samples_per_s", "tflops", "mfu"))
