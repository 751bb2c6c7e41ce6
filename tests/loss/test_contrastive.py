"""Contrastive loss with gather-with-grad over real gloo processes vs a one-process reference.

Tolerance: float64 throughout, so the only differences are summation order (~1e-15); 1e-10
catches any missing or doubled gradient term (which are O(1/k) relative).
"""

import pytest
import torch
from torch.nn import functional as F

from megatron_m2.loss import itc_loss, local_contrastive_loss
from tests.helpers.distributed import run_distributed

B, D = 3, 5


def _embeddings(world: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(world * B, D, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(world * B, D, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


def reference(img, txt, log_scale):
    """Symmetric InfoNCE over the full batch, averaged over all samples (one process)."""
    img = img.clone().requires_grad_(True)
    txt = txt.clone().requires_grad_(True)
    s = torch.tensor(log_scale, dtype=torch.float64, requires_grad=True)
    logits = s.exp() * img @ txt.t()
    labels = torch.arange(img.shape[0])
    loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    loss.backward()
    return loss.detach(), img.grad, txt.grad, s.grad


def _worker(log_scales):
    return [_one(s) for s in log_scales]


def _one(log_scale):
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    img, txt = _embeddings(world)
    mine = slice(rank * B, (rank + 1) * B)
    li = img[mine].clone().requires_grad_(True)
    lt = txt[mine].clone().requires_grad_(True)
    s = torch.tensor(log_scale, dtype=torch.float64, requires_grad=True)
    loss, _ = local_contrastive_loss(li, lt, s, group=dist.group.WORLD)
    loss.backward()
    # What megatron DDP does to replicated-parameter gradients: average over the DP ranks.
    s_grad = s.grad.clone()
    dist.all_reduce(s_grad)
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    return dict(loss=float(mean_loss) / world, img_grad=li.grad.numpy(),
                txt_grad=lt.grad.numpy(), s_grad=float(s_grad) / world)


@pytest.mark.slow
def test_gather_with_grad_matches_reference():
    world = 2
    scales = [2.0, 5.0]  # 5.0 > log(100): the loss uses the scale as it is (its gradient too)
    per_rank = run_distributed(_worker, world_size=world, log_scales=scales)
    for i, log_scale in enumerate(scales):
        _check(world, log_scale, [r[i] for r in per_rank])


def _check(world, log_scale, results):
    img, txt = _embeddings(world)
    loss, gi, gt, gs = reference(img, txt, log_scale)
    for rank, r in enumerate(results):
        mine = slice(rank * B, (rank + 1) * B)
        assert abs(r["loss"] - float(loss)) < 1e-10
        # Per-rank loss is a mean over B local rows; the DP average over `world` ranks makes
        # the gradient of the global mean, i.e. local grads equal world x (1/world) x ref.
        torch.testing.assert_close(torch.from_numpy(r["img_grad"]) / world, gi[mine],
                                   rtol=0, atol=1e-10)
        torch.testing.assert_close(torch.from_numpy(r["txt_grad"]) / world, gt[mine],
                                   rtol=0, atol=1e-10)
        assert abs(r["s_grad"] - float(gs)) < 1e-10


def test_single_process_equals_reference():
    img, txt = _embeddings(1)
    loss, gi, gt, gs = reference(img, txt, 2.5)
    li, lt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    s = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    ours, stats = local_contrastive_loss(li, lt, s)
    ours.backward()
    assert abs(ours.item() - loss.item()) < 1e-12
    torch.testing.assert_close(li.grad, gi, rtol=0, atol=1e-12)
    torch.testing.assert_close(s.grad, gs, rtol=0, atol=1e-12)
    assert 0.0 <= float(stats["acc"]) <= 1.0


def test_itc_loss_averages_both_heads():
    img, txt = _embeddings(1, seed=1)
    img2, txt2 = _embeddings(1, seed=2)
    s1, s2 = torch.tensor(2.0, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64)
    out = {"image_feats": img, "text_feats": txt, "vl_image_feats": img2,
           "vl_text_feats": txt2, "logit_scale": s1, "logit_vl_scale": s2}
    both, m = itc_loss(out)
    a, _ = local_contrastive_loss(img, txt, s1)
    b, _ = local_contrastive_loss(img2, txt2, s2)
    assert abs(float(both) - 0.5 * float(a + b)) < 1e-12
    vl, _ = itc_loss(out, heads="vl")
    assert abs(float(vl) - float(b)) < 1e-12
    with pytest.raises(ValueError, match="backbone"):
        itc_loss({k: v for k, v in out.items() if not k.startswith(("image", "text"))})
