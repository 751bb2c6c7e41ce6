"""``m2-eval`` results as LAION clip_benchmark result files.

`clip_benchmark <https://github.com/LAION-AI/CLIP_benchmark>`_ (``clip_benchmark eval``)
writes one JSON object per (dataset, model, language, task) run, and ``clip_benchmark build``
turns a set of such files into one CSV table (one row per file: the ``metrics`` spread into
columns next to the other keys). :func:`make_records` turns the results of ``m2-eval`` into the
same objects, so M2-Encoder rows sit next to those of other CLIP models::

    {"dataset": "validation", "model": "m2-encoder-0.4b", "pretrained": "demo",
     "task": "zeroshot_retrieval",
     "metrics": {"image_retrieval_recall@1": 0.5, "text_retrieval_recall@1": 0.6, ...},
     "language": "en"}

Keys, in clip_benchmark's order:

* ``dataset``: the dataset name (:func:`dataset_name`: the basename of ``--data`` or
  ``--image-folder``, ``fashion_mnist`` for ``--fashion-mnist``);
* ``model``: the architecture (:func:`model_name`: ``m2-encoder-<flavor>`` when the model's
  transformer dimensions are those of a flavor of :mod:`megatron_m2.flavors`, else
  ``m2-encoder``);
* ``pretrained``: the weights (:func:`pretrained_name`: the basename of ``--load``, with the run
  directory in front of an ``iter_N`` directory, e.g. ``demo_iter_0000100``);
* ``task``: ``zeroshot_retrieval`` (``m2-eval --task retrieval``) or
  ``zeroshot_classification`` (``--task zeroshot``);
* ``metrics``: fractions in [0, 1], never percentages (:func:`retrieval_metrics`,
  :func:`classification_metrics`);
* ``language``: one language per record (``en``, ``zh``, ...), as clip_benchmark evaluates one
  language per run.

Direction of the retrieval recalls. clip_benchmark names a recall after what is *retrieved*:
``image_retrieval_recall@k`` is text→image (each caption queries the images; a hit when its
own image is among the top k), ``text_retrieval_recall@k`` is image→text (each image queries the
captions; a hit when any of its captions is among the top k). So m2-eval's ``t2i_r{k}`` becomes
``image_retrieval_recall@k`` and ``i2t_r{k}`` becomes ``text_retrieval_recall@k``.

Files (:func:`output_paths`, :func:`write_records`): clip_benchmark's table tool reads one
object per file, so every record gets its own file, never a JSON list. ``--output`` may be

* a directory (one that exists, or a path ending in ``/``): the files are named with
  clip_benchmark's default template :data:`DEFAULT_OUTPUT`,
  ``{dataset}_{pretrained}_{model}_{language}_{task}.json``, inside it;
* a template with clip_benchmark's fields (:data:`OUTPUT_FIELDS`), e.g.
  ``results/{dataset}_{language}.json``;
* a plain file name: the file itself when there is one record; with several languages,
  ``_{language}`` goes before the extension (``result.json`` → ``result_en.json``,
  ``result_zh.json``). The same suffix separates the records of a template that would
  otherwise name one file for several of them.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
from typing import Any, Dict, List, Mapping, Optional, Sequence

__all__ = ["TASKS", "DEFAULT_OUTPUT", "OUTPUT_FIELDS", "DEFAULT_MODEL", "retrieval_metrics",
           "classification_metrics", "make_records", "model_name", "pretrained_name",
           "dataset_name", "check_output", "output_paths", "write_records", "dumps"]

TASKS = {"retrieval": "zeroshot_retrieval", "zeroshot": "zeroshot_classification"}
"""``m2-eval --task`` → clip_benchmark's ``task``."""

DEFAULT_OUTPUT = "{dataset}_{pretrained}_{model}_{language}_{task}.json"
"""clip_benchmark's default ``--output`` file name template."""

OUTPUT_FIELDS = ("dataset", "pretrained", "pretrained_full_path", "model", "language", "task")
"""Fields an ``--output`` template may use (those of clip_benchmark's ``--output``)."""

DEFAULT_MODEL = "m2-encoder"
"""``model`` of an architecture that is no named flavor."""

_ARCH_FIELDS = ("hidden_size", "num_attention_heads", "ffn_hidden_size", "num_sep_layers",
                "num_vl_layers", "embed_dim")
"""The config fields that identify a flavor's architecture."""

_RECORD_KEYS = ("dataset", "model", "pretrained", "task", "metrics", "language")


# -- metrics ------------------------------------------------------------------------------------
def _fraction(percent: float, count: Optional[int]) -> float:
    """``percent`` / 100; exactly ``hits / count`` when ``percent`` is ``100 · hits / count``
    for a whole number of hits out of ``count`` queries (so 1 of 3 gives ``1 / 3``, not
    ``(100 / 3) / 100``)."""
    percent = float(percent)
    if count and count > 0 and math.isfinite(percent):
        hits = round(percent * count / 100.0)
        if abs(100.0 * hits / count - percent) <= 1e-9 * max(1.0, abs(percent)):
            return hits / count
    return percent / 100.0


def _recall_ks(metrics: Mapping[str, Any], prefix: str) -> List[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)")
    return sorted(int(m.group(1)) for m in map(pattern.fullmatch, metrics) if m)


def retrieval_metrics(metrics: Mapping[str, Any]) -> Dict[str, float]:
    """clip_benchmark's ``zeroshot_retrieval`` metrics from one language's m2-eval figures.

    Args:
        metrics: ``{"i2t_r{k}", "t2i_r{k}"}`` recalls in percent (as
            :func:`megatron_m2.eval.retrieval.retrieval_metrics` returns them), optionally with
            ``images`` and ``captions`` (the query counts, which make the fractions exact);
            other keys (``mean_recall``) are left out.

    Returns:
        For every k, in increasing k: ``image_retrieval_recall@k`` (text→image, from
        ``t2i_r{k}``) then ``text_retrieval_recall@k`` (image→text, from ``i2t_r{k}``), as
        fractions in [0, 1].

    Raises:
        ValueError: no recalls, or a k with only one direction.
    """
    i2t, t2i = _recall_ks(metrics, "i2t_r"), _recall_ks(metrics, "t2i_r")
    if not i2t or i2t != t2i:
        raise ValueError(f"retrieval metrics need i2t_r<k> and t2i_r<k> for the same k, got "
                         f"{sorted(metrics)}")
    images, captions = metrics.get("images"), metrics.get("captions")
    out: Dict[str, float] = {}
    for k in i2t:
        # text→image: one query per caption; image→text: one query per image.
        out[f"image_retrieval_recall@{k}"] = _fraction(metrics[f"t2i_r{k}"], captions)
        out[f"text_retrieval_recall@{k}"] = _fraction(metrics[f"i2t_r{k}"], images)
    return out


def classification_metrics(metrics: Mapping[str, Any]) -> Dict[str, float]:
    """clip_benchmark's ``zeroshot_classification`` metrics from one language's m2-eval
    figures.

    Args:
        metrics: ``top1``, ``top5`` (absent with fewer than five classes) and
            ``mean_per_class_recall`` in percent, as
            :func:`megatron_m2.eval.tasks.evaluate_zero_shot_dataset` returns them with
            ``per_class=True``; ``images`` (the image count) makes the accuracies exact.

    Returns:
        ``{"acc1", "acc5", "mean_per_class_recall"}`` as fractions in [0, 1]. ``acc5`` is NaN
        when there is no ``top5`` (fewer than five classes), as clip_benchmark writes it.

    Raises:
        ValueError: ``top1`` or ``mean_per_class_recall`` missing.
    """
    missing = [k for k in ("top1", "mean_per_class_recall") if k not in metrics]
    if missing:
        raise ValueError(f"zero-shot metrics lack {', '.join(missing)} (mean_per_class_recall "
                         f"comes with evaluate_zero_shot_dataset(..., per_class=True)); got "
                         f"{sorted(metrics)}")
    images = metrics.get("images")
    return {"acc1": _fraction(metrics["top1"], images),
            "acc5": _fraction(metrics["top5"], images) if "top5" in metrics else float("nan"),
            "mean_per_class_recall": float(metrics["mean_per_class_recall"]) / 100.0}


def make_records(task: str, results: Mapping[str, Mapping[str, Any]], dataset: str, model: str,
                 pretrained: str) -> List[Dict[str, Any]]:
    """One clip_benchmark result object per language of ``results``.

    Args:
        task: ``m2-eval``'s task, ``"retrieval"`` or ``"zeroshot"``.
        results: ``{language: metrics}`` as ``m2-eval`` computes them (percent).
        dataset, model, pretrained: the record's names (see :func:`dataset_name`,
            :func:`model_name`, :func:`pretrained_name`).

    Returns:
        ``[{"dataset", "model", "pretrained", "task", "metrics", "language"}, ...]`` in the
        order of ``results``.
    """
    if task not in TASKS:
        raise ValueError(f"clip_benchmark has no counterpart of task {task!r}; supported: "
                         f"{', '.join(TASKS)}")
    convert = retrieval_metrics if task == "retrieval" else classification_metrics
    return [{"dataset": dataset, "model": model, "pretrained": pretrained, "task": TASKS[task],
             "metrics": convert(metrics), "language": language}
            for language, metrics in results.items()]


# -- names --------------------------------------------------------------------------------------
def model_name(cfg) -> str:
    """``m2-encoder-<flavor>`` when ``cfg``'s transformer dimensions (width, heads, FFN width,
    layers of both stacks, embedding width) are those of a flavor of
    :data:`megatron_m2.flavors.FLAVORS` (``m2-encoder-0.4b``, ``-1b``, ``-10b``, ``-tiny``),
    else :data:`DEFAULT_MODEL`. Image size and vocabulary are not compared."""
    from ..flavors import FLAVORS

    for name, flavor in FLAVORS.items():
        if all(getattr(cfg, f, None) == getattr(flavor, f) for f in _ARCH_FIELDS):
            return f"{DEFAULT_MODEL}-{name}"
    return DEFAULT_MODEL


def pretrained_name(load: str) -> str:
    """The checkpoint's basename: ``runs/demo`` → ``demo``, ``model.safetensors`` →
    ``model.safetensors``; an ``iter_N`` directory gets its run directory's name in front,
    ``runs/demo/iter_0000100`` → ``demo_iter_0000100``."""
    path = os.path.abspath(os.fspath(load))
    base = os.path.basename(path)
    if re.fullmatch(r"iter_\d+", base):
        parent = os.path.basename(os.path.dirname(path))
        if parent:
            return f"{parent}_{base}"
    return base


def dataset_name(path_or_name: str) -> str:
    """The basename of a dataset path or indexed-dataset prefix (``data/demo/validation`` →
    ``validation``); a bare name is returned as is."""
    return os.path.basename(os.path.normpath(os.fspath(path_or_name)))


# -- files --------------------------------------------------------------------------------------
def _is_dir(output: str) -> bool:
    return os.path.isdir(output) or output.endswith(("/", os.sep))


def check_output(output: str) -> Optional[str]:
    """Why ``output`` is no usable ``--output`` (a malformed template, or fields other than
    :data:`OUTPUT_FIELDS`), or None."""
    try:
        parsed = list(string.Formatter().parse(output))
    except ValueError as e:
        return f"--output {output!r}: not a valid file name template ({e})"
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in OUTPUT_FIELDS:
            return (f"--output {output!r}: unknown field {{{field}}}; fields: "
                    + ", ".join(f"{{{f}}}" for f in OUTPUT_FIELDS))
        if spec or conversion:
            return f"--output {output!r}: write plain {{{field}}}, without a format or conversion"
    return None


def _fields(record: Mapping[str, Any], load: str) -> Dict[str, str]:
    return {"dataset": str(record["dataset"]).replace("/", "_"),
            "pretrained": str(record["pretrained"]),
            "pretrained_full_path": str(load or record["pretrained"]).replace("/", "_"),
            "model": str(record["model"]), "language": str(record["language"]),
            "task": str(record["task"])}


def output_paths(output: str, records: Sequence[Mapping[str, Any]],
                 load: Optional[str] = None) -> List[str]:
    """The file of each record (see the module docstring for the rules).

    Args:
        output: a directory, a template with :data:`OUTPUT_FIELDS` or a file name.
        records: from :func:`make_records`.
        load: the checkpoint path as given, for ``{pretrained_full_path}`` (default: the
            record's ``pretrained``).

    Raises:
        ValueError: a malformed template, or two records that still share a file after the
            ``_{language}`` suffix (e.g. two records of one language).
    """
    error = check_output(output)
    if error:
        raise ValueError(error)
    template = os.path.join(output, DEFAULT_OUTPUT) if _is_dir(output) else output
    paths = [template.format(**_fields(r, load)) for r in records]
    shared = {p for p in paths if paths.count(p) > 1}
    for i, path in enumerate(paths):
        if path in shared:
            root, ext = os.path.splitext(path)
            paths[i] = f"{root}_{records[i]['language']}{ext}"
    clashes = sorted({p for p in paths if paths.count(p) > 1})
    if clashes:
        raise ValueError(f"--output {output!r}: several records would be written to "
                         f"{clashes[0]}")
    return paths


def dumps(record: Mapping[str, Any]) -> str:
    """One record as clip_benchmark writes it: one line of JSON, keys in its order (NaN, for an
    ``acc5`` of fewer than five classes, is written as ``NaN`` as Python's ``json`` does)."""
    return json.dumps({k: record[k] for k in _RECORD_KEYS})


def write_records(output: str, records: Sequence[Mapping[str, Any]],
                  load: Optional[str] = None) -> List[str]:
    """Write each record to its own file (:func:`output_paths`), creating missing parent
    directories; returns the paths written."""
    paths = output_paths(output, records, load)
    for path, record in zip(paths, records):
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(dumps(record) + "\n")
    return paths
