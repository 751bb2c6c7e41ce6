"""The fused image–text pass (``M2EncoderModel.forward(..., fused=True)``, docs/model.md).

Checked:

* :class:`PackedLayout` ``fused(s_v)``: both modalities with ``full_attention``; invalid for a
  single modality; dataclass-frozen equality and hash (``fused(s) != both(s)``);
* parity with the plain reference (:meth:`ReferenceM2.forward_fused`, written independently:
  batch-first, per-branch slices, one SDPA with a padding key mask) — forward and the gradient
  of a probe loss of every parameter that gets one, TP=1 on CPU;
* cross-modal attention has an effect: changing the image changes the text rows of the fused
  hidden states, while the ITC outputs of the text do not move (bitwise);
* padded text keys are ignored: changing padded token ids, or even the hidden states of padded
  rows at the block input, leaves every other row bitwise unchanged (and without the padding
  mask the same perturbation does change them: the check is not vacuous);
* TP=2 equals TP=1 (2 gloo ranks) for the fused forward and gradients;
* the ITC path is untouched: ITC outputs of a model are bitwise the same before and after a
  fused forward and backward (the other model tests prove the path itself is unchanged).

Tolerances (float32): as for the contrastive parity (tests/model/test_reference.py) the two
implementations differ only in summation order. The fused hidden states are LayerNorm outputs
of magnitude ~1 (not unit-norm features), so ``HIDDEN_ATOL = 1e-4`` absolute (measured on CPU:
0, bitwise equal, against the reference). Gradients: ``GRAD_RTOL = 1e-4`` relative to max(the
tensor's largest gradient, 1e-2) (measured: <= 3.6e-7), except the key biases, whose gradient is
analytically zero (softmax is invariant to a shift shared by all keys) so only rounding noise is
compared, absolutely: ``KEY_BIAS_ATOL = 1e-5`` (measured: <= 1.2e-6). TP=2 against TP=1:
``TP_ATOL = 1e-5`` for the hidden states (measured 1.4e-6) and, relatively, the gradients
(measured 9.1e-7; key biases 8.3e-7 absolute). Errors of substance are far larger: on the
reference, dropping the padding mask moves the other tokens' hidden states by 2.2, running the
text through branch A by 6.0; another image moves the text rows by > 1e-2 (checked below).
"""

import pytest
import torch

from megatron_m2.model import PackedLayout
from megatron_m2.model.multiway import Modality
from megatron_m2.model.reference import ReferenceM2
from tests.helpers.distributed import run_distributed
from tests.model.common import TINY, gather_full, make_batch, probe_loss
from tests.model.test_official import random_official

HIDDEN_ATOL = 1e-4
"""Largest absolute difference of a fused hidden state (LayerNorm output, magnitude ~1)."""
GRAD_RTOL = 1e-4
"""Largest gradient difference, relative to max(the tensor's largest gradient, 1e-2)."""
KEY_BIAS_ATOL = 1e-5
"""Largest absolute gradient difference of a key bias (analytically zero: rounding noise)."""
TP_ATOL = 1e-5
"""TP=2 against TP=1: forward (absolute) and gradients (relative, as GRAD_RTOL)."""


def _s_v(cfg=TINY) -> int:
    return 1 + (cfg.image_size // cfg.patch_size) ** 2


def _probe(h: torch.Tensor) -> torch.Tensor:
    """A fixed random linear functional of the fused hidden states ``[s, b, d]``."""
    g = torch.Generator().manual_seed(17)
    return (h * torch.randn(h.shape, generator=g)).sum()


# -- the layout ----------------------------------------------------------------------------------
def test_fused_layout():
    f = PackedLayout.fused(5)
    assert f.modality is Modality.BOTH and f.vision_len == 5 and f.full_attention
    assert f == PackedLayout.fused(5) and hash(f) == hash(PackedLayout.fused(5))
    assert f != PackedLayout.both(5) and not PackedLayout.both(5).full_attention
    assert PackedLayout.both(5) == PackedLayout(Modality.BOTH, 5)
    assert f.vision_rows(9) == 5
    for modality in (Modality.VISION, Modality.TEXT):
        with pytest.raises(ValueError, match="needs both modalities"):
            PackedLayout(modality, full_attention=True)
    with pytest.raises(ValueError, match="vision_len >= 1"):
        PackedLayout.fused(0)
    with pytest.raises(Exception):
        f.full_attention = False  # frozen


# -- parity with the reference -------------------------------------------------------------------
def _pair(weights: str):
    from megatron_m2.model import build_model

    ours = build_model(TINY, 1, 1, seed=1234)
    if weights == "megatron-init":
        ref = ReferenceM2.from_megatron(ours)
    else:
        ref = ReferenceM2(TINY)
        ref.load_state_dict(random_official(TINY, seed=7))
        ours.load_state_dict(ref.megatron_state_dict(target=ours))
    return ours, ref


@pytest.mark.parametrize("weights", ["megatron-init", "random-official"])
def test_fused_equals_reference(dist_world_of_one, weights):
    from megatron_m2.checkpoint import key_mapping

    ours, ref = _pair(weights)
    images, ids, pad = make_batch(TINY)
    out = ours(images, ids, pad, fused=True)
    assert set(out) == {"fused_hidden"}
    h = out["fused_hidden"]
    assert h.shape == (_s_v() + TINY.max_text_len, images.shape[0], TINY.hidden_size)
    h_ref = ref.forward_fused(images, ids, pad).transpose(0, 1)
    err = float((h.detach() - h_ref.detach()).abs().max())
    print(f"fused forward max |ours - reference| = {err:.3e}")
    assert err <= HIDDEN_ATOL, err
    # Same result through the explicit layout.
    with torch.no_grad():
        again = ours(images, ids, pad, layout=PackedLayout.fused(_s_v()))["fused_hidden"]
    assert torch.equal(again, h.detach())

    _probe(h).backward()
    _probe(h_ref).backward()
    ours_params, ref_params = dict(ours.named_parameters()), dict(ref.named_parameters())
    errs, with_grad = {}, set()
    for our_name, official in key_mapping(TINY):
        p, r = ours_params[our_name], ref_params[official]
        assert (p.grad is None) == (r.grad is None), f"{official}: gradient in one model only"
        if r.grad is None:
            continue
        with_grad.add(official)
        g = p.grad[:TINY.vocab_size] if official == "backbone.text_embed.weight" else p.grad
        errs[official] = float((g - r.grad).abs().max()) / max(float(r.grad.abs().max()), 1e-2)
    # Key biases have an analytically zero gradient (softmax is invariant to a shift shared by
    # all keys): only rounding noise is there, checked in absolute terms.
    key_bias = {n for n in errs if ".k_proj." in n and n.endswith(".bias")}
    noise = max(errs[n] * max(float(ref_params[n].grad.abs().max()), 1e-2) for n in key_bias)
    print(f"fused key-bias gradients (analytically 0): max |difference| {noise:.3e}")
    assert noise <= KEY_BIAS_ATOL, noise
    errs = {n: e for n, e in errs.items() if n not in key_bias}
    worst = max(errs, key=errs.get)
    print(f"fused gradients worst relative error {errs[worst]:.3e} ({worst})")
    assert errs[worst] <= GRAD_RTOL, (worst, errs[worst])
    # Everything trainable but the ITC heads and temperatures gets a gradient.
    expected = {n for n, p in ref.named_parameters() if p.requires_grad
                and not n.startswith("itc_") and not n.startswith("logit_")}
    assert with_grad == expected, sorted(with_grad ^ expected)
    # Both branches of the backbone and branch A of the VL stack are exercised.
    assert "backbone.encoder.layers.0.self_attn.q_proj.B.weight" in with_grad
    assert "backbone_vl.layers.0.ffn.A.fc1.weight" in with_grad


# -- cross-modal attention, padding ----------------------------------------------------------------
def test_fused_attends_across_modalities(dist_world_of_one):
    from megatron_m2.model import build_model

    model = build_model(TINY, 1, 1, seed=3)
    images, ids, pad = make_batch(TINY)
    other_images = make_batch(TINY, seed=1)[0]
    s_v = _s_v()
    with torch.no_grad():
        h1 = model(images, ids, pad, fused=True)["fused_hidden"]
        h2 = model(other_images, ids, pad, fused=True)["fused_hidden"]
        itc1 = model(images, ids, pad)
        itc2 = model(other_images, ids, pad)
    keep = ~pad.t()  # [s_t, b] unpadded text rows
    moved = float((h1[s_v:] - h2[s_v:]).abs()[keep].max())
    assert moved > 1e-2, moved  # text tokens see the image in the fused pass
    # ... and not in the contrastive pass.
    for k in ("text_feats", "vl_text_feats"):
        assert torch.equal(itc1[k], itc2[k]), k
    assert not torch.equal(itc1["vl_image_feats"], itc2["vl_image_feats"])


def test_fused_ignores_padded_text_keys(dist_world_of_one):
    from megatron_m2.model import build_model

    model = build_model(TINY, 1, 1, seed=3)
    images, ids, pad = make_batch(TINY)
    assert pad.any()
    s_v = _s_v()
    other_ids = ids.clone()
    other_ids[pad] = (other_ids[pad] + 17) % TINY.vocab_size
    with torch.no_grad():
        h1 = model(images, ids, pad, fused=True)["fused_hidden"]
        h2 = model(images, other_ids, pad, fused=True)["fused_hidden"]
    assert torch.equal(h1, h2)

    # Stronger: perturb the padded rows at the block input (the keys they make are masked).
    keep_rows = torch.cat([torch.ones(s_v, pad.shape[0], dtype=torch.bool), ~pad.t()])
    x = model.embeddings(images, ids, pad)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    x2 = torch.where(keep_rows[..., None], x, x + noise)
    with torch.no_grad(), model.using_layout(PackedLayout.fused(s_v)):
        a = model.encoder(x, attention_mask=pad)
        b = model.encoder(x2, attention_mask=pad)
        # Control: without the padding mask the perturbation reaches the other rows.
        no_mask = torch.zeros_like(pad)
        c = model.encoder(x, attention_mask=no_mask)
        d = model.encoder(x2, attention_mask=no_mask)
    assert torch.equal(a[keep_rows], b[keep_rows])
    assert float((c[keep_rows] - d[keep_rows]).abs().max()) > 1e-2


def test_fused_argument_errors(dist_world_of_one):
    from megatron_m2.model import build_model

    model = build_model(TINY, 1, 1, seed=3)
    images, ids, pad = make_batch(TINY)
    with pytest.raises(ValueError, match="contradicts"):
        model(images, ids, pad, fused=True, layout=PackedLayout.both(_s_v()))
    with pytest.raises(ValueError, match="needs both images and text_ids"):
        model(images=images, fused=True)


# -- the ITC path is untouched ---------------------------------------------------------------------
def test_itc_outputs_unchanged_by_a_fused_pass(dist_world_of_one):
    from megatron_m2.model import build_model

    model = build_model(TINY, 1, 1, seed=11)
    images, ids, pad = make_batch(TINY)
    before = model(images, ids, pad)
    probe_loss(before).backward()
    grads_before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    _probe(model(images, ids, pad, fused=True)["fused_hidden"]).backward()
    model.zero_grad(set_to_none=True)
    assert model.multiway_state.take_backbone() is None  # the fused pass records nothing

    after = model(images, ids, pad)
    assert model.multiway_state.layout == PackedLayout.both(_s_v())
    assert set(after) == set(before)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    probe_loss(after).backward()
    for n, p in model.named_parameters():
        if n in grads_before:
            assert torch.equal(p.grad, grads_before[n]), n


# -- TP=2 against TP=1 -----------------------------------------------------------------------------
def _run_fused(tp: int, seed: int):
    from megatron.core import parallel_state as ps

    from megatron_m2.model import build_model
    from megatron_m2.parallel.distributed import initialize_model_parallel

    initialize_model_parallel(tp, 1)
    model = build_model(TINY, tp, 1, seed=seed)
    tp_group = ps.get_tensor_model_parallel_group()
    h = model(*make_batch(TINY), fused=True)["fused_hidden"]
    _probe(h).backward()
    grads = {}
    for n, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad
            g.tensor_model_parallel = getattr(p, "tensor_model_parallel", False)
            g.partition_dim = getattr(p, "partition_dim", 0)
            grads[n] = gather_full(g, n, tp_group, TINY)
    return h.detach(), grads


def _tp_worker(seed: int):
    h2, g2 = _run_fused(2, seed)
    h1, g1 = _run_fused(1, seed)
    assert set(g1) == set(g2)
    # Key biases (analytically zero gradient, rounding noise only): absolute difference.
    key_bias = {n for n in g1 if ".linear_k." in n and n.endswith(".bias")}
    grad_err = {n: float((g2[n] - g).abs().max()) / max(float(g.abs().max()), 1e-2)
                for n, g in g1.items() if n not in key_bias}
    key_bias_err = max(float((g2[n] - g1[n]).abs().max()) for n in key_bias)
    return {"hidden_err": float((h2 - h1).abs().max()), "grad_err": grad_err,
            "key_bias_err": key_bias_err}


@pytest.mark.slow
def test_fused_tp2_matches_tp1():
    reports = run_distributed(_tp_worker, world_size=2, seed=4321)
    for rank, rep in enumerate(reports):
        print(f"rank {rank}: fused TP=2 vs TP=1 hidden {rep['hidden_err']:.3e}, "
              f"grad {max(rep['grad_err'].values()):.3e}, key biases {rep['key_bias_err']:.3e}")
        assert rep["hidden_err"] < TP_ATOL, rep["hidden_err"]
        assert rep["key_bias_err"] < KEY_BIAS_ATOL, rep["key_bias_err"]
        worst = max(rep["grad_err"], key=rep["grad_err"].get)
        assert rep["grad_err"][worst] < TP_ATOL, (rank, worst, rep["grad_err"][worst])
        assert any("inner_norm.B" in n for n in rep["grad_err"])
        assert len(rep["grad_err"]) > 50


# -- one batch with both passes (the training step of the masked objectives) ----------------------
def test_mixed_batch_equals_separate_passes(dist_world_of_one):
    """``PackedLayout.mixed(s_v, c)``: samples [:c] give the contrastive outputs, samples [c:]
    the fused hidden states, equal to two separate forwards (and gradients equal too), with
    masked patches through ``image_mask``. Tolerance 1e-5: the same ops, batched differently
    (measured: bitwise on CPU)."""
    from megatron_m2.model import build_model

    model = build_model(TINY, 1, 1, seed=3)
    images, ids, pad = make_batch(TINY)
    s_v = _s_v()
    mask = torch.zeros(images.shape[0], s_v - 1, dtype=torch.bool)
    mask[:, ::3] = True
    with torch.no_grad():  # the mask token must matter in this check
        model.embeddings.mask_token.normal_(generator=torch.Generator().manual_seed(0))
    both = [torch.cat([t, t]) for t in (images, ids, pad)]
    image_mask = torch.cat([torch.zeros_like(mask), mask])
    out = model(*both, layout=PackedLayout.mixed(s_v, images.shape[0]), image_mask=image_mask)
    itc = model(images, ids, pad)
    fused = model(images, ids, pad, fused=True, image_mask=mask)["fused_hidden"]
    assert set(out) == set(itc) | {"fused_hidden"}
    for k in itc:
        err = float((out[k] - itc[k]).abs().max())
        assert err <= 1e-5, (k, err)
    assert float((out["fused_hidden"] - fused).abs().max()) <= 1e-5
    # The mask token is used: unmasked images give other fused states.
    plain = model(images, ids, pad, fused=True)["fused_hidden"]
    assert float((plain - fused).abs().max()) > 1e-3

    params = [p for p in model.parameters() if p.requires_grad]
    g1 = torch.autograd.grad(probe_loss(out) + _probe(out["fused_hidden"]), params,
                             allow_unused=True)
    g2 = torch.autograd.grad(probe_loss(itc) + _probe(fused), params, allow_unused=True)
    for (name, _), a, b in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad],
                               g1, g2):
        assert (a is None) == (b is None), name
        if a is not None:
            scale = max(float(b.abs().max()), 1e-2)
            assert float((a - b).abs().max()) / scale <= 1e-5, name


def test_mixed_layout_rules():
    m = PackedLayout.mixed(5, 2)
    assert m.full_attention and m.contrastive_batch == 2 and m.has_contrastive
    assert PackedLayout.mixed(5, 0) == PackedLayout.fused(5)
    assert not PackedLayout.fused(5).has_contrastive and PackedLayout.both(5).has_contrastive
    with pytest.raises(ValueError, match="only for a mixed layout"):
        PackedLayout(Modality.BOTH, 5, contrastive_batch=2)
