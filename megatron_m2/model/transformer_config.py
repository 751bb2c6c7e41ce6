"""megatron-core ``TransformerConfig`` for M2-Encoder."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from megatron.core.transformer import TransformerConfig

from ..config import M2ModelConfig

__all__ = ["M2TransformerConfig", "to_transformer_config"]


@dataclass
class M2TransformerConfig(TransformerConfig):
    """megatron-core ``TransformerConfig`` plus what the multiway layers need to know."""

    vision_seq_len: int = 0
    """Static split point s_v of the packed [vision; text] sequence used in training."""
    num_sep_layers: int = 0
    """Layers whose modules are duplicated per modality; the rest are shared VL layers."""
    m2: Optional[M2ModelConfig] = field(default=None, repr=False)
    """The architecture this config was derived from."""


def to_transformer_config(
    cfg: M2ModelConfig,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    params_dtype: torch.dtype = torch.float32,
    bf16: bool = False,
    use_cpu_initialization: Optional[bool] = None,
    recompute_granularity: Optional[str] = None,
    recompute_method: Optional[str] = None,
    recompute_num_layers: Optional[int] = None,
    sequence_parallel: bool = False,
    **overrides,
) -> M2TransformerConfig:
    """Build the megatron-core config for ``cfg`` at the given TP/PP sizes.

    Weights are set by :mod:`megatron_m2.model.init` (deterministic and independent of the
    parallel layout). megatron's initialisation stays on, with no-op init methods, because it is
    also what tags tensor-parallel weights with their partition attributes.

    ``recompute_granularity="full"`` with ``recompute_method`` (``"uniform"``/``"block"``) and
    ``recompute_num_layers`` turns on megatron's activation recomputation of whole layers
    (``TransformerBlock`` checkpoints layer inputs and re-runs the layers in the backward).
    ``sequence_parallel=True`` (TP > 1) shards the activations between the tensor-parallel
    regions along the sequence (Megatron's sequence parallelism, applied to each modality part
    of the packed sequence: :mod:`megatron_m2.model.sequence_parallel`).

    ``"selective"`` is refused: megatron's selective recompute checkpoints its own core
    attention module, which the M2 layer does not use, so it would silently recompute nothing.
    """
    cfg.validate_parallel(tensor_parallel, pipeline_parallel)
    if sequence_parallel and tensor_parallel < 2:
        raise ValueError("sequence_parallel shards activations across the tensor-parallel "
                         f"group: it needs tensor_parallel >= 2, got {tensor_parallel}")
    if recompute_granularity not in (None, "full"):
        raise ValueError(f"recompute_granularity={recompute_granularity!r}: only 'full' (whole "
                         f"layers) applies to the M2 layer, whose attention is not megatron's")
    if use_cpu_initialization is None:
        use_cpu_initialization = not torch.cuda.is_available()
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.ffn_hidden_size,
        kv_channels=cfg.head_dim,
        layernorm_epsilon=cfg.layernorm_epsilon,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_bias_linear=True,
        gated_linear_unit=False,
        activation_func=torch.nn.functional.gelu,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=torch.bfloat16 if bf16 else params_dtype,
        bf16=bf16,
        autocast_dtype=torch.bfloat16 if bf16 else None,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=True,
        init_method_std=cfg.init_method_std,
        recompute_granularity=recompute_granularity,
        recompute_method=recompute_method,
        recompute_num_layers=recompute_num_layers,
        vision_seq_len=cfg.vision_seq_len,
        num_sep_layers=cfg.num_sep_layers,
        m2=cfg,
    )
    kwargs.update(overrides)
    return M2TransformerConfig(**kwargs)
