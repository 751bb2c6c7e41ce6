#!/usr/bin/env python3
"""Load test of ``m2-serve``: throughput and latency of ``/embed/text`` and ``/search``.

Targets a running service (``--url``) or starts one (``--load CKPT [--store DIR]``, on a free
loopback port, stopped afterwards), then sends exactly ``--requests`` requests from
``--concurrency`` concurrent clients (httpx, async), alternating between the ``--endpoints``
(``/search`` only when the service has a store). Queries cycle through English and Chinese
captions. The whole run is bounded by ``--timeout-s`` (requests still unanswered then count as
errors).

Reports requests/s, latency percentiles (p50/p90/p99, milliseconds, over every request),
errors (with a few samples), the same per endpoint, and what the server's micro-batcher did
meanwhile (batches, items and mean batch size, from ``/health`` before and after). ``--json``
prints one JSON object on one line instead of the table.

Examples::

    python tools/bench_serve.py --url http://127.0.0.1:8000 --requests 200 --concurrency 8
    python tools/bench_serve.py --load model.safetensors --store stores/demo \\
        --requests 500 --concurrency 16 --server-args "--max-batch 64 --max-wait-ms 2" --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUERIES = ["an emoji of grinning face", "一个咧嘴笑的表情符号", "an emoji of red heart",
           "红心的表情符号", "a smiling cat", "一只猫", "two thumbs up", "竖起大拇指",
           "a yellow star", "黄色的星星", "a pizza slice", "一片披萨"]
ENDPOINTS = ("embed_text", "search")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="base URL of a running m2-serve")
    target.add_argument("--load", help="start m2-serve with this checkpoint for the run")
    p.add_argument("--store", default=None, help="with --load: the store to serve")
    p.add_argument("--server-args", default="",
                   help="with --load: more m2-serve options, as one string")
    p.add_argument("--requests", type=int, default=200, help="requests to send in all")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--timeout-s", type=float, default=60.0,
                   help="bound on the whole run (and on each request)")
    p.add_argument("--endpoints", nargs="+", default=list(ENDPOINTS), choices=ENDPOINTS,
                   help="endpoints to alternate between")
    p.add_argument("--texts-per-request", type=int, default=1,
                   help="texts in each /embed/text request")
    p.add_argument("--k", type=int, default=10, help="k of each /search request")
    p.add_argument("--warmup", type=int, default=4,
                   help="requests sent (and not counted) before the run")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    return p


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated ``q``-th percentile (0..100) of ascending values (0 if empty)."""
    if not sorted_values:
        return 0.0
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _latency(ms: List[float]) -> Dict[str, float]:
    s = sorted(ms)
    return {"p50": round(percentile(s, 50), 2), "p90": round(percentile(s, 90), 2),
            "p99": round(percentile(s, 99), 2),
            "mean": round(sum(s) / len(s), 2) if s else 0.0, "max": round(s[-1], 2) if s else 0.0}


# -- the server, when started here ----------------------------------------------------------
class Server:
    """``m2-serve`` in a child process on a free loopback port (``url`` once it is up)."""

    def __init__(self, load: str, store: Optional[str], extra: Sequence[str],
                 timeout_s: float = 180.0):
        cmd = [sys.executable, "-m", "megatron_m2.cli.serve", "--load", load, "--host",
               "127.0.0.1", "--port", "0", "--no-access-log", *extra]
        if store:
            cmd += ["--store", store]
        self.lines: List[str] = []
        self.url: Optional[str] = None
        self._ready = threading.Event()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, cwd=Path(__file__).resolve().parents[1])
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(timeout_s) or self.url is None:
            self.stop()
            raise RuntimeError("m2-serve did not start:\n" + "".join(self.lines[-20:]))

    def _read(self) -> None:
        import re

        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            if m and self.url is None:
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()  # the process ended

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def _wait_healthy(client, timeout_s: float) -> Dict[str, Any]:
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            r = await client.get("/health")
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the service did not answer /health in time")
        await asyncio.sleep(0.2)


# -- the run ----------------------------------------------------------------------------------
def _request(endpoint: str, i: int, args) -> Dict[str, Any]:
    if endpoint == "embed_text":
        texts = [QUERIES[(i + j) % len(QUERIES)] for j in range(args.texts_per_request)]
        return {"url": "/embed/text", "json": {"texts": texts}}
    return {"url": "/search", "json": {"text": QUERIES[i % len(QUERIES)], "k": args.k}}


async def run(url: str, args) -> Dict[str, Any]:
    """Send the requests against ``url``; the report as a dict."""
    import httpx

    limits = httpx.Limits(max_connections=args.concurrency,
                          max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout_s, limits=limits) as client:
        health = await _wait_healthy(client, args.timeout_s)
        endpoints = [e for e in args.endpoints if e != "search" or health.get("store")]
        skipped = [e for e in args.endpoints if e not in endpoints]
        if not endpoints:
            raise RuntimeError("nothing to send: the service has no store for /search")
        for i in range(args.warmup):
            await client.post(**_request(endpoints[i % len(endpoints)], i, args))
        before = (await client.get("/health")).json()["batching"]

        results: List[Optional[Dict[str, Any]]] = [None] * args.requests
        counter = iter(range(args.requests))

        async def one_client():
            for i in counter:
                endpoint = endpoints[i % len(endpoints)]
                t0 = time.perf_counter()
                try:
                    r = await client.post(**_request(endpoint, i, args))
                    ok = r.status_code == 200
                    err = None if ok else f"{r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as e:
                    ok, err = False, f"{type(e).__name__}: {e}"
                results[i] = {"endpoint": endpoint, "ok": ok, "error": err,
                              "ms": (time.perf_counter() - t0) * 1000.0}

        t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(one_client()) for _ in range(args.concurrency)]
        done, pending = await asyncio.wait(tasks, timeout=args.timeout_s)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        seconds = time.perf_counter() - t0
        for t in done:
            if t.exception() is not None:
                raise t.exception()
        after = (await client.get("/health")).json()["batching"]

    finished = [r for r in results if r is not None]
    errors = [r["error"] for r in finished if not r["ok"]]
    unanswered = args.requests - len(finished)
    if unanswered:
        errors += [f"no answer within --timeout-s {args.timeout_s}"] * unanswered
    by_endpoint = {}
    for e in endpoints:
        rows = [r for r in finished if r["endpoint"] == e]
        by_endpoint[e] = {"requests": len(rows), "errors": sum(not r["ok"] for r in rows),
                          "latency_ms": _latency([r["ms"] for r in rows if r["ok"]])}
    batches = after["batches"] - before["batches"]
    items = after["items"] - before["items"]
    return {"url": url, "requests": args.requests, "concurrency": args.concurrency,
            "endpoints": endpoints, "skipped_endpoints": skipped,
            "texts_per_request": args.texts_per_request, "k": args.k,
            "seconds": round(seconds, 3),
            "requests_per_s": round(len(finished) / seconds, 2) if seconds > 0 else 0.0,
            "latency_ms": _latency([r["ms"] for r in finished if r["ok"]]),
            "errors": len(errors), "error_samples": sorted(set(errors))[:5],
            "by_endpoint": by_endpoint,
            "server": {"batches": batches, "items": items,
                       "mean_batch_size": round(items / batches, 3) if batches else 0.0,
                       "max_batch": after.get("max_batch"),
                       "max_wait_ms": after.get("max_wait_ms"),
                       "forward_calls": after.get("forward_calls", 0)
                       - before.get("forward_calls", 0),
                       "encoder_busy_s": round(after.get("encoder_busy_s", 0.0)
                                               - before.get("encoder_busy_s", 0.0), 3)},
            "cpu_count": os.cpu_count()}


def format_report(rep: Dict[str, Any]) -> str:
    """The report as a small table."""
    lat = rep["latency_ms"]
    lines = [f"{rep['requests']} requests, concurrency {rep['concurrency']}, "
             f"{rep['seconds']:.2f} s against {rep['url']}",
             f"throughput  {rep['requests_per_s']:.1f} requests/s",
             f"latency ms  p50 {lat['p50']:.1f}  p90 {lat['p90']:.1f}  p99 {lat['p99']:.1f}  "
             f"max {lat['max']:.1f}",
             f"errors      {rep['errors']}"]
    for e, m in rep["by_endpoint"].items():
        el = m["latency_ms"]
        lines.append(f"  {e:<11} {m['requests']:5d} requests, {m['errors']} errors, "
                     f"p50 {el['p50']:.1f} p90 {el['p90']:.1f} p99 {el['p99']:.1f} ms")
    s = rep["server"]
    lines.append(f"server      {s['batches']} batches of {s['items']} items: mean batch size "
                 f"{s['mean_batch_size']:.2f} (max {s['max_batch']}, wait "
                 f"{s['max_wait_ms']} ms), encoder busy {s['encoder_busy_s']:.2f} s")
    for sample in rep["error_samples"]:
        lines.append(f"  error: {sample}")
    if rep["skipped_endpoints"]:
        lines.append(f"skipped (no store): {', '.join(rep['skipped_endpoints'])}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("requests", "concurrency", "texts_per_request", "k"):
        if getattr(args, name) < 1:
            build_parser().error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.timeout_s <= 0:
        build_parser().error("--warmup must be >= 0 and --timeout-s > 0")
    if args.store and not args.load:
        build_parser().error("--store goes with --load")
    server = None
    try:
        if args.load:
            server = Server(args.load, args.store, shlex.split(args.server_args))
            url = server.url
        else:
            url = args.url.rstrip("/")
        report = asyncio.run(run(url, args))
    except RuntimeError as e:
        sys.stderr.write(f"bench_serve: error: {e}\n")
        return 2
    finally:
        if server is not None:
            server.stop()
    if args.load:
        report["server_started_with"] = {"load": args.load, "store": args.store,
                                         "args": args.server_args}
    print(json.dumps(report, ensure_ascii=False) if args.json else format_report(report))
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
