"""The model's runtime state: one MultiwayState per model stage, shared by reference with every
multiway module, its layout set by the model's forward, the backbone output carried through it
(and through no layer attribute)."""

import pytest
import torch

from megatron_m2.model.multiway import (
    Modality,
    MultiwayState,
    MultiwayWrapper,
    PackedLayout,
)
from tests.model.common import TINY, make_batch


def test_packed_layout():
    assert PackedLayout.vision_only().vision_rows(7) == 7
    assert PackedLayout.text_only().vision_rows(7) == 0
    assert PackedLayout.both(5).vision_rows(7) == 5
    assert PackedLayout.both(5).vision_rows(3) == 3
    assert PackedLayout.both(5) == PackedLayout(Modality.BOTH, 5)
    for bad in (lambda: PackedLayout.both(0), lambda: PackedLayout(Modality.TEXT, 3)):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(TypeError):
        PackedLayout("both", 3)


def test_wrapper_cuts_where_the_state_says():
    state = MultiwayState(PackedLayout.both(2))
    w = MultiwayWrapper(lambda: torch.nn.Linear(3, 3), state=state)
    x = torch.randn(5, 1, 3)
    parts = w.parts(x)
    assert [(p.branch, p.rows.shape[0], p.modality) for p in parts] == [
        ("A", 2, Modality.VISION), ("B", 3, Modality.TEXT)]
    state.begin(PackedLayout.text_only())  # the wrapper reads the one object
    assert [(p.branch, p.modality) for p in w.parts(x)] == [("B", Modality.TEXT)]
    torch.testing.assert_close(w(x), w.B(x), rtol=0, atol=0)
    with pytest.raises(TypeError, match="MultiwayState"):
        MultiwayWrapper(lambda: torch.nn.Linear(3, 3), state=None)


def test_backbone_slot_is_open_only_during_a_forward():
    state = MultiwayState(PackedLayout.both(2), capture_backbone=True)
    h = torch.ones(1)
    state.record_backbone(h)  # before any forward: not recorded
    assert state.take_backbone() is None
    state.begin(PackedLayout.both(2))
    state.record_backbone(h)
    assert state.take_backbone() is h
    state.record_backbone(h)  # after the take (the recompute in the backward): not recorded
    assert state.take_backbone() is None
    other = MultiwayState(PackedLayout.both(2))  # a stage without the backbone heads
    other.begin(PackedLayout.both(2))
    other.record_backbone(h)
    assert other.take_backbone() is None


def test_one_state_shared_by_the_model(dist_world_of_one):
    from megatron_m2.model import build_model
    from megatron_m2.model.layer_specs import M2VLEntryLayer

    model = build_model(TINY, 1, 1, seed=3)
    state = model.multiway_state
    wrappers = [m for m in model.modules() if isinstance(m, MultiwayWrapper)]
    assert wrappers and all(m.state is state for m in wrappers)
    entry = [m for m in model.modules() if isinstance(m, M2VLEntryLayer)]
    assert len(entry) == 1 and entry[0].multiway_state is state
    assert model.has_backbone_heads and state.capture_backbone
    # The state holds no parameters and adds no state_dict entries.
    assert not any(part in ("state", "multiway_state") for k in model.state_dict()
                   for part in k.split("."))

    images, ids, pad = make_batch(TINY)
    with torch.no_grad():
        for kwargs, layout in (
                (dict(images=images, text_ids=ids, text_pad_mask=pad),
                 PackedLayout.both(TINY.vision_seq_len)),
                (dict(images=images), PackedLayout.vision_only()),
                (dict(text_ids=ids, text_pad_mask=pad), PackedLayout.text_only())):
            out = model(**kwargs)
            assert state.layout == layout
            assert state.take_backbone() is None  # taken by the heads, nothing kept
            assert ("image_feats" in out) == (layout.modality is not Modality.TEXT)
            assert ("text_feats" in out) == (layout.modality is not Modality.VISION)
        # An explicit layout equal to the default gives the same result.
        a = model(images, ids, pad)
        b = model(images, ids, pad, layout=PackedLayout.both(TINY.vision_seq_len))
        assert all(torch.equal(a[k], b[k]) for k in a)
        # A direct call of a layer uses the layout set for it and records nothing.
        before = state.layout
        x = torch.randn(TINY.max_text_len, 2, TINY.hidden_size)
        with model.using_layout(PackedLayout.text_only()):
            assert state.layout == PackedLayout.text_only()
            entry[0](x, attention_mask=torch.zeros(2, TINY.max_text_len, dtype=torch.bool))
        assert state.take_backbone() is None
        assert state.layout == before  # restored
