"""The objective interface: what a pretraining objective is to the trainer.

An objective says

* **what the model must return**: :attr:`Objective.outputs`, the keys of the last pipeline
  stage's output dict that its loss reads;
* **what it needs from the data**: :attr:`Objective.data_keys`, the keys of a micro-batch;
* **what the model is given**: :meth:`Objective.prepare_batch` turns a loaded micro-batch into
  what the objective needs (masks, targets; once per micro-batch, on every rank, before the
  schedule runs), :meth:`Objective.model_inputs` into the keyword arguments of the model call
  (inputs and :class:`~megatron_m2.model.multiway.PackedLayout`), and
  :meth:`Objective.batch_multiple` says how many model samples one data sample becomes (the
  schedule's micro-batch size, pipeline messages included, is that multiple of ``b``);
* **where it runs in the pipeline**: :attr:`Objective.stage` — ``"last"``: its loss runs on the
  last stage's outputs inside megatron-core's schedule (the only placement today);
* **the loss and its logged metrics**: :meth:`Objective.loss` returns the micro-batch's loss
  and a dict of scalar metrics named by :attr:`Objective.metrics` (averaged over micro-batches
  and data-parallel replicas, logged to the console, JSON and TensorBoard as ``train/<name>``);
* optionally, **a loss over the whole step's micro-batches** (:meth:`Objective.cached_loss`,
  with :attr:`Objective.supports_feature_accumulation`): the trainer then embeds every
  micro-batch without a graph, asks the objective for the loss and the gradient of each cached
  output, and re-runs the micro-batches injecting those gradients (GradCache);
  (:meth:`Objective.residual_loss` is the part of the loss outside :meth:`cached_loss`, added
  in the second phase);
* hooks: :meth:`Objective.after_optimizer_step` (e.g. clamp a temperature) and
  :meth:`Objective.process_groups` (the groups its collectives use, named in failure messages);
* **the length of the packed sequence** of a schedule's micro-batches
  (:meth:`Objective.seq_length`: pipeline messages have that many rows). It follows patch
  dropout (FLIP, ``--image-mask-ratio``), which the default :meth:`Objective.prepare_batch`
  draws (:meth:`Objective.drop_patches`: ``batch["patch_keep_index"]``) and the default
  :meth:`Objective.model_inputs` applies; batches that were not prepared (evaluation) run
  unmasked.

The trainer's step code calls only this interface; objectives are looked up by name in
:mod:`megatron_m2.objectives` (``--objective``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Dict, List, Optional, Tuple

if TYPE_CHECKING:  # torch-free at import: argument parsing lists the objectives
    import torch

__all__ = ["Objective", "ObjectiveContext", "PATCH_KEEP_KEY"]

PATCH_KEEP_KEY = "patch_keep_index"
"""Key of a prepared micro-batch's patch-dropout indices (LongTensor ``[b, k]``, sorted)."""


@dataclass
class ObjectiveContext:
    """What an objective is built from: the run's arguments and this rank's stage of the model
    (unwrapped; its parameters are the trained ones)."""

    args: Any
    model: torch.nn.Module
    is_last_stage: bool
    tokenizer: Any = None
    """The run's :class:`~megatron_m2.data.tokenizer.M2Tokenizer` (None with synthetic data)."""
    is_first_stage: bool = True
    first_model: Any = None
    """This rank's first model chunk (the embeddings, on the first stage) when the pipeline is
    interleaved; None: ``model`` is the only chunk."""

    @property
    def first_chunk(self):
        """The model chunk holding the embeddings on the first stage."""
        return self.first_model if self.first_model is not None else self.model


class Objective:
    """Base class of training objectives (see the module docstring)."""

    name: ClassVar[str] = ""
    outputs: ClassVar[Tuple[str, ...]] = ()
    data_keys: ClassVar[Tuple[str, ...]] = ("images", "text_ids", "text_pad_mask")
    stage: ClassVar[str] = "last"
    metrics: ClassVar[Tuple[str, ...]] = ()
    supports_feature_accumulation: ClassVar[bool] = False
    supports_patch_dropout: ClassVar[bool] = False
    """Whether ``--image-mask-ratio`` works: its batches go through :meth:`drop_patches` (the
    default :meth:`prepare_batch`) and its inputs through the default :meth:`model_inputs`
    (or follow :data:`PATCH_KEEP_KEY` themselves). A subclass that overrides either hook
    without setting it again does not inherit it (``__init_subclass__``)."""
    console_metrics: ClassVar[Tuple[str, ...]] = ()
    """Metrics also printed on the console's step line (all are in the JSON and TensorBoard)."""
    scoring_keys: Tuple[str, ...] = ()
    """Outputs of a contrastive forward (no graph) the objective needs before the step's
    training forward (e.g. patch relevance for attentive masking). Non-empty: the trainer
    computes them for the step's micro-batches (in feature accumulation's first phase when
    there is one, otherwise in a forward-only pass of their own), sends them from the last
    pipeline stage to every stage and hands them to :meth:`apply_scores`."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        overrides = {"prepare_batch", "model_inputs"} & set(vars(cls))
        if overrides and "supports_patch_dropout" not in vars(cls):
            cls.supports_patch_dropout = False  # its own batches may not follow patch dropout

    def __init__(self, ctx: ObjectiveContext):
        self.ctx = ctx

    def prepare_batch(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The micro-batch as this objective uses it (called on every rank, before the
        schedule). ``batch["sample_positions"]`` (LongTensor ``[b]``) holds each sample's
        global position in the run's sample stream (the same on any layout, and after a
        resume): the key of per-sample randomness. Default: patch dropout when the run asks
        for it (:meth:`drop_patches`), otherwise unchanged."""
        return self.drop_patches(batch)

    def drop_patches(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """FLIP's patch dropout (``--image-mask-ratio r``): ``batch`` with
        ``batch[PATCH_KEEP_KEY]``, the ``round((1 - r)·P)`` patches each image keeps
        (:func:`~megatron_m2.data.masking.patch_keep_indices` of ``(seed, sample position)``:
        the same under any layout, after a resume and in both phases of feature accumulation).
        Unchanged when ``r = 0`` or when the samples come after the masked phase
        (``--image-mask-ratio-until-iter N``: positions ``>= N ·`` global batch, i.e. steps
        after N; decided by the micro-batch's first position)."""
        args = self.ctx.args
        ratio = float(getattr(args, "image_mask_ratio", 0.0) or 0.0)
        if not ratio:
            return batch
        positions = batch["sample_positions"].reshape(-1)
        until = getattr(args, "image_mask_ratio_until_iter", None)
        if until is not None and int(positions.min()) >= until * args.global_batch_size:
            return batch
        from ..data.masking import patch_keep_count, patch_keep_indices

        num_patches = self.ctx.model.config.vision_seq_len - 1
        keep = patch_keep_count(num_patches, ratio)
        out = dict(batch)
        out[PATCH_KEEP_KEY] = patch_keep_indices(args.seed, positions.tolist(), num_patches,
                                                 keep)
        return out

    def vision_len(self, batch: Dict[str, torch.Tensor]) -> int:
        """Vision rows of ``batch``'s packed sequence: ``1 + k`` after patch dropout, s_v
        otherwise."""
        keep = batch.get(PATCH_KEEP_KEY)
        return self.ctx.model.config.vision_seq_len if keep is None else 1 + keep.shape[1]

    def seq_length(self, batches: List[Dict[str, torch.Tensor]]) -> int:
        """Rows of the packed sequence the model is given for ``batches``, the micro-batches of
        one schedule (its ``seq_length``: the pipeline's messages have that many rows): vision
        rows (:meth:`vision_len`) + text rows, each part padded to a multiple of TP under
        sequence parallelism (megatron's schedule divides this by TP for the messages of one
        sequence shard). One schedule needs one length."""
        from ..model.sequence_parallel import padded

        config = self.ctx.model.config
        multiple = config.tensor_model_parallel_size if config.sequence_parallel else 1
        lengths = {padded(self.vision_len(b), multiple)
                   + padded(int(b["text_ids"].shape[1]), multiple) for b in batches}
        if len(lengths) != 1:
            raise ValueError(f"the micro-batches of one schedule have sequence lengths "
                             f"{sorted(lengths)}: a step straddles the end of patch dropout "
                             "(--image-mask-ratio-until-iter), e.g. after a resume with another "
                             "--global-batch-size")
        return lengths.pop()

    def apply_scores(self, batches: List[Dict[str, torch.Tensor]],
                     scores: List[Dict[str, torch.Tensor]]) -> None:
        """Complete the prepared micro-batches with the :attr:`scoring_keys` outputs (CPU
        tensors, one dict per micro-batch, on every rank)."""

    def batch_multiple(self, contrastive_only: bool = False) -> int:
        """Model samples per data sample in :meth:`model_inputs` (1: one forward per sample)."""
        return 1

    def model_inputs(self, batch: Dict[str, torch.Tensor], contrastive_only: bool = False
                     ) -> Dict[str, Any]:
        """Keyword arguments of the model call for ``batch`` (every stage is given them; stages
        after the first use only ``text_pad_mask`` and ``layout``). ``contrastive_only``: the
        inputs of the cached outputs (:attr:`outputs`, feature accumulation's first phase).
        Default: images and captions side by side (the contrastive layout), the images'
        dropped patches left out (``keep_index``) when :meth:`prepare_batch` drew them."""
        from ..model.multiway import PackedLayout

        inputs = {"images": batch["images"], "text_ids": batch["text_ids"],
                  "text_pad_mask": batch["text_pad_mask"],
                  "layout": PackedLayout.both(self.vision_len(batch))}
        if PATCH_KEEP_KEY in batch:
            inputs["keep_index"] = batch[PATCH_KEEP_KEY]
        return inputs

    def loss(self, outputs: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor]
             ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``(loss, metrics)`` of one micro-batch from the last stage's outputs (fp32) and the
        prepared micro-batch (:meth:`prepare_batch`: targets)."""
        raise NotImplementedError

    def residual_loss(self, outputs: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor]
                      ) -> Tuple[Optional[torch.Tensor], Dict[str, torch.Tensor]]:
        """With feature accumulation: the micro-batch's loss terms that :meth:`cached_loss`
        does not cover (computed in the second phase from ``model_inputs(batch)``), or
        ``(None, {})``."""
        return None, {}

    def cached_loss(self, cached: List[Dict[str, torch.Tensor]], backward_scale: float
                    ) -> Tuple[torch.Tensor, List[Dict[str, torch.Tensor]],
                               Dict[str, torch.Tensor]]:
        """Loss over the step's cached micro-batch outputs (:attr:`outputs` only, no graph):
        runs its own backward (scaled by ``backward_scale``) for the parameters it uses directly
        and returns ``(loss, grads, metrics)`` with ``grads[i][key]`` the gradient of the
        unscaled loss with respect to micro-batch i's output ``key``."""
        raise NotImplementedError(f"objective {self.name!r} has no feature accumulation")

    def after_optimizer_step(self, optimizer) -> None:
        """Called on every rank after a successful optimizer step."""

    def process_groups(self) -> Dict[str, object]:
        """``{name: process group}`` of the collectives the loss issues."""
        return {}

    def check_fits(self, batch_fields) -> None:
        """Raise ``ConfigError`` when the trainer cannot serve this objective: a batch field the
        data does not provide, or a placement other than the last pipeline stage."""
        from ..errors import ConfigError

        missing = sorted(set(self.data_keys) - set(batch_fields))
        if missing:
            raise ConfigError(f"objective {self.name!r} needs batch field(s) "
                              f"{', '.join(missing)}, which the data does not provide (it "
                              f"gives {', '.join(batch_fields)})")
        if self.stage != "last":
            raise ConfigError(f"objective {self.name!r} runs at stage {self.stage!r}; the "
                              "trainer computes losses on the last pipeline stage only")

    def describe(self) -> str:
        """One line for the start-up log."""
        return self.name
