// Drawing over the video: masks on #masks, clicks, boxes and labels on #marks.
//
// Both canvases have the frame's own size (source pixels), stretched over the
// <video> like it, so a canvas pixel is a source pixel: what masks and
// prompts use. #masks holds nothing but the masks (half-opaque, each
// object's colour), so what it shows can be checked against the server's.

import { decodeMask, objectColour, paintMask } from "./rle.js";

export const MASK_ALPHA = 128;

/**
 * The mask frame to show with a video frame received at ``receiveMs``
 * (performance.now() time base): the newest one that had arrived by then,
 * ``slackMs`` allowing for the two paths' jitter. Frame messages and video
 * frames of one result leave the server together, and the video (encode,
 * jitter buffer) is the slower path. ``frames``: oldest first, each with
 * ``_recvMs``. Null when none had arrived.
 */
export function pickFrame(frames, receiveMs, slackMs) {
  let pick = null;
  for (const f of frames) {
    if (f._recvMs <= receiveMs + slackMs) pick = f;
    else break;
  }
  return pick;
}

function sizeFits(size, canvas) {
  return size[0] === canvas.height && size[1] === canvas.width;
}

/**
 * Paint the visible, not hidden objects of ``frame``, and each prompt reply's
 * mask (``promptMasks``: obj_id -> {mask}) of an object the frame does not
 * carry yet. ``objects``: obj_id -> {hidden}.
 */
export function drawMasks(canvas, frame, objects, promptMasks) {
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!frame) return;
  const image = ctx.createImageData(canvas.width, canvas.height);
  const isHidden = (objId) => Boolean(objects.get(objId) && objects.get(objId).hidden);
  const painted = new Set();
  for (const o of frame.objects) {
    if (!o.visible || !o.mask || o.mask.format !== "rle" || isHidden(o.obj_id) || !sizeFits(o.mask.size, canvas)) {
      continue;
    }
    paintMask(image.data, decodeMask(o.mask), objectColour(o.obj_id), MASK_ALPHA);
    painted.add(o.obj_id);
  }
  for (const [objId, pm] of promptMasks) {
    if (painted.has(objId) || isHidden(objId) || !sizeFits(pm.mask.size, canvas)) continue;
    paintMask(image.data, decodeMask(pm.mask), objectColour(objId), MASK_ALPHA);
  }
  ctx.putImageData(image, 0, 0);
}

function strokeBox(ctx, [x0, y0, x1, y1], dashed) {
  ctx.setLineDash(dashed ? [4, 3] : []);
  ctx.lineWidth = 2;
  ctx.strokeStyle = "white";
  ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
  ctx.setLineDash([]);
}

/**
 * Recent prompts (``marks``: {points, label, box}), the box being dragged
 * (``dragBox`` or null) and, unless the server draws, each shown object's id
 * at its box.
 */
export function drawMarks(canvas, { marks, frame, objects, dragBox, labels }) {
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const r = Math.max(3, Math.round(canvas.width / 100));
  for (const m of marks) {
    if (m.box) strokeBox(ctx, m.box, false);
    for (const [x, y] of m.points || []) {
      ctx.beginPath();
      ctx.arc(x + 0.5, y + 0.5, r, 0, 2 * Math.PI);
      ctx.fillStyle = m.label ? "#2ecc40" : "#ff4136";
      ctx.fill();
      ctx.lineWidth = 1.5;
      ctx.strokeStyle = "white";
      ctx.stroke();
    }
  }
  if (frame && labels) {
    ctx.font = `bold ${Math.max(10, Math.round(canvas.width / 40))}px sans-serif`;
    ctx.lineWidth = 3;
    for (const o of frame.objects) {
      const obj = objects.get(o.obj_id);
      if (!o.visible || !o.box_xyxy || (obj && obj.hidden)) continue;
      const [x0, y0] = o.box_xyxy;
      const y = Math.max(12, y0 - 3);
      ctx.strokeStyle = "black";
      ctx.strokeText(String(o.obj_id), x0 + 2, y);
      ctx.fillStyle = "white";
      ctx.fillText(String(o.obj_id), x0 + 2, y);
    }
  }
  if (dragBox) strokeBox(ctx, dragBox, true);
}
