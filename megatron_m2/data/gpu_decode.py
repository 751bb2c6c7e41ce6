"""The GPU decode path of training (``m2-pretrain --image-decode gpu``).

A 0.4b model on an H200 consumes several thousand samples/s per GPU, several times what one CPU
core decodes and transforms with Pillow (``docs/data.md``). This path moves the expensive part
off the loader's worker processes:

* **worker** (:class:`EncodedTrainTransform`, in place of the train transform): reads only the
  image *header* (Pillow's ``Image.open`` is lazy) for the size, draws the sample's augmentation
  parameters from the sample's ``rng`` exactly as :class:`~megatron_m2.data.transforms.
  TrainTransform` draws them (RandomResizedCrop box from the image size, then the flip coin), and
  returns the **encoded JPEG bytes** plus the parameters. Images that are not 3-channel or
  greyscale JPEGs (PNG, WebP, CMYK JPEG, ...) are decoded here on the CPU instead
  (``convert("RGB")``, as the CPU path) and shipped as raw RGB pixels, with the same parameters.
* **collate** (``dataset._collate``): the variable-length payloads of a micro-batch become one
  flat ``uint8`` tensor ``image_data`` plus ``image_offsets``, allocated in shared memory inside
  the worker (as ``default_collate`` does for the other keys).
* **main process** (:class:`GpuBatchDecoder`): decodes the JPEGs of the micro-batch in one
  batched ``torchvision.io.decode_jpeg(..., device="cuda")`` call (nvJPEG), then applies the same
  geometric transform on the GPU (:func:`resized_crop`: crop, bicubic antialiased resize, flip)
  and the normalisation, giving the ``[B, 3, S, S]`` float32 ``images`` the CPU path gives.

The random parameters are a pure function of (seed, epoch, sample index), as on the CPU path: for
a given sample both paths use the same crop box and the same flip. The pixels differ slightly:
nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's (a few levels of 255 at edges), and
the resize runs in float32 in one separable pass (``torch.nn.functional.interpolate``, bicubic
a = -0.5 with antialiasing: Pillow's filter) where Pillow rounds to 8 bits between its
horizontal and vertical passes; the result is rounded to 8 bits as Pillow's is. Measured on the
same decoded pixels the resize differs from Pillow's by at most 1/255 on most pixels (tests).

RandAugment (Pillow ops on 8-bit images) is not done on the GPU: :class:`EncodedTrainTransform`
refuses a transform that has it, and ``m2-pretrain`` asks for ``--randaugment none``.

torchvision is imported lazily, only by :func:`load_decode_jpeg`: a GPU cluster's torchvision
wheel matches its CUDA torch; the CPU torch this project pins for development has no matching
torchvision on PyPI (the PyPI wheel is the CUDA build and does not import beside it).
"""

from __future__ import annotations

import io
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from .dataset import BadSampleError
from .transforms import FloatOrSeq, Rng, TrainTransform, _uniform, random_resized_crop_params

__all__ = ["EncodedTrainTransform", "GpuBatchDecoder", "KIND_JPEG", "KIND_PIXELS", "PARAMS",
           "gpu_decode_problem", "load_decode_jpeg", "resized_crop"]

KIND_JPEG, KIND_PIXELS = 0, 1
"""``image_params[:, 0]``: the payload is encoded JPEG bytes / raw RGB pixels (H, W, 3)."""

PARAMS = ("kind", "height", "width", "top", "left", "crop_height", "crop_width", "flip")
"""The columns of a sample's ``image_params`` (int64)."""

_GPU_JPEG_MODES = frozenset({"RGB", "L"})


class EncodedTrainTransform:
    """Worker half of the GPU path: ``f(encoded image bytes, rng) -> {image_data, image_params}``.

    Draws the same parameters from ``rng``, in the same order, as ``TrainTransform`` (crop box,
    then the flip coin), so that the CPU and GPU paths augment a sample alike.
    """

    encoded = True  # ImageTextDataset passes the stored bytes, not a decoded image

    def __init__(self, image_size: int, scale, ratio, hflip: float, mean: FloatOrSeq = 0.5,
                 std: FloatOrSeq = 0.5):
        self.image_size, self.scale, self.ratio = int(image_size), tuple(scale), tuple(ratio)
        self.hflip, self.mean, self.std = float(hflip), mean, std

    @classmethod
    def from_train_transform(cls, t: TrainTransform) -> "EncodedTrainTransform":
        """The GPU-path equivalent of ``t``; ``ValueError`` if ``t`` has RandAugment."""
        if t.randaugment is not None:
            raise ValueError("the GPU decode path does not apply RandAugment "
                             f"({t.randaugment!r}); use the CPU path or no RandAugment")
        return cls(t.crop.size, t.crop.scale, t.crop.ratio, t.hflip, t.mean, t.std)

    def __call__(self, data: bytes, rng: Rng) -> Dict[str, torch.Tensor]:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            width, height = img.size
            jpeg = img.format == "JPEG" and img.mode in _GPU_JPEG_MODES
            if jpeg:
                payload = np.frombuffer(data, dtype=np.uint8).copy()
            else:  # decoded here, as the CPU path decodes it
                payload = np.asarray(img.convert("RGB"), dtype=np.uint8).reshape(-1).copy()
        top, left, h, w = random_resized_crop_params(width, height, self.scale, self.ratio, rng)
        flip = _uniform(rng, 0.0, 1.0) < self.hflip
        params = [KIND_JPEG if jpeg else KIND_PIXELS, height, width, top, left, h, w, int(flip)]
        return {"image_data": torch.from_numpy(payload),
                "image_params": torch.tensor(params, dtype=torch.int64)}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(image_size={self.image_size}, scale={self.scale}, "
                f"ratio={self.ratio}, hflip={self.hflip}, mean={self.mean}, std={self.std})")


def resized_crop(img: torch.Tensor, top: int, left: int, height: int, width: int, size: int,
                 flip: bool) -> torch.Tensor:
    """Crop ``img`` (``uint8 [3, H, W]``), resize it to ``size x size`` (bicubic, antialiased,
    Pillow's filter) and flip it if asked; returns ``float32 [3, size, size]`` holding 8-bit
    values (rounded and clamped to 0..255, as Pillow's 8-bit output)."""
    x = img[:, top:top + height, left:left + width].unsqueeze(0).float()
    # Two passes, each rounded to 8 bits, in Pillow's order: vertical first when it shrinks the
    # image and 2 (width - size) < height - size, horizontal first otherwise (Pillow 13's
    # choice, mapped by experiment over crop shapes). One 2-D pass, or the other order, differs
    # from Pillow by up to ~20 levels where bicubic ringing was clamped between the passes.
    vertical_first = height > size and 2 * (width - size) < height - size
    first = (size, width) if vertical_first else (height, size)
    for shape in (first, (size, size)):
        if tuple(x.shape[-2:]) != shape:
            x = torch.nn.functional.interpolate(x, size=shape, mode="bicubic",
                                                align_corners=False, antialias=True)
            x = x.clamp_(0.0, 255.0).round_()
    x = x[0]
    return x.flip(-1) if flip else x


def _channel(value: FloatOrSeq, like: torch.Tensor):
    if isinstance(value, (int, float)):
        return float(value)
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


Decoder = Callable[[List[torch.Tensor]], List[torch.Tensor]]


def load_decode_jpeg(device: torch.device) -> Decoder:
    """``torchvision.io.decode_jpeg`` on ``device``, batched: a list of encoded ``uint8`` tensors
    to a list of ``uint8 [3, H, W]`` RGB tensors on ``device``."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(data: List[torch.Tensor]) -> List[torch.Tensor]:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))

    return decode


def gpu_decode_problem() -> Optional[str]:
    """Why ``--image-decode gpu`` cannot run in this process (None when it can)."""
    missing = []
    if not torch.cuda.is_available():
        missing.append("no CUDA device is available")
    try:
        import torchvision.io  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a wheel for another torch build raises RuntimeError
        missing.append(f"torchvision does not import ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''})")
    return "; ".join(missing) or None


class GpuBatchDecoder:
    """Main-process half: a collated micro-batch's payloads → normalised ``images`` on ``device``.

    ``decode`` decodes a list of JPEG payloads (default: :func:`load_decode_jpeg` on
    ``device``); tests pass a CPU decoder.
    """

    def __init__(self, image_size: int, mean: FloatOrSeq = 0.5, std: FloatOrSeq = 0.5,
                 device="cuda", decode: Optional[Decoder] = None):
        self.image_size, self.mean, self.std = int(image_size), mean, std
        self.device = torch.device(device)
        self._decode = decode

    @classmethod
    def for_transform(cls, t: EncodedTrainTransform, device="cuda",
                      decode: Optional[Decoder] = None) -> "GpuBatchDecoder":
        return cls(t.image_size, t.mean, t.std, device, decode)

    def images(self, data: torch.Tensor, offsets: torch.Tensor,
               params: torch.Tensor) -> torch.Tensor:
        """``float32 [B, 3, S, S]`` on the device from the packed payloads and parameters."""
        if self._decode is None:
            self._decode = load_decode_jpeg(self.device)
        p = params.tolist()
        o = offsets.tolist()
        jpeg = [i for i, row in enumerate(p) if row[0] == KIND_JPEG]
        decoded: Dict[int, torch.Tensor] = {}
        if jpeg:
            try:
                decoded = dict(zip(jpeg, self._decode([data[o[i]:o[i + 1]] for i in jpeg])))
            except RuntimeError:  # find the culprit: one image at a time
                for i in jpeg:
                    try:
                        decoded[i] = self._decode([data[o[i]:o[i + 1]]])[0]
                    except RuntimeError as e:
                        raise BadSampleError(f"image {i} of the micro-batch does not decode "
                                             f"on the GPU: {e}") from None
        out = torch.empty(len(p), 3, self.image_size, self.image_size, dtype=torch.float32,
                          device=self.device)
        for i, (kind, h, w, top, left, ch, cw, flip) in enumerate(p):
            if kind == KIND_JPEG:
                img = decoded[i].to(self.device)
                if tuple(img.shape[-2:]) != (h, w):
                    raise BadSampleError(f"image {i} of the micro-batch decodes to "
                                         f"{tuple(img.shape)}, its header said {h}x{w}")
            else:
                img = data[o[i]:o[i + 1]].view(h, w, 3).to(self.device).permute(2, 0, 1)
            out[i] = resized_crop(img, top, left, ch, cw, self.image_size, bool(flip))
        out.div_(255.0)
        return out.sub_(_channel(self.mean, out)).div_(_channel(self.std, out))

    def __call__(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Replace ``image_data``/``image_offsets``/``image_params`` of ``batch`` by ``images``."""
        batch["images"] = self.images(batch.pop("image_data"), batch.pop("image_offsets"),
                                      batch.pop("image_params"))
        return batch

