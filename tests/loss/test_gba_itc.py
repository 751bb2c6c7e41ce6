"""GBA-ITC over 4 real gloo processes against a single-process reference.

For every ITC group size k ∈ {1, 2, 4} (k = 4 = N is global ITC) and M ∈ {1, 2} micro-batches,
plain (each micro-batch its own contrastive batch of k·b) and with feature accumulation (one
batch of k·M·b): the DP-averaged loss, the gradients of every embedding and of the logit scales
equal those of one process that holds all samples and computes, per ITC group (and micro-batch),
symmetric InfoNCE, averaged. float64; tolerance 1e-6 (observed differences are ~1e-16; a
missing reduce-scatter or a wrong 1/N is off by O(1)).

The naive full-matrix baseline has the same loss and exactly 1/N of the (DP-averaged) gradients.
"""

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from tests.helpers.distributed import run_distributed

pytestmark = pytest.mark.slow

N, B, D = 4, 2, 6
KS, MS = (1, 2, 4), (1, 2)
LOG_SCALES = (2.3, 2.9)  # backbone head, VL head


def embeddings(m: int):
    """All samples: [N ranks][M micro-batches][B rows] for the four embeddings."""
    g = torch.Generator().manual_seed(7 + m)
    return {k: F.normalize(torch.randn(N, m, B, D, generator=g, dtype=torch.float64), dim=-1)
            for k in ("image_feats", "text_feats", "vl_image_feats", "vl_text_feats")}


def _infonce(img, txt, s):
    logits = s.exp() * img @ txt.t()
    labels = torch.arange(img.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def reference(k: int, m: int, accumulate: bool):
    """Mean over ITC groups (and micro-batches unless accumulating) of the dual-head loss."""
    emb = {n: t.clone().requires_grad_(True) for n, t in embeddings(m).items()}
    s = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in LOG_SCALES]
    terms = []
    for g0 in range(0, N, k):
        batches = [slice(None)] if accumulate else [slice(j, j + 1) for j in range(m)]
        for mb in batches:
            def group(name):
                return emb[name][g0:g0 + k, mb].reshape(-1, D)
            terms.append(0.5 * (_infonce(group("image_feats"), group("text_feats"), s[0])
                                + _infonce(group("vl_image_feats"), group("vl_text_feats"),
                                           s[1])))
    loss = torch.stack(terms).mean()
    loss.backward()
    return float(loss), {n: t.grad for n, t in emb.items()}, [float(x.grad) for x in s]


def _worker():
    import torch.distributed as dist

    from megatron_m2.loss import cached_feature_loss, count_communication, itc_loss
    from megatron_m2.parallel.distributed import initialize_model_parallel
    from megatron_m2.parallel.groups import create_itc_groups

    initialize_model_parallel(1, 1)  # DP = 4
    rank = dist.get_rank()
    out = {}
    for k in KS:
        itc = create_itc_groups(group_size=k)
        assert itc.size == k and itc.num_groups == N // k
        for m in MS:
            emb = embeddings(m)
            for accumulate in (False, True):
                s = [torch.tensor(v, dtype=torch.float64, requires_grad=True)
                     for v in LOG_SCALES]
                scales = {"logit_scale": s[0], "logit_vl_scale": s[1]}
                mine = [{n: emb[n][rank, j] for n in emb} for j in range(m)]
                with count_communication() as comm:
                    if accumulate:
                        loss, grads, _ = cached_feature_loss(mine, scales, group=itc.group)
                        loss = float(loss)
                    else:
                        leaves = [{n: t.clone().requires_grad_(True) for n, t in mb.items()}
                                  for mb in mine]
                        total = 0.0
                        for leaf in leaves:  # the schedule averages micro-batch losses
                            total = total + itc_loss({**leaf, **scales}, itc.group)[0] / m
                        total.backward()
                        loss = float(total)
                        grads = [{n: t.grad for n, t in leaf.items()} for leaf in leaves]
                out[(k, m, accumulate)] = dict(
                    loss=loss, scale_grads=[float(x.grad) for x in s], bytes=comm.sent,
                    grads={n: np.stack([g[n].numpy() for g in grads]) for n in emb})
    out["naive"] = _worker_naive()
    return out


@pytest.fixture(scope="module")
def per_rank():
    """One 4-process run serves every test of this module (process start-up dominates)."""
    return run_distributed(_worker, world_size=N)


def test_gba_itc_matches_single_process_reference(per_rank):
    for k in KS:
        for m in MS:
            for accumulate in (False, True):
                key = (k, m, accumulate)
                ref_loss, ref_grads, ref_scale = reference(k, m, accumulate)
                # DDP averages over the N DP ranks: loss, embedding and scale gradients.
                loss = np.mean([r[key]["loss"] for r in per_rank])
                assert abs(loss - ref_loss) < 1e-6, key
                for i in range(2):
                    sg = np.mean([r[key]["scale_grads"][i] for r in per_rank])
                    assert abs(sg - ref_scale[i]) < 1e-6, (key, i)
                for rank, r in enumerate(per_rank):
                    for n, g in r[key]["grads"].items():
                        np.testing.assert_allclose(g / N, ref_grads[n][rank].numpy(), rtol=0,
                                                   atol=1e-6, err_msg=f"{key} {n} rank {rank}")
    # Loss-side traffic: GBA moves (k-1)/(N-1) of global ITC's bytes.
    glob = per_rank[0][(N, 1, False)]["bytes"]
    for k in KS:
        assert per_rank[0][(k, 1, False)]["bytes"] * (N - 1) == glob * (k - 1)
    # M = 1: accumulation is the plain step.
    assert abs(per_rank[0][(2, 1, True)]["loss"] - per_rank[0][(2, 1, False)]["loss"]) < 1e-12


def test_naive_baseline_same_loss_gradients_scaled_by_one_over_n(per_rank):
    emb = embeddings(1)
    img = emb["vl_image_feats"].reshape(-1, D).clone().requires_grad_(True)
    s = torch.tensor(LOG_SCALES[1], dtype=torch.float64)
    loss = _infonce(img, emb["vl_text_feats"].reshape(-1, D), s)
    loss.backward()
    for rank, r in enumerate(p["naive"] for p in per_rank):
        assert abs(r["loss"] - float(loss)) < 1e-12
        # Each rank back-propagates the full loss into its own rows only: its gradient is the
        # single-process one, i.e. 1/N of what global ITC's local loss + gather-with-grad gives
        # a rank (N x reference). After DDP's 1/N averaging the model sees 1/N of the exact
        # gradient: the naive baseline needs its loss (or learning rate) multiplied by N.
        np.testing.assert_allclose(r["img_grad"], img.grad[rank * B:(rank + 1) * B].numpy(),
                                   rtol=0, atol=1e-12)


def _worker_naive():
    import torch.distributed as dist

    from megatron_m2.loss import naive_global_loss

    rank = dist.get_rank()
    emb = embeddings(1)
    img = emb["vl_image_feats"][rank, 0].clone().requires_grad_(True)
    txt = emb["vl_text_feats"][rank, 0]
    s = torch.tensor(LOG_SCALES[1], dtype=torch.float64)
    loss, _ = naive_global_loss(img, txt, s, dist.group.WORLD)
    loss.backward()
    return dict(loss=float(loss), img_grad=img.grad.numpy())
