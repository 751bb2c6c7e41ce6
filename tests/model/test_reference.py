"""The plain single-device reference model (:mod:`megatron_m2.model.reference`).

Checked three ways:

* its parameters are exactly the official checkpoint's keys and shapes (strict loading), with
  the same frozen set as our model;
* it computes the spec's forward (the float64 equations written out in
  tests/model/test_official.py from the release's module tree);
* parity with megatron_m2's real model (:func:`megatron_m2.model.build_model`, TP=1 PP=1, CPU,
  gloo world of one with the CPU compatibility layer, as m2-pretrain runs on CPU): loaded with
  the same weights, both give the same outputs (both modalities, image only, text only), the
  same GBA-ITC loss, and the same gradient for every trainable parameter.

Tolerance (float32 on both sides): the two models compute the same function with different
kernels and layouts — megatron's packed ``[s, b, d]`` sequence with a block-diagonal mask and
its own attention and LayerNorm code against batch-first separate sequences and
``scaled_dot_product_attention`` — so they differ only by float32 rounding in a different
summation order. Measured on CPU: the forward agrees to the last bit here (at most ~1e-7 is
expected from a different kernel order), gradients differ by ~2e-7 relative (median over
parameters) and at most ~1.3e-5 on the key biases, whose gradient is analytically zero (softmax
is invariant to a shift shared by all keys: only rounding noise, ~1e-7 absolute, measured against
the 1e-2 floor below). A wrong weight, branch, LayerNorm, mask or position offset moves the
outputs by 1e-3 or more (scaling one Sub-LN weight by 1.01: 3e-3; dropping the padding mask:
0.2). Hence ``FEATURE_ATOL = 1e-5`` (absolute; the features are unit-norm) and ``GRAD_RTOL =
1e-4`` (relative to max(the tensor's largest gradient, 1e-2)).
"""

import pytest
import torch

from megatron_m2.checkpoint import key_mapping
from megatron_m2.loss import itc_loss
from megatron_m2.model.reference import ReferenceM2
from tests.model.common import TINY, make_batch, probe_loss
from tests.model.test_official import CFG, _batch, official_shapes, random_official
from tests.model.test_official import reference_forward as spec_forward

FEATURE_ATOL = 1e-5
"""Largest absolute difference of an output (unit-norm features, log-temperatures)."""
GRAD_RTOL = 1e-4
"""Largest gradient difference, relative to max(the tensor's largest gradient, 1e-2)."""
OUTPUTS = ("image_feats", "text_feats", "vl_image_feats", "vl_text_feats", "logit_scale",
           "logit_vl_scale")


# -- the reference on its own (no megatron, no torch.distributed) ---------------------------------
def test_reference_has_the_official_layout():
    model = ReferenceM2(CFG)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official_shapes(CFG)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    # The shared VL stack's branch B and the mask token never see data, as in our model.
    assert frozen == {n for n in official_shapes(CFG)
                      if (n.startswith("backbone_vl.") and ".B." in n) or "mask_token" in n}


def test_reference_matches_the_spec_forward():
    official = random_official(CFG, seed=3)
    model = ReferenceM2(CFG)
    model.load_state_dict(official)
    images, ids, pad = _batch()
    ref = spec_forward(official, images, ids, pad)
    with torch.no_grad():
        out = model(images, ids, pad)
        image_only = model(images=images)
        text_only = model(text_ids=ids, text_pad_mask=pad)
    assert set(out) == set(ref)
    for key in ref:
        torch.testing.assert_close(out[key].double(), ref[key], atol=1e-5, rtol=0,
                                   msg=lambda m, key=key: f"{key}: {m}")
    assert set(image_only) == {"image_feats", "vl_image_feats", "logit_scale", "logit_vl_scale"}
    assert set(text_only) == {"text_feats", "vl_text_feats", "logit_scale", "logit_vl_scale"}
    for key in ("image_feats", "vl_image_feats"):
        torch.testing.assert_close(image_only[key], out[key], atol=1e-6, rtol=0)
    for key in ("text_feats", "vl_text_feats"):
        torch.testing.assert_close(text_only[key], out[key], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="needs images, text_ids or both"):
        model()


# -- parity with megatron_m2's model --------------------------------------------------------------
def _megatron_model(seed: int = 1234):
    from megatron_m2.model import build_model

    return build_model(TINY, 1, 1, seed=seed)


def _pair(weights: str):
    """Our model and the reference holding the same weights: our seeded initialisation copied
    into the reference (``from_megatron``), or random official weights with non-trivial
    LayerNorms loaded into both (``megatron_state_dict`` for ours)."""
    ours = _megatron_model()
    if weights == "megatron-init":
        ref = ReferenceM2.from_megatron(ours)
    else:
        ref = ReferenceM2(TINY)
        ref.load_state_dict(random_official(TINY, seed=7))
        ours.load_state_dict(ref.megatron_state_dict(target=ours))
    return ours, ref


def _max_diff(a: dict, b: dict, keys) -> dict:
    return {k: float((a[k].detach().double() - b[k].detach().double()).abs().max())
            for k in keys}


def _grads(ours, ref):
    """``{official name: (our gradient, reference gradient)}`` for every trainable weight; our
    gradients renamed by the same table as the weights (vocabulary padding rows dropped)."""
    ours_params = dict(ours.named_parameters())
    ref_params = dict(ref.named_parameters())
    out = {}
    for our_name, official in key_mapping(TINY):
        p, r = ours_params[our_name], ref_params[official]
        assert p.requires_grad == r.requires_grad, f"{our_name} / {official}: frozen differs"
        if not r.requires_grad:
            continue
        assert p.grad is not None and r.grad is not None, f"no gradient reached {official}"
        g = p.grad
        if official == "backbone.text_embed.weight":
            assert not g[TINY.vocab_size:].any(), "gradient on a vocabulary padding row"
            g = g[:TINY.vocab_size]
        out[official] = (g, r.grad)
    return out


@pytest.mark.parametrize("weights", ["megatron-init", "random-official"])
def test_reference_equals_megatron_model(dist_world_of_one, weights):
    ours, ref = _pair(weights)
    images, ids, pad = make_batch(TINY)
    with torch.no_grad():
        for kwargs, keys in (
                (dict(images=images, text_ids=ids, text_pad_mask=pad), OUTPUTS),
                (dict(images=images), ("image_feats", "vl_image_feats")),
                (dict(text_ids=ids, text_pad_mask=pad), ("text_feats", "vl_text_feats"))):
            a, b = ours(**kwargs), ref(**kwargs)
            assert set(keys) <= set(a) and set(keys) <= set(b)
            errs = _max_diff(a, b, keys)
            assert max(errs.values()) <= FEATURE_ATOL, (sorted(kwargs), errs)

    # Gradients: a probe functional of every output, plus the training loss (GBA-ITC on one
    # rank is the global ITC loss).
    a, b = ours(images, ids, pad), ref(images, ids, pad)
    loss_a, loss_b = itc_loss(a, group=None)[0], itc_loss(b, group=None)[0]
    assert abs(loss_a.item() - loss_b.item()) <= FEATURE_ATOL, (loss_a.item(), loss_b.item())
    (probe_loss(a) + loss_a).backward()
    (probe_loss(b) + loss_b).backward()
    grads = _grads(ours, ref)
    assert len(grads) == sum(p.requires_grad for p in ref.parameters())
    errs = {n: float((g1 - g2).abs().max()) / max(float(g2.abs().max()), 1e-2)
            for n, (g1, g2) in grads.items()}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= GRAD_RTOL, (worst, errs[worst])
    # The comparison is not vacuous: the gradients are not all (near) zero.
    assert sum(float(g2.abs().max()) > 1e-3 for _, g2 in grads.values()) > len(grads) // 2


def test_from_megatron_copies_the_weights(dist_world_of_one):
    ours = _megatron_model(seed=5)
    ref = ReferenceM2.from_megatron(ours)
    with torch.no_grad():
        next(ours.parameters()).add_(1.0)  # a copy: changing ours leaves the reference alone
    back = ref.megatron_state_dict(target=ours)
    fresh = _megatron_model(seed=5).state_dict()
    for k, v in back.items():
        if torch.is_tensor(v) and torch.is_tensor(fresh[k]):
            assert torch.equal(v, fresh[k]), k
