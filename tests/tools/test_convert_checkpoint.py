"""Checkpoint conversion (``megatron_m2.convert``, ``tools/convert_checkpoint.py``).

The official-layout source is written from the key table of DESIGN.md §2 by
``tests/model/test_official.py`` (random values, non-trivial LayerNorms), independently of the
code under test, and wrapped the way releases are. One conversion chain through the command
line (official → ours at TP=2 PP=2 → single → official) is shared by the round-trip and the
loading tests.
"""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_m2.config import ConfigError
from megatron_m2.convert import (
    SINGLE_FILE_FORMAT,
    ConversionError,
    StateDictKeyError,
    UnsafeCheckpointError,
    expected_shapes,
    load_official,
    load_single_file,
    main,
    read_any,
    read_checkpoint,
    save_single_file,
    write_model_checkpoint,
)
from megatron_m2.flavors import get_flavor
from megatron_m2.model.official import from_official
from tests.helpers.distributed import run_distributed
from tests.model.common import gather_full, make_batch
from tests.model.test_official import official_shapes, random_official

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "convert_checkpoint.py"
CFG = get_flavor("tiny")
TOKENIZER = b"\x0a\x0bnot a real SentencePiece model, carried as opaque bytes\x00\xff"


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

    from megatron_m2.model import build_model
    from megatron_m2.model.init import canonical_name
    from megatron_m2.parallel.distributed import initialize_model_parallel
    from megatron_m2.training.checkpointing import load_checkpoint

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
    assert code == 1
    assert "refused to load" in stderr and "posix.system" in stderr and "torch.pt" in stderr
    assert not marker.exists() and not out.exists()


@pytest.mark.slow
def test_cli_subprocess_refuses_malicious_pickle(tmp_path):
    marker = tmp_path / "MARKER"
    torch.save({"state_dict": {"w": _Payload(marker)}}, tmp_path / "evil.pt")
    r = _cli("--from", "official", "--to", "ours", "--flavor", "tiny", "--input",
             tmp_path / "evil.pt", "--output", tmp_path / "out")
    assert r.returncode == 1, r.stderr
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
    with pytest.raises(ConversionError, match="not a readable safetensors file"):
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
    assert code == 1
    assert "must divide num_attention_heads" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
