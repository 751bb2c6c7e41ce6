"""The tracker of a save folder (torch-free): a lost or broken tracker never makes a folder of
checkpoints look empty, and a new run does not write into a folder of checkpoints."""

import json
import logging

import pytest

from megatron_m2.checkpoint import (
    TRACKER,
    CheckpointError,
    complete_iterations,
    holds_checkpoint,
    latest_iteration,
    resolve_checkpoint,
)
from megatron_m2.config import ConfigError
from megatron_m2.training.arguments import parse_args
from megatron_m2.training.validation import validate_args


def _save_root(tmp_path, steps=(2, 4)):
    root = tmp_path / "save"
    for step in steps:
        d = root / f"iter_{step:07d}"
        d.mkdir(parents=True)
        (d / "meta.json").write_text(json.dumps({"step": step}))
    (root / "iter_0000006.tmp").mkdir()               # a save that never finished
    (root / "iter_0000008").mkdir()                   # no meta.json: not a checkpoint
    return root


def test_tracker_names_the_checkpoint(tmp_path):
    root = _save_root(tmp_path)
    (root / TRACKER).write_text("2\n")  # authoritative, even with a newer complete directory
    assert latest_iteration(str(root)) == 2
    assert resolve_checkpoint(str(root))[1] == {"step": 2}


@pytest.mark.parametrize("tracker,problem", [
    (None, "is missing"),
    ("garbage\x00", "does not hold an iteration number"),
    ("6\n", "names iteration 6, but"),
    ("8\n", "names iteration 8, but"),
])
def test_lost_or_broken_tracker_recovers_the_newest(tmp_path, caplog, tracker, problem):
    root = _save_root(tmp_path)
    if tracker is not None:
        (root / TRACKER).write_text(tracker)
    assert complete_iterations(str(root)) == [2, 4]
    assert holds_checkpoint(str(root))
    with caplog.at_level(logging.WARNING):
        directory, meta = resolve_checkpoint(str(root))
    assert meta == {"step": 4} and directory.endswith("iter_0000004")
    assert problem in caplog.text and "newest complete checkpoint" in caplog.text


def test_empty_and_hopeless_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert latest_iteration(str(empty)) is None and not holds_checkpoint(str(empty))
    (empty / TRACKER).write_text("nonsense")
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        latest_iteration(str(empty))
    bad_meta = _save_root(tmp_path / "b", steps=(3,))
    (bad_meta / "iter_0000003" / "meta.json").write_text('{"step": ')
    with pytest.raises(CheckpointError, match="meta.json: not valid JSON"):
        resolve_checkpoint(str(bad_meta))


def test_new_run_refuses_a_folder_of_checkpoints(tmp_path):
    root = _save_root(tmp_path)  # no tracker: it must still count as holding checkpoints
    base = ["--synthetic", "--save", str(root)]
    with pytest.raises(ConfigError, match="already holds checkpoints .newest: iter_0000004.: "
                                          "resume from them with --load"):
        validate_args(parse_args(base), 1)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        validate_args(parse_args(base + ["--load", str(tmp_path / "elsewhere")]), 1)


def test_resume_refuses_another_tokenizer(tmp_path):
    """The checkpoint's tokenizer (recorded in meta.json, or its tokenizer.model copy) must be
    --tokenizer-model's: another one of the same size would give every id another meaning."""
    import shutil

    from megatron_m2.data.tokenizer import M2Tokenizer, train_tokenizer
    from tests.helpers.tools import ROOT

    demo = ROOT / "data" / "emoji_demo" / "tokenizer.model"
    other = train_tokenizer(["a photo of a cat", "一只猫", "two dogs"] * 50,
                            tmp_path / "other", vocab_size=300)
    root = _save_root(tmp_path, steps=(2,))
    iter_2 = root / "iter_0000002"
    (iter_2 / "meta.json").write_text(json.dumps(
        {"step": 2, "tokenizer": {"sha256": M2Tokenizer(demo).sha256()}}))
    base = ["--synthetic", "--load", str(root)]
    validate_args(parse_args(base + ["--tokenizer-model", str(demo)]), 1)
    with pytest.raises(ConfigError, match=f"--tokenizer-model {other} .* is not the tokenizer "
                                          "of the checkpoint"):
        validate_args(parse_args(base + ["--tokenizer-model", str(other)]), 1)
    validate_args(parse_args(base + ["--tokenizer-model", str(other),
                                     "--allow-tokenizer-mismatch"]), 1)
    # A checkpoint of an older version: its tokenizer.model copy is compared.
    (iter_2 / "meta.json").write_text(json.dumps({"step": 2}))
    shutil.copyfile(demo, iter_2 / "tokenizer.model")
    with pytest.raises(ConfigError, match="its copy is .*tokenizer.model"):
        validate_args(parse_args(base + ["--tokenizer-model", str(other)]), 1)


def test_truncated_or_garbled_shards_are_named_at_validation(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    from megatron_m2.checkpoint import check_tensor_file

    root = _save_root(tmp_path, steps=(2,))
    shard = root / "iter_0000002" / "model_pp000.safetensors"
    save_file({"a": np.arange(100, dtype=np.float32), "b": np.ones(3, np.float32)}, str(shard))
    check_tensor_file(str(shard))  # intact
    validate_args(parse_args(["--synthetic", "--load", str(root)]), 1)
    data = shard.read_bytes()
    for broken, message in ((data[:-40], "truncated"), (data[:5], "truncated"),
                            (data[:8] + b"{nonsense" + data[17:], "garbled safetensors header")):
        shard.write_bytes(broken)
        with pytest.raises(CheckpointError, match=message):
            check_tensor_file(str(shard))
        with pytest.raises(CheckpointError, match=f"{shard}: .*{message}"):
            validate_args(parse_args(["--synthetic", "--load", str(root)]), 1)
