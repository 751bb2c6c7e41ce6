"""Tests of the official-checkpoint adapter (:mod:`megatron_m2.checkpoint.official`).

Single process: torch.distributed with gloo and a world of one, megatron model parallel 1×1.
The official layout and the forward equations are written out here from the release's module
tree, not taken from the code under test, so that the adapter and the model are checked against
the spec.
"""


import pytest
import torch
from torch.nn import functional as F

from megatron_m2.checkpoint import (
    RELEASE_UNUSED_KEYS,
    StateDictKeyError,
    from_official,
    key_mapping,
    resize_release_positions,
    summarize_unused_keys,
    to_official,
    unused_official_keys,
    unwrap_official,
)
from megatron_m2.config import M2ModelConfig
from megatron_m2.model import build_model

CFG = M2ModelConfig(hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, num_sep_layers=2,
                    num_vl_layers=2, embed_dim=32, image_size=32, patch_size=16, vocab_size=1000,
                    max_text_len=8, eos_token_id=2, cls_token_id=1)


@pytest.fixture(scope="module")
def dist_env(dist_world_of_one):
    """gloo world of one + megatron TP=1/PP=1 groups (shared fixture in tests/conftest.py)."""
    yield


def _model(seed: int = 1234):
    return build_model(CFG, seed=seed).eval()


# -- the official layout, from the release's module tree ------------------------------------------
def official_shapes(cfg: M2ModelConfig) -> dict:
    """Every key of an official checkpoint for ``cfg`` with its shape."""
    d, f, e, p = cfg.hidden_size, cfg.ffn_hidden_size, cfg.embed_dim, cfg.patch_size
    shapes = {
        "backbone.text_embed.weight": (cfg.vocab_size, d),
        "backbone.vision_embed.proj.weight": (d, cfg.in_channels, p, p),
        "backbone.vision_embed.proj.bias": (d,),
        "backbone.vision_embed.cls_token": (1, 1, d),
        "backbone.vision_embed.mask_token": (1, 1, d),
        "backbone.encoder.embed_positions.A.weight": (cfg.num_patches + 3, d),
        "backbone.encoder.embed_positions.B.weight": (cfg.text_pos_table, d),
        "logit_scale": (),
        "logit_vl_scale": (),
    }
    for head in ("text", "image", "vl_text", "vl_image"):
        shapes[f"itc_{head}_proj.fc.weight"] = (e, d)
    layers = [f"backbone.encoder.layers.{i}." for i in range(cfg.num_sep_layers)]
    layers += [f"backbone_vl.layers.{i}." for i in range(cfg.num_vl_layers)]
    for m in "AB":
        for norm in ("backbone.encoder.layer_norm", "backbone_vl.layer_norm"):
            shapes.update({f"{norm}.{m}.weight": (d,), f"{norm}.{m}.bias": (d,)})
        for pre in layers:
            for proj in "qkvo":
                name = f"{pre}self_attn.{'out' if proj == 'o' else proj}_proj.{m}"
                shapes.update({f"{name}.weight": (d, d), f"{name}.bias": (d,)})
            for norm, width in (("self_attn.inner_attn_ln", d), ("self_attn_layer_norm", d),
                                ("final_layer_norm", d), (f"ffn.{m}.ffn_layernorm", f)):
                name = f"{pre}{norm}" + ("" if norm.startswith("ffn") else f".{m}")
                shapes.update({f"{name}.weight": (width,), f"{name}.bias": (width,)})
            shapes.update({f"{pre}ffn.{m}.fc1.weight": (f, d), f"{pre}ffn.{m}.fc1.bias": (f,),
                           f"{pre}ffn.{m}.fc2.weight": (d, f), f"{pre}ffn.{m}.fc2.bias": (d,)})
    return shapes


def random_official(cfg: M2ModelConfig, seed: int = 0) -> dict:
    """A random official-layout checkpoint with non-trivial LayerNorms (exercises Sub-LN)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in official_shapes(cfg).items():
        x = torch.randn(shape, generator=g)
        is_norm = any(t in key for t in ("layer_norm", "_ln.", "ffn_layernorm"))
        if is_norm and key.endswith(".weight"):
            x = 1.0 + 0.2 * x
        elif key.endswith(".bias"):
            x = 0.1 * x
        elif len(shape) >= 2 and ("proj" in key or ".fc" in key):
            x = x / shape[1] ** 0.5 if len(shape) == 2 else x * 0.05  # linear / patch conv
        elif key.startswith("logit"):
            x = 2.0 + x
        else:  # token / position tables, CLS and mask tokens
            x = 0.5 * x
        out[key] = x.contiguous()
    return out


# -- reference forward, from the release's equations ---------------------------------------------
def _ln(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-5)


def _lin(x, sd, name):
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def _ref_layer(x, sd, pre, m, key_pad):
    """One Sub-LN multiway layer on ``[b, s, d]`` with branch ``m``."""
    b, s, d = x.shape
    heads = CFG.num_attention_heads
    y = _ln(x, sd, f"{pre}self_attn_layer_norm.{m}")
    q, k, v = (_lin(y, sd, f"{pre}self_attn.{n}_proj.{m}").view(b, s, heads, -1).transpose(1, 2)
               for n in "qkv")
    scores = q @ k.transpose(-1, -2) * (d // heads) ** -0.5
    if key_pad is not None:
        scores = scores.masked_fill(key_pad[:, None, None, :], float("-inf"))
    ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d)
    h = x + _lin(_ln(ctx, sd, f"{pre}self_attn.inner_attn_ln.{m}"), sd,
                 f"{pre}self_attn.out_proj.{m}")
    y = F.gelu(_lin(_ln(h, sd, f"{pre}final_layer_norm.{m}"), sd, f"{pre}ffn.{m}.fc1"))
    return h + _lin(_ln(y, sd, f"{pre}ffn.{m}.ffn_layernorm"), sd, f"{pre}ffn.{m}.fc2")


def _ref_tower(x, sd, branch, head, key_pad=None):
    """Backbone with ``branch``, then the VL stack with branch A; both pooled embeddings."""
    for i in range(CFG.num_sep_layers):
        x = _ref_layer(x, sd, f"backbone.encoder.layers.{i}.", branch, key_pad)
    x = _ln(x, sd, f"backbone.encoder.layer_norm.{branch}")
    feats = F.normalize(_lin(x[:, 0], sd, f"itc_{head}_proj.fc"), dim=-1)
    for i in range(CFG.num_vl_layers):
        x = _ref_layer(x, sd, f"backbone_vl.layers.{i}.", "A", key_pad)
    x = _ln(x, sd, "backbone_vl.layer_norm.A")
    vl_feats = F.normalize(_lin(x[:, 0], sd, f"itc_vl_{head}_proj.fc"), dim=-1)
    return feats, vl_feats


def reference_forward(official: dict, images, text_ids, text_pad_mask) -> dict:
    """Single-device M2-Encoder in float64, reading the official-layout weights directly.

    Image and text are separate sequences (block-diagonal attention in our packed model).
    """
    sd = {k: v.double() for k, v in official.items()}
    pos_a = sd["backbone.encoder.embed_positions.A.weight"]
    pos_b = sd["backbone.encoder.embed_positions.B.weight"]
    # vision: conv patches, [CLS] prepended, positions from row 2 (fairseq offset)
    x = F.conv2d(images.double(), sd["backbone.vision_embed.proj.weight"],
                 sd["backbone.vision_embed.proj.bias"], stride=CFG.patch_size)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["backbone.vision_embed.cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
    x = x + pos_a[2:2 + x.shape[1]]
    image_feats, vl_image_feats = _ref_tower(x, sd, "A", "image")
    # text: tokens + positions from row 2, padded positions zeroed, padded keys masked
    t = sd["backbone.text_embed.weight"][text_ids] + pos_b[2:2 + text_ids.shape[1]]
    t = t * (~text_pad_mask)[..., None].double()
    text_feats, vl_text_feats = _ref_tower(t, sd, "B", "text", key_pad=text_pad_mask)
    return {"image_feats": image_feats, "vl_image_feats": vl_image_feats,
            "text_feats": text_feats, "vl_text_feats": vl_text_feats,
            "logit_scale": sd["logit_scale"], "logit_vl_scale": sd["logit_vl_scale"]}


def _batch(seed: int = 0):
    """Two images and three captions: full length, and two padded with <|endoftext|>."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, CFG.in_channels, CFG.image_size, CFG.image_size, generator=g)
    s = CFG.max_text_len
    ids = torch.full((3, s), CFG.eos_token_id, dtype=torch.long)
    pad = torch.zeros(3, s, dtype=torch.bool)
    for row, length in enumerate((s, 5, 3)):  # length counts [CLS] and <|endoftext|>
        ids[row, 0] = CFG.cls_token_id
        ids[row, 1:length - 1] = torch.randint(3, CFG.vocab_size, (length - 2,), generator=g)
        pad[row, length:] = True
    return images, ids, pad


# -- tests -----------------------------------------------------------------------------------------
def test_produces_every_official_key(dist_env):
    official = to_official(_model().state_dict(), CFG)
    assert {k: tuple(v.shape) for k, v in official.items()} == official_shapes(CFG)
    assert len(key_mapping(CFG)) == len(official_shapes(CFG))


def test_official_roundtrip_is_identity(dist_env):
    official = random_official(CFG)
    back = to_official(from_official(official, CFG), CFG)
    assert set(back) == set(official)
    for key, value in official.items():
        assert torch.equal(back[key], value), key


def test_ours_roundtrip_is_identity(dist_env):
    model = _model()
    ours = model.state_dict()
    # with a target: exactly the model's entries (weights and _extra_state)
    back = from_official(to_official(ours, CFG), CFG, target=ours)
    assert set(back) == set(ours)
    for key, value in ours.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(back[key], value), key
        else:
            assert back[key] is value, key
    # without: exactly the parameters
    params = dict(model.named_parameters())
    back = from_official(to_official(ours, CFG), CFG)
    assert set(back) == set(params)
    assert all(torch.equal(back[k], params[k]) for k in params)


def test_load_state_dict_from_official(dist_env):
    official = random_official(CFG, seed=1)
    model = _model(seed=7)
    model.load_state_dict(from_official(official, CFG, target=model.state_dict()))  # strict
    loaded = to_official(model.state_dict(), CFG)
    assert all(torch.equal(loaded[k], official[k]) for k in official)

    # Without a target only weights are produced, and a strict load still works (megatron does
    # not require its _extra_state entries).
    other = _model(seed=8)
    other.load_state_dict(from_official(official, CFG))
    loaded = to_official(other.state_dict(), CFG)
    assert all(torch.equal(loaded[k], official[k]) for k in official)


def test_text_embedding_padding(dist_env):
    model = _model()
    ours = {k: v for k, v in model.state_dict().items()}
    table = ours["embeddings.text_embed.weight"]
    padded = dict(ours, **{"embeddings.text_embed.weight":
                           torch.cat([table, torch.zeros(4, CFG.hidden_size)])})
    official = to_official(padded, CFG)
    assert torch.equal(official["backbone.text_embed.weight"], table)
    back = from_official(official, CFG, target=padded)
    assert back["embeddings.text_embed.weight"].shape == (CFG.vocab_size + 4, CFG.hidden_size)
    assert torch.equal(back["embeddings.text_embed.weight"],
                       padded["embeddings.text_embed.weight"])
    with pytest.raises(ValueError, match="fewer than vocab_size"):
        to_official(dict(ours, **{"embeddings.text_embed.weight": table[:-1]}), CFG)
    with pytest.raises(ValueError, match="expected vocab_size"):
        from_official(dict(official, **{"backbone.text_embed.weight": table[:-1]}), CFG)


def release_unused(cfg: M2ModelConfig, seed: int = 0) -> dict:
    """Weights the release's module defines beside the official layout: ``norm`` (LayerNorm d),
    ``pooler.dense`` (Linear d x d) and a few training-only ``visual_tokenizer`` entries."""
    g = torch.Generator().manual_seed(seed)
    d = cfg.hidden_size
    shapes = {"norm.weight": (d,), "norm.bias": (d,), "pooler.dense.weight": (d, d),
              "pooler.dense.bias": (d,), "visual_tokenizer.encoder.cls_token": (1, 1, 8),
              "visual_tokenizer.quantize.embedding.weight": (16, 4),
              "visual_tokenizer.quantize.embedding.initted": (1,)}
    return {k: torch.randn(shape, generator=g) for k, shape in shapes.items()}


def test_unwrap_release_wrappers():
    official = random_official(CFG)
    prefixed = {f"_forward_module.{k}": v for k, v in official.items()}
    prefixed["_forward_module.visual_tokenizer.encoder.weight"] = torch.zeros(2)
    prefixed["visual_tokenizer.quantize.embedding"] = torch.zeros(2)
    training_only = {"visual_tokenizer.encoder.weight", "visual_tokenizer.quantize.embedding"}
    for wrapped, extra in ((official, set()), ({"state_dict": official, "epoch": 3}, set()),
                           ({"module": official}, set()), ({"model": official}, set()),
                           ({"model": {"module": prefixed}}, training_only),
                           ({"state_dict": prefixed, "optimizer_states": [{}]}, training_only)):
        flat = unwrap_official(wrapped)
        # unwrapping removes wrappers and the prefix only; the unused keys are from_official's
        assert set(flat) == set(official) | extra
        assert all(flat[k] is official[k] for k in official)
    back = to_official(from_official({"state_dict": prefixed}, CFG), CFG)
    assert all(torch.equal(back[k], official[k]) for k in official)
    # The first of state_dict / module / model present wins, as in the release's loader.
    other = {"logit_scale": torch.zeros(())}
    assert unwrap_official({"model": other, "module": official, "state_dict": prefixed}).keys() \
        == set(official) | training_only
    assert set(unwrap_official({"model": other, "module": official})) == set(official)
    with pytest.raises(ValueError, match="'module' entry holds NoneType"):
        unwrap_official({"module": None, "model": official})
    with pytest.raises(ValueError, match="both with and without"):
        unwrap_official({"logit_scale": torch.ones(()), "_forward_module.logit_scale": 1})
    with pytest.raises(ValueError, match="state dict"):
        unwrap_official([1, 2])


def test_release_unused_keys_are_accepted_and_listed(dist_env):
    official = random_official(CFG)
    unused = release_unused(CFG)
    full = dict(official, **unused)
    assert unused_official_keys(full) == sorted(unused)
    assert summarize_unused_keys(full) == {
        "count": 7, "groups": {"norm": 2, "pooler.dense": 2, "visual_tokenizer": 3}}
    assert summarize_unused_keys(official) == {"count": 0, "groups": {}}
    ours = from_official({"state_dict": {f"_forward_module.{k}": v for k, v in full.items()}},
                         CFG)
    assert set(ours) == {o for o, _ in key_mapping(CFG)}
    back = to_official(ours, CFG)
    assert set(back) == set(official)
    assert all(torch.equal(back[k], official[k]) for k in official)
    # The table: one pattern per unused module of the release, nothing that our graph maps.
    assert [p for p, _ in RELEASE_UNUSED_KEYS] == ["norm.{p}", "pooler.dense.weight",
                                                   "pooler.dense.bias", "visual_tokenizer.*"]
    assert not unused_official_keys(off for _, off in key_mapping(CFG))


def test_release_unused_shapes_and_unknown_keys_are_checked(dist_env):
    official = dict(random_official(CFG), **release_unused(CFG))
    d = CFG.hidden_size
    for key, shape in (("norm.weight", (d + 1,)), ("pooler.dense.weight", (d, 2 * d)),
                       ("pooler.dense.bias", (d, 1))):
        with pytest.raises(ValueError, match=rf"{key} .* \(expected") as err:
            from_official(dict(official, **{key: torch.zeros(shape)}), CFG)
        assert isinstance(err.value, ValueError) and not isinstance(err.value, KeyError)
    # Keys the release's module never defines (with its config: no output projection, no
    # embedding LayerNorm, no relative position bias) are refused, named, in the usual message.
    for key in ("pooler.extra.weight", "norm.running_mean", "backbone.encoder.output_projection"
                ".weight", "backbone.encoder.layernorm_embedding.A.weight",
                "backbone.encoder.relative_position.relative_attention_bias.weight",
                "visual_tokenizer"):
        with pytest.raises(StateDictKeyError) as err:
            from_official(dict(official, **{key: torch.zeros(1)}), CFG)
        assert err.value.unexpected == [key]
        assert str(err.value) == ("from_official: the checkpoint does not match the official M2 "
                                  f"layout: 1 unexpected key(s): {key}")


def _area_reference(grid: torch.Tensor, out: int) -> torch.Tensor:
    """Area interpolation of a ``[n, n, d]`` grid to ``[out, out, d]``, written out: output cell
    ``i`` averages the input cells ``floor(i*n/out) .. ceil((i+1)*n/out) - 1`` of each axis."""
    n = grid.shape[0]
    res = torch.empty(out, out, grid.shape[2], dtype=torch.float64)
    for i in range(out):
        r0, r1 = (i * n) // out, -((-(i + 1) * n) // out)
        for j in range(out):
            c0, c1 = (j * n) // out, -((-(j + 1) * n) // out)
            res[i, j] = grid[r0:r1, c0:c1].double().mean(dim=(0, 1))
    return res


def test_resize_release_positions():
    # CFG: 32-pixel images in 16-pixel patches, a 2x2 grid (7 rows). Use 64 pixels, a 4x4 grid.
    cfg = M2ModelConfig(**dict(CFG.to_dict(), image_size=64))
    d, want = cfg.hidden_size, cfg.vision_pos_table
    assert want == 3 + 16
    key = "backbone.encoder.embed_positions.A.weight"
    g = torch.Generator().manual_seed(0)
    for side in (2, 3):  # 2x2 -> 4x4 replicates each cell; 3x3 -> 4x4 averages overlaps
        table = torch.randn(3 + side * side, d, generator=g)
        other = torch.randn(2, 2)
        out, resized = resize_release_positions({key: table, "x": other}, cfg)
        assert resized == {key: [3 + side * side, want]} and out["x"] is other
        assert out[key].shape == (want, d)
        assert torch.equal(out[key][:3], table[:3])
        expected = _area_reference(table[3:].reshape(side, side, d), 4).reshape(16, d)
        torch.testing.assert_close(out[key][3:].double(), expected, rtol=0, atol=1e-6)
        if side == 2:
            assert torch.equal(out[key][3:].reshape(4, 4, d),
                               table[3:].reshape(2, 2, d).repeat_interleave(2, 0)
                               .repeat_interleave(2, 1))
    # bf16 tables are resized in float32 and cast back, as the release does
    table = torch.randn(3 + 9, d, generator=g).to(torch.bfloat16)
    out, _ = resize_release_positions({key: table}, cfg)
    assert out[key].dtype == torch.bfloat16
    # a larger table is truncated; the right size is left alone (same tensor)
    table = torch.randn(want + 6, d, generator=g)
    out, resized = resize_release_positions({key: table}, cfg)
    assert torch.equal(out[key], table[:want]) and resized == {key: [want + 6, want]}
    table = torch.randn(want, d, generator=g)
    out, resized = resize_release_positions({key: table}, cfg)
    assert out[key] is table and resized == {}
    # not 3 + a square grid: a clear shape error naming the key
    for rows in (3 + 7, 3, 2):
        with pytest.raises(ValueError, match=rf"{key} has {rows} rows; expected {want}"):
            resize_release_positions({key: torch.zeros(rows, d)}, cfg)
    # from_official resizes too, so a training checkpoint loads into the model directly
    official = random_official(cfg)
    small = dict(official, **{key: official[key][:3 + 4]})
    ours = from_official(small, cfg)
    assert torch.equal(ours["embeddings.embed_positions.A.weight"],
                       resize_release_positions(small, cfg)[0][key])


def test_strict_keys(dist_env):
    official = random_official(CFG)
    bad = dict(official, **{"backbone.encoder.layers.9.ffn.A.fc1.weight": torch.zeros(1)})
    del bad["backbone_vl.layers.1.self_attn.inner_attn_ln.B.bias"]
    with pytest.raises(KeyError) as err:
        from_official(bad, CFG)
    message = str(err.value)
    assert "backbone.encoder.layers.9.ffn.A.fc1.weight" in message
    assert "backbone_vl.layers.1.self_attn.inner_attn_ln.B.bias" in message
    assert err.value.missing == ["backbone_vl.layers.1.self_attn.inner_attn_ln.B.bias"]

    ours = _model().state_dict()
    bad = dict(ours, **{"encoder.layers.0.mlp.extra.weight": torch.zeros(1)})
    del bad["itc_vl_text_proj.weight"]
    with pytest.raises(StateDictKeyError, match="itc_vl_text_proj.weight") as err:
        to_official(bad, CFG)
    assert "encoder.layers.0.mlp.extra.weight" in str(err.value)

    # a target with a weight the mapping does not know, or of another shape
    with pytest.raises(StateDictKeyError, match="encoder.layers.0.mlp.extra.weight"):
        from_official(official, CFG, target=bad)
    reshaped = dict(ours, **{"logit_scale": torch.zeros(1)})
    with pytest.raises(ValueError, match="logit_scale"):
        from_official(official, CFG, target=reshaped)


def test_forward_matches_reference(dist_env):
    """Our model loaded from converted official weights equals the reference forward.

    The model runs in float32 and the reference in float64; float32 rounding through these few
    layers moves the unit-norm features by ~1e-6, while a wrong weight, branch or LayerNorm moves
    them by ~1e-1, so atol 1e-5 separates the two.
    """
    official = random_official(CFG, seed=2)
    model = _model()
    model.load_state_dict(from_official(official, CFG, target=model.state_dict()))
    images, ids, pad = _batch()
    ref = reference_forward(official, images, ids, pad)

    def check(out, keys):
        for key in keys:
            torch.testing.assert_close(out[key].double(), ref[key], atol=1e-5, rtol=0,
                                       msg=lambda m, key=key: f"{key}: {m}")

    with torch.no_grad():
        both = model(images, ids, pad)
        image_only = model(images=images)
        text_only = model(text_ids=ids, text_pad_mask=pad)
    check(both, ["image_feats", "text_feats", "vl_image_feats", "vl_text_feats",
                 "logit_scale", "logit_vl_scale"])
    check(image_only, ["image_feats", "vl_image_feats"])
    check(text_only, ["text_feats", "vl_text_feats"])
    assert "text_feats" not in image_only and "image_feats" not in text_only
    # The padded captions must actually depend on the mask (else padding is not exercised).
    unmasked = reference_forward(official, images, ids, torch.zeros_like(pad))
    assert not torch.allclose(unmasked["vl_text_feats"][1:], ref["vl_text_feats"][1:], atol=1e-3)
