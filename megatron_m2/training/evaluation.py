"""Periodic held-out evaluation during training: image↔text retrieval per language.

The same task as ``m2-eval --task retrieval``
(:func:`megatron_m2.eval.tasks.evaluate_retrieval`) with the model being trained:
:class:`ScheduleEncoder` is an encoder (see :mod:`megatron_m2.eval.tasks`) that embeds through
megatron-core's schedule in forward-only mode, so it works with TP and PP. Every data-parallel
replica embeds its shard of the validation set; the VL-head embeddings stay on the last
pipeline stage, where the ranking runs over the data-parallel group (no rank gathers every
embedding); the figures are then shared with every rank for logging.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, Sequence

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = ["Evaluator", "ScheduleEncoder", "METRICS"]

METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_recall")
IMAGE_KEY, TEXT_KEY = "vl_image_feats", "vl_text_feats"
"""Held-out retrieval uses the VL head, as the release's evaluation does."""


class ScheduleEncoder:
    """The encoder interface of :mod:`megatron_m2.eval.tasks` over the parallel model.

    ``forward_only(batches, keys)`` runs megatron's schedule forward-only over micro-batches
    (``images``, ``text_ids``, ``text_pad_mask``) and returns the outputs named ``keys`` per
    micro-batch on the last stage (``[]`` elsewhere). Inputs are cut into micro-batches of
    ``micro_batch`` (the last one padded by repeating its last row); the other modality of the
    packed sequence is a fixed dummy (image and text attend only within their own part in the
    contrastive layout, so it does not change the embeddings). On other stages the returned
    embeddings are zeros of the right shape, so that every rank runs the same evaluation code.
    """

    def __init__(self, forward_only: Callable, cfg, tokenizer, micro_batch: int,
                 is_last_stage: bool, batches_multiple: int = 1):
        from ..data.transforms import eval_transform

        self.forward_only, self.cfg, self.tokenizer = forward_only, cfg, tokenizer
        self.micro_batch, self.is_last_stage = micro_batch, is_last_stage
        # An interleaved pipeline runs micro-batches in groups of PP: pad the count to that.
        self.batches_multiple = batches_multiple
        self.transform = eval_transform(cfg.image_size)
        self.embed_dim = cfg.embed_dim

    def _dummy_text(self, n: int):
        tok = self.tokenizer
        return tok.pad([[tok.cls_id, tok.eos_id]] * n, self.cfg.max_text_len)

    def _run(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
             key: str) -> torch.Tensor:
        n, mbs = images.shape[0], self.micro_batch
        if n == 0:
            return torch.empty(0, self.embed_dim)
        pad = -n % mbs
        if pad:
            images, ids, mask = (torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])
                                 for x in (images, ids, mask))
        batches = [{"images": images[lo:lo + mbs], "text_ids": ids[lo:lo + mbs],
                    "text_pad_mask": mask[lo:lo + mbs]} for lo in range(0, n + pad, mbs)]
        batches += [batches[-1]] * (-len(batches) % self.batches_multiple)
        out = self.forward_only(batches, (key,))
        if not self.is_last_stage:
            return torch.zeros(n, self.embed_dim)
        emb = torch.cat([o[key] for o in out])[:n].float().cpu()
        return torch.nn.functional.normalize(emb, dim=-1)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        ids, mask = self._dummy_text(pixels.shape[0])
        return self._run(pixels, ids, mask, IMAGE_KEY)

    def _encode_padded(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        size = self.cfg.image_size
        pixels = torch.zeros(ids.shape[0], self.cfg.in_channels, size, size)
        return self._run(pixels, ids, mask, TEXT_KEY)

    def encode_tokens(self, framed: Sequence[Sequence[int]]) -> torch.Tensor:
        return self._encode_padded(*self.tokenizer.pad([list(f) for f in framed],
                                                       self.cfg.max_text_len))

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        return self._encode_padded(*self.tokenizer(list(texts), self.cfg.max_text_len))


class Evaluator:
    """Retrieval on a validation dataset, per language (``en``, ``zh``), through ``encoder``.

    ``report``: this rank's figures are the ones shared (one rank: the last stage's first
    tensor-parallel rank)."""

    def __init__(self, encoder: ScheduleEncoder, prefix: str, languages=("en", "zh"),
                 max_samples: int = 0, report: bool = False):
        from megatron.core import parallel_state as ps

        from ..data.indexed import ImageTextIndexedDataset

        self.encoder, self.prefix, self.max_samples = encoder, prefix, max_samples
        self.report = report
        reader = ImageTextIndexedDataset(prefix)
        n = min(len(reader), max_samples) if max_samples else len(reader)
        counts = {lang: sum(lang in reader.caption_languages(i) for i in range(n))
                  for lang in languages}
        self.languages = [lang for lang, c in counts.items() if c >= 2]
        self.sizes = {lang: counts[lang] for lang in self.languages}
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.dp_group = ps.get_data_parallel_group()
        logger.info("evaluation on %s: %s", prefix,
                    ", ".join(f"{k}: {v} samples" for k, v in self.sizes.items()))

    @torch.no_grad()
    def evaluate(self, model) -> Dict[str, Dict[str, float]]:
        """``{lang: {metric: %}}``, identical on every rank; ``model`` is put in eval mode
        meanwhile."""
        from ..eval.tasks import evaluate_retrieval

        model.eval()
        try:
            found = evaluate_retrieval(
                self.encoder, self.prefix, self.languages, max_samples=self.max_samples,
                shard=(self.dp_rank, self.dp), group=self.dp_group if self.dp > 1 else None)
        finally:
            model.train()
        results: Dict[str, Dict[str, float]] = {}
        for lang in self.languages:
            vals = torch.zeros(len(METRICS) + 1, dtype=torch.float64)
            if self.report and lang in found:
                vals[:-1] = torch.tensor([found[lang][k] for k in METRICS], dtype=torch.float64)
                vals[-1] = 1.0
            dist.all_reduce(vals)  # only the reporting rank contributes
            results[lang] = dict(zip(METRICS, (vals[:-1] / vals[-1]).tolist()))
        return results

    def chance_sizes(self) -> List[int]:
        """Gallery sizes per language (for the chance row)."""
        return list(self.sizes.values())
