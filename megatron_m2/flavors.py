"""Named M2-Encoder flavors and their parameter counts.

:func:`count_parameters` is the parameter count of the full model (TP=1): both branches of both
stacks, embeddings, position tables, the four ITC heads and the two logit scales — the official
inference graph. Counts are computed from the config, without allocating weights.
``m2-plan --list-flavors`` lists the flavors (with ``--json``:
``{flavor: {...config..., "params": N}}``).
"""

from __future__ import annotations

from typing import Dict

from .config import M2ModelConfig

__all__ = ["FLAVORS", "get_flavor", "count_parameters"]

FLAVORS: Dict[str, M2ModelConfig] = {
    # Small enough to train in minutes on a 2-core CPU; every dimension divisible by TP=2 and
    # 6 layers so PP=2 puts the whole VL stack on the last stage.
    "tiny": M2ModelConfig(hidden_size=128, num_attention_heads=4, ffn_hidden_size=512,
                          num_sep_layers=3, num_vl_layers=3, embed_dim=128, image_size=64,
                          patch_size=16, max_text_len=32, vocab_size=8192, eos_token_id=2,
                          cls_token_id=3),
    # The official release's dimensions (its configs/Encoder_{0.4B,1B,10B}.json).
    "0.4b": M2ModelConfig(hidden_size=768, num_attention_heads=12, ffn_hidden_size=3072,
                          num_sep_layers=9, num_vl_layers=3, embed_dim=768),
    "1b": M2ModelConfig(hidden_size=1024, num_attention_heads=16, ffn_hidden_size=4096,
                        num_sep_layers=21, num_vl_layers=3, embed_dim=1024),
    "10b": M2ModelConfig(hidden_size=4096, num_attention_heads=32, ffn_hidden_size=16384,
                         num_sep_layers=21, num_vl_layers=3, embed_dim=1024),
}


def get_flavor(name: str, **overrides) -> M2ModelConfig:
    """A fresh copy of flavor ``name`` with optional field overrides."""
    key = name.lower()
    if key not in FLAVORS:
        raise KeyError(f"unknown flavor {name!r}; choose from {', '.join(FLAVORS)}")
    d = FLAVORS[key].to_dict()
    d.update(overrides)
    return M2ModelConfig.from_dict(d)


def count_parameters(cfg: M2ModelConfig, vocab_rows: int = None) -> int:
    """Parameters of the full model, counted from the architecture (no allocation).

    ``vocab_rows`` overrides the text table's rows (e.g. a TP-padded vocabulary).
    """
    d, f, e = cfg.hidden_size, cfg.ffn_hidden_size, cfg.embed_dim
    ln = 2 * d
    per_branch_layer = (
        4 * (d * d + d)          # q, k, v, out projections
        + (d * f + f)            # fc1
        + (f * d + d)            # fc2
        + 2 * ln                 # pre-attention and pre-FFN LayerNorms
        + ln                     # Sub-LN over the heads (inner_attn_ln)
        + 2 * f                  # Sub-LN over the FFN hidden (ffn_layernorm)
    )
    layers = 2 * cfg.num_layers * per_branch_layer
    final_norms = 2 * 2 * ln     # backbone and VL final LayerNorms, both branches
    vision = cfg.in_channels * cfg.patch_size ** 2 * d + d + 2 * d  # conv + cls + mask tokens
    text = (vocab_rows or cfg.vocab_size) * d
    positions = (cfg.vision_pos_table + cfg.text_pos_table) * d
    heads = 4 * d * e + 2
    return layers + final_norms + vision + text + positions + heads

