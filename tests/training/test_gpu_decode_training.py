"""m2-pretrain --image-decode gpu end to end: argument validation, and the trainer's wiring
(workers pass JPEG bytes, the training process decodes them before the objective prepares the
batch) on CPU, where the CPU compatibility layer maps the "cuda" device to the CPU and a Pillow
decoder stands in for nvJPEG: the losses equal the CPU path's to within the few-level pixel
differences of the two resizes. With CUDA and torchvision the real decoder runs."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_m2.config import ConfigError
from megatron_m2.data.indexed import ImageTextWriter
from megatron_m2.data.tokenizer import M2Tokenizer
from megatron_m2.training.arguments import parse_args
from megatron_m2.training.validation import validate_args
from tests.helpers.distributed import run_distributed
from tests.helpers.tools import ROOT

TOKENIZER = str(ROOT / "data" / "emoji_demo" / "tokenizer.model")
BASE = ["--flavor", "tiny", "--tokenizer-model", TOKENIZER, "--micro-batch-size", "4",
        "--global-batch-size", "8", "--num-workers", "1", "--log-interval", "1",
        "--randaugment", "none", "--train-iters", "2"]


def _dataset(prefix, n=16):
    tok = M2Tokenizer(TOKENIZER)
    rng = np.random.default_rng(0)
    with ImageTextWriter(str(prefix)) as w:
        for i in range(n):
            small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
            buf = io.BytesIO()
            small.resize((40 + i, 48), Image.Resampling.BICUBIC).save(buf, format="JPEG")
            w.add_sample(buf.getvalue(), [("en", tok.frame(tok.encode(f"an emoji number {i}")))])
    return str(prefix)


def test_validation_refuses_gpu_decode_without_cuda_or_with_randaugment(tmp_path):
    prefix = _dataset(tmp_path / "ds", 4)
    with pytest.raises(ConfigError, match="--randaugment none"):
        validate_args(parse_args(BASE + ["--data-path", prefix, "--image-decode", "gpu",
                                         "--randaugment", "2,7"]), 1)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs a CUDA device and a torchvision"):
            validate_args(parse_args(BASE + ["--data-path", prefix, "--image-decode", "gpu"]), 1)


def _pil_decode(payloads):
    return [torch.from_numpy(np.asarray(Image.open(io.BytesIO(p.numpy().tobytes()))
                                        .convert("RGB")).copy()).permute(2, 0, 1)
            for p in payloads]


def _train(prefix, decode):
    from megatron_m2.data import gpu_decode
    from megatron_m2.training.trainer import Trainer

    args = parse_args(BASE + ["--data-path", prefix])
    validate_args(args, 1)
    args.image_decode = decode  # on CPU: past validation, which wants CUDA
    decoded = []
    if decode == "gpu" and not torch.cuda.is_available():
        def counting(payloads):
            decoded.extend(payloads)
            return _pil_decode(payloads)

        gpu_decode.load_decode_jpeg = lambda device: counting
    return {"loss": [r["loss"] for r in Trainer(args).train()], "decoded": len(decoded)}


@pytest.mark.slow
def test_gpu_decode_path_trains_like_the_cpu_path(tmp_path):
    prefix = _dataset(tmp_path / "ds")
    cpu = run_distributed(_train, 1, prefix=prefix, decode="cpu")[0]
    gpu = run_distributed(_train, 1, prefix=prefix, decode="gpu")[0]
    assert len(cpu["loss"]) == len(gpu["loss"]) == 2
    assert gpu["loss"] == pytest.approx(cpu["loss"], rel=2e-3)
    assert cpu["decoded"] == 0
    if not torch.cuda.is_available():  # the stand-in decoder saw every sample of both steps
        assert gpu["decoded"] == 16
