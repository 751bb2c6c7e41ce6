"""Image–text retrieval recall and zero-shot classification accuracy, in bounded memory.

:func:`retrieval_metrics` computes the recall figures of the M2-Encoder and Chinese-CLIP papers
(Flickr30k-CN, COCO-CN, MUGE, ...): image→text and text→image R@1/5/10 and their mean, as
percentages. An image usually has several captions: image→text counts a hit when *any* of the
image's captions is among the top-k texts, text→image when the caption's own image is among the
top-k images.

:func:`cross_lingual_agreement` (do two captions of a sample, e.g. its English and its Chinese
one, retrieve the same images?) and :func:`query_rankings` (the top-k images and the rank of
the right one for a few queries, drawn by :mod:`megatron_m2.eval.retrieval_examples`) rank the
same way, in the same bounded memory.

Memory. The Ni × Nt similarity matrix is never built: queries are scored in chunks against
gallery chunks, and each query keeps a running top-k that every new chunk × chunk block is
merged into. Peak memory is about ``chunk_size² × 4`` bytes for the score block plus
``16 × k`` bytes per query for the running top-k (≈ 80 MB for the default ``chunk_size=4096``
and R@10), whatever the size of the test set.

Ties. Results never depend on ``chunk_size`` or on how the data is sharded over ranks, ties
included: gallery items are ranked by (score descending, global gallery index ascending), i.e. an
exact tie goes to the item that comes first in the gallery (the image or caption with the lower
global index). This is enforced with a 64-bit key per candidate, ``order-preserving bits of the
float32 score << 32 | (2³² − 1 − index)``, whose order is total; ``torch.topk`` on float scores
(whose own tie order is unspecified) only pre-selects candidates, and rows whose k-th and
(k+1)-th scores are equal inside a block are re-ranked with the exact keys. Scores are ranked at
float32 precision (float16/bfloat16 scores are exact in float32; float64 scores are rounded to
float32 first). ``-0.0`` and ``+0.0`` are the same score; NaN embeddings are not supported.
One caveat: BLAS may round a dot product differently (by an ulp) for different block shapes, so
two *nearly* equal scores can swap when ``chunk_size`` or the sharding changes; exactly equal
scores always follow the rule.

Distributed evaluation. With ``group`` (e.g. the data-parallel group), every rank passes only its
own shard of images and of captions, and gets the same global metrics back. Images are numbered
globally by concatenating the ranks' image shards in rank order (``image_offset``, when given,
is checked against that numbering) and ``text_to_image`` holds *global* image indices, so a
caption may live on a different rank than its image. Captions are numbered globally the same
way. Each rank scores its local queries; the gallery side is broadcast shard by shard and chunk
by chunk (``chunk_size`` rows at a time), so no rank ever holds more than one gallery chunk of
another rank's embeddings. Hit counts are summed with one ``all_reduce``. Every rank must call
the function (it is a collective), with embeddings of the same width and dtype on the device its
backend needs (CUDA for NCCL). Invalid inputs on any rank make every rank raise.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["retrieval_metrics", "chance_recall", "zero_shot_accuracy", "format_table",
           "cross_lingual_agreement", "chance_cross_lingual", "query_rankings",
           "format_cross_lingual"]

_IDX_MAX = 2**32 - 1
"""Largest global gallery index the 64-bit ranking key can hold."""

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
"""Embedding dtypes, coded so ranks can check they agree before broadcasting buffers."""


# -- exact ranking keys -------------------------------------------------------------------------
def _rank_keys(scores: Tensor, index: Tensor) -> Tensor:
    """int64 keys ordered like (score descending, ``index`` ascending); shapes broadcast."""
    # + 0.0 turns -0.0 into +0.0, which would otherwise sort below it.
    bits = (scores.float() + 0.0).view(torch.int32)
    # Flipping the 31 low bits of negative floats makes their int32 order match the float order.
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    # Multiplication, not <<: left shifts of negative integers are not portable.
    return bits.to(torch.int64) * 2**32 + (_IDX_MAX - index)


def _block_top(scores: Tensor, index: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Keys and column positions of the top-``k`` of every row of a score block.

    ``index`` holds the global gallery index of each column. ``torch.topk`` on the scores picks the
    candidates; a row whose k-th and (k+1)-th scores tie could have picked either, so such rows
    (rare with real embeddings) are re-ranked with the exact keys.
    """
    m = scores.shape[1]
    if m <= k:
        pos = torch.arange(m, device=scores.device).expand(scores.shape[0], m)
        return _rank_keys(scores, index), pos
    vals, pos = scores.topk(k + 1, dim=1)
    keys = _rank_keys(vals[:, :k], index[pos[:, :k]])
    pos = pos[:, :k]
    ambiguous = (vals[:, k] == vals[:, k - 1]).nonzero().squeeze(1)
    if ambiguous.numel():
        exact_keys, exact_pos = _rank_keys(scores[ambiguous], index).topk(k, dim=1)
        keys[ambiguous] = exact_keys
        pos[ambiguous] = exact_pos
    return keys, pos


# -- communication: a world of one when group is None -------------------------------------------
class _Comm:
    """The few collectives the metrics need; every one is a no-op without a group."""

    def __init__(self, group, device: torch.device):
        self.group = group
        self.device = device
        self.world = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0

    def all_gather(self, t: Tensor) -> Tensor:
        """Stack of ``t`` from every rank, ``[world, *t.shape]``."""
        if self.group is None:
            return t.unsqueeze(0)
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t.contiguous(), group=self.group)
        return torch.stack(out)

    def all_reduce(self, t: Tensor) -> Tensor:
        if self.group is not None:
            dist.all_reduce(t, group=self.group)
        return t

    def broadcast(self, t: Tensor, src: int) -> Tensor:
        """``t`` from group rank ``src``; other ranks pass a buffer of the right shape."""
        if self.group is not None:
            dist.broadcast(t, src=dist.get_global_rank(self.group, src), group=self.group)
        return t


def _gallery_chunks(comm: _Comm, local: Tensor, local_labels: Optional[Tensor],
                    sizes: Sequence[int], offsets: Sequence[int],
                    chunk_size: int) -> Iterator[Tuple[Tensor, Tensor, Tensor]]:
    """Yield ``(embeddings, global indices, labels)`` of every gallery chunk of every rank.

    Without labels, an item's label is its global index. Rank ``comm.rank`` slices its own
    shard; the other shards arrive by broadcast, one chunk at a time.
    """
    for src, (n, base) in enumerate(zip(sizes, offsets)):
        for start in range(0, n, chunk_size):
            m = min(chunk_size, n - start)
            if src == comm.rank:
                emb = local[start:start + m].contiguous()
                labels = None if local_labels is None else local_labels[start:start + m]
            else:
                emb = torch.empty(m, local.shape[1], dtype=local.dtype, device=local.device)
                labels = None if local_labels is None else torch.empty(
                    m, dtype=torch.int64, device=local.device)
            comm.broadcast(emb, src)
            if labels is not None:
                comm.broadcast(labels, src)
            index = torch.arange(base + start, base + start + m, device=local.device)
            yield emb, index, index if labels is None else labels


def _score_blocks(queries: Tensor, gallery: Iterator[Tuple[Tensor, Tensor, Tensor]],
                  chunk_size: int) -> Iterator[Tuple[int, int, Tensor, Tensor, Tensor]]:
    """``(query chunk index, first query row, scores, gallery indices, gallery labels)`` for
    every query chunk × gallery chunk block, gallery chunks in the outer loop (each is received
    once, and every rank walks through the same sequence of broadcasts however many queries it
    holds). Scores are float32 (float64 ones are rounded)."""
    n = queries.shape[0]
    for emb, index, labels in gallery:
        for i, s in enumerate(range(0, n, chunk_size)):
            scores = queries[s:s + chunk_size] @ emb.T
            if scores.dtype == torch.float64:
                scores = scores.float()
            yield i, s, scores, index, labels


def _ranked_labels(queries: Tensor, gallery: Iterator[Tuple[Tensor, Tensor, Tensor]], k: int,
                   chunk_size: int, visit: Optional[Callable[[int, Tensor, Tensor], None]] = None
                   ) -> Tensor:
    """Labels of the top-``k`` gallery items of every query, best first: ``[Nq, min(k, Ng)]``.

    ``visit(first query row, scores, gallery indices)``, when given, sees every score block.
    """
    n = queries.shape[0]
    bounds = [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
    empty = queries.new_empty((0, 0), dtype=torch.int64)
    state: List[Tuple[Tensor, Tensor]] = [(empty.new_empty(e - s, 0), empty.new_empty(e - s, 0))
                                          for s, e in bounds]
    for i, s, scores, index, labels in _score_blocks(queries, gallery, chunk_size):
        if visit is not None:
            visit(s, scores, index)
        keys, pos = _block_top(scores, index, k)
        del scores
        run_keys, run_labels = state[i]
        keys = torch.cat([run_keys, keys], dim=1)
        merged_labels = torch.cat([run_labels, labels[pos]], dim=1)
        if keys.shape[1] > k:
            keys, sel = keys.topk(k, dim=1)
            merged_labels = merged_labels.gather(1, sel)
        state[i] = (keys, merged_labels)
    if not state:
        return empty.new_empty(0, 0)
    out = []
    for keys, labels in state:
        order = keys.argsort(dim=1, descending=True)  # keys are unique: a total order
        out.append(labels.gather(1, order))
    return torch.cat(out)


def _hits(ranked: Tensor, targets: Tensor, ks: Sequence[int]) -> List[Tensor]:
    """Number of queries whose target label is within the first k of ``ranked``, for each k."""
    match = ranked == targets[:, None]
    return [match[:, :k].any(dim=1).sum() for k in ks]


def _check_ks(ks: Sequence[int]) -> Tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    return ks


def _check_chunk(chunk_size: int) -> int:
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


def _local_error(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor) -> Optional[str]:
    if image_emb.dim() != 2 or text_emb.dim() != 2:
        return (f"embeddings must be 2-D, got image {tuple(image_emb.shape)} and text "
                f"{tuple(text_emb.shape)}")
    if image_emb.shape[1] != text_emb.shape[1]:
        return f"embedding widths differ: image {image_emb.shape[1]}, text {text_emb.shape[1]}"
    if image_emb.dtype != text_emb.dtype or image_emb.dtype not in _DTYPE_CODES:
        return (f"embeddings must share one floating dtype of {list(_DTYPE_CODES)}, got "
                f"{image_emb.dtype} and {text_emb.dtype}")
    if text_to_image.dim() != 1 or text_to_image.shape[0] != text_emb.shape[0]:
        return (f"text_to_image must be [Nt] = [{text_emb.shape[0]}], got "
                f"{tuple(text_to_image.shape)}")
    if text_to_image.dtype.is_floating_point or text_to_image.dtype.is_complex:
        return f"text_to_image must hold integers, got {text_to_image.dtype}"
    return None


# -- public API ---------------------------------------------------------------------------------
def retrieval_metrics(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor,
                      ks: Sequence[int] = (1, 5, 10), chunk_size: int = 4096, group=None,
                      image_offset: Optional[int] = None) -> Dict[str, float]:
    """Image↔text retrieval recall (%) with several captions per image, in bounded memory.

    Args:
        image_emb: ``[Ni, D]`` L2-normalised image embeddings (this rank's shard with ``group``).
        text_emb: ``[Nt, D]`` L2-normalised caption embeddings (this rank's shard).
        text_to_image: ``[Nt]`` integer index of each caption's image, global with ``group``.
            Every image must have at least one caption.
        ks: the k of each R@k.
        chunk_size: rows per query chunk and per gallery chunk; the score block is
            ``chunk_size × chunk_size``.
        group: ``None`` for a single process (even when ``torch.distributed`` is initialised),
            or the process group whose ranks each hold a shard (see the module docstring).
        image_offset: global index of this rank's first image. Images are numbered by
            concatenating the shards in group-rank order; when given, the value is checked
            against that numbering (so it must be 0, or ``None``, without a group).

    Returns:
        ``{"i2t_r{k}": ..., "t2i_r{k}": ... for k in ks, "mean_recall": ...}``: percentages in
        [0, 100]; ``mean_recall`` is the mean of all the recalls (of six with the default ks).
        The same values on every rank. Ties rank the lower global index first.
    """
    ks = _check_ks(ks)
    chunk_size = _check_chunk(chunk_size)
    device = image_emb.device
    comm = _Comm(group, device)
    error = _local_error(image_emb, text_emb, text_to_image)
    width = image_emb.shape[-1] if image_emb.dim() == 2 else -1
    meta = torch.tensor([image_emb.shape[0] if error is None else 0,
                         text_emb.shape[0] if error is None else 0,
                         -1 if image_offset is None else int(image_offset), width,
                         _DTYPE_CODES.get(image_emb.dtype, -1), int(error is not None)],
                        dtype=torch.int64, device=device)
    # Every rank sees every rank's shape and error flag, so all of them raise together instead of
    # leaving peers waiting in a collective.
    meta = comm.all_gather(meta).cpu().tolist()
    if error is not None:
        raise ValueError(error)
    bad = [r for r, m in enumerate(meta) if m[5]]
    if bad:
        raise ValueError(f"retrieval_metrics: invalid inputs on rank(s) {bad}")
    if len({(m[3], m[4]) for m in meta}) > 1:
        raise ValueError(f"embedding width/dtype differ across ranks: "
                         f"{[(m[3], m[4]) for m in meta]}")
    img_sizes = [m[0] for m in meta]
    txt_sizes = [m[1] for m in meta]
    img_offsets = [sum(img_sizes[:r]) for r in range(comm.world)]
    txt_offsets = [sum(txt_sizes[:r]) for r in range(comm.world)]
    wrong = [(r, m[2], img_offsets[r]) for r, m in enumerate(meta)
             if m[2] != -1 and m[2] != img_offsets[r]]
    if wrong:
        raise ValueError(f"image_offset (rank, given, expected from rank order): {wrong}")
    n_images, n_texts = sum(img_sizes), sum(txt_sizes)
    if n_images == 0 or n_texts == 0:
        raise ValueError(f"retrieval needs images and captions, got {n_images} and {n_texts}")
    if max(n_images, n_texts) > _IDX_MAX + 1:
        raise ValueError(f"at most 2**32 images and captions, got {n_images} and {n_texts}")

    # Captions per global image (plus out-of-range indices in the last slot): one all_reduce.
    t2i = text_to_image.to(device=device, dtype=torch.int64)
    valid = (t2i >= 0) & (t2i < n_images)
    counts = torch.bincount(t2i[valid], minlength=n_images)
    counts = comm.all_reduce(torch.cat([counts, (~valid).sum().view(1)]))
    if counts[-1]:
        raise ValueError(f"{int(counts[-1])} text_to_image entries outside [0, {n_images})")
    orphans = (counts[:-1] == 0).nonzero().squeeze(1)
    if orphans.numel():
        raise ValueError(f"{orphans.numel()} image(s) without a caption, e.g. global index "
                         f"{int(orphans[0])}")
    del counts, orphans

    k = max(ks)
    rank = comm.rank
    # Image → text: this rank's images against every caption, labelled with its image.
    ranked = _ranked_labels(image_emb, _gallery_chunks(comm, text_emb, t2i, txt_sizes,
                                                       txt_offsets, chunk_size), k, chunk_size)
    targets = torch.arange(img_offsets[rank], img_offsets[rank] + image_emb.shape[0],
                           device=device)
    i2t = _hits(ranked, targets, ks)
    # Text → image: this rank's captions against every image, labelled with its own index.
    ranked = _ranked_labels(text_emb, _gallery_chunks(comm, image_emb, None, img_sizes,
                                                      img_offsets, chunk_size), k, chunk_size)
    t2i_hits = _hits(ranked, t2i, ks)
    del ranked
    hits = comm.all_reduce(torch.stack(i2t + t2i_hits).to(torch.int64)).cpu().tolist()

    return _recall_row(ks, [100.0 * h / n_images for h in hits[:len(ks)]],
                       [100.0 * h / n_texts for h in hits[len(ks):]])


def _recall_row(ks: Tuple[int, ...], i2t: Sequence[float], t2i: Sequence[float]
                ) -> Dict[str, float]:
    """The metrics dict: ``i2t_r{k}`` then ``t2i_r{k}`` (percentages) and their mean."""
    out = {f"i2t_r{k}": v for k, v in zip(ks, i2t)}
    out.update({f"t2i_r{k}": v for k, v in zip(ks, t2i)})
    out["mean_recall"] = sum(out.values()) / len(out)
    return out


def chance_recall(n: int, ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """What :func:`retrieval_metrics` reports for a random ranking of ``n`` images with one
    caption each: R@k = 100 · min(k, n) / n in both directions."""
    ks = _check_ks(ks)
    recalls = [100.0 * min(k, n) / n for k in ks]
    return _recall_row(ks, recalls, recalls)


def _image_shards(comm: _Comm, image_emb: Tensor, texts: Sequence[Tensor], what: str,
                  aligned: bool) -> Tuple[List[int], List[int]]:
    """Image counts and global offsets of every rank's shard. Checks the shapes (``aligned``:
    every text has a row per image) on every rank and makes all of them raise together, as
    :func:`retrieval_metrics` does."""
    error = None
    if image_emb.dim() != 2 or any(t.dim() != 2 for t in texts):
        error = "embeddings must be 2-D"
    elif any(t.shape[1] != image_emb.shape[1] or t.dtype != image_emb.dtype for t in texts):
        error = "image and text embeddings differ in width or dtype"
    elif aligned and any(t.shape[0] != image_emb.shape[0] for t in texts):
        error = "need one text row per image"
    meta = torch.tensor([image_emb.shape[0] if error is None else 0, int(error is not None)],
                        dtype=torch.int64, device=image_emb.device)
    meta = comm.all_gather(meta).cpu().tolist()
    if error is not None:
        raise ValueError(f"{what}: {error}, got image {tuple(image_emb.shape)} and text "
                         f"{[tuple(t.shape) for t in texts]}")
    bad = [r for r, m in enumerate(meta) if m[1]]
    if bad:
        raise ValueError(f"{what}: invalid inputs on rank(s) {bad}")
    sizes = [m[0] for m in meta]
    if sum(sizes) == 0:
        raise ValueError(f"{what}: no images")
    return sizes, [sum(sizes[:r]) for r in range(comm.world)]


def cross_lingual_agreement(image_emb: Tensor, text_a: Tensor, text_b: Tensor, k: int = 5,
                            chunk_size: int = 4096, group=None) -> Dict[str, float]:
    """How much text→image retrieval agrees between two captions of each sample (e.g. its
    English and its Chinese caption), in %.

    Row ``j`` of ``text_a`` and of ``text_b`` are two captions of image ``j``; both are queries
    against the gallery of all the images (ties rank the lower global index first, as in
    :func:`retrieval_metrics`). With ``group``, every rank passes its shard of aligned rows
    (images numbered globally in rank order) and gets the same figures.

    Returns:
        ``samples``: the number of samples n (= gallery images); ``top1_agreement``: samples whose
        two queries retrieve the same top-1 image; ``top{k}_overlap``: mean of
        ``|top-k(a) ∩ top-k(b)| / k`` (k capped at n); ``both_r1`` / ``both_r{k}``: samples whose
        two queries both rank the right image first / within the top k; and the values of the
        first two for two independent random rankings, ``chance_top1_agreement`` (100 / n) and
        ``chance_top{k}_overlap`` (100 · k / n).
    """
    k = _check_ks((k,))[0]
    chunk_size = _check_chunk(chunk_size)
    device = image_emb.device
    comm = _Comm(group, device)
    sizes, offsets = _image_shards(comm, image_emb, (text_a, text_b), "cross_lingual_agreement",
                                   aligned=True)
    targets = torch.arange(offsets[comm.rank], offsets[comm.rank] + text_a.shape[0],
                           device=device)
    ranked = [_ranked_labels(t, _gallery_chunks(comm, image_emb, None, sizes, offsets,
                                                chunk_size), k, chunk_size)
              for t in (text_a, text_b)]
    a, b = ranked
    n = sum(sizes)
    kk = min(k, n)
    hit_a, hit_b = a == targets[:, None], b == targets[:, None]
    counts = torch.stack([(a[:, 0] == b[:, 0]).sum(),
                          (a[:, :, None] == b[:, None, :]).any(dim=2).sum(),  # labels unique
                          (hit_a[:, 0] & hit_b[:, 0]).sum(),
                          (hit_a.any(dim=1) & hit_b.any(dim=1)).sum()]).to(torch.int64)
    agree, overlap, both1, bothk = comm.all_reduce(counts).cpu().tolist()
    return {"samples": n, "top1_agreement": 100.0 * agree / n,
            f"top{k}_overlap": 100.0 * overlap / (n * kk),
            "both_r1": 100.0 * both1 / n, f"both_r{k}": 100.0 * bothk / n,
            **chance_cross_lingual(n, k)}


def chance_cross_lingual(n: int, k: int = 5) -> Dict[str, float]:
    """Top-1 agreement and top-``k`` overlap (%) of two independent random rankings of ``n``
    images: ``100 / n`` and ``100 · min(k, n) / n``."""
    return {"chance_top1_agreement": 100.0 / n, f"chance_top{k}_overlap": 100.0 * min(k, n) / n}


def query_rankings(queries: Tensor, image_emb: Tensor, targets: Tensor, k: int = 5,
                   chunk_size: int = 4096, group=None) -> Tuple[Tensor, Tensor]:
    """The top-``k`` images of a few text queries and the rank of each query's right image.

    Args:
        queries: ``[Nq, D]`` text embeddings, the same on every rank of ``group``.
        image_emb: ``[Ni, D]`` image embeddings (this rank's shard with ``group``; images are
            numbered globally in rank order, as in :func:`retrieval_metrics`).
        targets: ``[Nq]`` global index of each query's right image.

    Returns:
        ``(top, rank)``: ``[Nq, min(k, N)]`` global image indices, best first, and the 1-based
        rank ``[Nq]`` of each target among all N images; the same on every rank. Ties rank the
        lower global index first. The gallery is read twice (once to find the target scores,
        once to count the images above them).
    """
    k = _check_ks((k,))[0]
    chunk_size = _check_chunk(chunk_size)
    device = image_emb.device
    comm = _Comm(group, device)
    sizes, offsets = _image_shards(comm, image_emb, (queries,), "query_rankings", aligned=False)
    n = sum(sizes)
    targets = targets.to(device=device, dtype=torch.int64)
    if targets.shape != queries.shape[:1] or bool(((targets < 0) | (targets >= n)).any()):
        raise ValueError(f"query_rankings: targets must be [{queries.shape[0]}] indices in "
                         f"[0, {n}), got {targets.tolist()}")
    target_key = torch.zeros(queries.shape[0], dtype=torch.int64, device=device)

    def gallery():
        return _gallery_chunks(comm, image_emb, None, sizes, offsets, chunk_size)

    def find_targets(s: int, scores: Tensor, index: Tensor) -> None:
        rows, cols = (index[None, :] == targets[s:s + scores.shape[0], None]).nonzero(
            as_tuple=True)
        target_key[s + rows] = _rank_keys(scores[rows, cols], index[cols])

    top = _ranked_labels(queries, gallery(), k, chunk_size, visit=find_targets)
    above = torch.zeros_like(target_key)
    for _, s, scores, index, _ in _score_blocks(queries, gallery(), chunk_size):
        above[s:s + scores.shape[0]] += (_rank_keys(scores, index)
                                         > target_key[s:s + scores.shape[0], None]).sum(dim=1)
    return top, above + 1


def _ranked_classes(image_emb: Tensor, class_emb: Tensor, labels: Tensor, k: int,
                    chunk_size: int) -> Tuple[Tensor, Tensor]:
    """Zero-shot classification's ranking: ``(ranked, targets)``, the top-``k`` class indices of
    each image ``[N, min(k, C)]`` (an exact tie ranks the lower class index first) and the
    labels as int64 on the images' device. The class gallery is replicated on every rank, so
    nothing is communicated."""
    chunk_size = _check_chunk(chunk_size)
    if image_emb.dim() != 2 or class_emb.dim() != 2 or image_emb.shape[1] != class_emb.shape[1]:
        raise ValueError(f"need [N, D] images and [C, D] classes, got {tuple(image_emb.shape)} "
                         f"and {tuple(class_emb.shape)}")
    if labels.shape != (image_emb.shape[0],):
        raise ValueError(f"labels must be [N] = [{image_emb.shape[0]}], got "
                         f"{tuple(labels.shape)}")
    device = image_emb.device
    n_classes = class_emb.shape[0]
    ranked = _ranked_labels(image_emb, _gallery_chunks(_Comm(None, device), class_emb, None,
                                                       [n_classes], [0], chunk_size),
                            k, chunk_size)
    return ranked, labels.to(device=device, dtype=torch.int64)


def zero_shot_accuracy(image_emb: Tensor, class_emb: Tensor, labels: Tensor,
                       ks: Sequence[int] = (1, 5), chunk_size: int = 4096,
                       group=None) -> Dict[str, float]:
    """Zero-shot classification top-k accuracy (%) of images against class (prompt) embeddings.

    Args:
        image_emb: ``[N, D]`` L2-normalised image embeddings (this rank's shard with ``group``).
        class_emb: ``[C, D]`` L2-normalised class embeddings, the same on every rank.
        labels: ``[N]`` class index of each image.
        ks: the k of each top-k accuracy.
        chunk_size: rows per image chunk and per class chunk.
        group: ``None`` for a single process, or a process group over which the images are
            sharded; the counts are summed over it and every rank gets the same values.

    Returns:
        ``{"top{k}": ... for k in ks}``. Ties rank the lower class index first.
    """
    ks = _check_ks(ks)
    ranked, targets = _ranked_classes(image_emb, class_emb, labels, max(ks), chunk_size)
    device = image_emb.device
    n = torch.tensor(image_emb.shape[0], device=device)
    counts = torch.stack(_hits(ranked, targets, ks) + [n]).to(torch.int64)
    counts = _Comm(group, device).all_reduce(counts)
    counts = counts.cpu().tolist()
    if counts[-1] == 0:
        raise ValueError("zero_shot_accuracy needs at least one image")
    return {f"top{k}": 100.0 * counts[j] / counts[-1] for j, k in enumerate(ks)}


def _column_order(keys: Sequence[str]) -> List[str]:
    def k_of(key: str, prefix: str) -> Optional[int]:
        rest = key[len(prefix):]
        return int(rest) if key.startswith(prefix) and rest.isdigit() else None

    i2t = sorted((k_of(c, "i2t_r"), c) for c in keys if k_of(c, "i2t_r") is not None)
    t2i = sorted((k_of(c, "t2i_r"), c) for c in keys if k_of(c, "t2i_r") is not None)
    known = [c for _, c in i2t] + [c for _, c in t2i]
    known += [c for c in ("mean_recall",) if c in keys]
    return known + [c for c in keys if c not in known]


def _header(key: str) -> str:
    for prefix, name in (("i2t_r", "I→T R@"), ("t2i_r", "T→I R@"), ("top", "Top-")):
        rest = key[len(prefix):]
        if key.startswith(prefix) and rest.isdigit():
            return name + rest
    return "MR" if key == "mean_recall" else key


def format_table(rows: Dict[str, Dict[str, float]], digits: int = 2) -> str:
    """Render ``{row name: metrics}`` (e.g. ``{"en": ..., "zh": ...}``) as an aligned text table.

    Columns: I→T R@k, then T→I R@k (ascending k), then MR (mean recall), then any other metric
    (e.g. zero-shot ``top1`` as "Top-1") in first-seen order; a metric a row lacks shows "-".
    """
    keys: List[str] = []
    for metrics in rows.values():
        keys += [k for k in metrics if k not in keys]
    columns = _column_order(keys)
    table = [[""] + [_header(c) for c in columns]]
    for name, metrics in rows.items():
        table.append([str(name)] + [f"{metrics[c]:.{digits}f}" if c in metrics else "-"
                                    for c in columns])
    widths = [max(len(r[j]) for r in table) for j in range(len(table[0]))]

    def line(cells: List[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]).rstrip()

    lines = [line(table[0]), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    lines += [line(r) for r in table[1:]]
    return "\n".join(lines)


def format_cross_lingual(metrics: Dict[str, float], languages: Sequence[str] = ("en", "zh"),
                         digits: int = 2) -> str:
    """Render :func:`cross_lingual_agreement`'s figures (%) with their chance values."""
    k = next((key[3:-8] for key in metrics if key.startswith("top") and key.endswith("_overlap")),
             "5")
    a, b = languages
    rows = [("top-1 agreement", metrics["top1_agreement"], metrics["chance_top1_agreement"]),
            (f"top-{k} overlap", metrics[f"top{k}_overlap"], metrics[f"chance_top{k}_overlap"]),
            ("both R@1", metrics["both_r1"], None),
            (f"both R@{k}", metrics[f"both_r{k}"], None)]
    cells = [[name, f"{v:.{digits}f}", "" if c is None else f"{c:.{digits}f}"]
             for name, v, c in rows]
    widths = [max(len(r[j]) for r in cells + [["", "value", "chance"]]) for j in range(3)]
    lines = [f"cross-lingual T→I, {a} vs {b} queries of the same {metrics['samples']} samples "
             f"(%):",
             "  ".join([" " * widths[0], "value".rjust(widths[1]), "chance".rjust(widths[2])])]
    lines += ["  ".join([r[0].ljust(widths[0]), r[1].rjust(widths[1]),
                         r[2].rjust(widths[2])]).rstrip() for r in cells]
    return "\n".join(lines)
