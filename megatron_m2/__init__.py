"""megatron_m2: M2-Encoder bilingual image-text encoders on megatron-core (TP x PP x DP)."""

__version__ = "0.1.0"
