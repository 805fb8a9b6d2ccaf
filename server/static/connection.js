// The page's WebSocket to the server: requests and their replies, frames and events in.
//
// docs/protocol.md: the server speaks first (hello); every request carries an
// id and gets exactly one reply or error with it. Browsers cannot set headers
// on a WebSocket, so the token goes in the URL's query (?token=); the page
// takes it from its own #token=... fragment (never sent to the server in an
// HTTP request) or its token field.

export const PROTOCOL_VERSION = 1;
const REQUEST_TIMEOUT_MS = 45000;

/** The token in a page URL's fragment, ``#token=...`` (empty string if none). */
export function tokenFromFragment(hash) {
  return new URLSearchParams(hash.replace(/^#/, "")).get("token") || "";
}

/** The server's WebSocket URL for a page served from ``location`` (same host and port). */
export function wsUrl(location, token) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/` + (token ? `?token=${encodeURIComponent(token)}` : "");
}

/** Why a WebSocket closed before the hello: a browser is not told, /healthz says whether the server is there. */
export async function explainRefusal(token) {
  let up = false;
  try {
    up = (await fetch("/healthz", { cache: "no-store" })).ok;
  } catch {
    up = false;
  }
  if (!up) return "Cannot reach the server. Is sam2-stream serve running?";
  if (!token) {
    return "The server refused the connection: it needs a token. Enter it above, or open this page as …/#token=YOUR_TOKEN.";
  }
  return "The server refused the connection: the token is wrong (or this page's origin is not allowed).";
}

/**
 * One WebSocket session with the server. ``handlers``: onHello(hello),
 * onFrame(msg), onEvent(msg), onClose({hadHello, code, reason}). Nothing can
 * be requested before the hello.
 */
export class Connection {
  constructor(url, handlers) {
    this.hello = null;
    this._handlers = handlers;
    this._nextId = 1;
    this._pending = new Map(); // id -> {resolve, reject, timer}
    this._closed = false;
    this.ws = new WebSocket(url);
    this.ws.binaryType = "arraybuffer";
    this.ws.onmessage = (e) => this._onMessage(e);
    this.ws.onclose = (e) => this._onClose(e);
  }

  get ready() {
    return !this._closed && this.hello !== null && this.ws.readyState === WebSocket.OPEN;
  }

  /** Send a request; resolves with its reply, rejects with an Error carrying the error's code and message. */
  request(type, fields = {}) {
    if (!this.ready) return Promise.reject(new Error("not connected to the server"));
    const id = this._nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new Error(`no answer to ${type} within ${REQUEST_TIMEOUT_MS / 1000} s`));
      }, REQUEST_TIMEOUT_MS);
      this._pending.set(id, { resolve, reject, timer });
      this.ws.send(JSON.stringify({ type, id, ...fields }));
    });
  }

  /** Close without calling onClose. */
  close() {
    this._closed = true;
    this._failPending("disconnected");
    this.ws.close();
  }

  _onMessage(e) {
    if (this._closed || typeof e.data !== "string") return; // binary frames are PNG masks; the page asks for RLE
    let msg;
    try {
      msg = JSON.parse(e.data);
    } catch {
      return;
    }
    switch (msg.type) {
      case "hello":
        if (msg.protocol_version !== PROTOCOL_VERSION) {
          this._closed = true;
          this.ws.close();
          this._handlers.onClose({
            hadHello: false,
            message: `This page speaks protocol ${PROTOCOL_VERSION}, the server ${msg.protocol_version}: reload the page.`,
          });
          return;
        }
        this.hello = msg;
        this._handlers.onHello(msg);
        return;
      case "reply":
      case "error": {
        const p = this._pending.get(msg.id);
        if (!p) return;
        this._pending.delete(msg.id);
        clearTimeout(p.timer);
        if (msg.type === "reply") {
          p.resolve(msg);
        } else {
          const err = new Error(msg.message);
          err.code = msg.code;
          err.field = msg.field || null;
          p.reject(err);
        }
        return;
      }
      case "frame":
        this._handlers.onFrame(msg);
        return;
      case "event":
        this._handlers.onEvent(msg);
        return;
      default: // new message types may come within a version: ignore them
    }
  }

  _onClose(e) {
    if (this._closed) return;
    this._closed = true;
    this._failPending("the connection closed");
    this._handlers.onClose({ hadHello: this.hello !== null, code: e.code, reason: e.reason });
  }

  _failPending(reason) {
    for (const p of this._pending.values()) {
      clearTimeout(p.timer);
      p.reject(new Error(reason));
    }
    this._pending.clear();
  }
}
