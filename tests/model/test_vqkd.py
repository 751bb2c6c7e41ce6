"""Tests of the BEiT-v2 VQ-KD visual tokenizer (:mod:`megatron_m2.model.vqkd`).

The expected indices and features were computed by the reference code itself
(``beit2/modeling_vqkd.py`` of ``microsoft/unilm``, ``VQKD.get_codebook_indices``) on a tiny
seeded VQ-KD; ``tests/fixtures/vqkd/README.md`` says how. The fixture is committed data: these
tests need neither timm nor the reference code.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_m2.model.vqkd import (
    VQKDConfig,
    VQKDStateDictError,
    VQKDTokenizer,
    load_vqkd_checkpoint,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TENSORS = load_file(str(FIXTURES / "vqkd" / "tiny_vqkd.safetensors"))
META = json.loads((FIXTURES / "vqkd" / "tiny_vqkd_expected.json").read_text())
STATE = {k[len("model."):]: v for k, v in TENSORS.items() if k.startswith("model.")}
REF = META["config"]
CONFIG = VQKDConfig(img_size=REF["img_size"], patch_size=REF["patch_size"],
                    embed_dim=REF["embed_dim"], depth=REF["depth"], num_heads=REF["num_heads"],
                    codebook_size=REF["n_code"], code_dim=REF["code_dim"])
CASES = sorted(META["expected"])
# The reference and this module run the same float32 operations in the same order; on CPU the
# features came out bit-identical. The tolerance leaves room for other BLAS builds only.
FEATURE_ATOL = 1e-5


@pytest.fixture(scope="module")
def tokenizer():
    return VQKDTokenizer.from_state_dict(STATE, config=CONFIG)


@pytest.mark.parametrize("case", CASES)
def test_indices_equal_reference(tokenizer, case):
    images = TENSORS[f"input.{case}"]
    expected = META["expected"][case]
    assert list(images.shape) == expected["shape"]
    features = tokenizer.encode_features(images)
    torch.testing.assert_close(features, TENSORS[f"features.{case}"], atol=FEATURE_ATOL, rtol=0)
    indices = tokenizer.get_codebook_indices(images)
    assert indices.dtype == torch.long
    grid = (images.shape[-2] // CONFIG.patch_size) * (images.shape[-1] // CONFIG.patch_size)
    assert indices.shape == (images.shape[0], grid)
    assert indices.tolist() == expected["indices"]
    assert tokenizer(images).tolist() == expected["indices"]


def test_fixture_exercises_the_paths():
    """uint8 [0, 255] and float [0, 1] inputs, an off-size image (interpolated positions),
    weights beyond the tokenizer's (decoder, statistics) and a non-unit-norm codebook."""
    assert {TENSORS[f"input.{c}"].dtype for c in CASES} == {torch.float32, torch.uint8}
    assert any(TENSORS[f"input.{c}"].shape[-1] != REF["img_size"] for c in CASES)
    assert any(k.startswith("decoder.") for k in STATE)
    assert "quantize.embedding.embed_avg" in STATE
    norms = STATE["quantize.embedding.weight"].norm(dim=-1)
    assert (norms - 1).abs().max() > 0.05
    assert len({i for c in CASES for row in META["expected"][c]["indices"] for i in row}) > 8


def test_config_inferred_from_shapes():
    inferred = VQKDConfig.infer(STATE, num_heads=REF["num_heads"])
    assert inferred == CONFIG
    model = VQKDTokenizer.from_state_dict(STATE, num_heads=REF["num_heads"])
    assert model.config == CONFIG
    assert model.num_patches == (REF["img_size"] // REF["patch_size"]) ** 2
    assert model.codebook_size == REF["n_code"]
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_release_prefix(tmp_path):
    """The ``visual_tokenizer.*`` subtree of a release checkpoint, beside the backbone's weights,
    directly and from a Lightning/DeepSpeed-style file (``_forward_module.`` prefix)."""
    release = {f"visual_tokenizer.{k}": v for k, v in STATE.items()}
    release["backbone.encoder.layer_norm.A.weight"] = torch.ones(4)
    release["logit_scale"] = torch.tensor(1.0)
    model = VQKDTokenizer.from_state_dict(release, prefix="visual_tokenizer.", config=CONFIG)
    case = CASES[0]
    expected = META["expected"][case]["indices"]
    assert model.get_codebook_indices(TENSORS[f"input.{case}"]).tolist() == expected

    path = tmp_path / "release.ckpt"
    torch.save({"epoch": 3, "state_dict": {f"_forward_module.{k}": v
                                           for k, v in release.items()}}, path)
    loaded = load_vqkd_checkpoint(str(path), prefix="visual_tokenizer.", config=CONFIG)
    assert loaded.get_codebook_indices(TENSORS[f"input.{case}"]).tolist() == expected


def test_beit2_checkpoint_file(tmp_path):
    """BEiT-v2's own tokenizer files hold the state dict under ``model``."""
    path = tmp_path / "vqkd.pth"
    torch.save({"model": dict(STATE)}, path)
    model = load_vqkd_checkpoint(str(path), num_heads=REF["num_heads"])
    case = CASES[-1]
    assert (model.get_codebook_indices(TENSORS[f"input.{case}"]).tolist()
            == META["expected"][case]["indices"])


def test_release_key_names_match_reference():
    """The release subtree recorded in ``official_release`` (same VQKD module, codebook 64 x 8,
    two heads) loads by prefix and tokenizes; its key set is the fixture's."""
    shapes = json.loads((FIXTURES / "official_release" / "tiny_release_keys.json").read_text())
    prefix = "visual_tokenizer."
    release = {k: torch.randn(v) if v else torch.tensor(0.5)
               for k, v in shapes["shapes"].items() if k.startswith(prefix)}
    release[prefix + "quantize.embedding.initted"] = torch.ones(1)
    assert {k[len(prefix):] for k in release} == set(STATE)
    model = VQKDTokenizer.from_state_dict(release, prefix=prefix,
                                          num_heads=shapes["visual_tokenizer"]["num_heads"])
    cfg = shapes["release_config"]
    assert model.config.codebook_size == cfg["codebook_size"]
    assert model.config.code_dim == cfg["codebook_dim"]
    images = torch.rand(2, 3, cfg["image_size"], cfg["image_size"])
    indices = model.get_codebook_indices(images)
    assert indices.shape == (2, (cfg["image_size"] // cfg["patch_size"]) ** 2)
    assert int(indices.min()) >= 0 and int(indices.max()) < cfg["codebook_size"]


def test_missing_keys_named():
    broken = {f"visual_tokenizer.{k}": v for k, v in STATE.items()
              if k not in ("encoder.blocks.1.attn.q_bias", "encode_task_layer.2.weight")}
    with pytest.raises(VQKDStateDictError) as info:
        VQKDTokenizer.from_state_dict(broken, prefix="visual_tokenizer.", config=CONFIG)
    message = str(info.value)
    assert "missing 2 needed key(s)" in message
    assert "visual_tokenizer.encoder.blocks.1.attn.q_bias" in message
    assert "visual_tokenizer.encode_task_layer.2.weight" in message
    assert sorted(info.value.missing) == ["encode_task_layer.2.weight",
                                          "encoder.blocks.1.attn.q_bias"]


def test_missing_codebook_when_inferring():
    broken = {k: v for k, v in STATE.items() if k != "quantize.embedding.weight"}
    with pytest.raises(VQKDStateDictError, match="quantize.embedding.weight"):
        VQKDTokenizer.from_state_dict(broken, num_heads=REF["num_heads"])


def test_wrong_prefix_reports_everything_missing():
    with pytest.raises(VQKDStateDictError, match="missing"):
        VQKDTokenizer.from_state_dict(STATE, prefix="visual_tokenizer.", config=CONFIG)


def test_unknown_encoder_layout_refused():
    extra = dict(STATE)
    extra["encoder.blocks.0.attn.relative_position_bias_table"] = torch.zeros(3, 4)
    with pytest.raises(VQKDStateDictError, match="relative_position_bias_table") as info:
        VQKDTokenizer.from_state_dict(extra, config=CONFIG)
    assert info.value.unexpected == ["encoder.blocks.0.attn.relative_position_bias_table"]


def test_shape_mismatch_refused():
    wrong = VQKDConfig(img_size=REF["img_size"], patch_size=REF["patch_size"],
                       embed_dim=REF["embed_dim"], depth=REF["depth"], num_heads=REF["num_heads"],
                       codebook_size=2 * REF["n_code"], code_dim=REF["code_dim"])
    with pytest.raises(VQKDStateDictError, match="quantize.embedding.weight"):
        VQKDTokenizer.from_state_dict(STATE, config=wrong)


def test_uninitialised_codebook_refused():
    state = dict(STATE)
    state["quantize.embedding.initted"] = torch.zeros(1)
    with pytest.raises(ValueError, match="never initialised"):
        VQKDTokenizer.from_state_dict(state, config=CONFIG)


def test_imagenet_norm_pre_process():
    model = VQKDTokenizer.from_state_dict(STATE, config=CONFIG)
    images = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(model.pre_process(images), images * 2 - 1)  # default: [0,1]->[-1,1]
    imnet = VQKDTokenizer.from_state_dict(
        STATE, config=VQKDConfig(**{**CONFIG.__dict__, "process_type": "imagenet_norm"}))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(imnet.pre_process(images), (images - mean) / std)
