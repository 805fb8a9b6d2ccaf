// Image mode's files and prompts, for the operator page (no DOM here).
//
// encodeMaskPng writes a 0/1 mask as an 8-bit grayscale PNG (0 / 255) with
// stored (uncompressed) deflate blocks: exact, no compression library needed,
// and what Pillow, browsers and pycocotools' users read. cocoRle is the
// server's COCO compressed RLE as a JSON object pycocotools.mask.decode reads
// as is. segmentFields builds an image_segment request from the operator's
// prompts on one image (docs/protocol.md, image mode). tests/test_page.py runs
// these under Node.js, tests/test_browser_image.py in Chromium.

const PNG_SIGNATURE = [137, 80, 78, 71, 13, 10, 26, 10];
const STORED_BLOCK = 65535; // the most a stored deflate block holds

let crcTable = null;

/** CRC-32 (ISO 3309, PNG's chunk checksum) of ``bytes``. */
export function crc32(bytes) {
  if (!crcTable) {
    crcTable = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      crcTable[n] = c >>> 0;
    }
  }
  let c = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) c = crcTable[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/** Adler-32 (zlib's checksum, RFC 1950) of ``bytes``. */
export function adler32(bytes) {
  let a = 1;
  let b = 0;
  for (let i = 0; i < bytes.length; i++) {
    a = (a + bytes[i]) % 65521;
    b = (b + a) % 65521;
  }
  return ((b << 16) | a) >>> 0;
}

/** ``raw`` as a zlib stream of stored deflate blocks (RFC 1950/1951, no compression). */
export function zlibStored(raw) {
  const blocks = Math.max(1, Math.ceil(raw.length / STORED_BLOCK));
  const out = new Uint8Array(2 + raw.length + 5 * blocks + 4);
  out[0] = 0x78;
  out[1] = 0x01;
  let o = 2;
  for (let b = 0; b < blocks; b++) {
    const start = b * STORED_BLOCK;
    const len = Math.min(STORED_BLOCK, raw.length - start);
    out[o++] = b === blocks - 1 ? 1 : 0;
    out[o++] = len & 0xff;
    out[o++] = len >>> 8;
    out[o++] = ~len & 0xff;
    out[o++] = (~len >>> 8) & 0xff;
    out.set(raw.subarray(start, start + len), o);
    o += len;
  }
  const adler = adler32(raw);
  out[o++] = adler >>> 24;
  out[o++] = (adler >>> 16) & 0xff;
  out[o++] = (adler >>> 8) & 0xff;
  out[o++] = adler & 0xff;
  return out;
}

function chunk(type, data) {
  const out = new Uint8Array(12 + data.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, data.length);
  for (let i = 0; i < 4; i++) out[4 + i] = type.charCodeAt(i);
  out.set(data, 8);
  view.setUint32(8 + data.length, crc32(out.subarray(4, 8 + data.length)));
  return out;
}

/** A row-major 0/1 mask (``h * w``) as PNG file bytes: 8-bit grayscale, 255 inside. */
export function encodeMaskPng(mask01, w, h) {
  if (mask01.length !== w * h) throw new Error(`the mask has ${mask01.length} pixels, ${w} x ${h} needs ${w * h}`);
  const header = new Uint8Array(13);
  const hv = new DataView(header.buffer);
  hv.setUint32(0, w);
  hv.setUint32(4, h);
  header[8] = 8; // bit depth
  header[9] = 0; // grayscale
  const raw = new Uint8Array(h * (w + 1)); // each row: filter type 0, then its pixels
  for (let y = 0; y < h; y++) {
    const row = y * (w + 1);
    for (let x = 0; x < w; x++) raw[row + 1 + x] = mask01[y * w + x] ? 255 : 0;
  }
  const parts = [Uint8Array.from(PNG_SIGNATURE), chunk("IHDR", header), chunk("IDAT", zlibStored(raw)), chunk("IEND", new Uint8Array(0))];
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

/**
 * A candidate of an image_segment reply as a COCO RLE object: ``size`` and
 * ``counts`` exactly as the server sent them (what pycocotools.mask.decode
 * reads), with SAM's score, the area and the COCO ``bbox`` (x, y, w, h).
 */
export function cocoRle(candidate) {
  const m = candidate.mask;
  if (!m || m.format !== "rle") throw new Error("the candidate has no RLE mask");
  const b = candidate.box_xyxy;
  return {
    size: m.size,
    counts: m.counts,
    score: candidate.score,
    area: candidate.area,
    bbox: b ? [b[0], b[1], b[2] - b[0] + 1, b[3] - b[1] + 1] : [0, 0, 0, 0],
  };
}

/**
 * The image_segment fields for ``prompts`` on ``imageId``: {points, labels,
 * box} the operator's clicks so far and the last drag's box; ``previous``:
 * the candidate of the image's last answer to refine (null: start afresh).
 */
export function segmentFields(imageId, prompts, { multimask, previous }) {
  if (!prompts.points.length && !prompts.box) throw new Error("click on the image or drag a box first");
  const fields = { image_id: imageId, multimask: Boolean(multimask), mask_format: "rle" };
  if (prompts.points.length) {
    fields.points_xy = prompts.points.map((p) => [p[0], p[1]]);
    fields.labels = prompts.labels.slice();
  }
  if (prompts.box) fields.box_xyxy = prompts.box.slice();
  if (previous !== null && previous !== undefined) fields.previous = previous;
  return fields;
}

/** [images] max_bytes's default (docs/protocol.md, Limits), for servers whose hello does not say. */
export const DEFAULT_IMAGE_MAX_BYTES = 16 * 2 ** 20;

/**
 * Why a file of ``size`` bytes cannot be sent to the server of ``hello``, or
 * "" when it can. Checked before reading it: an image_open message beyond what
 * the server accepts would close the WebSocket (1009), live sessions and all.
 */
export function fileTooLarge(size, hello) {
  const limits = (hello && hello.limits) || {};
  const max = typeof limits.image_max_bytes === "number" ? limits.image_max_bytes : DEFAULT_IMAGE_MAX_BYTES;
  if (size <= max) return "";
  const mib = (n) => (n / 2 ** 20).toFixed(1);
  return `the file has ${mib(size)} MiB; this server takes images up to ${mib(max)} MiB ([images] max_bytes)`;
}

/** The file's bytes as standard base64 (image_open's ``data``). */
export function toBase64(bytes) {
  let s = "";
  const step = 0x8000;
  for (let i = 0; i < bytes.length; i += step) s += String.fromCharCode.apply(null, bytes.subarray(i, i + step));
  return btoa(s);
}
