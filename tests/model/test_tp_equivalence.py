"""Tensor parallelism is exact: TP=2 (2 gloo processes) against TP=1 with the same weights.

One pair of processes runs both layouts: first megatron TP=2, then (after re-initialising the
model-parallel groups) TP=1 on each rank. Checked:

* init: every TP=2 shard equals the matching slice of the TP=1 weight (same seed), bitwise;
* forward: all four embeddings agree within 1e-5;
* backward: the gradient of every trainable parameter (TP shards gathered to full shape) agrees
  within 1e-5 relative to max(the tensor's largest gradient, 1e-2). This includes the Sub-LN
  LayerNorms, whose statistics are all-reduced across the TP shards.

Tolerance: the layouts differ only in fp32 summation order (a row-parallel matmul adds two
partial products; LayerNorm statistics are sums of two partial sums), i.e. ~1e-7 relative. A
wrong statistic, a missing all-reduce in a backward or a mis-sliced shard shows up at 1e-2 or
more, so 1e-5 separates the two cleanly.
"""

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.model.common import TINY, gather_full, make_batch, probe_loss

pytestmark = pytest.mark.slow


def _run_layout(tp: int, seed: int):
    from megatron.core import parallel_state as ps

    from megatron_m2.model import build_model
    from megatron_m2.parallel.distributed import initialize_model_parallel

    initialize_model_parallel(tp, 1)
    model = build_model(TINY, tp, 1, seed=seed)
    tp_group = ps.get_tensor_model_parallel_group()
    init_local = {n: p.detach().clone() for n, p in model.named_parameters()}
    init_full = {n: gather_full(p, n, tp_group, TINY) for n, p in model.named_parameters()}
    out = model(*make_batch(TINY))
    probe_loss(out).backward()
    grads = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"no gradient reached {n}"
            g = p.grad
            g.tensor_model_parallel = getattr(p, "tensor_model_parallel", False)
            g.partition_dim = getattr(p, "partition_dim", 0)
            grads[n] = gather_full(g, n, tp_group, TINY)
    feats = {k: v.detach() for k, v in out.items() if k.endswith("feats")}
    meta = {n: (getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", 0))
            for n, p in model.named_parameters()}
    return dict(init_local=init_local, init_full=init_full, feats=feats, grads=grads, meta=meta,
                tp_rank=ps.get_tensor_model_parallel_rank())


def _worker(seed: int):
    tp2 = _run_layout(2, seed)
    tp1 = _run_layout(1, seed)
    report = {"init_slices": 0, "feat_err": {}, "grad_err": {}}
    # Init: each local TP=2 shard is the slice of the TP=1 weight.
    for name, local in tp2["init_local"].items():
        full = tp1["init_local"][name]
        sharded, dim = tp2["meta"][name]
        if sharded:
            per = local.shape[dim]
            if name == "embeddings.text_embed.weight":  # padded vocabulary: pad rows are zero
                full = torch.cat([full, full.new_zeros(per * 2 - full.shape[0], full.shape[1])])
            full = full.narrow(dim, tp2["tp_rank"] * per, per)
        assert torch.equal(local, full), f"TP=2 shard of {name} is not the TP=1 slice"
        report["init_slices"] += 1
    for k, v in tp1["feats"].items():
        report["feat_err"][k] = float((tp2["feats"][k] - v).abs().max())
    assert set(tp1["grads"]) == set(tp2["grads"])
    for n, g1 in tp1["grads"].items():
        # Floor of 1e-2: key biases have an analytically zero gradient (softmax is invariant to
        # a shift shared by all keys), so only rounding noise (~1e-8) is there to compare.
        scale = max(float(g1.abs().max()), 1e-2)
        report["grad_err"][n] = float((tp2["grads"][n] - g1).abs().max()) / scale
    return report


def test_tp2_matches_tp1_init_forward_and_gradients():
    reports = run_distributed(_worker, world_size=2, seed=4321)
    for rank, rep in enumerate(reports):
        assert rep["init_slices"] > 100, rep["init_slices"]
        assert set(rep["feat_err"]) == {"image_feats", "text_feats", "vl_image_feats",
                                        "vl_text_feats"}
        worst_feat = max(rep["feat_err"].values())
        assert worst_feat < 1e-5, rep["feat_err"]
        worst = max(rep["grad_err"], key=rep["grad_err"].get)
        assert rep["grad_err"][worst] < 1e-5, (rank, worst, rep["grad_err"][worst])
        # Sub-LN parameters are among the checked tensors (and sharded under TP).
        assert any("inner_norm.A" in n for n in rep["grad_err"])
        assert any("ffn_norm.B" in n for n in rep["grad_err"])
