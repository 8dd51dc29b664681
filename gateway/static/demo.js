// The demo page: upload a video once (POST /v1/videos), ask about it with a streamed chat
// completion, then draw what the answer's `videollm` report says the encoder did. Thumbnails are
// decoded here, in the browser, from the chosen file: no frame travels to the server twice.
"use strict";

const GRID = 14;  // the kept positions index a 14x14 grid per frame (196 tokens before compression)
const OVERLAY_WIDTH = 224;  // px: 16 per grid cell
const THUMB_WIDTH = 54;
const $ = (id) => document.getElementById(id);

const state = {
  key: sessionStorage.getItem("videollm-key") || "",
  model: "videollm",
  file: null,
  upload: null,  // {file, id}: the chosen file's id on the server, so that it is uploaded once
  drawing: 0,  // the thumbnail drawing in progress (drawThumbnails)
};

class APIError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    const where = error.param ? ` (${error.param})` : "";
    super(`${status ? status + ": " : ""}${error.message || "the server gave no reason"}${where}`);
    this.status = status;
  }
}

function authHeaders() {
  return state.key ? { Authorization: `Bearer ${state.key}` } : {};
}

async function errorFrom(response) {
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON: the status says enough */ }
  return new APIError(response.status, body);
}

// -- messages ---------------------------------------------------------------------------------

function showError(err) {
  const box = $("error");
  box.textContent = err instanceof APIError ? `The server refused the request. ${err.message}` : String(err.message || err);
  box.hidden = false;
  if (err instanceof APIError && err.status === 401) askForKey("The server needs a valid API key.");
}

function clearError() { $("error").hidden = true; $("error").textContent = ""; }
function progress(text) { $("progress").textContent = text; }

function askForKey(reason) {
  $("key-section").hidden = false;
  if (reason) $("key-help").textContent = `${reason} It is kept in this tab only and sent as "Authorization: Bearer" with every request.`;
  $("api-key").focus();
}

// -- the server --------------------------------------------------------------------------------

async function discoverModel() {
  const response = await fetch("/v1/models", { headers: authHeaders() });
  if (response.status === 401) { askForKey(state.key ? "The saved key was refused." : "This server needs an API key."); return false; }
  if (!response.ok) throw await errorFrom(response);
  const models = await response.json();
  if (models.data && models.data.length) state.model = models.data[0].id;
  $("key-section").hidden = !state.key;
  return true;
}

function uploadVideo(file) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();  // fetch reports no upload progress
    xhr.open("POST", "/v1/videos");
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.upload.onprogress = (event) => {
      if (event.lengthComputable) progress(`Uploading ${Math.round(100 * event.loaded / event.total)}% of ${megabytes(event.total)}`);
    };
    xhr.onload = () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch (_) { /* leave null */ }
      if (xhr.status >= 200 && xhr.status < 300 && body && body.id) resolve(body.id);
      else reject(new APIError(xhr.status, body));
    };
    xhr.onerror = () => reject(new Error("The upload failed: the server could not be reached."));
    const form = new FormData();
    form.append("file", file, file.name);
    xhr.send(form);
  });
}

function chatBody(videoId) {
  const videollm = {};
  if ($("by-fps").checked) videollm.fps = Number($("fps").value);
  else videollm.num_frames = Number($("num-frames").value);
  const method = $("method").value;
  videollm.compression = method === "none" ? { method } : { method, retain_ratio: Number($("retain-ratio").value) };
  return {
    model: state.model,
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: Number($("max-tokens").value),
    messages: [{ role: "user", content: [
      { type: "video_url", video_url: { url: videoId } },
      { type: "text", text: $("question").value },
    ] }],
    videollm,
  };
}

// Reads the server-sent events of a streamed completion: text deltas as they come, then the
// closing chunk's `videollm` report. An error event mid-stream is thrown as the server's error.
async function readStream(response, onText) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let report = null;
  let usage = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return { report, usage };
        const chunk = JSON.parse(data);
        if (chunk.error) throw new APIError(0, chunk);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) onText(delta.content);
        if (chunk.videollm) report = chunk.videollm;
        if (chunk.usage) usage = chunk.usage;
      }
    }
  }
  throw new Error("The answer ended before the server finished it.");
}

// -- asking -------------------------------------------------------------------------------------

async function ask(event) {
  event.preventDefault();
  clearError();
  if (!state.file) { showError(new Error("Choose a video first.")); $("video-file").focus(); return; }
  if (!$("question").value.trim()) { showError(new Error("Write a question first.")); $("question").focus(); return; }
  const button = $("ask");
  const answer = $("answer");
  button.disabled = true;
  answer.textContent = "";
  answer.setAttribute("aria-busy", "true");
  $("numbers").hidden = true;
  try {
    if (!state.upload || state.upload.file !== state.file) {
      state.upload = { file: state.file, id: await uploadVideo(state.file) };
    }
    progress("Encoding the video and reading the question...");
    const sent = performance.now();
    let firstText = null;
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(chatBody(state.upload.id)),
    });
    if (!response.ok) throw await errorFrom(response);
    const { report, usage } = await readStream(response, (text) => {
      if (firstText === null) { firstText = performance.now(); progress("Answering..."); }
      answer.textContent += text;
    });
    const finished = performance.now();
    progress(`Done in ${seconds(finished - sent)}.`);
    if (report) {
      showNumbers(report, usage, response.headers.get("x-videollm-cache"), firstText === null ? null : firstText - sent);
      showTimeline(report);
    }
  } catch (err) {
    progress("");
    showError(err);
  } finally {
    button.disabled = false;
    answer.setAttribute("aria-busy", "false");
  }
}

// -- the numbers ---------------------------------------------------------------------------------

function showNumbers(report, usage, cache, clientTtftMs) {
  const timings = report.timings_ms || {};
  const compression = report.compression || {};
  const flops = report.flops || {};
  const rows = [
    ["Visual tokens", compression.uncompressed_tokens
      ? `${report.visual_tokens.toLocaleString()} of ${compression.uncompressed_tokens.toLocaleString()} (${percent(report.visual_tokens / compression.uncompressed_tokens)})`
      : `${report.visual_tokens}`],
    ["Frames", `${report.frames} sampled, ${report.frames_after_merge} after fusion`],
    ["Time to first token", `${milliseconds(timings.ttft)} at the server` + (clientTtftMs === null ? "" : `, ${milliseconds(clientTtftMs)} here`)],
    ["Encode", report.cache === "hit" ? "none (cached)" : milliseconds(timings.encode)],
    ["Prefill", milliseconds(timings.prefill)],
    ["Cache", cache || report.cache || "none"],
    ["FLOPs saved, encoder", saved(flops.encoder, flops.encoder_uncompressed)],
    ["FLOPs saved, prefill", saved(flops.prefill, flops.prefill_uncompressed)],
  ];
  if (usage) rows.push(["Prompt tokens", usage.prompt_tokens.toLocaleString()]);
  const list = $("numbers");
  list.replaceChildren(...rows.map(([name, value]) => {
    const item = document.createElement("div");
    const term = document.createElement("dt");
    const detail = document.createElement("dd");
    term.textContent = name;
    detail.textContent = value;
    item.dataset.name = name;
    item.append(term, detail);
    return item;
  }));
  list.hidden = false;
}

function saved(actual, full) {
  if (actual == null || !full) return "n/a";
  return `${percent(1 - actual / full)} (${actual.toExponential(2)} of ${full.toExponential(2)})`;
}
const percent = (share) => `${(100 * share).toFixed(1)}%`;
const milliseconds = (ms) => (ms == null ? "n/a" : `${Math.round(ms).toLocaleString()} ms`);
const seconds = (ms) => `${(ms / 1000).toFixed(2)} s`;
const megabytes = (bytes) => `${(bytes / 1048576).toFixed(1)} MB`;

// -- the timeline ------------------------------------------------------------------------------

// The output frames (merged_frames: the sampled frames fused into each) grouped by Stage I's final
// segments; an output frame is dynamic when it is its segment's first or last.
function outputFrames(report) {
  const merged = report.merged_frames || [];
  const segments = report.segments && report.segments.length ? report.segments : [[0, report.frames - 1]];
  const everything = Array.from({ length: GRID * GRID }, (_, i) => i);
  return segments.map(([first, last], number) => ({
    number, first, last,
    frames: merged.map((span, index) => ({ index, span, kept: (report.kept && report.kept[index]) || everything }))
      .filter(({ span }) => span[0] >= first && span[1] <= last)
      .map((frame) => ({ ...frame, dynamic: frame.span[0] === first || frame.span[1] === last })),
  }));
}

function showTimeline(report) {
  const times = (report.sampling && report.sampling.timestamps_s) || [];
  const aspect = 9 / 16;  // until the browser has read the video's own size (drawThumbnails)
  const thumbs = [];  // [sampled frame index, canvas] pairs to draw once decoded
  const overlays = [];
  const list = $("timeline");
  list.replaceChildren(...outputFrames(report).map((segment) => {
    const box = document.createElement("li");
    box.className = "segment";
    const title = document.createElement("h3");
    title.textContent = `Segment ${segment.number + 1}: frames ${segment.first + 1}-${segment.last + 1}` +
      (times.length ? ` (${times[segment.first].toFixed(2)}-${times[segment.last].toFixed(2)} s)` : "");
    const frames = document.createElement("ol");
    frames.append(...segment.frames.map((frame) => {
      const card = document.createElement("li");
      card.className = "output-frame";
      const overlay = document.createElement("canvas");
      overlay.className = "overlay";
      overlay.width = OVERLAY_WIDTH;
      overlay.height = Math.round(OVERLAY_WIDTH * aspect);
      overlay.dataset.kept = frame.kept.length;
      const kind = frame.dynamic ? "dynamic" : "static";
      const fused = frame.span[1] - frame.span[0] + 1;
      overlay.setAttribute("role", "img");
      overlay.setAttribute("aria-label", `Output frame ${frame.index + 1}, ${kind}: ${frame.kept.length} of ${GRID * GRID} ` +
        `grid positions kept; ${fused > 1 ? `fused from sampled frames ${frame.span[0] + 1}-${frame.span[1] + 1}` : `sampled frame ${frame.span[0] + 1}`}`);
      overlays.push({ canvas: overlay, kept: frame.kept, sampled: frame.span[0] });
      const label = document.createElement("p");
      label.className = `kind ${kind}`;
      label.textContent = `${kind}, ${frame.kept.length} kept` + (fused > 1 ? `, ${fused} fused` : "");
      const strip = document.createElement("div");
      strip.className = "fused";
      for (let sampled = frame.span[0]; sampled <= frame.span[1]; sampled++) {
        const figure = document.createElement("figure");
        const thumb = document.createElement("canvas");
        thumb.width = THUMB_WIDTH * 2;
        thumb.height = Math.round(THUMB_WIDTH * 2 * aspect);
        thumb.className = "thumb";
        thumb.setAttribute("role", "img");
        thumb.setAttribute("aria-label", `Sampled frame ${sampled + 1}` + (times.length ? ` at ${times[sampled].toFixed(2)} s` : ""));
        thumbs.push([sampled, thumb]);
        const caption = document.createElement("figcaption");
        caption.textContent = times.length ? `${times[sampled].toFixed(2)} s` : `#${sampled + 1}`;
        figure.append(thumb, caption);
        strip.append(figure);
      }
      card.append(overlay, label, strip);
      return card;
    }));
    box.append(title, frames);
    return box;
  }));
  $("report-json").textContent = JSON.stringify(report, null, 1);
  $("timeline-section").hidden = false;
  for (const { canvas, kept } of overlays) drawOverlay(canvas, null, kept);
  drawThumbnails(times, (report.source && report.source.fps) || 30, thumbs, overlays);
}

// The frame (or grey when it is not decoded), the dropped grid cells darkened, the kept ones outlined.
// Cell edges are whole pixels, so that the outline is crisp and its colour exact.
function drawOverlay(canvas, image, kept) {
  const context = canvas.getContext("2d");
  const { width, height } = canvas;
  if (image) context.drawImage(image, 0, 0, width, height);
  else { context.fillStyle = "#777"; context.fillRect(0, 0, width, height); }
  const keep = new Set(kept);
  const cell = (position) => {
    const [column, row] = [position % GRID, Math.floor(position / GRID)];
    const left = Math.round(column * width / GRID);
    const top = Math.round(row * height / GRID);
    return [left, top, Math.round((column + 1) * width / GRID) - left, Math.round((row + 1) * height / GRID) - top];
  };
  context.fillStyle = "rgba(0, 0, 0, 0.62)";
  for (let position = 0; position < GRID * GRID; position++) {
    if (!keep.has(position)) context.fillRect(...cell(position));
  }
  context.strokeStyle = "#ffb000";
  context.lineWidth = 2;
  for (const position of keep) {
    const [left, top, w, h] = cell(position);
    context.strokeRect(left + 1, top + 1, w - 2, h - 2);
  }
}

function once(target, name) {
  return new Promise((resolve, reject) => {
    const done = () => { target.removeEventListener("error", failed); resolve(); };
    const failed = () => { target.removeEventListener(name, done); reject(new Error("this browser cannot decode the video")); };
    target.addEventListener(name, done, { once: true });
    target.addEventListener("error", failed, { once: true });
  });
}

// Seeks the hidden <video> to each sampled frame's time (half a frame in, so that it lands on that
// frame and not the one before) and draws it into its thumbnails and its output frame's overlay.
async function drawThumbnails(times, fps, thumbs, overlays) {
  const status = $("thumb-status");
  if (!times.length) { status.textContent = "The answer gave no frame times: no thumbnails."; return; }
  const run = ++state.drawing;  // a newer answer's drawing takes the <video> over from this one
  const video = $("decoder");
  const url = URL.createObjectURL(state.file);
  try {
    video.src = url;
    await once(video, "loadeddata");
    if (run !== state.drawing) return;
    const aspect = video.videoHeight / video.videoWidth;  // as shown: the browser applies the rotation too
    for (const [, canvas] of thumbs) canvas.height = Math.round(canvas.width * aspect);
    for (const { canvas, kept } of overlays) {
      canvas.height = Math.round(canvas.width * aspect);
      drawOverlay(canvas, null, kept);
    }
    const wanted = [...new Set(thumbs.map(([sampled]) => sampled))].sort((a, b) => a - b);
    for (const [done, sampled] of wanted.entries()) {
      status.textContent = `Drawing thumbnails: ${done + 1} of ${wanted.length}`;
      video.currentTime = Math.min(times[sampled] + 0.5 / fps, Math.max(0, video.duration - 0.001));
      await once(video, "seeked");
      if (run !== state.drawing) return;
      for (const [index, canvas] of thumbs) {
        if (index !== sampled) continue;
        canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
        canvas.dataset.drawn = "true";
      }
      for (const overlay of overlays) {
        if (overlay.sampled !== sampled) continue;
        drawOverlay(overlay.canvas, video, overlay.kept);
        overlay.canvas.dataset.drawn = "true";
      }
    }
    status.textContent = `${wanted.length} sampled frames drawn from your file.`;
  } catch (err) {
    if (run === state.drawing) status.textContent = `No thumbnails: ${err.message}. The kept positions are shown on grey.`;
  } finally {
    if (run === state.drawing) {
      video.removeAttribute("src");
      video.load();
    }
    URL.revokeObjectURL(url);
  }
}

// -- wiring -------------------------------------------------------------------------------------

function chooseFile(file) {
  state.file = file || null;
  $("file-status").textContent = file ? `${file.name}, ${megabytes(file.size)}` : "No video chosen.";
}

function wire() {
  $("ask-form").addEventListener("submit", ask);
  $("video-file").addEventListener("change", (event) => chooseFile(event.target.files[0]));
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    if (event.dataTransfer.files.length) chooseFile(event.dataTransfer.files[0]);
  });
  const bySampling = () => {
    $("num-frames").disabled = !$("by-count").checked;
    $("fps").disabled = !$("by-fps").checked;
  };
  $("by-count").addEventListener("change", bySampling);
  $("by-fps").addEventListener("change", bySampling);
  $("method").addEventListener("change", () => { $("retain-ratio").disabled = $("method").value === "none"; });
  $("key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    state.key = $("api-key").value.trim();
    sessionStorage.setItem("videollm-key", state.key);
    clearError();
    try {
      if (await discoverModel()) { $("key-help").textContent = "Key accepted. It is kept in this tab only."; $("question").focus(); }
    } catch (err) { showError(err); }
  });
  discoverModel().catch(showError);
}

wire();
