"""Plumbing of tools/bench_itc.py (the figures themselves belong to the benchmark's output)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_itc_json_rows():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_itc.py"), "--nproc", "2",
                          "--batch", "8", "--dim", "16", "--iters", "1", "--json"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    rows = json.loads(out)
    assert [(r["method"], r["k"]) for r in rows] == [("naive", 2), ("global", 2), ("gba", 1)]
    for r in rows:
        assert set(r) == {"method", "k", "nproc", "bytes_per_rank", "peak_loss_bytes", "ms"}
        assert r["peak_loss_bytes"] > 0 and r["ms"] > 0
    glob = rows[1]["bytes_per_rank"]
    assert glob == 2 * 2 * (2 - 1) * 8 * 16 * 4  # 2 embeddings x (gather + reduce-scatter)
    assert rows[2]["bytes_per_rank"] == 0
