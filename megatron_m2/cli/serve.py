"""``m2-serve``: an HTTP service that embeds texts and images with an M2-Encoder and searches an
embedding store, with a search page at ``/``.

Examples::

    # embeddings only (POST /embed/text, /embed/image), on http://127.0.0.1:8000/
    m2-serve --load model.safetensors

    # ... and search over a store written by m2-embed (the page at / searches it)
    m2-serve --load model.safetensors --store stores/photos

    # another port, bigger batches on a GPU
    m2-serve --load runs/demo --store stores/demo --port 8080 --device cuda --max-batch 128

Endpoints: GET / (search page), GET /health, POST /embed/text, POST /embed/image, POST /search,
GET /items/ID/thumbnail, GET /openapi.json. Errors are JSON {"error": "..."} with a 4xx status
naming the limit or field at fault.

Concurrent requests are gathered into batches of up to --max-batch items, each waiting at most
--max-wait-ms for its batch to fill; the model runs one forward pass at a time.

The service binds the loopback address by default and has no authentication: to reach it from
other machines, put it behind a reverse proxy that authenticates and terminates TLS (--host
0.0.0.0 exposes it to everyone who can reach the port). A store embedded by another model than
--load (other weights, tokenizer or head) is refused unless --allow-model-mismatch.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
from typing import Optional, Sequence

from ..errors import UserError
from .common import ArgumentParser, add_model_arguments, load_encoder, run_cli

logger = logging.getLogger("m2-serve")

PROG = "m2-serve"


class ServeError(UserError, ValueError):
    """A store, address or option the service cannot start with."""


def build_parser() -> argparse.ArgumentParser:

    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                       epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    g = add_model_arguments(p, "serve")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads of a forward pass (default: torch's choice)")

    g = p.add_argument_group("store")
    g.add_argument("--store", default=None,
                   help="embedding store directory written by m2-embed, searched by POST "
                        "/search and the page (without it, only the embedding endpoints work)")
    g.add_argument("--allow-model-mismatch", action="store_true",
                   help="serve a store embedded by another model than --load (a warning "
                        "instead of an error; its scores then compare different models)")
    g.add_argument("--source-root", default=None,
                   help="where the store's images are now, when its folder or dataset moved "
                        "since m2-embed ran (default: the path recorded in the store)")
    g.add_argument("--thumbnail-size", type=int, default=128,
                   help="longest side of the thumbnails, in pixels")

    g = p.add_argument_group("network")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind; any other than loopback exposes the service, which "
                        "has no authentication")
    g.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    g.add_argument("--root-path", default="",
                   help="URL prefix the service is mounted under behind a reverse proxy")
    g.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"],
                   help="log level of the service and of uvicorn")
    g.add_argument("--no-access-log", action="store_true", help="do not log every request")

    g = p.add_argument_group("batching")
    g.add_argument("--max-batch", type=int, default=32,
                   help="most texts or images per forward pass (concurrent requests are "
                        "gathered up to it)")
    g.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="longest time a request waits for its batch to fill")
    g.add_argument("--max-queue", type=int, default=256,
                   help="most texts or images waiting per modality; beyond it requests are "
                        "answered 503 (0: unbounded)")

    g = p.add_argument_group("request limits (violations are answered 413 or 422)")
    g.add_argument("--max-image-bytes", type=int, default=10 * 1024 * 1024,
                   help="bytes of one uploaded image")
    g.add_argument("--max-image-pixels", type=int, default=40_000_000,
                   help="width x height of one image, checked from its header before decoding")
    g.add_argument("--max-images-per-request", type=int, default=16,
                   help="images of one POST /embed/image")
    g.add_argument("--max-text-chars", type=int, default=1000, help="characters of one text")
    g.add_argument("--max-texts-per-request", type=int, default=64,
                   help="texts of one POST /embed/text")
    g.add_argument("--max-k", type=int, default=100, help="largest k of POST /search")
    return p


_POSITIVE = ("max_batch", "max_image_bytes", "max_image_pixels", "max_images_per_request",
             "max_text_chars", "max_texts_per_request", "max_k", "thumbnail_size")


def _validate(args) -> Optional[str]:
    for name in _POSITIVE:
        value = getattr(args, name)
        if value < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {value}"
    if args.max_wait_ms < 0:
        return f"--max-wait-ms must be >= 0, got {args.max_wait_ms}"
    if args.max_queue < 0:
        return f"--max-queue must be >= 0, got {args.max_queue}"
    if args.threads is not None and args.threads < 1:
        return f"--threads must be >= 1, got {args.threads}"
    if not 0 <= args.port <= 65535:
        return f"--port must be in [0, 65535], got {args.port}"
    if args.root_path and (not args.root_path.startswith("/") or args.root_path.endswith("/")):
        return f"--root-path must start with / and not end with one, got {args.root_path!r}"
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``ServeError`` naming the address when it
    cannot be bound, e.g. the port is in use)."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ServeError(f"--host {host}: cannot resolve the address ({e.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket, root_path: str) -> str:
    host, port = sock.getsockname()[:2]
    if sock.family == socket.AF_INET6:
        host = f"[{host}]"
    return f"http://{host}:{port}{root_path}/"


def _open_store(path: str):
    from ..serving.store import EmbeddingStore, StoreError

    if not os.path.exists(path):
        raise FileNotFoundError(f"--store {path}: no such directory")
    try:
        return EmbeddingStore.open(path)
    except StoreError as e:
        raise ServeError(f"--store {path}: {e}") from None


def _main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    error = _validate(args)
    if error:
        parser.error(error)
    if not os.path.exists(args.load):
        raise FileNotFoundError(f"--load {args.load}: no such checkpoint directory or file")
    for flag, path in (("--tokenizer-model", args.tokenizer_model),
                       ("--source-root", args.source_root)):
        if path and not os.path.exists(path) and not os.path.exists(path + ".idx"):
            raise FileNotFoundError(f"{flag} {path}: no such file or directory")
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="[%(asctime)s] %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    import warnings

    for message in (".*Transformer Engine and Apex are not installed",
                    ".*full scope is deprecated"):  # megatron-core's own configuration defaults
        warnings.filterwarnings("ignore", message=message)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ServeError(f"m2-serve needs FastAPI and uvicorn ({e.name} is missing): pip "
                         "install 'megatron_m2[serve]'") from None
    store = _open_store(args.store) if args.store else None
    sock = bind_socket(args.host, args.port)  # before the model loads: a busy port fails fast
    try:
        return _serve(args, store, sock)
    finally:
        sock.close()


def _serve(args, store, sock: socket.socket) -> int:
    import torch
    import uvicorn

    from ..serving.app import Limits, create_app
    from ..serving.store import StoreError, model_identity

    if args.threads:
        torch.set_num_threads(args.threads)
    enc = load_encoder(args, args.max_batch)
    identity = model_identity(enc, args.load)
    limits = Limits(max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
                    max_images_per_request=args.max_images_per_request,
                    max_text_chars=args.max_text_chars,
                    max_texts_per_request=args.max_texts_per_request, max_k=args.max_k)
    try:
        app = create_app(enc, store, limits=limits, max_batch=args.max_batch,
                         max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                         identity=identity, allow_model_mismatch=args.allow_model_mismatch,
                         source_root=args.source_root, thumbnail_size=args.thumbnail_size)
    except StoreError as e:
        raise ServeError(f"--store {args.store}: {e}") from None
    if not _is_loopback(args.host):
        logger.warning("listening on %s, beyond this machine, without authentication: put the "
                       "service behind a reverse proxy that authenticates", args.host)
    what = (f"store {args.store} ({len(store)} {store.kind} items)" if store is not None
            else "no store (embedding endpoints only)")
    logger.info("serving %s (%s head, dim %d) with %s at %s", args.load, args.head,
                enc.embed_dim, what, _url(sock, args.root_path))
    config = uvicorn.Config(app, log_level=args.log_level, access_log=not args.no_access_log,
                            root_path=args.root_path, timeout_graceful_shutdown=10,
                            server_header=False)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``m2-serve``."""
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
