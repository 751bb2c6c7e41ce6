#!/usr/bin/env python3
"""Training throughput and MFU of ``m2-pretrain`` steps on one device, per flavor and precision.

For every requested flavor and precision the full training step of
:class:`megatron_m2.training.trainer.Trainer` (megatron DDP, megatron optimizer, the
forward/backward schedule) runs in a world of one (TP=1, PP=1, DP=1) on synthetic data (by
default one global batch built once and trained on every step, ``--data cached``, so that making
random images on the host is not timed): ``--warmup`` untimed steps, then ``--iters`` timed
steps (``torch.cuda.synchronize()`` before and after each on CUDA). Reported per row:

* the median step time and ``samples/s = global batch / median step time``;
* achieved TFLOP/s = model FLOPs per step / median step time, where the model FLOPs per step
  (forward + backward = 3 x forward, no recomputation, no FP8 padding) are the planner's
  (:func:`megatron_m2.planner.make_plan`, ``flops["model_flops_per_step"]``);
* MFU = achieved / peak TFLOP/s of the precision (``--peak-tflops``, or the table
  :data:`PEAK_TFLOPS` by GPU name; on CPU only the flag, else null);
* peak memory (``torch.cuda.max_memory_allocated``) on CUDA.

Precisions: ``bf16`` (``--bf16``), ``fp8`` (``--bf16 --transformer-impl te --fp8-format hybrid
--fp8-recipe delayed``; needs Transformer Engine, otherwise the row is reported as skipped with
m2-pretrain's message) and ``fp32`` (no flag; what the CPU plumbing test uses). ``--device cpu``
runs the same code on CPU (gloo world of one and the CPU compatibility layer, as m2-pretrain).

``--variants`` adds rows of the scale features, each against the layout it changes (names
below; ``base`` is the plain world of one): ``patch-dropout`` (``--image-mask-ratio 0.5``),
``accumulate`` (``--itc-accumulate-features``); on two devices ``tp2`` / ``tp2-sp``
(``--sequence-parallel``), ``dp2`` / ``dp2-overlap`` (``--use-distributed-optimizer
--overlap-grad-reduce --overlap-param-gather``) and ``pp2`` / ``pp2-vpp``
(``--num-layers-per-virtual-pipeline-stage``, two chunks per stage). A variant's global batch is
``micro-batch × DP × micro-batches`` (``--micro-batches``, at least 2 × PP on a pipeline and 2
with feature accumulation); its model FLOPs are the planner's for that layout (patch dropout
shrinks them), and MFU divides by the peak of all its devices. A variant that needs more
devices than there are is reported as skipped.

Every (flavor, precision, variant) runs in its own spawned processes under ``--timeout``, so
that an error, a CUDA out-of-memory or a crash of one row leaves the others running. The exit
status is 0 when every row ran or was skipped, 1 otherwise.

Examples::

    python tools/bench_gpu.py                                   # tiny and 0.4b, bf16 and fp8
    python tools/bench_gpu.py --flavors 0.4b --precisions bf16 --micro-batch-size 128 --json
    python tools/bench_gpu.py --device cpu --flavors tiny --precisions fp32 --iters 2
    python tools/bench_gpu.py --decode                          # GPU vs CPU image decode
    python tools/bench_gpu.py --flavors 0.4b --precisions bf16 \
        --variants base patch-dropout tp2 tp2-sp dp2 dp2-overlap pp2 pp2-vpp

``--decode`` measures instead the data path of ``m2-pretrain --image-decode gpu``: decode +
train transform samples/s of the CPU path (Pillow, one core, with and without RandAugment), of
the GPU path's worker half (per core) and of its main-process half on the GPU (nvJPEG batched
decode via torchvision, crop/resize/flip/normalise), and nvJPEG decode alone. Without CUDA the
GPU half runs on CPU tensors with a Pillow decoder (plumbing only, not a GPU figure).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import re
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

PRECISIONS = ("bf16", "fp8", "fp32")
FP8_FLAGS = ["--fp8-format", "hybrid", "--fp8-recipe", "delayed"]
"""The FP8 request of m2-pretrain (with ``--transformer-impl te``)."""

# Dense (no structured sparsity) tensor-core peaks in TFLOP/s as (name pattern, BF16, FP8).
# Source: NVIDIA's H100 and H200 datasheets list the SXM parts at 1,979 BF16 and 3,958 FP8
# TFLOP/s *with sparsity*, i.e. 989 and 1,979 dense (H200 has H100 SXM's compute); the A100
# datasheet lists 312 dense BF16 (SXM4 and PCIe alike) and A100 has no FP8. The PCIe and NVL
# parts of H100/H200 run at lower clocks and are not in the table: pass --peak-tflops.
PEAK_TFLOPS: Tuple[Tuple[str, float, Optional[float]], ...] = (
    (r"\bH(100|200)\b(?!.*\b(PCIe|NVL)\b)", 989.0, 1979.0),
    (r"\bA100\b", 312.0, None),
)
PEAK_SOURCE = "NVIDIA datasheets, dense"

# Micro-batch per flavor (the global batch defaults to one micro-batch): sized for an 80+ GB GPU,
# and small enough on CPU to finish in minutes.
DEFAULT_BATCH = {"cuda": {"tiny": 256, "0.4b": 64, "1b": 32, "10b": 4},
                 "cpu": {"tiny": 16, "0.4b": 2, "1b": 1, "10b": 1}}
GB = 1e9


# == peaks and FLOPs (parent process) ============================================================
def table_peaks(device_name: str) -> Optional[Dict[str, Optional[float]]]:
    """Dense BF16 and FP8 peaks of a GPU from :data:`PEAK_TFLOPS`, or None if not listed."""
    for pattern, bf16, fp8 in PEAK_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return {"bf16": bf16, "fp8": fp8}
    return None


def resolve_peaks(device: str, device_name: str, peak: Optional[float],
                  peak_fp8: Optional[float]) -> Tuple[Dict[str, Optional[float]], str]:
    """Peak TFLOP/s per precision and where they come from.

    ``--peak-tflops`` is the dense peak of the bf16 and fp32 rows, and ``--peak-tflops-fp8`` that
    of the fp8 rows (default: twice ``--peak-tflops``, the planner's convention). Without the
    flags a GPU's peaks come from :data:`PEAK_TFLOPS` (bf16 and fp8 only: fp32 rows get none);
    on CPU, or for a precision the table lacks, the peak is None (MFU reported as null).
    Raises ``ValueError`` for a GPU that is not in the table when no flag is given.
    """
    if peak is not None or peak_fp8 is not None:
        fp8 = peak_fp8 if peak_fp8 is not None else (2 * peak if peak is not None else None)
        return {"bf16": peak, "fp32": peak, "fp8": fp8}, "--peak-tflops"
    if device == "cpu":
        return {p: None for p in PRECISIONS}, "none (CPU: pass --peak-tflops)"
    found = table_peaks(device_name)
    if found is None:
        raise ValueError(f"no peak TFLOP/s known for {device_name!r}: pass --peak-tflops (dense "
                         f"BF16) and optionally --peak-tflops-fp8")
    return {"bf16": found["bf16"], "fp8": found["fp8"], "fp32": None}, \
        f"{PEAK_SOURCE} ({device_name})"


VARIANTS: Dict[str, Dict] = {
    "base": {"tp": 1, "pp": 1, "dp": 1, "flags": []},
    "patch-dropout": {"tp": 1, "pp": 1, "dp": 1, "flags": ["--image-mask-ratio", "0.5"],
                      "layout": {"image_mask_ratio": 0.5}},
    "accumulate": {"tp": 1, "pp": 1, "dp": 1, "flags": ["--itc-accumulate-features"],
                   "min_micro_batches": 2},
    "tp2": {"tp": 2, "pp": 1, "dp": 1, "flags": []},
    "tp2-sp": {"tp": 2, "pp": 1, "dp": 1, "flags": ["--sequence-parallel"]},
    "dp2": {"tp": 1, "pp": 1, "dp": 2, "flags": ["--use-distributed-optimizer"]},
    "dp2-overlap": {"tp": 1, "pp": 1, "dp": 2,
                    "flags": ["--use-distributed-optimizer", "--overlap-grad-reduce",
                              "--overlap-param-gather"]},
    "pp2": {"tp": 1, "pp": 2, "dp": 1, "flags": []},
    "pp2-vpp": {"tp": 1, "pp": 2, "dp": 1, "flags": [], "virtual_chunks": 2},
}
"""Scale-feature rows (``--variants``): model-parallel sizes, DP, m2-pretrain flags, planner
layout fields; ``virtual_chunks``: an interleaved pipeline of that many chunks per stage."""


def variant_flags(variant: str, flavor: str) -> List[str]:
    """m2-pretrain flags of ``variant`` for ``flavor`` (layout sizes included)."""
    from megatron_m2.flavors import get_flavor

    v = VARIANTS[variant]
    cfg = get_flavor(flavor)
    flags = ["--tensor-model-parallel-size", str(v["tp"]),
             "--pipeline-model-parallel-size", str(v["pp"])] + list(v["flags"])
    if v.get("virtual_chunks"):
        per_chunk = cfg.num_layers // (v["pp"] * v["virtual_chunks"])
        flags += ["--num-layers-per-virtual-pipeline-stage", str(max(per_chunk, 1))]
    if v["pp"] > 1:
        # The backbone heads need the backbone/VL boundary in the last model chunk; where the
        # interleaved row's chunks are too short for that (the tiny flavor), both pipeline
        # rows train the VL heads only, so that they stay comparable.
        chunk = cfg.num_layers // (v["pp"] * VARIANTS["pp2-vpp"]["virtual_chunks"])
        if cfg.num_vl_layers > chunk:
            flags += ["--itc-heads", "vl"]
    return flags


def model_flops_per_step(flavor: str, micro_batch: int, global_batch: int,
                         variant: str = "base") -> int:
    """Model FLOPs of one training step of ``variant`` (forward + backward), from the planner.

    Model FLOPs do not depend on the precision (FP8's padding of the sequence is hardware work,
    not model work), so the plan is made for bf16. They do not depend on TP/PP/DP either, but
    on what the step computes: patch dropout's shorter vision sequence shrinks them.
    """
    from megatron_m2.flavors import get_flavor
    from megatron_m2.planner import Cluster, Layout, make_plan

    v = VARIANTS[variant]
    world = v["tp"] * v["pp"] * v["dp"]
    plan = make_plan(get_flavor(flavor),
                     Layout(tp=v["tp"], pp=v["pp"], micro_batch=micro_batch,
                            global_batch=global_batch, **v.get("layout", {})),
                     Cluster(nodes=1, gpus_per_node=world), model_name=flavor)
    if plan.errors:
        raise ValueError("; ".join(plan.errors))
    return int(plan.flops["model_flops_per_step"])


def make_row(job: Dict, result: Dict, flops: int, peak: Optional[float]) -> Dict:
    """One output row from a worker's result: step time, samples/s, TFLOP/s, MFU, memory."""
    row = {"flavor": job["flavor"], "precision": job["precision"],
           "variant": job.get("variant", "base"), "world": job.get("world", 1),
           "mbs": job["mbs"], "gbs": job["gbs"], "step_ms": None, "step_ms_min": None,
           "samples_per_s": None,
           "flops_per_step": flops, "tflops": None, "peak_tflops": peak, "mfu": None,
           "peak_mem_gb": None, "params": None, "status": result["status"],
           "reason": result.get("reason")}
    if result["status"] != "ok":
        return row
    median = statistics.median(result["step_s"])
    tflops = flops / median / 1e12
    world = job.get("world", 1)
    row.update(step_ms=median * 1e3, step_ms_min=min(result["step_s"]) * 1e3,
               samples_per_s=job["gbs"] / median, tflops=tflops,
               mfu=tflops / (peak * world) if peak else None, params=result.get("params"))
    if result.get("peak_mem_bytes") is not None:
        row["peak_mem_gb"] = result["peak_mem_bytes"] / GB
    return row


# == one row (worker process) ====================================================================
def trainer_argv(job: Dict) -> List[str]:
    """``m2-pretrain`` arguments of a row (the LR schedule outlasts every step run)."""
    argv = ["--synthetic", "--flavor", job["flavor"],
            "--micro-batch-size", str(job["mbs"]), "--global-batch-size", str(job["gbs"]),
            "--train-iters", str(job["warmup"] + job["iters"] + 1)]
    argv += variant_flags(job.get("variant", "base"), job["flavor"])  # layout, then precision
    if job["precision"] in ("bf16", "fp8"):
        argv.append("--bf16")
    if job["precision"] == "fp8":
        argv += ["--transformer-impl", "te"] + FP8_FLAGS
    return argv


def _device_name(device: str) -> str:
    """The GPU's name, or the CPU's model name."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _measure(job: Dict) -> Dict:
    """Build the Trainer for ``job`` and time its steps; a configuration the trainer rejects
    (e.g. FP8 without Transformer Engine) comes back as skipped with the trainer's message."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    from megatron_m2.config import ConfigError
    from megatron_m2.training.arguments import build_parser
    from megatron_m2.training.validation import validate_args

    args = build_parser().parse_args(trainer_argv(job))
    world, rank = job.get("world", 1), job.get("rank", 0)
    try:
        validate_args(args, world)
    except ConfigError as e:
        return {"status": "skipped", "reason": str(e)}

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(job["port"]))
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    from megatron_m2.parallel.distributed import destroy, init_distributed
    from megatron_m2.training.trainer import Trainer

    init_distributed(timeout_s=job["timeout"])  # NCCL on CUDA; gloo + the CPU layer on CPU
    try:
        try:
            trainer = Trainer(args)
        except ConfigError as e:
            return {"status": "skipped", "reason": str(e)}
        if job["data"] == "cached":
            # The synthetic set is one global batch (m2-pretrain's default size), so every step
            # trains on the same samples: build them once, so that the host's generation of
            # random images (~0.1 s per step for 0.4b at 64 samples) is not timed as training.
            batches = trainer._microbatches()
            trainer._microbatches = lambda: batches
        cuda = job["device"] == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        for _ in range(job["warmup"]):
            trainer.train_step()
        times = []
        for _ in range(job["iters"]):
            sync()
            t0 = time.perf_counter()
            trainer.train_step()
            sync()
            times.append(time.perf_counter() - t0)
        return {"status": "ok", "step_s": times,
                "params": sum(p.numel() for p in trainer.model.parameters()),
                "peak_mem_bytes": torch.cuda.max_memory_allocated() if cuda else None}
    finally:
        destroy()


def _worker(job: Dict, q) -> None:
    """Entry point of a row's process: put exactly one result on ``q``."""
    # Keep stdout for the report (--json): the worker's prints go to stderr.
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        result = _measure(job)
    except BaseException as e:  # noqa: BLE001 - every failure becomes the row's status
        oom = isinstance(e, torch.cuda.OutOfMemoryError)
        lines = [s for s in traceback.format_exception_only(type(e), e)[-1].splitlines() if s]
        result = {"status": "oom" if oom else "error",
                  "reason": lines[0] if lines else type(e).__name__,
                  "traceback": traceback.format_exc()}
    q.put(result)


def _probe(job: Dict, q) -> None:
    """Entry point of the device probe: the device name, without a CUDA context in the parent."""
    q.put({"status": "ok", "name": _device_name(job["device"])})


def run_in_process(target, job: Dict, timeout: float) -> Dict:
    """Run ``target(job, queue)`` in fresh spawned processes, one per rank of ``job["world"]``
    (default 1; each gets ``job["rank"]``); rank 0's result with the largest peak memory of
    all ranks, or the first failure of any rank (an error, a timeout past ``timeout`` seconds,
    a process that died without a result)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    world = job.get("world", 1)
    procs = [ctx.Process(target=_tag_rank, args=(target, dict(job, rank=r), q), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    results: Dict[int, Dict] = {}
    failure = None
    try:
        while len(results) < world and failure is None:
            try:
                rank, result = q.get(timeout=1.0)
                results[rank] = result
                if result["status"] != "ok":
                    failure = result
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in results]
                if dead:
                    try:  # a result put just before the process ended
                        rank, result = q.get(timeout=5.0)
                        results[rank] = result
                        if result["status"] != "ok":
                            failure = result
                        continue
                    except queue.Empty:
                        code = procs[dead[0]].exitcode
                        why = (f"killed by signal {-code} (host out of memory?)" if code < 0
                               else f"exit code {code}")
                        failure = {"status": "error",
                                   "reason": f"worker (rank {dead[0]}) ended without a result: "
                                             f"{why}"}
                elif time.monotonic() > deadline:
                    failure = {"status": "timeout", "reason": f"no result within {timeout:g} s"}
    finally:
        for p in procs:
            if failure is not None and p.is_alive():
                p.terminate()
            p.join(timeout=60)  # a finished worker is tearing its process group down
            if p.is_alive():
                p.kill()
                p.join()
    if failure is not None:
        return failure
    result = dict(results[0])
    mems = [r.get("peak_mem_bytes") for r in results.values() if r.get("peak_mem_bytes")]
    if mems:
        result["peak_mem_bytes"] = max(mems)
    return result


class _RankQueue:
    """The queue a rank's worker puts its result on, tagged with the rank."""

    def __init__(self, q, rank: int):
        self.q, self.rank = q, rank

    def put(self, result) -> None:
        self.q.put((self.rank, result))


def _tag_rank(target, job: Dict, q) -> None:
    target(job, _RankQueue(q, job.get("rank", 0)))


# == report ======================================================================================
def _fmt(value, spec: str) -> str:
    """``value`` formatted, or ``-`` for a missing figure."""
    return "-" if value is None else format(value, spec)


def print_table(report: Dict) -> None:
    """The human-readable report."""
    pk = report["peak_tflops"]
    te = report["transformer_engine"] or "not installed"
    print(f"m2-pretrain training step on one {report['device_type']} device: "
          f"{report['device']}; torch {report['torch']}, Transformer Engine {te}")
    w = report["warmup"]
    data = "built once" if report["data"] == "cached" else "regenerated every step"
    print(f"TP=1 PP=1 DP=1 unless the variant says, synthetic data ({data}), median of "
          f"{report['iters']} "
          f"steps after {w} warm-up step{'' if w == 1 else 's'}; model FLOPs from the planner "
          f"(3 x forward); peak TFLOP/s bf16 {_fmt(pk['bf16'], 'g')}, fp8 {_fmt(pk['fp8'], 'g')}, "
          f"fp32 {_fmt(pk['fp32'], 'g')} ({report['peak_source']})")
    print(f"\n{'flavor':<7}{'prec':<6}{'variant':<15}{'mbs':>5}{'gbs':>6}{'step ms':>10}"
          f"{'samples/s':>11}"
          f"{'TFLOP/s':>10}{'MFU':>8}{'peak GB':>9}  status")
    for r in report["rows"]:
        mfu = None if r["mfu"] is None else 100 * r["mfu"]
        pct = " " if mfu is None else "%"
        status = r["status"] + (f": {r['reason']}" if r["reason"] else "")
        print(f"{r['flavor']:<7}{r['precision']:<6}{r['variant']:<15}{r['mbs']:>5}{r['gbs']:>6}"
              f"{_fmt(r['step_ms'], '.2f'):>10}{_fmt(r['samples_per_s'], '.1f'):>11}"
              f"{_fmt(r['tflops'], '.4g'):>10}{_fmt(mfu, '.1f'):>7}{pct}"
              f"{_fmt(r['peak_mem_gb'], '.2f'):>9}  {status}")


def _te_version() -> Optional[str]:
    """Installed Transformer Engine version (read without importing it), or None."""
    from importlib import metadata

    for dist_name in ("transformer_engine", "transformer-engine"):
        try:
            return metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            continue
    return None


# -- --decode: the GPU decode path against the CPU path -------------------------------------------
def decode_images(n: int, size: int, seed: int = 0) -> List[bytes]:
    """``n`` photo-like ``size`` px JPEGs (quality 90): smooth colour fields plus grain."""
    import io

    import numpy as np
    from PIL import Image

    rng, out = np.random.default_rng(seed), []
    for _ in range(n):
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        arr = np.asarray(small.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
        arr = np.clip(arr + rng.normal(0.0, 6.0, arr.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _rate(fn, n: int, sync=None, min_s: float = 1.0) -> Dict:
    """Items/s of ``fn()`` (which handles ``n`` items): wall time and, for CPU work, per core."""
    fn()  # warm-up (CUDA context, nvJPEG handles, kernels)
    if sync:
        sync()
    c0, t0, done = time.process_time(), time.perf_counter(), 0
    while time.perf_counter() - t0 < min_s:
        fn()
        done += n
    if sync:
        sync()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"samples_per_s": round(done / wall, 1), "per_core_cpu": round(done / cpu, 1)}


def run_decode(a, device: str) -> Dict:
    """Decode + train transform samples/s: the CPU path (Pillow, one thread), the GPU path's
    worker half (header, parameters, bytes) and its main-process half on ``device`` (nvJPEG
    batched decode + crop/resize/flip/normalise); on CPU that half runs with a Pillow decoder
    (plumbing only)."""
    import io
    import random

    import numpy as np
    from PIL import Image

    from megatron_m2.data.dataset import _collate
    from megatron_m2.data.gpu_decode import EncodedTrainTransform, GpuBatchDecoder
    from megatron_m2.data.transforms import train_transform

    torch.set_num_threads(1)
    blobs = decode_images(a.decode_samples, a.decode_source_size)
    S, n = a.decode_image_size, len(blobs)
    ra, plain = train_transform(S, randaugment=(2, 7)), train_transform(S, randaugment=None)
    enc = EncodedTrainTransform.from_train_transform(plain)

    def cpu(t):
        return lambda: [t(Image.open(io.BytesIO(b)).convert("RGB"), random.Random(i))
                        for i, b in enumerate(blobs)]

    rows = {"cpu_decode_transform_randaugment": _rate(cpu(ra), n),
            "cpu_decode_transform": _rate(cpu(plain), n),
            "gpu_path_worker": _rate(lambda: [enc(b, random.Random(i))
                                              for i, b in enumerate(blobs)], n)}
    batch = _collate([enc(b, random.Random(i)) for i, b in enumerate(blobs)])
    decode = None
    if device == "cpu":
        def decode(payloads):
            return [torch.from_numpy(np.asarray(Image.open(io.BytesIO(p.numpy().tobytes()))
                                                .convert("RGB")).copy()).permute(2, 0, 1)
                    for p in payloads]
    dec = GpuBatchDecoder.for_transform(enc, device, decode)
    sync = torch.cuda.synchronize if device == "cuda" else None
    rows["gpu_path_decode_transform"] = _rate(lambda: dec(dict(batch)), n, sync)
    if device == "cuda":
        from megatron_m2.data.gpu_decode import load_decode_jpeg

        jpeg = load_decode_jpeg(torch.device(device))
        offsets = batch["image_offsets"].tolist()
        data = [batch["image_data"][offsets[i]:offsets[i + 1]] for i in range(n)]
        rows["gpu_decode_only"] = _rate(lambda: jpeg(data), n, sync)
    return {"device": _device_name(device), "device_type": device, "images": n,
            "source_size": a.decode_source_size, "image_size": S,
            "mean_jpeg_bytes": round(sum(map(len, blobs)) / n), "rows": rows}


def main(argv=None) -> int:
    from megatron_m2.flavors import FLAVORS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--flavors", nargs="+", default=["tiny", "0.4b"], choices=sorted(FLAVORS))
    p.add_argument("--precisions", nargs="+", default=["bf16", "fp8"], choices=PRECISIONS)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="auto: cuda when available")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help=f"for every flavor (default per flavor: {DEFAULT_BATCH})")
    p.add_argument("--global-batch-size", type=int, default=None,
                   help="for every flavor and variant (default: micro-batch size x DP x "
                        "--micro-batches)")
    p.add_argument("--variants", nargs="+", default=["base"], choices=list(VARIANTS),
                   help="scale-feature rows (module docstring); each needs its devices")
    p.add_argument("--micro-batches", type=int, default=1,
                   help="micro-batches per step (raised to 2 x PP on a pipeline and to 2 "
                        "with feature accumulation)")
    p.add_argument("--data", default="cached", choices=["cached", "synthetic"],
                   help="cached: the synthetic global batch is built once and every step "
                        "trains on it; synthetic: regenerated on the host every step, as "
                        "m2-pretrain --synthetic does (the time includes making the images)")
    p.add_argument("--iters", type=int, default=20, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before timing")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense peak TFLOP/s of the bf16 and fp32 rows (default: by GPU name; "
                        "required for GPUs not in the table)")
    p.add_argument("--peak-tflops-fp8", type=float, default=None,
                   help="dense peak TFLOP/s of the fp8 rows (default: 2 x --peak-tflops)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of a CPU run (default: torch's, e.g. OMP_NUM_THREADS)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per row")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--decode", action="store_true",
                   help="instead: decode + train transform samples/s, the GPU decode path "
                        "(--image-decode gpu) against the CPU path")
    p.add_argument("--decode-samples", type=int, default=256, help="--decode: images (a batch)")
    p.add_argument("--decode-source-size", type=int, default=256, help="--decode: image side")
    p.add_argument("--decode-image-size", type=int, default=224, help="--decode: crop side")
    a = p.parse_args(argv)
    if a.decode:
        device = "cuda" if a.device != "cpu" and torch.cuda.is_available() else "cpu"
        if a.device == "cuda" and device != "cuda":
            p.error("--device cuda: no CUDA device available")
        report = run_decode(a, device)
        if a.json:
            print(json.dumps(report))
        else:
            print(f"{report['images']} JPEGs of {report['source_size']} px (mean "
                  f"{report['mean_jpeg_bytes'] / 1024:.1f} KiB) -> {report['image_size']} px "
                  f"on {report['device']}")
            for k, r in report["rows"].items():
                print(f"  {k:<36}{r['samples_per_s']:>10,.0f} samples/s"
                      f"{r['per_core_cpu']:>10,.0f} per CPU second")
        return 0
    if a.iters < 1 or a.warmup < 0:
        p.error("--iters must be >= 1 and --warmup >= 0")
    device = a.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the workers (spawned) see no GPU

    devices = torch.cuda.device_count() if device == "cuda" else None
    jobs = []
    for flavor in a.flavors:
        mbs = a.micro_batch_size or DEFAULT_BATCH[device][flavor]
        for variant in a.variants:
            v = VARIANTS[variant]
            world = v["tp"] * v["pp"] * v["dp"]
            m = max(a.micro_batches, 2 * v["pp"] if v["pp"] > 1 else 1,
                    v.get("min_micro_batches", 1))
            gbs = a.global_batch_size or mbs * v["dp"] * m
            try:
                flops = model_flops_per_step(flavor, mbs, gbs, variant)
            except ValueError as e:
                p.error(f"{flavor} {variant}: {e}")
            for precision in a.precisions:
                jobs.append({"flavor": flavor, "precision": precision, "variant": variant,
                             "world": world, "mbs": mbs, "gbs": gbs, "flops": flops,
                             "iters": a.iters, "warmup": a.warmup, "device": device,
                             "threads": a.threads, "timeout": a.timeout, "data": a.data})

    if device == "cuda":
        probe = run_in_process(_probe, {"device": device}, timeout=300)
        if probe["status"] != "ok":
            p.error(f"could not query the CUDA device: {probe['reason']}")
        name = probe["name"]
    else:
        name = _device_name(device)
    try:
        peaks, source = resolve_peaks(device, name, a.peak_tflops, a.peak_tflops_fp8)
    except ValueError as e:
        p.error(str(e))

    from megatron_m2.parallel.launch_env import _free_port

    rows = []
    for job in jobs:
        job["port"] = _free_port()
        label = f"{job['flavor']} {job['precision']} {job['variant']}"
        if devices is not None and job["world"] > devices:
            result = {"status": "skipped",
                      "reason": f"needs {job['world']} GPUs, {devices} visible"}
        else:
            result = run_in_process(_worker, job, a.timeout)
        if "traceback" in result:
            sys.stderr.write(f"{label}: {result['traceback']}\n")
        row = make_row(job, result, job["flops"], peaks[job["precision"]])
        rows.append(row)
        sys.stderr.write(f"{label}: {row['status']}"
                         + (f", {row['step_ms']:.2f} ms/step" if row["step_ms"] else "")
                         + (f" ({row['reason']})" if row["reason"] else "") + "\n")
    report = {"device": name, "device_type": device, "torch": torch.__version__,
              "cuda": torch.version.cuda, "transformer_engine": _te_version(),
              "peak_tflops": peaks, "peak_source": source, "iters": a.iters,
              "warmup": a.warmup, "threads": a.threads, "data": a.data, "rows": rows}
    if a.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return 0 if all(r["status"] in ("ok", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
