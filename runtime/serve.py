"""`tandem serve`: the OpenAI-compatible server (runtime/server.py) over one model or the pair, in this process, or
scaled out on Ray Serve: one replica per GPU (CPU-only replicas where there is none), Ray's proxy spreading the
requests. FastAPI, uvicorn and Ray are extras, imported only when a server starts.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import signal
import time
from pathlib import Path

from tandem.models.errors import InputError
from tandem.models.hub import resolve_checkpoint
from tandem.runtime.config import EngineConfig
from tandem.runtime.media import (DEFAULT_FETCH_TIMEOUT_S, DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS,
                                  DEFAULT_MAX_IMAGES, DEFAULT_MAX_REQUEST_BYTES, MediaLimits)
from tandem.runtime.stages import Budget

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc malloc.h)
MMAP_THRESHOLD = 4 << 20  # blocks above it are mapped and unmapped as they come and go


def add_arguments(p: argparse.ArgumentParser, positive_int, positive_float) -> None:
    models = p.add_argument_group("models (--model, or --large and --small)")
    models.add_argument("--model", metavar="DIR|ID", help="serve one model (plain chat)")
    models.add_argument("--large", metavar="DIR|ID", help="serve the pair: its large model...")
    models.add_argument("--small", metavar="DIR|ID", help="...and its small model")
    models.add_argument("--served-model-name", metavar="NAME",
                        help="the id clients ask for with --model (default: the folder's name, or the hub id)")
    http = p.add_argument_group("http")
    http.add_argument("--host", default=DEFAULT_HOST, help="(default: %(default)s)")
    http.add_argument("--port", type=int, default=DEFAULT_PORT, help="(default: %(default)s)")
    http.add_argument("--api-key", metavar="KEY", help="requests to /v1 must send Authorization: Bearer KEY")
    http.add_argument("--max-request-bytes", type=positive_int, default=DEFAULT_MAX_REQUEST_BYTES, metavar="N",
                      help="a larger request body is refused with 413 (default: %(default)s)")
    http.add_argument("--no-access-log", dest="access_log", action="store_false",
                      help="no log line per request")
    media = p.add_argument_group("images")
    media.add_argument("--allowed-local-media-path", type=Path, metavar="DIR",
                       help="file:// image URLs are served from under this directory (default: refused)")
    media.add_argument("--fetch-timeout", type=positive_float, default=DEFAULT_FETCH_TIMEOUT_S, metavar="S",
                       help="seconds an http(s) image may take to fetch (default: %(default)s)")
    media.add_argument("--max-image-bytes", type=positive_int, default=DEFAULT_MAX_IMAGE_BYTES, metavar="N",
                       help="(default: %(default)s)")
    media.add_argument("--max-image-pixels", type=positive_int, default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                       help="width x height, read from the header before decoding (default: %(default)s)")
    media.add_argument("--max-images", type=positive_int, default=DEFAULT_MAX_IMAGES, metavar="N",
                       help="images in one request at most (default: %(default)s)")
    pair = p.add_argument_group("the pair")
    pair.add_argument("--short-tokens", type=positive_int, default=Budget.short_tokens, metavar="N",
                      help="output tokens of a short answer (default: %(default)s; a request's max_tokens may cap it)")
    pair.add_argument("--speculative", type=int, default=0, metavar="K",
                      help="the large model's answer and reasoning stages drafted by the small model, up to K tokens "
                           "at a time (greedy requests only; default: off)")
    pair.add_argument("--reason-tokens", type=positive_int, default=Budget.reason_tokens, metavar="N",
                      help="output tokens of a reasoning stage (default: %(default)s)")
    batch = p.add_argument_group("batching (each engine)")
    batch.add_argument("--max-running", type=positive_int, metavar="N",
                       help=f"sequences decoded together at most (default: {EngineConfig.max_running})")
    batch.add_argument("--max-waiting", type=positive_int, metavar="N",
                       help=f"requests queued at most; past it a request gets 429 (default: {EngineConfig.max_waiting})")
    scale = p.add_argument_group("scale-out")
    scale.add_argument("--ray", action="store_true", help="deploy on Ray Serve (pip install 'tandem-vlm[ray]')")
    scale.add_argument("--replicas", type=positive_int, default=1, metavar="N",
                       help="with --ray: replicas, each with its own copy of the models (default: %(default)s)")
    scale.add_argument("--ray-address", metavar="ADDR", help="with --ray: a running cluster (default: start one)")


def run(args: argparse.Namespace, settings: dict) -> int:
    """Check the flags, then serve until interrupted."""
    pair = args.large is not None or args.small is not None
    if pair == (args.model is not None) or (pair and None in (args.large, args.small)):
        raise InputError("give --model DIR (one model), or --large DIR and --small DIR (the pair)")
    if pair and args.served_model_name:
        raise InputError("--served-model-name names a single model; the pair's ids are its models' names and "
                         "tandem-<policy>")
    if not args.ray and args.replicas != 1:
        raise InputError("--replicas needs --ray: one process serves one copy of the models")
    settings = {**settings, **{name: getattr(args, name) for name in ("max_running", "max_waiting")
                               if getattr(args, name) is not None}}
    checkpoints = (args.large, args.small) if pair else (args.model,)
    paths = tuple(resolve_checkpoint(c) for c in checkpoints)  # every one, before any loads
    names = (args.served_model_name,) if args.served_model_name else tuple(map(_name, checkpoints))
    load = functools.partial(load_served, paths, names, settings,
                             Budget(short_tokens=args.short_tokens, reason_tokens=args.reason_tokens,
                                    speculative=args.speculative))
    from tandem.runtime.server import ServerConfig, run_server

    media = MediaLimits(args.fetch_timeout, args.max_image_bytes, args.max_image_pixels, args.max_images,
                        args.allowed_local_media_path)
    config = ServerConfig(args.api_key, media, args.max_request_bytes, args.access_log)
    if args.ray:
        serve_on_ray(load, config, args.host, args.port, args.replicas, args.ray_address)
    else:
        run_server(load(), config, args.host, args.port)
    return 0


def load_served(paths: tuple[Path, ...], names: tuple[str, ...], settings: dict, budget: Budget):
    """The models of a server (one, or the pair), loaded: `Served`."""
    pin_mmap_threshold()
    from tandem.runtime.engine import Engine
    from tandem.runtime.pipeline import Tandem
    from tandem.runtime.server import Served

    if len(paths) == 1:
        return Served.one(names[0], Engine.from_pretrained(paths[0], **settings))
    return Served.of_pair(Tandem.from_pretrained(*paths, budget=budget, **settings), *names)


def ray_app(load, config, replicas: int = 1, gpus_per_replica: float | None = None):
    """A Ray Serve application of `replicas` servers, each loading its models with `load()` (picklable: e.g.
    functools.partial(load_served, ...)): pass it to ray.serve.run. One GPU per replica where the cluster has GPUs."""
    import ray
    from ray import serve

    from tandem.runtime.server import build_app

    if gpus_per_replica is None:
        gpus_per_replica = 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) else 0

    @serve.ingress()
    class TandemServer:
        def __init__(self):
            self.served = load()

        def __serve_build_asgi_app__(self):
            return build_app(self.served, config)

        def __del__(self):
            self.served.close()

    options = {"num_gpus": gpus_per_replica, "num_cpus": 0 if gpus_per_replica else 1}
    deployment = serve.deployment(TandemServer, name="tandem", num_replicas=replicas, ray_actor_options=options,
                                  max_ongoing_requests=1024)
    return deployment.bind()


def serve_on_ray(load, config, host: str, port: int, replicas: int, address: str | None) -> None:
    """Start (or join) a Ray cluster, deploy, and serve until interrupted."""
    import ray
    from ray import serve

    ray.init(address=address)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops it as Ctrl-C does, as uvicorn's does
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(ray_app(load, config, replicas), name="tandem", route_prefix="/")
        print(f"tandem: {replicas} replica(s) on Ray Serve at http://{host}:{port}/v1", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("tandem: shutting down", flush=True)  # a server's normal end: exit status 0
    finally:
        serve.shutdown()
        ray.shutdown()


def pin_mmap_threshold(size: int = MMAP_THRESHOLD) -> None:
    """Keep glibc's mmap threshold at `size` for this process. By default glibc raises it each time a block above
    it is freed, and blocks of that size then come from the heap, where a server's ever-changing sizes (decoded
    images, each batch shape's activations on the CPU) fragment it: on the tiny pair's load run (1,000 requests,
    200 clients, `python -m tandem.bench.serve --load`) resident memory drifted from 870-1,000 MiB by up to +9.5%.
    Pinned at 128 KiB (glibc's starting value) it held within +1.1%, but every step's logits (600 KB) were then
    mapped afresh, their pages faulted in each step: the tiny model's decode ran 10% slower. At 4 MiB it held
    within +1.7% (four runs) at the unpinned speed. Does nothing without glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, size)


def _name(checkpoint: str) -> str:
    """A model's id: its folder's name, or the hub id as given."""
    path = Path(checkpoint)
    return path.name if path.exists() else str(checkpoint)
