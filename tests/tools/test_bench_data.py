"""Plumbing of tools/bench_data.py (the figures themselves belong to the benchmark's output)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_data_json():
    pytest.importorskip("webdataset")
    # Loader workers 0: spawning workers costs a torch import each and the worker path of the
    # loaders has tests of its own; preprocessing still spawns its pool.
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_data.py"), "--samples", "24",
                          "--image-size", "32", "--batch", "4", "--workers", "0",
                          "--source-size", "64", "--json"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    r = json.loads(out)
    assert set(r) == {"preprocess", "loader", "config"}
    assert set(r["preprocess"]) == {"workers_1", "workers_2"}
    for w, p in ((1, r["preprocess"]["workers_1"]), (2, r["preprocess"]["workers_2"])):
        assert p["written"] == 24
        assert p["images_per_s"] > 0
        assert p["per_worker"] == pytest.approx(p["images_per_s"] / w, rel=0.01)
        assert p["seconds"] > 0 and p["fixed_s"] > 0
        # The steady rate is a difference of two short timings: None when noise wins.
        assert p["steady_images_per_s"] is None or p["steady_images_per_s"] > 0
    assert set(r["loader"]) == {"ours", "webdataset", "ratio", "cpu_ratio"}
    for name in ("ours", "webdataset"):
        x = r["loader"][name]
        assert x["samples_per_s"] > 0 and x["first_batch_s"] > 0
        # 24 samples in 4 shards of 6, one stream: 6 full batches of 4, the first a warm-up.
        assert x["batches"] == 5 and x["samples"] == 20 and x["passes"] == 1
        assert x["cpu_ms_per_sample"] >= 0 and x["worker_cpu_ms_per_sample"] == 0  # no workers
    assert r["loader"]["ratio"] == pytest.approx(
        r["loader"]["ours"]["samples_per_s"] / r["loader"]["webdataset"]["samples_per_s"],
        rel=0.01)
    c = r["config"]
    assert (c["samples"], c["image_size"], c["batch"], c["workers"]) == (24, 32, 4, 0)
    assert c["preprocess_outputs_identical"] is True
    assert c["samples_checked_equal"] == 4
    assert c["mean_stored_jpeg_bytes"] > 0
