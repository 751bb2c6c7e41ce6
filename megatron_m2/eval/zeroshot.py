"""Zero-shot image classification with prompt-template ensembling, independent of the model.

The model enters only through two callables:

* ``encode_text(list_of_str) -> [n, D]`` text embeddings (one row per string), and
* ``encode_image(batch) -> [B, D]`` image embeddings, where ``batch`` is whatever the image
  iterable yields (e.g. a ``[B, 3, H, W]`` tensor).

Both may return torch tensors or numpy arrays, on any device; they are called under
``torch.no_grad()``.

Classifier weights (:func:`build_classifier`), as in CLIP's reference code: every class name is
put into every template (``template.replace("{c}", name)``), the prompts are embedded in batches
of ``batch_size``, each embedding is L2-normalised, the embeddings of one class are averaged over
the templates, and the mean is L2-normalised again. With the single template ``"{c}"`` the
weights are just the normalised embeddings of the bare class names.

Accuracy (:func:`evaluate_zero_shot`, :func:`evaluate_with_classifier`): images are ranked
against the class weights by dot product, batch by batch, so memory does not grow with the test
set; top-k counts follow :func:`megatron_m2.eval.retrieval.zero_shot_accuracy` exactly (an exact
tie goes to the lower class index), and with ``group`` the counts are summed over the ranks of a
process group that each hold a shard of the images.

Mean per-class recall (:func:`mean_per_class_recall`): the balanced accuracy of the top-1
predictions, i.e. for every class that has at least one image, the fraction of its images whose
top-1 class is right, averaged over those classes with equal weight (scikit-learn's
``balanced_accuracy_score`` and LAION clip_benchmark's ``mean_per_class_recall``). The top-1
class is the one :func:`~megatron_m2.eval.retrieval.zero_shot_accuracy` ranks first, ties
included, so on a balanced test set it equals the top-1 accuracy.

Class names and templates (:func:`load_classnames`, :func:`load_templates`) ship with the
package in ``megatron_m2/eval/data/`` (ImageNet-1k and Fashion-MNIST names, OpenAI's 80 English
and Chinese-CLIP's 80 Chinese ImageNet templates; provenance in ``data/README.md``), or come
from a user file: a JSON list of strings, a JSON object ``{"en": [...], "zh": [...]}``, or plain
UTF-8 text with one entry per line.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LANGUAGES",
    "BUILTIN_CLASSNAMES",
    "load_classnames",
    "load_templates",
    "build_classifier",
    "evaluate_with_classifier",
    "evaluate_zero_shot",
    "class_recall_counts",
    "mean_per_class_recall",
]

LANGUAGES = ("en", "zh")
"""Languages of the bundled lists (``"cn"`` is accepted as an alias of ``"zh"``)."""

_LANG_ALIASES = {"en": "en", "zh": "zh", "cn": "zh"}

BUILTIN_CLASSNAMES = {
    "imagenet1k": "imagenet_classnames.json",
    "fashion_mnist": "fashion_mnist_classnames.json",
}
"""Bundled class-name lists: name -> file in ``megatron_m2/eval/data/``."""

_NAME_ALIASES = {"imagenet": "imagenet1k", "imagenet-1k": "imagenet1k",
                 "imagenet_1k": "imagenet1k", "fashion-mnist": "fashion_mnist",
                 "fashionmnist": "fashion_mnist"}

_TEMPLATES_FILE = "templates.json"

PLACEHOLDER = "{c}"
"""Where a template takes the class name."""

TextEncoder = Callable[[List[str]], Any]
"""``list[str] -> [n, D]`` text embeddings (tensor or array)."""
ImageEncoder = Callable[[Any], Any]
"""``batch -> [B, D]`` image embeddings (tensor or array)."""


# -- loading class names and templates ----------------------------------------------------------
def _lang(lang: str) -> str:
    key = str(lang).lower()
    if key not in _LANG_ALIASES:
        raise ValueError(f"unknown language {lang!r}; expected one of {sorted(_LANG_ALIASES)}")
    return _LANG_ALIASES[key]


def _read_bundled(filename: str) -> dict:
    text = resources.files(__package__).joinpath("data", filename).read_text(encoding="utf-8")
    return json.loads(text)


def _check_entries(entries: Sequence[object], where: str, what: str) -> List[str]:
    """Entries must be non-blank strings without line breaks (kept exactly as given)."""
    if not entries:
        raise ValueError(f"{where}: no {what}s")
    for i, e in enumerate(entries):
        if not isinstance(e, str):
            raise ValueError(f"{where}: {what} #{i} is {type(e).__name__} {e!r}, not a string")
        if not e.strip():
            raise ValueError(f"{where}: {what} #{i} is empty")
        if "\n" in e or "\r" in e:
            raise ValueError(f"{where}: {what} #{i} {e!r} contains a line break")
    return [str(e) for e in entries]


def _read_user_file(path: Union[str, os.PathLike], lang: str, what: str) -> List[str]:
    """Entries of a user file: a JSON list / ``{lang: list}`` object, or one entry per line.

    Errors name the file and, where one exists, the line.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start})") \
            from None
    if path.lower().endswith(".json"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
        if isinstance(obj, dict):
            key = next((k for k in obj if _LANG_ALIASES.get(str(k).lower()) == lang), None)
            if key is None:
                raise ValueError(f"{path}: JSON object has no list for language {lang!r} "
                                 f"(keys: {sorted(obj)})")
            obj, where = obj[key], f"{path} [{key!r}]"
        else:
            where = path
        if not isinstance(obj, list):
            raise ValueError(f"{where}: expected a JSON list of strings, got "
                             f"{type(obj).__name__}")
        return _check_entries(obj, where, what)
    lines = text.splitlines()
    while lines and not lines[-1].strip():  # trailing blank lines (final newline) are fine
        lines.pop()
    if not lines:
        raise ValueError(f"{path}: no {what}s")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            raise ValueError(f"{path}:{n}: empty {what} (blank line); the line order gives the "
                             f"class indices, so blank lines are not skipped")
    # Trailing whitespace and '\r' of CRLF files are dropped; inner spaces are kept.
    return [line.strip() for line in lines]


def load_classnames(name_or_path: Union[str, os.PathLike], lang: str = "en") -> List[str]:
    """Class names of a bundled list or of a user file, in class-index order.

    Args:
        name_or_path: ``"imagenet1k"`` (aliases ``"imagenet"``, ``"imagenet-1k"``) or
            ``"fashion_mnist"`` (``"fashion-mnist"``) for a bundled list, or the path of a file:
            ``*.json`` holding a list of strings or ``{"en": [...], "zh": [...]}``, or any other
            file with one class name per line (UTF-8; blank lines inside are an error, because
            line order defines the class indices).
        lang: ``"en"`` or ``"zh"`` (``"cn"`` accepted); used by the bundled lists and by JSON
            objects keyed by language.

    Returns:
        The list of names. Names need not be unique: the bundled ImageNet lists contain a few
        genuine duplicates (see ``megatron_m2/eval/data/README.md``).

    Raises:
        FileNotFoundError / ValueError naming the file (and line) on a missing or malformed file.
    """
    lang = _lang(lang)
    key = str(name_or_path).lower() if isinstance(name_or_path, str) else None
    key = _NAME_ALIASES.get(key, key)
    if key in BUILTIN_CLASSNAMES:
        return list(_read_bundled(BUILTIN_CLASSNAMES[key])[lang])
    if isinstance(name_or_path, str) and not os.path.exists(name_or_path) \
            and os.sep not in name_or_path and "." not in name_or_path:
        raise ValueError(f"unknown class-name list {name_or_path!r}: not a file, and not one of "
                         f"the bundled lists {sorted(BUILTIN_CLASSNAMES)}")
    return _read_user_file(name_or_path, lang, "class name")


def _check_templates(templates: Sequence[str], where: str) -> List[str]:
    for i, t in enumerate(templates):
        if PLACEHOLDER not in t:
            raise ValueError(f"{where}: template #{i} {t!r} has no {PLACEHOLDER} placeholder")
    return list(templates)


def load_templates(lang: str = "en", path: Optional[Union[str, os.PathLike]] = None) -> List[str]:
    """Prompt templates with a ``{c}`` placeholder for the class name.

    Args:
        lang: ``"en"`` for OpenAI's 80 ImageNet templates, ``"zh"`` (or ``"cn"``) for
            Chinese-CLIP's 80 Chinese ones.
        path: instead of the bundled templates, a user file in the formats of
            :func:`load_classnames` (a JSON list or ``{lang: list}``, or one template per line).

    Every template must contain ``{c}``; other braces are literal text (templates are filled
    with ``str.replace``, not ``str.format``). A missing placeholder is an error naming the file
    and line.
    """
    lang = _lang(lang)
    if path is None:
        return list(_read_bundled(_TEMPLATES_FILE)[lang])
    templates = _read_user_file(path, lang, "template")
    if os.fspath(path).lower().endswith(".json"):
        return _check_templates(templates, os.fspath(path))
    for n, t in enumerate(templates, 1):  # one per line: the error names the line
        if PLACEHOLDER not in t:
            raise ValueError(f"{os.fspath(path)}:{n}: template {t!r} has no {PLACEHOLDER} "
                             f"placeholder")
    return list(templates)


# -- classifier weights -------------------------------------------------------------------------
def _as_tensor(x, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x)
        except Exception as e:  # whatever the encoder returned
            raise TypeError(f"{what} must return a tensor or array, got {type(x).__name__}") \
                from e
    return x


def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, dynamic_ncols=True, **kwargs)


def build_classifier(encode_text: TextEncoder, classnames: Sequence[str],
                     templates: Union[str, Sequence[str]] = PLACEHOLDER, batch_size: int = 256,
                     progress: bool = True) -> Tensor:
    """Zero-shot classifier weights: per class, the normalised mean of its prompt embeddings.

    Args:
        encode_text: ``list[str] -> [n, D]`` text embeddings (normalised or not: every row is
            L2-normalised here before averaging, as in CLIP).
        classnames: the ``C`` class names, in class-index order.
        templates: prompt templates containing ``{c}``, or one template as a string; the
            default ``"{c}"`` embeds the bare names.
        batch_size: most prompts per ``encode_text`` call (a batch may span classes).
        progress: show a tqdm bar over the batches.

    Returns:
        ``[C, D]`` float32 L2-normalised class embeddings, on the device ``encode_text`` returns.
    """
    if isinstance(templates, str):
        templates = [templates]
    templates = _check_templates(_check_entries(list(templates), "templates", "template"),
                                 "templates")
    classnames = _check_entries(list(classnames), "classnames", "class name")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch_size = int(batch_size)
    n_t = len(templates)
    total = len(classnames) * n_t

    def prompt(j: int) -> str:
        return templates[j % n_t].replace(PLACEHOLDER, classnames[j // n_t])

    sums: Optional[Tensor] = None
    starts = range(0, total, batch_size)
    bar = _progress(starts, progress, desc="zero-shot prompts", unit="batch")
    with torch.no_grad():
        for start in bar:
            stop = min(start + batch_size, total)
            texts = [prompt(j) for j in range(start, stop)]
            emb = _as_tensor(encode_text(texts), "encode_text")
            if emb.dim() != 2 or emb.shape[0] != len(texts):
                raise ValueError(f"encode_text returned shape {tuple(emb.shape)} for "
                                 f"{len(texts)} strings; expected [{len(texts)}, D]")
            emb = emb.float()
            if sums is None:
                sums = emb.new_zeros(len(classnames), emb.shape[1])
            elif emb.shape[1] != sums.shape[1]:
                raise ValueError(f"encode_text returned width {emb.shape[1]}, earlier "
                                 f"{sums.shape[1]}")
            norms = emb.norm(dim=1)
            bad = (~torch.isfinite(norms) | (norms == 0)).nonzero().squeeze(1)
            if bad.numel():
                raise ValueError(f"encode_text returned a zero or non-finite embedding for "
                                 f"{texts[int(bad[0])]!r}")
            emb = emb.to(sums.device) / norms.to(sums.device)[:, None]
            cls = torch.arange(start, stop, device=sums.device) // n_t
            sums.index_add_(0, cls, emb)
    return F.normalize(sums / n_t, dim=1)


# -- accuracy -----------------------------------------------------------------------------------
def evaluate_with_classifier(encode_image: ImageEncoder,
                             images: Iterable[Tuple[object, object]], class_emb: Tensor,
                             ks: Sequence[int] = (1, 5), chunk_size: int = 4096,
                             progress: bool = True, group=None) -> Dict[str, float]:
    """Top-k accuracy (%) of ``encode_image`` against precomputed class weights.

    Args:
        encode_image: ``batch -> [B, D]`` image embeddings (only their direction matters).
        images: iterable of ``(batch, labels)``; ``labels`` holds the ``B`` class indices
            (tensor, array or list of ints).
        class_emb: ``[C, D]`` class weights, e.g. from :func:`build_classifier`.
        ks: the k of each top-k accuracy.
        chunk_size: rows per block when ranking (see :mod:`megatron_m2.eval.retrieval`).
        progress: show a tqdm bar over the batches.
        group: ``None``, or a process group over whose ranks the images are sharded; counts
            are summed over it (a collective: every rank must call) and every rank gets the
            same result.

    Returns:
        ``{"top{k}": ... for k in ks}`` in percent; equal to
        :func:`~megatron_m2.eval.retrieval.zero_shot_accuracy` on all the embeddings at once.
    """
    from .retrieval import zero_shot_accuracy

    if class_emb.dim() != 2:
        raise ValueError(f"class_emb must be [C, D], got {tuple(class_emb.shape)}")
    class_emb = class_emb.float()
    n_classes, width = class_emb.shape
    device = class_emb.device
    feats, all_labels = [], []
    total = len(images) if hasattr(images, "__len__") else None
    bar = _progress(images, progress, desc="zero-shot images", unit="batch", total=total)
    with torch.no_grad():
        for i, item in enumerate(bar):
            try:
                batch, labels = item
            except (TypeError, ValueError):
                raise ValueError(f"image batch #{i}: expected a (batch, labels) pair, got "
                                 f"{type(item).__name__}") from None
            labels = _as_tensor(labels, "labels").to(device=device, dtype=torch.int64).view(-1)
            emb = _as_tensor(encode_image(batch), "encode_image")
            if emb.dim() != 2 or emb.shape != (labels.numel(), width):
                raise ValueError(f"image batch #{i}: encode_image returned "
                                 f"{tuple(emb.shape)} for {labels.numel()} labels; expected "
                                 f"[{labels.numel()}, {width}]")
            outside = labels[(labels < 0) | (labels >= n_classes)]
            if outside.numel():
                raise ValueError(f"image batch #{i}: labels outside [0, {n_classes}): "
                                 f"{sorted(set(outside.tolist()))[:10]}")
            feats.append(emb.to(device=device, dtype=torch.float32))
            all_labels.append(labels)
    images_emb = torch.cat(feats) if feats else torch.empty(0, width, device=device)
    labels_t = (torch.cat(all_labels) if all_labels
                else torch.empty(0, dtype=torch.int64, device=device))
    # One ranking path: the same blockwise exact top-k as every other evaluation.
    return zero_shot_accuracy(images_emb, class_emb, labels_t, ks=ks, chunk_size=chunk_size,
                              group=group)


def evaluate_zero_shot(encode_image: ImageEncoder, encode_text: TextEncoder,
                       images: Iterable[Tuple[object, object]], classnames: Sequence[str],
                       templates: Union[str, Sequence[str]] = PLACEHOLDER,
                       ks: Sequence[int] = (1, 5), text_batch_size: int = 256,
                       chunk_size: int = 4096, progress: bool = True,
                       group=None) -> Dict[str, float]:
    """Zero-shot top-k accuracy (%): :func:`build_classifier`, then
    :func:`evaluate_with_classifier`.

    Args:
        encode_image: ``batch -> [B, D]`` image embeddings.
        encode_text: ``list[str] -> [n, D]`` text embeddings.
        images: iterable of ``(batch, labels)`` pairs, e.g. ``dataset.batches(64)`` from
            :mod:`megatron_m2.eval.datasets`.
        classnames: class names in label order (e.g. ``load_classnames("imagenet1k", "zh")``).
        templates: templates with ``{c}`` (e.g. ``load_templates("zh")``), or one string;
            ``"{c}"`` (the default) uses the bare class names.
        ks: the k of each top-k accuracy.
        text_batch_size: most prompts per ``encode_text`` call.
        chunk_size: ranking block size.
        progress: show tqdm bars.
        group: process group over which the images are sharded (every rank builds the same
            classifier), or ``None``.

    Returns:
        ``{"top1": ..., "top5": ...}`` (one entry per k), percentages.
    """
    class_emb = build_classifier(encode_text, classnames, templates, batch_size=text_batch_size,
                                 progress=progress)
    return evaluate_with_classifier(encode_image, images, class_emb, ks=ks,
                                    chunk_size=chunk_size, progress=progress, group=group)


def class_recall_counts(image_emb: Tensor, class_emb: Tensor, labels: Tensor,
                        chunk_size: int = 4096, group=None) -> Tuple[Tensor, Tensor]:
    """Per class, the images whose top-1 class is right and the images of that class.

    Args:
        image_emb: ``[N, D]`` image embeddings (this rank's shard with ``group``).
        class_emb: ``[C, D]`` class embeddings, the same on every rank.
        labels: ``[N]`` class index of each image, in ``[0, C)``.
        chunk_size: rows per image chunk and per class chunk when ranking.
        group: ``None`` for a single process, or the process group over which the images are
            sharded; the counts are summed over it (a collective: every rank must call).

    Returns:
        ``(hits, totals)``: two ``[C]`` int64 CPU tensors. The top-1 class is ranked exactly as
        in :func:`~megatron_m2.eval.retrieval.zero_shot_accuracy` (an exact tie goes to the
        lower class index), so ``hits.sum() / totals.sum()`` is its top-1 accuracy.
    """
    from .retrieval import _Comm, _ranked_classes

    top1, targets = _ranked_classes(image_emb, class_emb, labels, 1, chunk_size)
    n_classes, device = class_emb.shape[0], image_emb.device
    outside = targets[(targets < 0) | (targets >= n_classes)]
    if outside.numel():
        raise ValueError(f"labels outside [0, {n_classes}): {sorted(set(outside.tolist()))[:10]}")
    right = top1[:, 0] == targets if top1.numel() else torch.zeros_like(targets, dtype=torch.bool)
    counts = torch.stack([torch.bincount(targets[right], minlength=n_classes),
                          torch.bincount(targets, minlength=n_classes)])
    counts = _Comm(group, device).all_reduce(counts).cpu()
    return counts[0], counts[1]


def mean_per_class_recall(image_emb: Tensor, class_emb: Tensor, labels: Tensor,
                          chunk_size: int = 4096, group=None) -> float:
    """Mean per-class recall (balanced accuracy) of the top-1 predictions, in percent.

    The mean, over the classes with at least one image (summed over ``group``), of the
    fraction of that class's images whose top-1 class (:func:`class_recall_counts`) is the
    right one; classes without images do not count, as in scikit-learn's
    ``balanced_accuracy_score``. Arguments as in :func:`class_recall_counts`.
    """
    hits, totals = class_recall_counts(image_emb, class_emb, labels, chunk_size=chunk_size,
                                       group=group)
    present = totals > 0
    if not bool(present.any()):
        raise ValueError("mean_per_class_recall needs at least one image")
    recalls = hits[present].double() / totals[present].double()
    return 100.0 * float(recalls.mean())
