"""The GPU decode path (--image-decode gpu): what the workers return, the parameters' parity
with the CPU path, and the GPU half's transform run on CPU tensors against the Pillow path.

Tolerances. Given the same decoded pixels, the GPU half (torch bicubic with antialiasing, two
passes rounded to 8 bits in Pillow's order) matches Pillow's resize to within 1 level of 255 on
almost every pixel; a few pixels differ by 2 (Pillow's fixed-point coefficients). Decoders differ
more (nvJPEG's or libjpeg's IDCT and chroma upsampling against Pillow's libjpeg-turbo): those
tests, which need torchvision (and CUDA), compare mean differences. Without torchvision (it does
not import beside the CPU torch build) they skip; without CUDA the CUDA ones skip.
"""

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_m2.config import ConfigError
from megatron_m2.data.dataset import BadSampleError, ImageTextDataset, _collate
from megatron_m2.data.gpu_decode import (
    KIND_JPEG,
    KIND_PIXELS,
    EncodedTrainTransform,
    GpuBatchDecoder,
    resized_crop,
)
from megatron_m2.data.indexed import ImageTextWriter
from megatron_m2.data.tokenizer import M2Tokenizer
from megatron_m2.data.transforms import train_transform

LEVEL = 2 / 255  # one 8-bit level after normalisation with mean = std = 0.5


def _torchvision_ok():
    try:
        import torchvision.io  # noqa: F401
    except Exception:  # noqa: BLE001 - the CUDA wheel beside a CPU torch raises RuntimeError
        return False
    return True


needs_torchvision = pytest.mark.skipif(not _torchvision_ok(),
                                       reason="torchvision not importable beside this torch")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _encode(arr, fmt="JPEG", **kw):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _images():
    """Photo-like gradients, noise (the worst case for resampling) and small upscaled images."""
    rng = np.random.default_rng(0)
    out = []
    for k, (h, w) in enumerate([(256, 256), (256, 256), (240, 320), (64, 64), (300, 200)]):
        if k % 2:
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        else:
            small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
            arr = np.asarray(small.resize((w, h), Image.Resampling.BICUBIC))
        out.append(_encode(arr, quality=90))
    return out


def _pil_decode(payloads):
    return [torch.from_numpy(np.asarray(Image.open(io.BytesIO(p.numpy().tobytes()))
                                        .convert("RGB")).copy()).permute(2, 0, 1)
            for p in payloads]


def _both_paths(images, size=224):
    t = train_transform(size, randaugment=None)
    e = EncodedTrainTransform.from_train_transform(t)
    cpu = torch.stack([t(Image.open(io.BytesIO(d)).convert("RGB"), random.Random(i))
                       for i, d in enumerate(images)])
    batch = _collate([e(d, random.Random(i)) for i, d in enumerate(images)])
    return cpu, batch, GpuBatchDecoder.for_transform(e, "cpu", _pil_decode)


def test_worker_returns_jpeg_bytes_and_the_cpu_paths_parameters():
    data = _images()[2]  # 320 x 240
    e = EncodedTrainTransform(224, (0.8, 1.0), (3 / 4, 4 / 3), 0.5)
    out = e(data, random.Random(7))
    assert set(out) == {"image_data", "image_params"}
    assert out["image_data"].dtype == torch.uint8 and out["image_data"].numpy().tobytes() == data
    kind, h, w, top, left, ch, cw, flip = out["image_params"].tolist()
    assert (kind, h, w) == (KIND_JPEG, 240, 320)
    # The same draws as the CPU transform: crop box from the image size, then the flip coin.
    from megatron_m2.data.transforms import random_resized_crop_params

    rng = random.Random(7)
    assert (top, left, ch, cw) == random_resized_crop_params(320, 240, (0.8, 1.0),
                                                             (3 / 4, 4 / 3), rng)
    assert flip == int(rng.uniform(0.0, 1.0) < 0.5)
    # Pure function of the rng's seed.
    assert torch.equal(e(data, random.Random(7))["image_params"], out["image_params"])


@pytest.mark.parametrize("fmt,mode", [("PNG", "RGB"), ("PNG", "RGBA"), ("JPEG", "CMYK")])
def test_other_images_are_decoded_in_the_worker(fmt, mode):
    arr = np.random.default_rng(1).integers(0, 256, (30, 40, len(mode)), dtype=np.uint8)
    img = Image.fromarray(arr[..., :3]).convert(mode) if mode == "CMYK" else Image.fromarray(arr)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    out = EncodedTrainTransform(16, (0.8, 1.0), (3 / 4, 4 / 3), 0.5)(buf.getvalue(),
                                                                      random.Random(0))
    kind, h, w = out["image_params"].tolist()[:3]
    assert (kind, h, w) == (KIND_PIXELS, 30, 40)
    want = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).reshape(-1)
    assert np.array_equal(out["image_data"].numpy(), want)


def test_randaugment_is_refused():
    with pytest.raises(ValueError, match="RandAugment"):
        EncodedTrainTransform.from_train_transform(train_transform(32, randaugment=(2, 7)))


def test_gpu_transform_on_cpu_tensors_matches_pillow():
    images = _images()
    cpu, batch, decoder = _both_paths(images)
    gpu = decoder(batch)["images"]
    assert gpu.shape == cpu.shape == (len(images), 3, 224, 224) and gpu.dtype == torch.float32
    diff = (gpu - cpu).abs() / LEVEL  # in 8-bit levels
    assert diff.max() <= 2.01, diff.amax(dim=(1, 2, 3))
    assert (diff > 1.01).float().mean() < 1e-3
    assert diff.mean() < 0.05


def test_resized_crop_flips_and_keeps_8_bit_values():
    img = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    a = resized_crop(img, 3, 4, 30, 36, 24, False)
    b = resized_crop(img, 3, 4, 30, 36, 24, True)
    assert torch.equal(b, a.flip(-1)) and torch.equal(a, a.round())
    assert 0 <= a.min() <= a.max() <= 255
    same = resized_crop(img, 0, 0, 24, 24, 24, False)  # no resize: the crop itself
    assert torch.equal(same, img[:, :24, :24].float())


def test_decode_failure_names_the_image():
    images = _images()[:3]
    _, batch, _ = _both_paths(images, 32)

    def decode(payloads):
        if len(payloads) > 1 or payloads[0].numel() == len(images[1]):
            raise RuntimeError("corrupt")
        return _pil_decode(payloads)

    with pytest.raises(BadSampleError, match="image 1 of the micro-batch"):
        GpuBatchDecoder(32, device="cpu", decode=decode)(batch)


@pytest.fixture(scope="module")
def dataset_prefix(tmp_path_factory, tokenizer_model):
    tok = M2Tokenizer(tokenizer_model)
    prefix = str(tmp_path_factory.mktemp("gpu_ds") / "ds")
    png = _encode(np.random.default_rng(2).integers(0, 256, (50, 60, 3), dtype=np.uint8), "PNG")
    with ImageTextWriter(prefix) as w:
        for i, data in enumerate(_images() + [png]):
            w.add_sample(data, [("en", tok.frame(tok.encode(f"a photo of a cat {i}"))),
                                ("zh", tok.frame(tok.encode("一只猫的照片")))])
    return prefix


def test_dataset_gpu_path_matches_cpu_path(dataset_prefix, tokenizer_model):
    tok = M2Tokenizer(tokenizer_model)
    t = train_transform(64, randaugment=None)
    cpu = ImageTextDataset(dataset_prefix, tok, t, 16, seed=3)
    gpu = ImageTextDataset(dataset_prefix, tok, EncodedTrainTransform.from_train_transform(t),
                           16, seed=3)
    keys = [(i, e) for i in range(len(cpu)) for e in (0, 1)]
    a = [cpu[k] for k in keys]
    b = [gpu[k] for k in keys]
    assert all(torch.equal(b[i]["image_params"], gpu[k]["image_params"])  # deterministic
               for i, k in enumerate(keys))
    assert [int(x["image_params"][0]) for x in b[::2]] == [KIND_JPEG] * 5 + [KIND_PIXELS]
    batch = _collate(b)
    assert batch["image_offsets"].tolist()[-1] == batch["image_data"].numel()
    assert torch.equal(batch["image_data"], torch.cat([x["image_data"] for x in b]))
    for k in ("text_ids", "text_pad_mask", "lang"):  # the caption draw is unchanged
        assert torch.equal(batch[k], torch.stack([x[k] for x in a]))
    images = GpuBatchDecoder(64, device="cpu", decode=_pil_decode)(batch)["images"]
    diff = (images - torch.stack([x["images"] for x in a])).abs() / LEVEL
    assert diff.max() <= 2.01 and diff.mean() < 0.05


def test_worker_batches_are_in_shared_memory(dataset_prefix, tokenizer_model, monkeypatch):
    t = EncodedTrainTransform.from_train_transform(train_transform(64, randaugment=None))
    ds = ImageTextDataset(dataset_prefix, M2Tokenizer(tokenizer_model), t, 16, seed=3)
    samples = [ds[(i, 0)] for i in range(3)]
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    batch = _collate(samples)
    assert batch["image_data"].is_shared() and batch["image_params"].is_shared()
    assert "image_data" in samples[0]  # the samples are not modified


def test_validation_refuses_gpu_decode_with_randaugment_or_without_cuda():
    from argparse import Namespace

    from megatron_m2.training.validation import _validate_image_decode

    _validate_image_decode(Namespace(image_decode="cpu", randaugment="2,7"), (2, 7))
    with pytest.raises(ConfigError, match="--randaugment none"):
        _validate_image_decode(Namespace(image_decode="gpu", randaugment="2,7"), (2, 7))
    if torch.cuda.is_available() and _torchvision_ok():
        _validate_image_decode(Namespace(image_decode="gpu", randaugment="none"), None)
    else:
        with pytest.raises(ConfigError, match="needs a CUDA device and a torchvision"):
            _validate_image_decode(Namespace(image_decode="gpu", randaugment="none"), None)


@needs_torchvision
def test_torchvision_cpu_decode_is_close_to_pillow():
    from megatron_m2.data.gpu_decode import load_decode_jpeg

    images = _images()
    ours = load_decode_jpeg(torch.device("cpu"))([torch.frombuffer(bytearray(d), dtype=torch.uint8)
                                                   for d in images])
    for d, x in zip(images, ours):
        ref = torch.from_numpy(np.asarray(Image.open(io.BytesIO(d)).convert("RGB")).copy())
        assert (x.permute(1, 2, 0).float() - ref.float()).abs().mean() < 1.0


@needs_cuda
@needs_torchvision
def test_cuda_decode_matches_the_cpu_path():
    images = _images()
    cpu, batch, _ = _both_paths(images)
    gpu = GpuBatchDecoder(224, device="cuda")(batch)["images"]
    assert gpu.is_cuda
    diff = (gpu.cpu() - cpu).abs() / LEVEL
    # nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: a few levels at edges.
    assert diff.mean() < 1.5 and (diff > 8).float().mean() < 0.01
