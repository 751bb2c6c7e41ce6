"""tools/bench_gpu.py --decode: the GPU decode path's benchmark runs its CPU parts (and the
GPU half on CPU tensors with a Pillow decoder) without a GPU; the nvJPEG figures need CUDA."""

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers.tools import ROOT


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_bench_gpu_decode_json(device):
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_gpu.py"), "--decode",
                          "--device", device, "--decode-samples", "8", "--decode-source-size",
                          "96", "--decode-image-size", "32", "--json"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    r = json.loads(out)
    assert r["device_type"] == device and r["images"] == 8 and r["image_size"] == 32
    want = {"cpu_decode_transform_randaugment", "cpu_decode_transform", "gpu_path_worker",
            "gpu_path_decode_transform"} | ({"gpu_decode_only"} if device == "cuda" else set())
    assert set(r["rows"]) == want
    assert all(x["samples_per_s"] > 0 and x["per_core_cpu"] > 0 for x in r["rows"].values())
