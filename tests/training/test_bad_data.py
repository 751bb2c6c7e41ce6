"""Bad data is found early and named: an index that does not describe its data file is refused
by argument validation (not by a loader worker when the sample comes up), and a corrupt image
in a valid dataset stops the run naming dataset and sample, or is skipped and counted up to
--skip-bad-samples."""

import io
import struct

import numpy as np
import pytest
from PIL import Image

from megatron_m2.data.dataset import BadSampleError
from megatron_m2.data.indexed import DatasetError, ImageTextWriter, read_index
from megatron_m2.data.tokenizer import M2Tokenizer
from megatron_m2.training.arguments import parse_args
from megatron_m2.training.validation import validate_args
from tests.helpers.distributed import run_distributed
from tests.helpers.tools import ROOT

TOKENIZER = str(ROOT / "data" / "emoji_demo" / "tokenizer.model")
BASE = ["--flavor", "tiny", "--tokenizer-model", TOKENIZER, "--micro-batch-size", "8",
        "--global-batch-size", "8", "--num-workers", "1", "--log-interval", "1",
        "--randaugment", "none"]


def _dataset(prefix, n=8, bad=(3,)):
    tok = M2Tokenizer(TOKENIZER)
    with ImageTextWriter(str(prefix)) as w:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(np.full((32, 32, 3), 20 * i, np.uint8)).save(buf, format="JPEG")
            image = b"this is not an image file" if i in bad else buf.getvalue()
            w.add_sample(image, [("en", tok.frame(tok.encode(f"an emoji number {i}")))])
    return str(prefix)


def test_index_not_describing_its_data_is_refused_at_validation(tmp_path):
    prefix = _dataset(tmp_path / "ds", bad=())
    idx = tmp_path / "ds.idx"
    data = bytearray(idx.read_bytes())
    n_seq = struct.unpack_from("<Q", data, 18)[0]
    pointers = 34 + 4 * n_seq
    j = 5  # a middle sequence: the file sizes still agree, only a full check sees it
    struct.pack_into("<q", data, pointers + 8 * j, struct.unpack_from("<q", data,
                                                                      pointers + 8 * j)[0] + 4)
    idx.write_bytes(bytes(data))
    read_index(prefix, full=False)  # the constant-cost checks alone pass
    with pytest.raises(DatasetError, match=r"pointers are not contiguous \(first at sequence 5, "
                                           r"sample 2"):
        validate_args(parse_args(BASE + ["--data-path", prefix]), 1)
    with pytest.raises(DatasetError, match="not contiguous"):
        validate_args(parse_args(BASE + ["--synthetic", "--valid-data-path", prefix]), 1)


def _train(prefix, flags):
    from megatron_m2.training.trainer import Trainer

    args = parse_args(BASE + ["--data-path", prefix, "--train-iters", "3"] + flags)
    validate_args(args, 1)
    try:
        records = Trainer(args).train()
    except BadSampleError as e:
        return {"error": str(e)}
    return {"bad": [r.get("bad_samples", 0) for r in records]}


@pytest.mark.slow
def test_corrupt_image_is_named_or_skipped(tmp_path):
    prefix = _dataset(tmp_path / "ds")
    out = run_distributed(_train, 1, prefix=prefix, flags=[])[0]
    assert out["error"].startswith(f"dataset {prefix}: sample 3: cannot identify image file")
    assert "--skip-bad-samples" in out["error"]
    # One bad sample per step (each step reads all 8): counted and skipped up to the budget.
    out = run_distributed(_train, 1, prefix=prefix, flags=["--skip-bad-samples", "5"])[0]
    assert out == {"bad": [1, 2, 3]}
    out = run_distributed(_train, 1, prefix=prefix, flags=["--skip-bad-samples", "2"])[0]
    assert out["error"].startswith("3 bad samples so far, more than --skip-bad-samples 2")
