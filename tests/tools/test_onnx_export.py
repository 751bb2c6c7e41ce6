"""ONNX export of the image and text towers (``megatron_m2.export_onnx``, ``m2-convert --to onnx``).

The model is test_inference's small architecture with random official-layout weights (non-trivial
LayerNorms) and the bundled demo tokenizer, saved as a single file. It is exported through the
command line in a subprocess; onnxruntime (CPUExecutionProvider) runs the files, fed from the
export folder alone (its tokenizer.model and the manifest's preprocessing), and its embeddings are
compared with ``M2Encoder.encode_image`` / ``encode_text`` computed in a spawned process
(``M2Encoder`` creates process-wide state that must not leak into other tests).
"""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from megatron_m2.cli.convert import main  # noqa: E402
from megatron_m2.export_onnx import (  # noqa: E402
    IMAGE_FILE,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    TEXT_FILE,
    TOKENIZER_FILE,
    OnnxExportError,
    export_onnx,
)
from tests.helpers.distributed import run_distributed  # noqa: E402
from tests.test_inference import TOKENIZER, _cfg, _images  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

PARITY_ATOL = 1e-4
"""onnxruntime against PyTorch, both fp32 on the CPU: the same operations, fused and ordered
differently by the runtime (measured: a few 1e-7)."""

CAPTIONS = {
    "en": ["an emoji of grinning face", "an emoji of red heart",
           "an emoji of a very very long caption that is truncated by the model"],
    "zh": ["一个咧嘴笑的表情符号", "红心的表情符号",
           "一个非常非常长的表情符号说明文字，长到会被模型截断为止"],
}
BATCHES = (1, 3)


def _convert(*args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "megatron_m2.cli.convert", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _refused(argv, capsys) -> str:
    """Run ``m2-convert argv`` in this process; it must refuse with one error line (exit 2)
    before reading any model. Returns that line."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse-level refusals exit from the parser
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err and err[-1].startswith("m2-convert: error: "), err
    return err[-1]


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _pixels(manifest: dict) -> torch.Tensor:
    """The test images preprocessed as the manifest says (its mean/std, eval_transform)."""
    from megatron_m2.data.transforms import eval_transform

    pre = manifest["preprocessing"]["image"]
    t = eval_transform(manifest["image_size"], mean=pre["mean"], std=pre["std"])
    return torch.stack([t(im) for im in _images(max(BATCHES))])


def _tokenize(folder: Path, captions):
    """``(ids, pad)`` from the export folder's own tokenizer and manifest."""
    from megatron_m2.data.tokenizer import M2Tokenizer

    text = _manifest(folder)["preprocessing"]["text"]
    tok = M2Tokenizer(folder / text["tokenizer"], max_length=text["max_length"],
                      text_style=text["text_style"])
    return tok(captions)


# -- in a spawned process ---------------------------------------------------------------------
def _reference(path, pixels, captions):
    """``M2Encoder`` embeddings of both heads: images at each batch size, captions by language
    and batch size."""
    from megatron_m2 import M2Encoder

    out = {}
    for head in ("vl", "backbone"):
        enc = M2Encoder.from_pretrained(path, head=head)
        out[head] = {
            "image": {n: enc.encode_image(pixels[:n]) for n in BATCHES},
            "text": {lang: {n: enc.encode_text(caps[:n]) for n in BATCHES}
                     for lang, caps in captions.items()},
        }
    return out


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    from megatron_m2.checkpoint import from_official, save_single_file
    from tests.model.test_official import random_official

    cfg = _cfg()
    d = tmp_path_factory.mktemp("onnx_model")
    state = from_official(random_official(cfg, seed=11), cfg)
    path = d / "model.safetensors"
    save_single_file(str(path), state, cfg, tokenizer_bytes=TOKENIZER.read_bytes())
    return {"path": path, "state": state, "dir": d}


@pytest.fixture(scope="module")
def exported(model_file):
    """``m2-convert --from single --to onnx`` with the defaults (vl head, opset 18)."""
    out = model_file["dir"] / "onnx"
    start = time.perf_counter()
    proc = _convert("--from", "single", "--to", "onnx", "--input", model_file["path"],
                    "--output", out)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # the JSON summary line, nothing else on stdout
    return {"dir": out, "summary": json.loads(lines[0]), "seconds": elapsed,
            "stderr": proc.stderr}


@pytest.fixture(scope="module")
def reference(model_file, exported):
    pixels = _pixels(_manifest(exported["dir"]))
    ref = run_distributed(_reference, 1, path=str(model_file["path"]), pixels=pixels,
                          captions=CAPTIONS)[0]
    ref["pixels"] = pixels
    return ref


# -- the export -------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_writes_a_self_contained_folder(model_file, exported):
    out, summary = exported["dir"], exported["summary"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [IMAGE_FILE, TEXT_FILE, TOKENIZER_FILE, MANIFEST_FILE])  # small model: no .onnx.data
    assert (out / TOKENIZER_FILE).read_bytes() == TOKENIZER.read_bytes()
    cfg = _cfg()
    assert {k: summary[k] for k in ("from", "to", "output", "opset", "head", "embed_dim",
                                    "image_size", "max_text_len", "tokenizer")} == {
        "from": "single", "to": "onnx", "output": str(out), "opset": 18, "head": "vl",
        "embed_dim": cfg.embed_dim, "image_size": cfg.image_size,
        "max_text_len": cfg.max_text_len, "tokenizer": True}
    assert summary["parity"]["image_max_abs_diff"] <= PARITY_ATOL
    assert summary["parity"]["text_max_abs_diff"] <= PARITY_ATOL
    assert summary["files"] == {p.name: p.stat().st_size for p in out.iterdir()}
    assert "Traceback" not in exported["stderr"]


@pytest.mark.slow
def test_manifest_describes_the_export(model_file, exported):
    out = exported["dir"]
    m = _manifest(out)
    cfg = _cfg()
    assert m["format"] == MANIFEST_FORMAT and m["opset"] == 18 and m["head"] == "vl"
    assert m["model_config"] == cfg.to_dict()
    assert (m["embed_dim"], m["image_size"], m["max_text_len"]) == (
        cfg.embed_dim, cfg.image_size, cfg.max_text_len)
    scale = model_file["state"]["logit_vl_scale"].clamp(max=torch.log(torch.tensor(100.0)))
    assert m["logit_scale"] == pytest.approx(float(torch.exp(scale)))
    s, d = cfg.image_size, cfg.embed_dim
    assert m["image_encoder"]["inputs"] == [
        {"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, s, s]}]
    assert m["image_encoder"]["outputs"] == [
        {"name": "image_embeds", "dtype": "float32", "shape": ["batch", d]}]
    assert m["text_encoder"]["inputs"] == [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "text_len"]},
        {"name": "text_pad_mask", "dtype": "bool", "shape": ["batch", "text_len"]}]
    assert m["text_encoder"]["outputs"] == [
        {"name": "text_embeds", "dtype": "float32", "shape": ["batch", d]}]
    image = m["preprocessing"]["image"]
    assert image["mean"] == [0.5] * 3 and image["std"] == [0.5] * 3
    assert image["resize"]["size"] == [s, s] and image["resize"]["interpolation"] == "bicubic"
    assert image["resize"]["keep_aspect_ratio"] is False
    text = m["preprocessing"]["text"]
    assert text["tokenizer"] == TOKENIZER_FILE and text["max_length"] == cfg.max_text_len
    assert (text["cls_id"], text["eos_id"], text["pad_id"]) == (
        cfg.cls_token_id, cfg.eos_token_id, cfg.eos_token_id)
    assert text["text_style"] == "normalized"  # the demo tokenizer's default
    for name, entry in m["files"].items():
        data = (out / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.slow
def test_onnx_checker_and_graph_signature(exported):
    import onnx

    cfg = _cfg()
    want = {
        IMAGE_FILE: ([("pixel_values", onnx.TensorProto.FLOAT, ["batch", 3, 32, 32])],
                     [("image_embeds", onnx.TensorProto.FLOAT, ["batch", cfg.embed_dim])]),
        TEXT_FILE: ([("input_ids", onnx.TensorProto.INT64, ["batch", "text_len"]),
                     ("text_pad_mask", onnx.TensorProto.BOOL, ["batch", "text_len"])],
                    [("text_embeds", onnx.TensorProto.FLOAT, ["batch", cfg.embed_dim])]),
    }
    for name, (inputs, outputs) in want.items():
        path = exported["dir"] / name
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        assert {o.domain: o.version for o in model.opset_import}[""] == 18

        def sig(values):
            return [(v.name, v.type.tensor_type.elem_type,
                     [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
                    for v in values]

        assert sig(model.graph.input) == inputs and sig(model.graph.output) == outputs
        # No build-machine paths or stack traces in the artefact.
        assert not any(n.metadata_props for n in model.graph.node)
        assert str(ROOT).encode() not in path.read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("batch", BATCHES)
def test_image_encoder_matches_m2encoder(exported, reference, batch):
    session = _session(exported["dir"] / IMAGE_FILE)
    (got,) = session.run(["image_embeds"],
                         {"pixel_values": reference["pixels"][:batch].numpy()})
    want = reference["vl"]["image"][batch].numpy()
    assert got.shape == want.shape == (batch, _cfg().embed_dim) and got.dtype == np.float32
    diff = float(np.abs(got - want).max())
    assert diff <= PARITY_ATOL, diff
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("lang", sorted(CAPTIONS))
@pytest.mark.parametrize("batch", BATCHES)
def test_text_encoder_matches_m2encoder(exported, reference, lang, batch):
    session = _session(exported["dir"] / TEXT_FILE)
    ids, pad = _tokenize(exported["dir"], CAPTIONS[lang][:batch])
    want = reference["vl"]["text"][lang][batch].numpy()
    # At the full max_text_len, and trimmed to the batch's longest caption (dynamic text_len).
    longest = int((~pad).sum(1).max())
    for length in sorted({ids.shape[1], longest}):
        (got,) = session.run(["text_embeds"], {"input_ids": ids[:, :length].numpy(),
                                               "text_pad_mask": pad[:, :length].numpy()})
        assert got.shape == want.shape == (batch, _cfg().embed_dim)
        diff = float(np.abs(got - want).max())
        assert diff <= PARITY_ATOL, (length, diff)


@pytest.mark.slow
def test_force_rewrites_a_previous_export(model_file, exported, reference, tmp_path, capsys):
    """--force into a folder of an earlier export, with the backbone head, opset 20 and the
    weights as external data."""
    import onnx

    out = tmp_path / "again"
    out.mkdir()
    (out / "NOTES.txt").write_text("kept")
    (out / IMAGE_FILE).write_bytes(b"an earlier export")
    args = ["--from", "single", "--to", "onnx", "--input", model_file["path"], "--output", out,
            "--head", "backbone", "--onnx-opset", "20", "--onnx-external-data"]
    assert "not empty; use --force" in _refused(args, capsys)
    proc = _convert(*args, "--force")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["NOTES.txt", IMAGE_FILE, IMAGE_FILE + ".data", TEXT_FILE, TEXT_FILE + ".data",
         TOKENIZER_FILE, MANIFEST_FILE])
    m = _manifest(out)
    assert (m["head"], m["opset"]) == ("backbone", 20)
    assert m["image_encoder"]["external_data"] == IMAGE_FILE + ".data"
    assert m["text_encoder"]["external_data"] == TEXT_FILE + ".data"
    for name in (IMAGE_FILE, TEXT_FILE):
        onnx.checker.check_model(str(out / name), full_check=True)
        assert (out / name).stat().st_size < (out / (name + ".data")).stat().st_size
    (img,) = _session(out / IMAGE_FILE).run(
        ["image_embeds"], {"pixel_values": reference["pixels"].numpy()})
    assert float(np.abs(img - reference["backbone"]["image"][3].numpy()).max()) <= PARITY_ATOL
    ids, pad = _tokenize(out, CAPTIONS["zh"])
    (txt,) = _session(out / TEXT_FILE).run(
        ["text_embeds"], {"input_ids": ids.numpy(), "text_pad_mask": pad.numpy()})
    assert float(np.abs(txt - reference["backbone"]["text"]["zh"][3].numpy()).max()) <= \
        PARITY_ATOL
    # The backbone head is another embedding than the vl one.
    assert float(np.abs(img - reference["vl"]["image"][3].numpy()).max()) > 1e-2


def test_publish_replaces_only_the_files_of_an_export(tmp_path):
    from megatron_m2.export_onnx import _publish

    staging = tmp_path / ".out.tmp"
    staging.mkdir()
    for name in (IMAGE_FILE, TEXT_FILE, MANIFEST_FILE):
        (staging / name).write_text(f"new {name}")
    out = tmp_path / "out"
    out.mkdir()
    for name in (IMAGE_FILE, IMAGE_FILE + ".data", TOKENIZER_FILE, "NOTES.txt"):
        (out / name).write_text(f"old {name}")
    _publish(staging, out)
    assert not staging.exists()
    assert {p.name: p.read_text() for p in out.iterdir()} == {
        IMAGE_FILE: f"new {IMAGE_FILE}", TEXT_FILE: f"new {TEXT_FILE}",
        MANIFEST_FILE: f"new {MANIFEST_FILE}", "NOTES.txt": "old NOTES.txt"}
    staging.mkdir()
    (staging / MANIFEST_FILE).write_text("fresh")
    _publish(staging, tmp_path / "fresh")  # no folder yet: the staging folder is renamed
    assert not staging.exists() and (tmp_path / "fresh" / MANIFEST_FILE).read_text() == "fresh"


# -- refusals (no model is read) --------------------------------------------------------------
@pytest.fixture
def dummy_input(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"never read: the options are refused first")
    return path


def test_cli_refuses_onnx_as_input(dummy_input, tmp_path, capsys):
    line = _refused(["--from", "onnx", "--to", "single", "--input", dummy_input, "--output",
                     tmp_path / "x.safetensors"], capsys)
    assert "--from onnx: ONNX is an output-only format" in line


@pytest.mark.parametrize("extra, message", [
    (["--tp", "2"], "--tp/--pp apply to --to ours only"),
    (["--pp", "2"], "--tp/--pp apply to --to ours only"),
    (["--dtype", "bf16"], "--to onnx exports fp32 weights"),
    (["--include-training-params"], "--include-training-params applies to"),
    (["--onnx-opset", "17"], "--onnx-opset 17: choose 18 to 22"),
    (["--onnx-opset", "23"], "--onnx-opset 23: choose 18 to 22"),
])
def test_cli_refuses_options_onnx_cannot_honour(dummy_input, tmp_path, capsys, extra, message):
    line = _refused(["--from", "single", "--to", "onnx", "--input", dummy_input, "--output",
                     tmp_path / "out", *extra], capsys)
    assert message in line
    assert not (tmp_path / "out").exists()


def test_cli_refuses_official_input_and_onnx_options_elsewhere(dummy_input, tmp_path, capsys):
    line = _refused(["--from", "official", "--flavor", "tiny", "--to", "onnx", "--input",
                     dummy_input, "--output", tmp_path / "out"], capsys)
    assert "convert the official checkpoint first" in line
    line = _refused(["--from", "single", "--to", "official", "--input", dummy_input,
                     "--output", tmp_path / "o.pt", "--head", "backbone"], capsys)
    assert "apply to --to onnx only" in line


def test_cli_refuses_an_existing_output(dummy_input, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    line = _refused(["--from", "single", "--to", "onnx", "--input", dummy_input, "--output",
                     out], capsys)
    assert f"{out} exists and is not empty; use --force" in line
    assert sorted(p.name for p in out.iterdir()) == ["something"]
    afile = tmp_path / "file"
    afile.write_text("x")
    line = _refused(["--from", "single", "--to", "onnx", "--input", dummy_input, "--output",
                     afile, "--force"], capsys)
    assert f"{afile} is a file; --to onnx writes a folder" in line


def test_library_refuses_before_loading(dummy_input, tmp_path):
    with pytest.raises(OnnxExportError, match="opset 23 is not supported: choose 18 to 22"):
        export_onnx(dummy_input, tmp_path / "out", opset=23)
    with pytest.raises(OnnxExportError, match="head must be one of backbone, vl"):
        export_onnx(dummy_input, tmp_path / "out", head="cls")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(OnnxExportError, match="full exists and is not empty"):
        export_onnx(dummy_input, tmp_path / "full")
    assert not (tmp_path / "out").exists()
