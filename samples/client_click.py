"""Click an object on a live stream and print its box on every processed frame.

Start a server on the sample clip (a 5 s video played as a looping camera),
then click the red square and follow it::

    sam2-stream serve --random-weights 0 --image-size 256 --config samples/server.toml
    python samples/client_click.py ws://127.0.0.1:8765 cam1 --x 100 --y 80

``--random-weights 0`` builds the model with random weights (nothing to
download, masks are meaningless); leave it and ``--image-size`` out to use
Meta's SAM 2.1 checkpoint. The clip is ``samples/sample_clip.mp4``; make it
again with ``python samples/client_click.py --make-clip samples/sample_clip.mp4``.

This is what a robot does: open a stream, click, read masks, boxes and
timestamps for every frame (see ``server/client.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from websockets.exceptions import InvalidStatus

try:
    from server.client import RemoteError, SyncClient
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from server.client import RemoteError, SyncClient


def make_clip(path: str, seconds: float = 5.0, fps: int = 25, width: int = 320, height: int = 240) -> None:
    """A small H.264 clip: a red square circling (100, 80), a green disc and a
    blue diamond crossing a soft background."""
    import av
    import numpy as np

    yy, xx = np.mgrid[0:height, 0:width]
    background = 70 + 25 * np.sin(xx / 23.0) + 15 * np.cos(yy / 17.0)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "slow", "crf": "28"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(int(seconds * fps)):
            t = i / fps
            img = np.repeat(background[..., None], 3, axis=2)
            cx, cy = 100 + 15 * np.cos(t * 1.3), 80 + 15 * np.sin(t * 1.3)
            img[(np.abs(xx - cx) <= 24) & (np.abs(yy - cy) <= 24)] = (220, 40, 40)
            dx, dy = 40 + 45 * t, 170 - 8 * t
            img[(xx - dx) ** 2 + (yy - dy) ** 2 <= 18**2] = (40, 200, 70)
            ex, ey = 270 - 30 * t, 60 + 20 * t
            img[np.abs(xx - ex) + np.abs(yy - ey) <= 20] = (50, 80, 220)
            frame = av.VideoFrame.from_ndarray(img.clip(0, 255).astype(np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Click an object on a live stream and print its box per frame.")
    p.add_argument("url", nargs="?", default="ws://127.0.0.1:8765", help="server URL (default ws://127.0.0.1:8765)")
    p.add_argument("source", nargs="?", default="cam1", help="a source name from the server's config (default cam1)")
    p.add_argument("--x", type=float, default=100.0, help="click x in source pixels")
    p.add_argument("--y", type=float, default=80.0, help="click y in source pixels")
    p.add_argument("--frames", type=int, default=50, help="frames to print, then exit (0: until the stream ends)")
    p.add_argument("--token", default=os.environ.get("SAM2_STREAM_TOKEN"), help="bearer token (default $SAM2_STREAM_TOKEN)")
    p.add_argument("--make-clip", metavar="PATH", help="write the sample clip to PATH and exit")
    args = p.parse_args(argv)
    if args.make_clip:
        make_clip(args.make_clip)
        print(f"wrote {args.make_clip} ({os.path.getsize(args.make_clip)} bytes)")
        return 0

    try:
        client = SyncClient(args.url, args.token)
        client.connect()
    except OSError as e:
        print(f"cannot connect to {args.url} ({e}); start the server first:\n"
              "  sam2-stream serve --random-weights 0 --image-size 256 --config samples/server.toml", file=sys.stderr)
        return 1
    except InvalidStatus as e:
        print(f"{args.url} refused the connection ({e}); pass --token or set SAM2_STREAM_TOKEN", file=sys.stderr)
        return 1
    with client:
        hello = client.hello
        assert hello is not None
        print(f"connected to {hello.server} {hello.server_version}: {hello.model.name} at {hello.model.image_size} px "
              f"on {hello.model.device}; sources: {', '.join(hello.sources)}")
        session = client.open(args.source)
        first = session.next_frame(timeout=60)
        try:
            obj = session.click(args.x, args.y, frame=first.frame_idx)
        except RemoteError as e:
            print(f"the click was refused: {e}", file=sys.stderr)
            return 1
        print(f"session {session.id}: clicked ({args.x:g}, {args.y:g}) on frame {first.frame_idx} -> object {obj}")
        for f in session.frames(timeout=30, limit=args.frames or None):
            for event in session.drain_events():
                print(f"  event: {event.kind} {event.message}")
            latency = f" latency {1000 * f.latency_s:.0f} ms" if f.latency_s is not None else ""
            pts = f" pts {f.pts_s:.2f} s" if f.pts_s is not None else ""
            if obj not in f.objects:  # processed before the click reached the model
                print(f"frame {f.frame_idx}{pts}{latency}: object {obj} not tracked yet")
                continue
            print(f"frame {f.frame_idx}{pts}{latency}: object {obj} box {f.boxes[obj]} "
                  f"score {f.scores[obj]:.2f} area {int(f.masks[obj].sum())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
