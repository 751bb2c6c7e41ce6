"""Single-process inference: ``M2Encoder`` turns images and captions into embeddings.

::

    from megatron_m2 import M2Encoder

    enc = M2Encoder.from_pretrained("runs/demo")            # a checkpoint dir or a single file
    img = enc.encode_image([Image.open("cat.jpg")])          # [1, D], L2-normalised
    txt = enc.encode_text(["a photo of a cat", "一只猫的照片"])  # [2, D], L2-normalised
    probs = (enc.logit_scale * img @ txt.T).softmax(-1)

The model is the same megatron-core :class:`~megatron_m2.model.M2EncoderModel` that training
runs, built at TP=1 / PP=1. No launcher is needed: when ``torch.distributed`` is not initialised
a private process group of one (in-memory store, no network) is created for megatron-core's
model-parallel state. Inside a job that already initialised ``torch.distributed`` (e.g.
``m2-eval`` under ``torchrun``), the existing world is used with TP=1, PP=1 (every rank a
data-parallel replica).

``path`` may be a training save directory (``--save``; its newest complete checkpoint), one
``iter_N`` checkpoint directory, or a single ``.safetensors`` export (see
:mod:`megatron_m2.checkpoint`). The model configuration and the tokenizer travel with the
weights in all three.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch.nn import functional as F

from .checkpoint import load_model_weights
from .config import M2ModelConfig

logger = logging.getLogger(__name__)

__all__ = ["M2Encoder", "load_model_weights", "ensure_model_parallel"]

ImageLike = Union["PIL.Image.Image", torch.Tensor, str, os.PathLike]  # noqa: F821
HEADS = {"vl": ("vl_image_feats", "vl_text_feats", "logit_vl_scale"),
         "backbone": ("image_feats", "text_feats", "logit_scale")}


@contextlib.contextmanager
def _cpu_layer_while_building():
    """megatron-core's constructors ask for CUDA devices; on a CPU-only machine the CPU
    compatibility layer is on while the model is built and restored to its previous state
    afterwards (the forward never needs it). A no-op on GPUs."""
    from .parallel import cpu_compat

    with cpu_compat.active():
        yield


def ensure_model_parallel() -> None:
    """Make sure ``torch.distributed`` and megatron-core's model-parallel state exist with
    TP=1 and PP=1, creating a private group of one process when nothing is initialised."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if ps.model_parallel_is_initialized():
        tp = ps.get_tensor_model_parallel_world_size()
        pp = ps.get_pipeline_model_parallel_world_size()
        if (tp, pp) != (1, 1):
            raise RuntimeError(
                f"M2Encoder runs the whole model in one process, but megatron-core's "
                f"model-parallel state is already initialised with TP={tp}, PP={pp}")
        return
    with _cpu_layer_while_building():
        ps.initialize_model_parallel(tensor_model_parallel_size=1,
                                     pipeline_model_parallel_size=1)


def _read(path: Union[str, os.PathLike], verify: bool = True):
    """``(state_dict, cfg, tokenizer_bytes, recorded text style)`` from a single file or a
    checkpoint dir, every tensor checked against its recorded checksum (``verify``)."""
    from .checkpoint import read_any

    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint directory or file")
    state, cfg, tok, info = read_any("ours" if os.path.isdir(path) else "single", path,
                                     verify=verify)
    return state, cfg, tok, info.get("text_style")


class M2Encoder:
    """Embeds images and texts with an M2-Encoder (inference only, one process).

    Build it with :meth:`from_pretrained`. Embeddings are L2-normalised float32 tensors on the
    CPU, ``[n, embed_dim]``; rows follow the input order. ``head`` selects the ITC head:
    ``"vl"`` (after the shared vision-language layers, the default and what training
    evaluates) or ``"backbone"``.
    """

    def __init__(self, model, cfg: M2ModelConfig, tokenizer, device: torch.device,
                 dtype: torch.dtype = torch.float32, head: str = "vl", batch_size: int = 64):
        from .data.transforms import eval_transform

        if head not in HEADS:
            raise ValueError(f"head must be one of {sorted(HEADS)}, got {head!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.cfg, self.tokenizer = model, cfg, tokenizer
        self.device, self.dtype, self.head = torch.device(device), dtype, head
        self.batch_size = batch_size
        self.transform = eval_transform(cfg.image_size)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], device: Union[str, torch.device,
                                                                          None] = None,
                        dtype: torch.dtype = torch.float32, head: str = "vl",
                        batch_size: int = 64, tokenizer_model: Optional[str] = None,
                        text_style: Optional[str] = None,
                        verify_checksums: bool = True) -> "M2Encoder":
        """Load a checkpoint directory or a single-file export.

        Args:
            path: a ``--save`` directory, an ``iter_N`` directory or a ``.safetensors`` file.
            device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... (default: CUDA when available).
            dtype: compute dtype of the weights (``torch.bfloat16`` halves memory on GPUs).
            head: ``"vl"`` or ``"backbone"``.
            batch_size: images or texts per forward pass.
            tokenizer_model: a SentencePiece model to use instead of the one stored with the
                weights (required when the checkpoint has none and text is encoded).
            text_style: how raw text is tokenized, ``"official"`` or ``"normalized"``
                (:data:`~megatron_m2.data.tokenizer.TEXT_STYLES`). Default: the style recorded
                with the checkpoint's tokenizer (the one its training data was made in), else
                the tokenizer model's default (``official`` for the release's GLM tokenizer).
            verify_checksums: check every tensor against the checksum recorded when it was
                written (a corrupt file raises
                :class:`~megatron_m2.checkpoint.IntegrityError` naming it); False skips
                the hashing.
        """
        from .data.tokenizer import M2Tokenizer
        from .model import build_model

        state, cfg, tok_bytes, recorded_style = _read(path, verify_checksums)
        tokenizer = None
        if tokenizer_model is not None:
            tokenizer = M2Tokenizer(tokenizer_model, max_length=cfg.max_text_len,
                                    text_style=text_style)
        elif tok_bytes is not None:
            tokenizer = M2Tokenizer.from_bytes(tok_bytes, max_length=cfg.max_text_len,
                                               name=f"{path}:tokenizer",
                                               text_style=text_style or recorded_style)
        if tokenizer is not None and tokenizer.vocab_size != cfg.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but the model "
                             f"{path} was trained with vocab_size={cfg.vocab_size}")
        device = torch.device(device if device is not None else
                              ("cuda" if torch.cuda.is_available() else "cpu"))
        ensure_model_parallel()
        with _cpu_layer_while_building():
            model = build_model(cfg, 1, 1, initialize=False)  # every weight is loaded next
        load_model_weights(model, state, source=str(path))
        model = model.to(device=device, dtype=dtype).eval()
        logger.info("M2Encoder: %s on %s (%s), %d parameters", path, device, dtype,
                    sum(p.numel() for p in model.parameters()))
        return cls(model, cfg, tokenizer, device, dtype, head, batch_size)

    # -- properties --------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        """Width of the embeddings."""
        return self.cfg.embed_dim

    @property
    def logit_scale(self) -> float:
        """The trained inverse temperature of the selected head (``exp`` of the clamped
        log-scale), to turn cosine similarities into logits."""
        from .loss import LOGIT_SCALE_MAX

        log_scale = float(getattr(self.model, HEADS[self.head][2]).detach())
        return math.exp(min(log_scale, LOGIT_SCALE_MAX))

    # -- encoding ----------------------------------------------------------------------------
    def _image_tensor(self, image: ImageLike) -> torch.Tensor:
        from PIL import Image

        if isinstance(image, (str, os.PathLike)):
            try:
                with Image.open(image) as im:
                    return self.transform(im)
            except OSError as e:
                raise ValueError(f"cannot read image {image}: {e}") from None
        if isinstance(image, torch.Tensor):
            size = self.cfg.image_size
            if image.dim() != 3 or tuple(image.shape) != (3, size, size):
                raise ValueError(f"image tensors must be preprocessed [3, {size}, {size}] "
                                 f"(see M2Encoder.transform), got {tuple(image.shape)}")
            return image.float()
        if isinstance(image, Image.Image):
            return self.transform(image)
        raise TypeError(f"unsupported image type {type(image).__name__}: expected a PIL "
                        "image, a path or a preprocessed tensor")

    def _need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise RuntimeError("this checkpoint carries no tokenizer: pass tokenizer_model= to "
                               "M2Encoder.from_pretrained")

    def _batches(self, items: Sequence, batch_size: Optional[int]) -> Iterable[Sequence]:
        b = batch_size or self.batch_size
        for lo in range(0, len(items), b):
            yield items[lo:lo + b]

    @torch.inference_mode()
    def encode_image(self, images: Union[ImageLike, Sequence[ImageLike]],
                     batch_size: Optional[int] = None) -> torch.Tensor:
        """L2-normalised embeddings ``[n, D]`` of PIL images, image paths or preprocessed
        ``[3, S, S]`` tensors (a ``[n, 3, S, S]`` batch is accepted too)."""
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            images = list(images)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        out: List[torch.Tensor] = []
        key = HEADS[self.head][0]
        for chunk in self._batches(images, batch_size):
            x = torch.stack([self._image_tensor(im) for im in chunk])
            feats = self.model(images=x.to(self.device, self.dtype))
            if key not in feats:
                raise RuntimeError(f"the model returned no {key!r} (head {self.head!r})")
            out.append(F.normalize(feats[key].float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)

    @torch.inference_mode()
    def encode_text(self, texts: Union[str, Sequence[str]],
                    batch_size: Optional[int] = None) -> torch.Tensor:
        """L2-normalised embeddings ``[n, D]`` of captions (English, Chinese or mixed).

        Captions are tokenized in the tokenizer's text style, as the training data was (the
        official release's exact tokenisation for its models), and truncated to the model's
        text length at the end that style keeps.
        """
        self._need_tokenizer()
        if isinstance(texts, str):
            texts = [texts]
        out: List[torch.Tensor] = []
        key = HEADS[self.head][1]
        for chunk in self._batches(list(texts), batch_size):
            ids, pad = self.tokenizer(chunk, max_length=self.cfg.max_text_len)
            feats = self.model(text_ids=ids.to(self.device),
                               text_pad_mask=pad.to(self.device))
            out.append(F.normalize(feats[key].float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)

    @torch.inference_mode()
    def encode_tokens(self, framed: Sequence[Sequence[int]],
                      batch_size: Optional[int] = None) -> torch.Tensor:
        """Embeddings of already tokenized captions: ``[CLS] ... <|endoftext|>`` id lists, as
        stored in an indexed dataset (no tokenizer needed)."""
        self._need_tokenizer()
        out: List[torch.Tensor] = []
        key = HEADS[self.head][1]
        for chunk in self._batches(list(framed), batch_size):
            ids, mask = self.tokenizer.pad(chunk, self.cfg.max_text_len)
            feats = self.model(text_ids=ids.to(self.device), text_pad_mask=mask.to(self.device))
            out.append(F.normalize(feats[key].float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)

    # -- export ------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Canonical weights (TP=1 names, vocabulary unpadded), on the CPU."""
        from .checkpoint import strip_vocab_padding
        from .model.init import iter_canonical_params

        return {name: strip_vocab_padding(name, p.detach().cpu(), self.cfg).contiguous()
                for _, name, p in iter_canonical_params(self.model)}

    def save_single_file(self, path: Union[str, os.PathLike],
                         dtype: Optional[torch.dtype] = None) -> Path:
        """Write the weights, config and tokenizer as one ``.safetensors`` file for serving."""
        from .checkpoint import save_single_file

        tok = self.tokenizer.model_bytes() if self.tokenizer is not None else None
        style = self.tokenizer.text_style if self.tokenizer is not None else None
        save_single_file(str(path), self.state_dict(), self.cfg, tokenizer_bytes=tok,
                         dtype=dtype, text_style=style)
        return Path(path)

    def __repr__(self) -> str:
        return (f"M2Encoder(embed_dim={self.embed_dim}, image_size={self.cfg.image_size}, "
                f"head={self.head!r}, device={self.device}, dtype={self.dtype})")
