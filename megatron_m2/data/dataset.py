"""Training-time loading: indexed image–text datasets → transformed, tokenized micro-batches.

* :class:`ImageTextDataset` reads one indexed dataset (memory-mapped), picks a caption per
  sample and language policy, pads it to the model's text length and transforms the image.
  Randomness (crop, flip, RandAugment, caption choice) is a pure function of
  ``(seed, epoch, sample index)``, so a resumed run sees exactly the batches it would have seen.
* :class:`BlendedDataset` mixes several datasets with weights, deterministically (each position
  goes to the dataset furthest behind its share, as Megatron's blending does).
* :class:`GlobalBatchSampler` walks a seeded per-epoch permutation in global batches and hands
  each data-parallel rank its contiguous slice, cut into micro-batches; its position
  (consumed samples) is saved in checkpoints for exact resume.
* :func:`build_loader` wraps it all in a ``torch.utils.data.DataLoader`` with worker processes.

Worker processes are spawned. Each imports this module, torch, Pillow and SentencePiece, but not
megatron-core (which takes seconds to import): the indexed files are read with numpy alone
(:class:`~megatron_m2.data.indexed.ImageTextIndexedDataset`), mapped by each worker on first use.
Batches are assembled in shared memory inside the worker (see :func:`_collate`), and a worker
ends the way a forked one does, without finalising its interpreter (see :class:`_WorkerProcess`):
together these let a worker that is torn down in the middle of its prefetching exit cleanly.
"""

from __future__ import annotations

import io
import logging
import multiprocessing.context
import multiprocessing.util
import os
import random
import sys
import traceback
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .indexed import DatasetError, ImageTextIndexedDataset, split_ranges

__all__ = ["ImageTextDataset", "BlendedDataset", "GlobalBatchSampler", "build_loader",
           "split_ranges", "CAPTION_POLICIES", "BadSampleError", "worker_error_message"]

logger = logging.getLogger(__name__)


class BadSampleError(DatasetError):
    """A sample that cannot be read, decoded or transformed; the message names the dataset and
    the sample index."""


def worker_error_message(exc: BaseException) -> str:
    """The original message of an exception a DataLoader worker raised: torch re-raises it in
    the main process with the worker's whole traceback as its message."""
    text = str(exc).strip()
    if "Original Traceback" not in text:
        return text
    last = text.splitlines()[-1]
    name = type(exc).__name__
    return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last

CAPTION_POLICIES = ("any", "en", "zh", "balanced")
"""any: uniform over a sample's captions; en/zh: that language only (samples without it fall
back to any); balanced: first a language uniformly among those the sample has, then a caption."""


def _mix(*xs: int) -> int:
    """A deterministic 63-bit seed from integers (splitmix-style)."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h ^= (int(x) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & (2**64 - 1)
        h = (h * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    return h & (2**63 - 1)


_WORDS = 0x776F7264
"""Salt of the caption-token-dropout random stream (apart from the augmentation's)."""


class ImageTextDataset(torch.utils.data.Dataset):
    """Samples ``[start, end)`` of one indexed dataset as model inputs.

    Args:
        prefix: indexed dataset prefix.
        tokenizer: an :class:`~megatron_m2.data.tokenizer.M2Tokenizer` (framing and padding).
        transform: ``f(PIL image, random.Random) -> tensor`` (train) or ``f(PIL image)`` (eval);
            a train transform with ``encoded = True`` gets the encoded bytes instead and returns
            a dict of tensors (``gpu_decode.EncodedTrainTransform``: ``image_data`` and
            ``image_params`` in place of ``images``).
        text_length: padded caption length (the model's ``max_text_len``).
        caption_policy: see :data:`CAPTION_POLICIES`.
        seed: base seed of augmentation and caption choice.
        sample_range: the ``[start, end)`` slice of the dataset to expose (``--split``).
        skip_bad: replace a sample that cannot be read, decoded or transformed by the next good
            one (deterministically) instead of raising :class:`BadSampleError`; each returned
            item counts the samples it replaced in ``"bad_samples"`` (the trainer sums them
            and enforces ``--skip-bad-samples``).
        token_dropout: training only: each caption token between ``[CLS]`` and the end token
            is replaced by ``[MASK]`` with this probability (drawn from the sample's seeded
            RNG, so the same in every layout and after a resume; at least one token is kept),
            so the text tower learns to match on the words it knows when others are unknown
            (word dropout). 0 leaves captions and the random stream untouched.
    """

    def __init__(self, prefix: str, tokenizer, transform, text_length: int,
                 caption_policy: str = "any", seed: int = 0,
                 sample_range: Optional[Tuple[int, int]] = None, train: bool = True,
                 skip_bad: bool = False, token_dropout: float = 0.0):
        if caption_policy not in CAPTION_POLICIES:
            raise ValueError(f"caption_policy must be one of {CAPTION_POLICIES}")
        if not 0.0 <= token_dropout < 1.0:
            raise ValueError(f"token_dropout must be in [0, 1), got {token_dropout}")
        if token_dropout and tokenizer.mask_id is None:
            raise ValueError("token_dropout needs a tokenizer with a [MASK] token")
        self.token_dropout = float(token_dropout) if train else 0.0
        self.prefix = prefix
        self.tokenizer, self.transform = tokenizer, transform
        self.text_length, self.caption_policy, self.seed = text_length, caption_policy, seed
        self.train, self.skip_bad = train, skip_bad
        # Validates the files here; pickles as its prefix, so each worker maps the files itself.
        self.reader = ImageTextIndexedDataset(prefix)
        n = len(self.reader)
        self.start, self.end = sample_range or (0, n)
        if not 0 <= self.start <= self.end <= n:
            raise ValueError(f"{prefix}: sample range {sample_range} outside [0, {n}]")
        self.epoch = 0

    def __len__(self) -> int:
        return self.end - self.start

    def _choose_caption(self, captions, rng: random.Random):
        pool = captions
        if self.caption_policy in ("en", "zh"):
            pool = [c for c in captions if c[0] == self.caption_policy] or captions
        elif self.caption_policy == "balanced":
            langs = sorted({c[0] for c in captions})
            lang = langs[rng.randrange(len(langs))]
            pool = [c for c in captions if c[0] == lang]
        return pool[rng.randrange(len(pool))] if self.train else pool[0]

    def _drop_tokens(self, ids: List[int], rng: random.Random) -> List[int]:
        """``ids`` (framed: ``[CLS] ... end``) with inner tokens replaced by ``[MASK]`` with
        probability ``token_dropout``; one inner token is always kept."""
        inner = range(1, len(ids) - 1)
        drop = [i for i in inner if rng.random() < self.token_dropout]
        if len(drop) == len(inner) and drop:
            drop.pop(rng.randrange(len(drop)))
        out = list(ids)
        for i in drop:
            out[i] = self.tokenizer.mask_id
        return out

    def get(self, i: int, epoch: int = 0) -> Dict[str, torch.Tensor]:
        """Sample ``i`` of the slice, transformed; a bad one raises :class:`BadSampleError`
        (or, with ``skip_bad``, is replaced by the next good one and counted)."""
        bad = 0
        for _ in range(len(self)):
            try:
                out = self._load(self.start + i, epoch)
            except BadSampleError as e:
                if not self.skip_bad:
                    raise
                logger.warning("skipping a bad sample: %s", e)
                bad += 1
                i = (i + 1) % len(self)
                continue
            if self.skip_bad:
                out["bad_samples"] = torch.tensor(bad)
            return out
        raise BadSampleError(f"dataset {self.prefix}: no sample of [{self.start}, {self.end}) "
                             "can be read")

    def _load(self, idx: int, epoch: int) -> Dict[str, torch.Tensor]:
        from PIL import Image

        try:
            sample = self.reader[idx]
            rng = random.Random(_mix(self.seed, epoch, idx))
            lang, ids = self._choose_caption(sample.captions, rng)
            ids = ids.tolist()
            if self.token_dropout:  # its own stream: the image augmentation stays the same
                ids = self._drop_tokens(ids, random.Random(_mix(self.seed, epoch, idx, _WORDS)))
            text_ids, pad = self.tokenizer.pad([ids], max_length=self.text_length)
            if self.train and getattr(self.transform, "encoded", False):
                # GPU decode path (gpu_decode.EncodedTrainTransform): the encoded bytes and the
                # augmentation parameters; the main process decodes and transforms on the GPU.
                image = self.transform(sample.image, rng)
            else:
                with Image.open(io.BytesIO(sample.image)) as img:
                    img = img.convert("RGB")
                    image = {"images": self.transform(img, rng) if self.train
                             else self.transform(img)}
        except (OSError, ValueError, SyntaxError, IndexError) as e:  # PIL, framing, reader
            raise BadSampleError(f"dataset {self.prefix}: sample {idx}: {e}") from None
        return {**image, "text_ids": text_ids[0], "text_pad_mask": pad[0],
                "lang": torch.tensor(0 if lang == "en" else 1 if lang == "zh" else 2)}

    def __getitem__(self, key) -> Dict[str, torch.Tensor]:
        i, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        return self.get(i, epoch)


class BlendedDataset(torch.utils.data.Dataset):
    """Weighted, deterministic mixture of datasets with ``size`` positions per epoch."""

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset],
                 weights: Optional[Sequence[float]] = None, size: Optional[int] = None):
        if not datasets:
            raise ValueError("BlendedDataset needs at least one dataset")
        w = np.asarray(weights if weights is not None else [len(d) for d in datasets],
                       dtype=np.float64)
        if len(w) != len(datasets) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"invalid blend weights {weights} for {len(datasets)} datasets")
        self.datasets, self.weights = list(datasets), w / w.sum()
        self.size = int(size if size is not None else sum(len(d) for d in datasets))
        which = np.empty(self.size, dtype=np.int32)
        index = np.empty(self.size, dtype=np.int64)
        counts = np.zeros(len(datasets), dtype=np.int64)
        for i in range(self.size):  # the dataset furthest behind its share gets position i
            d = int(np.argmax(self.weights * (i + 1) - counts))
            which[i], index[i] = d, counts[d] % len(self.datasets[d])
            counts[d] += 1
        self.which, self.index = which, index

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        return self.datasets[self.which[i]][(int(self.index[i]), epoch)]


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This DP rank's micro-batches of ``(index, epoch)`` keys, global batch after global batch.

    Epoch e visits a permutation of ``range(len(dataset))`` seeded by ``(seed, e)``; step t's
    global batch is the next ``global_batch`` positions of that stream (crossing epochs as
    needed). Micro-batch m of DP rank r is positions ``[m·b·N + r·b, m·b·N + (r+1)·b)`` of the
    global batch, so the DP ranks' m-th micro-batches form the m-th contiguous block: what an
    ITC group sees together is independent of the DP size. ``consumed_samples`` (global) is the
    whole state.
    """

    def __init__(self, dataset_len: int, global_batch: int, micro_batch: int, dp_rank: int,
                 dp_size: int, seed: int = 0, shuffle: bool = True, consumed_samples: int = 0):
        if global_batch % (micro_batch * dp_size):
            raise ValueError("global batch must be divisible by micro batch x DP size")
        if dataset_len <= 0:
            raise ValueError("empty dataset")
        self.n, self.gb, self.mb = dataset_len, global_batch, micro_batch
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        self.consumed_samples = consumed_samples
        self._perm_cache: Dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: (
                np.random.default_rng(_mix(self.seed, epoch)).permutation(self.n)
                if self.shuffle else np.arange(self.n))}
        return self._perm_cache[epoch]

    def key(self, position: int) -> Tuple[int, int]:
        epoch, offset = divmod(position, self.n)
        return int(self._perm(epoch)[offset]), epoch

    def state_dict(self) -> Dict[str, int]:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.consumed_samples = int(state["consumed_samples"])

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        block = self.mb * self.dp_size
        while True:
            for m in range(self.gb // block):
                lo = self.consumed_samples + m * block + self.dp_rank * self.mb
                yield [self.key(p) for p in range(lo, lo + self.mb)]
            self.consumed_samples += self.gb


def _collate(samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Stack the samples' tensors key by key.

    ``default_collate`` stacks straight into shared memory when called in a worker process, so
    the worker's result queue passes the batch on by file descriptor without copying it. A batch
    in ordinary memory would instead be copied into shared memory by the queue's feeder thread,
    a daemon thread, in C++ with the GIL released; a worker shut down in the middle of that copy
    could not end cleanly (see :class:`_WorkerProcess` for how workers end).
    """
    data = None
    if "image_data" in samples[0]:  # GPU decode path: the encoded images, of varying lengths
        data = [s["image_data"] for s in samples]
        samples = [{k: v for k, v in s.items() if k != "image_data"} for s in samples]
    batch = torch.utils.data.default_collate(samples)
    if data is not None:  # one flat tensor + offsets
        offsets = torch.zeros(len(data) + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor([d.numel() for d in data], dtype=torch.int64).cumsum(0)
        flat = torch.empty(int(offsets[-1]), dtype=torch.uint8)
        if torch.utils.data.get_worker_info() is not None:
            flat.share_memory_()  # as default_collate's outputs: passed on without a copy
        batch["image_data"], batch["image_offsets"] = torch.cat(data, out=flat), offsets
    return batch


class _WorkerProcess(multiprocessing.context.SpawnProcess):
    """A spawned DataLoader worker that ends like a forked one: ``os._exit`` once its loop returns.

    A spawned process otherwise returns to ``spawn_main``, which exits through a full interpreter
    finalisation and the C and C++ exit handlers of every loaded library. A worker that is shut
    down while prefetching has abandoned threads at that point (its result queue's feeder, whose
    join torch cancels on shutdown), and a C++ destructor run during that teardown occasionally
    calls ``std::terminate`` ("terminate called without an active exception"): the worker dies
    of SIGABRT after having done all its work. A forked worker never gets there:
    ``multiprocessing`` ends it with ``os._exit``. So does this class, after running the
    ``multiprocessing`` finalizers (a result queue that was not abandoned is drained) and flushing
    the standard streams: nothing the worker produced is lost that torch had not already chosen to
    drop.
    """

    def run(self) -> None:
        code = 1
        try:
            super().run()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - reported like multiprocessing does, then exit 1
            traceback.print_exc()
        finally:
            # What multiprocessing itself runs after ``run``: the Python-level finalizers, which
            # wait for the result queue to drain unless torch has cancelled that on shutdown.
            try:
                multiprocessing.util._exit_function()
            except BaseException:  # noqa: BLE001 - the exit below must happen regardless
                traceback.print_exc()
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (AttributeError, OSError, ValueError):
                    pass
            os._exit(code)


class _WorkerContext(multiprocessing.context.SpawnContext):
    """The spawn start method, with workers that end like :class:`_WorkerProcess`."""

    Process = _WorkerProcess


def build_loader(dataset, sampler: GlobalBatchSampler, num_workers: int = 2):
    """An endless DataLoader of this rank's micro-batches (spawned worker processes, in order).

    Workers are persistent: they live as long as the loader's iterator. Deleting the loader and
    its iterator shuts them down; each exits with status 0, even in the middle of prefetching.
    """
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=_collate,
        persistent_workers=num_workers > 0,
        multiprocessing_context=_WorkerContext() if num_workers > 0 else None,
        prefetch_factor=2 if num_workers > 0 else None)
