"""Periodic held-out evaluation during training: image↔text retrieval per language.

For each language the validation split is read with the eval transform (squash-resize, no
augmentation) and the sample's first caption in that language (samples without one are left
out). Every data-parallel rank embeds a contiguous shard through megatron-core's schedule in
forward-only mode (so it works with TP and PP), the VL-head embeddings are gathered on the last
pipeline stage and R@1/5/10 in both directions and the mean recall are computed there, then
shared with every rank for logging.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Dict, List

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = ["Evaluator"]

METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_recall")


class Evaluator:
    """Retrieval on a validation dataset, per language (``en``, ``zh``)."""

    def __init__(self, trainer, prefix: str, languages=("en", "zh"), max_samples: int = 0):
        from megatron.core import parallel_state as ps

        from ..data.dataset import ImageTextDataset
        from ..data.indexed import ImageTextIndexedDataset
        from ..data.transforms import eval_transform

        self.trainer = trainer
        cfg = trainer.cfg
        reader = ImageTextIndexedDataset(prefix)
        n = min(len(reader), max_samples) if max_samples else len(reader)
        self.sets = {}
        for lang in languages:
            idx = [i for i in range(n) if lang in reader.caption_languages(i)]
            if len(idx) < 2:
                continue
            ds = ImageTextDataset(prefix, trainer.tokenizer, eval_transform(cfg.image_size),
                                  cfg.max_text_len, caption_policy=lang, train=False)
            self.sets[lang] = (ds, idx)
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.dp_group = ps.get_data_parallel_group()
        logger.info("evaluation on %s: %s", prefix,
                    ", ".join(f"{k}: {len(v[1])} samples" for k, v in self.sets.items()))

    def _embed(self, ds, indices: List[int]) -> Dict[str, torch.Tensor]:
        """VL-head embeddings of ``indices`` (this DP rank's shard), on the last stage."""
        from .trainer import _embed_step

        t = self.trainer
        mbs = t.args.micro_batch_size
        per_rank = -(-len(indices) // self.dp)
        per_rank = -(-per_rank // mbs) * mbs  # whole micro-batches; padding repeats the last
        mine = indices[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        valid = len(mine)
        mine = mine + [indices[-1]] * (per_rank - len(mine))
        batches = []
        for lo in range(0, per_rank, mbs):
            items = [ds[(i, 0)] for i in mine[lo:lo + mbs]]
            batches.append({k: torch.stack([it[k] for it in items]) for k in
                            ("images", "text_ids", "text_pad_mask")})
        out = t._schedule(partial(_embed_step), batches, forward_only=True)
        if not t.is_last_stage:
            return {}
        img = torch.cat([o["vl_image_feats"] for o in out])
        txt = torch.cat([o["vl_text_feats"] for o in out])
        # Equal shard sizes on every DP rank: gather, then drop the padding.
        valid_t = torch.tensor([valid])
        counts = [torch.zeros_like(valid_t) for _ in range(self.dp)]
        dist.all_gather(counts, valid_t, group=self.dp_group)
        imgs = [torch.empty_like(img) for _ in range(self.dp)]
        txts = [torch.empty_like(txt) for _ in range(self.dp)]
        dist.all_gather(imgs, img.contiguous(), group=self.dp_group)
        dist.all_gather(txts, txt.contiguous(), group=self.dp_group)
        return {"image": torch.cat([x[:int(c)] for x, c in zip(imgs, counts)]),
                "text": torch.cat([x[:int(c)] for x, c in zip(txts, counts)])}

    @torch.no_grad()
    def evaluate(self) -> Dict[str, Dict[str, float]]:
        """``{lang: {metric: %}}``, identical on every rank."""
        from ..eval.retrieval import retrieval_metrics

        t = self.trainer
        t.ddp_model.eval()
        results: Dict[str, Dict[str, float]] = {}
        try:
            for lang, (ds, idx) in self.sets.items():
                emb = self._embed(ds, idx)
                vals = torch.zeros(len(METRICS) + 1, dtype=torch.float64)
                if t.is_logger_rank and emb:
                    n = emb["image"].shape[0]
                    m = retrieval_metrics(emb["image"].float(), emb["text"].float(),
                                          torch.arange(n))
                    vals[:-1] = torch.tensor([m[k] for k in METRICS], dtype=torch.float64)
                    vals[-1] = 1.0
                dist.all_reduce(vals)  # only the logger rank of each DP=0 replica contributes
                vals = vals[:-1] / vals[-1]
                results[lang] = dict(zip(METRICS, vals.tolist()))
        finally:
            t.ddp_model.train()
        return results
