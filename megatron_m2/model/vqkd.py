"""The BEiT-v2 VQ-KD visual tokenizer: codebook indices as masked-image-modelling targets.

M2-Encoder's training recipe (``tokenizer_model="beit2_visual_tokenizer"``, codebook 8192 x 32)
labels the masked image patches with the indices a frozen BEiT-v2 VQ-KD tokenizer gives them. Only
the tokenizing half of VQ-KD is needed for that, and this module is that half in plain PyTorch (no
megatron-core, no timm), with the module and parameter names of the reference
(``beit2/modeling_vqkd.py`` of ``microsoft/unilm``) so that its checkpoints load as they are::

    images [B, 3, H, W]
      -> pre-process      "default": x * 255 if max(x) <= 1 (one max over the whole batch), then
                          x / 127.5 - 1 (so [0, 1] or [0, 255] -> [-1, 1]); "imagenet_norm":
                          (x - ImageNet mean) / ImageNet std
      -> encoder          ViT: conv patch embedding, [CLS] + absolute positions (bicubic
                          interpolation of the table for another grid), pre-LN blocks (LayerNorm
                          eps 1e-6, attention with q and v biases and no k bias, GELU MLP,
                          optional layer scale), then ``fc_norm`` (LayerNorm) on the patch tokens
                          (the [CLS] token is dropped)
      -> encode_task_layer  Linear(d, d) -> tanh -> Linear(d, code_dim), in float32
      -> quantize         z = l2-normalised features; index = argmin_k |z|^2 + |e_k|^2 - 2 z.e_k
                          over the codebook rows e_k as stored (``NormEMAVectorQuantizer``)
    -> indices [B, (H / patch) * (W / patch)], row-major over the patch grid

The decoder, its task layer, the distillation teacher and the quantizer's usage statistics serve
VQ-KD's own training only; :meth:`VQKDTokenizer.from_state_dict` accepts and ignores them. It reads
the reference's ``VQKD.state_dict()`` and the ``visual_tokenizer.*`` subtree of a release training
checkpoint (``prefix="visual_tokenizer."``); :func:`load_vqkd_checkpoint` reads either from a file
without unpickling objects. ``tests/model/test_vqkd.py`` checks the indices against the reference
code's on a committed fixture (``tests/fixtures/vqkd``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["VQKDConfig", "VQKDTokenizer", "VQKDStateDictError", "load_vqkd_checkpoint",
           "IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD", "open_visual_tokenizer",
           "VQKD_PREFIXES"]

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
"""Per-channel mean of ``process_type="imagenet_norm"`` (timm's ImageNet default)."""
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
"""Per-channel standard deviation of ``process_type="imagenet_norm"``."""

_PROCESS_TYPES = ("default", "imagenet_norm")
# Sub-trees of the reference's VQKD that tokenizing does not use: accepted and ignored.
_IGNORED_PREFIXES = ("decoder.", "decode_task_layer.", "teacher_model.", "scaling_layer.", "loss")
_IGNORED_KEYS = ("quantize.cluster_size", "quantize.embedding.cluster_size",
                 "quantize.embedding.embed_avg", "quantize.embedding.initted")


class VQKDStateDictError(KeyError):
    """A VQ-KD state dict lacks needed weights, has encoder weights this module does not know,
    or has shapes that do not fit the config. ``missing``, ``unexpected`` and ``mismatched`` list
    the offending keys (without the prefix)."""

    def __init__(self, message: str, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.message = message
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class VQKDConfig:
    """Shape of the tokenizing half of a BEiT-v2 VQ-KD.

    The defaults are BEiT-v2's released tokenizers (``vqkd_encoder_base_decoder_*``: ViT-B/16
    encoder at 224 pixels, 8192 codes of dimension 32), which M2-Encoder's recipe uses, giving a
    14 x 14 grid of targets.

    Attributes:
        img_size: side of the square image the position table was made for.
        patch_size: side of a patch (the patch-embedding convolution's kernel and stride).
        in_chans: image channels.
        embed_dim: encoder width.
        depth: number of encoder blocks.
        num_heads: attention heads (``embed_dim`` must be a multiple).
        mlp_hidden_dim: hidden width of the blocks' MLP; ``None`` means ``4 * embed_dim``.
        layer_norm_eps: epsilon of every encoder LayerNorm.
        layer_scale: blocks carry ``gamma_1``/``gamma_2`` (the reference's ``init_values > 0``;
            its tokenizer factories use 0, i.e. no layer scale).
        codebook_size: number of codebook entries (``n_embed``/``n_code``).
        code_dim: codebook vector dimension (``embed_dim`` of the quantizer, ``code_dim``).
        process_type: input normalisation, ``"default"`` (to [-1, 1], what the reference's
            tokenizers and M2-Encoder's recipe use) or ``"imagenet_norm"``.
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_hidden_dim: Optional[int] = None
    layer_norm_eps: float = 1e-6
    layer_scale: bool = False
    codebook_size: int = 8192
    code_dim: int = 32
    process_type: str = "default"

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of num_heads "
                             f"{self.num_heads}")
        if self.process_type not in _PROCESS_TYPES:
            raise ValueError(f"process_type must be one of {_PROCESS_TYPES}, "
                             f"got {self.process_type!r}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size "
                             f"{self.patch_size}")

    @property
    def grid_size(self) -> int:
        """Patches per side at ``img_size``."""
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patches (codebook indices) per image at ``img_size``."""
        return self.grid_size ** 2

    @property
    def mlp_hidden(self) -> int:
        """The MLP's hidden width (``mlp_hidden_dim`` or ``4 * embed_dim``)."""
        return self.mlp_hidden_dim if self.mlp_hidden_dim is not None else 4 * self.embed_dim

    @classmethod
    def infer(cls, state_dict: Mapping[str, Any], prefix: str = "",
              num_heads: Optional[int] = None, **overrides) -> "VQKDConfig":
        """The config of the weights in ``state_dict`` (keys under ``prefix``), from their shapes.

        Image size, patch size, width, depth, MLP width, layer scale and codebook shape are read
        from the tensors. The head count is not in the weights: ``num_heads`` if given, else
        ``embed_dim // 64`` (64-wide heads, as in every BEiT/ViT size). ``overrides`` set any
        other field (``process_type``, ``layer_norm_eps``).

        Raises:
            VQKDStateDictError: a weight the shapes are read from is missing.
        """
        needed = ["encoder.pos_embed", "encoder.patch_embed.proj.weight",
                  "encoder.blocks.0.mlp.fc1.weight", "quantize.embedding.weight"]
        missing = [k for k in needed if prefix + k not in state_dict]
        if missing:
            raise VQKDStateDictError(
                f"cannot infer the VQ-KD config: missing {[prefix + k for k in missing]}",
                missing=missing)
        pos = state_dict[prefix + "encoder.pos_embed"]
        proj = state_dict[prefix + "encoder.patch_embed.proj.weight"]
        embed_dim, in_chans, patch_size = proj.shape[0], proj.shape[1], proj.shape[-1]
        grid = math.isqrt(pos.shape[1] - 1)
        depth = 0
        while f"{prefix}encoder.blocks.{depth}.norm1.weight" in state_dict:
            depth += 1
        codebook = state_dict[prefix + "quantize.embedding.weight"]
        if num_heads is None:
            num_heads = max(embed_dim // 64, 1)
        mlp_hidden = state_dict[prefix + "encoder.blocks.0.mlp.fc1.weight"].shape[0]
        values = dict(
            img_size=grid * patch_size, patch_size=patch_size, in_chans=in_chans,
            embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            mlp_hidden_dim=None if mlp_hidden == 4 * embed_dim else mlp_hidden,
            layer_scale=prefix + "encoder.blocks.0.gamma_1" in state_dict,
            codebook_size=codebook.shape[0], code_dim=codebook.shape[1])
        names = {f.name for f in fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"unknown VQKDConfig field(s): {sorted(unknown)}")
        values.update(overrides)
        return cls(**values)


class _PatchEmbed(nn.Module):
    def __init__(self, cfg: VQKDConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size,
                              stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _Attention(nn.Module):
    """Multi-head self-attention with separate q and v biases (k has none), as in BEiT."""

    def __init__(self, cfg: VQKDConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.scale = (cfg.embed_dim // cfg.num_heads) ** -0.5
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(cfg.embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(cfg.embed_dim))
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class _Mlp(nn.Module):
    def __init__(self, cfg: VQKDConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_hidden)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, cfg: VQKDConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.attn = _Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.mlp = _Mlp(cfg)
        if cfg.layer_scale:
            self.gamma_1 = nn.Parameter(torch.ones(cfg.embed_dim))
            self.gamma_2 = nn.Parameter(torch.ones(cfg.embed_dim))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gamma_1 is None:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = x + self.gamma_1 * self.attn(self.norm1(x))
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class _Encoder(nn.Module):
    """The VQ-KD encoder: BEiT-v2's ``VisionTransformer`` with mean-pooling layout (``fc_norm``,
    no final ``norm``), no head, returning the normalised patch tokens."""

    def __init__(self, cfg: VQKDConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = _PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.embed_dim))
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth))
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)

    def _positions(self, num_tokens: int, height: int, width: int) -> torch.Tensor:
        """The position table for a ``height`` x ``width`` image: the stored one when the token
        count matches, else its patch rows resized bicubically by the reference's scale factors
        (``interpolate_pos_encoding``: grid + 0.1 over the stored grid, not a target size)."""
        if num_tokens == self.pos_embed.shape[1]:
            return self.pos_embed
        n = self.pos_embed.shape[1] - 1
        side = math.sqrt(n)
        dim = self.pos_embed.shape[-1]
        rows = height // self.cfg.patch_size + 0.1
        cols = width // self.cfg.patch_size + 0.1
        grid = self.pos_embed[:, 1:].reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=(rows / side, cols / side), mode="bicubic")
        if grid.shape[-2:] != (int(rows), int(cols)):
            raise ValueError(f"position interpolation gave a {tuple(grid.shape[-2:])} grid for "
                             f"a {height} x {width} image")
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((self.pos_embed[:, :1], grid), dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _, _, height, width = images.shape
        x = self.patch_embed(images)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self._positions(x.shape[1], height, width)
        for block in self.blocks:
            x = block(x)
        return self.fc_norm(x[:, 1:])


class _Codebook(nn.Module):
    def __init__(self, cfg: VQKDConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.codebook_size, cfg.code_dim),
                                   requires_grad=False)


class _Quantizer(nn.Module):
    """Nearest-codebook lookup of ``NormEMAVectorQuantizer`` (inference: no EMA updates)."""

    def __init__(self, cfg: VQKDConfig):
        super().__init__()
        self.embedding = _Codebook(cfg)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = F.normalize(features, p=2, dim=-1)
        flat = z.reshape(-1, z.shape[-1])
        codebook = self.embedding.weight
        distance = (flat.pow(2).sum(dim=1, keepdim=True) + codebook.pow(2).sum(dim=1)
                    - 2 * torch.einsum("bd,nd->bn", flat, codebook))
        return torch.argmin(distance, dim=1).view(features.shape[:-1])


class VQKDTokenizer(nn.Module):
    """The tokenizing half of BEiT-v2's VQ-KD: images to codebook indices.

    Parameter names are the reference's (``encoder.*``, ``encode_task_layer.*``,
    ``quantize.embedding.weight``). Build it with :meth:`from_state_dict` (or
    :func:`load_vqkd_checkpoint`); a directly constructed one has zero weights. It is a frozen
    target generator: :meth:`from_state_dict` returns it in eval mode without gradients.
    """

    def __init__(self, config: VQKDConfig):
        super().__init__()
        self.config = config
        self.encoder = _Encoder(config)
        self.encode_task_layer = nn.Sequential(
            nn.Linear(config.embed_dim, config.embed_dim), nn.Tanh(),
            nn.Linear(config.embed_dim, config.code_dim))
        self.quantize = _Quantizer(config)
        self.register_buffer("_mean", torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("_std", torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1),
                             persistent=False)

    @property
    def num_patches(self) -> int:
        """Indices per image at the configured image size."""
        return self.config.num_patches

    @property
    def codebook_size(self) -> int:
        """Number of codebook entries (the target vocabulary)."""
        return self.config.codebook_size

    def pre_process(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise images as the reference's ``VQKD.pre_process`` does.

        ``"default"``: a batch whose maximum is <= 1 is taken as [0, 1] and multiplied by 255
        (one maximum over the whole batch, as in the reference), then ``x / 127.5 - 1``: images
        in [0, 1] (float) or [0, 255] (float or uint8) map to [-1, 1]. ``"imagenet_norm"``:
        ``(x - mean) / std`` with :data:`IMAGENET_DEFAULT_MEAN` / :data:`IMAGENET_DEFAULT_STD`.
        The result has the encoder's dtype.
        """
        weight = self.encoder.patch_embed.proj.weight
        x = images.to(weight.device)
        if self.config.process_type == "default":
            if x.max() <= 1.0:
                x = x * 255.0
            x = x / 127.5 - 1.0
        else:
            x = (x - self._mean) / self._std
        return x.to(weight.dtype)

    def encode_features(self, images: torch.Tensor, pre_process: bool = True) -> torch.Tensor:
        """The features the quantizer receives, ``[B, num_patches, code_dim]`` (float32).

        Encoder patch tokens through ``encode_task_layer`` (computed in the task layer's dtype
        with autocast off, as the reference does), before the quantizer's l2-normalisation.
        ``pre_process=False`` takes already normalised images.
        """
        x = self.pre_process(images) if pre_process else images
        tokens = self.encoder(x)
        head = self.encode_task_layer
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            return head(tokens.to(head[-1].weight.dtype))

    def quantize_features(self, features: torch.Tensor) -> torch.Tensor:
        """Nearest codebook indices of ``features`` ``[..., code_dim]`` (LongTensor ``[...]``).

        As ``NormEMAVectorQuantizer``: the features are l2-normalised, the codebook rows are used
        as stored, and the index minimises ``|z|^2 + |e|^2 - 2 z.e`` (the first on ties).
        """
        return self.quantize(features)

    @torch.no_grad()
    def get_codebook_indices(self, images: torch.Tensor) -> torch.Tensor:
        """Codebook indices of ``images`` ``[B, C, H, W]``: LongTensor ``[B, (H/p) * (W/p)]``.

        ``images`` are in [0, 1] or [0, 255] for the default normalisation (see
        :meth:`pre_process`); another size than ``img_size`` uses interpolated positions.
        Indices run row-major over the patch grid, the order of the reference's
        ``get_codebook_indices``.
        """
        features = self.encode_features(images)
        return self.quantize_features(features).view(images.shape[0], -1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`get_codebook_indices`."""
        return self.get_codebook_indices(images)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any], prefix: str = "",
                        config: Optional[VQKDConfig] = None, **infer_kwargs) -> "VQKDTokenizer":
        """A frozen tokenizer (eval mode, no gradients) with the weights of ``state_dict``.

        Reads the keys under ``prefix``: ``""`` for BEiT-v2's own tokenizer weights (the
        reference's ``VQKD.state_dict()``, what its ``.pth`` files hold under ``model``),
        ``"visual_tokenizer."`` for the subtree of a release training checkpoint. Keys outside
        ``prefix`` are not looked at. Under it, the decoder (``decoder.*``,
        ``decode_task_layer.*``), a distillation teacher (``teacher_model.*``,
        ``scaling_layer.*``), ``loss*`` and the quantizer's statistics (``cluster_size``,
        ``embed_avg``, ``initted``) are ignored.

        Args:
            state_dict: mapping of names to tensors (plain tensors only: read files with
                :func:`load_vqkd_checkpoint` or ``torch.load(..., weights_only=True)``).
            prefix: key prefix of the tokenizer's weights.
            config: the architecture; ``None`` infers it from the shapes
                (:meth:`VQKDConfig.infer`, with ``infer_kwargs`` such as ``num_heads``).

        Raises:
            VQKDStateDictError: needed weights missing (named), unknown ``encoder.*`` /
                ``encode_task_layer.*`` / ``quantize.*`` weights (a layout this module does not
                implement, e.g. relative position biases), or shapes that do not fit ``config``.
            ValueError: the codebook was never initialised (``initted`` is 0: the reference
                k-means-initialises it on its first training batch).
        """
        if config is None:
            config = VQKDConfig.infer(state_dict, prefix, **infer_kwargs)
        elif infer_kwargs:
            config = replace(config, **infer_kwargs)
        model = cls(config)
        expected = model.state_dict()
        sub = {k[len(prefix):]: v for k, v in state_dict.items()
               if isinstance(k, str) and k.startswith(prefix)}
        ignored = [k for k in sub if k.startswith(_IGNORED_PREFIXES) or k in _IGNORED_KEYS]
        missing = [k for k in expected if k not in sub]
        unexpected = [k for k in sub if k not in expected and k not in ignored]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} needed key(s): "
                             f"{', '.join(prefix + k for k in missing)}")
            if unexpected:
                parts.append(f"{len(unexpected)} key(s) of a layout this tokenizer does not "
                             f"implement: {', '.join(prefix + k for k in unexpected)}")
            raise VQKDStateDictError("VQ-KD state dict: " + "; ".join(parts),
                                     missing=missing, unexpected=unexpected)
        mismatched = [f"{prefix}{k} {tuple(sub[k].shape)} vs {tuple(v.shape)}"
                      for k, v in expected.items() if tuple(sub[k].shape) != tuple(v.shape)]
        if mismatched:
            raise VQKDStateDictError(
                f"VQ-KD state dict: {len(mismatched)} shape mismatch(es) (checkpoint vs config "
                f"{config}): {', '.join(mismatched)}", mismatched=mismatched)
        initted = sub.get("quantize.embedding.initted")
        if initted is not None and not bool(torch.as_tensor(initted).reshape(-1)[0]):
            raise ValueError(f"VQ-KD state dict: {prefix}quantize.embedding.initted is 0: the "
                             "codebook was never initialised (untrained tokenizer)")
        model.load_state_dict({k: sub[k] for k in expected}, strict=True)
        model.eval()
        model.requires_grad_(False)
        return model


def load_vqkd_checkpoint(path: str, prefix: str = "", config: Optional[VQKDConfig] = None,
                         **infer_kwargs) -> VQKDTokenizer:
    """A :class:`VQKDTokenizer` from a file, read without unpickling objects.

    ``.safetensors`` files are read with safetensors, anything else with
    ``torch.load(path, map_location="cpu", weights_only=True)``; Lightning / DeepSpeed / BEiT-v2
    wrappers (``state_dict``, ``module``, ``model``) and Lightning's ``_forward_module.`` prefix
    are removed (:func:`megatron_m2.checkpoint.official.load_official`). Then
    :meth:`VQKDTokenizer.from_state_dict` with ``prefix`` (``"visual_tokenizer."`` for a release
    training checkpoint), ``config`` and ``infer_kwargs``.
    """
    from ..checkpoint.official import load_official

    state: Dict[str, Any] = load_official(path)
    return VQKDTokenizer.from_state_dict(state, prefix=prefix, config=config, **infer_kwargs)


VQKD_PREFIXES = ("", "visual_tokenizer.", "model.")
"""Where a file's tokenizer weights may sit: BEiT-v2's own files (after the ``model`` wrapper is
removed), a release training checkpoint (``visual_tokenizer.*``), a flattened ``model.*``."""


def open_visual_tokenizer(path: str, num_heads: Optional[int] = None) -> VQKDTokenizer:
    """:func:`load_vqkd_checkpoint` trying each of :data:`VQKD_PREFIXES` (the first that holds
    a complete tokenizer wins). Raises ``ValueError`` naming the file and the first
    prefix's problem when none does."""
    kwargs = {"num_heads": num_heads} if num_heads else {}
    errors = []
    for prefix in VQKD_PREFIXES:
        try:
            return load_vqkd_checkpoint(path, prefix=prefix, **kwargs)
        except (KeyError, ValueError) as e:
            errors.append(f"{prefix or '(no prefix)'}: {e}")
    raise ValueError(f"{path} holds no VQ-KD tokenizer under the prefixes "
                     f"{', '.join(repr(p) for p in VQKD_PREFIXES)} ({errors[0]})")
