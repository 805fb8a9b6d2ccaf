"""The ``sam2-stream`` command: ``serve`` plus every subcommand of :mod:`tracker.cli`.

``sam2-stream serve --config server.toml`` loads the model once, starts the
WebSocket service (with the operator page at ``/``, ``server.page``) and runs
until SIGINT/SIGTERM, then stops gracefully
(sessions closed, clients told, connections closed, worker stopped). Flags
override the config file; without a file, the defaults of
:mod:`server.config` apply (loopback, port 8765, no sources: add some with
``--source NAME=URI``)::

    sam2-stream serve --random-weights 0 --image-size 256 --config samples/server.toml
    sam2-stream serve --host 0.0.0.0 --token "$TOKEN" --source cam1=rtsp://10.0.0.5/stream

The console script points here (``pyproject.toml``), so ``track``,
``annotate`` and ``segment`` keep working through the same entry point.
Here ``annotate`` also takes ``--ray ADDRESS|auto|local``: the videos of a
folder or manifest on a Ray cluster (``server.ray_annotate``, docs/scaling.md).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

from server.config import ConfigError, ModelEntry, ServerConfig, SourceEntry, load_config
from tracker.cli import add_model_args
from tracker.cli import build_parser as build_tracker_parser
from tracker.cli import main as tracker_main

logger = logging.getLogger("sam2-stream")


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise RuntimeError("tracker.cli.build_parser() has no subcommands")


def add_serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = sub.add_parser(
        "serve",
        help="run the live service: WebSocket protocol, tracking sessions, /healthz and /metrics",
        description="Run the live tracking service. Flags override the --config file.",
    )
    s.add_argument("--config", help="TOML config file (see samples/server.toml and server/config.py)")
    s.add_argument("--host", help="interface to bind (default 127.0.0.1; anything else needs a token)")
    s.add_argument("--port", type=int, help="TCP port (default 8765; 0 picks a free one)")
    s.add_argument("--token", help="bearer token clients must send (default: $SAM2_STREAM_TOKEN)")
    s.add_argument(
        "--source", action="append", default=[], metavar="NAME=URI",
        help="a named source clients may open, e.g. cam1=rtsp://10.0.0.5/stream (repeatable)",
    )
    s.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="accept browsers from this Origin only (repeatable; default: any)")
    s.add_argument("--ice-host", action="append", default=[], metavar="ADDR",
                   help="WebRTC: offer ICE host candidates on this local address only (repeatable; "
                        "default every interface but 127.0.0.1)")
    s.add_argument("--tls-cert", help="PEM certificate: serve wss:// and https://")
    s.add_argument("--tls-key", help="PEM private key of --tls-cert")
    s.add_argument("--max-sessions", type=int, help="sessions open at once (default 8)")
    s.add_argument("--max-objects", type=int, help="objects per session (default 16)")
    s.add_argument("--max-batch", type=int, help="sessions' frames per image-encoder call (default 4)")
    s.add_argument("--idle-timeout", type=float, metavar="S", help="close sessions nobody watched for S seconds (default 60)")
    s.add_argument("--cpu-fallback", action="store_true", default=None,
                   help="a session that runs out of CUDA memory moves to the CPU (slow, logged) "
                        "instead of dropping its frames")
    s.add_argument("--no-page", action="store_true", help="do not serve the operator page at / (WebSocket and HTTP API only)")
    g = s.add_argument_group("Ray cluster (optional extra: pip install -e .[ray]; docs/scaling.md)")
    g.add_argument("--ray", metavar="ADDRESS", help="run the sessions on Ray session hosts: HOST:PORT of the head, "
                   "auto (this machine's cluster, or $RAY_ADDRESS) or local (a private one); the [cluster] table")
    g.add_argument("--ray-hosts", type=int, metavar="N", help="session hosts, one per device (default: as many as "
                   "the cluster holds)")
    g.add_argument("--ray-host-gpus", type=float, metavar="N",
                   help="GPUs per session host, whole or fractional (default 1 where the cluster has GPUs)")
    g.add_argument("--ray-namespace", metavar="NAME", help="Ray namespace the fronts of one service share "
                   "(default sam2-stream)")
    add_model_args(s)
    s.set_defaults(func=cmd_serve, model=None, device=None)
    return s


def add_annotate_ray_args(sub: argparse._SubParsersAction) -> None:
    """``annotate --ray ADDRESS|auto|local``: the videos on a Ray cluster (``server.ray_annotate``)."""
    from tracker.cli import parse_key_value

    a = sub.choices["annotate"]
    g = a.add_argument_group("Ray cluster (optional extra: pip install -e .[ray])")
    g.add_argument("--ray", metavar="ADDRESS", help="annotate on a Ray cluster: HOST:PORT of its head, auto "
                   "(the cluster on this machine, or $RAY_ADDRESS) or local (a private one here)")
    g.add_argument("--ray-workers", type=int, metavar="N", help="worker actors at once, one video each "
                   "(default: as many as the cluster holds, at most one per video)")
    g.add_argument("--ray-worker-cpus", type=float, metavar="N", help="CPUs per worker (default 1)")
    g.add_argument("--ray-worker-gpus", type=float, metavar="N",
                   help="GPUs per worker, whole or fractional (default 1 where the cluster has GPUs, else 0)")
    g.add_argument("--ray-worker-resource", action="append", type=parse_key_value, default=[], metavar="NAME=AMOUNT",
                   help="a custom Ray resource each worker needs (repeatable)")
    g.add_argument("--ray-max-attempts", type=int, default=3, metavar="N",
                   help="workers a video may lose (killed, node gone) before it counts as failed (default 3)")
    local = a.get_default("func")

    def cmd_annotate(args: argparse.Namespace) -> int:
        if args.ray is None:
            return int(local(args) or 0)
        return cmd_annotate_ray(args)

    a.set_defaults(func=cmd_annotate)


def cmd_annotate_ray(args: argparse.Namespace) -> int:
    """``annotate ... --ray ADDRESS``: the job's videos on the cluster, one per worker at a time."""
    from server.ray_cluster import ClusterError, connect, default_shape
    from tracker.annotate_many import JobProgress, ModelSpec, VideoJob, jobs_from_args, options_from_args, report

    if args.prompts is not None and not args.manifest:  # one video, written as the one-video command writes it
        if args.video is None:
            raise SystemExit("annotate: give the video to annotate with --prompts")
        name = args.video_name or Path(args.video.removeprefix("images:").rstrip("/")).stem or "video"
        jobs = [VideoJob(args.video, args.prompts, name, args.out)]
    else:
        jobs = jobs_from_args(args)
    resources: dict[str, float] = {}
    for key, value in args.ray_worker_resource:
        try:
            resources[key] = float(value)
        except ValueError:
            raise ClusterError(f"--ray-worker-resource {key}={value}: the amount must be a number") from None
    for flag, value in (("--ray-workers", args.ray_workers), ("--ray-max-attempts", args.ray_max_attempts)):
        if value is not None and value < 1:
            raise ClusterError(f"{flag} must be at least 1, got {value}")
    from server.ray_annotate import run_on_ray

    ray = connect(args.ray)
    shape = default_shape(ray.cluster_resources(), args.ray_worker_cpus, args.ray_worker_gpus, resources)
    progress = JobProgress(len(jobs))
    try:
        run_on_ray(jobs, options_from_args(args), ModelSpec.from_args(args), address=args.ray, workers=args.ray_workers,
                   shape=shape, resume=args.resume, max_attempts=args.ray_max_attempts, progress=progress)
    finally:
        ray.shutdown()
    return report(progress)


def build_parser() -> argparse.ArgumentParser:
    parser = build_tracker_parser()
    sub = _subcommands(parser)
    add_serve_parser(sub)
    add_annotate_ray_args(sub)
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The config file (if any) with the command line's flags applied on top."""
    config = load_config(args.config)
    srv, model, limits = config.server, config.model, config.limits
    for attr, value in (("host", args.host), ("port", args.port), ("token", args.token),
                        ("tls_cert", args.tls_cert), ("tls_key", args.tls_key)):
        if value is not None:
            setattr(srv, attr, value)
    if args.allow_origin:
        srv.allow_origins = list(args.allow_origin)
    if args.ice_host:
        config.webrtc.ice_host_addresses = list(args.ice_host)
    for attr, value in (("max_sessions", args.max_sessions), ("max_objects", args.max_objects),
                        ("idle_timeout_s", args.idle_timeout)):
        if value is not None:
            setattr(limits, attr, value)
    for attr, value in (("name", args.model), ("checkpoint", args.checkpoint), ("device", args.device),
                        ("image_size", args.image_size), ("random_weights", args.random_weights),
                        ("precision", args.precision),
                        ("max_batch", args.max_batch), ("cpu_fallback", args.cpu_fallback)):
        if value is not None:
            setattr(model, attr, value)
    for attr, value in (("address", args.ray), ("hosts", args.ray_hosts), ("host_gpus", args.ray_host_gpus),
                        ("namespace", args.ray_namespace)):
        if value is not None:
            setattr(config.cluster, attr, value)
    sources = dict(config.sources)
    for text in args.source:
        name, sep, uri = text.partition("=")
        if not sep or not name or not uri:
            raise ConfigError(f"--source {text!r}: expected NAME=URI, e.g. cam1=rtsp://10.0.0.5/stream")
        sources[name] = SourceEntry(uri=uri)
    config.sources = sources
    return config


def cmd_serve(args: argparse.Namespace) -> int:
    from server.app import TrackingServer
    from tracker.model import build_model

    config = config_from_args(args)
    config.check()

    def load(key: str, m: ModelEntry) -> Any:
        logger.info("loading model %s (%s%s on %s%s%s)", key, m.name, f" at {m.image_size} px" if m.image_size else "",
                    m.device, f", {m.precision}" if m.precision != "auto" else "",
                    f" from {m.checkpoint}" if m.checkpoint else "")
        return build_model(
            m.name,
            checkpoint=config.resolve(m.checkpoint) if m.checkpoint else None,
            device=m.device,
            image_size=m.image_size,
            random_weights_seed=m.random_weights,
            precision=m.precision,
        )

    model = load(config.model.name, config.model)
    more = {key: load(key, entry) for key, entry in config.models.items()}
    routes = {}
    if not args.no_page:
        from server.page import page_routes

        routes = page_routes()
    server = TrackingServer(config, model, models=more, routes=routes)
    return asyncio.run(_serve(server, page=bool(routes)))


async def _serve(server, page: bool = False) -> int:  # type: ignore[no-untyped-def]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread / Windows
            pass
    await server.start()
    if page:
        logger.info("operator page: %s", server.url.replace("ws", "http", 1))
    try:
        await stop.wait()
        logger.info("signal received; stopping")
    finally:
        await server.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    # one line per HTTP request / connection is the server's own log's job
    return tracker_main(argv, parser=build_parser(), quiet_loggers=["sam2-stream.websockets"])


if __name__ == "__main__":
    sys.exit(main())
