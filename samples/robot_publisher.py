"""A robot publishing its camera over WebRTC: click an object, print its masks per frame.

The robot sends video (generated moving shapes, or ``--video FILE``) with
aiortc; the service tracks it with SAM 2 and answers with one result per
processed frame. Run it with the service in this process (a random-weight
model: nothing to download, masks are meaningless)::

    python samples/robot_publisher.py --local --random-weights 0 --image-size 256 --frames 30 --click 60,40

It prints one line per processed frame: the frame index, the publisher's
timestamp, the clicked object's box, score and mask area, and the time from
sending the frame to receiving its mask. Drop ``--random-weights`` and
``--image-size`` to use Meta's SAM 2.1 checkpoint (downloaded once).

``--server ws://HOST:8765`` publishes to a running service instead: the same
offer/answer and click go over its WebSocket through
``server.client.Client.publish_webrtc(offer, name=...) -> (answer, session_id)``.

The signalling is an interface (:class:`Signalling`) with two ends:
:class:`LocalSignalling` (in-process) and :class:`ServerSignalling`
(WebSocket); the media side (:func:`publish`) is the same for both.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription

try:
    from server.webrtc import description_to_dict, peer_configuration, set_ice_host_addresses
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from server.webrtc import description_to_dict, peer_configuration, set_ice_host_addresses

VIDEO_TIME_BASE = Fraction(1, 90_000)


class PublishError(Exception):
    """The service cannot take the robot's video; the message says what to do."""


@dataclass
class Result:
    """What the robot needs from one processed frame."""

    frame_idx: int
    pts_s: float | None
    boxes: dict[int, tuple[int, int, int, int] | None]
    scores: dict[int, float]
    areas: dict[int, int]


class Signalling(Protocol):
    """How the robot reaches the service: offer/answer, a click, the results."""

    async def publish(self, offer: dict[str, str], name: str) -> dict[str, str]:
        """Send the WebRTC offer; the service's answer."""

    async def click(self, x: float, y: float, frame_idx: int) -> int:
        """A positive click on frame ``frame_idx``; the new object's id."""

    def results(self) -> AsyncIterator[Result]:
        """One result per processed frame, newest first when the robot falls behind."""

    async def close(self) -> None:
        """Close the session and the connection to the service."""


class LocalSignalling:
    """The service in this process: a model, an inference worker, one session."""

    def __init__(self, args: argparse.Namespace) -> None:
        from tracker.model import build_model
        from tracker.session import InferenceWorker, SessionManager

        model = build_model(args.model, checkpoint=args.checkpoint, device=args.device,
                            image_size=args.image_size, random_weights_seed=args.random_weights)
        self.worker = InferenceWorker(model)
        self.manager = SessionManager(self.worker)
        self.session: Any = None
        self.publisher: Any = None
        self._results: asyncio.Queue[Result | None] = asyncio.Queue(maxsize=1)

    async def publish(self, offer: dict[str, str], name: str) -> dict[str, str]:
        from server.webrtc import WebRTCPublisher

        self.publisher = WebRTCPublisher(name)
        self.session = self.manager.open(self.publisher.source, name=name)
        loop = asyncio.get_running_loop()
        self.session.subscribe(lambda item: loop.call_soon_threadsafe(self._deliver, item))
        return await self.publisher.accept(offer)

    def _deliver(self, item: Any) -> None:
        from tracker.results import FrameResult

        if isinstance(item, FrameResult):
            result = Result(
                item.frame_idx, item.pts_s,
                boxes={i: o.box_xyxy for i, o in item.objects.items()},
                scores={i: o.score for i, o in item.objects.items()},
                areas={i: o.area for i, o in item.objects.items()},
            )
        elif item.kind in ("source_ended", "source_failed", "closed"):
            result = None
        else:
            return
        if self._results.full():  # newest only, as the server does for a slow client
            self._results.get_nowait()
        self._results.put_nowait(result)

    async def click(self, x: float, y: float, frame_idx: int) -> int:
        future = self.session.add_prompt(None, points_xy=[[x, y]], labels=[1], frame_idx=frame_idx)
        return (await asyncio.wrap_future(future)).obj_id

    async def results(self) -> AsyncIterator[Result]:
        while (result := await self._results.get()) is not None:
            yield result

    async def close(self) -> None:
        if self.publisher is not None:
            await self.publisher.close()
        self.manager.close_all()
        self.worker.stop()


class ServerSignalling:
    """A running service, over its WebSocket (``server.client.Client``)."""

    def __init__(self, url: str, token: str | None = None) -> None:
        from server.client import Client

        self.client = Client(url, token=token)
        self.session: Any = None

    async def publish(self, offer: dict[str, str], name: str) -> dict[str, str]:
        await self.client.connect()
        publish_webrtc = getattr(self.client, "publish_webrtc", None)
        if publish_webrtc is None:
            raise PublishError("this version of server.client has no WebRTC publishing "
                               "(Client.publish_webrtc); run with --local instead")
        answer, session_id = await publish_webrtc(offer, name=name)
        self.session = await self.client.subscribe(session_id, mask_format="none")
        return answer

    async def click(self, x: float, y: float, frame_idx: int) -> int:
        return await self.session.click(x, y, frame=frame_idx)

    async def results(self) -> AsyncIterator[Result]:
        async for f in self.session.frames():
            yield Result(f.frame_idx, f.pts_s, f.boxes, f.scores, areas={})

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        await self.client.close()


class ShapesTrack(MediaStreamTrack):
    """A camera stand-in: a red square circling the click point, a green disc and a blue diamond crossing."""

    kind = "video"

    def __init__(self, width: int, height: int, fps: float, centre_xy: tuple[float, float]) -> None:
        super().__init__()
        self.width, self.height, self.fps, self.centre_xy = width, height, fps, centre_xy
        yy, xx = np.mgrid[0:height, 0:width]
        self._yy, self._xx = yy, xx
        self._background = np.repeat((70 + 25 * np.sin(xx / 23.0) + 15 * np.cos(yy / 17.0))[..., None], 3, axis=2)
        self.sent_s: dict[int, float] = {}  # pts (90 kHz) -> time.monotonic() when sent
        self._count = 0
        self._start: float | None = None

    def _draw(self, t: float) -> np.ndarray:
        xx, yy = self._xx, self._yy
        img = self._background.copy()
        cx, cy = self.centre_xy[0] + 8 * math.cos(t), self.centre_xy[1] + 8 * math.sin(t)
        img[(np.abs(xx - cx) <= 20) & (np.abs(yy - cy) <= 20)] = (220, 40, 40)
        dx, dy = (40 + 40 * t) % self.width, self.height * 0.7
        img[(xx - dx) ** 2 + (yy - dy) ** 2 <= 16**2] = (40, 200, 70)
        ex, ey = self.width - (30 * t) % self.width, self.height * 0.4
        img[np.abs(xx - ex) + np.abs(yy - ey) <= 18] = (50, 80, 220)
        return img.astype(np.uint8)

    async def recv(self) -> av.VideoFrame:
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + self._count / self.fps
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        frame = av.VideoFrame.from_ndarray(self._draw(self._count / self.fps), format="rgb24")
        frame.pts, frame.time_base = round(self._count * 90_000 / self.fps), VIDEO_TIME_BASE
        self.sent_s[frame.pts] = time.monotonic()
        self._count += 1
        return frame


async def publish(track: MediaStreamTrack, signalling: Signalling, name: str) -> RTCPeerConnection:
    """Offer ``track`` to the service; the connected peer."""
    pc = RTCPeerConnection(peer_configuration())
    pc.addTrack(track)
    await pc.setLocalDescription(await pc.createOffer())
    answer = await signalling.publish(description_to_dict(pc.localDescription), name)
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
    return pc


async def run(args: argparse.Namespace) -> int:
    click_x, click_y = args.click
    signalling: Signalling = LocalSignalling(args) if args.local else ServerSignalling(args.server, args.token)
    player = None
    if args.video:
        from aiortc.contrib.media import MediaPlayer

        player = MediaPlayer(args.video)
        track, sent_s = player.video, {}
    else:
        shapes = ShapesTrack(args.size[0], args.size[1], args.fps, (click_x, click_y))
        track, sent_s = shapes, shapes.sent_s
    pc, obj_id, printed = None, None, 0
    try:
        pc = await publish(track, signalling, args.name)
        async for r in signalling.results():
            if obj_id is None:
                obj_id = await signalling.click(click_x, click_y, r.frame_idx)
                print(f"clicked ({click_x:g}, {click_y:g}) on frame {r.frame_idx}: object {obj_id}")
                continue
            if obj_id not in r.scores:
                continue
            sent = sent_at(sent_s, r.pts_s)
            latency = f"{(time.monotonic() - sent) * 1000:6.0f} ms" if sent is not None else "      -"
            area = r.areas.get(obj_id)
            print(f"frame {r.frame_idx:4d}  pts {r.pts_s or 0:7.3f} s  object {obj_id}: box {r.boxes[obj_id]}  "
                  f"score {r.scores[obj_id]:+6.2f}  area {'-' if area is None else area}  sent->mask {latency}")
            printed += 1
            if printed >= args.frames:
                break
    finally:
        if pc is not None:
            await pc.close()
        if player is not None and player.video is not None:
            player.video.stop()
        await signalling.close()
    return 0 if printed else 1


def sent_at(sent_s: dict[int, float], pts_s: float | None) -> float | None:
    """When the frame stamped ``pts_s`` was sent; the decoder may move pts by a tick."""
    if pts_s is None:
        return None
    pts = round(pts_s * 90_000)
    return next((sent_s[p] for p in (pts, pts - 1, pts + 1, pts - 2, pts + 2) if p in sent_s), None)


def parse_pair(text: str, sep: str = ",") -> tuple[int, int]:
    a, b = text.lower().split(sep)
    return int(a), int(b)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Publish video over WebRTC, click an object, print its masks.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true", help="run the service in this process")
    where.add_argument("--server", metavar="URL", help="a running service, e.g. ws://127.0.0.1:8765")
    p.add_argument("--token", help="the server's access token, if it wants one")
    p.add_argument("--name", default="robot1", help="the session's name")
    p.add_argument("--video", help="publish this file instead of generated shapes")
    p.add_argument("--size", type=lambda s: parse_pair(s, "x"), default=(320, 240), metavar="WxH")
    p.add_argument("--fps", type=float, default=15.0)
    p.add_argument("--click", type=parse_pair, default=(60, 40), metavar="X,Y", help="where to click, in pixels")
    p.add_argument("--frames", type=int, default=30, help="stop after this many results for the object")
    p.add_argument("--timeout", type=float, default=120.0, help="give up after this many seconds")
    p.add_argument("--ice-host", action="append", metavar="ADDR",
                   help="offer only this local address to the peer (repeatable); --local uses 127.0.0.1")
    model = p.add_argument_group("model (--local)")
    model.add_argument("--model", default="sam2.1-tiny")
    model.add_argument("--checkpoint")
    model.add_argument("--device", default="auto")
    model.add_argument("--image-size", type=int)
    model.add_argument("--random-weights", type=int, metavar="SEED",
                       help="random weights with this seed (nothing to download; masks are meaningless)")
    args = p.parse_args(argv)
    if args.ice_host or args.local:
        set_ice_host_addresses(args.ice_host or ["127.0.0.1"])
    try:
        return asyncio.run(asyncio.wait_for(run(args), args.timeout))
    except asyncio.TimeoutError:
        print(f"no {args.frames} results within {args.timeout:g} s", file=sys.stderr)
        return 1
    except (PublishError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
