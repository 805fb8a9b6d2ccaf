"""WebRTC for live sessions: publishers send video in, viewers get processed video out.

Both directions answer an offer the client sends over the WebSocket and
return a complete SDP answer (no trickle ICE), so signalling is one request
and one reply:

* **ingest** (a browser webcam, a robot): :class:`WebRTCPublisher` /
  :func:`accept_publisher` feed the peer's video track into a
  ``tracker.ingest.PushSource``, which the server opens as a session's source
  (``SessionManager.open(publisher.source)``). See :mod:`server.webrtc_ingest`.
* **egress** (the operator page): :class:`SessionVideoTrack` sends the
  session's processed frames, optionally with masks drawn in, and
  :func:`create_viewer_answer` answers the viewer's offer with it. See
  :mod:`server.webrtc_egress`; the frames come through a
  :class:`FrameTap` (:mod:`server.webrtc_tap`).

A server's handlers, roughly::

    async def on_webrtc_publish(msg):              # {"offer": {...}, "name": "robot1"}
        publisher = WebRTCPublisher(msg.get("name", "webrtc"))
        session = manager.open(publisher.source, name=publisher.source.name)
        try:
            answer = await publisher.accept(msg["offer"])
        except WebRTCError:
            manager.close(session.id, "the WebRTC offer was refused")
            raise
        return {"answer": answer, "session_id": session.id}

    async def on_webrtc_view(msg):                 # {"session_id", "offer", "draw_masks"}
        track = SessionVideoTrack(manager.get(msg["session_id"]), draw_masks=msg.get("draw_masks", True))
        viewer = await create_viewer_answer(msg["offer"], track)
        return {"answer": viewer.answer}           # keep viewer; close it with the client

Offers are checked (:func:`parse_offer`) before any peer connection exists;
every refusal is a :class:`WebRTCError` (a ``TrackerError``) whose message
says how to fix the offer. By default peers use no STUN/TURN servers
(:func:`peer_configuration`) and ICE host candidates on every interface but
127.0.0.1; :func:`set_ice_host_addresses` picks the addresses (tests and
in-process samples use ``["127.0.0.1"]``).

What does not live here: the WebSocket protocol and server (``server.app``),
the model and sessions (``tracker.session``).
"""

from __future__ import annotations

from server.webrtc_egress import (
    VIDEO_TIME_BASE,
    PtsClock,
    SessionVideoTrack,
    TrackStats,
    WebRTCViewer,
    create_viewer_answer,
    fit_result,
)
from server.webrtc_ingest import PublisherStats, WebRTCPublisher, accept_publisher
from server.webrtc_signalling import (
    MAX_SDP_BYTES,
    WebRTCError,
    answer_offer,
    description_to_dict,
    ice_host_addresses,
    parse_offer,
    peer_configuration,
    set_ice_host_addresses,
    video_directions,
)
from server.webrtc_slot import NewestSlot
from server.webrtc_tap import FrameTap, TappedFrame, frame_tap

__all__ = [
    "MAX_SDP_BYTES",
    "VIDEO_TIME_BASE",
    "FrameTap",
    "NewestSlot",
    "PtsClock",
    "PublisherStats",
    "SessionVideoTrack",
    "TappedFrame",
    "TrackStats",
    "WebRTCError",
    "WebRTCPublisher",
    "WebRTCViewer",
    "accept_publisher",
    "answer_offer",
    "create_viewer_answer",
    "description_to_dict",
    "fit_result",
    "frame_tap",
    "ice_host_addresses",
    "parse_offer",
    "peer_configuration",
    "set_ice_host_addresses",
    "video_directions",
]
