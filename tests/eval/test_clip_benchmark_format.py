"""``m2-eval --format clip_benchmark``: LAION clip_benchmark's result objects.

The figures are hand-computed on tiny similarity matrices, so the key names, the units
(fractions, not percent) and above all the direction of the recalls are pinned:
clip_benchmark's ``image_retrieval_recall@k`` is text→image (m2-eval's ``t2i_r{k}``) and
``text_retrieval_recall@k`` is image→text (``i2t_r{k}``).
"""

import json
import math

import pytest
import torch

from megatron_m2.eval import clip_benchmark as cb
from megatron_m2.eval.retrieval import retrieval_metrics, zero_shot_accuracy
from megatron_m2.eval.tasks import evaluate_zero_shot_dataset
from megatron_m2.eval.zeroshot import class_recall_counts, mean_per_class_recall
from tests.test_inference import _cfg, _m2_eval, exported  # noqa: F401 - exported: a fixture

RECORD_KEYS = ["dataset", "model", "pretrained", "task", "metrics", "language"]

# -- retrieval: 6 images, 7 captions --------------------------------------------------------------
# Images are the one-hot vectors e_0..e_5 and caption c's embedding is its row below, so the
# caption x image similarity matrix is exactly this table. Caption -> its image: c0, c1 -> i0;
# c2 -> i1; c3 -> i2; c4 -> i3; c5 -> i4; c6 -> i5.
SIM = [
    # i0  i1  i2  i3  i4  i5
    [90, 10, 20, 30, 40, 50],  # c0 (i0)
    [11, 91, 81, 71, 61, 51],  # c1 (i0)
    [12, 52, 82, 22, 32, 42],  # c2 (i1)
    [13, 23, 93, 33, 43, 53],  # c3 (i2)
    [14, 24, 34, 44, 54, 64],  # c4 (i3)
    [15, 25, 35, 45, 95, 55],  # c5 (i4)
    [16, 26, 36, 46, 56, 66],  # c6 (i5)
]
OWNER = [0, 0, 1, 2, 3, 4, 5]
# Text -> image (each caption's row: the rank of its own image):
#   c0 1, c1 6 (its image scores lowest), c2 2 (82 > 52), c3 1, c4 3 (54, 64 > 44), c5 1, c6 1
#   R@1 = 4/7 (c0, c3, c5, c6), R@5 = 6/7 (all but c1), R@10 = 7/7.
T2I = {1: 4 / 7, 5: 6 / 7, 10: 1.0}
# Image -> text (each image's column: is any of its captions among the top k?):
#   i0 [90*, 11*, 12, 13, 14, 15, 16] -> c0 first: hit@1
#   i1 [10, 91, 52*, 23, 24, 25, 26]  -> c1 then c2: rank 2
#   i2 [20, 81, 82, 93*, 34, 35, 36]  -> c3 first
#   i3 [30, 71, 22, 33, 44*, 45, 46]  -> c1, c6, c5, c4: rank 4
#   i4 [40, 61, 32, 43, 54, 95*, 56]  -> c5 first
#   i5 [50, 51, 42, 53, 64, 55, 66*]  -> c6 first
#   R@1 = 4/6, R@5 = 6/6, R@10 = 6/6.
I2T = {1: 4 / 6, 5: 1.0, 10: 1.0}


def _retrieval_results():
    images = torch.eye(6)
    texts = torch.tensor(SIM, dtype=torch.float32)
    m = retrieval_metrics(images, texts, torch.tensor(OWNER))
    m["images"], m["captions"] = 6, 7  # as m2-eval reports them
    return m


def test_retrieval_figures_are_the_hand_computed_ones():
    """The m2-eval side first (percent): i2t is per image, t2i per caption."""
    m = _retrieval_results()
    for k in (1, 5, 10):
        assert m[f"t2i_r{k}"] == pytest.approx(100 * T2I[k], abs=1e-12)
        assert m[f"i2t_r{k}"] == pytest.approx(100 * I2T[k], abs=1e-12)


def test_retrieval_metrics_names_direction_and_fractions():
    got = cb.retrieval_metrics(_retrieval_results())
    assert list(got) == ["image_retrieval_recall@1", "text_retrieval_recall@1",
                         "image_retrieval_recall@5", "text_retrieval_recall@5",
                         "image_retrieval_recall@10", "text_retrieval_recall@10"]
    for k in (1, 5, 10):
        # image retrieval = text->image queries (one per caption), text retrieval = image->text
        assert got[f"image_retrieval_recall@{k}"] == T2I[k]
        assert got[f"text_retrieval_recall@{k}"] == I2T[k]
    # exact fractions of the query counts, not (100 * h / n) / 100
    assert got["image_retrieval_recall@1"] == 4 / 7 and got["text_retrieval_recall@1"] == 2 / 3
    # without the counts, percent / 100
    no_counts = {k: v for k, v in _retrieval_results().items() if k not in ("images", "captions")}
    approx = cb.retrieval_metrics(no_counts)
    assert approx == pytest.approx(got, abs=1e-15)


def test_retrieval_records_one_per_language():
    m = _retrieval_results()
    records = cb.make_records("retrieval", {"en": m, "zh": m}, dataset="demo",
                              model="m2-encoder-tiny", pretrained="run")
    assert [r["language"] for r in records] == ["en", "zh"]
    for r in records:
        assert list(r) == RECORD_KEYS
        assert r["task"] == "zeroshot_retrieval" and r["dataset"] == "demo"
        assert r["model"] == "m2-encoder-tiny" and r["pretrained"] == "run"
        assert r["metrics"]["image_retrieval_recall@5"] == 6 / 7
        assert r["metrics"]["text_retrieval_recall@5"] == 1.0
        assert all(0.0 <= v <= 1.0 for v in r["metrics"].values())
    line = json.loads(cb.dumps(records[0]))
    assert list(line) == RECORD_KEYS and line == records[0]


def test_retrieval_metrics_errors():
    with pytest.raises(ValueError, match="same k"):
        cb.retrieval_metrics({"i2t_r1": 50.0, "t2i_r5": 10.0})
    with pytest.raises(ValueError, match="no counterpart of task 'probe'"):
        cb.make_records("probe", {}, dataset="d", model="m", pretrained="p")


# -- zero-shot: 9 images of 6 classes, imbalanced ---------------------------------------------
# Image embedding = its scores over the classes; class c's text embedding is e_c.
ZS = [  # (scores over classes 0..5, label)
    ([9, 1, 2, 3, 4, 5], 0),  # top-1 0: right
    ([9, 1, 2, 3, 4, 5], 0),  # right
    ([1, 9, 2, 3, 4, 5], 0),  # top-1 1; class 0 ranks 6th: not in the top 5
    ([5, 9, 1, 2, 3, 4], 0),  # top-1 1; class 0 ranks 2nd
    ([9, 1, 2, 3, 4, 5], 1),  # top-1 0; class 1 ranks 6th
    ([1, 2, 9, 3, 4, 5], 2),  # right
    ([1, 2, 3, 9, 4, 5], 2),  # top-1 3; class 2 ranks 4th
    ([1, 2, 3, 4, 9, 5], 4),  # right
    ([1, 2, 3, 4, 9, 5], 4),  # right
]
# acc1 = 5/9; acc5 = 7/9 (images 2 and 4 miss).
# Recall per class with images: class 0 2/4, class 1 0/1, class 2 1/2, class 4 2/2; classes 3
# and 5 have no image (3 is predicted once) and do not count:
# mean_per_class_recall = (1/2 + 0 + 1/2 + 1) / 4 = 1/2 -- not acc1, not 2/6 (empty classes as
# 0) and not 2/5 (averaging over the predicted classes too).
ACC1, ACC5, MPCR = 5 / 9, 7 / 9, 0.5


def _zs_tensors():
    img = torch.tensor([s for s, _ in ZS], dtype=torch.float32)
    return img, torch.eye(6), torch.tensor([lab for _, lab in ZS])


def test_mean_per_class_recall_hand_computed():
    img, cls, labels = _zs_tensors()
    hits, totals = class_recall_counts(img, cls, labels)
    assert hits.tolist() == [2, 0, 1, 0, 2, 0] and totals.tolist() == [4, 1, 2, 0, 2, 0]
    assert mean_per_class_recall(img, cls, labels) == pytest.approx(100 * MPCR, abs=1e-12)
    # the same top-1 as zero_shot_accuracy, whatever the block size
    top1 = zero_shot_accuracy(img, cls, labels, ks=(1,))["top1"]
    assert 100 * hits.sum().item() / totals.sum().item() == top1
    assert mean_per_class_recall(img, cls, labels, chunk_size=2) == \
        mean_per_class_recall(img, cls, labels)
    # shards add up (what the all_reduce over a group sums)
    parts = [class_recall_counts(img[a:b], cls, labels[a:b]) for a, b in ((0, 4), (4, 9))]
    assert (parts[0][0] + parts[1][0]).tolist() == hits.tolist()
    assert (parts[0][1] + parts[1][1]).tolist() == totals.tolist()


def test_mean_per_class_recall_ties_and_errors():
    # an exact tie goes to the lower class index, as in zero_shot_accuracy
    img = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 1.0]])
    hits, totals = class_recall_counts(img, torch.eye(2), torch.tensor([0, 1, 1]))
    assert hits.tolist() == [1, 1] and totals.tolist() == [1, 2]
    assert mean_per_class_recall(img, torch.eye(2), torch.tensor([0, 1, 1])) == 75.0
    with pytest.raises(ValueError, match=r"labels outside \[0, 2\): \[2\]"):
        class_recall_counts(img, torch.eye(2), torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="at least one image"):
        mean_per_class_recall(torch.empty(0, 2), torch.eye(2), torch.empty(0, dtype=torch.long))


class _ScoreEncoder:
    """An encoder whose image embedding is the image itself (a score row) and whose text
    embedding of a prompt naming class ``cj`` is ``e_j``."""

    embed_dim = 6

    def transform(self, image):
        return image

    def encode_image(self, pixels):
        return pixels

    def encode_text(self, texts):
        return torch.eye(self.embed_dim)[[int(t.split("c")[-1]) for t in texts]]


class _ScoreData:
    def __init__(self, rows):
        self.rows = rows
        self.num_classes = 6

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        scores, label = self.rows[i]
        return torch.tensor(scores, dtype=torch.float32), label


def test_zero_shot_dataset_to_classification_record():
    names = [f"c{j}" for j in range(6)]
    results = evaluate_zero_shot_dataset(_ScoreEncoder(), _ScoreData(ZS), {"en": names},
                                         {"en": ["{c}"]}, batch_size=4, per_class=True)
    m = results["en"]
    assert m["top1"] == pytest.approx(100 * ACC1) and m["top5"] == pytest.approx(100 * ACC5)
    assert m["mean_per_class_recall"] == pytest.approx(100 * MPCR)
    [record] = cb.make_records("zeroshot", results, dataset="scores", model="m2-encoder",
                               pretrained="model.safetensors")
    assert list(record) == RECORD_KEYS
    assert record["task"] == "zeroshot_classification" and record["language"] == "en"
    assert list(record["metrics"]) == ["acc1", "acc5", "mean_per_class_recall"]
    assert record["metrics"]["acc1"] == 5 / 9 and record["metrics"]["acc5"] == 7 / 9
    assert record["metrics"]["mean_per_class_recall"] == pytest.approx(MPCR, abs=1e-15)
    # the default (m2) results are unchanged: no per-class figure unless asked for
    plain = evaluate_zero_shot_dataset(_ScoreEncoder(), _ScoreData(ZS), {"en": names},
                                       {"en": ["{c}"]})
    assert set(plain["en"]) == {"top1", "top5", "images", "templates"}
    with pytest.raises(ValueError, match="per_class=True"):
        cb.classification_metrics(plain["en"])


def test_fewer_than_five_classes_acc5_is_nan():
    got = cb.classification_metrics({"top1": 50.0, "top3": 100.0, "mean_per_class_recall": 25.0,
                                     "images": 4})
    assert got["acc1"] == 0.5 and got["mean_per_class_recall"] == 0.25
    assert math.isnan(got["acc5"])
    assert '"acc5": NaN' in cb.dumps({"dataset": "d", "model": "m", "pretrained": "p",
                                      "task": "zeroshot_classification", "metrics": got,
                                      "language": "en"})


# -- names and files ----------------------------------------------------------------------------
def test_names():
    from megatron_m2.flavors import FLAVORS

    assert cb.model_name(FLAVORS["0.4b"]) == "m2-encoder-0.4b"
    assert cb.model_name(FLAVORS["tiny"]) == "m2-encoder-tiny"
    assert cb.model_name(_cfg()) == "m2-encoder"
    assert cb.pretrained_name("runs/demo/") == "demo"
    assert cb.pretrained_name("exports/model.safetensors") == "model.safetensors"
    assert cb.pretrained_name("runs/demo/iter_0000100") == "demo_iter_0000100"
    assert cb.dataset_name("data/emoji_demo/validation") == "validation"
    assert cb.dataset_name("photos/") == "photos"


def _records(langs=("en", "zh")):
    m = _retrieval_results()
    return cb.make_records("retrieval", {lang: m for lang in langs}, dataset="validation",
                           model="m2-encoder", pretrained="model.safetensors")


def test_output_paths(tmp_path):
    two, one = _records(), _records(("en",))
    d = str(tmp_path)
    default = [f"{d}/validation_model.safetensors_m2-encoder_{lang}_zeroshot_retrieval.json"
               for lang in ("en", "zh")]
    assert cb.output_paths(d, two) == default                      # an existing directory
    assert cb.output_paths(d + "/new/", one) == [               # a directory to be made
        f"{d}/new/validation_model.safetensors_m2-encoder_en_zeroshot_retrieval.json"]
    assert cb.output_paths(f"{d}/r.json", one) == [f"{d}/r.json"]
    assert cb.output_paths(f"{d}/r.json", two) == [f"{d}/r_en.json", f"{d}/r_zh.json"]
    assert cb.output_paths(f"{d}/{{task}}-{{language}}.json", two) == [
        f"{d}/zeroshot_retrieval-en.json", f"{d}/zeroshot_retrieval-zh.json"]
    assert cb.output_paths(f"{d}/{{pretrained_full_path}}.json", one, load="a/b.st") == [
        f"{d}/a_b.st.json"]
    assert cb.output_paths(f"{d}/{{dataset}}.json", two) == [f"{d}/validation_en.json",
                                                              f"{d}/validation_zh.json"]
    assert cb.check_output("{dataset}/{lang}.json").startswith("--output '{dataset}/{lang}.json'"
                                                               ": unknown field {lang}")
    assert "not a valid" in cb.check_output("x{.json")
    assert "plain {task}" in cb.check_output("{task!r}.json")
    with pytest.raises(ValueError, match="unknown field"):
        cb.output_paths("{foo}.json", one)


def test_written_files_are_what_clip_benchmark_build_reads(tmp_path):
    """``clip_benchmark build`` reads each file as one object and spreads its metrics."""
    paths = cb.write_records(str(tmp_path / "out") + "/", _records())
    assert len(paths) == 2
    rows = []
    for path in paths:
        data = json.load(open(path))
        assert list(data) == RECORD_KEYS
        row = dict(data["metrics"], **{k: v for k, v in data.items() if k != "metrics"})
        row["model_fullname"] = row["model"] + " " + row["pretrained"]
        rows.append(row)
    assert [r["language"] for r in rows] == ["en", "zh"]
    assert rows[0]["image_retrieval_recall@1"] == 4 / 7
    assert rows[0]["model_fullname"] == "m2-encoder model.safetensors"


# -- m2-eval ------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--task", "probe", "--data", "x"], "--format clip_benchmark covers --task retrieval and "
                                         "zeroshot, not --task probe"),
    (["--task", "retrieval", "--data", "x", "--output", "{name}.json"], "unknown field {name}"),
    (["--format", "m2", "--task", "retrieval", "--data", "x", "--dataset-name", "d"],
     "--dataset-name and --pretrained-name name clip_benchmark records"),
])
def test_m2_eval_usage_errors(args, message, capsys):
    from megatron_m2.cli.evaluate import _main

    with pytest.raises(SystemExit) as exc:
        _main(["--load", "nowhere", "--format", "clip_benchmark", *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_m2_eval_zeroshot_clip_benchmark(exported, tmp_path):  # noqa: F811 - the fixture
    from PIL import Image

    root = tmp_path / "folder"
    for c, colour in enumerate(("red", "green", "blue")):
        (root / colour).mkdir(parents=True)
        for i in range(2):
            px = [0, 0, 0]
            px[c] = 200 + 20 * i
            Image.new("RGB", (20, 20), tuple(px)).save(root / colour / f"{i}.png")
    (tmp_path / "en.txt").write_text("red\ngreen\nblue\n")
    (tmp_path / "zh.txt").write_text("红色\n绿色\n蓝色\n")
    out = tmp_path / "results"
    proc = _m2_eval("--load", str(exported["single"]), "--task", "zeroshot", "--image-folder",
                    str(root), "--classnames", f"en={tmp_path / 'en.txt'}",
                    f"zh={tmp_path / 'zh.txt'}", "--templates", "none", "--json",
                    "--no-progress", "--format", "clip_benchmark", "--output", f"{out}/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    records = [json.loads(line) for line in lines]
    for record, lang in zip(records, ("en", "zh")):
        assert list(record) == RECORD_KEYS
        assert record["task"] == "zeroshot_classification" and record["language"] == lang
        assert (record["dataset"], record["model"], record["pretrained"]) == (
            "folder", "m2-encoder", "model.safetensors")
        m = record["metrics"]
        assert list(m) == ["acc1", "acc5", "mean_per_class_recall"]
        assert round(m["acc1"] * 6, 9) == int(round(m["acc1"] * 6))  # 6 images
        assert math.isnan(m["acc5"])  # 3 classes, as clip_benchmark
        # 2 images per class: the balanced accuracy is the accuracy
        assert m["mean_per_class_recall"] == pytest.approx(m["acc1"], abs=1e-12)
        path = out / f"folder_model.safetensors_m2-encoder_{lang}_zeroshot_classification.json"
        saved = json.loads(path.read_text())
        assert list(saved) == RECORD_KEYS and saved["metrics"]["acc1"] == m["acc1"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"folder_model.safetensors_m2-encoder_{lang}_zeroshot_classification.json"
        for lang in ("en", "zh"))


@pytest.mark.slow
def test_m2_eval_retrieval_clip_benchmark_matches_m2(exported, tmp_path):  # noqa: F811
    """The same run in both formats: clip_benchmark's image retrieval is m2-eval's T→I."""
    from tests.test_inference import DEMO

    args = ("--load", str(exported["single"]), "--task", "retrieval", "--data",
            str(DEMO / "validation"), "--max-samples", "12", "--json", "--no-progress")
    m2 = _m2_eval(*args)
    assert m2.returncode == 0, m2.stderr[-3000:]
    results = json.loads(m2.stdout.strip().splitlines()[-1])["results"]
    out = tmp_path / "r.json"
    proc = _m2_eval(*args, "--format", "clip_benchmark", "--output", str(out),
                    "--dataset-name", "emoji_demo_validation", "--pretrained-name", "demo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [r["language"] for r in records] == list(results) == ["en", "zh"]
    for r in records:
        m, ref = r["metrics"], results[r["language"]]
        assert r["task"] == "zeroshot_retrieval"
        assert (r["dataset"], r["pretrained"]) == ("emoji_demo_validation", "demo")
        for k in (1, 5, 10):
            assert m[f"image_retrieval_recall@{k}"] == pytest.approx(ref[f"t2i_r{k}"] / 100,
                                                                     abs=1e-12)
            assert m[f"text_retrieval_recall@{k}"] == pytest.approx(ref[f"i2t_r{k}"] / 100,
                                                                    abs=1e-12)
        saved = json.loads((tmp_path / f"r_{r['language']}.json").read_text())
        assert saved == r
