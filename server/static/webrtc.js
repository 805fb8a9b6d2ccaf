// WebRTC for the page: view a session's processed video, publish this browser's camera.
//
// Signalling is one request and its reply on the page's WebSocket
// (webrtc_view / webrtc_publish, docs/protocol.md): the server answers a
// complete offer, so the page gathers its ICE candidates before sending it
// (no trickle ICE). No STUN/TURN: the server and the browser reach each
// other directly (LAN, loopback); the server's ice_host_addresses picks the
// address it offers.

const ICE_GATHER_MS = 3000;

function gathered(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState === "complete") {
        pc.removeEventListener("icegatheringstatechange", done);
        resolve();
      }
    };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, ICE_GATHER_MS); // offer what was gathered by then
  });
}

async function completeOffer(pc) {
  await pc.setLocalDescription(await pc.createOffer());
  await gathered(pc);
  return { sdp: pc.localDescription.sdp, type: "offer" };
}

/**
 * Receive session ``sessionId``'s processed video (``drawMasks``: with the
 * masks blended in by the server). ``onTrack(stream)`` gets the video;
 * ``onFailed()`` is called if the connection fails later. Returns the peer
 * connection (close it to stop).
 */
export async function openViewer(request, sessionId, drawMasks, { onTrack, onFailed }) {
  const pc = new RTCPeerConnection({ iceServers: [] });
  try {
    pc.addTransceiver("video", { direction: "recvonly" });
    pc.ontrack = (e) => onTrack(e.streams && e.streams[0] ? e.streams[0] : new MediaStream([e.track]));
    pc.onconnectionstatechange = () => {
      if (pc.connectionState === "failed") onFailed();
    };
    const reply = await request("webrtc_view", {
      session_id: sessionId,
      offer: await completeOffer(pc),
      draw_masks: drawMasks,
    });
    await pc.setRemoteDescription(reply.answer);
    return pc;
  } catch (e) {
    pc.close();
    throw e;
  }
}

/**
 * Publish this browser's camera as a new session named ``webrtc:NAME``.
 * Returns ``{pc, stream, session}`` (the reply's SessionInfo); closing the
 * peer connection ends the session's source.
 */
export async function openPublisher(request, name) {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new Error("this browser offers no camera to this page (a camera needs https:// or localhost)");
  }
  const stream = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 640 } }, audio: false });
  const pc = new RTCPeerConnection({ iceServers: [] });
  try {
    for (const track of stream.getVideoTracks()) {
      track.contentHint = "detail"; // under load keep the resolution (masks, clicks), drop frames instead
      pc.addTrack(track, stream);
    }
    const reply = await request("webrtc_publish", { offer: await completeOffer(pc), name });
    await pc.setRemoteDescription(reply.answer);
    return { pc, stream, session: reply.session };
  } catch (e) {
    pc.close();
    for (const t of stream.getTracks()) t.stop();
    throw e;
  }
}
