"""The one embedding-and-ranking path of every evaluation: ``m2-eval``, the trainer's held-out
evaluation and the Python API.

An **encoder** is anything with

* ``transform``: PIL image → ``[3, S, S]`` tensor (the eval transform),
* ``encode_image(pixels)``: ``[B, 3, S, S]`` → ``[B, D]`` L2-normalised embeddings,
* ``encode_tokens(framed)``: tokenized captions (``[CLS] ... <|endoftext|>`` id lists, as an
  indexed dataset stores them) → ``[n, D]`` L2-normalised embeddings,
* ``encode_text(texts)``: strings → ``[n, D]`` (zero-shot prompts), and ``embed_dim``.

:class:`megatron_m2.inference.M2Encoder` is one (a single-device model); the trainer's
:class:`megatron_m2.training.evaluation.ScheduleEncoder` is another (the TP × PP model through
megatron-core's forward-only schedule). The tasks below shard the data over ``shard = (index,
count)`` and rank with :func:`~megatron_m2.eval.retrieval.retrieval_metrics` /
:func:`~megatron_m2.eval.retrieval.zero_shot_accuracy` over ``group`` (the ranks holding the
shards): no rank gathers every embedding.
"""

from __future__ import annotations

import io
import logging
import sys
from typing import Dict, Optional, Sequence, Tuple

import torch

logger = logging.getLogger(__name__)

__all__ = ["evaluate_retrieval", "evaluate_zero_shot_dataset", "shard_range", "LANGS"]

LANGS = ("en", "zh", "other")
"""Caption languages of an indexed dataset, in report order."""


def shard_range(n: int, index: int, count: int) -> range:
    """The contiguous part ``index`` of ``count`` of ``range(n)`` (the first parts one longer)."""
    per = -(-n // count)
    return range(min(index * per, n), min((index + 1) * per, n))


def _progress(iterable, total: int, desc: str, enabled: bool, unit: str = "img"):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)


def evaluate_retrieval(encoder, prefix: str, languages: Optional[Sequence[str]] = None,
                       max_samples: int = 0, shard: Tuple[int, int] = (0, 1), group=None,
                       batch_size: int = 64, chunk_size: int = 4096,
                       progress: bool = False) -> Dict[str, Dict[str, float]]:
    """Image↔text retrieval per caption language on the indexed dataset ``prefix``.

    For each language, the gallery is the images with at least one caption in it and every
    such caption is a query (R@1/5/10 both ways and the mean recall, in %, plus ``images`` and
    ``captions``). ``languages=None``: every language the dataset holds. The first
    ``max_samples`` samples (0: all) are split over ``shard = (index, count)``; with ``group``
    (the ranks holding the shards, one collective per language) every rank gets the same
    figures. Image embeddings are shared by the languages.
    """
    from PIL import Image

    from ..data.indexed import ImageTextIndexedDataset
    from .retrieval import retrieval_metrics

    reader = ImageTextIndexedDataset(prefix)
    n_total = min(len(reader), max_samples) if max_samples else len(reader)
    langs_of = [reader.caption_languages(i) for i in range(n_total)]
    if languages is None:
        languages = [lang for lang in LANGS if any(lang in ls for ls in langs_of)]
    results: Dict[str, Dict[str, float]] = {}
    embedded: Dict[int, torch.Tensor] = {}
    for lang in languages:
        keep = [i for i in range(n_total) if lang in langs_of[i]]
        if not keep:
            logger.warning("%s: no %s captions; skipped", prefix, lang)
            continue
        part = shard_range(len(keep), *shard)
        mine, offset = keep[part.start:part.stop], part.start
        captions, owner = [], []
        it = _progress(range(0, len(mine), batch_size), -(-len(mine) // batch_size),
                       f"{lang} images", progress)
        for lo in it:
            chunk = mine[lo:lo + batch_size]
            samples = [reader[i] for i in chunk]
            todo = [(i, sample) for i, sample in zip(chunk, samples) if i not in embedded]
            if todo:
                pixels = []
                for _, sample in todo:
                    with Image.open(io.BytesIO(sample.image)) as im:
                        pixels.append(encoder.transform(im))
                embedded.update(zip((i for i, _ in todo),
                                    encoder.encode_image(torch.stack(pixels))))
            for j, sample in enumerate(samples):
                for caption_lang, ids in sample.captions:
                    if caption_lang == lang:
                        captions.append(ids.tolist())
                        owner.append(offset + lo + j)
        images = (torch.stack([embedded[i] for i in mine]) if mine
                  else torch.empty(0, encoder.embed_dim))
        texts = (encoder.encode_tokens(captions) if captions
                 else torch.empty(0, encoder.embed_dim))
        m = retrieval_metrics(images.float(), texts.float(),
                              torch.tensor(owner, dtype=torch.long), chunk_size=chunk_size,
                              group=group)
        counts = torch.tensor([images.shape[0], texts.shape[0]])
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(counts, group=group)
        m["images"], m["captions"] = int(counts[0]), int(counts[1])
        results[lang] = m
    return results


def evaluate_zero_shot_dataset(encoder, data, classnames: Dict[str, Sequence[str]],
                               templates: Dict[str, Sequence[str]], shard: Tuple[int, int] = (0, 1),
                               group=None, batch_size: int = 64, chunk_size: int = 4096,
                               progress: bool = False) -> Dict[str, Dict[str, float]]:
    """Zero-shot top-1/top-5 accuracy per language of ``data`` (``len``, ``data[i] -> (PIL
    image, label)``, ``num_classes``; e.g. :mod:`megatron_m2.eval.datasets`) with
    prompt-ensembled class embeddings (``classnames[lang]`` × ``templates[lang]``). The images
    are embedded once, split over ``shard``; accuracies are summed over ``group``."""
    from .retrieval import zero_shot_accuracy
    from .zeroshot import build_classifier

    mine = shard_range(len(data), *shard)
    feats, labels = [], []
    it = _progress(range(mine.start, mine.stop, batch_size), -(-len(mine) // batch_size),
                   "images", progress)
    for lo in it:
        pixels, labs = [], []
        for i in range(lo, min(lo + batch_size, mine.stop)):
            image, label = data[i]
            pixels.append(encoder.transform(image))
            labs.append(label)
        feats.append(encoder.encode_image(torch.stack(pixels)))
        labels.extend(labs)
    images = torch.cat(feats) if feats else torch.empty(0, encoder.embed_dim)
    labels_t = torch.tensor(labels, dtype=torch.long)
    results = {}
    k5 = min(5, data.num_classes)
    for lang, names in classnames.items():
        weights = build_classifier(encoder.encode_text, names, templates[lang],
                                   batch_size=batch_size, progress=progress)
        acc = zero_shot_accuracy(images, weights, labels_t, ks=(1, k5), group=group,
                                 chunk_size=chunk_size)
        acc["images"] = len(data)
        acc["templates"] = len(templates[lang])
        results[lang] = acc
    return results
