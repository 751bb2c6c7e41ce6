"""Activation recomputation and BF16 mixed precision on the real trainer (tiny flavor, CPU).

Recomputation re-runs the same operators on the same inputs in the backward, so in fp32 on CPU
the loss and every gradient must be *bitwise* equal to the run that keeps its activations
(tolerance 0; the CPU kernels are deterministic and the RNG replay of megatron's checkpoint goes
through the CPU layer's generator mapping). The recompute path must also really run: the layers
it covers are called twice per micro-batch and the forward/backward's peak tensor memory drops.

BF16 rounds weights and activations to 8 significant bits (relative 2^-9 ≈ 2e-3 per rounding),
so its losses are compared with the fp32 run's within 5e-2 relative on the first step (measured:
~3.5e-3) and 1e-1 after three updates; checkpoints hold the fp32 main weights, which bf16 and
fp32 runs load exactly.
"""

import pytest
import torch

from megatron_m2.config import ConfigError
from megatron_m2.training.arguments import parse_args, recompute_options
from megatron_m2.training.validation import validate_args
from tests.helpers.distributed import run_distributed

pytestmark = pytest.mark.slow

COMMON = ["--flavor", "tiny", "--synthetic", "--synthetic-num-samples", "16",
          "--global-batch-size", "8", "--micro-batch-size", "4", "--seed", "3", "--lr", "5e-4",
          "--lr-decay-style", "constant", "--itc-group-size", "-1"]
RECOMPUTE = {  # flags -> (flags of the reference run, local layers recomputed on one stage)
    "uniform1_vl": (["--recompute-activations", "--itc-heads", "vl"], ["--itc-heads", "vl"],
                    range(0, 6)),
    "uniform1_both": (["--recompute-activations"], [], range(0, 6)),
    "block3_both": (["--recompute-granularity", "full", "--recompute-method", "block",
                     "--recompute-num-layers", "3"], [], range(0, 3)),
}


def _trainer(flags, world_size=1):
    from megatron_m2.training.trainer import Trainer

    args = parse_args(COMMON + flags)
    validate_args(args, world_size)
    return Trainer(args)


def _measured_steps(trainer, steps):
    """Run ``steps`` steps; return the losses, the per-layer forward calls and the peak tensor
    memory of each forward/backward schedule (optimizer step excluded)."""
    from megatron_m2.utils.memory import PeakTensorMemory

    calls = [0] * len(trainer.model.encoder.layers)
    for i, layer in enumerate(trainer.model.encoder.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    peaks, schedule = [], trainer.forward_backward

    def measured(**kwargs):
        with PeakTensorMemory() as mem:
            out = schedule(**kwargs)
        peaks.append(mem.peak_bytes)
        return out

    trainer.forward_backward = measured
    losses = [trainer.train_step()["loss"] for _ in range(steps)]
    return losses, calls, max(peaks)


def _grads(trainer):
    """This rank's reduced gradient of every trained parameter (the DDP main_grad buffers),
    from the last step (gradient clipping is off, so the optimizer left them untouched)."""
    return {n: p.main_grad.clone() for n, p in trainer.model.named_parameters()
            if p.requires_grad}


def _compare_recompute(flags, ref_flags, tp, steps=2):
    world = tp
    plain = _trainer(ref_flags + ["--clip-grad", "0", "--tensor-model-parallel-size", str(tp)],
                     world)
    ref_losses, ref_calls, ref_peak = _measured_steps(plain, steps)
    ref_grads = _grads(plain)
    rec = _trainer(flags + ["--clip-grad", "0", "--tensor-model-parallel-size", str(tp)], world)
    losses, calls, peak = _measured_steps(rec, steps)
    grads = _grads(rec)
    assert sorted(grads) == sorted(ref_grads)
    diff = max((grads[n] - ref_grads[n]).abs().max().item() for n in grads)
    nonzero = sum(bool(g.abs().sum() > 0) for g in grads.values())
    return {"losses": losses, "ref_losses": ref_losses, "max_grad_diff": diff,
            "nonzero_grads": nonzero, "num_grads": len(grads), "calls": calls,
            "ref_calls": ref_calls, "peak": peak, "ref_peak": ref_peak}


def _check_recompute(r, recomputed, steps=2, micro_batches=2):
    assert r["losses"] == r["ref_losses"]  # bitwise
    assert r["max_grad_diff"] == 0.0
    assert r["nonzero_grads"] > r["num_grads"] // 2  # the comparison is not of zeros
    plain = steps * micro_batches
    assert r["ref_calls"] == [plain] * len(r["ref_calls"])
    assert r["calls"] == [2 * plain if i in recomputed else plain
                          for i in range(len(r["calls"]))]
    assert r["peak"] < 0.9 * r["ref_peak"], (r["peak"], r["ref_peak"])


# -- flags -------------------------------------------------------------------------------------
def test_recompute_flags_are_validated():
    def check(flags, world=1):
        args = parse_args(COMMON + flags)
        validate_args(args, world)
        return recompute_options(args)

    assert check([]) == {}
    assert check(["--recompute-activations", "--itc-heads", "vl"]) == {
        "recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    assert check(RECOMPUTE["block3_both"][0])["recompute_num_layers"] == 3
    bad = {
        "needs --recompute-method": ["--recompute-granularity", "full"],
        "needs --recompute-granularity full": ["--recompute-method", "uniform",
                                               "--recompute-num-layers", "1"],
        "excludes --recompute-num-layers": ["--recompute-activations", "--itc-heads", "vl",
                                            "--recompute-num-layers", "2"],
        "must divide": ["--recompute-granularity", "full", "--recompute-method", "uniform",
                        "--recompute-num-layers", "4", "--itc-heads", "vl"],
        "between 1 and": ["--recompute-granularity", "full", "--recompute-method", "block",
                          "--recompute-num-layers", "7", "--itc-heads", "vl"],
    }
    for message, flags in bad.items():
        with pytest.raises(ConfigError, match=message):
            check(flags)


# -- recomputation: same loss and gradients, less memory ---------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_checkpoint_replays_the_random_state_on_cpu():
    """megatron's ``tensor_parallel.checkpoint`` re-runs dropout with the mask of the first
    forward: the CPU layer maps its CUDA RNG state calls onto the CPU generator."""
    from megatron.core import tensor_parallel

    from megatron_m2.parallel import cpu_compat

    was_on = cpu_compat.is_enabled()
    cpu_compat.enable()
    try:
        w = torch.randn(64, 64, requires_grad=True)
        x = torch.randn(8, 64, requires_grad=True)  # a reentrant checkpoint needs one

        def f(inp):
            return torch.nn.functional.dropout(inp @ w, p=0.5, training=True).tanh()

        def grad(seed, recompute):
            torch.manual_seed(seed)
            w.grad = None
            y = tensor_parallel.checkpoint(f, False, x) if recompute else f(x)
            y.sum().backward()
            return w.grad.clone()

        assert torch.equal(grad(0, recompute=True), grad(0, recompute=False))
        assert not torch.equal(grad(0, recompute=False), grad(1, recompute=False))  # random
    finally:
        if not was_on:
            cpu_compat.disable()
    if not was_on:
        with pytest.raises((RuntimeError, AssertionError)):
            torch.cuda.get_rng_state()  # the stubs are gone again


@pytest.mark.parametrize("case", sorted(RECOMPUTE))
def test_recompute_is_exact_tp1(dist_world_of_one, case):
    flags, ref_flags, recomputed = RECOMPUTE[case]
    r = _compare_recompute(flags, ref_flags, tp=1)
    _check_recompute(r, recomputed)


def test_recompute_is_exact_tp2():
    flags, ref_flags, recomputed = RECOMPUTE["uniform1_vl"]
    results = run_distributed(_compare_recompute, world_size=2, timeout=120, flags=flags,
                              ref_flags=ref_flags, tp=2, steps=1)
    for r in results:  # each rank compares its own tensor-parallel shards
        _check_recompute(r, recomputed, steps=1)


# -- BF16 ----------------------------------------------------------------------------------------
def _optimizer_dtypes(trainer):
    """(model param dtypes, fp32 main param dtypes, count of main params) of a bf16 run."""
    model = {p.dtype for p in trainer.model.parameters()}
    mains = [p for opt in trainer.optimizer.chained_optimizers
             for group in opt.fp32_from_float16_groups for p in group]
    return model, {p.dtype for p in mains}, len(mains)


def test_bf16_trains_close_to_fp32(dist_world_of_one):
    fp32 = _trainer([])
    ref = [fp32.train_step()["loss"] for _ in range(3)]
    bf16 = _trainer(["--bf16"])
    model_dtypes, main_dtypes, n_main = _optimizer_dtypes(bf16)
    assert model_dtypes == {torch.bfloat16}
    assert main_dtypes == {torch.float32}
    assert n_main == sum(p.requires_grad for p in bf16.model.parameters())
    losses = [bf16.train_step()["loss"] for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses != ref  # bf16 really computes in bf16
    assert abs(losses[0] - ref[0]) <= 5e-2 * ref[0], (losses, ref)
    for a, b in zip(losses, ref):
        assert abs(a - b) <= 1e-1 * b, (losses, ref)
    assert losses[-1] < losses[0]  # and it learns
    assert all(p.main_grad.dtype == torch.float32 for p in bf16.model.parameters()
               if p.requires_grad)


def _weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def _mains(trainer):
    """The fp32 main weight of every bf16 parameter, by name."""
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    return {names[id(mp)]: main.detach().clone() for opt in trainer.optimizer.chained_optimizers
            for mg, fg in zip(opt.float16_groups, opt.fp32_from_float16_groups)
            for mp, main in zip(mg, fg)}


def test_bf16_checkpoints_load_into_fp32_and_back(dist_world_of_one, tmp_path):
    # bf16 -> bf16 resume is exact; bf16 -> fp32 loads the fp32 main weights exactly.
    bf16 = _trainer(["--bf16", "--save", str(tmp_path / "bf16")])
    for _ in range(2):
        bf16.train_step()
    bf16.save()
    mains = _mains(bf16)
    assert any((m.bfloat16().float() != m).any() for m in mains.values())  # not bf16 values
    straight = [bf16.train_step()["loss"] for _ in range(2)]
    resumed = _trainer(["--bf16", "--load", str(tmp_path / "bf16")])
    assert _mains(resumed).keys() == mains.keys()
    assert all(torch.equal(_mains(resumed)[n], mains[n]) for n in mains)
    assert [resumed.train_step()["loss"] for _ in range(2)] == straight
    as_fp32 = _trainer(["--load", str(tmp_path / "bf16")])
    loaded = _weights(as_fp32)
    assert all(torch.equal(loaded[n], mains[n]) for n in mains)
    cont = [as_fp32.train_step()["loss"] for _ in range(2)]
    for a, b in zip(cont, straight):
        assert abs(a - b) <= 5e-2 * b, (cont, straight)

    # fp32 -> bf16: bf16 weights are the rounding of the fp32 ones, the main weights exact.
    fp32 = _trainer(["--save", str(tmp_path / "fp32")])
    for _ in range(2):
        fp32.train_step()
    fp32.save()
    ref = _weights(fp32)
    for extra in ([], ["--no-load-optim"]):
        as_bf16 = _trainer(["--bf16", "--load", str(tmp_path / "fp32")] + extra)
        weights, mains = _weights(as_bf16), _mains(as_bf16)
        assert all(torch.equal(weights[n], ref[n].bfloat16()) for n in ref)
        assert all(torch.equal(mains[n], ref[n]) for n in mains), extra
    assert torch.isfinite(torch.tensor(as_bf16.train_step()["loss"]))


def _bf16_distributed_optimizer(tmp):
    """DP=2 with --bf16 --use-distributed-optimizer: dtypes, two steps, then the checkpoint
    loaded into an fp32 run without the distributed optimizer."""
    from megatron_m2.checkpoint import optimizer_state_holders

    run = _trainer(["--bf16", "--use-distributed-optimizer", "--micro-batch-size", "2",
                    "--save", tmp], world_size=2)
    holders = list(optimizer_state_holders(run.optimizer))
    out = {"model": {str(p.dtype) for p in run.model.parameters()},
           "main": {str(h.dtype) for _, h, rng, _ in holders if rng is not None},
           "sharded": sum(h.numel() for _, h, _, _ in holders)
           < sum(p.numel() for p in run.model.parameters() if p.requires_grad)}
    out["losses"] = [run.train_step()["loss"] for _ in range(2)]
    run.save()
    names = {id(p): n for n, p in run.model.named_parameters()}
    shards = {names[id(mp)]: (h.detach().clone(), rng) for mp, h, rng, _ in holders}
    fp32 = _trainer(["--micro-batch-size", "2", "--load", tmp], world_size=2)
    weights = dict(fp32.model.named_parameters())
    out["main_matches"] = all(
        torch.equal(weights[n].detach().reshape(-1)[lo:hi], shard.reshape(-1))
        for n, (shard, (lo, hi)) in shards.items())
    out["next_loss"] = fp32.train_step()["loss"]
    return out


def test_bf16_distributed_optimizer_checkpoint(tmp_path):
    results = run_distributed(_bf16_distributed_optimizer, world_size=2, timeout=120,
                              tmp=str(tmp_path / "ckpt"))
    for r in results:
        assert r["model"] == {"torch.bfloat16"} and r["main"] == {"torch.float32"}
        assert r["sharded"]  # each rank holds only its part of the main weights
        assert r["main_matches"]  # the fp32 run got the exact fp32 main weights
        assert all(torch.isfinite(torch.tensor(r["losses"] + [r["next_loss"]])))
        assert r["losses"] == results[0]["losses"]
