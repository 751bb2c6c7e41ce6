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
    parameter right away (loading weights).
    """
    from megatron.core import parallel_state

    from .transformer_config import to_transformer_config

    config = to_transformer_config(model_cfg, tensor_parallel, pipeline_parallel,
                                   **config_overrides)
    model = M2EncoderModel(
        config,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=True),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=True),
        transformer_impl=transformer_impl, vp_stage=vp_stage)
    if initialize:
        initialize_model(model, seed)
    return model
