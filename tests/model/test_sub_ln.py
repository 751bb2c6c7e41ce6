"""The TP-sharded Sub-LN (TPLayerNorm, sharded=True) against torch's LayerNorm on the full width.

Two gloo ranks each hold half of the features. Forward and the gradients of input, weight and
bias are compared with ``torch.nn.functional.layer_norm`` applied to the unsharded tensors:

* float64: within 1e-12 relative (only the summation order of the statistics differs);
* bfloat16 input and parameters: within 2e-2 absolute against a float64 reference (the output
  and gradients are rounded to bf16, 8 bits of mantissa: 2^-8 ≈ 4e-3 relative on values of O(1)
  to O(3)).

It also checks what the backward keeps: the input as given plus two fp32 statistics per token.
"""

import torch

from tests.helpers.distributed import run_distributed

TOKENS, BATCH, WIDTH = 5, 3, 12


def _full_tensors(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, BATCH, WIDTH, generator=g, dtype=torch.float64) * 2 + 0.5
    w = 1 + 0.3 * torch.randn(WIDTH, generator=g, dtype=torch.float64)
    b = 0.2 * torch.randn(WIDTH, generator=g, dtype=torch.float64)
    r = torch.randn(TOKENS, BATCH, WIDTH, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (x, w, b, r)]


def _sharded_rank(dtype_names):
    return {name: _sharded(getattr(torch, name)) for name in dtype_names}


def _sharded(dtype):
    import torch.distributed as dist

    from megatron_m2.model.multiway import TPLayerNorm

    rank, tp = dist.get_rank(), dist.get_world_size()
    x, w, b, r = _full_tensors(dtype)
    lo, hi = rank * WIDTH // tp, (rank + 1) * WIDTH // tp
    ln = TPLayerNorm(WIDTH, 1e-5, tp_group=dist.group.WORLD, sharded=True, params_dtype=dtype)
    with torch.no_grad():
        ln.weight.copy_(w[lo:hi])
        ln.bias.copy_(b[lo:hi])
    xs = x[..., lo:hi].clone().requires_grad_(True)
    saved = []
    params = {p.untyped_storage().data_ptr() for p in ln.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved.append((t.untyped_storage().data_ptr() == xs.untyped_storage().data_ptr(),
                          t.dtype, t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ln(xs)
    (out.double() * r[..., lo:hi].double()).sum().backward()
    # Exact float64 numpy copies: tensors would be passed back through shared memory of a
    # process that is about to exit.
    res = {k: v.detach().double().numpy() for k, v in
           (("out", out), ("dx", xs.grad), ("dw", ln.weight.grad), ("db", ln.bias.grad))}
    return dict(res, saved=[(same, str(dt), n) for same, dt, n in saved])


def _reference():
    x, w, b, r = _full_tensors(torch.float64)
    x.requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    out = torch.nn.functional.layer_norm(x, (WIDTH,), w, b, 1e-5)
    (out * r).sum().backward()
    return {"out": out.detach(), "dx": x.grad, "dw": w.grad, "db": b.grad}


def test_sharded_layer_norm_matches_full_width():
    ranks = run_distributed(_sharded_rank, 2, dtype_names=("float64", "bfloat16"))
    ref = _reference()
    for name, bound in (("float64", lambda r: 1e-12 * r), ("bfloat16", lambda r: 2e-2)):
        for key, dim in (("out", -1), ("dx", -1), ("dw", 0), ("db", 0)):
            got = torch.cat([torch.from_numpy(rk[name][key]) for rk in ranks], dim=dim)
            err = (got - ref[key]).abs().max().item()
            assert err <= bound(ref[key].abs().max().item()), (name, key, err)
    for rk in ranks:
        # What the backward keeps: the bf16 input itself (no copy), then the fp32 mean and
        # rstd of each token.
        saved = rk["bfloat16"]["saved"]
        assert [s[:2] for s in saved] == [(True, "torch.bfloat16"), (False, "torch.float32"),
                                          (False, "torch.float32")]
        assert [s[2] for s in saved[1:]] == [4 * TOKENS * BATCH] * 2
