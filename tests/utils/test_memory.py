"""PeakTensorMemory counts what is allocated, once per storage, and what is freed."""

import torch

from megatron_m2.utils.memory import PeakTensorMemory


def test_peak_and_release():
    n = 1000  # floats -> 4000 bytes
    with PeakTensorMemory() as m:
        a = torch.ones(n)
        b = torch.ones(n)
        view = a[:10]  # a view: same storage, not counted again
        a.add_(1)  # in place: same storage
        del a, view
        c = torch.ones(2 * n)
        assert m.current_bytes == 4 * n + 8 * n
        del b, c
    assert m.peak_bytes == 4 * n * 2 + 8 * n - 4 * n  # a and b, then b and c
    assert m.current_bytes == 0


def test_backward_allocations_are_seen():
    x = torch.randn(64, 32, requires_grad=True)
    with PeakTensorMemory() as m:
        (x @ x.t()).softmax(-1).sum().backward()
    assert m.peak_bytes >= 2 * 64 * 64 * 4  # logits and softmax output alive together
