"""Sequence parallelism is exact: TP=2 + SP against TP=2 with the same weights (2 gloo ranks).

Both models are built on the same TP=2 groups from the same seed (the layout-independent
initialisation), so every rank holds identical shards in both and the gradients compare shard
by shard. Each case runs a forward and backward of a fixed random functional of every output on
both, and checks the outputs and the gradient of every trainable parameter within 1e-5 relative
to max(the tensor's largest gradient, 1e-2), fp32. Before comparing, the gradients of the
parameters marked ``sequence_parallel`` (the LayerNorms and row-parallel biases that see one
shard of the tokens) are summed across the TP group, which is what megatron's
``finalize_model_grads`` does in training (``tests/training/test_layout_parity.py`` runs that
path).

The cases cover what sequence parallelism changes in this model: a vision part whose length is
not a multiple of TP (the tiny model's s_v = 5: one padding row, masked as a key), a text part
of odd length (one padded text row added to the padding mask), patch dropout's shorter vision
part, the fused and mixed layouts of the masked objectives (full attention across the parts,
padding masked), and single-modality inference. The inter-layer activations are checked to be
the shards (``⌈s_v/2⌉ + ⌈s_t/2⌉`` rows), so the comparison is not between two unsharded runs.

Tolerance: the two runs differ in summation order only (the row-parallel reduction happens as a
reduce-scatter instead of an all-reduce; the LayerNorm weight gradients are two partial sums),
~1e-7 relative; a token routed to the wrong branch or an unmasked padding row is ~1e-1.
"""

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.model.common import TINY, make_batch

pytestmark = pytest.mark.slow


def _functional(out, seed=7):
    g = torch.Generator().manual_seed(seed)
    loss = out.get("logit_scale", torch.zeros(())) * 0.3
    for k in sorted(out):
        if k.endswith("feats") or k == "fused_hidden":
            loss = loss + (out[k] * torch.randn(out[k].shape, generator=g)).sum()
    return loss


def _cases():
    from megatron_m2.model.multiway import PackedLayout

    images, ids, pad = make_batch(TINY, batch=4)
    keep = torch.tensor([[0, 2], [1, 3], [0, 1], [2, 3]])
    return {
        "contrastive": dict(images=images, text_ids=ids, text_pad_mask=pad),
        "odd_text": dict(images=images, text_ids=ids[:, :7], text_pad_mask=pad[:, :7]),
        "patch_dropout": dict(images=images, text_ids=ids, text_pad_mask=pad, keep_index=keep),
        "fused": dict(images=images, text_ids=ids[:, :7], text_pad_mask=pad[:, :7], fused=True),
        "mixed": dict(images=images, text_ids=ids, text_pad_mask=pad,
                      layout=PackedLayout.mixed(TINY.vision_seq_len, 2)),
        "vision_only": dict(images=images),
        "text_only": dict(text_ids=ids[:, :7], text_pad_mask=pad[:, :7]),
    }


def _worker():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_m2.model import build_model
    from megatron_m2.parallel.distributed import initialize_model_parallel, set_seed

    initialize_model_parallel(2, 1)
    set_seed(11)  # seeds megatron's RNG tracker, which sequence parallelism forks
    group = ps.get_tensor_model_parallel_group()
    plain = build_model(TINY, 2, 1, seed=11)
    sp = build_model(TINY, 2, 1, seed=11, sequence_parallel=True)
    rows = []
    sp.encoder.layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: rows.append((args[0] if args else kwargs["hidden_states"]
                                             ).shape[0]), with_kwargs=True)
    report = {}
    for name, inputs in _cases().items():
        for m in (plain, sp):
            m.zero_grad(set_to_none=True)
        out_p, out_s = plain(**inputs), sp(**inputs)
        loss_p, loss_s = _functional(out_p), _functional(out_s)
        (loss_p + 0 * sum(p.sum() for p in plain.parameters() if p.requires_grad)).backward()
        (loss_s + 0 * sum(p.sum() for p in sp.parameters() if p.requires_grad)).backward()
        for p in sp.parameters():
            if p.requires_grad and getattr(p, "sequence_parallel", False):
                dist.all_reduce(p.grad, group=group)
        out_err = max(float((out_p[k] - out_s[k]).abs().max()) for k in out_p)
        grad_err = {}
        for (n, a), (_, b) in zip(plain.named_parameters(), sp.named_parameters()):
            if a.requires_grad:
                scale = max(float(a.grad.abs().max()), 1e-2)
                grad_err[n] = float((a.grad - b.grad).abs().max()) / scale
        report[name] = dict(loss=(float(loss_p), float(loss_s)), out_err=out_err,
                            keys=sorted(out_s), grad_err=grad_err, shard_rows=rows[-1])
    report["sp_params"] = sorted(n for n, p in sp.named_parameters()
                                 if getattr(p, "sequence_parallel", False) and p.requires_grad)
    return report


@pytest.fixture(scope="module")
def reports():
    return run_distributed(_worker, world_size=2)


def test_sequence_parallel_equals_tp(reports):
    s_v, s_t = TINY.vision_seq_len, TINY.max_text_len
    assert s_v % 2 == 1  # the vision part really is padded
    expected_rows = {"contrastive": (s_v + 1) // 2 + s_t // 2, "odd_text": (s_v + 1) // 2 + 4,
                     "patch_dropout": 2 + s_t // 2, "fused": (s_v + 1) // 2 + 4,
                     "mixed": (s_v + 1) // 2 + s_t // 2, "vision_only": (s_v + 1) // 2,
                     "text_only": 4}
    for rep in reports:
        for case, rows in expected_rows.items():
            r = rep[case]
            assert r["shard_rows"] == rows, (case, r["shard_rows"])
            (lp, ls) = r["loss"]
            assert abs(lp - ls) <= 1e-5 * max(abs(lp), 1.0), (case, lp, ls)
            assert r["out_err"] < 1e-5, (case, r["out_err"])
            worst = max(r["grad_err"], key=r["grad_err"].get)
            assert r["grad_err"][worst] < 1e-5, (case, worst, r["grad_err"][worst])
        assert "fused_hidden" in rep["mixed"]["keys"] and "vl_image_feats" in rep["mixed"]["keys"]
        # The replicated LayerNorms and the row-parallel biases see one shard of the tokens.
        assert any("input_layernorm.A.weight" in n for n in rep["sp_params"])
        assert any("linear_proj.A.bias" in n for n in rep["sp_params"])
        assert not any("inner_norm" in n for n in rep["sp_params"])  # Sub-LN: whole sequence
