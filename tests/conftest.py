"""Session-wide fixtures."""

import pytest


@pytest.fixture(scope="module")
def dist_world_of_one():
    """A gloo world of one with megatron TP=1/PP=1 groups, for single-process model tests."""
    import os

    from megatron_m2.parallel import cpu_compat
    from megatron_m2.parallel import distributed as d
    from tests.helpers.distributed import free_port

    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    was_on = cpu_compat.is_enabled()
    d.init_distributed()
    d.initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        d.destroy()
        if not was_on:
            cpu_compat.disable()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
