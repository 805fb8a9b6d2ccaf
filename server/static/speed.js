// The model's pace against the video's: when the model runs slower than the
// source, the page says so, with both rates and what would help.
//
// The model's rate is what this session gets: frames processed per second,
// from the server's processed_s of the recent frame messages (every session
// the worker batches and every prompt included); while one frame has arrived,
// 1 / model_s (its time in the model). The video's rate is the session's fps
// (the source's own), else estimated from source_index over pts_s. Pure
// functions of messages: app.js shows the result, tests/test_page.py runs them
// under Node.js.

/** The model counts as slower than the video below this share of the video's rate. */
export const SLOW_SHARE = 0.8;
/** Frame messages the model's rate is measured over. */
export const PACE_FRAMES = 8;

const num = (v) => typeof v === "number" && Number.isFinite(v);

/** Frames per second the model delivers on this session, or null before any frame says. */
export function modelFps(frames) {
  const timed = frames.filter((f) => num(f.processed_s)).slice(-PACE_FRAMES);
  if (timed.length >= 2) {
    const span = timed[timed.length - 1].processed_s - timed[0].processed_s;
    if (span > 0) return (timed.length - 1) / span;
  }
  const last = frames[frames.length - 1];
  return last && num(last.model_s) && last.model_s > 0 ? 1 / last.model_s : null;
}

/** Frames per second of the source, or null when neither the session nor the frames say. */
export function videoFps(session, frames) {
  if (session && num(session.fps) && session.fps > 0) return session.fps;
  const stamped = frames.filter((f) => num(f.pts_s) && num(f.source_index));
  if (stamped.length >= 2) {
    const a = stamped[0];
    const b = stamped[stamped.length - 1];
    if (b.pts_s > a.pts_s && b.source_index > a.source_index) return (b.source_index - a.source_index) / (b.pts_s - a.pts_s);
  }
  return null;
}

/** What would make ``model`` ({name, image_size, device} as hello gives it) faster, most effective first. */
export function whatWouldHelp(model) {
  const tips = [];
  const device = String((model && model.device) || "");
  if (!device.startsWith("cuda")) tips.push("a GPU (serve --device cuda)");
  if (!model || !(model.image_size <= 512)) tips.push("a smaller input (serve --image-size 512)");
  if (!model || !/tiny/.test(String(model.name))) tips.push("a lighter model (serve --model sam2.1-tiny)");
  return tips;
}

/** Rates to show: one decimal, two below 1 frame/s (a CPU at 1024 px does 0.1-0.2). */
export function formatFps(fps) {
  return fps >= 1 ? fps.toFixed(1).replace(/\.0$/, "") : fps.toFixed(2);
}

/**
 * The notice for the session on screen: "" while the model keeps up with the
 * video (or a rate is unknown), else both rates and what would help.
 */
export function slowNotice(session, frames, model) {
  const m = modelFps(frames);
  const v = videoFps(session, frames);
  if (m === null || v === null || m >= SLOW_SHARE * v) return "";
  const every = Math.max(2, Math.round(v / m));
  const tips = whatWouldHelp(model);
  const help = tips.length
    ? `What would help: ${tips.join(", ")}.`
    : "It already runs the lightest setting on a GPU: fewer sessions on this device would help.";
  return (
    `The model runs at ${formatFps(m)} frames/s, slower than the video (${formatFps(v)} frames/s): ` +
    `masks come for about 1 frame in ${every}. ${help}`
  );
}
