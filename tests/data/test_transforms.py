"""Image transforms: shapes, exact eval preprocessing, determinism, crop bounds, ops, pickling."""

import math
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_m2.data import transforms as T


def _image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Smooth gradients plus noise, so crops, flips and enhancements all change pixels."""
    rs = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], -1)
    arr = np.clip(base + rs.integers(-30, 31, base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, mode="RGB")
    return img if mode == "RGB" else img.convert(mode)


def _hand_eval(img: Image.Image, size: int) -> torch.Tensor:
    arr = np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
    out = (arr.astype(np.float32) / 255 - 0.5) / 0.5
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


# ----------------------------------------------------------------------------- pipelines


@pytest.mark.parametrize("size", [(300, 200), (97, 211), (224, 224)])
def test_train_output_shape_dtype_range(size):
    f = T.train_transform(image_size=64)
    for seed in range(5):
        x = f(_image(*size, seed=seed), random.Random(seed))
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and x.is_contiguous()
        assert x.min() >= -1.0 and x.max() <= 1.0


def test_eval_equals_hand_computation():
    f = T.eval_transform(image_size=48)
    for w, h in [(300, 200), (31, 77), (48, 48)]:
        img = _image(w, h, seed=w)
        x = f(img)
        assert x.shape == (3, 48, 48) and x.dtype == torch.float32
        assert torch.equal(x, _hand_eval(img, 48))
    # rng is accepted and ignored.
    assert torch.equal(f(img, random.Random(0)), f(img))


def test_eval_default_is_224():
    x = T.eval_transform()(_image(50, 40))
    assert x.shape == (3, 224, 224) and -1.0 <= x.min() and x.max() <= 1.0


def test_to_tensor_and_normalize():
    img = _image(5, 3)
    t = T.to_tensor(img)
    assert t.shape == (3, 3, 5) and t.dtype == torch.float32 and t.is_contiguous()
    assert torch.equal(t, torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255)
    assert T.to_tensor(img.convert("L")).shape == (1, 3, 5)
    assert torch.equal(T.normalize(t, 0.5, 0.5), (t - 0.5) / 0.5)
    mean, std = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)
    n = T.normalize(t, mean, std)
    for c in range(3):
        assert torch.allclose(n[c], (t[c] - mean[c]) / std[c])
    with pytest.raises(ValueError):
        T.to_tensor(Image.new("F", (2, 2)))


@pytest.mark.parametrize("make_rng", [random.Random, np.random.default_rng])
def test_determinism(make_rng):
    f = T.train_transform(image_size=32)
    img = _image(120, 90)
    a = f(img, make_rng(1234))
    assert torch.equal(a, f(img, make_rng(1234)))
    outs = [f(img, make_rng(s)) for s in range(8)]
    assert sum(not torch.equal(a, o) for o in outs) == len(outs)


def test_no_global_randomness():
    f = T.train_transform(image_size=32)
    img = _image(120, 90)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    a = f(img, random.Random(7))
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    assert torch.equal(a, f(img, random.Random(7)))
    with pytest.raises(TypeError):
        f(img, None)


def test_hflip_one_is_mirror():
    img = _image(40, 40, seed=3)
    # scale=ratio=1 on a square image forces the whole-image crop, and resizing to the same size
    # is a copy, so the only change left is the flip.
    kwargs = dict(image_size=40, scale=(1.0, 1.0), ratio=(1.0, 1.0), randaugment=None)
    flipped = T.train_transform(hflip=1.0, **kwargs)(img, random.Random(0))
    plain = T.train_transform(hflip=0.0, **kwargs)(img, random.Random(0))
    mirror = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert torch.equal(flipped, T.normalize(T.to_tensor(mirror)))
    assert torch.equal(plain, T.normalize(T.to_tensor(img)))
    assert torch.equal(flipped, plain.flip(-1))


# ----------------------------------------------------------------------------- random resized crop


@pytest.mark.parametrize(
    "width,height,scale,ratio",
    [
        (1000, 800, (0.08, 1.0), (3 / 4, 4 / 3)),
        (1200, 900, (0.8, 1.0), (3 / 4, 4 / 3)),
        (640, 1280, (0.3, 0.5), (0.5, 2.0)),
    ],
)
def test_crop_params_within_bounds(width, height, scale, ratio):
    rng = random.Random(0)
    area = width * height
    for _ in range(2000):
        top, left, h, w = T.random_resized_crop_params(width, height, scale, ratio, rng)
        assert 0 <= top and 0 <= left and 0 < h and 0 < w
        assert top + h <= height and left + w <= width
        # w and h are each rounded to the nearest pixel: allow that (w, h >= ~200 here).
        w_lo, w_hi, h_lo, h_hi = w - 0.5, w + 0.5, h - 0.5, h + 0.5
        assert scale[0] * area <= w_hi * h_hi and w_lo * h_lo <= scale[1] * area
        assert ratio[0] <= w_hi / h_lo and w_lo / h_hi <= ratio[1]


def test_crop_params_cover_the_image():
    # Many draws of a small crop hit every corner region: placement is uniform, not central.
    rng = random.Random(1)
    tops, lefts = set(), set()
    for _ in range(500):
        top, left, h, w = T.random_resized_crop_params(100, 100, (0.1, 0.1), (1.0, 1.0), rng)
        assert (h, w) == (32, 32)
        tops.add(top)
        lefts.add(left)
    assert min(tops) <= 3 and max(tops) >= 65 and min(lefts) <= 3 and max(lefts) >= 65


def test_crop_params_fallback_is_central_with_clamped_ratio():
    # A 1000x10 strip: no crop of area >= 90% has an aspect ratio <= 4/3.
    rng = random.Random(0)
    for _ in range(20):
        top, left, h, w = T.random_resized_crop_params(1000, 10, (0.9, 1.0), (3 / 4, 4 / 3), rng)
        assert (top, left, h, w) == (0, (1000 - 13) // 2, 10, 13)
    assert T.random_resized_crop_params(10, 1000, (0.9, 1.0), (3 / 4, 4 / 3), rng) == (
        (1000 - 13) // 2,
        0,
        13,
        10,
    )


def test_crop_params_numpy_generator():
    a = [T.random_resized_crop_params(300, 200, (0.5, 1.0), (0.75, 1.33), np.random.default_rng(5))]
    b = [T.random_resized_crop_params(300, 200, (0.5, 1.0), (0.75, 1.33), np.random.default_rng(5))]
    assert a == b


def test_random_resized_crop_output_size():
    crop = T.RandomResizedCrop(17)
    out = crop(_image(123, 45), random.Random(0))
    assert out.size == (17, 17) and out.mode == "RGB"


# ----------------------------------------------------------------------------- RandAugment


def test_op_set_is_torchvision():
    assert set(T.RAND_AUGMENT_OPS) == {
        "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
        "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
    }  # fmt: skip
    assert T.NUM_MAGNITUDE_BINS == 31 and T.FILL == (128, 128, 128)


def test_op_magnitudes_match_torchvision_linspace():
    w, h, m = 224, 160, 7
    lin = lambda hi: float(np.linspace(0.0, hi, 31)[m])  # noqa: E731
    assert T.op_magnitude("ShearX", m, w, h) == pytest.approx((lin(0.3), True))
    assert T.op_magnitude("TranslateX", m, w, h) == pytest.approx((lin(150 / 331 * w), True))
    assert T.op_magnitude("TranslateY", m, w, h) == pytest.approx((lin(150 / 331 * h), True))
    assert T.op_magnitude("Rotate", m, w, h) == pytest.approx((lin(30.0), True))
    assert T.op_magnitude("Color", m, w, h) == pytest.approx((lin(0.9), True))
    assert T.op_magnitude("Solarize", m, w, h) == pytest.approx(
        (float(np.linspace(255, 0, 31)[m]), False)
    )
    posterize = 8 - np.round(np.arange(31) / ((31 - 1) / 4)).astype(int)
    for b in range(31):
        assert T.op_magnitude("Posterize", b, w, h) == (float(posterize[b]), False)
    assert T.op_magnitude("Equalize", m, w, h) == (0.0, False)
    with pytest.raises(ValueError):
        T.op_magnitude("Invert", m, w, h)


@pytest.mark.parametrize("name", T.RAND_AUGMENT_OPS)
@pytest.mark.parametrize("size", [(33, 17), (7, 5), (1, 1)])
def test_each_op_keeps_size_and_mode(name, size):
    img = _image(*size, seed=size[0])
    for m in (0, 7, 30):
        mag, signed = T.op_magnitude(name, m, *size)
        for sign in (1, -1) if signed else (1,):
            out = T.apply_op(img, name, sign * mag)
            assert out.size == img.size and out.mode == "RGB"


def test_geometric_ops_fill_grey():
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    out = np.asarray(T.apply_op(img, "TranslateX", 5.0))
    assert (out[:, :5] == 128).all() and (out[:, 5:] == (255, 0, 0)).all()
    out = np.asarray(T.apply_op(img, "TranslateY", -3.0))
    assert (out[-3:] == 128).all() and (out[:-3] == (255, 0, 0)).all()
    out = np.asarray(T.apply_op(img, "Rotate", 30.0))
    assert (out[0, 0] == 128).all()
    # Identity and the magnitude-0 enhancements do nothing.
    assert np.array_equal(np.asarray(T.apply_op(img, "Identity", 0.0)), np.asarray(img))
    assert np.array_equal(np.asarray(T.apply_op(img, "Brightness", 0.0)), np.asarray(img))


def test_randaugment_deterministic_and_varied():
    ra = T.RandAugment(2, 7)
    img = _image(64, 48)
    a = np.asarray(ra(img, random.Random(3)))
    assert np.array_equal(a, np.asarray(ra(img, random.Random(3))))
    outs = {np.asarray(ra(img, random.Random(s))).tobytes() for s in range(30)}
    assert len(outs) > 10
    assert np.array_equal(np.asarray(T.RandAugment(0, 7)(img, random.Random(0))), np.asarray(img))
    with pytest.raises(ValueError):
        T.RandAugment(2, 31)


# ----------------------------------------------------------------------------- modes, pickling


def test_mode_conversion():
    rgba = Image.new("RGBA", (6, 4), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    rgb = np.asarray(T.to_rgb(rgba))
    assert T.to_rgb(rgba).mode == "RGB"
    assert tuple(rgb[0, 0]) == (10, 20, 30)  # opaque pixel kept
    assert tuple(rgb[1, 1]) == (255, 255, 255)  # transparent pixel composited on white
    base = _image(30, 20)
    for mode in ("L", "P", "CMYK", "LA", "1", "I;16"):
        img = base.convert(mode) if mode != "I;16" else Image.new("I;16", (30, 20), 65535)
        assert T.to_rgb(img).mode == "RGB" and T.to_rgb(img).size == (30, 20)
        for f in (T.eval_transform(16), T.train_transform(16)):
            x = f(img, random.Random(0))
            assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert (np.asarray(T.to_rgb(Image.new("I;16", (3, 3), 0xFF00))) == 255).all()
    # P with a transparent palette index is composited on white too.
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0] * 256)
    p.info["transparency"] = 0
    assert (np.asarray(T.to_rgb(p)) == 255).all()


def test_pickle_round_trip():
    img = _image(80, 60)
    for f in (T.train_transform(image_size=24), T.eval_transform(image_size=24)):
        g = pickle.loads(pickle.dumps(f))
        assert type(g) is type(f) and repr(g) == repr(f)
        assert torch.equal(f(img, random.Random(9)), g(img, random.Random(9)))


def test_invalid_arguments():
    with pytest.raises(ValueError):
        T.train_transform(hflip=1.5)
    with pytest.raises(ValueError):
        T.train_transform(scale=(1.0, 0.5))
    with pytest.raises(ValueError):
        T.eval_transform(image_size=0)
    assert math.isclose(T.train_transform().crop.ratio[1], 4 / 3)
