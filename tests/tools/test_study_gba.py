"""tools/study_gba.py without training: the commands it would run, the aggregation over seeds,
the report (JSON, plot, the generated section of the results page), the planner's projection
and ``--resume``. Runs and measurements are fabricated (a fake runner writes what m2-pretrain
and m2-eval would)."""

from __future__ import annotations

import json
import math
import os
import shlex
from pathlib import Path

import pytest

from megatron_m2.flavors import get_flavor
from megatron_m2.planner import Cluster, Layout, make_plan
from tests.helpers.tools import load_tool

study_gba = load_tool("study_gba")

LANGS = ("en", "zh")


def _recall(base):
    row = {f"{d}_r{k}": base * k / 10 + (1 if d == "t2i" else 0)
           for d in ("i2t", "t2i") for k in (1, 5, 10)}
    row["mean_recall"] = sum(row.values()) / 6
    return {**row, "images": 174, "captions": 174}


class FakeRunner:
    """Stands in for the training and evaluation subprocesses: writes log.jsonl (training) or
    eval.json (m2-eval), with figures that depend on the config and seed."""

    def __init__(self, fail_on=None):
        self.calls = []
        self.fail_on = fail_on

    def __call__(self, cmd, log_path):
        Path(log_path).write_text("fake\n")
        if "torch.distributed.run" in cmd:
            run_dir = cmd[cmd.index("--save") + 1]
            name = os.path.basename(run_dir)
            self.calls.append(name)
            if self.fail_on == name:
                return 1
            seed = int(cmd[cmd.index("--seed") + 1])
            k = int(cmd[cmd.index("--itc-group-size") + 1])
            k = int(cmd[cmd.index("--nproc-per-node") + 1]) if k == -1 else k
            with open(os.path.join(run_dir, "log.jsonl"), "w") as f:
                for step, sps in enumerate([10.0, 64.0, 32.0, 64 / (1 + 0.1 * k), 16.0], 1):
                    f.write(json.dumps({"step": step, "loss": 1.0, "samples_per_s": sps}) + "\n")
            Path(run_dir, "seed").write_text(f"{seed} {k}")
        else:
            run_dir = cmd[cmd.index("--load") + 1]
            seed, k = map(int, Path(run_dir, "seed").read_text().split())
            out = cmd[cmd.index("--output") + 1]
            results = {lang: _recall(k + seed % 7 + j) for j, lang in enumerate(LANGS)}
            Path(out).write_text(json.dumps({"task": "retrieval", "results": results}))
        return 0


def fake_measure(s, names, iters):
    out = {}
    for name in names:
        f = study_gba.config_facts(name, s)
        nbytes = 4 * 2 * (f["k"] - 1) * f["contrastive_batch"] // f["k"] * s["embed_dim"] * 4
        nbytes *= 1 if f["accumulate"] else f["micro_batches"]
        out[name] = {"bytes_per_rank_per_step": nbytes, "peak_loss_bytes": 1000 * f["k"],
                     "loss_ms": 1.0, "planned_bytes_per_rank_per_step": nbytes,
                     "planned_loss_bytes": 10}
    return out


def _args(tmp_path, *extra):
    return study_gba.parse_args(
        ["--out-dir", str(tmp_path / "runs"), "--plot", str(tmp_path / "docs/img/study.png"),
         "--results-md", str(tmp_path / "docs/results.md"), "--iters", "5", *extra])


def test_train_commands_parse_with_m2_pretrains_parser(tmp_path):
    from megatron_m2.training.arguments import build_parser

    args = _args(tmp_path, "--extra-args=--lr 2e-3 --itc-heads vl")
    s = study_gba.study_settings(args)
    assert (s["micro_batches"], s["heads"], s["embed_dim"]) == (2, "vl", 128)
    seen = {}
    for name in study_gba.CONFIGS:
        cmd = study_gba.train_command(args, s, name, 7, str(tmp_path / name))
        module = cmd.index("megatron_m2.pretrain")
        assert cmd[cmd.index("--nproc-per-node") + 1] == "4"
        a = build_parser().parse_args(cmd[module + 1:])
        seen[name] = (a.itc_group_size, a.itc_accumulate_features)
        assert (a.micro_batch_size, a.global_batch_size, a.train_iters, a.seed) == (8, 64, 5, 7)
        assert a.lr == 2e-3 and a.itc_heads == "vl" and a.log_interval == 1
    assert seen == {"global": (-1, False), "k2": (2, False), "k1": (1, False),
                    "k2-acc2": (2, True)}
    facts = {n: study_gba.config_facts(n, s) for n in study_gba.CONFIGS}
    assert {n: f["contrastive_batch"] for n, f in facts.items()} == {
        "global": 32, "k2": 16, "k1": 8, "k2-acc2": 32}
    assert facts["k2-acc2"]["negatives_per_sample"] == 31


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        _args(tmp_path, "--nproc", "3")
    with pytest.raises(SystemExit):
        _args(tmp_path, "--global-batch-size", "40")
    for flag in ("--seed 3", "--itc-group-size=2", "--micro-batch-size 4"):
        with pytest.raises(SystemExit):
            _args(tmp_path, f"--extra-args={flag}")


def test_step_time_is_the_median_without_the_first_record(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps({"step": i, "samples_per_s": sps})
                             for i, sps in enumerate([1.0, 64.0, 32.0, 16.0, 128.0], 1)) + "\n"
                   + json.dumps({"step": 6, "loss": 1.0}) + "\n")
    # 64 / [64, 32, 16, 128] = [1, 2, 4, 0.5] -> median 1.5 (the first, 64 s, is left out)
    assert study_gba.step_time(log, 64) == {"median_s": 1.5, "records": 4}


def test_stat_and_format():
    st = study_gba.stat([1.0, 3.0])
    assert (st["mean"], st["min"], st["max"], st["n"]) == (2.0, 1.0, 3.0, 2)
    assert st["std"] == pytest.approx(math.sqrt(2))
    assert study_gba.fmt_stat(st) == "2.00 (1.00–3.00)"
    assert study_gba.fmt_stat(study_gba.stat([1, 2, 3])) == "2.00 ± 1.00"
    assert study_gba.fmt_stat(study_gba.stat([5])) == "5.00"
    assert study_gba.fmt_bytes(65536) == "64.0 KiB" and study_gba.fmt_bytes(0) == "0 B"


def test_study_aggregates_seeds_and_writes_the_report(tmp_path, capsys):
    args = _args(tmp_path, "--seeds", "1234", "1")
    runner = FakeRunner()
    study = study_gba.run_study(args, runner=runner, measure=fake_measure)
    assert sorted(runner.calls) == sorted(f"{n}_s{s}" for n in study_gba.CONFIGS
                                          for s in (1234, 1))
    # Aggregation: mean and sample std over the two seeds, per config.
    agg = study["aggregate"]
    assert list(agg) == list(study_gba.CONFIGS)
    for name, a in agg.items():
        k = study_gba.config_facts(name, study["settings"])["k"]
        en = [_recall(k + s % 7)["mean_recall"] for s in (1234, 1)]
        m = a["metrics"]["en.mean_recall"]
        assert m["mean"] == pytest.approx(sum(en) / 2)
        assert m["std"] == pytest.approx(abs(en[0] - en[1]) / math.sqrt(2))
        assert (m["min"], m["max"]) == (pytest.approx(min(en)), pytest.approx(max(en)))
        zh = _recall(k + 1234 % 7 + 1)
        assert a["metrics"]["zh.r5"]["values"][0] == pytest.approx(
            (zh["i2t_r5"] + zh["t2i_r5"]) / 2)
        # step time: 64 / [64, 32, 64 / (1 + 0.1 k), 16] -> median of [1, 2, 1 + 0.1 k, 4]
        assert a["metrics"]["step_s"]["mean"] == pytest.approx(1.5 + 0.05 * k)
        assert a["seeds"] == [1234, 1] and a["itc_matches_planner"]
    assert agg["global"]["metrics"]["itc_bytes_per_rank_per_step"]["mean"] == (
        4 * 2 * 3 * 8 * 128 * 4 * 2)
    assert agg["k1"]["metrics"]["itc_bytes_per_rank_per_step"]["mean"] == 0
    assert study["chance"]["en"]["mean_recall"] == pytest.approx(
        (1 + 5 + 10) / 3 * 100 / 174)
    # The JSON on disk is the returned study; the plot and the page exist.
    on_disk = json.loads(Path(args.json_path).read_text())
    assert on_disk["aggregate"]["k2"]["metrics"]["en.mean_recall"]["mean"] == pytest.approx(
        agg["k2"]["metrics"]["en.mean_recall"]["mean"])
    assert len(on_disk["runs"]) == 8 and on_disk["projection"]["rows"]
    assert Path(args.plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = Path(args.results_md).read_text()
    assert md.count(study_gba.BEGIN) == 1 and md.count(study_gba.END) == 1
    assert study_gba.DISCUSSION in md
    assert "](img/study.png)" in md
    assert "--iters 5 --seeds 1234 1" in md
    k2 = agg["k2"]["metrics"]["en.mean_recall"]
    row = next(line for line in md.splitlines() if line.startswith("| k2 |"))
    assert f"| {k2['mean']:.2f} ({k2['min']:.2f}–{k2['max']:.2f}) |" in row
    assert "| 16 (15) |" in row and "| 64.0 KiB |" in row
    assert "| chance |" in md and "| k8 (one node) | 8 | 2 |" in md
    out = capsys.readouterr().out
    assert "k2-acc2  2  2 (acc)" in out and "[8/8]" in out


def test_results_md_keeps_other_content_and_the_discussion(tmp_path):
    path = tmp_path / "results.md"
    path.write_text("# Results\n\n## Another study\n\nkept text\n\n"
                    f"{study_gba.BEGIN}\nold generated table\n{study_gba.END}\n\n"
                    f"### What the numbers say\n\n{study_gba.DISCUSSION}\nThe lead's words.\n\n"
                    "## Trailing section\n")
    new = f"{study_gba.BEGIN}\nnew table\n{study_gba.END}"
    text = study_gba.update_results_md(str(path), new)
    assert "old generated table" not in text and "new table" in text
    for kept in ("## Another study\n\nkept text", "The lead's words.", "## Trailing section"):
        assert kept in text
    assert text.count(study_gba.DISCUSSION) == 1
    assert study_gba.update_results_md(str(path), new) == text  # idempotent
    # A page without the markers gets the section appended, and the placeholder once.
    other = tmp_path / "other.md"
    other.write_text("# Results\n\nsomething else\n")
    text = study_gba.update_results_md(str(other), new)
    assert text.startswith("# Results\n\nsomething else\n\n" + study_gba.BEGIN)
    assert text.index(study_gba.END) < text.index(study_gba.DISCUSSION)
    assert study_gba.update_results_md(str(other), new) == text
    # A missing page is created.
    fresh = tmp_path / "sub" / "new.md"
    assert study_gba.BEGIN in study_gba.update_results_md(str(fresh), new)


def test_projection_is_the_planners():
    proj = study_gba.projection()
    cluster = Cluster(nodes=32, gpus_per_node=8)
    assert (proj["dp"], proj["micro_batch"], proj["global_batch"]) == (256, 8, 4096)
    expect = {"global": (256, False), "k8 (one node)": (8, False), "k2": (2, False),
              "k1": (1, False), "k2-acc2": (2, True)}
    assert [r["config"] for r in proj["rows"]] == list(expect)
    for row in proj["rows"]:
        k, acc = expect[row["config"]]
        plan = make_plan(get_flavor("0.4b"),
                         Layout(micro_batch=8, global_batch=4096, itc_group_size=k,
                                itc_accumulate_features=acc), cluster, model_name="0.4b")
        gba = plan.communication["itc"]["gba"]
        assert row["k"] == k and row["micro_batches"] == 2
        assert row["itc_bytes_per_rank_per_step"] == gba["bytes_sent_per_step"]
        assert row["negatives_per_sample"] == gba["negatives_per_sample"]
        assert row["link"] == gba["link"]
        assert row["inter_node_bytes_per_step"] == (
            plan.communication["itc"]["gba_inter_node_bytes_per_step"])
        assert row["itc_time_s"] == plan.time["itc_s"]
        assert row["step_time_s"] == plan.time["step_time_s"]
        assert row["peak_loss_bytes"] == plan.memory["per_stage"][-1]["loss_bytes"]
    rows = {r["config"]: r for r in proj["rows"]}
    assert rows["global"]["link"] == "inter-node" and rows["k8 (one node)"]["link"] == "intra-node"
    assert rows["k8 (one node)"]["inter_node_bytes_per_step"] == 0
    assert rows["k1"]["itc_bytes_per_rank_per_step"] == 0
    # Same bytes for k = 2 with and without accumulation (M·b rows once vs b rows M times).
    assert rows["k2-acc2"]["itc_bytes_per_rank_per_step"] == rows["k2"][
        "itc_bytes_per_rank_per_step"]
    assert rows["k2-acc2"]["negatives_per_sample"] == 31


def test_resume_skips_finished_runs(tmp_path):
    base = ["--seeds", "1", "--configs", "global", "k1"]
    runner = FakeRunner()
    study_gba.run_study(_args(tmp_path, *base), runner=runner, measure=fake_measure)
    assert runner.calls == ["global_s1", "k1_s1"]
    # Resuming a finished study runs nothing (the report is still rewritten).
    runner.calls.clear()
    study_gba.run_study(_args(tmp_path, *base, "--resume"), runner=runner, measure=fake_measure)
    assert runner.calls == []
    # A run without result.json (interrupted) is rerun; the others are kept as they were.
    kept = (tmp_path / "runs/k1_s1/result.json").read_text()
    os.remove(tmp_path / "runs/global_s1/result.json")
    study_gba.run_study(_args(tmp_path, *base, "--resume"), runner=runner, measure=fake_measure)
    assert runner.calls == ["global_s1"]
    assert (tmp_path / "runs/k1_s1/result.json").read_text() == kept
    # Another training command (here more iterations) is not a finished run of this study.
    runner.calls.clear()
    args = _args(tmp_path, *base, "--resume")
    args.iters = 6
    study_gba.run_study(args, runner=runner, measure=fake_measure)
    assert runner.calls == ["global_s1", "k1_s1"]
    # Without --resume every run is redone.
    runner.calls.clear()
    study_gba.run_study(_args(tmp_path, *base), runner=runner, measure=fake_measure)
    assert runner.calls == ["global_s1", "k1_s1"]


def test_a_failed_run_stops_the_study_and_stays_pending(tmp_path):
    base = ["--seeds", "1", "--configs", "global", "k1"]
    with pytest.raises(RuntimeError, match="training k1_s1 failed"):
        study_gba.run_study(_args(tmp_path, *base), runner=FakeRunner(fail_on="k1_s1"),
                            measure=fake_measure)
    assert (tmp_path / "runs/global_s1/result.json").is_file()
    assert not (tmp_path / "runs/k1_s1/result.json").exists()
    runner = FakeRunner()
    study_gba.run_study(_args(tmp_path, *base, "--resume"), runner=runner, measure=fake_measure)
    assert runner.calls == ["k1_s1"]


def test_report_only_trains_nothing(tmp_path):
    with pytest.raises(SystemExit, match="no finished run"):
        study_gba.run_study(_args(tmp_path, "--report-only"), runner=FakeRunner(),
                            measure=fake_measure)
    study_gba.run_study(_args(tmp_path, "--seeds", "3", "--configs", "k2"),
                        runner=FakeRunner(), measure=fake_measure)
    runner = FakeRunner()
    args = _args(tmp_path, "--seeds", "3", "--report-only")
    args.iters = 99  # the report states what the runs were made with, not this call's flags
    study = study_gba.run_study(args, runner=runner, measure=fake_measure)
    assert runner.calls == [] and list(study["aggregate"]) == ["k2"]
    assert study["settings"]["iters"] == 5 and study["settings"]["seeds"] == [3]
    assert shlex.split(study["command"])[2:] == [
        "--out-dir", str(tmp_path / "runs"), "--plot", str(tmp_path / "docs/img/study.png"),
        "--results-md", str(tmp_path / "docs/results.md"), "--iters", "5", "--seeds", "3",
        "--configs", "k2"]
    assert "5 steps, seeds 3;" in Path(args.results_md).read_text()


def test_loss_measure_in_one_process():
    """The shared measuring core (megatron_m2.loss_measure) without a process group: k = 1
    sends nothing; one contrastive batch of M·b rows (accumulation) peaks above M batches of b
    rows run one after the other; a bad case is refused."""
    import torch

    from megatron_m2.loss_measure import LossCase, case_step, measure_step

    rows = {}
    for acc in (False, True):
        case = LossCase("itc", 1, 8, 16, micro_batches=2, accumulate=acc)
        rows[acc] = measure_step(case_step(case, None, torch.Generator().manual_seed(0)))
        assert rows[acc]["bytes_per_rank"] == 0 and rows[acc]["ms"] == 0.0
    assert rows[True]["peak_loss_bytes"] > rows[False]["peak_loss_bytes"] > 0
    with pytest.raises(ValueError, match="accumulation"):
        LossCase("local", 2, 8, 16, accumulate=True)
