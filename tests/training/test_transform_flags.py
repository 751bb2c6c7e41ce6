"""``--crop-scale``, ``--hflip`` and ``--caption-token-dropout``: the train augmentations."""

from pathlib import Path

import pytest

from megatron_m2.config import ConfigError
from megatron_m2.training.arguments import parse_args, parse_crop_scale
from megatron_m2.training.validation import validate_args

DEMO = Path(__file__).resolve().parents[2] / "data" / "emoji_demo"
BASE = ["--flavor", "tiny", "--data-path", str(DEMO / "train"),
        "--tokenizer-model", str(DEMO / "tokenizer.model"), "--randaugment", "none"]


def test_crop_scale_parses_and_rejects_bad_bounds():
    assert parse_crop_scale("0.8,1.0") == (0.8, 1.0)
    assert parse_crop_scale("1,1") == (1.0, 1.0)
    for bad, match in [("0.8", "expected 'MIN,MAX'"), ("a,b", "expected 'MIN,MAX'"),
                       ("0.9,0.5", "0 < MIN <= MAX <= 1"), ("0,1", "0 < MIN <= MAX <= 1"),
                       ("0.5,1.5", "0 < MIN <= MAX <= 1")]:
        with pytest.raises(ConfigError, match=match):
            parse_crop_scale(bad)


def test_defaults_are_the_previous_transform():
    args = parse_args(BASE)
    assert parse_crop_scale(args.crop_scale) == (0.8, 1.0) and args.hflip == 0.5


@pytest.mark.parametrize("flags,match", [(["--crop-scale", "1.2,1.3"], "--crop-scale"),
                                         (["--hflip", "1.5"], "--hflip 1.5"),
                                         (["--hflip", "-0.1"], "--hflip -0.1"),
                                         (["--caption-token-dropout", "1"],
                                          "--caption-token-dropout 1.0")])
def test_validation_names_the_bad_flag(flags, match):
    with pytest.raises(ConfigError, match=match):
        validate_args(parse_args(BASE + flags), 1)


def test_flags_reach_the_transform():
    """What the trainer builds from the flags: no flip ever with --hflip 0, the full image with
    --crop-scale 1,1 (the resize of a square image is then the same on every draw)."""
    import random

    import numpy as np
    from PIL import Image

    from megatron_m2.data.transforms import train_transform

    args = parse_args(BASE + ["--crop-scale", "1,1", "--hflip", "0"])
    t = train_transform(64, parse_crop_scale(args.crop_scale), hflip=args.hflip, randaugment=None)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    outs = [t(img, random.Random(s)) for s in range(8)]
    assert all((o == outs[0]).all() for o in outs)
    flipping = train_transform(64, (1.0, 1.0), hflip=1.0, randaugment=None)(img, random.Random(0))
    assert (flipping == outs[0].flip(-1)).all()
