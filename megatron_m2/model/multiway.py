"""Multiway building blocks: per-modality branches on a packed [vision; text] sequence.

A training micro-batch is one tensor ``[s_v + s_t, b, d]``: vision tokens (CLS + patches) followed
by text tokens. A multiway module owns two copies of its weights, branch ``A`` (vision) and branch
``B`` (text), and applies ``A`` to the vision rows and ``B`` to the text rows. In the shared VL
layers (``shared=True``) branch ``A`` serves both modalities and ``B`` is carried only so that
official checkpoints round-trip; its parameters are frozen (``requires_grad=False``) so that the
optimizer neither decays nor updates weights that never see data.

Which rows are which is runtime state with one source of truth: the :class:`MultiwayState` that
:class:`~megatron_m2.model.m2_model.M2EncoderModel` owns. The model creates it, hands the same
object to every multiway module of its stage when it builds them (through the layer specs), and
sets its :class:`PackedLayout` once at the start of each forward: both modalities with s_v vision
rows in training, :meth:`PackedLayout.vision_only` / :meth:`PackedLayout.text_only` for
single-modality inference. Modules only read it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, List, NamedTuple, Optional

import torch
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from .sequence_parallel import SequenceSharding

__all__ = ["Modality", "PackedLayout", "MultiwayState", "Part", "MultiwayWrapper", "TPLayerNorm",
           "MultiwayLayerNorm"]


class Modality(enum.Enum):
    """What a packed sequence (or one part of it) holds."""

    VISION = "vision"
    TEXT = "text"
    BOTH = "both"


@dataclass(frozen=True)
class PackedLayout:
    """Which rows of a packed ``[vision; text]`` sequence hold which modality.

    * ``vision_only()``: every row is a vision token (image-only inference);
    * ``text_only()``: every row is a text token (text-only inference);
    * ``both(vision_len)``: rows ``[:vision_len]`` are vision tokens, the rest text (training,
      with ``vision_len`` = s_v); attention is block-diagonal (each modality attends itself);
    * ``fused(vision_len)``: the same rows, but ``full_attention``: every token attends to every
      vision token and every unpadded text token (the fused image–text pass of the masked
      objectives). The multiway split of the weights is unchanged;
    * ``mixed(vision_len, c)``: one batch holding both passes: samples ``[:c]`` (batch
      columns) attend block-diagonally (the contrastive pass), samples ``[c:]`` attend fully
      (the fused pass). ``full_attention`` with ``contrastive_batch = c``; a training step that
      adds masked objectives to GBA-ITC runs every micro-batch in this layout, so that one
      schedule (and activation recomputation) sees one layout.
    """

    modality: Modality
    vision_len: int = 0
    full_attention: bool = False
    contrastive_batch: int = 0

    def __post_init__(self):
        if not isinstance(self.modality, Modality):
            raise TypeError(f"modality must be a Modality, got {self.modality!r}")
        if self.modality is Modality.BOTH and self.vision_len < 1:
            raise ValueError(f"a layout with both modalities needs vision_len >= 1, got "
                             f"{self.vision_len}")
        if self.modality is not Modality.BOTH and self.vision_len != 0:
            raise ValueError(f"vision_len is only for Modality.BOTH (got {self.vision_len} "
                             f"with {self.modality})")
        if self.full_attention and self.modality is not Modality.BOTH:
            raise ValueError(f"full_attention (the fused pass) needs both modalities, got "
                             f"{self.modality}")
        if self.contrastive_batch < 0 or (self.contrastive_batch and not self.full_attention):
            raise ValueError(f"contrastive_batch={self.contrastive_batch} is only for a mixed "
                             "layout (full_attention, contrastive_batch >= 0)")

    @classmethod
    def vision_only(cls) -> "PackedLayout":
        return cls(Modality.VISION)

    @classmethod
    def text_only(cls) -> "PackedLayout":
        return cls(Modality.TEXT)

    @classmethod
    def both(cls, vision_len: int) -> "PackedLayout":
        return cls(Modality.BOTH, int(vision_len))

    @classmethod
    def fused(cls, vision_len: int) -> "PackedLayout":
        """Both modalities (``vision_len`` vision rows) with full attention across them."""
        return cls(Modality.BOTH, int(vision_len), full_attention=True)

    @classmethod
    def mixed(cls, vision_len: int, contrastive_batch: int) -> "PackedLayout":
        """Samples ``[:contrastive_batch]`` in the contrastive pass (block-diagonal attention),
        the rest in the fused pass; ``mixed(s_v, 0)`` is ``fused(s_v)``."""
        return cls(Modality.BOTH, int(vision_len), full_attention=True,
                   contrastive_batch=int(contrastive_batch))

    @property
    def has_contrastive(self) -> bool:
        """Whether some samples run the contrastive pass (block-diagonal attention)."""
        return not self.full_attention or self.contrastive_batch > 0

    def vision_rows(self, seq_len: int) -> int:
        """How many of the first rows of a ``seq_len``-row sequence are vision tokens."""
        if self.modality is Modality.VISION:
            return seq_len
        if self.modality is Modality.TEXT:
            return 0
        return min(self.vision_len, seq_len)


@dataclass(eq=False)
class MultiwayState:
    """The runtime state of one forward pass of one model stage, shared by reference.

    One object per :class:`~megatron_m2.model.m2_model.M2EncoderModel`, created by it and passed
    to every multiway module of the stage at construction; only the model writes ``layout``
    (once per forward, :meth:`begin`).

    It also carries the backbone output to the backbone ITC heads: the first VL layer
    (:class:`~megatron_m2.model.layer_specs.M2VLEntryLayer`) hands the normalised input of the
    VL stack to :meth:`record_backbone`, and the model takes it with :meth:`take_backbone` after
    the block has run. Recording is open only between :meth:`begin` and :meth:`take_backbone`
    on a stage that has the backbone heads (``capture_backbone``): calls of the layer outside a
    forward of the model (a direct call, the re-run of activation recomputation during the
    backward) record nothing and keep no tensor alive.
    """

    layout: PackedLayout
    capture_backbone: bool = False
    sharding: Optional["SequenceSharding"] = None
    """With sequence parallelism: how this forward's sequence is split across the TP group
    (:mod:`~megatron_m2.model.sequence_parallel`); the modules see one rank's shard."""
    _backbone: Optional[torch.Tensor] = field(default=None, repr=False)
    _recording: bool = field(default=False, repr=False)

    def begin(self, layout: PackedLayout, sharding: Optional["SequenceSharding"] = None
              ) -> None:
        """Start a forward pass over a sequence of ``layout`` (called by the model), sharded
        as ``sharding`` says under sequence parallelism."""
        if not isinstance(layout, PackedLayout):
            raise TypeError(f"layout must be a PackedLayout, got {layout!r}")
        self.layout = layout
        self.sharding = sharding
        self._backbone = None
        # The fused pass has no backbone heads: nothing to record (a mixed batch records the
        # whole batch; the model keeps its contrastive samples).
        self._recording = self.capture_backbone and layout.has_contrastive

    def vision_rows(self, rows: int) -> int:
        """How many of the first ``rows`` rows of the sequence the modules are given are
        vision tokens: the layout's split, or with sequence parallelism the shard's."""
        if self.sharding is not None:
            return min(self.sharding.local_vision, rows)
        return self.layout.vision_rows(rows)

    @property
    def vision_pad(self) -> int:
        """Padding rows at the end of the (whole) vision part: 0 without sequence
        parallelism."""
        return self.sharding.vision_pad if self.sharding is not None else 0

    def record_backbone(self, hidden: torch.Tensor) -> None:
        """The backbone output ``[s, b, d]`` (called by the first VL layer)."""
        if self._recording:
            self._backbone = hidden

    def take_backbone(self) -> Optional[torch.Tensor]:
        """The backbone output recorded in this forward (None if none), then forget it."""
        hidden, self._backbone, self._recording = self._backbone, None, False
        return hidden


class Part(NamedTuple):
    """One part of the packed sequence: the branch that processes it, its rows, what it holds."""

    branch: str
    rows: torch.Tensor
    modality: Modality


def _require_state(state, who: str) -> MultiwayState:
    if not isinstance(state, MultiwayState):
        raise TypeError(f"{who} needs the model's MultiwayState (state=...), got {state!r}; "
                        f"build it through M2EncoderModel or get_m2_block_spec(..., state=)")
    return state


def _first(out):
    """megatron linears return ``(output, bias)``; plain modules return a tensor."""
    return out[0] if isinstance(out, tuple) else out


class MultiwayWrapper(nn.Module):
    """Two copies (``A``, ``B``) of a module applied to the two parts of the packed sequence.

    Args:
        factory: builds one branch; called twice.
        state: the model's :class:`MultiwayState` (the layout of the current forward).
        shared: apply ``A`` to the whole sequence and freeze ``B`` (shared VL expert).
    """

    def __init__(self, factory: Callable[[], nn.Module], *, state: MultiwayState,
                 shared: bool = False):
        super().__init__()
        self.A = factory()
        self.B = factory()
        self.shared = shared
        # A plain attribute (not a module, no parameters): the object the model owns.
        self.state = _require_state(state, type(self).__name__)
        if shared:
            for p in self.B.parameters():
                p.requires_grad_(False)

    def parts(self, x: torch.Tensor) -> List[Part]:
        """The packed sequence cut where the current layout says, each part paired with the
        branch that processes it (``A`` for both parts when shared) and its modality.

        Blocks that chain several multiway modules (attention, MLP) cut once, run every module
        of a branch on its part and concatenate once, instead of a cut and a concatenation
        around each module. Parts are made with one ``torch.split`` (see :meth:`forward`).
        """
        s = self.state.vision_rows(x.shape[0])
        if s >= x.shape[0]:
            return [Part("A", x, Modality.VISION)]
        if s <= 0:
            return [Part("A" if self.shared else "B", x, Modality.TEXT)]
        xa, xb = torch.split(x, [s, x.shape[0] - s], dim=0)
        return [Part("A", xa, Modality.VISION),
                Part("A" if self.shared else "B", xb, Modality.TEXT)]

    def branch(self, key: str) -> nn.Module:
        """Branch ``"A"`` or ``"B"`` (as named by :meth:`parts`)."""
        return self.A if key == "A" else self.B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.state.vision_rows(x.shape[0])
        if self.shared or s >= x.shape[0]:
            return _first(self.A(x))
        if s <= 0:
            return _first(self.B(x))
        # One split node rather than two slices: its backward concatenates the two gradients,
        # where two slices would each scatter into a zero-filled full-size tensor and then add.
        xa, xb = torch.split(x, [s, x.shape[0] - s], dim=0)
        return torch.cat([_first(self.A(xa)), _first(self.B(xb))], dim=0)


class _ShardedLayerNorm(torch.autograd.Function):
    """LayerNorm over a feature dimension sharded across ``group``, saving little for backward.

    Forward (fp32 arithmetic for bf16/fp16/fp32 inputs, fp64 for fp64): ``mean`` from
    all-reduced partial sums, then the centred second moment the same way (two passes, as
    accurate as a local LayerNorm), ``y = (x - mean) * rstd * w + b``.

    Saved for backward: the input as given (bf16 under mixed precision) and the per-token
    ``mean`` and ``rstd`` (fp32), as a fused LayerNorm kernel does. Autograd through the
    elementwise ops would instead keep two fp32 copies of the shard (the centred input and the
    normalised output), enough to make TP=2 save almost no activation memory.

    Backward, with ``x̂ = (x - mean) * rstd``, ``g = dy * w`` and full-width means ``⟨·⟩``::

        dx = rstd * (g - ⟨g⟩ - x̂ * ⟨g x̂⟩)      dw = Σ dy x̂      db = Σ dy

    ``⟨g⟩`` and ``⟨g x̂⟩`` need the other ranks' features: one all-reduce of both partial sums.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, group, full_size: int, eps: float):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        n = float(full_size)
        s1 = xf.sum(-1, keepdim=True)
        torch.distributed.all_reduce(s1, group=group)
        mean = s1 / n
        xc = xf - mean
        s2 = (xc * xc).sum(-1, keepdim=True)
        torch.distributed.all_reduce(s2, group=group)
        rstd = torch.rsqrt(s2 / n + eps)
        y = xc * rstd
        out = (y * weight.to(xf.dtype) + bias.to(xf.dtype)).to(x.dtype)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.group, ctx.full_size = group, full_size
        ctx.bias_dtype = bias.dtype
        return out

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dyf = dy.to(mean.dtype)
        xhat = (x.to(mean.dtype) - mean) * rstd
        g = dyf * weight.to(mean.dtype)
        sums = torch.cat([g.sum(-1, keepdim=True), (g * xhat).sum(-1, keepdim=True)], dim=-1)
        torch.distributed.all_reduce(sums, group=ctx.group)
        sums = sums / float(ctx.full_size)
        dx = rstd * (g - sums[..., :1] - xhat * sums[..., 1:])
        lead = tuple(range(dy.dim() - 1))
        dw = (dyf * xhat).sum(lead)
        db = dyf.sum(lead)
        return dx.to(x.dtype), dw.to(weight.dtype), db.to(ctx.bias_dtype), None, None, None


class TPLayerNorm(nn.Module):
    """LayerNorm over a dimension that may be sharded across the tensor-parallel group.

    With ``sharded=True`` each rank holds ``normalized_size / tp`` features of every token (the
    heads a rank owns, or its slice of the FFN hidden). Mean and variance are computed over the
    full width by all-reducing partial sums across the TP group, and the backward all-reduces
    the two partial sums the input gradient needs (:class:`_ShardedLayerNorm`: two small fp32
    all-reduces forward, one backward; it saves the input and two fp32 statistics per token).
    Weight and bias are sharded like the input and carry megatron's TP attributes
    (partition_dim 0), so checkpoints and gradient-norm computation treat them like any
    TP-sharded parameter.
    """

    def __init__(self, normalized_size: int, eps: float, tp_group=None, sharded: bool = False,
                 params_dtype=torch.float32, device=None):
        super().__init__()
        self.tp_group = tp_group
        self.tp_size = torch.distributed.get_world_size(tp_group) if (
            sharded and tp_group is not None) else 1
        if normalized_size % self.tp_size:
            raise ValueError(f"width {normalized_size} not divisible by TP size {self.tp_size}")
        self.full_size = normalized_size
        self.local_size = normalized_size // self.tp_size
        self.eps = eps
        self.sharded = sharded
        self.weight = nn.Parameter(torch.ones(self.local_size, dtype=params_dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(self.local_size, dtype=params_dtype, device=device))
        if sharded:
            for p in (self.weight, self.bias):
                set_tensor_model_parallel_attributes(p, is_parallel=True, dim=0, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return nn.functional.layer_norm(x, (self.local_size,), self.weight, self.bias, self.eps)
        return _ShardedLayerNorm.apply(x, self.weight, self.bias, self.tp_group, self.full_size,
                                       self.eps)


class MultiwayLayerNorm(MultiwayWrapper):
    """Per-modality LayerNorm with megatron's norm constructor signature.

    Built by ``TransformerLayer``/``TransformerBlock`` as ``(config, hidden_size, eps)``;
    ``shared`` and ``state`` come from the ModuleSpec params.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, shared: bool = False,
                 state: Optional[MultiwayState] = None):
        super().__init__(
            lambda: TPLayerNorm(hidden_size, eps, params_dtype=config.params_dtype,
                                device=_init_device(config)),
            state=state, shared=shared)
        # Under sequence parallelism each TP rank normalises its own shard of the tokens: the
        # weights' gradients are partial sums, added across TP by megatron's
        # finalize_model_grads (which reads this attribute).
        if getattr(config, "sequence_parallel", False):
            for p in self.parameters():
                p.sequence_parallel = True


def _init_device(config) -> Optional[torch.device]:
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())
