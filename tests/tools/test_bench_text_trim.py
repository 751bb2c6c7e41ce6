"""tools/bench_text_trim.py: plumbing end to end on the bundled demo set (the figures belong to
docs/training.md): both variants ran, the trimmed one at fewer text rows than max_text_len."""

import json
import subprocess
import sys

import pytest

from tests.helpers.tools import ROOT

DEMO = ROOT / "data" / "emoji_demo"


@pytest.mark.skipif(not (DEMO / "train.bin").is_file(), reason="bundled demo set missing")
def test_bench_text_trim_json():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_text_trim.py"),
                          "--global-batch-size", "8", "--micro-batch-size", "8", "--iters", "2",
                          "--warmup", "0", "--json"],
                         capture_output=True, text=True, check=True, timeout=600).stdout
    r = json.loads(out)
    assert r["max_text_len"] == 32 and r["mean_text_rows"]["padded"] == 32
    assert 0 < r["mean_text_rows"]["trimmed"] < 32
    for k in ("padded", "trimmed"):
        assert r["step_ms"][k] > 0 and r["samples_per_s"][k] > 0
    assert r["speedup"] == pytest.approx(r["step_ms"]["padded"] / r["step_ms"]["trimmed"],
                                         rel=1e-2)


def test_bench_text_trim_rejects_a_missing_dataset(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_text_trim.py"),
                          "--data-path", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "nope.bin does not exist" in res.stderr
