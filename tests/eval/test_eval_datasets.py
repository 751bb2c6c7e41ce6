"""Evaluation datasets: the IDX reader (plain and gzip, malformed files), Fashion-MNIST, image
folders with unreadable images, and an end-to-end zero-shot run over an image folder."""

import gzip
import os
import re
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_m2.data.transforms import eval_transform
from megatron_m2.eval import (
    FASHION_MNIST_ROOT,
    FashionMNIST,
    IdxFormatError,
    ImageFolder,
    ImageReadError,
    evaluate_zero_shot,
    iter_batches,
    read_idx,
)

_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B,
          np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(arr: np.ndarray) -> bytes:
    """IDX encoding written independently of the reader: magic, big-endian dims, data."""
    big = arr.astype(arr.dtype.newbyteorder(">")) if arr.dtype.itemsize > 1 else arr
    header = bytes([0, 0, _CODES[big.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I",
                                                                       *arr.shape)
    return header + big.tobytes(order="C")


def write_idx(path, arr, compress):
    data = idx_bytes(arr)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def match_path(path):
    return re.escape(str(path))


# -- IDX ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", ["u1", "i1", "i2", "i4", "f4", "f8"])
def test_idx_round_trip(tmp_path, compress, dtype):
    rng = np.random.default_rng(0)
    if dtype.startswith("f"):
        arr = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    else:
        low = 0 if dtype == "u1" else -100
        arr = rng.integers(low, 100, (3, 4, 5)).astype(dtype)
    path = write_idx(tmp_path / "a-idx3-ubyte", arr, compress)
    got = read_idx(path)
    assert got.shape == (3, 4, 5) and got.dtype == arr.dtype  # native byte order
    np.testing.assert_array_equal(got, arr)
    # 1-D (labels).
    labels = np.arange(7, dtype=np.uint8)
    got = read_idx(write_idx(tmp_path / "l.gz", labels, compress))
    np.testing.assert_array_equal(got, labels)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_bad_magic(tmp_path, compress):
    data = bytearray(idx_bytes(np.zeros((2, 2), np.uint8)))
    p = tmp_path / "bad"
    data[0] = 8
    p.write_bytes(gzip.compress(bytes(data)) if compress else bytes(data))
    with pytest.raises(IdxFormatError, match=match_path(p) + ".*bad IDX magic number 0x08"):
        read_idx(p)
    data[0] = 0
    data[2] = 0x07
    p.write_bytes(bytes(data))
    with pytest.raises(IdxFormatError, match=match_path(p) + ".*unknown type code 0x07"):
        read_idx(p)
    p.write_bytes(b"\x00\x00")
    with pytest.raises(IdxFormatError, match=match_path(p) + ": 2 bytes, too short"):
        read_idx(p)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_truncated_and_overlong(tmp_path, compress):
    data = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    p = tmp_path / "t10k-images-idx3-ubyte"
    p.write_bytes(gzip.compress(data[:-5]) if compress else data[:-5])
    with pytest.raises(IdxFormatError, match=match_path(p) + r": truncated: shape \(2, 3, 4\) "
                       r"of uint8 needs 24 data bytes, found 19"):
        read_idx(p)
    p.write_bytes(data[:10])  # inside the header
    with pytest.raises(IdxFormatError, match=match_path(p) + ": truncated header"):
        read_idx(p)
    p.write_bytes(data + b"xx")
    with pytest.raises(IdxFormatError, match=match_path(p) + ": 2 unexpected bytes"):
        read_idx(p)


def test_idx_truncated_gzip(tmp_path):
    p = tmp_path / "x.gz"
    blob = gzip.compress(idx_bytes(np.zeros((100, 28, 28), np.uint8)))
    p.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(IdxFormatError, match=match_path(p) + ": corrupt or truncated gzip"):
        read_idx(p)


# -- Fashion-MNIST ------------------------------------------------------------------------------
def fake_fashion(root, n=12, compress=True, labels=None):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10 if labels is None else labels
    sfx = ".gz" if compress else ""
    root.mkdir(exist_ok=True)
    write_idx(root / f"t10k-images-idx3-ubyte{sfx}", images, compress)
    write_idx(root / f"t10k-labels-idx1-ubyte{sfx}", labels, compress)
    return images, labels


@pytest.mark.parametrize("compress", [False, True])
def test_fashion_mnist_reader(tmp_path, compress):
    images, labels = fake_fashion(tmp_path / "fm", compress=compress)
    ds = FashionMNIST(tmp_path / "fm", split="test")
    assert len(ds) == 12 and ds.image_file.endswith("ubyte.gz" if compress else "ubyte")
    img, y = ds[3]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (28, 28)
    assert y == 3
    arr = np.asarray(img)
    for ch in range(3):
        np.testing.assert_array_equal(arr[:, :, ch], images[3])
    assert FashionMNIST(tmp_path / "fm", limit=5).labels.tolist() == [0, 1, 2, 3, 4]
    assert ds.num_classes == 10
    assert ds.classnames("en")[9] == "Ankle boot" and ds.classnames("zh")[0] == "T恤/上衣"

    ds = FashionMNIST(tmp_path / "fm", transform=eval_transform(32))
    batches = list(ds.batches(5))
    assert [b.shape for b, _ in batches] == [(5, 3, 32, 32), (5, 3, 32, 32), (2, 3, 32, 32)]
    assert torch.cat([y for _, y in batches]).tolist() == labels.tolist()
    assert len(ds.batches(5)) == 3
    # Without a transform, batches are lists of PIL images.
    pil_batch, y = next(iter(iter_batches(FashionMNIST(tmp_path / "fm"), 4)))
    assert len(pil_batch) == 4 and isinstance(pil_batch[0], Image.Image)
    assert y.dtype == torch.int64


def test_fashion_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        FashionMNIST(tmp_path)
    fake_fashion(tmp_path / "a", labels=np.array([0, 1, 12] + [0] * 9, np.uint8))
    with pytest.raises(IdxFormatError, match=r"t10k-labels-idx1-ubyte.gz: label 12 at index 2"):
        FashionMNIST(tmp_path / "a")
    fake_fashion(tmp_path / "b", labels=np.zeros(11, np.uint8))
    with pytest.raises(IdxFormatError, match=r"holds 12 images but .* holds 11 labels"):
        FashionMNIST(tmp_path / "b")
    with pytest.raises(ValueError, match="split"):
        FashionMNIST(tmp_path / "b", split="val")


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_ROOT), reason="dataset-fashion-mnist absent")
def test_real_fashion_mnist_test_split():
    ds = FashionMNIST()
    assert len(ds) == 10000
    assert ds.images.shape == (10000, 28, 28) and ds.images.dtype == np.uint8
    assert ds.labels.min() == 0 and ds.labels.max() == 9
    assert np.bincount(ds.labels, minlength=10).tolist() == [1000] * 10
    img, y = ds[0]
    assert img.size == (28, 28) and img.mode == "RGB" and 0 <= y <= 9


# -- image folders ------------------------------------------------------------------------------
COLOURS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}


def make_folder(root, per_class=3):
    for name, rgb in COLOURS.items():
        d = root / name
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (20 + i, 16), rgb).save(d / f"{i}.png")
    # Other modes, a nested folder, and a non-image file that must be ignored.
    Image.new("L", (8, 8), 200).save(root / "green" / "grey.JPG")
    (root / "red" / "nested").mkdir()
    Image.new("RGBA", (8, 8), (255, 0, 0, 255)).save(root / "red" / "nested" / "x.png")
    (root / "red" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_order_and_modes(tmp_path):
    ds = ImageFolder(make_folder(tmp_path / "f"))
    assert ds.classes == ["blue", "green", "red"] and ds.num_classes == 3
    assert len(ds) == 3 + 4 + 4
    assert ds.targets == [0] * 3 + [1] * 4 + [2] * 4
    names = [os.path.relpath(p, tmp_path / "f") for p, _ in ds.samples]
    assert names[3:7] == ["green/0.png", "green/1.png", "green/2.png", "green/grey.JPG"]
    assert names[-1] == os.path.join("red", "nested", "x.png")
    for i in range(len(ds)):
        img, _ = ds[i]
        assert img.mode == "RGB"
    # A given class list sets the label order.
    ds2 = ImageFolder(tmp_path / "f", classes=["red", "blue", "green"])
    assert ds2.class_to_idx == {"red": 0, "blue": 1, "green": 2}
    assert ds2.targets == [0] * 4 + [1] * 3 + [2] * 4
    with pytest.warns(UserWarning, match=r"ignoring 1 sub-folder\(s\) not in classes: \['red'\]"):
        assert len(ImageFolder(tmp_path / "f", classes=["green", "blue"])) == 7
    with pytest.raises(FileNotFoundError, match=r"no sub-folder for class\(es\) \['purple'\]"):
        ImageFolder(tmp_path / "f", classes=["red", "purple"])
    limited = ImageFolder(tmp_path / "f", limit=5)
    assert len(limited) == 5 and limited.targets == [0, 0, 0, 1, 1] and limited.num_classes == 3
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nowhere")


def add_bad_images(root):
    bad = root / "green" / "broken.jpg"
    bad.write_bytes(b"this is not a JPEG")
    good = root / "blue" / "0.png"
    truncated = root / "blue" / "1_truncated.png"
    truncated.write_bytes(good.read_bytes()[:-30])
    return bad, truncated


def test_image_folder_reports_bad_images(tmp_path):
    root = make_folder(tmp_path / "f")
    bad, truncated = add_bad_images(root)
    ds = ImageFolder(root, transform=eval_transform(16))
    i_bad = [p for p, _ in ds.samples].index(str(bad))
    with pytest.raises(ImageReadError, match=match_path(bad) + ": cannot read image"):
        ds[i_bad]
    with pytest.raises(ImageReadError, match=match_path(truncated)):
        list(ds.batches(4))
    found = ds.verify()
    assert [p for p, _ in found] == [str(truncated), str(bad)]
    assert len(ds) == 13  # verify without drop changes nothing

    skip = ImageFolder(root, transform=eval_transform(16), on_error="skip")
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        batches = list(skip.batches(4))
    labels = torch.cat([y for _, y in batches])
    assert labels.tolist() == [0] * 3 + [1] * 4 + [2] * 4
    assert sum(b.shape[0] for b, _ in batches) == 11
    assert set(skip.skipped) == {str(bad), str(truncated)}
    assert all(reason for reason in skip.skipped.values())

    drop = ImageFolder(root)
    assert len(drop.verify(drop=True)) == 2
    assert len(drop) == 11 and set(drop.skipped) == {str(bad), str(truncated)}


def test_zero_shot_over_image_folder(tmp_path):
    """End to end: a colour 'encoder' classifies the folder perfectly."""
    root = make_folder(tmp_path / "f")
    names = {"blue": "蓝色", "green": "绿色", "red": "红色"}
    ds = ImageFolder(root, transform=eval_transform(8, mean=0.0, std=1.0))

    def encode_image(x):
        return x.mean(dim=(2, 3))  # mean RGB

    def encode_text(texts):
        axis = {"红色": 0, "绿色": 1, "蓝色": 2}
        return torch.stack([torch.eye(3)[axis[t.split("的")[0]]] for t in texts])

    got = evaluate_zero_shot(encode_image, encode_text, ds.batches(4),
                             [names[c] for c in ds.classes], templates=["{c}的照片。"],
                             ks=(1, 2), progress=False)
    # The grey image (200, 200, 200) ties over all three classes: class 0 (blue) wins top-1,
    # its label is green (1), which is top-2.
    assert got == {"top1": 100.0 * 10 / 11, "top2": 100.0}
