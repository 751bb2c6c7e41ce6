"""The numpy reader of the indexed format: bitwise agreement with megatron-core, header checks,
pickling into worker processes without megatron-core."""

import multiprocessing
import os
import pickle
import shutil
import struct
import sys

import numpy as np
import pytest

from megatron_m2.data.indexed import (
    MODE_IMAGE,
    DatasetError,
    DatasetNotFoundError,
    ImageTextIndexedDataset,
    ImageTextWriter,
    decode_image_sequence,
    read_index,
)

# Only numpy and our modules at module level: a spawned child imports this module to run the
# functions below, and must not get megatron-core (or torch) from here.

HEADER = 34  # magic 9 + version 8 + dtype code 1 + sequence count 8 + document count 8


def _samples(n: int, seed: int):
    """``n`` samples with 1-3 captions in en / zh / other and images of every pad count."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        caps = []
        for k in range(1 + i % 3):
            lang = ("en", "zh", "fr")[(i + k) % 3]
            caps.append((lang, rng.integers(0, 50_000, int(rng.integers(2, 40))).tolist()))
        image = rng.integers(0, 256, 97 + 13 * i, dtype=np.uint8).tobytes()  # 1 + 13i mod 4
        out.append((image, caps))
    return out


def _write(prefix: str, samples) -> None:
    with ImageTextWriter(prefix) as w:
        for image, caps in samples:
            w.add_sample(image, caps)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A dataset from our writer and one from our merge (``add_dataset``) of two such."""
    d = tmp_path_factory.mktemp("reader")
    a, b = _samples(9, seed=1), _samples(6, seed=2)
    _write(str(d / "a"), a)
    _write(str(d / "b"), b)
    with ImageTextWriter(str(d / "ab")) as w:
        w.add_dataset(str(d / "a"))
        w.add_dataset(str(d / "b"))
    return {"a": (str(d / "a"), a), "ab": (str(d / "ab"), a + b)}


def _lang(lang: str) -> str:
    return lang if lang in ("en", "zh") else "other"


@pytest.mark.parametrize("which", ["a", "ab"])
def test_same_as_megatron_core_bitwise(written, which):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix, expected = written[which]
    ours = ImageTextIndexedDataset(prefix)
    ref = IndexedDataset(prefix, multimodal=True, mmap=True)

    def same(x, y):
        x, y = np.asarray(x), np.asarray(y)
        return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()

    # megatron-core's index arrays (its ``sequence_modes`` property cannot be used: it asserts
    # on the truth value of an array).
    assert same(ours.sequence_lengths, ref.index.sequence_lengths)
    assert same(ours.sequence_pointers, ref.index.sequence_pointers)
    assert same(ours.document_indices, ref.index.document_indices)
    assert same(ours.sequence_modes, ref.index.sequence_modes)
    assert ours.num_sequences == len(ref)
    assert len(ours) == len(ref.document_indices) - 1 == len(expected)
    for j in range(len(ref)):
        seq, mode = ours.sequence(j)
        ref_seq, ref_mode = ref[j]
        assert same(seq, ref_seq) and mode == int(ref_mode)
    for i, (image, caps) in enumerate(expected):
        lo, hi = ours.sequence_range(i)
        ref_seqs, ref_modes = ref[lo:hi]  # megatron-core's contiguous read of a whole document
        assert [int(m) for m in ref_modes] == [ours.sequence(j)[1] for j in range(lo, hi)]
        for j, ref_seq in zip(range(lo, hi), ref_seqs):
            assert same(ours.sequence(j)[0], ref_seq)
        # And both are what was written.
        sample = ours[i]
        assert sample.image == image == decode_image_sequence(ref_seqs[-1])
        assert int(ref_modes[-1]) == MODE_IMAGE
        assert [(lang, ids.tolist()) for lang, ids in sample.captions] == [
            (_lang(lang), ids) for lang, ids in caps]
        assert all(ids.dtype == np.int32 for _, ids in sample.captions)
        assert ours.caption_languages(i) == [_lang(lang) for lang, _ in caps]
    langs = [_lang(lang) for _, caps in expected for lang, _ in caps]
    assert ours.language_counts() == {k: langs.count(k) for k in ("en", "zh", "other")}
    with pytest.raises(IndexError):
        ours[len(expected)]
    with pytest.raises(IndexError):
        ours.sequence(len(ref))


def test_empty_dataset(tmp_path):
    _write(str(tmp_path / "e"), [])
    ds = ImageTextIndexedDataset(str(tmp_path / "e"))
    assert len(ds) == 0 and ds.num_sequences == 0 and list(ds) == []
    assert read_index(str(tmp_path / "e")).num_samples == 0


# -- corrupt files ------------------------------------------------------------------------------

def _patch(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _truncate(path, drop: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - drop)


def _counts(idx) -> tuple:
    with open(idx, "rb") as f:
        return struct.unpack("<QQ", f.read(HEADER)[18:])


CORRUPTIONS = {
    # name: (damage(bin, idx), file named in the message, words in the message)
    "magic": (lambda b, i: _patch(i, 0, b"NOTANIDX\x00"), "idx", ["magic", "not a megatron"]),
    "version": (lambda b, i: _patch(i, 9, struct.pack("<Q", 2)), "idx", ["version 2"]),
    "dtype int64": (lambda b, i: _patch(i, 17, bytes([5])), "idx", ["int64", "expected int32"]),
    "dtype unknown": (lambda b, i: _patch(i, 17, bytes([99])), "idx", ["unknown code 99"]),
    "short header": (lambda b, i: _truncate(i, os.path.getsize(i) - 20), "idx",
                     ["20 bytes", "header"]),
    "truncated idx": (lambda b, i: _truncate(i, 1), "idx", ["bytes, expected", "truncated"]),
    "text-only idx": (lambda b, i: _truncate(i, _counts(i)[0]), "idx", ["text-only"]),
    "sequence count": (lambda b, i: _patch(i, 18, struct.pack("<Q", _counts(i)[0] + 1)), "idx",
                       ["bytes, expected"]),
    "last document index": (lambda b, i: _patch(i, os.path.getsize(i) - _counts(i)[0] - 8,
                                                struct.pack("<q", _counts(i)[0] - 1)),
                            "idx", ["document indices"]),
    "truncated bin": (lambda b, i: _truncate(b, 4), "bin", ["bytes but the index describes"]),
    "longer bin": (lambda b, i: open(b, "ab").write(b"\0" * 4), "bin",
                   ["bytes but the index describes"]),
}


@pytest.fixture
def damaged(written, tmp_path):
    """A fresh copy of dataset ``a`` to damage: ``(prefix, bin path, idx path)``."""
    src, _ = written["a"]
    prefix = str(tmp_path / "d")
    for ext in (".bin", ".idx"):
        shutil.copy(src + ext, prefix + ext)
    return prefix, prefix + ".bin", prefix + ".idx"


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupt_files_give_clear_errors(damaged, name):
    prefix, bin_path, idx_path = damaged
    damage, which, words = CORRUPTIONS[name]
    damage(bin_path, idx_path)
    path = bin_path if which == "bin" else idx_path
    for open_it in (lambda: read_index(prefix), lambda: read_index(prefix, full=False),
                    lambda: ImageTextIndexedDataset(prefix)):
        with pytest.raises(DatasetError) as err:
            open_it()
        msg = str(err.value)
        assert path in msg, msg
        for word in words:
            assert word in msg, msg


def test_missing_file(damaged):
    prefix, bin_path, _ = damaged
    os.remove(bin_path)
    for open_it in (lambda: read_index(prefix), lambda: ImageTextIndexedDataset(prefix)):
        with pytest.raises(DatasetNotFoundError) as err:
            open_it()
        assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, DatasetError)
        assert bin_path in str(err.value) and "missing" in str(err.value)


def test_full_validation_checks_the_contents(damaged):
    prefix, _, idx_path = damaged
    n_seq, _ = _counts(idx_path)
    _patch(idx_path, os.path.getsize(idx_path) - n_seq, bytes([7]))  # first sequence's mode
    with pytest.raises(DatasetError, match=r"unknown sequence modes \[7\]"):
        read_index(prefix)
    # The reader checks the header and sizes only (constant cost, in every worker).
    assert len(ImageTextIndexedDataset(prefix)) == 9


# -- pickling, worker processes -----------------------------------------------------------------

def _read_all(reader):
    return [(s.image, [(lang, ids.tolist()) for lang, ids in s.captions]) for s in reader]


def _child_read(payload: bytes, conn) -> None:
    """Run in a spawned process: unpickle a reader, read everything, report the modules."""
    reader = pickle.loads(payload)
    try:
        result = {"samples": _read_all(reader), "error": None}
    except DatasetError as exc:
        result = {"samples": None, "error": str(exc)}
    result["megatron"] = sorted(m for m in sys.modules if m.split(".")[0] == "megatron")
    result["torch"] = "torch" in sys.modules
    conn.send(result)
    conn.close()


def _in_spawned_child(payload: bytes) -> dict:
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_read, args=(payload, send))
    proc.start()
    send.close()
    try:
        result = recv.recv()
    finally:
        proc.join(timeout=120)
    assert proc.exitcode == 0
    return result


def test_pickles_without_the_maps_and_reads_in_a_spawned_process(written, tmp_path):
    prefix, expected = written["a"]
    reader = ImageTextIndexedDataset(prefix)
    assert reader[0].image == expected[0][0]  # maps open in this process
    payload = pickle.dumps(reader)
    assert len(payload) < 200 + len(prefix)  # the prefix, not the index or the data
    assert pickle.loads(payload)[3].image == expected[3][0]

    result = _in_spawned_child(payload)
    assert result["error"] is None
    assert result["samples"] == [(image, [(_lang(la), ids) for la, ids in caps])
                                 for image, caps in expected]
    assert result["megatron"] == [] and not result["torch"]  # numpy alone

    # The maps are opened on first use in the child, so a dataset damaged after pickling fails
    # there with the same clear error.
    copy = str(tmp_path / "c")
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, copy + ext)
    payload = pickle.dumps(ImageTextIndexedDataset(copy))
    _truncate(copy + ".bin", 4)
    result = _in_spawned_child(payload)
    assert result["samples"] is None
    assert copy + ".bin" in result["error"] and "bytes" in result["error"]


def _child_after_fork(reader, parent_index, conn) -> None:
    conn.send({"new_maps": reader.index is not parent_index, "samples": _read_all(reader)})
    conn.close()


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork")
def test_forked_process_maps_the_files_again(written):
    prefix, expected = written["a"]
    reader = ImageTextIndexedDataset(prefix)
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_after_fork, args=(reader, reader.index, send))
    proc.start()
    send.close()
    result = recv.recv()
    proc.join(timeout=60)
    assert proc.exitcode == 0 and result["new_maps"]
    assert result["samples"] == _read_all(reader)
    assert reader.index is reader.index  # the parent keeps its own maps
