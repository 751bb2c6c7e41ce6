"""The CPU compatibility layer: what it rewrites, that it is off on CUDA, and that it undoes."""

import pytest
import torch

from megatron_m2.parallel import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")


@pytest.fixture
def compat():
    was_on = cpu_compat.is_enabled()
    cpu_compat.enable()
    yield
    if not was_on:
        cpu_compat.disable()


def test_cuda_placements_become_cpu(compat):
    for dev in ("cuda", "cuda:0", torch.device("cuda"), 0, torch.cuda.current_device()):
        t = torch.zeros(2, device=dev)
        assert t.device.type == "cpu"
    x = torch.ones(3)
    assert x.cuda() is x
    assert x.to("cuda").device.type == "cpu"
    assert x.to(torch.float64).dtype == torch.float64  # dtype-only .to untouched
    assert x.type() == "torch.cuda.FloatTensor"  # megatron's optimizer asserts this name
    assert x.type(torch.float64).dtype == torch.float64  # conversions still convert
    torch.cuda.synchronize()
    with torch.cuda.stream(torch.cuda.Stream()):
        pass


def test_disable_restores_torch():
    was_on = cpu_compat.is_enabled()
    cpu_compat.enable()
    cpu_compat.disable()
    assert not cpu_compat.is_enabled()
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")
    assert torch.ones(1).type() == "torch.FloatTensor"
    if was_on:
        cpu_compat.enable()


def test_megatron_clip_grad_runs_on_cpu(compat):
    """The unmodified megatron gradient-clipping code (hard-coded to CUDA) runs and is right."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=5.0)
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8, 0.0, 0.0]), rtol=1e-5, atol=1e-6)


def test_suspended_and_exempt(compat):
    with cpu_compat.suspended():
        with pytest.raises((RuntimeError, AssertionError)):
            torch.zeros(1, device="cuda")  # the layer is off inside
    assert torch.zeros(1, device="cuda").device.type == "cpu"  # and back on after

    @cpu_compat.exempt
    def make():
        return torch.ones(2).type()

    assert make() == "torch.FloatTensor"
    assert torch.ones(2).type() == "torch.cuda.FloatTensor"
