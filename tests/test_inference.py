"""The inference API (``M2Encoder``) and the ``m2-eval`` CLI.

Weights are random (from the official key table, with non-trivial LayerNorms) in a small
architecture whose vocabulary is the bundled demo tokenizer's, so real captions tokenize.
``M2Encoder`` runs in spawned processes: it creates process-wide state (a process group of one,
megatron's model-parallel groups) that must not leak into other tests.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_m2.config import M2ModelConfig
from tests.helpers.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "emoji_demo"
TOKENIZER = DEMO / "tokenizer.model"
CAPTIONS = ["an emoji of grinning face", "一个咧嘴笑的表情符号", "an emoji of red heart",
            "红心的表情符号", "an emoji of a very very long caption that is truncated by the model"]

EMBED_ATOL = 1e-5
"""TP=2 vs one process: the same fp32 arithmetic except for the order of the sums that TP
splits (row-parallel outputs, Sub-LN statistics), i.e. differences of a few ulps (~1e-7)."""


def _cfg() -> M2ModelConfig:
    from megatron_m2.data.tokenizer import M2Tokenizer

    tok = M2Tokenizer(TOKENIZER)
    return M2ModelConfig(hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                         num_sep_layers=2, num_vl_layers=2, embed_dim=32, image_size=32,
                         patch_size=16, vocab_size=tok.vocab_size, max_text_len=12,
                         eos_token_id=tok.eos_id, cls_token_id=tok.cls_id)


def _images(n: int = 5):
    from PIL import Image

    g = torch.Generator().manual_seed(3)
    arr = (torch.rand(n, 40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
    return [Image.fromarray(a) for a in arr]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A single-file export and a PP=2 checkpoint of the same random weights."""
    from megatron_m2.checkpoint import from_official, save_single_file, write_model_checkpoint
    from tests.model.test_official import random_official

    cfg = _cfg()
    d = tmp_path_factory.mktemp("inference")
    state = from_official(random_official(cfg, seed=11), cfg)
    tok = TOKENIZER.read_bytes()
    single = d / "model.safetensors"
    save_single_file(str(single), state, cfg, tokenizer_bytes=tok)
    write_model_checkpoint(str(d / "ckpt"), state, cfg, pp=2, tokenizer_bytes=tok)
    return {"single": single, "ckpt": d / "ckpt", "state": state, "dir": d}


# -- in spawned processes --------------------------------------------------------------------
def _encode_with(enc, captions):
    images = _images()
    return {"image": enc.encode_image(images), "text": enc.encode_text(captions),
            "image_tensor": enc.encode_image(torch.stack([enc.transform(i) for i in images])),
            "tokens": enc.encode_tokens([enc.tokenizer.frame(enc.tokenizer.encode(c))
                                         for c in captions]),
            "logit_scale": enc.logit_scale}


def _encode(path, captions):
    from megatron_m2 import M2Encoder

    return _encode_with(M2Encoder.from_pretrained(path), captions)


def _scenarios(single, ckpt, export_to, captions):
    """One process, three encoders: the single file (batch 64), the PP=2 checkpoint directory
    (batch 2: several forwards and a ragged last batch), and a re-export of the first."""
    from megatron_m2 import M2Encoder

    enc = M2Encoder.from_pretrained(single)
    enc.save_single_file(export_to)
    return {"single": _encode_with(enc, captions),
            "ckpt_b2": _encode_with(M2Encoder.from_pretrained(ckpt, batch_size=2), captions)}


def _tp2_embeddings(ckpt, captions):
    """Embeddings computed by a TP=2 model that loaded the checkpoint with the trainer's
    loader (the path training and evaluation use)."""
    from megatron.core import parallel_state as ps

    from megatron_m2.checkpoint import load_checkpoint
    from megatron_m2.data.tokenizer import M2Tokenizer, normalize_caption
    from megatron_m2.data.transforms import eval_transform
    from megatron_m2.model import build_model
    from megatron_m2.parallel import cpu_compat
    from megatron_m2.parallel.distributed import initialize_model_parallel

    cfg = _cfg()
    initialize_model_parallel(2, 1)
    model = build_model(cfg, 2, 1, seed=5)
    load_checkpoint(str(ckpt), model)
    model.eval()
    tok = M2Tokenizer(TOKENIZER, max_length=cfg.max_text_len)
    t = eval_transform(cfg.image_size)
    images = torch.stack([t(i) for i in _images()])
    ids, pad = tok([normalize_caption(c) for c in captions])
    with torch.no_grad(), cpu_compat.suspended():
        img = model(images=images)["vl_image_feats"]
        txt = model(text_ids=ids, text_pad_mask=pad)["vl_text_feats"]
    assert ps.get_tensor_model_parallel_world_size() == 2
    return {"image": img, "text": txt}


# -- tests ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoded(exported):
    out = exported["dir"] / "again.safetensors"
    res = run_distributed(_scenarios, 1, single=str(exported["single"]),
                          ckpt=str(exported["ckpt"]), export_to=str(out), captions=CAPTIONS)[0]
    res["export"] = out
    return res


def test_encoder_outputs(exported, encoded):
    out = encoded["single"]
    img, txt = out["image"], out["text"]
    assert img.shape == (5, 32) and txt.shape == (len(CAPTIONS), 32)
    assert img.dtype == torch.float32
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(len(CAPTIONS)), atol=1e-6, rtol=0)
    # PIL input and preprocessed tensors, text and pre-tokenized ids: the same embeddings.
    assert torch.equal(img, out["image_tensor"])
    assert torch.equal(txt, out["tokens"])
    # Different inputs give different embeddings (the model is not degenerate).
    assert (img @ img.T - torch.eye(5)).abs().max() < 0.999
    assert out["logit_scale"] == pytest.approx(float(torch.exp(
        exported["state"]["logit_vl_scale"].clamp(max=torch.log(torch.tensor(100.0))))))


def test_batching_and_source_do_not_change_embeddings(encoded):
    ref, other = encoded["single"], encoded["ckpt_b2"]
    torch.testing.assert_close(other["image"], ref["image"], atol=1e-6, rtol=0)
    torch.testing.assert_close(other["text"], ref["text"], atol=1e-6, rtol=0)


def test_single_file_export_round_trip(exported, encoded):
    from megatron_m2.checkpoint import load_single_file

    state, cfg, tok = load_single_file(str(encoded["export"]))
    assert cfg == _cfg() and tok == TOKENIZER.read_bytes()
    assert sorted(state) == sorted(exported["state"])
    assert all(torch.equal(state[k], exported["state"][k]) for k in state)


@pytest.mark.slow
def test_tp2_model_matches_encoder_on_single_file(exported):
    """Must show: embeddings from the TP=2 model equal M2Encoder on the single file."""
    tp2 = run_distributed(_tp2_embeddings, 2, ckpt=str(exported["ckpt"]), captions=CAPTIONS)
    single = run_distributed(_encode, 1, path=str(exported["single"]), captions=CAPTIONS)[0]
    for rank in range(2):  # TP ranks hold the same replicated outputs
        for k in ("image", "text"):
            diff = (tp2[rank][k] - single[k]).abs().max().item()
            assert diff <= EMBED_ATOL, (rank, k, diff)


def test_from_pretrained_without_launcher(exported):
    """A plain python process: no torchrun, no process group set up by the caller."""
    code = ("import sys, torch; from megatron_m2 import M2Encoder; "
            "e = M2Encoder.from_pretrained(sys.argv[1]); "
            "t = e.encode_text(['an emoji of red heart']); "
            "print(tuple(t.shape), round(float(t.norm()), 4))")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-c", code, str(exported["single"])], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "(1, 32) 1.0"


def test_from_pretrained_errors(tmp_path):
    from megatron_m2.inference import _read

    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        _read(tmp_path / "nothing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Exception, match="junk.safetensors"):
        _read(tmp_path / "junk.safetensors")


# -- m2-eval ----------------------------------------------------------------------------------
def _m2_eval(*args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "megatron_m2.cli.evaluate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def _direct_retrieval(path, prefix, n):
    """Retrieval figures recomputed from M2Encoder embeddings and the dataset directly."""
    import io

    from PIL import Image

    from megatron_m2 import M2Encoder
    from megatron_m2.data.indexed import ImageTextIndexedDataset
    from megatron_m2.eval.retrieval import retrieval_metrics

    enc = M2Encoder.from_pretrained(path)
    reader = ImageTextIndexedDataset(prefix)
    out = {}
    for lang in ("en", "zh"):
        keep = [i for i in range(n) if lang in reader.caption_languages(i)]
        images, caps, owner = [], [], []
        for j, i in enumerate(keep):
            s = reader[i]
            images.append(Image.open(io.BytesIO(s.image)).convert("RGB"))
            for cl, ids in s.captions:
                if cl == lang:
                    caps.append(ids.tolist())
                    owner.append(j)
        out[lang] = retrieval_metrics(enc.encode_image(images), enc.encode_tokens(caps),
                                      torch.tensor(owner))
    return out


@pytest.mark.slow
def test_m2_eval_retrieval_json(exported):
    n = 40
    proc = _m2_eval("--load", str(exported["single"]), "--task", "retrieval", "--data",
                    str(DEMO / "validation"), "--max-samples", str(n), "--json",
                    "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["task"] == "retrieval" and set(record["results"]) == {"en", "zh"}
    ref = run_distributed(_direct_retrieval, 1, path=str(exported["single"]),
                          prefix=str(DEMO / "validation"), n=n)[0]
    for lang, m in record["results"].items():
        assert m["images"] == n and m["captions"] >= n
        for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
                    "mean_recall"):
            assert 0.0 <= m[key] <= 100.0
            assert m[key] == pytest.approx(ref[lang][key], abs=1e-9), (lang, key)


def test_m2_eval_zeroshot_image_folder(exported, tmp_path):
    from PIL import Image

    root = tmp_path / "folder"
    for c, colour in enumerate(("red", "green", "blue")):
        (root / colour).mkdir(parents=True)
        for i in range(2):
            px = [0, 0, 0]
            px[c] = 200 + 20 * i
            Image.new("RGB", (20, 20), tuple(px)).save(root / colour / f"{i}.png")
    (tmp_path / "en.txt").write_text("red\ngreen\nblue\n")
    (tmp_path / "zh.json").write_text(json.dumps(["红色", "绿色", "蓝色"], ensure_ascii=False))
    proc = _m2_eval("--load", str(exported["single"]), "--task", "zeroshot", "--image-folder",
                    str(root), "--classnames", f"en={tmp_path / 'en.txt'}",
                    f"zh={tmp_path / 'zh.json'}", "--templates", "none", "--json",
                    "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])["results"]
    for lang in ("en", "zh"):
        assert res[lang]["images"] == 6 and res[lang]["templates"] == 1
        top1, top3 = res[lang]["top1"], res[lang]["top3"]
        # 6 images: top-1 is a multiple of 1/6; with 3 classes every label is in the top 3.
        assert round(top1 * 6 / 100, 6) == int(round(top1 * 6 / 100)) and top3 == 100.0


@pytest.mark.parametrize("args, message", [
    (["--task", "retrieval"], "--data"),
    (["--task", "zeroshot"], "exactly one of"),
    (["--task", "zeroshot", "--image-folder", "x"], "--classnames"),
    (["--task", "retrieval", "--data", "x", "--batch-size", "0"], "--batch-size"),
])
def test_m2_eval_usage_errors(args, message):
    proc = _m2_eval("--load", "nowhere", *args, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-1000:]


def test_m2_eval_refuses_a_dataset_of_another_text_style(exported, tmp_path):
    """The dataset's card must match the model's tokenizer: the demo captions preprocessed in
    the official text style do not fit a model whose tokenizer records the normalized one."""
    import numpy as np
    from PIL import Image

    from megatron_m2.data.preprocess import PreprocessConfig, preprocess

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "x.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "x.png", "caption_en": "a  cat"})
                                      + "\n")
    prefix = str(tmp_path / "ds")
    preprocess([str(tmp_path / "m.jsonl")], prefix,
               PreprocessConfig(tokenizer_model=str(TOKENIZER), text_style="official"))
    args = ("--load", str(exported["single"]), "--task", "retrieval", "--data", prefix,
            "--json", "--no-progress")
    proc = _m2_eval(*args, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ": error: " in ln]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "text style official vs normalized" in lines[0] and "Traceback" not in proc.stderr
    proc = _m2_eval(*args, "--allow-dataset-mismatch", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert set(json.loads(proc.stdout.strip().splitlines()[-1])["results"]) == {"en"}


GLM_MODEL = ROOT.parent / "shared" / "assets" / "glm_sp.model"
GLM_IDS = ROOT.parent / "shared" / "fixtures" / "glm_official_ids.jsonl"


def _official_text(path, texts):
    """M2Encoder of a model carrying the release's tokenizer: its text style, the ids
    encode_text feeds the model (its tokenizer at the model's text length), and whether
    encode_text's embeddings are those of the release's ids."""
    from megatron_m2 import M2Encoder

    enc = M2Encoder.from_pretrained(path)
    ids, pad = enc.tokenizer(texts, max_length=enc.cfg.max_text_len)
    rows = [json.loads(line) for line in GLM_IDS.read_text(encoding="utf-8").splitlines()]
    framed = [[i for i, m in zip(r["input_ids"], r["attention_mask"]) if m] for r in rows]
    same = torch.allclose(enc.encode_text(texts), enc.encode_tokens(framed), atol=1e-6)
    return {"style": enc.tokenizer.text_style, "ids": ids.tolist(),
            "mask": (~pad).int().tolist(), "same_embeddings": same}


def test_encode_text_uses_the_release_tokenisation(tmp_path):
    """A model converted with the release's tokenizer encodes text exactly as the release does
    (the 32 strings of the release-made fixture), by default."""
    if not (GLM_MODEL.exists() and GLM_IDS.exists()):
        pytest.skip("release tokenizer or its id fixture not found beside the project")
    from megatron_m2.checkpoint import from_official, save_single_file
    from megatron_m2.data.tokenizer import M2Tokenizer
    from tests.model.test_official import random_official

    glm = M2Tokenizer(GLM_MODEL)
    cfg = M2ModelConfig(hidden_size=32, num_attention_heads=2, ffn_hidden_size=64,
                        num_sep_layers=1, num_vl_layers=1, embed_dim=16, image_size=32,
                        patch_size=16, vocab_size=glm.vocab_size, max_text_len=52,
                        eos_token_id=glm.eos_id, cls_token_id=glm.cls_id)
    path = tmp_path / "m2.safetensors"
    save_single_file(str(path), from_official(random_official(cfg, seed=3), cfg), cfg,
                     tokenizer_bytes=GLM_MODEL.read_bytes())  # style: the model's default
    rows = [json.loads(line) for line in GLM_IDS.read_text(encoding="utf-8").splitlines()]
    out = run_distributed(_official_text, 1, path=str(path), texts=[r["text"] for r in rows])[0]
    assert out["style"] == "official"
    assert out["ids"] == [r["input_ids"] for r in rows]
    assert out["mask"] == [r["attention_mask"] for r in rows]
    assert out["same_embeddings"]
