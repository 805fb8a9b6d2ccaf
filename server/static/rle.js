// COCO RLE masks and object colours, for the operator page (no DOM here).
//
// decodeCounts mirrors pycocotools' rleFrString (maskApi.c): the compressed
// "counts" string is a LEB128-like code of 5-bit groups offset by 48, each
// count after the second stored as a difference to the one two before.
// Counts are run lengths over the mask in column-major order, starting with
// zeros. objectColour is the DAVIS palette entry the server uses
// (tracker/export.py object_colour, tracker/masks.py davis_palette).

/** Run lengths of a COCO compressed RLE string (pycocotools rleFrString). */
export function decodeCounts(counts) {
  const runs = [];
  let p = 0;
  while (p < counts.length) {
    let x = 0;
    let k = 0;
    let more = true;
    while (more) {
      if (p >= counts.length) throw new Error("truncated RLE counts");
      const c = counts.charCodeAt(p) - 48;
      if (c < 0 || c > 63) throw new Error(`bad RLE character ${JSON.stringify(counts[p])} at ${p}`);
      x += (c & 0x1f) * 2 ** (5 * k);
      more = (c & 0x20) !== 0;
      p += 1;
      k += 1;
      if (!more && (c & 0x10)) x -= 2 ** (5 * k); // sign-extend the last group
    }
    if (runs.length > 2) x += runs[runs.length - 2];
    runs.push(x);
  }
  return runs;
}

/** The mask of ``{size: [h, w], counts}`` as a row-major Uint8Array of 0/1 (h * w). */
export function decodeMask(mask) {
  const [h, w] = mask.size;
  const out = new Uint8Array(h * w);
  const runs = typeof mask.counts === "string" ? decodeCounts(mask.counts) : mask.counts;
  let i = 0; // column-major position
  for (let r = 0; r < runs.length; r++) {
    const n = runs[r];
    if (r % 2 === 1 && n > 0) {
      let x = Math.floor(i / h);
      let y = i - x * h;
      const end = Math.min(i + n, h * w);
      for (let j = i; j < end; j++) {
        out[y * w + x] = 1;
        if (++y === h) {
          y = 0;
          x += 1;
        }
      }
    }
    i += n;
  }
  if (i !== h * w) throw new Error(`RLE counts cover ${i} pixels, the mask has ${h * w}`);
  return out;
}

/** DAVIS / PASCAL VOC palette entry ``index`` (0..255) as [r, g, b]. */
export function paletteColour(index) {
  let r = 0;
  let g = 0;
  let b = 0;
  for (let bit = 0; bit < 8; bit++) {
    r |= ((index >> (3 * bit)) & 1) << (7 - bit);
    g |= ((index >> (3 * bit + 1)) & 1) << (7 - bit);
    b |= ((index >> (3 * bit + 2)) & 1) << (7 - bit);
  }
  return [r, g, b];
}

/** An object's colour: its DAVIS palette entry, ids beyond 1..255 wrapping (as the server). */
export function objectColour(objId) {
  return paletteColour(1 + (((objId - 1) % 255) + 255) % 255);
}

/** CSS ``rgb(...)`` of an object's colour. */
export function objectCss(objId) {
  const [r, g, b] = objectColour(objId);
  return `rgb(${r}, ${g}, ${b})`;
}

/**
 * Blend a 0/1 row-major mask into RGBA ``pixels`` (an ImageData's data) in
 * ``rgb`` at ``alpha`` (0..255), over what earlier objects painted.
 */
export function paintMask(pixels, mask01, rgb, alpha) {
  const [r, g, b] = rgb;
  for (let i = 0, o = 0; i < mask01.length; i++, o += 4) {
    if (mask01[i]) {
      pixels[o] = r;
      pixels[o + 1] = g;
      pixels[o + 2] = b;
      pixels[o + 3] = alpha;
    }
  }
}
