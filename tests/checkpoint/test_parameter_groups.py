"""Parameter groups outside the key table (``register_parameter_group``, checkpoint/format.py).

A group that a later training objective adds (here a fake ``fake_head.*``, registered by the
test) is saved, resharded and resumed in training checkpoints; exports (single file, official
layout) leave it out unless asked; checkpoints and files written without it still load and
convert, and a run that has it starts it fresh from them.
"""

import json
import logging
import types

import pytest
import torch

from megatron_m2.checkpoint import (
    ConversionError,
    StateDictKeyError,
    TensorFile,
    convert,
    expected_shapes,
    from_official,
    group_of,
    load_checkpoint,
    load_single_file,
    parameter_groups,
    read_checkpoint,
    register_parameter_group,
    save_checkpoint,
    save_single_file,
    to_official,
    unregister_parameter_group,
    validate_state_dict,
    write_model_checkpoint,
)
from megatron_m2.checkpoint.format import groups_record
from tests.model.test_official import CFG, random_official

PREFIX = "fake_head."


def _shapes(cfg):
    d = cfg.hidden_size
    return {"fake_head.dense.weight": (d, d), "fake_head.dense.bias": (d,)}


@pytest.fixture
def fake_group():
    group = register_parameter_group(PREFIX, training_only=True, shapes=_shapes,
                                     description="a test objective's head")
    try:
        yield group
    finally:
        unregister_parameter_group(PREFIX)


def _base(seed=0):
    return from_official(random_official(CFG, seed=seed), CFG)


def _with_head(state_dict, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(state_dict, **{k: torch.randn(s, generator=g) for k, s in _shapes(CFG).items()})


def _head_keys(keys):
    return sorted(k for k in keys if k.startswith(PREFIX))


# -- the registry ----------------------------------------------------------------------------------
def test_registration_rules(fake_group):
    assert fake_group in parameter_groups()
    assert group_of("fake_head.dense.weight") is fake_group
    assert group_of("encoder.layers.0.mlp.linear_fc1.A.weight") is None
    # The same definition again is a no-op; another one needs replace=True.
    assert register_parameter_group(PREFIX, training_only=True, shapes=_shapes,
                                    description="a test objective's head") == fake_group
    with pytest.raises(ValueError, match="overlaps the group"):
        register_parameter_group(PREFIX, training_only=False)
    with pytest.raises(ValueError, match="overlaps the group"):
        register_parameter_group("fake_head.dense.")
    for prefix in ("encoder.", "itc_mlm.", "embeddings.", "logit_scale", "backbone.", "e"):
        with pytest.raises(ValueError, match="overlaps the model's own keys"):
            register_parameter_group(prefix)
    with pytest.raises(ValueError, match="expected letters"):
        register_parameter_group("bad prefix.")
    with pytest.raises(ValueError, match="stage must be"):
        register_parameter_group("other_head.", stage="middle")
    assert [g.prefix for g in parameter_groups()].count(PREFIX) == 1
    unregister_parameter_group(PREFIX)
    assert group_of("fake_head.dense.weight") is None
    register_parameter_group(PREFIX, training_only=True, shapes=_shapes,
                             description="a test objective's head")


def test_validation_knows_the_group(fake_group):
    base = _base()
    validate_state_dict(base, CFG)                    # without the group: still a model
    validate_state_dict(_with_head(base), CFG)        # with it: exactly its keys and shapes
    partial = _with_head(base)
    del partial["fake_head.dense.bias"]
    with pytest.raises(StateDictKeyError, match="parameter group fake_head.* does not match"):
        validate_state_dict(partial, CFG)
    wrong = dict(_with_head(base), **{"fake_head.dense.bias": torch.zeros(3)})
    with pytest.raises(ConversionError, match=r"fake_head.dense.bias \(3,\)"):
        validate_state_dict(wrong, CFG)
    with pytest.raises(StateDictKeyError, match="1 unexpected key.*other_head.w"):
        validate_state_dict(dict(base, **{"other_head.w": torch.zeros(2)}), CFG)


# -- training checkpoints: saved, resumed; older ones start the group fresh ----------------
class _Head(torch.nn.Module):
    def __init__(self, d, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.dense = torch.nn.Linear(d, d)


def _model(seed, head=True):
    from megatron_m2.model import build_model

    model = build_model(CFG, seed=seed)
    if head:
        model.fake_head = _Head(CFG.hidden_size, seed)
    return model


def _trained(model):
    """An fp32 torch AdamW (what optimizer_state_holders sees of a plain megatron optimizer)
    after one step, and a scheduler stand-in."""
    opt = types.SimpleNamespace(optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))
    loss = sum((p.float() ** 2).sum() for p in model.parameters())
    loss.backward()
    opt.optimizer.step()
    return opt, types.SimpleNamespace(state_dict=lambda: {"num_steps": 1})


def _fresh(model):
    return types.SimpleNamespace(optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))


def test_training_checkpoint_keeps_and_resumes_the_group(dist_world_of_one, fake_group, tmp_path,
                                                          caplog):
    model = _model(seed=1)
    opt, sched = _trained(model)
    meta = {"run_id": "r1", "model_config": CFG.to_dict()}
    root = str(tmp_path / "ckpt")
    directory = save_checkpoint(root, 1, model, opt, sched, meta)
    saved = json.load(open(f"{directory}/meta.json"))
    assert saved["parameter_groups"] == {PREFIX: {"training_only": True, "stage": "last"}}
    assert _head_keys(TensorFile(f"{directory}/model_pp000.safetensors").keys()) == \
        sorted(_shapes(CFG))
    assert "exp_avg/fake_head.dense.weight" in TensorFile(f"{directory}/optim_pp000.safetensors")

    other = _model(seed=2)
    other_opt = _fresh(other)
    load_checkpoint(root, other, other_opt, load_rng=False)
    assert torch.equal(other.fake_head.dense.weight, model.fake_head.dense.weight)
    assert torch.equal(other.fake_head.dense.bias, model.fake_head.dense.bias)
    state = other_opt.optimizer.state[other.fake_head.dense.weight]
    assert torch.equal(state["exp_avg"], opt.optimizer.state[model.fake_head.dense.weight]
                       ["exp_avg"])

    # A checkpoint written before the group existed: the base weights load, the head keeps its
    # initial values (with a warning), and so does its (absent) optimizer state.
    plain = _model(seed=3, head=False)
    plain_opt, plain_sched = _trained(plain)
    old = str(tmp_path / "old")
    old_dir = save_checkpoint(old, 1, plain, plain_opt, plain_sched, dict(meta, run_id="r0"))
    assert "parameter_groups" not in json.load(open(f"{old_dir}/meta.json"))
    grown = _model(seed=4)
    initial = grown.fake_head.dense.weight.detach().clone()
    grown_opt = _fresh(grown)
    with caplog.at_level(logging.WARNING, logger="megatron_m2.checkpoint"):
        load_checkpoint(old, grown, grown_opt, load_rng=False)
    assert "has no fake_head.* parameters" in caplog.text
    assert torch.equal(grown.fake_head.dense.weight, initial)
    assert grown.fake_head.dense.weight not in grown_opt.optimizer.state
    assert torch.equal(grown.embeddings.text_embed.weight, plain.embeddings.text_embed.weight)


# -- exports leave the group out unless asked; files without it still convert --------------
def test_exports_leave_training_only_groups_out(dist_world_of_one, fake_group, tmp_path):
    from megatron_m2 import M2Encoder

    state = _with_head(_base())
    root = str(tmp_path / "ours")
    directory = write_model_checkpoint(root, state, CFG, pp=2)
    assert _head_keys(TensorFile(f"{directory}/model_pp001.safetensors").keys()) == \
        sorted(_shapes(CFG))  # stage "last"
    assert json.load(open(f"{directory}/meta.json"))["parameter_groups"] == \
        groups_record(_shapes(CFG))

    assert set(read_checkpoint(root)[0]) == set(expected_shapes(CFG))
    kept = read_checkpoint(root, include_training=True)[0]
    assert all(torch.equal(kept[k], state[k]) for k in _shapes(CFG))

    single = str(tmp_path / "m.safetensors")
    summary = convert("ours", "single", root, single)
    assert summary["left_out"] == {PREFIX: 2}
    assert _head_keys(TensorFile(single).keys()) == []
    assert "parameter_groups" not in TensorFile(single).metadata()
    assert set(load_single_file(single)[0]) == set(expected_shapes(CFG))

    full = str(tmp_path / "full.safetensors")
    assert "left_out" not in convert("ours", "single", root, full, include_training=True)
    assert _head_keys(TensorFile(full).keys()) == sorted(_shapes(CFG))
    assert set(load_single_file(full)[0]) == set(expected_shapes(CFG))
    assert _head_keys(load_single_file(full, include_training=True)[0]) == sorted(_shapes(CFG))

    official = str(tmp_path / "o.pt")
    convert("ours", "official", root, official)
    assert _head_keys(torch.load(official, weights_only=True)) == []
    assert _head_keys(to_official(state, CFG)) == []
    carried = to_official(state, CFG, include_training=True)
    assert _head_keys(from_official(carried, CFG)) == sorted(_shapes(CFG))

    resharded = str(tmp_path / "pp1")
    convert("ours", "ours", root, resharded)  # training checkpoints keep the group
    assert _head_keys(read_checkpoint(resharded, include_training=True)[0]) == \
        sorted(_shapes(CFG))

    enc = M2Encoder.from_pretrained(root, device="cpu")  # inference: the group is left out
    assert set(enc.state_dict()) == set(expected_shapes(CFG))

    # A process that never registered the group reads the files that record it.
    unregister_parameter_group(PREFIX)
    assert set(read_checkpoint(root)[0]) == set(expected_shapes(CFG))
    assert _head_keys(read_checkpoint(root, include_training=True)[0]) == sorted(_shapes(CFG))
    assert _head_keys(load_single_file(full, include_training=True)[0]) == sorted(_shapes(CFG))
    convert("ours", "single", root, str(tmp_path / "again.safetensors"), include_training=True)


def test_files_without_the_group_still_load_and_convert(fake_group, tmp_path):
    state = _base()
    root = str(tmp_path / "old")
    directory = write_model_checkpoint(root, state, CFG)
    single = str(tmp_path / "old.safetensors")
    save_single_file(single, state, CFG)
    # Nothing about groups is written when there are none: the files are as before.
    assert "parameter_groups" not in json.load(open(f"{directory}/meta.json"))
    assert "parameter_groups" not in TensorFile(single).metadata()

    for include in (False, True):
        read = read_checkpoint(root, include_training=include)[0]
        assert set(read) == set(state) and all(torch.equal(read[k], state[k]) for k in state)
        assert set(load_single_file(single, include_training=include)[0]) == set(state)
    summary = convert("ours", "single", root, str(tmp_path / "s.safetensors"))
    assert "left_out" not in summary and summary["tensors"] == len(state)
    convert("single", "official", single, str(tmp_path / "o.pt"), include_training=True)
    back = convert("official", "ours", str(tmp_path / "o.pt"), str(tmp_path / "ours"), cfg=CFG)
    assert back["tensors"] == len(state)
