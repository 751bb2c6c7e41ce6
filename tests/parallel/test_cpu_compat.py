"""The CPU compatibility layer: what it rewrites, that it is off on CUDA, and that it undoes;
its context API (active / suspended / exempt_optimizer, enable / disable on top of them)."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from megatron_m2.parallel import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")


@pytest.fixture
def compat():
    with cpu_compat.active():
        yield


def _on() -> bool:
    """Whether this thread's torch calls go through the layer right now."""
    return torch.ones(1).type() == "torch.cuda.FloatTensor"


class _PassThroughMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


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


def test_suspended(compat):
    with cpu_compat.suspended():
        with pytest.raises((RuntimeError, AssertionError)):
            torch.zeros(1, device="cuda")  # the layer is off inside
        assert cpu_compat.is_enabled()  # installed, only lifted
    assert torch.zeros(1, device="cuda").device.type == "cpu"  # and back on after
    with pytest.raises(KeyError), cpu_compat.suspended():
        raise KeyError  # an exception in the block
    assert _on()


def test_active_nests_and_restores():
    if cpu_compat.is_enabled():
        pytest.skip("the layer is already on for this process")
    with cpu_compat.active() as on:
        assert on and _on() and cpu_compat.is_enabled()
        with cpu_compat.active():
            assert _on()
        assert _on()  # the inner block left it on
        with cpu_compat.suspended():
            assert not _on()
            with cpu_compat.active():  # on again inside a suspension
                assert _on()
            assert not _on()
        assert _on()
    assert not _on() and not cpu_compat.is_enabled()
    with pytest.raises((RuntimeError, AssertionError)):
        torch.cuda.get_rng_state()  # the stubs are gone
    with cpu_compat.suspended():  # nothing to suspend: a no-op
        assert not _on()


def test_enable_disable_are_a_process_block():
    if cpu_compat.is_enabled():
        pytest.skip("the layer is already on for this process")
    with cpu_compat.active():
        cpu_compat.enable()
        cpu_compat.enable()  # idempotent
    assert _on()  # the process block outlives the active() block it was opened in
    with cpu_compat.active():
        cpu_compat.disable()
        assert _on()  # the enclosing active() block still holds it
    assert not _on() and not cpu_compat.is_enabled()
    cpu_compat.disable()  # nothing open: a no-op


def test_other_modes_keep_their_order(compat):
    """A mode entered inside the layer's block stays above it through a suspension, so that
    its own exit pops it and not the layer's mode."""
    outer = torch.overrides._get_current_function_mode_stack()
    with _PassThroughMode() as logging_mode:
        with cpu_compat.suspended():
            assert torch.overrides._get_current_function_mode_stack()[-1] is logging_mode
        stack = torch.overrides._get_current_function_mode_stack()
        assert stack[-1] is logging_mode and stack[:-1] == outer
    assert torch.overrides._get_current_function_mode_stack() == outer and _on()


class _Probe(torch.optim.SGD):
    """An optimizer that records whether its step ran under the layer (and can fail)."""

    seen: list = []
    fail = False

    def step(self, closure=None):
        _Probe.seen.append(_on())
        if _Probe.fail:
            raise RuntimeError("step failed")
        return super().step(closure)


def test_exempt_optimizer(compat):
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    opt = _Probe([p], lr=0.5)
    _Probe.seen, _Probe.fail = [], False
    opt.step()
    assert _Probe.seen == [True]  # not exempt: under the layer
    handle = cpu_compat.exempt_optimizer(opt)
    assert "step" not in vars(opt)  # torch step hooks, not a replaced method
    opt.step()
    assert _Probe.seen[-1] is False and _on()  # off inside the step, on after
    torch.testing.assert_close(p.detach(), torch.zeros(2))
    _Probe.fail = True
    with pytest.raises(RuntimeError, match="step failed"):
        opt.step()
    _Probe.fail = False
    opt.step()  # the failed step's suspension is closed first
    assert _Probe.seen[-2:] == [False, False] and _on()
    with pytest.raises(RuntimeError, match="step failed"):
        _Probe.fail = True
        opt.step()
    _Probe.fail = False
    handle.remove()  # closes the failed step's suspension, unregisters the hooks
    assert _on()
    opt.step()
    assert _Probe.seen[-1] is True
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        cpu_compat.exempt_optimizer(object())
