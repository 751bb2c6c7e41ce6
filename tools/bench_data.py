#!/usr/bin/env python3
"""Benchmark the data path: preprocessing throughput, and our loader against ``webdataset``.

In a temporary directory it

1. renders ``--samples`` photo-like RGB images (fractal colour noise, blurred shapes and a little
   grain, so that JPEG sizes are those of photos rather than of flat colour or white noise) at
   ``--source-size`` px as JPEG files, each with an English and a Chinese caption, lists them in
   a JSONL manifest and trains a small tokenizer on the captions;
2. runs :func:`~megatron_m2.data.preprocess.preprocess` on the manifest with 1 and with 2 worker
   processes (fresh outputs each time) and reports images/s in total and per worker; the time
   includes starting the worker pool and assembling the final files, as a real run pays both.
   A second run over the first few records measures those fixed costs, which a few hundred
   images do not amortise, and the steady images/s of the rest;
3. writes webdataset tar shards holding **the same samples** as the preprocessed dataset: per
   sample ``{key}.jpg`` = the stored (re-encoded) JPEG bytes and ``{key}.json`` = the framed token
   ids of its captions with their languages, so that both loaders decode identical bytes;
4. times two loaders doing identical work per sample at ``--image-size`` (decode with PIL,
   RandomResizedCrop + flip + RandAugment(2, 7), caption choice, ``tok.pad``) with ``--workers``
   spawned worker processes and batches of ``--batch``:

   * **ours**: :class:`~megatron_m2.data.dataset.ImageTextDataset` +
     :class:`~megatron_m2.data.dataset.GlobalBatchSampler` (shuffled, as in training) +
     :func:`~megatron_m2.data.dataset.build_loader`, reading the memory-mapped ``.bin``;
   * **webdataset**: ``wds.WebDataset`` over the shards (``split_by_worker``, no shard or sample
     shuffle: purely sequential reads, the most favourable setting for it), the same per-sample
     function, batched in the pipeline, in a ``torch.utils.data.DataLoader`` with the same
     number of workers, the same start method and the same prefetch.

   Randomness is seeded per sample exactly as ``ImageTextDataset`` seeds it, so for a given
   sample both loaders produce the same tensors (checked on a few samples before timing), and
   one pass of each covers the same samples: the figures compare the loaders, not the work.
   Time to the first batch (worker start-up included) is reported separately; throughput is
   measured over the following batches of one pass, with the CPU time the loader's processes
   spend meanwhile (steadier than wall time on a machine shared with other jobs).
   ``--repeats N`` runs N alternating passes of each and keeps each figure's best.

``--decode [PREFIX]`` measures instead, side by side, what one CPU core does on a dataset
(Pillow decode alone: the bound; decode + train transform with and without RandAugment; the GPU
decode path's worker half: header, parameters, bytes) and what the loader delivers (CPU path
with 1 and 2 workers, GPU path's workers with 1), on PREFIX or on generated JPEGs.

Examples::

    python tools/bench_data.py
    python tools/bench_data.py --decode data/emoji_demo/train \
        --tokenizer-model data/emoji_demo/tokenizer.model
    python tools/bench_data.py --decode --samples 500 --source-size 256
    python tools/bench_data.py --samples 2048 --workers 4 --repeats 3 --json
"""

from __future__ import annotations

import argparse
import filecmp
import gc
import io
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Only the standard library at module level: worker processes are spawned, and spawning
# re-imports this module in each of them, so anything imported here would be charged to the
# start-up of the preprocessing pool and of both loaders' workers (torch alone takes seconds).
if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

# -- synthetic corpus ------------------------------------------------------------------------------
COLORS = [("red", "红色"), ("blue", "蓝色"), ("green", "绿色"), ("yellow", "黄色"),
          ("white", "白色"), ("black", "黑色"), ("orange", "橙色"), ("purple", "紫色"),
          ("brown", "棕色"), ("grey", "灰色")]
THINGS = [("ball", "球"), ("box", "盒子"), ("kite", "风筝"), ("car", "汽车"), ("cup", "杯子"),
          ("house", "房子"), ("boat", "小船"), ("flower", "花"), ("lamp", "灯"), ("book", "书")]
SIZES = [("small", "小"), ("large", "大"), ("tiny", "很小"), ("huge", "巨大")]
PLACES = [("on a beach", "在海滩上"), ("in a garden", "在花园里"), ("on a table", "在桌子上"),
          ("in the snow", "在雪地里"), ("near a river", "在河边"),
          ("in a city street", "在城市街道上")]
LIGHT = [("at sunset", "日落时"), ("in the morning", "早晨"), ("at night", "夜里"),
         ("on a cloudy day", "阴天")]


def make_caption(rng: random.Random):
    """An English and a Chinese caption describing the same (imaginary) scene."""
    (c1, c1z), (c2, c2z) = rng.sample(COLORS, 2)
    (t1, t1z), (t2, t2z) = rng.sample(THINGS, 2)
    (s, sz), (p, pz), (lt, ltz) = rng.choice(SIZES), rng.choice(PLACES), rng.choice(LIGHT)
    return (f"a {s} {c1} {t1} next to a {c2} {t2} {p} {lt}",
            f"{ltz}，一个{sz}的{c1z}{t1z}{pz}，旁边是一个{c2z}{t2z}")


def make_image(size: int, rng: np.random.Generator) -> Image.Image:
    """A photo-like picture: smooth multi-scale colour noise, blurred shapes, sensor grain.

    Photos have most of their energy at low frequencies and some fine texture; this mixture
    gives JPEG files of photo-like size (flat colour would compress far better, white noise
    far worse).
    """
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    acc = np.zeros((size, size, 3), dtype=np.float32)
    for k, cells in enumerate((3, 6, 12, 24, 48)):
        small = Image.fromarray(rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8))
        acc += np.asarray(small.resize((size, size), Image.BICUBIC), dtype=np.float32) / 2 ** k
    acc = (acc - acc.min()) / max(float(np.ptp(acc)), 1e-6) * 255.0
    img = Image.fromarray(acc.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = rng.integers(0, size, 2)
        w, h = rng.integers(size // 8, size // 2, 2)
        box = (int(x0), int(y0), int(x0 + w), int(y0 + h))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    grain = rng.normal(0.0, 4.0, (size, size, 3))
    arr = np.clip(np.asarray(img, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def make_corpus(root: Path, n: int, size: int, seed: int) -> Dict[str, object]:
    """Write ``n`` JPEGs, ``manifest.jsonl`` and ``head.jsonl`` under ``root``."""
    import numpy as np

    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    captions: List[str] = []
    total = 0
    with open(root / "manifest.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
            name = f"images/{i:06d}.jpg"
            make_image(size, nrng).save(root / name, format="JPEG", quality=90)
            total += (root / name).stat().st_size
            en, zh = make_caption(rng)
            captions += [en, zh]
            f.write(json.dumps({"image": name, "captions": [{"text": en, "lang": "en"},
                                                            {"text": zh, "lang": "zh"}]},
                               ensure_ascii=False) + "\n")
    # The first records again as a small manifest, to time a run's fixed costs.
    lines = (root / "manifest.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (root / "head.jsonl").write_text("".join(lines[:max(1, min(32, n // 8))]), encoding="utf-8")
    return {"manifest": str(root / "manifest.jsonl"), "head": str(root / "head.jsonl"),
            "captions": captions, "mean_source_jpeg_bytes": total / n}


# -- the webdataset side ---------------------------------------------------------------------------
def write_shards(prefix: str, out_dir: Path, shards: int) -> Tuple[List[str], List[int]]:
    """Copy every sample of the indexed dataset ``prefix`` into ``shards`` tar shards, in order.

    Contiguous runs of samples go to each shard (as a sharding tool would write them); the JSON
    member carries the sample's index so that the loader can seed it as ``ImageTextDataset`` does.
    """
    import numpy as np
    import webdataset as wds

    from megatron_m2.data.indexed import ImageTextIndexedDataset

    ds = ImageTextIndexedDataset(prefix)
    bounds = np.linspace(0, len(ds), shards + 1).round().astype(int)
    urls, sizes = [], []
    for s in range(shards):
        url = str(out_dir / f"shard-{s:04d}.tar")
        with wds.TarWriter(url) as sink:
            for i in range(bounds[s], bounds[s + 1]):
                sample = ds[int(i)]
                meta = {"index": int(i), "captions": [{"lang": lang, "ids": ids.tolist()}
                                                      for lang, ids in sample.captions]}
                sink.write({"__key__": f"{i:08d}", "jpg": sample.image,
                            "json": json.dumps(meta).encode("utf-8")})
        urls.append(url)
        sizes.append(int(bounds[s + 1] - bounds[s]))
    return urls, sizes


class WdsSample:
    """One webdataset sample → the same dict of tensors ``ImageTextDataset.get`` returns.

    Same seed derivation (``(seed, epoch 0, index)``), same order of random draws (caption
    first, then the image transform), same decode (PIL open + ``convert("RGB")``) and same
    padding, so that the per-sample work is identical and only the loading machinery differs.
    A module-level class so that it pickles into spawned workers.
    """

    def __init__(self, tokenizer, transform, text_length: int, seed: int):
        self.tokenizer, self.transform = tokenizer, transform
        self.text_length, self.seed = text_length, seed

    def __call__(self, sample: Dict[str, bytes]) -> Dict[str, torch.Tensor]:
        import torch
        from PIL import Image

        from megatron_m2.data.dataset import _mix

        meta = json.loads(sample["json"])
        rng = random.Random(_mix(self.seed, 0, meta["index"]))
        caps = meta["captions"]  # caption policy "any", as ours: uniform over the captions
        cap = caps[rng.randrange(len(caps))]
        text_ids, pad = self.tokenizer.pad([cap["ids"]], max_length=self.text_length)
        with Image.open(io.BytesIO(sample["jpg"])) as img:
            image = self.transform(img.convert("RGB"), rng)
        lang = cap["lang"]
        return {"images": image, "text_ids": text_ids[0], "text_pad_mask": pad[0],
                "lang": torch.tensor(0 if lang == "en" else 1 if lang == "zh" else 2)}


def collate(samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """``build_loader``'s collate, after dropping the ``__key__`` that ``wds``'s ``map`` puts
    back into the mapped dict, so that both loaders yield the same batch."""
    from megatron_m2.data.dataset import _collate

    return _collate([{k: v for k, v in s.items() if not k.startswith("__")} for s in samples])


def wds_pipeline(urls: List[str], mapper: WdsSample, batch: int):
    import webdataset as wds

    return (wds.WebDataset(urls, shardshuffle=False, nodesplitter=None,
                           workersplitter=wds.split_by_worker)
            .map(mapper)
            .batched(batch, collation_fn=collate, partial=False))


def wds_batches_per_pass(shard_sizes: List[int], workers: int, batch: int) -> int:
    """Full batches one pass yields: each worker batches its own shards (``urls[w::W]``)."""
    streams = [shard_sizes[w::workers] for w in range(workers)] if workers else [shard_sizes]
    return sum(sum(s) // batch for s in streams)


def wds_loader(urls, mapper, batch: int, workers: int):
    import torch

    # Same worker machinery as build_loader: spawn, prefetch 2; batching is done in the pipeline.
    return torch.utils.data.DataLoader(
        wds_pipeline(urls, mapper, batch), batch_size=None, num_workers=workers,
        multiprocessing_context="spawn" if workers > 0 else None,
        prefetch_factor=2 if workers > 0 else None)


# -- measurements ----------------------------------------------------------------------------------
def _preprocess_once(manifest: str, prefix: str, tok_model: str, workers: int):
    from megatron_m2.data.preprocess import PreprocessConfig, preprocess

    cfg = PreprocessConfig(tokenizer_model=tok_model, workers=workers)
    t0 = time.perf_counter()
    summary = preprocess([manifest], prefix, cfg, resume=False)
    dt = time.perf_counter() - t0
    if summary.rejected:
        raise RuntimeError(f"preprocessing rejected {summary.rejected} synthetic records")
    return summary.written, dt


def time_preprocess(manifest: str, head: str, prefix: str, tok_model: str, workers: int) -> Dict:
    """End-to-end images/s of a preprocessing run, and its fixed and per-image parts.

    A run pays fixed costs (starting the worker pool, assembling and fsyncing the final files)
    that a few hundred images do not amortise. Timing a run over the first few records
    (``head``) as well separates them: ``fixed_s`` ~ the head run's time, and
    ``steady_images_per_s`` = extra images / extra seconds of the full run (None when noise on
    a busy machine makes the difference meaningless).
    """
    n, dt = _preprocess_once(manifest, prefix, tok_model, workers)
    n0, dt0 = _preprocess_once(head, prefix + "-head", tok_model, workers)
    ips = n / dt
    steady = (n - n0) / (dt - dt0) if n > n0 and dt > dt0 else None
    return {"images_per_s": round(ips, 2), "per_worker": round(ips / workers, 2),
            "seconds": round(dt, 3), "written": n, "fixed_s": round(dt0, 3),
            "steady_images_per_s": None if steady is None else round(steady, 2),
            "steady_per_worker": None if steady is None else round(steady / workers, 2)}


def _shapes(b: Dict[str, torch.Tensor]):
    return {k: (tuple(v.shape), v.dtype) for k, v in b.items()}


def _cpu_seconds(pids: List[int]) -> Optional[float]:
    """User + system CPU time of processes ``pids`` (Linux ``/proc``; None elsewhere)."""
    total = 0
    try:
        for pid in pids:
            with open(f"/proc/{pid}/stat") as f:
                # Fields after the command name (which may hold spaces): utime and stime are
                # the 14th and 15th fields of the line, the 12th and 13th after ")".
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None
    return total / os.sysconf("SC_CLK_TCK")


def time_loader(loader, measured: int, expect, workers: int) -> Dict:
    """Time to the first batch, then samples/s over the next ``measured`` batches.

    Every batch's shapes and dtypes are checked against ``expect``. Besides wall time, the CPU
    time the loader's processes (main + workers) spend in the same window is reported per
    sample: on a machine shared with other jobs it is far steadier than samples/s. It is
    approximate, as the workers keep prefetching at both ends of the window.
    """
    t0 = time.perf_counter()
    it = iter(loader)
    first = next(it)
    # torch keeps the worker processes in a private attribute; without it only the main
    # process's CPU time is counted (flagged by worker_cpu_ms_per_sample = None).
    pids = [w.pid for w in getattr(it, "_workers", [])]
    t1, c1, w1 = time.perf_counter(), time.process_time(), _cpu_seconds(pids)
    if expect is not None and _shapes(first) != expect:
        raise AssertionError(f"batch shapes {_shapes(first)} != expected {expect}")
    samples = 0
    for _ in range(measured):
        b = next(it)
        if expect is not None and _shapes(b) != expect:
            raise AssertionError(f"batch shapes {_shapes(b)} != expected {expect}")
        samples += b["text_ids"].shape[0]
    t2, c2, w2 = time.perf_counter(), time.process_time(), _cpu_seconds(pids)
    worker_ms = (None if workers and (w1 is None or w2 is None or not pids)
                 else 1e3 * ((w2 or 0.0) - (w1 or 0.0)) / samples)
    del it, first, loader  # shut the workers down before the other loader starts
    gc.collect()
    main_ms = 1e3 * (c2 - c1) / samples
    return {"samples_per_s": round(samples / (t2 - t1), 2),
            "first_batch_s": round(t1 - t0, 3), "batches": measured, "samples": samples,
            "seconds": round(t2 - t1, 3), "main_cpu_ms_per_sample": round(main_ms, 3),
            "worker_cpu_ms_per_sample": None if worker_ms is None else round(worker_ms, 3),
            "cpu_ms_per_sample": None if worker_ms is None else round(main_ms + worker_ms, 3)}


def _best(passes: List[Dict]) -> Dict:
    """Each figure's best value over the passes: the least disturbed by other jobs."""
    best = dict(max(passes, key=lambda x: x["samples_per_s"]), passes=len(passes))
    best["first_batch_s"] = min(x["first_batch_s"] for x in passes)
    for key in ("main_cpu_ms_per_sample", "worker_cpu_ms_per_sample", "cpu_ms_per_sample"):
        values = [x[key] for x in passes if x[key] is not None]
        best[key] = min(values) if values else None
    return best


def run(args) -> Dict:
    import numpy as np
    import torch
    import webdataset as wds

    from megatron_m2.data.dataset import GlobalBatchSampler, ImageTextDataset, build_loader
    from megatron_m2.data.indexed import ImageTextIndexedDataset
    from megatron_m2.data.tokenizer import M2Tokenizer, train_tokenizer
    from megatron_m2.data.transforms import train_transform

    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        corpus = make_corpus(root / "corpus", args.samples, args.source_size, args.seed)
        gen_s = time.perf_counter() - t0
        tok_model = train_tokenizer(corpus["captions"], root / "tok", vocab_size=args.vocab_size,
                                    seed=args.seed)

        # megatron-core (the indexed-file writer) takes seconds to import, once per process:
        # import it now so that the first timed run is not charged for it and the second not.
        import megatron.core.datasets.indexed_dataset  # noqa: F401

        pre = {f"workers_{w}": time_preprocess(corpus["manifest"], corpus["head"],
                                               str(root / f"w{w}" / "data"), tok_model, w)
               for w in (1, 2)}
        prefix = str(root / "w2" / "data")
        same_output = all(filecmp.cmp(str(root / "w1" / "data") + ext, prefix + ext,
                                      shallow=False) for ext in (".bin", ".idx"))
        reader = ImageTextIndexedDataset(prefix)
        n = len(reader)
        mean_stored = float(np.mean([len(reader[i].image) for i in range(n)]))

        shard_dir = root / "shards"
        shard_dir.mkdir()
        urls, shard_sizes = write_shards(prefix, shard_dir, args.shards)
        per_pass = wds_batches_per_pass(shard_sizes, args.workers, args.batch)
        measured = min(per_pass, n // args.batch) - 1
        if measured < 1:
            raise SystemExit(f"too few samples: one pass gives {per_pass} full batches of "
                             f"{args.batch} over {args.shards} shards and {args.workers} workers; "
                             f"need at least 2")

        tok = M2Tokenizer(tok_model)
        transform = train_transform(args.image_size, randaugment=(2, 7))
        ours_ds = ImageTextDataset(prefix, tok, transform, args.text_length, seed=args.seed)
        mapper = WdsSample(tok, transform, args.text_length, args.seed)

        # Both paths must compute the same tensors for the same sample.
        check = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None)
        checked = 0
        for sample in check:
            a, b = ours_ds.get(int(json.loads(sample["json"])["index"]), 0), mapper(sample)
            if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
                raise AssertionError(f"loaders disagree on sample {sample['__key__']}")
            checked += 1
            if checked == 4:
                break

        S, L, B = args.image_size, args.text_length, args.batch
        expect = {"images": ((B, 3, S, S), torch.float32), "text_ids": ((B, L), torch.long),
                  "text_pad_mask": ((B, L), torch.bool), "lang": ((B,), torch.long)}
        make = {
            "ours": lambda: build_loader(ours_ds, GlobalBatchSampler(
                n, B, B, 0, 1, seed=args.seed, shuffle=True), args.workers),
            "webdataset": lambda: wds_loader(urls, mapper, B, args.workers),
        }
        load_before = os.getloadavg()[0]
        passes: Dict[str, List[Dict]] = {"ours": [], "webdataset": []}
        for r in range(args.repeats):
            # Alternate the order so that neither loader always runs first (page cache, a
            # machine that is busier at the start or the end of the run).
            for name in (("ours", "webdataset") if r % 2 == 0 else ("webdataset", "ours")):
                passes[name].append(time_loader(make[name](), measured, expect, args.workers))
        load_after = os.getloadavg()[0]
        ours, theirs = (_best(passes[k]) for k in ("ours", "webdataset"))
        cpu_ratio = (round(theirs["cpu_ms_per_sample"] / ours["cpu_ms_per_sample"], 3)
                     if ours["cpu_ms_per_sample"] and theirs["cpu_ms_per_sample"] else None)

    return {
        "preprocess": pre,
        "loader": {"ours": ours, "webdataset": theirs,
                   "ratio": round(ours["samples_per_s"] / theirs["samples_per_s"], 3),
                   "cpu_ratio": cpu_ratio},
        "config": {"samples": args.samples, "source_size": args.source_size,
                   "image_size": S, "batch": B, "workers": args.workers,
                   "shards": args.shards, "text_length": L, "seed": args.seed,
                   "randaugment": [2, 7], "measured_batches": measured,
                   "mean_source_jpeg_bytes": round(corpus["mean_source_jpeg_bytes"]),
                   "mean_stored_jpeg_bytes": round(mean_stored),
                   "tokenizer_pieces": tok.vocab_size, "generate_s": round(gen_s, 3),
                   "preprocess_outputs_identical": same_output, "samples_checked_equal": checked,
                   "repeats": args.repeats, "passes": passes, "cpus": os.cpu_count(),
                   "loadavg_1min": [round(load_before, 2), round(load_after, 2)],
                   "torch": torch.__version__,
                   "webdataset": getattr(wds, "__version__", "?")},
    }


# -- decode: the CPU path against the Pillow decode bound ----------------------------------------
def _per_core(fn, items, min_s: float = 1.0) -> Dict:
    """Items/s of ``fn`` over ``items`` in this process (one thread): by CPU time (per core,
    steady on a shared machine) and by wall time; repeated until ``min_s`` CPU seconds."""
    c0, t0, done = time.process_time(), time.perf_counter(), 0
    while True:
        for i, x in enumerate(items):
            fn(i, x)
        done += len(items)
        if time.process_time() - c0 >= min_s:
            break
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    return {"per_core": round(done / cpu, 1), "wall": round(done / wall, 1), "items": done,
            "ms_per_item": round(1e3 * cpu / done, 3)}


def run_decode(args, prefix: str, tok_model: str) -> Dict:
    """(a) Pillow decode alone, (b) decode + train transform, per core, and the GPU path's worker
    half; (c) the whole loader (CPU path) with 1 and 2 workers, and the GPU path's with 1."""
    import numpy as np
    import torch
    from PIL import Image

    from megatron_m2.data.dataset import GlobalBatchSampler, ImageTextDataset, build_loader
    from megatron_m2.data.gpu_decode import EncodedTrainTransform
    from megatron_m2.data.indexed import ImageTextIndexedDataset
    from megatron_m2.data.tokenizer import M2Tokenizer
    from megatron_m2.data.transforms import train_transform

    torch.set_num_threads(1)  # per core: as in a loader worker
    reader = ImageTextIndexedDataset(prefix)
    blobs = [reader[i].image for i in range(min(args.samples, len(reader)))]
    with Image.open(io.BytesIO(blobs[0])) as im:
        first = {"size": list(im.size), "format": im.format, "mode": im.mode}
    S = args.image_size
    ra, plain = train_transform(S, randaugment=(2, 7)), train_transform(S, randaugment=None)
    enc = EncodedTrainTransform.from_train_transform(plain)

    def decode(i, b):
        with Image.open(io.BytesIO(b)) as im:
            return im.convert("RGB")

    per_core = {
        "pillow_decode": _per_core(decode, blobs),
        "decode_transform_randaugment": _per_core(
            lambda i, b: ra(decode(i, b), random.Random(i)), blobs),
        "decode_transform": _per_core(lambda i, b: plain(decode(i, b), random.Random(i)), blobs),
        "gpu_path_worker": _per_core(lambda i, b: enc(b, random.Random(i)), blobs),
    }
    tok = M2Tokenizer(tok_model)
    B, n = args.batch, len(reader)
    measured = max(1, min(n, args.samples) // B - 1)
    loaders = {}
    for name, transform, workers in (("cpu_randaugment", ra, 1), ("cpu_randaugment", ra, 2),
                                     ("cpu", plain, 2), ("gpu_path", enc, 1)):
        ds = ImageTextDataset(prefix, tok, transform, args.text_length, seed=args.seed)
        sampler = GlobalBatchSampler(n, B, B, 0, 1, seed=args.seed)
        loaders[f"{name}_workers_{workers}"] = time_loader(
            build_loader(ds, sampler, workers), measured, None, workers)
    return {"per_core": per_core, "loader": loaders,
            "config": {"prefix": prefix, "samples": len(blobs), "dataset_samples": n,
                       "image": first, "mean_jpeg_bytes": round(float(np.mean(
                           [len(b) for b in blobs]))), "image_size": S, "batch": B,
                       "measured_batches": measured, "cpus": os.cpu_count(),
                       "loadavg_1min": round(os.getloadavg()[0], 2),
                       "torch": torch.__version__}}


def decode_dataset(args, tmp: Path) -> Tuple[str, str]:
    """``--decode``'s dataset: the one given, or ``--samples`` photo-like JPEGs at
    ``--source-size`` px preprocessed at quality 90 under ``tmp``."""
    if args.decode != "generate":
        if not args.tokenizer_model:
            raise SystemExit("--decode PREFIX needs --tokenizer-model")
        return args.decode, args.tokenizer_model
    from megatron_m2.data.preprocess import PreprocessConfig, preprocess
    from megatron_m2.data.tokenizer import train_tokenizer

    corpus = make_corpus(tmp / "corpus", args.samples, args.source_size, args.seed)
    tok = train_tokenizer(corpus["captions"], tmp / "tok", vocab_size=args.vocab_size,
                          seed=args.seed)
    cfg = PreprocessConfig(tokenizer_model=tok, workers=2, jpeg_quality=90)
    preprocess([corpus["manifest"]], str(tmp / "data"), cfg, resume=False)
    return str(tmp / "data"), tok


def print_decode_table(r: Dict) -> None:
    c = r["config"]
    print(f"{c['samples']} images of {c['prefix']} ({c['image']['size'][0]}x"
          f"{c['image']['size'][1]} {c['image']['format']}, mean {c['mean_jpeg_bytes'] / 1024:.1f}"
          f" KiB) -> {c['image_size']} px; {c['cpus']} CPUs, load {c['loadavg_1min']}")
    print(f"\n{'per core (1 thread)':<32}{'img/s CPU':>11}{'img/s wall':>12}{'ms/img':>9}")
    for k, x in r["per_core"].items():
        print(f"{k:<32}{x['per_core']:>11.1f}{x['wall']:>12.1f}{x['ms_per_item']:>9.3f}")
    print(f"\n{'loader':<32}{'samples/s':>11}{'CPU ms/sample':>15}")
    for k, x in r["loader"].items():
        cpu = "n/a" if x["cpu_ms_per_sample"] is None else f"{x['cpu_ms_per_sample']:.2f}"
        print(f"{k:<32}{x['samples_per_s']:>11.1f}{cpu:>15}")


def print_table(r: Dict) -> None:
    c = r["config"]
    print(f"{c['samples']} samples: {c['source_size']} px JPEG (mean "
          f"{c['mean_source_jpeg_bytes'] / 1024:.1f} KiB, stored "
          f"{c['mean_stored_jpeg_bytes'] / 1024:.1f} KiB) -> {c['image_size']} px, "
          f"RandAugment(2,7), batch {c['batch']}, {c['workers']} loader workers, "
          f"{c['cpus']} CPUs")
    print(f"\n{'preprocess':<12}{'workers':>8}{'images/s':>11}{'per worker':>12}{'seconds':>9}"
          f"{'fixed s':>9}{'steady img/s':>14}{'per worker':>12}")
    for key, p in r["preprocess"].items():
        steady = ("n/a", "n/a") if p["steady_images_per_s"] is None else (
            f"{p['steady_images_per_s']:.1f}", f"{p['steady_per_worker']:.1f}")
        print(f"{'':<12}{key.split('_')[1]:>8}{p['images_per_s']:>11.1f}"
              f"{p['per_worker']:>12.1f}{p['seconds']:>9.2f}{p['fixed_s']:>9.2f}"
              f"{steady[0]:>14}{steady[1]:>12}")
    print("  fixed s: a run over the first few records (pool start-up, assembly, fsync); steady: "
          "the rest")
    print(f"  outputs of 1 and 2 workers byte-identical: {c['preprocess_outputs_identical']}")
    print(f"\n{'loader':<12}{'samples/s':>11}{'first batch s':>15}{'batches':>9}{'seconds':>9}"
          f"{'CPU ms/sample':>15}")
    for name in ("ours", "webdataset"):
        x = r["loader"][name]
        cpu = "n/a" if x["cpu_ms_per_sample"] is None else f"{x['cpu_ms_per_sample']:.2f}"
        print(f"{name:<12}{x['samples_per_s']:>11.1f}{x['first_batch_s']:>15.2f}"
              f"{x['batches']:>9}{x['seconds']:>9.2f}{cpu:>15}")
    cpu_ratio = r["loader"]["cpu_ratio"]
    print(f"  ratio ours / webdataset: {r['loader']['ratio']:.3f} samples/s"
          + ("" if cpu_ratio is None else f", {cpu_ratio:.3f} samples per CPU second"))
    print(f"  {c['samples_checked_equal']} samples checked equal across loaders; "
          f"{c['shards']} shards; CPU = main + worker processes over the timed batches")
    best = f"best of {c['repeats']} alternating passes each; " if c["repeats"] > 1 else ""
    print(f"  {best}1-min load average {c['loadavg_1min'][0]:.2f} before the loaders, "
          f"{c['loadavg_1min'][1]:.2f} after ({c['cpus']} CPUs)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--image-size", type=int, default=224, help="training crop side")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="loader worker processes")
    p.add_argument("--source-size", type=int, default=320, help="side of the generated images")
    p.add_argument("--shards", type=int, default=4, help="webdataset tar shards")
    p.add_argument("--text-length", type=int, default=52, help="padded caption length")
    p.add_argument("--vocab-size", type=int, default=1000, help="tokenizer size (soft limit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1,
                   help="loader passes each, alternating; the best pass is reported")
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    p.add_argument("--decode", nargs="?", const="generate", default=None, metavar="PREFIX",
                   help="instead: decode rates per core against the Pillow bound and the loader "
                        "with 1 and 2 workers, on dataset PREFIX (with --tokenizer-model) or on "
                        "--samples generated JPEGs of --source-size px (quality 90)")
    p.add_argument("--tokenizer-model", default=None, help="--decode PREFIX's tokenizer")
    args = p.parse_args(argv)
    if args.decode is not None:
        import logging
        logging.getLogger("megatron_m2").setLevel(logging.ERROR)
        with tempfile.TemporaryDirectory(prefix="bench_decode_") as tmp:
            result = run_decode(args, *decode_dataset(args, Path(tmp)))
        print(json.dumps(result)) if args.json else print_decode_table(result)
        return 0
    try:
        import webdataset  # noqa: F401
    except ImportError:
        raise SystemExit("bench_data needs the webdataset package (pip install webdataset)")
    if min(args.samples, args.batch, args.shards, args.repeats) < 1 or args.workers < 0:
        raise SystemExit("--samples, --batch, --shards and --repeats must be positive, "
                         "--workers >= 0")

    import logging
    logging.basicConfig(level=logging.WARNING)  # keep the tokenizer's size warning quiet
    logging.getLogger("megatron_m2").setLevel(logging.ERROR)
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
