"""Image preprocessing for M2-Encoder training and inference, on Pillow + numpy + torch only.

Why not torchvision: the PyPI torchvision wheels are built against one exact torch release and
do not import beside the torch build this project pins, and the data path only needs a handful
of PIL operations. So the few transforms used are re-implemented here, following torchvision's
semantics closely enough that published recipes carry over. (``m2-pretrain --image-decode gpu``
does use torchvision, on GPU machines only, for nvJPEG: see :mod:`megatron_m2.data.gpu_decode`,
which draws the same crop and flip parameters and reproduces this module's resize on the GPU.)

Semantics
---------
Every transform first converts its input to RGB (:func:`to_rgb`): images with transparency
(``RGBA``, ``LA``, ``PA``, ``P``/``L`` with a ``transparency`` entry) are alpha-composited onto
**white**, because transparent regions of web images are meant as blank page background, and
Pillow's plain ``convert("RGB")`` would expose whatever colour happens to be stored under the
alpha (often black). 16-bit greyscale (``I;16*``) keeps its 8 most significant bits; every
other mode (``L``, ``P``, ``CMYK``, ``YCbCr``, ...) goes through ``Image.convert("RGB")``.
EXIF orientation is the decoder's business and is not applied here.

Training (:func:`train_transform`), in this order:

1. **RandomResizedCrop**, as ``torchvision.transforms.RandomResizedCrop``: up to 10 attempts
   draw an area fraction uniformly from ``scale`` and an aspect ratio (w/h) log-uniformly from
   ``ratio``; ``w = round(sqrt(area * r))``, ``h = round(sqrt(area / r))``; the first attempt
   that fits the image is placed uniformly at random. If none fits, the fallback is a central
   crop of the whole image with its aspect ratio clamped into ``ratio``. The crop is then resized
   to ``image_size x image_size`` with BICUBIC.
2. **Horizontal flip** with probability ``hflip``.
3. **RandAugment(N, M)** with torchvision's op set and magnitudes (31 bins; ``M`` indexes a
   ``linspace`` from 0 to the op's maximum): each of ``N`` rounds picks one of the 14 ops
   uniformly, and signed ops are negated with probability 1/2. Geometric ops use NEAREST
   resampling (torchvision's default) and fill uncovered pixels with **grey (128, 128, 128)**,
   as timm and BLIP/BEiT-3 do, rather than torchvision's black, so that filled borders sit at
   the middle of the normalised range (0 after ``(x - 0.5) / 0.5``).
4. :func:`to_tensor` (``float32`` in ``[0, 1]``, ``[3, H, W]``) and :func:`normalize`
   (``(x - mean) / std``).

Every random draw comes from the ``rng`` passed to the call (a ``random.Random`` or a
``numpy.random.Generator``), never from global state, so a loader can make augmentation a pure
function of (seed, epoch, sample index) and reproduce it in any worker.

Inference (:func:`eval_transform`) is the official M2-Encoder preprocessing: squash-resize the
whole image to ``image_size x image_size`` with BICUBIC (no crop, aspect ratio not kept), then
to tensor and normalise with mean = std = 0.5.

All transforms are instances of module-level classes holding plain values, so they pickle and
work in ``DataLoader`` workers started with ``spawn``.
"""

from __future__ import annotations

import math
import random
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

__all__ = [
    "FILL",
    "NUM_MAGNITUDE_BINS",
    "RAND_AUGMENT_OPS",
    "EvalTransform",
    "RandAugment",
    "RandomResizedCrop",
    "Rng",
    "TrainTransform",
    "apply_op",
    "eval_transform",
    "normalize",
    "op_magnitude",
    "random_resized_crop_params",
    "to_rgb",
    "to_tensor",
    "train_transform",
]

Rng = Union[random.Random, np.random.Generator]
"""A source of randomness accepted by the training transforms."""

FloatOrSeq = Union[float, Sequence[float]]

FILL: Tuple[int, int, int] = (128, 128, 128)
"""Colour of pixels that geometric RandAugment ops uncover."""

NUM_MAGNITUDE_BINS = 31
"""RandAugment magnitude bins, as torchvision (``M`` ranges over ``0 .. 30``)."""

RAND_AUGMENT_OPS: Tuple[str, ...] = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)
"""The RandAugment op set of torchvision (and timm's ``rand-m*`` default), in torchvision's
order."""

_WHITE = (255, 255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


# ----------------------------------------------------------------------------- randomness


def _uniform(rng: Rng, low: float, high: float) -> float:
    """One float uniform in ``[low, high)``."""
    if isinstance(rng, random.Random):
        return rng.uniform(low, high)
    if isinstance(rng, np.random.Generator):
        return float(rng.uniform(low, high))
    raise TypeError(f"rng must be random.Random or numpy.random.Generator, got {type(rng)!r}")


def _randint(rng: Rng, low: int, high: int) -> int:
    """One int uniform in ``[low, high]`` (both ends included)."""
    if isinstance(rng, random.Random):
        return rng.randint(low, high)
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(low, high + 1))
    raise TypeError(f"rng must be random.Random or numpy.random.Generator, got {type(rng)!r}")


# ----------------------------------------------------------------------------- conversions


def to_rgb(img: Image.Image) -> Image.Image:
    """Return ``img`` as an ``RGB`` image, compositing any transparency onto white.

    ``RGB`` input is returned as is (not copied). ``I;16*`` keeps its high byte; other modes use
    Pillow's conversion.
    """
    if img.mode == "RGB":
        return img
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I;16"):
        # Pillow's I;16 -> RGB clips at 255, which turns most 16-bit images white.
        high = (np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(high, mode="L").convert("RGB")
    return img.convert("RGB")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """Convert an 8-bit PIL image to a contiguous ``float32`` tensor ``[C, H, W]`` in ``[0, 1]``.

    Like ``torchvision.transforms.functional.to_tensor`` for 8-bit modes: ``L`` gives one
    channel, ``RGB`` three, ``RGBA`` four; mode ``1`` is read as 0/255.
    """
    if img.mode == "1":
        img = img.convert("L")
    arr = np.array(img)  # a writable copy, so torch.from_numpy does not warn
    if arr.dtype != np.uint8:
        raise ValueError(f"to_tensor expects an 8-bit image, got mode {img.mode!r}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous().to(torch.float32).div_(255.0)


def _channel_values(value: FloatOrSeq, like: torch.Tensor) -> Union[float, torch.Tensor]:
    if isinstance(value, (int, float)):
        return float(value)
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).view(-1, 1, 1)


def normalize(x: torch.Tensor, mean: FloatOrSeq = 0.5, std: FloatOrSeq = 0.5) -> torch.Tensor:
    """Return ``(x - mean) / std`` for ``x`` of shape ``[C, H, W]`` (a new tensor).

    ``mean`` and ``std`` are scalars or per-channel sequences of length ``C``.
    """
    return (x - _channel_values(mean, x)) / _channel_values(std, x)


# ----------------------------------------------------------------------------- random resized crop


def random_resized_crop_params(
    width: int,
    height: int,
    scale: Tuple[float, float],
    ratio: Tuple[float, float],
    rng: Rng,
) -> Tuple[int, int, int, int]:
    """Draw a RandomResizedCrop box, as torchvision's ``RandomResizedCrop.get_params``.

    Returns ``(top, left, crop_height, crop_width)``; the box always lies inside the
    ``width x height`` image.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(rng, scale[0], scale[1])
        aspect = math.exp(_uniform(rng, log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = _randint(rng, 0, height - h)
            left = _randint(rng, 0, width - w)
            return top, left, h, w
    # No draw fitted (extreme aspect ratios or scale > 1): the central crop with the largest
    # admissible aspect ratio.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class RandomResizedCrop:
    """Random crop of random area and aspect ratio, resized to ``size x size`` (torchvision's).

    Args:
        size: output side length in pixels.
        scale: bounds of the crop area as a fraction of the image area.
        ratio: bounds of the crop aspect ratio (width / height), sampled log-uniformly.
        interpolation: PIL resampling filter for the resize.
    """

    def __init__(
        self,
        size: int,
        scale: Tuple[float, float] = (0.08, 1.0),
        ratio: Tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: Image.Resampling = Image.Resampling.BICUBIC,
    ):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must satisfy 0 < min <= max, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        self.size = int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.interpolation = Image.Resampling(interpolation)

    def __call__(self, img: Image.Image, rng: Rng) -> Image.Image:
        """Crop and resize ``img`` with a box drawn from ``rng``."""
        top, left, h, w = random_resized_crop_params(*img.size, self.scale, self.ratio, rng)
        # Crop, then resize (not resize(box=...)), to match torchvision's resized_crop.
        crop = img.crop((left, top, left + w, top + h))
        return crop.resize((self.size, self.size), self.interpolation)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
            f"interpolation={self.interpolation.name})"
        )


# ----------------------------------------------------------------------------- RandAugment


def op_magnitude(
    name: str, magnitude: int, width: int, height: int, num_bins: int = NUM_MAGNITUDE_BINS
) -> Tuple[float, bool]:
    """Magnitude of op ``name`` at bin ``magnitude`` and whether it is signed (torchvision).

    Translations scale with the image: at most ``150/331`` of its width or height.
    """
    if name not in RAND_AUGMENT_OPS:
        raise ValueError(f"unknown RandAugment op {name!r}")
    frac = magnitude / (num_bins - 1)  # position in linspace(low, high, num_bins)
    if name in ("ShearX", "ShearY"):
        return 0.3 * frac, True
    if name == "TranslateX":
        return 150.0 / 331.0 * width * frac, True
    if name == "TranslateY":
        return 150.0 / 331.0 * height * frac, True
    if name == "Rotate":
        return 30.0 * frac, True
    if name in ("Brightness", "Color", "Contrast", "Sharpness"):
        return 0.9 * frac, True
    if name == "Posterize":
        return float(8 - int(round(magnitude / ((num_bins - 1) / 4)))), False
    if name == "Solarize":
        return 255.0 * (1.0 - frac), False
    return 0.0, False  # Identity, AutoContrast, Equalize


def _affine(
    img: Image.Image,
    matrix: Tuple[float, float, float, float, float, float],
    interpolation: Image.Resampling,
    fill: Tuple[int, ...],
) -> Image.Image:
    # ``matrix`` maps output to input pixel coordinates, as Image.transform expects.
    return img.transform(
        img.size, Image.Transform.AFFINE, matrix, resample=interpolation, fillcolor=fill
    )


def apply_op(
    img: Image.Image,
    name: str,
    magnitude: float,
    interpolation: Image.Resampling = Image.Resampling.NEAREST,
    fill: Tuple[int, ...] = FILL,
) -> Image.Image:
    """Apply RandAugment op ``name`` with a signed ``magnitude`` (see :func:`op_magnitude`).

    Same size and mode out as in. The geometric ops match torchvision's PIL path: shears are
    about the top-left corner, translations are whole pixels, rotation is about the centre,
    counter-clockwise for positive degrees.
    """
    if name == "Identity":
        return img
    if name == "ShearX":
        return _affine(img, (1.0, magnitude, 0.0, 0.0, 1.0, 0.0), interpolation, fill)
    if name == "ShearY":
        return _affine(img, (1.0, 0.0, 0.0, magnitude, 1.0, 0.0), interpolation, fill)
    if name == "TranslateX":
        return _affine(img, (1.0, 0.0, -float(int(magnitude)), 0.0, 1.0, 0.0), interpolation, fill)
    if name == "TranslateY":
        return _affine(img, (1.0, 0.0, 0.0, 0.0, 1.0, -float(int(magnitude))), interpolation, fill)
    if name == "Rotate":
        return img.rotate(magnitude, resample=interpolation, fillcolor=fill)
    if name == "Brightness":
        return ImageEnhance.Brightness(img).enhance(1.0 + magnitude)
    if name == "Color":
        return ImageEnhance.Color(img).enhance(1.0 + magnitude)
    if name == "Contrast":
        return ImageEnhance.Contrast(img).enhance(1.0 + magnitude)
    if name == "Sharpness":
        return ImageEnhance.Sharpness(img).enhance(1.0 + magnitude)
    if name == "Posterize":
        return ImageOps.posterize(img, int(magnitude))
    if name == "Solarize":
        return ImageOps.solarize(img, magnitude)
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    raise ValueError(f"unknown RandAugment op {name!r}")


class RandAugment:
    """RandAugment (Cubuk et al., 2020) with torchvision's op set and magnitudes.

    Args:
        num_ops: ops applied in sequence (``N``).
        magnitude: magnitude bin (``M``), ``0 <= M < num_bins``.
        num_bins: number of magnitude bins.
        interpolation: PIL resampling filter of the geometric ops.
        fill: RGB colour of pixels uncovered by the geometric ops.
    """

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: int = 9,
        num_bins: int = NUM_MAGNITUDE_BINS,
        interpolation: Image.Resampling = Image.Resampling.NEAREST,
        fill: Tuple[int, int, int] = FILL,
    ):
        if num_ops < 0:
            raise ValueError(f"num_ops must be >= 0, got {num_ops}")
        if num_bins < 2 or not 0 <= magnitude < num_bins:
            raise ValueError(f"need 0 <= magnitude < num_bins, got {magnitude}, {num_bins}")
        self.num_ops = int(num_ops)
        self.magnitude = int(magnitude)
        self.num_bins = int(num_bins)
        self.interpolation = Image.Resampling(interpolation)
        self.fill = tuple(int(c) for c in fill)

    def __call__(self, img: Image.Image, rng: Rng) -> Image.Image:
        """Apply ``num_ops`` ops, each chosen (and its sign drawn) from ``rng``."""
        for _ in range(self.num_ops):
            name = RAND_AUGMENT_OPS[_randint(rng, 0, len(RAND_AUGMENT_OPS) - 1)]
            mag, signed = op_magnitude(name, self.magnitude, *img.size, num_bins=self.num_bins)
            if signed and _randint(rng, 0, 1):
                mag = -mag
            img = apply_op(img, name, mag, self.interpolation, self.fill)
        return img

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_ops={self.num_ops}, magnitude={self.magnitude}, "
            f"num_bins={self.num_bins}, interpolation={self.interpolation.name}, "
            f"fill={self.fill})"
        )


# ----------------------------------------------------------------------------- pipelines


class TrainTransform:
    """Training pipeline: RGB, RandomResizedCrop, flip, RandAugment, to tensor, normalise.

    Built by :func:`train_transform`; see the module docstring for the exact semantics.
    """

    def __init__(
        self,
        crop: RandomResizedCrop,
        hflip: float,
        randaugment: Optional[RandAugment],
        mean: FloatOrSeq,
        std: FloatOrSeq,
    ):
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip must be a probability, got {hflip}")
        self.crop = crop
        self.hflip = float(hflip)
        self.randaugment = randaugment
        self.mean = mean
        self.std = std

    def __call__(self, img: Image.Image, rng: Rng) -> torch.Tensor:
        """Augment ``img`` with randomness drawn only from ``rng``; returns ``[3, S, S]``."""
        img = self.crop(to_rgb(img), rng)
        # Draw unconditionally so the number of draws does not depend on hflip.
        if _uniform(rng, 0.0, 1.0) < self.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.randaugment is not None:
            img = self.randaugment(img, rng)
        return normalize(to_tensor(img), self.mean, self.std)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(crop={self.crop!r}, hflip={self.hflip}, "
            f"randaugment={self.randaugment!r}, mean={self.mean}, std={self.std})"
        )


class EvalTransform:
    """Inference pipeline: RGB, squash-resize BICUBIC to ``image_size`` square, tensor, normalise.

    Built by :func:`eval_transform`. Deterministic; the optional ``rng`` argument is accepted
    and ignored so loaders can call train and eval transforms alike.
    """

    def __init__(self, image_size: int, mean: FloatOrSeq, std: FloatOrSeq):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = int(image_size)
        self.mean = mean
        self.std = std

    def __call__(self, img: Image.Image, rng: Optional[Rng] = None) -> torch.Tensor:
        """Preprocess ``img``; returns ``[3, image_size, image_size]``."""
        img = to_rgb(img).resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        return normalize(to_tensor(img), self.mean, self.std)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, mean={self.mean}, std={self.std})"
        )


def train_transform(
    image_size: int = 224,
    scale: Tuple[float, float] = (0.8, 1.0),
    ratio: Tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    randaugment: Optional[Tuple[int, int]] = (2, 7),
    mean: FloatOrSeq = 0.5,
    std: FloatOrSeq = 0.5,
) -> TrainTransform:
    """The training transform ``f(img, rng) -> float32 tensor [3, image_size, image_size]``.

    Args:
        image_size: output side length.
        scale: RandomResizedCrop area fraction bounds.
        ratio: RandomResizedCrop aspect-ratio (w/h) bounds.
        hflip: probability of a horizontal flip.
        randaugment: ``(N, M)`` for RandAugment, or ``None`` to skip it.
        mean: normalisation mean (scalar or per channel).
        std: normalisation std (scalar or per channel).
    """
    ra = None if randaugment is None else RandAugment(randaugment[0], randaugment[1])
    return TrainTransform(RandomResizedCrop(image_size, scale, ratio), hflip, ra, mean, std)


def eval_transform(
    image_size: int = 224, mean: FloatOrSeq = 0.5, std: FloatOrSeq = 0.5
) -> EvalTransform:
    """The inference transform ``f(img) -> float32 tensor [3, image_size, image_size]``."""
    return EvalTransform(image_size, mean, std)
