"""tools/bench_data.py --decode: the per-core decode rates against the Pillow bound and the
loader's samples/s, on the bundled demo set (plumbing; the figures belong to docs/data.md)."""

import json
import subprocess
import sys

import pytest

from tests.helpers.tools import ROOT


@pytest.mark.slow
def test_bench_data_decode_json():
    demo = ROOT / "data" / "emoji_demo"
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_data.py"), "--decode",
                          str(demo / "train"), "--tokenizer-model", str(demo / "tokenizer.model"),
                          "--samples", "48", "--batch", "16", "--image-size", "32", "--json"],
                         capture_output=True, text=True, check=True, timeout=600).stdout
    r = json.loads(out)
    assert set(r["per_core"]) == {"pillow_decode", "decode_transform_randaugment",
                                  "decode_transform", "gpu_path_worker"}
    for x in r["per_core"].values():
        assert x["per_core"] > 0 and x["wall"] > 0 and x["items"] >= 48
    # The bound: decoding alone is faster than decoding and transforming.
    assert r["per_core"]["pillow_decode"]["per_core"] > r["per_core"]["decode_transform"][
        "per_core"]
    assert set(r["loader"]) == {"cpu_randaugment_workers_1", "cpu_randaugment_workers_2",
                                "cpu_workers_2", "gpu_path_workers_1"}
    for x in r["loader"].values():
        assert x["samples_per_s"] > 0 and x["batches"] == 2 and x["samples"] == 32
    c = r["config"]
    assert c["samples"] == 48 and c["image"]["format"] == "JPEG" and c["image_size"] == 32
