"""Checkpoint conversion (``megatron_m2.checkpoint``, ``tools/convert_checkpoint.py``).

The official-layout source is written from the release's key layout by
``tests/model/test_official.py`` (random values, non-trivial LayerNorms), independently of the
code under test, and wrapped the way releases are. One conversion chain through the command
line (official → ours at TP=2 PP=2 → single → official) is shared by the round-trip and the
loading tests.
"""

import collections
import json
import logging
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from megatron_m2.checkpoint import (
    SINGLE_FILE_FORMAT,
    ConversionError,
    StateDictKeyError,
    UnsafeCheckpointError,
    expected_shapes,
    from_official,
    key_mapping,
    load_official,
    load_single_file,
    read_any,
    read_checkpoint,
    save_single_file,
    unused_official_keys,
    write_model_checkpoint,
)
from megatron_m2.checkpoint.official import _torch_version
from megatron_m2.cli.convert import main
from megatron_m2.config import ConfigError
from megatron_m2.flavors import get_flavor
from tests.helpers.distributed import run_distributed
from tests.model.common import gather_full, make_batch
from tests.model.test_official import official_shapes, random_official

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "convert_checkpoint.py"
RELEASE_KEYS = ROOT / "tests" / "fixtures" / "official_release" / "tiny_release_keys.json"
CFG = get_flavor("tiny")
# A real SentencePiece model (m2-convert checks it is one), carried byte for byte.
TOKENIZER = (ROOT / "data" / "emoji_demo" / "tokenizer.model").read_bytes()


def _cli(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))


def _release(official):
    """Wrapped like a release: Lightning ``state_dict`` + ``_forward_module.`` prefix, a
    training-only ``visual_tokenizer`` weight and a non-tensor entry beside the weights."""
    inner = {f"_forward_module.{k}": v for k, v in official.items()}
    inner["_forward_module.visual_tokenizer.encoder.weight"] = torch.randn(4, 4)
    return {"state_dict": inner, "epoch": 7}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    d = tmp_path_factory.mktemp("convert")
    official = random_official(CFG, seed=3)
    torch.save(_release(official), d / "release.pt")
    (d / "tok.model").write_bytes(TOKENIZER)
    steps = [
        ("--from", "official", "--to", "ours", "--flavor", "tiny", "--input", d / "release.pt",
         "--output", d / "ours", "--tp", 2, "--pp", 2, "--tokenizer-model", d / "tok.model"),
        ("--from", "ours", "--to", "single", "--input", d / "ours", "--output",
         d / "m2.safetensors"),
        ("--from", "single", "--to", "official", "--input", d / "m2.safetensors", "--output",
         d / "back.pt"),
    ]
    summaries = []
    for args in steps:
        r = _cli(*args)
        assert r.returncode == 0, r.stderr
        summaries.append(json.loads(r.stdout.strip().splitlines()[-1]))
        assert "m2-convert: wrote" in r.stderr  # the log names what was written
    return dict(dir=d, official=official, summaries=summaries)


# -- 1. round trip ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_round_trip_is_exact(chain):
    d, official = chain["dir"], chain["official"]
    back = torch.load(d / "back.pt", map_location="cpu", weights_only=True)
    assert set(back) == set(official) == set(official_shapes(CFG))  # visual_tokenizer dropped
    unequal = [k for k in official if not torch.equal(back[k], official[k])]
    assert not unequal, unequal[:5]
    assert all(v.dtype == torch.float32 for v in back.values())
    assert [s["tensors"] for s in chain["summaries"]] == [len(official)] * 3
    assert chain["summaries"][0]["unused_official_keys"] == {
        "count": 1, "groups": {"visual_tokenizer": 1}}
    assert chain["summaries"][0]["resized"] == {}
    assert "unused_official_keys" not in chain["summaries"][1]  # only official inputs have it

    # The intermediate checkpoint is in our format: tracker, meta.json, one file per stage.
    ckpt = d / "ours" / "iter_0000000"
    assert (d / "ours" / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["layout"] == {"tp": 2, "pp": 2} and meta["model_config"] == CFG.to_dict()
    assert meta["flavor"] == "tiny" and meta["step"] == 0 and meta["format_version"] == 1
    assert sorted(os.listdir(ckpt)) == ["meta.json", "model_pp000.safetensors",
                                        "model_pp001.safetensors", "tokenizer.model"]
    _, cfg, tokenizer, _ = read_checkpoint(str(d / "ours"))
    assert cfg == CFG and tokenizer == TOKENIZER
    # The serving file carries the config and the tokenizer.
    _, cfg, tokenizer = load_single_file(str(d / "m2.safetensors"))
    assert cfg == CFG and tokenizer == TOKENIZER


# -- 2. the converted checkpoint loads onto other layouts ---------------------------------------
def _load_worker(ckpt: str, release: str):
    from megatron.core import parallel_state as ps

    from megatron_m2.checkpoint import load_checkpoint
    from megatron_m2.model import build_model
    from megatron_m2.model.init import canonical_name
    from megatron_m2.parallel.distributed import initialize_model_parallel

    source = from_official(torch.load(release, map_location="cpu", weights_only=True), CFG)
    images, ids, pad = make_batch(CFG, batch=3, seed=5)
    report = {}
    for tp, pp in ((2, 1), (1, 2), (1, 1)):
        initialize_model_parallel(tp, pp)
        # A different seed than anything in the checkpoint: every weight must come from it.
        model = build_model(CFG, tp, pp, seed=999).eval()
        load_checkpoint(ckpt, model)
        tp_group = ps.get_tensor_model_parallel_group()
        names, unequal = [], []
        for name, p in model.named_parameters():
            canon = canonical_name(name, model.layer_offset)
            names.append(canon)
            if not torch.equal(gather_full(p, name, tp_group, CFG), source[canon]):
                unequal.append(canon)
        entry = {"names": names, "unequal": unequal,
                 "shapes": {canonical_name(n, model.layer_offset): tuple(p.shape)
                            for n, p in model.named_parameters()}}
        if pp == 1:
            with torch.no_grad():
                out = model(images, ids, pad)
            entry["feats"] = {k: v.detach() for k, v in out.items() if k.endswith("feats")}
        report[(tp, pp)] = entry
        report[(tp, pp)]["pp_rank"] = ps.get_pipeline_model_parallel_rank()
    return report


@pytest.mark.slow
def test_converted_checkpoint_loads_on_tp2_pp2_and_tp1(chain):
    from safetensors import safe_open

    d = chain["dir"]
    reports = run_distributed(_load_worker, world_size=2, ckpt=str(d / "ours"),
                              release=str(d / "release.pt"))
    n_params = len(expected_shapes(CFG))
    stage_keys = []
    for rank in range(2):
        with safe_open(str(d / "ours" / "iter_0000000" / f"model_pp{rank:03d}.safetensors"),
                       framework="pt") as f:
            stage_keys.append(set(f.keys()))
    for rep in reports:
        # Every loaded weight equals the source exactly, on every layout.
        for layout, entry in rep.items():
            assert not entry["unequal"], (layout, entry["unequal"][:5])
        assert len(rep[(2, 1)]["names"]) == len(rep[(1, 1)]["names"]) == n_params
        # TP=1 PP=1: the model's parameter shapes are the shape table of the converter.
        assert rep[(1, 1)]["shapes"] == expected_shapes(CFG)
        # PP=2: each stage file holds exactly the weights of the stage that builds them.
        pp_entry = rep[(1, 2)]
        assert set(pp_entry["names"]) == stage_keys[pp_entry["pp_rank"]]
        # Embeddings of the TP=2 and TP=1 models agree. Tolerance: the layouts differ only in
        # fp32 summation order (row-parallel matmuls add two partial products, Sub-LN
        # statistics two partial sums), ~1e-7 on these unit-norm features; a mis-sliced shard
        # shows up at 1e-2 or more.
        tp2, tp1 = rep[(2, 1)]["feats"], rep[(1, 1)]["feats"]
        assert set(tp1) == {"image_feats", "text_feats", "vl_image_feats", "vl_text_feats"}
        for key in tp1:
            assert torch.isfinite(tp1[key]).all()
            err = float((tp2[key] - tp1[key]).abs().max())
            assert err < 1e-5, (key, err)
    assert stage_keys[0] | stage_keys[1] == set(expected_shapes(CFG))
    assert any(k.startswith("embeddings.") for k in stage_keys[0])
    assert {"logit_scale", "itc_vl_text_proj.weight",
            "encoder.final_layernorm.A.weight"} <= stage_keys[1]


# -- 3. malicious pickles are refused --------------------------------------------------------------
class _Payload:
    """Unpickling this runs a shell command (what a full ``torch.load`` would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the protocol-4 payload
def test_malicious_pickle_is_refused(tmp_path, capsys):
    # Control: a full unpickle really runs the payload.
    control = tmp_path / "CONTROL"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.exists()

    marker = tmp_path / "MARKER"
    files = {"torch.pt": lambda p: torch.save(
                 {"state_dict": {"logit_scale": torch.ones(()), "x": _Payload(marker)}}, p),
             "proto2.ckpt": lambda p: p.write_bytes(pickle.dumps(_Payload(marker), protocol=2)),
             "default.bin": lambda p: p.write_bytes(pickle.dumps({"w": _Payload(marker)}))}
    for name, write in files.items():
        path = tmp_path / name
        write(path)
        with pytest.raises(UnsafeCheckpointError) as err:
            load_official(str(path))
        message = str(err.value)
        assert str(path) in message and "Only plain tensors and containers" in message
        if name != "default.bin":  # protocol >= 4 stops at a FRAME opcode before the global
            assert err.value.refused_global == "posix.system", message
            assert "'posix.system'" in message
        assert not marker.exists(), name

    out = tmp_path / "out.safetensors"
    code = main(["--from", "official", "--to", "single", "--flavor", "tiny", "--input",
                 str(tmp_path / "torch.pt"), "--output", str(out)])
    stderr = capsys.readouterr().err
    assert code == 2
    assert "refused to load" in stderr and "posix.system" in stderr and "torch.pt" in stderr
    assert not marker.exists() and not out.exists()


@pytest.mark.slow
def test_cli_subprocess_refuses_malicious_pickle(tmp_path):
    marker = tmp_path / "MARKER"
    torch.save({"state_dict": {"w": _Payload(marker)}}, tmp_path / "evil.pt")
    r = _cli("--from", "official", "--to", "ours", "--flavor", "tiny", "--input",
             tmp_path / "evil.pt", "--output", tmp_path / "out")
    assert r.returncode == 2, r.stderr
    assert "evil.pt: refused to load" in r.stderr and "posix.system" in r.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


# -- 4. bad inputs ---------------------------------------------------------------------------------
def test_wrong_or_missing_official_keys(tmp_path):
    official = random_official(CFG, seed=1)
    bad = dict(official, **{"backbone.encoder.layers.7.ffn.A.fc1.weight": torch.zeros(1)})
    for key in ("backbone_vl.layers.2.ffn.B.fc2.bias", "itc_vl_text_proj.fc.weight"):
        del bad[key]
    torch.save({"model": bad}, tmp_path / "bad.pt")
    with pytest.raises(StateDictKeyError) as err:
        read_any("official", str(tmp_path / "bad.pt"), CFG)
    message = str(err.value)
    for key in ("bad.pt", "2 missing", "backbone_vl.layers.2.ffn.B.fc2.bias",
                "itc_vl_text_proj.fc.weight", "1 unexpected",
                "backbone.encoder.layers.7.ffn.A.fc1.weight"):
        assert key in message, (key, message)

    # Right keys, wrong architecture: the shape check names the tensors.
    torch.save(official, tmp_path / "ok.pt")
    with pytest.raises(ConversionError, match=r"shape mismatch.*itc_\w+_proj.fc.weight"):
        read_any("official", str(tmp_path / "ok.pt"), get_flavor("tiny", embed_dim=64))
    # No config for an official input.
    with pytest.raises(ConversionError, match="no model config"):
        read_any("official", str(tmp_path / "ok.pt"))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_official(str(tmp_path / "missing.pt"))


def test_single_file_format_is_checked(tmp_path):
    from safetensors.torch import save_file

    ours = from_official(random_official(CFG, seed=2), CFG)
    path = str(tmp_path / "m2.safetensors")
    save_single_file(path, ours, CFG, dtype="bf16")
    weights, cfg, tokenizer = load_single_file(path)
    assert cfg == CFG and tokenizer is None
    assert all(v.dtype == torch.bfloat16 for v in weights.values())

    tensors = {k: v.contiguous() for k, v in ours.items()}
    config = json.dumps(CFG.to_dict())
    cases = {"foreign": ({"format": "pt"}, "not a megatron_m2 single-file checkpoint"),
             "version": ({"format": SINGLE_FILE_FORMAT, "format_version": "2",
                          "model_config": config}, "unsupported single-file format_version '2'"),
             "noconfig": ({"format": SINGLE_FILE_FORMAT, "format_version": "1"},
                          "no model_config")}
    for name, (metadata, expected) in cases.items():
        bad = str(tmp_path / f"{name}.safetensors")
        save_file(tensors, bad, metadata=metadata)
        with pytest.raises(ConversionError, match=expected) as err:
            load_single_file(bad)
        assert bad in str(err.value)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    from megatron_m2.checkpoint import IntegrityError

    with pytest.raises(IntegrityError, match="not a readable safetensors file"):
        load_single_file(str(tmp_path / "junk.safetensors"))


def test_layout_must_divide(tmp_path, capsys):
    ours = from_official(random_official(CFG, seed=4), CFG)
    with pytest.raises(ConfigError, match=r"\(3\) must divide num_attention_heads \(4\)"):
        write_model_checkpoint(str(tmp_path / "a"), ours, CFG, tp=3)
    with pytest.raises(ConfigError, match=r"\(4\) must divide the number of layers"):
        write_model_checkpoint(str(tmp_path / "a"), ours, CFG, pp=4)
    assert not (tmp_path / "a").exists()

    code = main(["--from", "official", "--to", "ours", "--flavor", "tiny", "--input",
                 str(tmp_path / "never-read.pt"), "--output", str(tmp_path / "b"), "--tp", "3"])
    assert code == 2
    assert "must divide num_attention_heads" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


# -- 5. release files as the official training code writes them -----------------------------------
VISION_POS = "backbone.encoder.embed_positions.A.weight"


def _release_shapes():
    """``{key: shape}`` of the release's own module at our tiny dimensions (see the fixture's
    README: built from the release's code, training mode, so the visual tokenizer is there)."""
    data = json.loads(RELEASE_KEYS.read_text())
    return data, {k: tuple(v) for k, v in data["shapes"].items()}


def _random_release(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return collections.OrderedDict((k, torch.randn(s, generator=g)) for k, s in shapes.items())


def _lightning_file(weights, **extra_hparams):
    """Everything a Lightning 1.9 ``trainer.save_checkpoint`` writes for the release's module
    (which calls ``save_hyperparameters()``), around a plain (unprefixed) state dict."""
    config = {"exp_name": "m2_pretrain", "loss_names": {"itc": 1, "imagemlm": 1, "mvlm": 0},
              "datasets": ["laion", "wukong"], "image_size": 224, "reclip_image_size": 112,
              "resume_from": None, "lr": 1e-4, "test_only": False, **extra_hparams}
    return {
        "epoch": 3, "global_step": 2000, "pytorch-lightning_version": "1.9.2",
        "state_dict": weights,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {
                      "_batches_that_stepped": 2000},
                  "epoch_progress": {"total": {"ready": 4, "started": 4, "processed": 3,
                                               "completed": 3}}},
                  "validate_loop": {"state_dict": {}}},
        "callbacks": {"ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': "
                      "2000, 'every_n_epochs': 0, 'train_time_interval': None}": {
                          "monitor": None, "best_model_score": None, "best_model_path": "",
                          "current_score": None, "dirpath": "/ckpt", "best_k_models": {},
                          "kth_best_model_path": "", "kth_value": torch.tensor(float("inf")),
                          "last_model_path": "/ckpt/last.ckpt"}},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(2000.0),
                                            "exp_avg": torch.zeros(3),
                                            "exp_avg_sq": torch.zeros(3)}},
                              "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.98), "eps": 1e-8,
                                                "weight_decay": 0.01, "amsgrad": False,
                                                "foreach": None, "params": [0]}]}],
        "lr_schedulers": [{"base_lrs": [1e-4], "last_epoch": 2000, "_step_count": 2001,
                           "_last_lr": [1e-4], "lr_lambdas": [None]}],
        "native_amp_scaling_state": {"scale": 65536.0, "growth_factor": 2.0,
                                     "backoff_factor": 0.5, "growth_interval": 2000,
                                     "_growth_tracker": 10},
        "hparams_name": "kwargs",
        "hyper_parameters": {"config": config},
    }


def _deepspeed_file(weights):
    """A DeepSpeed ``mp_rank_00_model_states.pt`` as Lightning's DeepSpeed strategy writes it:
    ``module`` keys prefixed ``_forward_module.``, DeepSpeed's bookkeeping (``torch.Size``
    shapes in OrderedDicts, a set, the config) and Lightning's client state beside it."""
    prefixed = collections.OrderedDict((f"_forward_module.{k}", v) for k, v in weights.items())
    frozen = [k for k in prefixed if ".visual_tokenizer." in k]
    state = {
        "module": prefixed,
        "buffer_names": ["_forward_module.visual_tokenizer.quantize.cluster_size",
                         "_forward_module.visual_tokenizer.quantize.embedding.initted"],
        "optimizer": None,
        "param_shapes": [collections.OrderedDict((k, v.shape) for k, v in prefixed.items()
                                                 if k not in frozen)],
        "frozen_param_shapes": collections.OrderedDict((k, prefixed[k].shape) for k in frozen),
        "shared_params": {}, "frozen_param_fragments": None, "lr_scheduler": None,
        "data_sampler": None, "random_ltd": None, "sparse_tensor_module_names": set(),
        "skipped_steps": 0, "global_steps": 2000, "global_samples": 2048000,
        "dp_world_size": 64, "mp_world_size": 1,
        "ds_config": {"train_micro_batch_size_per_gpu": 16, "gradient_clipping": 3.0,
                      "zero_optimization": {"stage": 2, "contiguous_gradients": True},
                      "bf16": {"enabled": True}},
        "ds_version": "0.9.5",
    }
    client = _lightning_file(weights)
    for key in ("state_dict", "optimizer_states"):  # Lightning keeps these out of client state
        del client[key]
    state.update(client)
    return state


def _convert(tmp_path, capsys, src, name="back.pt"):
    out = tmp_path / name
    code = main(["--from", "official", "--to", "official", "--flavor", "tiny", "--input",
                 str(src), "--output", str(out)])
    captured = capsys.readouterr()
    return code, captured, out


def test_release_fixture_is_the_official_layout():
    data, shapes = _release_shapes()
    rel = data["release_config"]
    assert (rel["encoder_embed_dim"], rel["encoder_attention_heads"], rel["encoder_layers"],
            rel["beit3_vl_layers"], rel["out_embed_dim"], rel["image_size"], rel["patch_size"],
            rel["vocab_size"], rel["test_only"]) == (
        CFG.hidden_size, CFG.num_attention_heads, CFG.num_sep_layers, CFG.num_vl_layers,
        CFG.embed_dim, CFG.image_size, CFG.patch_size, CFG.vocab_size, False)
    d = CFG.hidden_size
    unused = {"norm.weight": (d,), "norm.bias": (d,), "pooler.dense.weight": (d, d),
              "pooler.dense.bias": (d,)}
    beside_tokenizer = {k: v for k, v in shapes.items() if not k.startswith("visual_tokenizer.")}
    # Every other key of the release's module is one our mapping knows, or norm / pooler.
    assert set(beside_tokenizer) == {off for _, off in key_mapping(CFG)} | set(unused)
    assert beside_tokenizer == dict(official_shapes(CFG), **unused)
    tokenizer = [k for k in shapes if k.startswith("visual_tokenizer.")]
    assert len(tokenizer) > 20
    assert unused_official_keys(shapes) == sorted(tokenizer + list(unused))


@pytest.mark.parametrize("wrapping", ["lightning", "deepspeed"])
def test_release_files_convert(tmp_path, capsys, caplog, wrapping):
    _, shapes = _release_shapes()
    weights = _random_release(shapes, seed=6)
    path = tmp_path / ("m2.ckpt" if wrapping == "lightning" else "mp_rank_00_model_states.pt")
    torch.save(_lightning_file(weights) if wrapping == "lightning" else _deepspeed_file(weights),
               path)
    # The restricted reader takes the whole file (optimizer states, torch.Size, a set, ...).
    torch.load(path, map_location="cpu", weights_only=True)
    caplog.set_level(logging.INFO, logger="megatron_m2.checkpoint")

    code, captured, out = _convert(tmp_path, capsys, path)
    assert code == 0, captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    n_tokenizer = sum(k.startswith("visual_tokenizer.") for k in shapes)
    assert summary["unused_official_keys"] == {
        "count": 4 + n_tokenizer,
        "groups": {"norm": 2, "pooler.dense": 2, "visual_tokenizer": n_tokenizer}}
    assert summary["resized"] == {}
    assert summary["tensors"] == len(key_mapping(CFG))
    assert any("inference does not use" in r.getMessage() and "visual_tokenizer.*" in
               r.getMessage() for r in caplog.records), caplog.text
    back = torch.load(out, map_location="cpu", weights_only=True)
    assert set(back) == {off for _, off in key_mapping(CFG)}
    unequal = [k for k in back if not torch.equal(back[k], weights[k])]
    assert not unequal, unequal[:5]


def test_release_file_with_unknown_keys_is_refused(tmp_path, capsys):
    _, shapes = _release_shapes()
    weights = _random_release(shapes)
    weights["pooler.extra.weight"] = torch.zeros(2)
    weights["backbone.encoder.output_projection.weight"] = torch.zeros(2)
    torch.save(_deepspeed_file(weights), tmp_path / "mp_rank_00_model_states.pt")
    code, captured, out = _convert(tmp_path, capsys, tmp_path / "mp_rank_00_model_states.pt")
    assert code == 2 and not out.exists()
    assert ("not an official M2 checkpoint of this config: 2 unexpected key(s): "
            "backbone.encoder.output_projection.weight, pooler.extra.weight") in captured.err

    # norm / pooler of the wrong width: a config mismatch, named
    weights = _random_release(shapes)
    weights["pooler.dense.weight"] = torch.zeros(CFG.hidden_size, 2 * CFG.hidden_size)
    torch.save(_lightning_file(weights), tmp_path / "m2.ckpt")
    code, captured, _ = _convert(tmp_path, capsys, tmp_path / "m2.ckpt")
    assert code == 2 and "pooler.dense.weight (128, 256) (expected (128, 128))" in captured.err


def test_release_training_position_table_is_resized(tmp_path, capsys):
    """A training checkpoint at half the resolution (2x2 patches for the tiny 4x4 grid): the
    patch grid is area-interpolated to 4x4, i.e. each position replicated over a 2x2 block."""
    _, shapes = _release_shapes()
    weights = _random_release(shapes, seed=2)
    d = CFG.hidden_size
    small = weights[VISION_POS][:3 + 4].clone()
    weights[VISION_POS] = small
    torch.save(_lightning_file(weights), tmp_path / "reclip.ckpt")
    code, captured, out = _convert(tmp_path, capsys, tmp_path / "reclip.ckpt")
    assert code == 0, captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["resized"] == {VISION_POS: [7, CFG.vision_pos_table]}
    back = torch.load(out, map_location="cpu", weights_only=True)
    expected = torch.cat([small[:3], small[3:].reshape(2, 2, d).repeat_interleave(2, 0)
                          .repeat_interleave(2, 1).reshape(16, d)])
    assert torch.equal(back[VISION_POS], expected)
    assert all(torch.equal(back[k], weights[k]) for k in back if k != VISION_POS)

    # 3 + a non-square number of patch rows cannot be resized: a shape error naming the key
    weights[VISION_POS] = small[:3 + 3]
    torch.save(_lightning_file(weights), tmp_path / "odd.ckpt")
    code, captured, _ = _convert(tmp_path, capsys, tmp_path / "odd.ckpt", name="odd.pt")
    assert code == 2 and f"{VISION_POS} has 6 rows; expected 19" in captured.err


def _fake_module_classes(monkeypatch):
    """Stand-ins for sacred's read-only config containers, pickled under sacred's names (sacred
    itself is not needed): they reduce to ``(class, (plain copy,))`` as sacred's do."""
    name = "sacred.config.custom_containers"
    module = types.ModuleType(name)

    class ReadOnlyDict(dict):
        def __reduce__(self):
            return type(self), (dict(self),)

    class ReadOnlyList(list):
        def __reduce__(self):
            return type(self), (list(self),)

    for cls in (ReadOnlyDict, ReadOnlyList):
        cls.__module__, cls.__qualname__ = name, cls.__name__
        setattr(module, cls.__name__, cls)
    for mod in ("sacred", "sacred.config"):
        monkeypatch.setitem(sys.modules, mod, types.ModuleType(mod))
    monkeypatch.setitem(sys.modules, name, module)
    return ReadOnlyDict, ReadOnlyList


@pytest.mark.skipif(_torch_version() < (2, 6), reason="needs torch >= 2.6 (safe_globals names)")
def test_sacred_hyper_parameters_are_read_as_plain_containers(tmp_path, monkeypatch):
    official = random_official(CFG, seed=7)
    with monkeypatch.context() as m:
        ReadOnlyDict, ReadOnlyList = _fake_module_classes(m)
        ckpt = _lightning_file(official)  # the module was handed sacred's config as it is
        ckpt["hyper_parameters"]["config"] = ReadOnlyDict(
            loss_names=ReadOnlyDict(itc=1), datasets=ReadOnlyList(["coco"]), load_path="")
        torch.save(ckpt, tmp_path / "sacred.ckpt")
        torch.save(_lightning_file(official, counts=collections.defaultdict(int)),
                   tmp_path / "defaultdict.ckpt")
    assert "sacred.config.custom_containers" not in sys.modules
    weights = load_official(str(tmp_path / "sacred.ckpt"))
    assert set(weights) == set(official)
    assert "sacred.config.custom_containers" not in sys.modules  # nothing was imported
    # Any other class is still refused, and the aliases do not outlive the read.
    with pytest.raises(UnsafeCheckpointError) as err:
        load_official(str(tmp_path / "defaultdict.ckpt"))
    assert err.value.refused_global == "collections.defaultdict"
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "sacred.ckpt", weights_only=True)


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_outputs_get_the_umask_permissions(tmp_path, mask):
    """Serving files and checkpoints are shared: written with the process umask (safetensors
    alone creates 0600 files)."""
    import megatron_m2.utils.files as files
    from megatron_m2.checkpoint import save_official, write_model_checkpoint

    ours = from_official(random_official(CFG, seed=5), CFG)
    old = os.umask(mask)
    files._umask = None  # read again under this umask
    try:
        save_single_file(str(tmp_path / "m.safetensors"), ours, CFG, tokenizer_bytes=TOKENIZER)
        save_official(str(tmp_path / "o.safetensors"), {"a": torch.zeros(2)})
        save_official(str(tmp_path / "o.pt"), {"a": torch.zeros(2)})
        write_model_checkpoint(str(tmp_path / "ckpt"), ours, CFG, pp=2, tokenizer_bytes=TOKENIZER)
    finally:
        os.umask(old)
        files._umask = None
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) >= 8
    for p in written:
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, (p, oct(p.stat().st_mode))


def _flip_a_data_byte(path, at=0.5):
    """Flip one byte inside the tensor data of a safetensors file (not its header)."""
    data = bytearray(open(path, "rb").read())
    start = 8 + int.from_bytes(data[:8], "little")
    i = start + int((len(data) - start) * at)
    data[i] ^= 0x40
    open(path, "wb").write(bytes(data))


def test_flipped_bytes_are_caught_by_every_reader(tmp_path, capsys):
    """A flipped byte in a weight: the single file, our checkpoint and m2-convert all refuse it,
    naming the file and the tensor; --no-verify-checksums reads it anyway."""
    from megatron_m2.checkpoint import IntegrityError

    ours = from_official(random_official(CFG, seed=9), CFG)
    single = str(tmp_path / "m.safetensors")
    save_single_file(single, ours, CFG, tokenizer_bytes=TOKENIZER)
    ckpt = tmp_path / "ckpt"
    from megatron_m2.checkpoint import write_model_checkpoint

    write_model_checkpoint(str(ckpt), ours, CFG, pp=2)
    load_single_file(single)  # intact: verified without complaint
    _flip_a_data_byte(single)
    stage = ckpt / "iter_0000000" / "model_pp001.safetensors"
    _flip_a_data_byte(stage, at=0.3)
    with pytest.raises(IntegrityError, match=f"{single}: tensor '.+' does not match the checksum"):
        load_single_file(single)
    with pytest.raises(IntegrityError, match=f"{stage}: tensor '.+' does not match the checksum"):
        read_checkpoint(str(ckpt))
    weights, _, _ = load_single_file(single, verify=False)  # read anyway when asked
    assert any(not torch.equal(weights[k], ours[k]) for k in ours)
    code = main(["--from", "single", "--to", "official", "--input", single, "--output",
                 str(tmp_path / "o.pt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("m2-convert: error: ") and "checksum" in err[-1]
    assert not (tmp_path / "o.pt").exists()
    assert main(["--from", "single", "--to", "official", "--input", single, "--output",
                 str(tmp_path / "o.pt"), "--no-verify-checksums"]) == 0
