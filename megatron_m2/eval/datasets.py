"""Image classification test sets for zero-shot evaluation: Fashion-MNIST (IDX) and image folders.

Both datasets are map-style (``len(ds)``, ``ds[i] -> (image, label)``) and take an optional
``transform`` callable applied to the RGB PIL image, e.g.
:func:`megatron_m2.data.transforms.eval_transform`; without one, ``ds[i]`` gives the PIL image.
``ds.batches(batch_size)`` yields ``(batch, labels)`` pairs for
:func:`megatron_m2.eval.zeroshot.evaluate_zero_shot`: ``batch`` is a stacked ``[B, ...]`` tensor
when the transform returns tensors and a list of images otherwise; ``labels`` is an int64
tensor. :func:`iter_batches` does the same for any map-style dataset. The datasets also work
with ``torch.utils.data.DataLoader`` (they and the project's transforms pickle).

IDX (:func:`read_idx`) is the MNIST file format: a 4-byte magic number (two zero bytes, a type
code, the number of dimensions), the dimensions as big-endian uint32, then the data in C order,
big-endian. Files may be gzip-compressed (detected from the content, not the name). Every
inconsistency (magic number, type code, truncated or overlong data, corrupt gzip) raises
:class:`IdxFormatError` naming the file.

Image folders (:class:`ImageFolder`) hold one sub-folder per class, searched recursively for
files with an image extension. Unreadable images raise :class:`ImageReadError` naming the file;
with ``on_error="skip"``, :meth:`ImageFolder.batches` skips them instead, records each in
``ImageFolder.skipped`` and warns, and :meth:`ImageFolder.verify` finds (and optionally drops)
them up front. Nothing is skipped silently.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from ..data.transforms import to_rgb
from ..errors import UserError
from .zeroshot import load_classnames

__all__ = [
    "IdxFormatError",
    "ImageReadError",
    "read_idx",
    "iter_batches",
    "FashionMNIST",
    "FASHION_MNIST_ROOT",
    "IMG_EXTENSIONS",
    "ImageFolder",
]

PathLike = Union[str, "os.PathLike[str]"]
Transform = Callable[[Image.Image], Any]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
"""Where Debian's ``dataset-fashion-mnist`` package installs the IDX files."""

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff",
                  ".webp", ".gif")
"""File extensions (lower case) that :class:`ImageFolder` reads by default."""


class IdxFormatError(UserError, ValueError):
    """A malformed IDX file; the message names the file."""


class ImageReadError(UserError, OSError):
    """An image file Pillow cannot decode; ``path`` is the file, the message names it too."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: cannot read image: {reason}")
        self.path = path
        self.reason = reason


# -- batching -----------------------------------------------------------------------------------
def _collate(items: List[Tuple[Any, int]]) -> Tuple[Any, torch.Tensor]:
    xs = [x for x, _ in items]
    labels = torch.tensor([int(y) for _, y in items], dtype=torch.int64)
    if all(isinstance(x, torch.Tensor) for x in xs):
        return torch.stack(xs), labels
    return xs, labels


class _Batches:
    """Re-iterable ``(batch, labels)`` view of a dataset; ``len`` is the number of batches
    (an upper bound when unreadable images are skipped)."""

    def __init__(self, get: Callable[[int], Optional[Tuple[Any, int]]], n: int,
                 batch_size: int, num_workers: int = 0):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.get, self.n = get, n
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[Tuple[Any, torch.Tensor]]:
        pool = ThreadPoolExecutor(self.num_workers) if self.num_workers else None
        try:
            for start in range(0, self.n, self.batch_size):
                idx = range(start, min(start + self.batch_size, self.n))
                # One batch at a time: threads decode in parallel, nothing is read ahead.
                items = list(pool.map(self.get, idx)) if pool else [self.get(i) for i in idx]
                items = [it for it in items if it is not None]
                if items:
                    yield _collate(items)
        finally:
            if pool is not None:
                pool.shutdown()


def iter_batches(dataset, batch_size: int, num_workers: int = 0) -> _Batches:
    """``(batch, labels)`` pairs of any map-style dataset whose items are ``(x, label)``.

    ``batch`` is a stacked tensor when every ``x`` is a tensor, else a list; ``labels`` is an
    int64 tensor. ``num_workers > 0`` reads the items of each batch in that many threads.
    """
    return _Batches(dataset.__getitem__, len(dataset), batch_size, num_workers)


# -- IDX / Fashion-MNIST ------------------------------------------------------------------------
_IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (plain or gzip-compressed) into a numpy array of its shape.

    The array has native byte order and may be read-only (it can share the file's buffer).

    Raises:
        IdxFormatError: naming ``path``, on corrupt gzip data, a bad magic number or type code,
            or a data size that does not match the header's dimensions.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:
            raise IdxFormatError(f"{path}: corrupt or truncated gzip data ({e})") from None
    if len(raw) < 4:
        raise IdxFormatError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    magic = raw[:4].hex()
    if raw[0] != 0 or raw[1] != 0:
        raise IdxFormatError(f"{path}: bad IDX magic number 0x{magic} (must start with two "
                             f"zero bytes); not an IDX file")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_TYPES:
        raise IdxFormatError(f"{path}: bad IDX magic number 0x{magic}: unknown type code "
                             f"0x{code:02x} (known: {', '.join(f'0x{c:02x}' for c in _IDX_TYPES)})")
    if ndim == 0:
        raise IdxFormatError(f"{path}: bad IDX magic number 0x{magic}: zero dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxFormatError(f"{path}: truncated header: {ndim} dimensions need {header} "
                             f"bytes, the file has {len(raw)}")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[code])
    count = math.prod(shape)
    expected, found = count * dtype.itemsize, len(raw) - header
    if found < expected:
        raise IdxFormatError(f"{path}: truncated: shape {shape} of {dtype.name} needs {expected} "
                             f"data bytes, found {found}")
    if found > expected:
        raise IdxFormatError(f"{path}: {found - expected} unexpected bytes after the "
                             f"{expected} data bytes of shape {shape}")
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def _find_idx(root: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{os.path.join(root, stem)}[.gz] not found (Debian: apt-get install "
                            f"dataset-fashion-mnist, which installs {FASHION_MNIST_ROOT})")


class FashionMNIST:
    """Fashion-MNIST from its IDX files: 28×28 greyscale product photos in 10 classes.

    Args:
        root: folder with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``; the default is
            where Debian's ``dataset-fashion-mnist`` installs them.
        split: ``"test"`` (10,000 images; alias ``"t10k"``) or ``"train"`` (60,000).
        transform: applied to each RGB PIL image (e.g. ``eval_transform(224)``); ``None``
            returns the PIL image.
        limit: keep only the first ``limit`` samples.

    Attributes:
        images: ``[N, 28, 28]`` uint8 array; labels: ``[N]`` uint8 array in 0..9;
        image_file / label_file: the files read; num_classes: 10.

    Images are returned as RGB (the grey value in all three channels), as image encoders
    expect. Labels follow the standard order, whose names :meth:`classnames` returns.
    """

    NUM_CLASSES = 10

    def __init__(self, root: PathLike = FASHION_MNIST_ROOT, split: str = "test",
                 transform: Optional[Transform] = None, limit: Optional[int] = None):
        prefixes = {"test": "t10k", "t10k": "t10k", "train": "train"}
        if split not in prefixes:
            raise ValueError(f"split must be 'test' or 'train', got {split!r}")
        if limit is not None and int(limit) < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        root = os.fspath(root)
        self.split = "train" if split == "train" else "test"
        self.transform = transform
        self.image_file = _find_idx(root, f"{prefixes[split]}-images-idx3-ubyte")
        self.label_file = _find_idx(root, f"{prefixes[split]}-labels-idx1-ubyte")
        images = read_idx(self.image_file)
        labels = read_idx(self.label_file)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise IdxFormatError(f"{self.image_file}: expected [N, rows, cols] uint8 images, "
                                 f"got shape {images.shape} of {images.dtype}")
        if labels.ndim != 1 or labels.dtype != np.uint8:
            raise IdxFormatError(f"{self.label_file}: expected [N] uint8 labels, got shape "
                                 f"{labels.shape} of {labels.dtype}")
        if len(images) != len(labels):
            raise IdxFormatError(f"{self.image_file} holds {len(images)} images but "
                                 f"{self.label_file} holds {len(labels)} labels")
        bad = np.flatnonzero(labels >= self.NUM_CLASSES)
        if bad.size:
            raise IdxFormatError(f"{self.label_file}: label {int(labels[bad[0]])} at index "
                                 f"{int(bad[0])} is outside 0..{self.NUM_CLASSES - 1}")
        if limit is not None:
            images, labels = images[:int(limit)], labels[:int(limit)]
        self.images, self.labels = images, labels

    @property
    def num_classes(self) -> int:
        """10."""
        return self.NUM_CLASSES

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Tuple[Any, int]:
        img = Image.fromarray(np.ascontiguousarray(self.images[i])).convert("RGB")  # "L" from uint8
        x = self.transform(img) if self.transform is not None else img
        return x, int(self.labels[i])

    @staticmethod
    def classnames(lang: str = "en") -> List[str]:
        """The 10 class names in label order (``"en"`` or ``"zh"``)."""
        return load_classnames("fashion_mnist", lang)

    def batches(self, batch_size: int = 256, num_workers: int = 0) -> _Batches:
        """``(batch, labels)`` pairs in file order (see :func:`iter_batches`)."""
        return _Batches(self.__getitem__, len(self), batch_size, num_workers)


# -- image folders ------------------------------------------------------------------------------
def _open_rgb(path: str) -> Image.Image:
    """Fully decode ``path`` (so truncated files fail here) and convert it to RGB."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
        return to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageReadError(path, f"{type(e).__name__}: {e}") from e


class ImageFolder:
    """A classification set stored as ``root/<class>/**/<image>``, read with Pillow.

    Args:
        root: the folder holding one sub-folder per class.
        classes: the class folder names in label order; default: every sub-folder, sorted by
            name (for ImageNet's validation set in synset folders ``n01440764`` ..., sorted order
            is the standard label order, that of the bundled ImageNet class names). Folders
            missing from ``root`` are an error; sub-folders not listed are ignored with a
            warning.
        transform: applied to each RGB PIL image; ``None`` returns the PIL image.
        extensions: file extensions to read (case-insensitive); ``None`` reads every file.
        on_error: ``"raise"`` (default): an unreadable image raises :class:`ImageReadError`;
            ``"skip"``: :meth:`batches` leaves it out, records it in :attr:`skipped` and warns.
            Indexing (``ds[i]``) always raises.
        limit: keep only the first ``limit`` samples (in label, then path, order: a smoke test,
            not a balanced subset).

    Attributes:
        classes: folder names in label order; class_to_idx: their indices; num_classes;
        samples: ``[(path, label)]`` sorted by label, then path;
        skipped: ``{path: reason}`` of every unreadable image skipped or dropped so far.
    """

    def __init__(self, root: PathLike, classes: Optional[Sequence[str]] = None,
                 transform: Optional[Transform] = None,
                 extensions: Optional[Sequence[str]] = IMG_EXTENSIONS, on_error: str = "raise",
                 limit: Optional[int] = None):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if limit is not None and int(limit) < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
        folders = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if classes is None:
            classes = folders
            if not classes:
                raise FileNotFoundError(f"{root}: no class sub-folders")
        else:
            classes = [str(c) for c in classes]
            dup = sorted({c for c in classes if classes.count(c) > 1})
            if dup:
                raise ValueError(f"classes listed more than once: {dup}")
            missing = [c for c in classes if c not in set(folders)]
            if missing:
                raise FileNotFoundError(f"{root}: no sub-folder for class(es) {missing[:10]}"
                                        f"{' ...' if len(missing) > 10 else ''}")
            extra = [f for f in folders if f not in set(classes)]
            if extra:
                warnings.warn(f"{root}: ignoring {len(extra)} sub-folder(s) not in classes: "
                              f"{extra[:10]}{' ...' if len(extra) > 10 else ''}", stacklevel=2)
        exts = None if extensions is None else tuple(e.lower() for e in extensions)
        samples: List[Tuple[str, int]] = []
        for label, name in enumerate(classes):
            folder = os.path.join(root, name)
            for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
                dirnames.sort()
                for fn in sorted(filenames):
                    if exts is None or fn.lower().endswith(exts):
                        samples.append((os.path.join(dirpath, fn), label))
        if not samples:
            raise FileNotFoundError(f"{root}: no image files with extensions {exts} in the "
                                    f"class folders")
        self.root = root
        self.classes = list(classes)
        self.class_to_idx: Dict[str, int] = {c: i for i, c in enumerate(self.classes)}
        self.samples = samples if limit is None else samples[:int(limit)]
        self.transform = transform
        self.on_error = on_error
        self.skipped: Dict[str, str] = {}

    @property
    def num_classes(self) -> int:
        """Number of classes (sub-folders used), whether or not each holds images."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Tuple[Any, int]:
        """``(image or transform(image), label)``; raises :class:`ImageReadError` naming the
        file if it cannot be decoded."""
        path, label = self.samples[i]
        img = _open_rgb(path)
        return (self.transform(img) if self.transform is not None else img), label

    @property
    def targets(self) -> List[int]:
        """The label of every sample."""
        return [label for _, label in self.samples]

    def _get_or_skip(self, i: int) -> Optional[Tuple[Any, int]]:
        try:
            return self[i]
        except ImageReadError as e:
            if self.on_error == "raise":
                raise
            self.skipped[e.path] = e.reason
            warnings.warn(f"skipping unreadable image {e}", stacklevel=2)
            return None

    def batches(self, batch_size: int = 256, num_workers: int = 0) -> _Batches:
        """``(batch, labels)`` pairs in sample order (see :func:`iter_batches`).

        With ``on_error="skip"``, unreadable images are left out of their batch (so batches
        can be smaller, and a batch with no readable image is not yielded).
        """
        return _Batches(self._get_or_skip, len(self), batch_size, num_workers)

    def verify(self, drop: bool = False, progress: bool = False) -> List[Tuple[str, str]]:
        """Decode every image; return ``[(path, reason)]`` of those that fail.

        With ``drop=True`` the failures are also removed from :attr:`samples` and recorded in
        :attr:`skipped`, so the dataset can then be used with any loader (e.g. a
        ``DataLoader``) without meeting them.
        """
        bad: List[Tuple[str, str]] = []
        it = self.samples
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc="verify images", unit="img", dynamic_ncols=True)
        for path, _ in it:
            try:
                _open_rgb(path)
            except ImageReadError as e:
                bad.append((path, e.reason))
        if drop and bad:
            gone = {p for p, _ in bad}
            self.samples = [s for s in self.samples if s[0] not in gone]
            self.skipped.update(bad)
        return bad
