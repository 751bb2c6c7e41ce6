"""megatron_m2: M2-Encoder bilingual image-text encoders on megatron-core (TP x PP x DP).

``from megatron_m2 import M2Encoder`` gives the inference API (:mod:`megatron_m2.inference`);
it is imported on first use so that torch-free tools (argument checking, preprocessing) start
without torch.
"""

from .version import __version__

__all__ = ["M2Encoder", "__version__"]


def __getattr__(name):
    if name == "M2Encoder":
        from .inference import M2Encoder

        return M2Encoder
    raise AttributeError(f"module 'megatron_m2' has no attribute {name!r}")
