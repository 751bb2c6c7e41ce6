"""A deterministic synthetic image–text stream for smoke tests, benchmarks and overfitting checks.

Sample ``i`` is a pure function of ``(seed, i)``: a Gaussian image and a caption
``[CLS] t_1 … t_n <|endoftext|>`` (n varies per sample) padded with the end-of-text id. With
``num_samples`` equal to the global batch size every step sees the same fixed batch, which a
working model must overfit.
"""

from __future__ import annotations

from typing import Dict, Iterator, List

import torch

from ..config import M2ModelConfig

__all__ = ["SyntheticImageText", "collate", "microbatches"]


class SyntheticImageText:
    """Indexable synthetic pairs; ``len`` is ``num_samples``."""

    def __init__(self, cfg: M2ModelConfig, num_samples: int, seed: int = 0):
        if num_samples <= 0:
            raise ValueError("num_samples must be positive")
        self.cfg, self.num_samples, self.seed = cfg, num_samples, seed
        specials = {cfg.eos_token_id, cfg.cls_token_id}
        self._lo = max(specials) + 1 if max(specials) + 1 < cfg.vocab_size - 1 else 0

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        cfg = self.cfg
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i) % self.num_samples)
        image = torch.randn(cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
        n = int(torch.randint(1, cfg.max_text_len - 1, (1,), generator=g))
        body = torch.randint(self._lo, cfg.vocab_size, (n,), generator=g)
        ids = torch.full((cfg.max_text_len,), cfg.eos_token_id, dtype=torch.long)
        ids[0] = cfg.cls_token_id
        ids[1:1 + n] = body
        pad = torch.ones(cfg.max_text_len, dtype=torch.bool)
        pad[:n + 2] = False  # [CLS], the pieces and the first <|endoftext|> are real tokens
        return {"images": image, "text_ids": ids, "text_pad_mask": pad}


def collate(samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Stack a list of samples into a batch dict."""
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def microbatches(dataset, step: int, global_batch: int, micro_batch: int, dp_rank: int,
                 dp_size: int) -> Iterator[Dict[str, torch.Tensor]]:
    """This DP rank's micro-batches of global step ``step``.

    The global batch is samples ``[step·G, (step+1)·G)`` (mod ``len(dataset)``). Micro-batch m
    of DP rank r holds positions ``[m·b·N + r·b, m·b·N + (r+1)·b)``: the N ranks' m-th
    micro-batches together are the m-th contiguous block of the global batch. So the pairs a
    contrastive loss sees together (an ITC group spanning the DP ranks) do not depend on how many
    DP ranks share the work — DP=2 with micro-batch b sees the same blocks as DP=1 with 2b.
    """
    block = micro_batch * dp_size
    for m in range(global_batch // block):
        lo = step * global_batch + m * block + dp_rank * micro_batch
        yield collate([dataset[i % len(dataset)] for i in range(lo, lo + micro_batch)])
