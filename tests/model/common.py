"""Shared model-test fixtures: a tiny architecture, a deterministic batch, a probe loss."""

import torch

from megatron_m2.config import M2ModelConfig

# Small but with every dimension divisible by TP=2, several heads per rank, 2 + 2 layers.
TINY = M2ModelConfig(hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                     num_sep_layers=2, num_vl_layers=2, embed_dim=32, image_size=32,
                     patch_size=16, vocab_size=1001, max_text_len=8, eos_token_id=2,
                     cls_token_id=1)


def make_batch(cfg: M2ModelConfig, batch: int = 3, seed: int = 0):
    """Images, token ids and a padding mask with captions of different lengths."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    ids = torch.randint(3, cfg.vocab_size, (batch, cfg.max_text_len), generator=g)
    ids[:, 0] = cfg.cls_token_id
    pad = torch.zeros(batch, cfg.max_text_len, dtype=torch.bool)
    for i in range(batch):
        n = cfg.max_text_len - 2 * i  # first caption full length, later ones padded
        if n < cfg.max_text_len:
            ids[i, n:] = cfg.eos_token_id
            pad[i, n + 1:] = True
    return images, ids, pad


def probe_loss(out) -> torch.Tensor:
    """A fixed random linear functional of every output, so every trainable weight gets a
    non-trivial gradient (including both logit scales)."""
    g = torch.Generator().manual_seed(99)
    loss = out["logit_scale"] * 0.3 + out["logit_vl_scale"] * 0.7
    for k in ("image_feats", "text_feats", "vl_image_feats", "vl_text_feats"):
        loss = loss + (out[k] * torch.randn(out[k].shape, generator=g)).sum()
    return loss


def gather_full(param: torch.Tensor, name: str, tp_group, cfg) -> torch.Tensor:
    """Gather a TP-sharded tensor (or its gradient carrying the same attributes) to its full
    TP=1 shape, dropping vocabulary padding rows."""
    t = param.detach()
    if getattr(param, "tensor_model_parallel", False):
        world = torch.distributed.get_world_size(tp_group)
        parts = [torch.empty_like(t) for _ in range(world)]
        torch.distributed.all_gather(parts, t.contiguous(), group=tp_group)
        t = torch.cat(parts, dim=param.partition_dim)
    if name.endswith("embeddings.text_embed.weight"):
        t = t[: cfg.vocab_size]
    return t
