// The operator page: sessions, live video over WebRTC, masks over it, clicks to track.
//
// The page does nothing until the server's hello arrives on its WebSocket
// (connection.js: same host and port, ?token= from the #token=... fragment
// or the token field). A session's processed video comes over WebRTC
// (webrtc.js) into <video>; its masks come over the WebSocket (COCO RLE, one
// message per processed frame, rle.js) and are drawn on a canvas above it
// (overlay.js). The video carries no frame_idx, so for each video frame the
// browser presents (requestVideoFrameCallback) the page shows the newest
// mask frame that had arrived when that video frame was received
// (overlay.pickFrame); without that callback, the newest mask frame. "masks
// drawn by the server" asks for video with the masks blended in instead:
// exact, and nothing drawn here. Clicks and boxes carry the frame_idx of the
// mask frame on screen, so the engine conditions on what the operator saw.
//
// When the model runs slower than the video, a notice under the video says so,
// with both rates and what would help (speed.js).
//
// Image mode (image.js, the header's "Image" button) segments one picture on
// the same connection; switching modes keeps the session on screen and the
// image open, nothing reloads.
//
// window.sam2stream is the page's state, for the console and the tests.

import { Connection, explainRefusal, tokenFromFragment, wsUrl } from "./connection.js";
import { initImageMode } from "./image.js";
import { drawMarks, drawMasks, pickFrame } from "./overlay.js";
import { objectCss } from "./rle.js";
import { formatFps, modelFps, slowNotice } from "./speed.js";
import { openPublisher, openViewer } from "./webrtc.js";

const DRAG_PX = 6; // a press moved further than this (screen px) is a box, not a click
const RECENT_FRAMES = 64;
const SYNC_SLACK_MS = 10;
const MARK_MS = 2000;
const FPS_WINDOW_MS = 10000;
const NAME_RE = /^[A-Za-z0-9_.-]{1,64}$/;

const $ = (id) => document.getElementById(id);

const state = {
  conn: null, // Connection
  hello: null,
  session: null, // SessionInfo of the session on screen
  frames: [], // its recent frame messages, oldest first, each with _recvMs
  shown: null, // the frame message whose masks are on screen: what prompts refer to
  drawnKey: null,
  objects: new Map(), // obj_id -> {visible, lost, hidden}
  promptMasks: new Map(), // obj_id -> {frame_idx, mask}: a prompt reply's mask until frames carry the object
  marks: [], // recent prompts to draw: {points, label, box, until}
  selected: null, // obj_id, or null: the next click starts a new object
  view: null, // {pc, sessionId, drawMasks}
  publish: null, // {pc, stream, sessionId}
  drag: null,
  videoTimes: [], // performance.now() of presented video frames (last FPS_WINDOW_MS)
  maskTimes: [], // performance.now() of mask frames received (last FPS_WINDOW_MS)
  skewS: Infinity, // min over frames of (browser clock - sent_s); negative: the browser clock is behind
  rvfc: "requestVideoFrameCallback" in HTMLVideoElement.prototype,
  lastStats: 0,
  mode: "live", // or "image"
  image: null, // image mode's state (image.js)
};
window.sam2stream = state;
let imageMode = null;

// ------------------------------------------------------------------ status and messages

function showMessage(text, kind = "error") {
  const el = $("message");
  el.textContent = text;
  el.dataset.kind = kind;
  el.hidden = !text;
}

function setConnStatus(text, status) {
  const el = $("conn-status");
  el.textContent = text;
  el.dataset.state = status;
}

function features() {
  return (state.hello && state.hello.features) || [];
}

function updateControls() {
  const connected = state.hello !== null;
  const sources = connected ? state.hello.sources : [];
  $("source").disabled = !sources.length;
  $("open").disabled = !sources.length;
  const canPublish = features().includes("webrtc_publish");
  $("publish").disabled = !connected || !canPublish;
  $("publish").title = connected && !canPublish ? "this server takes no WebRTC video" : "";
  $("publish").textContent = state.publish ? "Stop publishing" : "Publish my camera";
  $("refresh").disabled = !connected;
  const inSession = connected && state.session !== null;
  $("new-object").disabled = !inSession;
  $("close-session").disabled = !inSession;
  $("server-masks").disabled = !inSession || !features().includes("webrtc_view");
  $("view").classList.toggle("active", inSession);
}

/** Run an operator action, showing its error instead of throwing. */
async function act(fn) {
  try {
    showMessage("");
    await fn();
  } catch (e) {
    showMessage(e.message || String(e));
  }
}

function request(type, fields) {
  if (!state.conn) return Promise.reject(new Error("not connected to the server"));
  return state.conn.request(type, fields);
}

// ------------------------------------------------------------------ connecting

function connect() {
  disconnect();
  const token = $("token").value.trim();
  setConnStatus("connecting…", "connecting");
  showMessage("");
  const conn = new Connection(wsUrl(location, token), {
    onHello: (hello) => {
      state.hello = hello;
      setConnStatus(`connected: ${hello.model.name} on ${hello.model.device}`, "connected");
      $("source").replaceChildren(...hello.sources.map((name) => new Option(name, name)));
      // a model picker only where the server offers a choice; "" = the source's or server's default
      const models = hello.models || [];
      $("model").replaceChildren(
        new Option("default model", ""),
        ...models.map((m) => new Option(`${m.name} (${m.family || "SAM 2"}, ${m.image_size} px, ${m.device})`, m.name)),
      );
      $("model").hidden = models.length < 2;
      updateControls();
      refreshSessions();
      imageMode.onConnected();
    },
    onFrame,
    onEvent,
    onClose: async ({ hadHello, code, reason, message }) => {
      if (state.conn !== conn) return;
      state.conn = null;
      state.hello = null;
      leaveSession();
      imageMode.onDisconnected();
      updateControls();
      setConnStatus("not connected", "disconnected");
      if (message) showMessage(message);
      else if (hadHello) showMessage(`The connection to the server closed (code ${code}${reason ? ": " + reason : ""}). Press Connect.`);
      else showMessage(await explainRefusal(token));
    },
  });
  state.conn = conn;
}

function disconnect() {
  if (state.conn) {
    state.conn.close();
    state.conn = null;
  }
  state.hello = null;
  leaveSession();
  if (imageMode) imageMode.onDisconnected();
  updateControls();
}

// ------------------------------------------------------------------ sessions

async function refreshSessions() {
  let reply;
  try {
    reply = await request("list_sessions");
  } catch {
    return;
  }
  const items = reply.sessions.map((s) => {
    const li = document.createElement("li");
    li.dataset.sessionId = s.session_id;
    li.classList.toggle("current", state.session !== null && state.session.session_id === s.session_id);
    const label = document.createElement("span");
    label.className = "grow";
    const model = s.model ? ` · ${s.model}` : "";
    label.textContent = `${s.name}${model} · ${s.state} · ${s.frames_processed} frames · ${s.objects.length} objects`;
    label.title = s.source;
    const watch = document.createElement("button");
    watch.type = "button";
    watch.className = "small";
    watch.textContent = "Watch";
    watch.onclick = () => act(() => watchExisting(s.session_id));
    li.append(label, watch);
    return li;
  });
  if (!items.length) {
    const li = document.createElement("li");
    li.className = "hint";
    li.textContent = "no session is open";
    items.push(li);
  }
  $("sessions").replaceChildren(...items);
}

async function openSource() {
  const source = $("source").value;
  if (!source) throw new Error("choose a source first");
  const fields = { source, mask_format: "rle" };
  if ($("model").value) fields.model = $("model").value;
  const reply = await request("open", fields);
  await watch(reply.session);
}

async function watchExisting(sessionId) {
  await request("subscribe", { session_id: sessionId, mask_format: "rle" });
  const info = (await request("list_sessions")).sessions.find((s) => s.session_id === sessionId);
  if (!info) throw new Error("that session has just closed");
  await watch(info);
}

/** Show ``session`` (this connection is subscribed to it): its objects, its video. */
async function watch(session) {
  const previous = state.session;
  leaveSession({ keepPublishing: true });
  if (previous && previous.session_id !== session.session_id) {
    request("unsubscribe", { session_id: previous.session_id }).catch(() => {});
  }
  state.session = session;
  for (const objId of session.objects) state.objects.set(objId, { visible: true, lost: false, hidden: false });
  $("session-title").textContent = `${session.name} (${session.session_id})`;
  if (session.width && session.height) setFrameSize(session.width, session.height);
  renderObjects();
  updateControls();
  refreshSessions();
  await startView();
}

/** Forget the session on screen (stop its video; the publisher too unless ``keepPublishing``). */
function leaveSession({ keepPublishing = false } = {}) {
  stopView();
  if (!keepPublishing) stopPublish();
  Object.assign(state, { session: null, frames: [], shown: null, drawnKey: null, marks: [], selected: null, drag: null });
  state.objects.clear();
  state.promptMasks.clear();
  state.videoTimes = [];
  state.maskTimes = [];
  $("session-title").textContent = "no session";
  for (const id of ["masks", "marks"]) $(id).getContext("2d").clearRect(0, 0, $(id).width, $(id).height);
  renderObjects();
  updateStats(true);
}

async function closeSession() {
  if (state.session) await request("close", { session_id: state.session.session_id });
}

// ------------------------------------------------------------------ video

async function startView() {
  if (!features().includes("webrtc_view")) {
    $("sync-mode").textContent = "this server sends no video (no WebRTC): masks only";
    return;
  }
  const sessionId = state.session.session_id;
  const drawMasks = $("server-masks").checked;
  const view = { pc: null, sessionId, drawMasks };
  state.view = view;
  const video = $("video");
  let pc;
  try {
    pc = await openViewer(request, sessionId, drawMasks, {
      onTrack: (stream) => {
        if (state.view !== view) return;
        video.srcObject = stream;
        video.play().catch(() => {});
        if (state.rvfc) video.requestVideoFrameCallback((now, meta) => onVideoFrame(view, now, meta));
      },
      onFailed: () => {
        if (state.view === view) showMessage("The video connection (WebRTC) failed; masks still arrive. Check the server's ice_host_addresses.");
      },
    });
  } catch (e) {
    if (state.view === view) stopView();
    throw new Error(`no video: ${e.message}; masks still arrive`);
  }
  if (state.view !== view) {
    pc.close(); // replaced or left meanwhile
    return;
  }
  view.pc = pc;
  updateSyncMode();
}

function stopView() {
  if (state.view && state.view.pc) state.view.pc.close();
  state.view = null;
  $("video").srcObject = null;
  updateSyncMode();
}

function updateSyncMode() {
  let text = "";
  if (state.view) {
    if (state.view.drawMasks) text = "masks in the video (drawn by the server)";
    else text = state.rvfc ? "masks matched to video frames" : "newest masks over the video";
  }
  $("sync-mode").textContent = text;
}

async function toggleServerMasks() {
  if (!state.session) return;
  stopView();
  redraw(true);
  await startView();
}

function onVideoFrame(view, now, meta) {
  if (state.view !== view) return;
  state.videoTimes.push(performance.now());
  const at = meta && meta.receiveTime ? meta.receiveTime : now;
  redraw(false, pickFrame(state.frames, at, SYNC_SLACK_MS) || state.frames[state.frames.length - 1] || null);
  $("video").requestVideoFrameCallback((n, m) => onVideoFrame(view, n, m));
}

function videoPlaying() {
  const video = $("video");
  return state.rvfc && state.view !== null && video.readyState >= 2 && !video.paused;
}

async function togglePublish() {
  if (state.publish) {
    stopPublish();
    updateControls();
    return;
  }
  const name = $("publish-name").value.trim() || "browser";
  if (!NAME_RE.test(name)) throw new Error("the name may have 1 to 64 letters, digits, '_', '.' and '-'");
  const { pc, stream, session } = await openPublisher(request, name);
  state.publish = { pc, stream, sessionId: session.session_id };
  const local = $("local");
  local.srcObject = stream;
  local.hidden = false;
  updateControls();
  await request("subscribe", { session_id: session.session_id, mask_format: "rle" });
  await watch(session);
}

function stopPublish() {
  if (!state.publish) return;
  state.publish.pc.close();
  for (const t of state.publish.stream.getTracks()) t.stop();
  state.publish = null;
  const local = $("local");
  local.srcObject = null;
  local.hidden = true;
}

// ------------------------------------------------------------------ frames and events

function setFrameSize(w, h) {
  for (const id of ["masks", "marks"]) {
    const c = $(id);
    if (c.width !== w || c.height !== h) {
      c.width = w;
      c.height = h;
      state.drawnKey = null;
    }
  }
  $("view").style.aspectRatio = `${w} / ${h}`;
}

function onFrame(msg) {
  if (!state.session || msg.session_id !== state.session.session_id) return;
  const now = performance.now();
  msg._recvMs = now;
  state.skewS = Math.min(state.skewS, Date.now() / 1000 - msg.sent_s);
  state.frames.push(msg);
  if (state.frames.length > RECENT_FRAMES) state.frames.shift();
  state.maskTimes.push(now);
  setFrameSize(msg.width, msg.height);
  const seen = new Set();
  for (const o of msg.objects) {
    seen.add(o.obj_id);
    const obj = state.objects.get(o.obj_id) || { visible: o.visible, lost: false, hidden: false };
    obj.visible = o.visible;
    if (o.visible) obj.lost = false;
    state.objects.set(o.obj_id, obj);
    const pm = state.promptMasks.get(o.obj_id);
    if (pm && msg.frame_idx >= pm.frame_idx) state.promptMasks.delete(o.obj_id);
  }
  for (const objId of [...state.objects.keys()]) {
    if (!seen.has(objId) && !state.promptMasks.has(objId)) state.objects.delete(objId); // removed by someone
  }
  if (state.selected !== null && !state.objects.has(state.selected)) state.selected = null;
  renderObjects();
  if (!videoPlaying()) redraw(); // no video frames to follow: the newest masks
}

function onEvent(ev) {
  if (!state.session || ev.session_id !== state.session.session_id) return;
  if (ev.kind === "lost" || ev.kind === "found") {
    const obj = state.objects.get(ev.obj_id);
    if (obj) {
      obj.lost = ev.kind === "lost";
      renderObjects();
    }
  } else if (["closed", "source_ended", "source_failed", "source_dropped", "error", "moved"].includes(ev.kind)) {
    const bad = ev.kind === "error" || ev.kind === "source_failed" || ev.kind === "moved";
    showMessage(`Session ${state.session.name}: ${ev.message}`, bad ? "error" : "info");
    if (ev.kind === "closed") {
      leaveSession({ keepPublishing: !(state.publish && state.publish.sessionId === ev.session_id) });
      updateControls();
      refreshSessions();
    }
  }
}

// ------------------------------------------------------------------ drawing

/** Show the masks of ``frame`` (default: the newest); ``force``: even if that frame is drawn already. */
function redraw(force = false, frame = undefined) {
  const f = frame === undefined ? state.frames[state.frames.length - 1] || null : frame;
  state.shown = f;
  const serverDraws = state.view !== null && state.view.drawMasks;
  const hidden = [...state.objects].filter(([, o]) => o.hidden).map(([id]) => id);
  const key = `${f ? f.frame_idx : "-"}|${serverDraws}|${hidden}|${[...state.promptMasks.keys()]}`;
  if (force || key !== state.drawnKey) {
    state.drawnKey = key;
    drawMasks($("masks"), serverDraws ? null : f, state.objects, serverDraws ? new Map() : state.promptMasks);
  }
  redrawMarks();
  updateStats();
}

function redrawMarks() {
  const now = performance.now();
  state.marks = state.marks.filter((m) => m.until > now);
  drawMarks($("marks"), {
    marks: state.marks,
    frame: state.shown,
    objects: state.objects,
    dragBox: state.drag && state.drag.box,
    labels: !(state.view && state.view.drawMasks),
  });
}

function updateStats(force = false) {
  const now = performance.now();
  if (!force && now - state.lastStats < 250) return;
  state.lastStats = now;
  state.videoTimes = state.videoTimes.filter((t) => now - t < FPS_WINDOW_MS);
  state.maskTimes = state.maskTimes.filter((t) => now - t < FPS_WINDOW_MS);
  const f = state.shown;
  // a browser clock behind the server's would show too small a lag: take that skew out
  const skew = Number.isFinite(state.skewS) ? Math.min(0, state.skewS) : 0;
  $("stat-frame").textContent = f ? String(f.frame_idx) : "–";
  $("stat-lag").textContent = f ? String(Math.round((Date.now() / 1000 - f.arrival_s - skew) * 1000)) : "–";
  $("stat-vfps").textContent = state.view ? fps(state.videoTimes, now) : "–";
  $("stat-mfps").textContent = state.session ? fps(state.maskTimes, now) : "–";
  const model = state.session ? modelFps(state.frames) : null;
  $("stat-model-fps").textContent = model === null ? "–" : formatFps(model);
  const notice = state.session ? slowNotice(state.session, state.frames, sessionModel()) : "";
  if ($("slow").textContent !== notice) $("slow").textContent = notice;
  $("slow").hidden = !notice;
}

/** The model of the session on screen ({name, image_size, device}), where it runs now. */
function sessionModel() {
  const hello = state.hello;
  if (!hello || !state.session) return null;
  const info = (hello.models || []).find((m) => m.name === state.session.model) || hello.model;
  return info && { ...info, device: state.session.device || info.device };
}

/** Frames per second from the arrival times of the last FPS_WINDOW_MS; 0 once frames stop. */
function fps(times, now) {
  const n = times.length;
  if (n < 2 || now - times[n - 1] > FPS_WINDOW_MS / 2) return "0";
  return ((1000 * (n - 1)) / (times[n - 1] - times[0])).toFixed(1);
}

// ------------------------------------------------------------------ objects

function renderObjects() {
  const items = [...state.objects.keys()]
    .sort((a, b) => a - b)
    .map((objId) => {
      const obj = state.objects.get(objId);
      const li = document.createElement("li");
      li.dataset.objId = String(objId);
      li.classList.toggle("selected", state.selected === objId);
      li.onclick = () => select(objId);
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = objectCss(objId);
      const name = document.createElement("span");
      name.className = "grow";
      name.textContent = `Object ${objId}`;
      const vis = document.createElement("span");
      vis.className = "visibility";
      vis.dataset.visible = String(obj.visible && !obj.lost);
      vis.textContent = obj.lost ? "lost" : obj.visible ? "visible" : "not visible";
      const show = document.createElement("input");
      show.type = "checkbox";
      show.checked = !obj.hidden;
      show.title = "show its mask";
      show.setAttribute("aria-label", `show object ${objId}`);
      show.onclick = (e) => {
        e.stopPropagation();
        obj.hidden = !show.checked;
        redraw(true, state.shown);
      };
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "small remove";
      remove.textContent = "Remove";
      remove.onclick = (e) => {
        e.stopPropagation();
        act(() => removeObject(objId));
      };
      li.append(swatch, name, vis, show, remove);
      return li;
    });
  $("objects").replaceChildren(...items);
  $("target").textContent = state.selected === null ? "next click: a new object" : `next click: object ${state.selected}`;
}

function select(objId) {
  state.selected = objId;
  renderObjects();
}

async function removeObject(objId) {
  const session = state.session;
  await request("remove_object", { session_id: session.session_id, obj_id: objId });
  if (state.session !== session) return;
  state.objects.delete(objId);
  state.promptMasks.delete(objId);
  if (state.selected === objId) state.selected = null;
  renderObjects();
  redraw(true, state.shown);
}

// ------------------------------------------------------------------ clicks and boxes

/** The source pixel under a pointer event. */
function sourceXY(e) {
  const canvas = $("marks");
  const rect = canvas.getBoundingClientRect();
  const x = Math.floor(((e.clientX - rect.left) * canvas.width) / rect.width);
  const y = Math.floor(((e.clientY - rect.top) * canvas.height) / rect.height);
  return [Math.min(canvas.width - 1, Math.max(0, x)), Math.min(canvas.height - 1, Math.max(0, y))];
}

function onPointerDown(e) {
  if (e.button !== 0 || !state.session) return;
  e.preventDefault();
  $("marks").setPointerCapture(e.pointerId);
  state.drag = {
    start: sourceXY(e),
    client: [e.clientX, e.clientY],
    negative: e.shiftKey || e.altKey,
    frame: state.shown, // what the operator saw when pressing
    box: null,
  };
}

function onPointerMove(e) {
  const d = state.drag;
  if (!d) return;
  if (d.box || Math.hypot(e.clientX - d.client[0], e.clientY - d.client[1]) > DRAG_PX) {
    const [x1, y1] = sourceXY(e);
    const [x0, y0] = d.start;
    d.box = [Math.min(x0, x1), Math.min(y0, y1), Math.max(x0, x1), Math.max(y0, y1)];
    redrawMarks();
  }
}

function onPointerUp() {
  const d = state.drag;
  state.drag = null;
  if (!d || !state.session) return;
  if (d.box) act(() => prompt({ box: d.box, frame: d.frame }));
  else act(() => prompt({ point: d.start, negative: d.negative, frame: d.frame }));
}

async function prompt({ point, box, negative = false, frame }) {
  if (!frame) throw new Error("no frame on screen yet: wait for the video");
  const objId = state.selected;
  if (negative && objId === null) throw new Error("a negative click needs an object: select one in the list first");
  const session = state.session;
  const fields = { session_id: session.session_id, obj_id: objId, frame_idx: frame.frame_idx };
  const until = performance.now() + MARK_MS;
  let reply;
  if (box) {
    state.marks.push({ box, until });
    redrawMarks();
    reply = await request("add_box", { ...fields, box_xyxy: box });
  } else {
    state.marks.push({ points: [point], label: negative ? 0 : 1, until });
    redrawMarks();
    reply = await request("add_points", {
      ...fields,
      points_xy: [point],
      labels: [negative ? 0 : 1],
      clear_old_points: objId === null, // later clicks refine the object
    });
  }
  if (state.session !== session) return;
  const obj = state.objects.get(reply.obj_id) || { visible: true, lost: false, hidden: false };
  if (reply.object) obj.visible = reply.object.visible;
  state.objects.set(reply.obj_id, obj);
  if (reply.object && reply.object.mask) {
    state.promptMasks.set(reply.obj_id, { frame_idx: reply.frame_idx, mask: reply.object.mask });
  }
  state.selected = reply.obj_id;
  renderObjects();
  redraw(true, state.shown);
}

// ------------------------------------------------------------------ modes

/** Show live video (``"live"``) or image mode (``"image"``); the other keeps running unseen. */
function setMode(mode) {
  state.mode = mode;
  $("live-mode").hidden = mode !== "live";
  $("image-mode").hidden = mode !== "image";
  $("mode-live").setAttribute("aria-pressed", String(mode === "live"));
  $("mode-image").setAttribute("aria-pressed", String(mode === "image"));
  if (mode === "image" && state.hello && !features().includes("images")) {
    showMessage("This server does not serve image mode ([images] enabled is off).", "info");
  }
}

// ------------------------------------------------------------------ wiring

function init() {
  $("token").value = tokenFromFragment(location.hash);
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    connect();
  });
  $("open").onclick = () => act(openSource);
  $("publish").onclick = () => act(togglePublish);
  $("refresh").onclick = () => act(refreshSessions);
  $("new-object").onclick = () => select(null);
  $("close-session").onclick = () => act(closeSession);
  $("server-masks").onchange = () => act(toggleServerMasks);
  $("mode-live").onclick = () => setMode("live");
  $("mode-image").onclick = () => setMode("image");
  imageMode = initImageMode({ request, act, features, hello: () => state.hello });
  state.image = imageMode.state;
  const marks = $("marks");
  marks.addEventListener("pointerdown", onPointerDown);
  marks.addEventListener("pointermove", onPointerMove);
  marks.addEventListener("pointerup", onPointerUp);
  marks.addEventListener("pointercancel", () => (state.drag = null));
  marks.addEventListener("contextmenu", (e) => e.preventDefault());
  window.addEventListener("hashchange", () => {
    const token = tokenFromFragment(location.hash);
    if (token && token !== $("token").value) {
      $("token").value = token;
      connect();
    }
  });
  setInterval(() => state.hello && refreshSessions(), 2000);
  setInterval(() => state.session && (redrawMarks(), updateStats()), 500); // marks fade, stats move on a pause
  updateControls();
  connect();
}

init();
