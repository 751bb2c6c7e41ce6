"""The objective interface: the trainer's step code names no objective.

A toy second objective (a text-only loss: the backbone head's caption embeddings against the
VL head's, InfoNCE within the micro-batch) is defined here and plugs in through the registry
alone; ``m2-pretrain``'s own trainer then trains with it, logs its metric and calls its hooks.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from megatron_m2.objectives import OBJECTIVES, Objective, register_objective


class TextOnly(Objective):
    name = "toy_text_only"
    outputs = ("text_feats", "vl_text_feats")
    data_keys = ("text_ids", "text_pad_mask")
    metrics = ("text_acc",)
    calls = {"loss": 0, "after_step": 0}

    def loss(self, outputs, batch=None):
        TextOnly.calls["loss"] += 1
        a = F.normalize(outputs["text_feats"], dim=-1)
        b = F.normalize(outputs["vl_text_feats"], dim=-1)
        logits = a @ b.t() * 10.0
        labels = torch.arange(a.shape[0])
        acc = (logits.argmax(1) == labels).float().mean()
        return F.cross_entropy(logits, labels), {"text_acc": acc}

    def after_optimizer_step(self, optimizer):
        TextOnly.calls["after_step"] += 1


@pytest.fixture
def toy_objective():
    register_objective(TextOnly)
    TextOnly.calls.update(loss=0, after_step=0)
    yield TextOnly
    OBJECTIVES.pop(TextOnly.name)


def _train(objective, iters=8):
    from megatron_m2.parallel import cpu_compat
    from megatron_m2.training.arguments import parse_args
    from megatron_m2.training.run import run
    from megatron_m2.training.validation import validate_args
    from tests.helpers.distributed import free_port

    args = parse_args(["--flavor", "tiny", "--synthetic", "--train-iters", str(iters),
                       "--global-batch-size", "8", "--micro-batch-size", "4", "--lr", "1e-3",
                       "--objective", objective, "--log-interval", "100", "--num-workers", "0"])
    validate_args(args, 1)
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    was_on = cpu_compat.is_enabled()
    try:
        return run(args)
    finally:
        if not was_on:
            cpu_compat.disable()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_a_second_objective_plugs_in_through_the_registry(toy_objective):
    from megatron_m2.training.arguments import parse_args

    assert "toy_text_only" in parse_args.__globals__["build_parser"]()._option_string_actions[
        "--objective"].choices
    toy = _train("toy_text_only")
    # Its loss ran for every micro-batch of every step, its hook after every update.
    assert toy_objective.calls == {"loss": 8 * 2, "after_step": 8}
    assert all("text_acc" in r and "loss_vl" not in r for r in toy)
    assert toy[-1]["loss"] < 0.5 * toy[0]["loss"], [r["loss"] for r in toy]
    # The same run with GBA-ITC trains another loss (and logs its own metrics).
    itc = _train("itc", iters=1)
    assert "loss_vl" in itc[0] and "text_acc" not in itc[0]
    assert itc[0]["loss"] != pytest.approx(toy[0]["loss"], rel=1e-3)


def test_feature_accumulation_needs_an_objective_that_has_it(toy_objective):
    from megatron_m2.config import ConfigError
    from megatron_m2.training.arguments import parse_args
    from megatron_m2.training.validation import validate_args

    args = parse_args(["--synthetic", "--objective", "toy_text_only",
                       "--itc-accumulate-features"])
    with pytest.raises(ConfigError, match="toy_text_only"):
        validate_args(args, 1)


def test_objective_needs_are_checked():
    from megatron_m2.config import ConfigError

    class NeedsBoxes(TextOnly):
        name = "needs_boxes"
        data_keys = ("images", "boxes")

    class FirstStage(TextOnly):
        name = "first"
        stage = "first"

    fields = ("images", "text_ids", "text_pad_mask")
    TextOnly(None).check_fits(fields)
    with pytest.raises(ConfigError, match="needs batch field\\(s\\) boxes"):
        NeedsBoxes(None).check_fits(fields)
    with pytest.raises(ConfigError, match="last pipeline stage only"):
        FirstStage(None).check_fits(fields)
