"""The M2-Encoder model on megatron-core."""

from .init import initialize_model
from .m2_model import M2EncoderModel
from .multiway import Modality, MultiwayState, PackedLayout

__all__ = ["M2EncoderModel", "initialize_model", "build_model", "Modality", "MultiwayState",
           "PackedLayout"]


def build_model(model_cfg, tensor_parallel: int = 1, pipeline_parallel: int = 1, seed: int = 1234,
                transformer_impl: str = "local", vp_stage=None, initialize: bool = True,
                **config_overrides):
    """Build and initialise this rank's stage of the model (model-parallel groups must exist).

    ``initialize=False`` skips the seeded initialisation, for callers that overwrite every
    parameter right away (loading weights). ``vp_stage`` (with
    ``virtual_pipeline_model_parallel_size`` in ``config_overrides`` and megatron's virtual
    pipeline groups) builds model chunk ``vp_stage`` of this rank (interleaved pipeline).
    """
    from megatron.core import parallel_state

    from .transformer_config import to_transformer_config

    config = to_transformer_config(model_cfg, tensor_parallel, pipeline_parallel,
                                   **config_overrides)
    # With an interleaved pipeline (vp_stage given) only the first chunk of the first rank
    # embeds and only the last chunk of the last rank has the heads.
    virtual = vp_stage is not None
    model = M2EncoderModel(
        config,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=not virtual,
                                                            vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=not virtual,
                                                            vp_stage=vp_stage),
        transformer_impl=transformer_impl, vp_stage=vp_stage)
    if initialize:
        initialize_model(model, seed)
    return model
