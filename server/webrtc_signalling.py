"""WebRTC signalling without I/O: checking offers, writing answers, ICE settings.

What lives here: :func:`parse_offer` (a client's ``{"sdp", "type"}`` dict,
checked before any peer connection exists, so a bad offer costs nothing and
gets a message saying what to fix), :func:`description_to_dict`,
:func:`video_directions` (which way each ``m=video`` section sends),
:func:`peer_configuration` and :func:`set_ice_host_addresses`, plus
:func:`answer_offer`, the one awaitable step every answering peer shares.

What does not: carrying the messages (the WebSocket server does that), media.

Why no trickle ICE: aiortc gathers every candidate while setting the local
description, so the answer returned here is complete and one request/reply on
the WebSocket is the whole negotiation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import aioice.ice
from aiortc import MediaStreamTrack, RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

from tracker.errors import TrackerError

#: Largest SDP accepted from a client; real browser offers are 3-10 kB.
MAX_SDP_BYTES = 64 * 1024

_DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")


class WebRTCError(TrackerError):
    """A WebRTC offer cannot be answered, or a peer connection cannot be set up."""


def parse_offer(obj: Any, *, want: str) -> RTCSessionDescription:
    """Check a client's offer and return it as an aiortc description.

    Args:
        obj: the ``{"sdp": str, "type": "offer"}`` mapping a browser's
            ``pc.localDescription`` serialises to.
        want: ``"send"`` (a publisher: the offer must send video) or
            ``"recv"`` (a viewer: the offer must receive video).

    Raises:
        WebRTCError: saying what is wrong and how to make a usable offer.
    """
    if want not in ("send", "recv"):
        raise ValueError(f"want must be 'send' or 'recv', got {want!r}")
    if not isinstance(obj, Mapping):
        raise WebRTCError(
            f"webrtc offer must be an object {{\"sdp\": ..., \"type\": \"offer\"}}, got {type(obj).__name__}"
        )
    kind, sdp = obj.get("type"), obj.get("sdp")
    if kind != "offer":
        raise WebRTCError(
            f"webrtc offer: type must be 'offer', got {kind!r}; send pc.localDescription after createOffer()"
        )
    if not isinstance(sdp, str) or not sdp.startswith("v=0"):
        raise WebRTCError("webrtc offer: sdp must be the SDP text (starting 'v=0'); send pc.localDescription.sdp")
    if len(sdp.encode("utf-8", "replace")) > MAX_SDP_BYTES:
        raise WebRTCError(f"webrtc offer: sdp is larger than {MAX_SDP_BYTES} bytes; offer one video track only")
    directions = video_directions(sdp)
    needed = ("sendrecv", "sendonly") if want == "send" else ("sendrecv", "recvonly")
    if not any(d in needed for d in directions):
        if want == "send":
            hint = "add the camera track (pc.addTrack(stream.getVideoTracks()[0], stream)) before createOffer()"
        else:
            hint = "add pc.addTransceiver('video', {direction: 'recvonly'}) before createOffer()"
        verb = "sends" if want == "send" else "receives"
        raise WebRTCError(f"webrtc offer {verb} no video ({_describe(directions)}); {hint}")
    return RTCSessionDescription(sdp=sdp, type="offer")


def video_directions(sdp: str) -> list[str]:
    """The direction of each ``m=video`` section, in order, as the offerer states it.

    A section without a direction attribute is ``sendrecv`` (RFC 4566); a
    rejected section (port 0) is ``inactive``.
    """
    directions: list[str] = []
    in_video = False
    for raw in sdp.splitlines():
        line = raw.strip()
        if line.startswith("m="):
            in_video = line.startswith("m=video")
            if in_video:
                parts = line.split()
                directions.append("inactive" if len(parts) > 1 and parts[1] == "0" else "sendrecv")
        elif in_video and line.startswith("a=") and line[2:] in _DIRECTIONS and directions[-1] != "inactive":
            directions[-1] = line[2:]
    return directions


def description_to_dict(description: RTCSessionDescription) -> dict[str, str]:
    """``{"sdp", "type"}``: what a browser's ``setRemoteDescription`` takes."""
    return {"sdp": description.sdp, "type": description.type}


def peer_configuration(ice_servers: Sequence[str | Mapping[str, Any]] = ()) -> RTCConfiguration:
    """An aiortc configuration; none of STUN/TURN by default (LAN and loopback peers).

    ``ice_servers`` items are URLs (``"stun:stun.example.org:3478"``) or
    mappings with ``urls`` / ``username`` / ``credential`` as in the browser API.
    """
    servers = []
    for item in ice_servers:
        if isinstance(item, str):
            servers.append(RTCIceServer(urls=item))
        else:
            servers.append(RTCIceServer(urls=item["urls"], username=item.get("username"),
                                        credential=item.get("credential")))
    return RTCConfiguration(iceServers=servers)


async def answer_offer(
    pc: RTCPeerConnection, offer: RTCSessionDescription, tracks: Sequence[MediaStreamTrack] = ()
) -> dict[str, str]:
    """Apply ``offer``, add ``tracks`` to send, and return the complete answer
    (every ICE candidate included).

    Raises:
        WebRTCError: aiortc could not use the offer (no common codec, bad SDP).
    """
    try:
        await pc.setRemoteDescription(offer)
        for track in tracks:  # after the offer, so they take the offer's transceivers
            pc.addTrack(track)
        await pc.setLocalDescription(await pc.createAnswer())
    except (ValueError, AttributeError, KeyError, TypeError) as e:
        raise WebRTCError(f"webrtc offer cannot be answered: {e}; offer VP8 or H.264 video") from e
    return description_to_dict(pc.localDescription)


_original_host_addresses = aioice.ice.get_host_addresses


def set_ice_host_addresses(addresses: Sequence[str] | None) -> None:
    """Offer ICE host candidates on these local addresses only, for every peer of the process.

    None restores aioice's default (every interface except 127.0.0.1). A
    server on a multi-homed host passes the address browsers can reach;
    in-process tests and ``--local`` samples pass ``["127.0.0.1"]``, which
    aioice otherwise leaves out.
    """
    if addresses is None:
        aioice.ice.get_host_addresses = _original_host_addresses
        return
    chosen = list(addresses)

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in chosen if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    aioice.ice.get_host_addresses = host_addresses


@contextlib.contextmanager
def ice_host_addresses(addresses: Sequence[str] | None) -> Iterator[None]:
    """:func:`set_ice_host_addresses` for the duration of a ``with`` block."""
    previous = aioice.ice.get_host_addresses
    set_ice_host_addresses(addresses)
    try:
        yield
    finally:
        aioice.ice.get_host_addresses = previous


def _describe(directions: list[str]) -> str:
    if not directions:
        return "no m=video section"
    return "m=video " + ", ".join(directions)
