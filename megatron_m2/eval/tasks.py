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
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

logger = logging.getLogger(__name__)

__all__ = ["evaluate_retrieval", "retrieval_report", "RetrievalReport", "ExampleQuery",
           "example_samples", "evaluate_zero_shot_dataset", "shard_range", "LANGS"]

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


@dataclass
class ExampleQuery:
    """One text→image query of a retrieval picture (:mod:`megatron_m2.eval.retrieval_examples`).
    Sample numbers are indices into the dataset."""

    sample: int
    """The query caption's sample: its image is the right answer."""
    caption: List[int]
    """The query caption, framed token ids as stored (the sample's first caption in the
    language)."""
    top: List[int]
    """The samples whose images rank first, second, ... (the top k, best first)."""
    rank: int
    """1-based rank of the right image among the ``gallery`` images."""
    gallery: int
    """Number of images ranked (the language's retrieval gallery)."""


@dataclass
class RetrievalReport:
    """What :func:`retrieval_report` computed."""

    results: Dict[str, Dict[str, float]]
    """``{lang: metrics}``, as :func:`evaluate_retrieval` returns."""
    cross_lingual: Optional[Dict[str, float]] = None
    """:func:`~megatron_m2.eval.retrieval.cross_lingual_agreement` of the English and Chinese
    captions (plus ``languages``), or None when not asked for or the data lacks either."""
    examples: Dict[str, List[ExampleQuery]] = field(default_factory=dict)
    """``{lang: queries}``: the same samples in every language where they can be."""


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
    figures. Image embeddings are shared by the languages. :func:`retrieval_report` also gives
    the cross-lingual agreement and example queries.
    """
    return retrieval_report(encoder, prefix, languages, max_samples=max_samples, shard=shard,
                            group=group, batch_size=batch_size, chunk_size=chunk_size,
                            progress=progress, cross_lingual=False).results


def example_samples(langs_of: Sequence[Sequence[str]], languages: Sequence[str], count: int,
                    seed: int = 0) -> Dict[str, List[int]]:
    """``count`` samples per language drawn with ``random.Random(seed)``, sorted: the same
    samples for every language, drawn from those with a caption in all of ``languages``; a
    language without such samples draws from its own (``langs_of[i]``: sample i's caption
    languages)."""
    import random

    def draw(pool: List[int]) -> List[int]:
        return sorted(random.Random(seed).sample(pool, min(count, len(pool))))

    common = draw([i for i, ls in enumerate(langs_of) if all(lang in ls for lang in languages)])
    return {lang: common or draw([i for i, ls in enumerate(langs_of) if lang in ls])
            for lang in languages}


def _first_caption(sample, lang: str) -> List[int]:
    return next(ids.tolist() for caption_lang, ids in sample.captions if caption_lang == lang)


def _embed_images(encoder, samples, cache: Dict[int, torch.Tensor]) -> None:
    """Put the image embeddings of ``samples`` (``(index, Sample)`` pairs) that ``cache``
    lacks into it, in one batch."""
    from PIL import Image

    todo = [(i, sample) for i, sample in samples if i not in cache]
    if not todo:
        return
    pixels = []
    for _, sample in todo:
        with Image.open(io.BytesIO(sample.image)) as im:
            pixels.append(encoder.transform(im))
    cache.update(zip((i for i, _ in todo), encoder.encode_image(torch.stack(pixels))))


def retrieval_report(encoder, prefix: str, languages: Optional[Sequence[str]] = None,
                     max_samples: int = 0, shard: Tuple[int, int] = (0, 1), group=None,
                     batch_size: int = 64, chunk_size: int = 4096, progress: bool = False,
                     cross_lingual: bool = True, example_queries: int = 0, seed: int = 0,
                     top_k: int = 5) -> RetrievalReport:
    """:func:`evaluate_retrieval`'s figures, plus:

    * ``cross_lingual`` (when both ``en`` and ``zh`` are evaluated and some samples have
      both): every sample with both captions queries the images of those samples with its
      first English and its first Chinese caption
      (:func:`~megatron_m2.eval.retrieval.cross_lingual_agreement`, top-``top_k``);
    * ``example_queries`` text→image queries per language (:func:`example_samples` with
      ``seed``), each with its top-``top_k`` images in the language's gallery and the rank of
      the right one (:func:`~megatron_m2.eval.retrieval.query_rankings`).

    Both are collectives over ``group`` like the recalls: every rank gets the same values.
    """
    from ..data.indexed import ImageTextIndexedDataset
    from .retrieval import cross_lingual_agreement, retrieval_metrics

    reader = ImageTextIndexedDataset(prefix)
    n_total = min(len(reader), max_samples) if max_samples else len(reader)
    langs_of = [reader.caption_languages(i) for i in range(n_total)]
    if languages is None:
        languages = [lang for lang in LANGS if any(lang in ls for ls in langs_of)]
    present = [lang for lang in languages if any(lang in ls for ls in langs_of)]
    chosen = (example_samples(langs_of, present, example_queries, seed)
              if example_queries > 0 else {})
    report = RetrievalReport(results={})
    embedded: Dict[int, torch.Tensor] = {}
    cross = cross_lingual and {"en", "zh"} <= set(present)
    # Embedding of the first caption of each of this rank's samples, per language (the queries
    # of the cross-lingual figures and of the examples).
    first: Dict[str, Dict[int, torch.Tensor]] = {}
    for lang in languages:
        keep = [i for i in range(n_total) if lang in langs_of[i]]
        if not keep:
            logger.warning("%s: no %s captions; skipped", prefix, lang)
            continue
        part = shard_range(len(keep), *shard)
        mine, offset = keep[part.start:part.stop], part.start
        captions, owner, first_row = [], [], {}
        it = _progress(range(0, len(mine), batch_size), -(-len(mine) // batch_size),
                       f"{lang} images", progress)
        for lo in it:
            chunk = mine[lo:lo + batch_size]
            samples = [reader[i] for i in chunk]
            _embed_images(encoder, zip(chunk, samples), embedded)
            for j, (i, sample) in enumerate(zip(chunk, samples)):
                for caption_lang, ids in sample.captions:
                    if caption_lang == lang:
                        first_row.setdefault(i, len(captions))
                        captions.append(ids.tolist())
                        owner.append(offset + lo + j)
        images = (torch.stack([embedded[i] for i in mine]).float() if mine
                  else torch.empty(0, encoder.embed_dim))
        texts = (encoder.encode_tokens(captions).float() if captions
                 else torch.empty(0, encoder.embed_dim))
        m = retrieval_metrics(images, texts, torch.tensor(owner, dtype=torch.long),
                              chunk_size=chunk_size, group=group)
        counts = torch.tensor([images.shape[0], texts.shape[0]])
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(counts, group=group)
        m["images"], m["captions"] = int(counts[0]), int(counts[1])
        report.results[lang] = m
        if chosen.get(lang) or (cross and lang in ("en", "zh")):
            rows = texts[torch.tensor(list(first_row.values()), dtype=torch.long)]
            first[lang] = dict(zip(first_row, rows))  # a copy: ``texts`` can be freed
        del texts
        if chosen.get(lang):
            report.examples[lang] = _examples(reader, lang, keep, chosen[lang], first[lang],
                                              images, top_k, chunk_size, group)
    both = [i for i in range(n_total) if "en" in langs_of[i] and "zh" in langs_of[i]]
    if cross and both:
        part = shard_range(len(both), *shard)
        mine = both[part.start:part.stop]
        for lo in range(0, len(mine), batch_size):
            _embed_images(encoder, ((i, reader[i]) for i in mine[lo:lo + batch_size]
                                    if i not in embedded), embedded)
        queries = {}
        for lang in ("en", "zh"):
            missing = [i for i in mine if i not in first[lang]]
            extra = {}
            if missing:  # samples of another rank's shard in the language's own split
                ids = [_first_caption(reader[i], lang) for i in missing]
                extra = dict(zip(missing, encoder.encode_tokens(ids).float()))
            queries[lang] = (torch.stack([first[lang].get(i, extra.get(i)) for i in mine])
                             if mine else torch.empty(0, encoder.embed_dim))
        images = (torch.stack([embedded[i] for i in mine]).float() if mine
                  else torch.empty(0, encoder.embed_dim))
        report.cross_lingual = {
            "languages": ["en", "zh"],
            **cross_lingual_agreement(images, queries["en"], queries["zh"], k=top_k,
                                      chunk_size=chunk_size, group=group)}
    return report


def _examples(reader, lang: str, keep: List[int], chosen: List[int],
              first: Dict[int, torch.Tensor], images: torch.Tensor, top_k: int,
              chunk_size: int, group) -> List[ExampleQuery]:
    """The example queries of one language: the chosen samples' first captions (embedded on
    whichever rank holds them, summed into every rank) against the language's gallery
    (``keep``, this rank's part of it embedded in ``images``)."""
    from .retrieval import query_rankings

    queries = images.new_zeros(len(chosen), images.shape[1])
    for j, i in enumerate(chosen):
        if i in first:
            queries[j] = first[i]
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(queries, group=group)  # exactly one rank holds each caption
    gallery_pos = {i: p for p, i in enumerate(keep)}
    targets = torch.tensor([gallery_pos[i] for i in chosen], dtype=torch.long)
    top, rank = query_rankings(queries, images, targets, k=top_k, chunk_size=chunk_size,
                               group=group)
    return [ExampleQuery(sample=i, caption=_first_caption(reader[i], lang),
                         top=[keep[p] for p in row], rank=int(r), gallery=len(keep))
            for i, row, r in zip(chosen, top.tolist(), rank.tolist())]


def evaluate_zero_shot_dataset(encoder, data, classnames: Dict[str, Sequence[str]],
                               templates: Dict[str, Sequence[str]], shard: Tuple[int, int] = (0, 1),
                               group=None, batch_size: int = 64, chunk_size: int = 4096,
                               progress: bool = False,
                               per_class: bool = False) -> Dict[str, Dict[str, float]]:
    """Zero-shot top-1/top-5 accuracy per language of ``data`` (``len``, ``data[i] -> (PIL
    image, label)``, ``num_classes``; e.g. :mod:`megatron_m2.eval.datasets`) with
    prompt-ensembled class embeddings (``classnames[lang]`` × ``templates[lang]``). The images
    are embedded once, split over ``shard``; accuracies are summed over ``group``.

    ``{lang: {"top1", "top{min(5, C)}", "images", "templates"}}``, accuracies in %; with
    ``per_class`` also ``mean_per_class_recall`` (%,
    :func:`~megatron_m2.eval.zeroshot.mean_per_class_recall`)."""
    from .retrieval import zero_shot_accuracy
    from .zeroshot import build_classifier, mean_per_class_recall

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
        if per_class:
            acc["mean_per_class_recall"] = mean_per_class_recall(
                images, weights, labels_t, chunk_size=chunk_size, group=group)
        acc["images"] = len(data)
        acc["templates"] = len(templates[lang])
        results[lang] = acc
    return results
