"""Dataset identity: the card written by preprocessing is checked by merging and by training's
argument validation (evaluation: ``tests/test_inference.py``)."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from megatron_m2.cli.merge_datasets import main as merge_main
from megatron_m2.cli.merge_datasets import merge_datasets
from megatron_m2.config import ConfigError
from megatron_m2.data.identity import DatasetMismatchError, read_card
from megatron_m2.data.preprocess import PreprocessConfig, preprocess
from megatron_m2.errors import UserError
from megatron_m2.training.arguments import parse_args
from megatron_m2.training.validation import validate_args
from tests.helpers.tools import ROOT

DEMO_TOKENIZER = str(ROOT / "data" / "emoji_demo" / "tokenizer.model")


def _dataset(root, name, tokenizer, langs=("en", "zh"), **cfg):
    (root / "img").mkdir(exist_ok=True)
    rows = []
    for i in range(4):
        buf = io.BytesIO()
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(buf, format="PNG")
        (root / "img" / f"{i}.png").write_bytes(buf.getvalue())
        caps = {"en": f"an emoji of a cat number {i} with a very long caption " * 2,
                "zh": "一只猫的表情符号"}
        rows.append(dict(image=f"img/{i}.png", **{f"caption_{la}": caps[la] for la in langs}))
    manifest = root / f"{name}.jsonl"
    manifest.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    prefix = str(root / name)
    preprocess([str(manifest)], prefix, PreprocessConfig(tokenizer_model=tokenizer,
                                                         max_image_size=16, **cfg))
    return prefix


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, tokenizer_model):
    root = tmp_path_factory.mktemp("identity")
    return {"demo": _dataset(root, "demo", DEMO_TOKENIZER),
            "demo_en": _dataset(root, "demo_en", DEMO_TOKENIZER, langs=("en",)),
            "demo_cut": _dataset(root, "demo_cut", DEMO_TOKENIZER, text_length=8),
            "demo_official": _dataset(root, "demo_official", DEMO_TOKENIZER,
                                      text_style="official"),
            "other": _dataset(root, "other", tokenizer_model)}


def test_cut_captions_are_recorded(datasets):
    card = read_card(datasets["demo_cut"])
    assert card["text_length"] == 8 and card["max_caption_tokens"] == 8
    assert read_card(datasets["demo"])["text_length"] is None
    assert read_card(datasets["demo"])["max_caption_tokens"] > 8


def test_merge_refuses_another_tokenizer(datasets, tmp_path, capsys):
    with pytest.raises(DatasetMismatchError) as e:
        merge_datasets([datasets["demo"], datasets["other"]], str(tmp_path / "m"))
    msg = str(e.value)
    assert f"dataset {datasets['other']} does not match" in msg and "sha256" in msg
    assert "--allow-dataset-mismatch" in msg
    assert not list(tmp_path.iterdir())  # nothing written
    # The same refusal from the command line: one line, exit 2.
    code = merge_main(["--input", datasets["demo"], datasets["demo_official"],
                       "--output-prefix", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "text style official vs normalized" in err[0]
    # Allowed: merged, without a card (its identity is unknown).
    assert merge_datasets([datasets["demo"], datasets["other"]], str(tmp_path / "m"),
                          allow_mismatch=True) == 8
    assert read_card(str(tmp_path / "m")) is None
    # Same tokenizer: the output's card sums the inputs' captions; cut captions stay recorded.
    assert merge_datasets([datasets["demo"], datasets["demo_en"], datasets["demo_cut"]],
                          str(tmp_path / "ok")) == 12
    card = read_card(str(tmp_path / "ok"))
    assert card["captions"] == {"en": 12, "zh": 8} and card["samples"] == 12
    assert card["text_length"] == 8


def _validate(*argv):
    validate_args(parse_args(["--flavor", "tiny", "--tokenizer-model", DEMO_TOKENIZER,
                              "--micro-batch-size", "2", "--global-batch-size", "2", *argv]), 1)


def test_training_refuses_a_mismatch(datasets):
    _validate("--data-path", datasets["demo"], "--valid-data-path", datasets["demo_en"])
    cases = [
        (["--data-path", datasets["other"]], "made with another tokenizer (sha256"),
        (["--data-path", datasets["demo"], "--valid-data-path", datasets["other"]],
         "made with another tokenizer (sha256"),
        (["--data-path", datasets["demo"], datasets["demo_official"]],
         "text style official vs normalized"),
        (["--data-path", datasets["demo_cut"]],
         "its captions were cut to 8 tokens when stored; the model reads 32"),
        (["--data-path", datasets["demo_en"], "--caption-lang", "zh"],
         "no zh captions (it has: en 4)"),
    ]
    for argv, message in cases:
        with pytest.raises(UserError) as e:
            _validate(*argv)
        assert message in str(e.value), (argv, str(e.value))
        assert "--allow-dataset-mismatch" in str(e.value)
        _validate(*argv, "--allow-dataset-mismatch")  # the override lets it through


def test_training_refuses_empty_and_broken_inputs(datasets, tmp_path):
    bad_tok = tmp_path / "tok.model"
    bad_tok.write_text("no")
    with pytest.raises(UserError, match=f"{bad_tok}: not a SentencePiece model"):
        validate_args(parse_args(["--data-path", datasets["demo"], "--tokenizer-model",
                                  str(bad_tok)]), 1)
    with pytest.raises(ConfigError, match="--split 0.0001,1 leaves no training sample"):
        _validate("--data-path", datasets["demo"], "--split", "0.0001,1")
    from megatron_m2.data.indexed import ImageTextWriter

    with ImageTextWriter(str(tmp_path / "empty")):
        pass
    with pytest.raises(ConfigError, match=f"{tmp_path / 'empty'}.idx holds no samples"):
        _validate("--data-path", str(tmp_path / "empty"))
