#!/usr/bin/python3
"""A GStreamer RTSP server on 127.0.0.1 for the ingest tests.

Runs under the *system* Python (``/usr/bin/python3``): GStreamer's bindings come
from Debian's ``python3-gi`` and ``gir1.2-gst-rtsp-server-1.0``, which the
project's virtual environment cannot import. The tests start it as a subprocess
and wait for the line ``READY <port>`` on stdout instead of sleeping, so a slow
machine only makes the test slower, never flaky.

It serves a live H.264 stream of one solid colour (so a test can check pixels)
at ``rtsp://127.0.0.1:<port><mount>``, optionally behind HTTP Basic auth.

Usage::

    /usr/bin/python3 tests/servers/rtsp_server.py --port 0 --mount /cam \
        --size 320x240 --fps 25 --rgb 200,40,60 [--user U --password P]
"""

from __future__ import annotations

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def launch_line(width: int, height: int, fps: int, rgb: tuple[int, int, int]) -> str:
    """The media pipeline: a live solid-colour source, low-latency x264, RTP payloader."""
    r, g, b = rgb
    argb = 0xFF000000 | (r << 16) | (g << 8) | b
    return (
        f"( videotestsrc is-live=true pattern=solid-color foreground-color={argb} "
        f"! video/x-raw,format=I420,width={width},height={height},framerate={fps}/1 "
        f"! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={max(1, fps // 2)} bitrate=800 "
        f"! video/x-h264,profile=baseline ! rtph264pay name=pay0 pt=96 config-interval=1 )"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--mount", default="/cam")
    parser.add_argument("--size", default="320x240")
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--rgb", default="200,40,60")
    parser.add_argument("--user")
    parser.add_argument("--password")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    rgb = tuple(int(v) for v in args.rgb.split(","))

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(launch_line(width, height, args.fps, rgb))  # type: ignore[arg-type]
    factory.set_shared(True)
    if args.user:
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, "user")
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(args.user, args.password or ""), token)
        server.set_auth(auth)
        permissions = GstRtspServer.RTSPPermissions()
        permissions.add_role_from_structure(
            Gst.Structure.new_from_string("user, media.factory.access=(boolean)true, media.factory.construct=(boolean)true")
        )
        factory.set_permissions(permissions)
    server.get_mount_points().add_factory(args.mount, factory)
    if server.attach(None) == 0:
        print("FAILED to bind", flush=True)
        return 1

    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGINT, loop.quit)
    print(f"READY {server.get_bound_port()}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
