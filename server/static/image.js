// The operator page's image mode: one picture, prompted many times.
//
// docs/protocol.md (image mode): the chosen or dropped file goes to the server
// once (image_open, base64), which computes its embedding; each click (a
// positive point), shift/alt-click (a negative one) or drag (a box) sends
// every prompt so far on that image with image_segment, refining the
// candidate on screen (``previous``, SAM's mask_input) once there is one.
// The reply's candidate masks, best first, are listed with SAM's predicted
// IoU; the chosen one is drawn over the picture on #image-masks (nothing but
// that mask, half-opaque, so what it shows can be checked against the
// server's) and downloads as a PNG or as COCO RLE (imagemask.js). The
// picture is shown upright (EXIF orientation applied, as the server does) at
// the size the server reports, so a canvas pixel is an image pixel: what
// prompts use. The server forgets images with the connection; the page opens
// the file again on the next prompt.
//
// window.sam2stream.image is this mode's state, for the console and the tests.

import { cocoRle, encodeMaskPng, fileTooLarge, segmentFields, toBase64 } from "./imagemask.js";
import { MASK_ALPHA } from "./overlay.js";
import { decodeMask, objectColour, paintMask } from "./rle.js";

const DRAG_PX = 6; // a press moved further than this (screen px) is a box, not a click
const MASK_COLOUR = objectColour(1);
const THUMB_W = 64;

const $ = (id) => document.getElementById(id);

/** A server error as the operator reads it: its message, then its code and the field it names. */
function withCode(e) {
  if (!e.code) return e;
  return new Error(`${e.message} (${e.code}${e.field ? `, field ${e.field}` : ""})`);
}

/**
 * Wire the image mode's elements. ``page``: request(type, fields) → reply
 * promise, act(fn) (runs an operator action, showing its error),
 * features() (the hello's features), hello() (the hello, or null). Returns {state, onConnected, onDisconnected}.
 */
export function initImageMode(page) {
  const state = {
    name: null, // the file's name
    bytes: null, // its bytes (Uint8Array), kept to open it again after a reconnect
    bitmap: null, // the picture as the browser decoded it (null: a format it cannot show)
    imageId: null, // the server's, null until opened (and after the connection closed)
    width: 0,
    height: 0,
    opened: null, // the image_open reply
    prompts: { points: [], labels: [], box: null },
    answer: null, // the last image_segment reply
    chosen: 0, // its candidate on screen
    drag: null,
    busy: false,
  };

  function drawPicture() {
    const c = $("image-pixels");
    const ctx = c.getContext("2d");
    ctx.fillStyle = "#333";
    ctx.fillRect(0, 0, c.width, c.height);
    if (state.bitmap) ctx.drawImage(state.bitmap, 0, 0, c.width, c.height);
  }

  function setSize(w, h) {
    for (const id of ["image-pixels", "image-masks", "image-marks"]) {
      $(id).width = w;
      $(id).height = h;
    }
    $("image-view").style.aspectRatio = `${w} / ${h}`;
  }

  function drawMask() {
    const c = $("image-masks");
    const ctx = c.getContext("2d");
    ctx.clearRect(0, 0, c.width, c.height);
    const cand = chosenCandidate();
    if (!cand || !cand.mask || cand.mask.size[0] !== c.height || cand.mask.size[1] !== c.width) return;
    const image = ctx.createImageData(c.width, c.height);
    paintMask(image.data, decodeMask(cand.mask), MASK_COLOUR, MASK_ALPHA);
    ctx.putImageData(image, 0, 0);
  }

  function drawMarks() {
    const c = $("image-marks");
    const ctx = c.getContext("2d");
    ctx.clearRect(0, 0, c.width, c.height);
    const box = (b, dashed) => {
      ctx.setLineDash(dashed ? [4, 3] : []);
      ctx.lineWidth = Math.max(2, c.width / 300);
      ctx.strokeStyle = "white";
      ctx.strokeRect(b[0], b[1], b[2] - b[0], b[3] - b[1]);
      ctx.setLineDash([]);
    };
    if (state.prompts.box) box(state.prompts.box, false);
    if (state.drag && state.drag.box) box(state.drag.box, true);
    const r = Math.max(3, Math.round(c.width / 100));
    state.prompts.points.forEach(([x, y], i) => {
      ctx.beginPath();
      ctx.arc(x + 0.5, y + 0.5, r, 0, 2 * Math.PI);
      ctx.fillStyle = state.prompts.labels[i] ? "#2ecc40" : "#ff4136";
      ctx.fill();
      ctx.lineWidth = 1.5;
      ctx.strokeStyle = "white";
      ctx.stroke();
    });
  }

  function chosenCandidate() {
    return state.answer ? state.answer.masks[state.chosen] || null : null;
  }

  function thumbnail(cand) {
    const c = document.createElement("canvas");
    const w = THUMB_W;
    const h = Math.max(1, Math.round((THUMB_W * state.height) / state.width));
    c.width = w;
    c.height = h;
    c.className = "thumb";
    const ctx = c.getContext("2d");
    if (state.bitmap) ctx.drawImage(state.bitmap, 0, 0, w, h);
    if (cand.mask && cand.mask.format === "rle") {
      const full = document.createElement("canvas");
      full.width = state.width;
      full.height = state.height;
      const fctx = full.getContext("2d");
      const image = fctx.createImageData(state.width, state.height);
      paintMask(image.data, decodeMask(cand.mask), MASK_COLOUR, 200);
      fctx.putImageData(image, 0, 0);
      ctx.drawImage(full, 0, 0, w, h);
    }
    return c;
  }

  function render() {
    const hasImage = state.name !== null;
    $("image-drop-hint").hidden = hasImage;
    $("image-clear").disabled = !hasImage;
    const cand = chosenCandidate();
    $("image-download-png").disabled = !cand;
    $("image-download-rle").disabled = !cand;
    let info = "no image: choose or drop one";
    if (hasImage) {
      info = state.name;
      if (state.opened) {
        const o = state.opened;
        info += ` · ${o.width} × ${o.height}` + (o.cached ? " · embedding cached" : ` · embedding ${o.embed_s.toFixed(2)} s`);
      } else {
        info += " · opening…";
      }
      if (!state.bitmap) info += " · this browser cannot show this format";
    }
    $("image-info").textContent = info;
    const items = (state.answer ? state.answer.masks : []).map((m, k) => {
      const li = document.createElement("li");
      li.dataset.candidate = String(k);
      li.classList.toggle("selected", k === state.chosen);
      li.onclick = () => choose(k);
      const label = document.createElement("span");
      label.className = "grow";
      label.textContent = `#${k + 1}${k === 0 ? " (best)" : ""}`;
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = m.score.toFixed(3);
      score.title = "SAM's predicted IoU";
      const area = document.createElement("span");
      area.className = "hint";
      area.textContent = `${m.area} px`;
      li.append(thumbnail(m), label, score, area);
      return li;
    });
    if (!items.length) {
      const li = document.createElement("li");
      li.className = "hint";
      li.textContent = hasImage ? "click the image: its candidate masks appear here" : "no candidates yet";
      items.push(li);
    }
    $("image-candidates").replaceChildren(...items);
    const a = state.answer;
    $("image-timing").textContent = a ? `answer ${a.answer} · decoder ${(a.decode_s * 1000).toFixed(0)} ms` : "";
  }

  function redraw() {
    drawMask();
    drawMarks();
    render();
  }

  function choose(k) {
    state.chosen = k;
    redraw();
  }

  function clearPrompts() {
    state.prompts = { points: [], labels: [], box: null };
    state.answer = null;
    state.chosen = 0;
    redraw();
  }

  async function closeOnServer() {
    const id = state.imageId;
    state.imageId = null;
    if (id) await page.request("image_close", { image_id: id }).catch(() => {});
  }

  /** Open ``state.bytes`` on the server (again, after a reconnect). */
  async function openOnServer() {
    if (!page.features().includes("images")) throw new Error("this server does not serve image mode (its [images] enabled is off)");
    const bytes = state.bytes;
    const reply = await page.request("image_open", { data: toBase64(bytes) });
    if (state.bytes !== bytes) {
      page.request("image_close", { image_id: reply.image_id }).catch(() => {}); // another file meanwhile
      return;
    }
    state.imageId = reply.image_id;
    state.opened = reply;
    if (reply.width !== state.width || reply.height !== state.height) {
      state.width = reply.width;
      state.height = reply.height;
      setSize(reply.width, reply.height);
      drawPicture();
    }
  }

  /** Show ``file`` and open it on the server, forgetting the previous image. */
  async function load(file) {
    if (!file) return;
    const tooLarge = fileTooLarge(file.size, page.hello());
    if (tooLarge) throw new Error(`${file.name}: ${tooLarge}`);
    await closeOnServer();
    const bytes = new Uint8Array(await file.arrayBuffer());
    let bitmap = null;
    try {
      bitmap = await createImageBitmap(new Blob([bytes]), { imageOrientation: "from-image" });
    } catch {
      bitmap = null; // the server decides whether it is an image, and says why not
    }
    if (state.bitmap) state.bitmap.close();
    Object.assign(state, { name: file.name, bytes, bitmap, opened: null, answer: null, chosen: 0, drag: null });
    state.prompts = { points: [], labels: [], box: null };
    state.width = bitmap ? bitmap.width : 320;
    state.height = bitmap ? bitmap.height : 240;
    setSize(state.width, state.height);
    drawPicture();
    redraw();
    try {
      await openOnServer();
    } catch (e) {
      if (state.bytes === bytes) {
        if (state.bitmap) state.bitmap.close();
        Object.assign(state, { name: null, bytes: null, bitmap: null, opened: null });
        drawPicture();
        redraw();
      }
      throw withCode(e);
    } finally {
      render();
    }
  }

  /**
   * Send the prompts so far; on an error the prompt just added is taken back
   * (``undo``). An answer for a picture replaced, or prompts cleared, meanwhile is dropped.
   */
  async function segment(undo) {
    if (state.busy) {
      undo();
      throw new Error("still waiting for the last answer");
    }
    const { bytes, prompts } = state;
    const multimask = $("image-multimask").checked;
    state.busy = true;
    drawMarks();
    try {
      if (!state.imageId) await openOnServer();
      // only an answer on this image_id can be refined: after a reconnect the image is new to the server
      const previous = state.answer && state.answer.image_id === state.imageId ? state.chosen : null;
      let reply;
      try {
        reply = await page.request("image_segment", segmentFields(state.imageId, prompts, { multimask, previous }));
      } catch (e) {
        if (e.code !== "unknown_image" || state.bytes !== bytes) throw e;
        await openOnServer(); // closed meanwhile (a reconnect): open it again, start afresh
        reply = await page.request("image_segment", segmentFields(state.imageId, prompts, { multimask, previous: null }));
      }
      if (state.bytes !== bytes || state.prompts !== prompts || reply.image_id !== state.imageId) return; // cleared or replaced meanwhile
      state.answer = reply;
      state.chosen = 0;
    } catch (e) {
      if (state.bytes !== bytes) return; // about a picture no longer on screen
      undo(prompts);
      throw withCode(e);
    } finally {
      state.busy = false;
      redraw();
    }
  }

  function addPoint(xy, negative) {
    state.prompts.points.push(xy);
    state.prompts.labels.push(negative ? 0 : 1);
    return segment((prompts = state.prompts) => {
      prompts.points.pop();
      prompts.labels.pop();
    });
  }

  function setBox(box) {
    const before = state.prompts.box;
    state.prompts.box = box;
    return segment((prompts = state.prompts) => (prompts.box = before));
  }

  function imageXY(e) {
    const c = $("image-marks");
    const rect = c.getBoundingClientRect();
    const x = Math.floor(((e.clientX - rect.left) * c.width) / rect.width);
    const y = Math.floor(((e.clientY - rect.top) * c.height) / rect.height);
    return [Math.min(c.width - 1, Math.max(0, x)), Math.min(c.height - 1, Math.max(0, y))];
  }

  function onPointerDown(e) {
    if (e.button !== 0 || state.name === null) return;
    e.preventDefault();
    $("image-marks").setPointerCapture(e.pointerId);
    state.drag = { start: imageXY(e), client: [e.clientX, e.clientY], negative: e.shiftKey || e.altKey, box: null };
  }

  function onPointerMove(e) {
    const d = state.drag;
    if (!d) return;
    if (d.box || Math.hypot(e.clientX - d.client[0], e.clientY - d.client[1]) > DRAG_PX) {
      const [x1, y1] = imageXY(e);
      const [x0, y0] = d.start;
      d.box = [Math.min(x0, x1), Math.min(y0, y1), Math.max(x0, x1), Math.max(y0, y1)];
      drawMarks();
    }
  }

  function onPointerUp() {
    const d = state.drag;
    state.drag = null;
    if (!d || state.name === null) return;
    if (d.box) page.act(() => setBox(d.box));
    else page.act(() => addPoint(d.start, d.negative));
  }

  function download(bytes, suffix, type) {
    const base = (state.name || "image").replace(/\.[^.]*$/, "") || "image";
    const url = URL.createObjectURL(new Blob([bytes], { type }));
    const a = document.createElement("a");
    a.href = url;
    a.download = `${base}-mask${suffix}`;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  function downloadPng() {
    const cand = chosenCandidate();
    if (!cand) throw new Error("no mask to download yet: click the image");
    const [h, w] = cand.mask.size;
    download(encodeMaskPng(decodeMask(cand.mask), w, h), ".png", "image/png");
  }

  function downloadRle() {
    const cand = chosenCandidate();
    if (!cand) throw new Error("no mask to download yet: click the image");
    download(new TextEncoder().encode(JSON.stringify(cocoRle(cand))), ".rle.json", "application/json");
  }

  const input = $("image-file");
  input.onchange = () => {
    const file = input.files && input.files[0];
    input.value = ""; // choosing the same file again opens it again
    page.act(() => load(file));
  };
  // a file dropped anywhere in image mode opens; dropped elsewhere it is ignored (a browser
  // would otherwise leave the page for the file, live session and all)
  const view = $("image-view");
  const area = $("image-mode");
  area.addEventListener("dragover", (e) => {
    e.preventDefault();
    view.classList.add("dropping");
  });
  area.addEventListener("dragleave", (e) => {
    if (!area.contains(e.relatedTarget)) view.classList.remove("dropping");
  });
  area.addEventListener("drop", (e) => {
    e.preventDefault();
    e.stopPropagation();
    view.classList.remove("dropping");
    const file = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
    page.act(() => (file ? load(file) : Promise.reject(new Error("drop an image file"))));
  });
  for (const type of ["dragover", "drop"]) window.addEventListener(type, (e) => e.preventDefault());
  const marks = $("image-marks");
  marks.addEventListener("pointerdown", onPointerDown);
  marks.addEventListener("pointermove", onPointerMove);
  marks.addEventListener("pointerup", onPointerUp);
  marks.addEventListener("pointercancel", () => {
    state.drag = null;
    drawMarks();
  });
  marks.addEventListener("contextmenu", (e) => e.preventDefault());
  $("image-clear").onclick = () => clearPrompts();
  $("image-download-png").onclick = () => page.act(async () => downloadPng());
  $("image-download-rle").onclick = () => page.act(async () => downloadRle());
  setSize(320, 240);
  drawPicture();
  render();

  return {
    state,
    /** The server forgot its images with the old connection: open the file again on the next prompt. */
    onDisconnected() {
      state.imageId = null;
      state.opened = null;
      render();
    },
    onConnected() {
      if (state.bytes && !state.imageId) page.act(openOnServer).then(render);
    },
  };
}
