// The web demo: choose a model and methods, upload a radiograph, read the scores and the
// maps. One /explain request per upload; thresholds and opacity re-draw from the maps
// already here (raw float32 on the network's grid), without asking the service again.

import * as api from "./api.js";
import * as draw from "./draw.js";
import { displayStrength, fromBase64, parseNpy, regionStrength, regions } from "./maps.js";
import { methodName, transferSyntaxName } from "./names.js";

const $ = (id) => document.getElementById(id);
// The upload is decoded no wider than this many CSS pixels (the widest a view gets).
const DECODE_WIDTH = 1024;
const DEFAULT_METHODS = ["gradcam", "crm"];

const state = {
  models: [],
  model: null,        // GET /models/{name} of the chosen model
  file: null,
  result: null,       // the answer being shown (maps decoded, base64 dropped)
  original: null,     // ImageBitmap of the upload, at most view-sized
  blob: null,         // the JSON answer as it came, for the download
  selected: 0,
  controller: null,   // aborts the request in flight
  classesTouched: false,
};

// ---------------------------------------------------------------- model and controls

async function loadModels() {
  try {
    const body = await api.listModels();
    hideError();
    state.models = body.models;
    const select = $("model");
    const keep = select.value;
    select.replaceChildren(...body.models.map((m) => {
      const text = m.members ? `${m.name} (ensemble of ${m.members.length})` : m.name;
      return new Option(text, m.name, false, keep ? m.name === keep : m.default);
    }));
    await chooseModel();
  } catch (err) {
    showError(err);
    if (err.status === 401) { $("advanced").open = true; $("key").focus(); }
  }
}

async function chooseModel() {
  const name = $("model").value;
  if (!name) return;
  try {
    state.model = await api.modelInfo(name);
  } catch (err) {
    showError(err);
    return;
  }
  const m = state.model;
  $("model-note").hidden = !m.description;
  $("model-note").textContent = m.description;
  $("members").textContent = m.members
    ? `Ensemble: the mean of ${m.members.join(", ")} (scores, and each member's max-normalised map).`
    : `Single network, version ${m.version}, input ${m.input.size[1]}×${m.input.size[0]}.`;
  const before = new Set(ticked("method"));
  const wanted = before.size ? before : new Set(DEFAULT_METHODS);
  $("method-list").replaceChildren(...m.methods.map((key) =>
    checkbox("method", key, methodName(key), wanted.has(key))));
  const unavailable = Object.entries(m.unavailable_methods || {});
  $("methods-unavailable").hidden = !unavailable.length;
  $("methods-unavailable").textContent = unavailable.map(([k, why]) => `${methodName(k)}: ${why}`).join("; ");
  state.classesTouched = false;
  $("class-list").replaceChildren(...m.labels.map((label, i) => {
    const box = checkbox("class", String(i), label, false);
    box.querySelector(".swatch").style.setProperty("--c", draw.classColour(i));
    return box;
  }));
  checkMethods();
  markStale();
}

function checkbox(name, value, text, checked) {
  const label = document.createElement("label");
  const box = document.createElement("input");
  box.type = "checkbox";
  box.name = name;
  box.value = value;
  box.checked = checked;
  const swatch = document.createElement("span");
  swatch.className = "swatch";
  swatch.setAttribute("aria-hidden", "true");
  const words = document.createElement("span");
  words.className = "words";
  words.textContent = text;
  const score = document.createElement("span");
  score.className = "score";
  label.append(box, name === "class" ? swatch : "", words, score);
  return label;
}

const ticked = (name) => [...document.querySelectorAll(`input[name=${name}]:checked`)].map((b) => b.value);

function checkMethods() {
  const none = ticked("method").length === 0;
  $("methods-hint").hidden = !none;
  $("go").disabled = none;
  return !none;
}

function markStale() {
  $("stale").hidden = !state.result;
}

const sliderValue = (id) => Number($(id).value);

function showSliderValues() {
  for (const id of ["score-threshold", "region-threshold", "opacity"]) {
    $(`${id}-value`).textContent = sliderValue(id).toFixed(2);
  }
}

// ---------------------------------------------------------------- errors and progress

function showError(err) {
  const problem = err instanceof api.ProblemError ? err
    : { title: "The service could not be reached", detail: String(err.message || err), code: "" };
  $("error-title").textContent = problem.title;
  $("error-detail").textContent = problem.detail;
  $("error-code").textContent = problem.code ? `(${problem.code}${problem.status ? `, HTTP ${problem.status}` : ""})` : "";
  $("error").hidden = false;
}

function hideError() {
  $("error").hidden = true;
}

let ticker = null;

function startProgress(text) {
  clearInterval(ticker);
  const start = performance.now();
  $("progress").hidden = false;
  $("status-text").textContent = text;
  $("elapsed").textContent = "";
  ticker = setInterval(() => {
    $("elapsed").textContent = `${((performance.now() - start) / 1000).toFixed(1)} s`;
  }, 100);
  $("cancel").hidden = false;
}

function stopProgress(text) {
  clearInterval(ticker);
  $("progress").hidden = true;
  $("elapsed").textContent = "";
  $("status-text").textContent = text;
  $("cancel").hidden = true;
}

function clearResults() {
  $("results").hidden = true;
  $("cards").replaceChildren();
  if (state.original) state.original.close();
  state.result = state.original = state.blob = null;
  $("stale").hidden = true;
  for (const label of $("class-list").querySelectorAll(".score")) label.textContent = "";
}

// ---------------------------------------------------------------- the upload

/** The upload's format and pixel size from its first bytes: PNG and JPEG the browser
 *  can decode itself (at the views' size, sharper than the network's grid); anything else
 *  (DICOM) only the service can. */
async function sniff(file) {
  const head = new Uint8Array(await file.slice(0, 1 << 18).arrayBuffer());
  const view = new DataView(head.buffer);
  if (head.length >= 24 && head[0] === 0x89 && head[1] === 0x50 && head[2] === 0x4e && head[3] === 0x47) {
    return { kind: "png", width: view.getUint32(16), height: view.getUint32(20) };
  }
  if (head.length >= 4 && head[0] === 0xff && head[1] === 0xd8) {
    for (let i = 2; i + 9 < head.length;) {
      if (head[i] !== 0xff) { i++; continue; }
      const marker = head[i + 1];
      if (marker >= 0xc0 && marker <= 0xcf && ![0xc4, 0xc8, 0xcc].includes(marker)) {
        return { kind: "jpeg", width: view.getUint16(i + 7), height: view.getUint16(i + 5) };
      }
      if (marker === 0xd8 || marker === 0x01 || (marker >= 0xd0 && marker <= 0xd7)) { i += 2; continue; }
      i += 2 + view.getUint16(i + 2);
    }
    return { kind: "jpeg", width: 0, height: 0 };
  }
  return { kind: "other", width: 0, height: 0 };
}

/** The upload drawn by the browser, no wider than the largest view needs. */
function decodeOriginal(file, info) {
  const widest = Math.round(Math.min(DECODE_WIDTH, window.innerWidth) * (window.devicePixelRatio || 1));
  const options = info.width > widest ? { resizeWidth: widest, resizeQuality: "high" } : {};
  return createImageBitmap(file, options).catch(() => null);
}

/** The API's 0-based frame from the 1-based field (left out when it is the first). */
function frameIndex() {
  const text = $("frame").value.trim();
  return text === "" || text === "1" ? "" : /^\d+$/.test(text) ? String(Number(text) - 1) : text;
}

function requestParams() {
  const classes = state.classesTouched ? ticked("class") : [];
  return {
    model: $("model").value,
    methods: ticked("method").join(","),
    classes: classes.join(","),
    target: $("target").value,
    window: $("window").value.trim(),
    frame: frameIndex(),
    score_threshold: sliderValue("score-threshold"),
    region_threshold: sliderValue("region-threshold"),
    heatmap: "npy",
    size: "model",
    // The image as the network saw it: drawn at once, so that the maps never wait for
    // the browser to decode a big upload (a 3000² PNG takes it 100–500 ms).
    preview: "true",
  };
}

async function run() {
  hideError();
  if (!state.file) {
    showError({ title: "No image", detail: "Choose a DICOM, PNG or JPEG file first." });
    $("file").focus();
    return;
  }
  if (!checkMethods()) return;
  if (state.controller) state.controller.abort();
  const controller = new AbortController();
  state.controller = controller;
  clearResults();
  const file = state.file;
  startProgress(`Explaining ${file.name}…`);
  const start = performance.now();
  let original = Promise.resolve(null);
  try {
    const info = await sniff(file);
    const params = requestParams();
    if (info.kind !== "other") original = decodeOriginal(file, info);
    const { blob, body } = await api.explain(file, params, controller.signal);
    const answered = performance.now();
    const bitmap = await createImageBitmap(
      new Blob([fromBase64(body.preview.data)], { type: body.preview.media_type }));
    if (controller.signal.aborted) {
      bitmap?.close();
      if (state.controller === controller) stopProgress("Cancelled.");
      return;
    }
    state.result = prepare(body, params);
    state.original = bitmap;
    state.blob = blob;
    state.selected = strongest(state.result.maps);
    showResult();
    const drawn = performance.now();
    const received = performance.getEntriesByType("resource").filter((e) => e.name.endsWith("/explain")).pop();
    state.result.page = {
      answered_ms: Math.round(answered - start),
      drawn_ms: Math.round(drawn - start),
      sent_bytes: file.size,
      received_bytes: received ? received.encodedBodySize : blob.size,
      service_ms: body.timings_ms.total,
    };
    showTimings();
    stopProgress(`Explained ${file.name} in ${state.result.page.drawn_ms} ms.`);
    sharpen(state.result, original, start);
  } catch (err) {
    original.then((bitmap) => bitmap?.close());
    if (state.controller !== controller) return;  // a newer upload took over
    stopProgress(controller.signal.aborted ? "Cancelled." : "");
    if (!controller.signal.aborted) showError(err);
  } finally {
    if (state.controller === controller) state.controller = null;
  }
}

/** The browser's own decode of the upload, once it is done, in place of the preview. */
async function sharpen(result, original, start) {
  const bitmap = await original;
  if (!bitmap) return;
  if (state.result !== result) { bitmap.close(); return; }  // a newer answer is shown
  state.original.close();
  state.original = bitmap;
  redraw();
  result.page.sharp_ms = Math.round(performance.now() - start);
  showTimings();
}

/** The map shown large first: the top-scoring class's first map (class-agnostic last). */
function strongest(maps) {
  let best = 0;
  maps.forEach((m, i) => {
    const score = m.score ?? -1, top = maps[best].score ?? -1;
    if (score > top) best = i;
  });
  return best;
}

/** The answer with its maps decoded to numbers and the base64 dropped. */
function prepare(body, params) {
  const scores = body.predictions.map((p) => p.score);
  const maps = body.explanations.map((e, key) => {
    const { values, height, width } = parseNpy(fromBase64(e.heatmap.data));
    e.heatmap.data = null;
    return {
      key,
      method: e.method,
      label: e.label,
      index: e.index,
      score: e.index == null ? null : scores[e.index],
      height, width,
      strength: regionStrength(e.method, values, height, width),
      layer: draw.mapLayer(displayStrength(e.method, values, height, width), height, width),
      points: e.points,
    };
  });
  body.preview = null;
  return { body, maps, params, image: body.image };
}

// ---------------------------------------------------------------- showing an answer

function showResult() {
  const { body, maps } = state.result;
  const scoreList = $("class-list");
  for (const p of body.predictions) {
    const label = scoreList.querySelector(`input[value="${p.index}"]`)?.closest("label");
    if (label) label.querySelector(".score").textContent = formatScore(p.score);
  }
  // The classes the service explained are the ticks now (it chose them when none were).
  const explained = new Set(maps.filter((m) => m.index != null).map((m) => String(m.index)));
  for (const box of document.querySelectorAll("input[name=class]")) box.checked = explained.has(box.value);
  showHeader(body);
  showScores(body);
  const methods = [...new Set(maps.filter((m) => m.index != null).map((m) => m.method))];
  const summary = $("summary-method");
  const keep = summary.value;
  summary.replaceChildren(...methods.map((k) => new Option(methodName(k), k, false, k === keep)));
  summary.disabled = !methods.length;
  $("cards").replaceChildren(...maps.map(card));
  const dicom = body.image.format === "dicom";
  // A grayscale presentation state references a grey image only, and a segmentation is
  // made of grey images too (of one frame and a class without a required Frame of
  // Reference: the service's 406 says so for others).
  const grey = dicom && /^MONOCHROME[12]$/.test(body.image.dicom?.photometric_interpretation ?? "");
  $("dl-sc").disabled = $("dl-sr").disabled = !dicom;
  $("dl-gsps").disabled = $("dl-seg").disabled = !grey;
  $("dl-hint").textContent = dicom
    ? "The Secondary Capture shows the selected map; the Structured Report holds every region at the current region threshold; "
      + (grey ? "the presentation state draws those regions and the fixations over the image itself in a DICOM viewer, and the segmentation holds them as masks."
              : "a presentation state or segmentation needs a grey image.")
    : "DICOM downloads need a DICOM upload (they join its study).";
  $("results").hidden = false;
  layout();
}

// Four decimals, but never a rounded 1.0000 for a score short of 1, nor 0.0000 for a small one.
const formatScore = (s) => {
  if (s > 0 && s < 0.001) return s.toExponential(1);
  const fixed = s.toFixed(4);
  return fixed === "1.0000" && s < 1 ? s.toFixed(6) : fixed;
};

function showHeader(body) {
  const image = body.image;
  const rows = [
    ["Model", `${body.model.name} v${body.model.version}`],
    ["Image", `${image.format.toUpperCase()}, ${image.width} × ${image.height} px`],
  ];
  if (image.dicom) {
    const d = image.dicom;
    rows.push(["Modality", d.modality || "—"],
              ["Transfer syntax", d.transfer_syntax_uid ? `${transferSyntaxName(d.transfer_syntax_uid)} (${d.transfer_syntax_uid})` : "—"],
              ["Photometric", d.photometric_interpretation || "—"],
              ["Frame", `${d.frame + 1} of ${d.frames}`]);
  }
  $("header").replaceChildren(...rows.flatMap(([k, v]) => {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v;
    return [dt, dd];
  }));
}

function showTimings() {
  const { body, page } = state.result;
  const server = Object.entries(body.timings_ms).filter(([k]) => k !== "total")
    .map(([k, v]) => `${methodName(k)} ${Math.round(v)}`).join(", ");
  $("timings").textContent =
    `Answered in ${page.answered_ms} ms, drawn by ${page.drawn_ms} ms ` +
    `(service ${Math.round(body.timings_ms.total)} ms: ${server}); ` +
    `sent ${kilobytes(page.sent_bytes)}, received ${kilobytes(page.received_bytes)}` +
    (page.sharp_ms ? `; the upload itself (decoded here) drawn by ${page.sharp_ms} ms.` : ".");
  $("results").dataset.timings = JSON.stringify(page);
}

const kilobytes = (n) => (n >= 1e6 ? `${(n / 1e6).toFixed(1)} MB` : `${Math.round(n / 1e3)} kB`);

function showScores(body) {
  $("scores").tBodies[0].replaceChildren(...body.predictions.map((p) => {
    const tr = document.createElement("tr");
    tr.dataset.index = p.index;
    const name = tr.insertCell();
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.setProperty("--c", draw.classColour(p.index));
    name.append(swatch, p.label);
    tr.insertCell().textContent = formatScore(p.score);
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.setAttribute("aria-hidden", "true");
    bar.style.setProperty("--v", p.score);
    tr.insertCell().append(bar);
    tr.insertCell().className = "status";
    return tr;
  }));
}

function card(m) {
  const figure = document.createElement("figure");
  figure.className = "card";
  figure.dataset.key = m.key;
  figure.dataset.method = m.method;
  figure.dataset.label = m.label ?? "";
  const button = document.createElement("button");
  button.type = "button";
  button.className = "card-select";
  button.setAttribute("aria-pressed", "false");
  button.setAttribute("aria-label", `Show ${methodName(m.method)} for ${m.label ?? "all classes"} beside the original`);
  const canvas = document.createElement("canvas");
  canvas.setAttribute("aria-hidden", "true");  // the button says what it shows
  button.append(canvas);
  button.addEventListener("click", () => { state.selected = m.key; redraw(); });
  const caption = document.createElement("figcaption");
  const list = document.createElement("ul");
  list.className = "regions";
  caption.append(document.createElement("p"), list);
  figure.append(button, caption);
  return figure;
}

/** Every canvas sized to the CSS width the layout gives it (so that text on it is drawn
 *  at its real size); then everything is drawn again. */
function layout() {
  if (!state.result || $("results").hidden) return;
  const { width, height } = state.result.image;
  for (const canvas of document.querySelectorAll("#views canvas, #cards canvas")) {
    draw.sizeCanvas(canvas, canvas.clientWidth || 240, width, height);
  }
  redraw();
}

/** Whether a map's class is at or above the score threshold (class-agnostic maps: yes). */
const isFinding = (m, threshold) => m.index == null || m.score >= threshold;

function captionText(m, threshold) {
  const what = `${methodName(m.method)} — ${m.label ?? "all classes (class-agnostic)"}`;
  return m.index == null ? what : `${what} · score ${formatScore(m.score)}`;
}

/** Everything that depends on the sliders; no request. */
function redraw() {
  const result = state.result;
  if (!result) return;
  const scoreCut = sliderValue("score-threshold");
  const regionCut = sliderValue("region-threshold");
  const opacity = sliderValue("opacity");
  const { width, height } = result.image;
  for (const m of result.maps) {
    m.regions = regions(m.strength, m.height, m.width, regionCut, width / m.width, height / m.height);
  }
  for (const tr of $("scores").tBodies[0].rows) {
    const score = result.body.predictions[Number(tr.dataset.index)].score;
    const finding = score >= scoreCut;
    tr.classList.toggle("below", !finding);
    tr.cells[3].textContent = finding ? "finding" : "below threshold";
    tr.cells[2].firstChild.style.setProperty("--t", scoreCut);
  }
  draw.drawImage($("view-original"), state.original);
  for (const figure of $("cards").children) {
    const m = result.maps[Number(figure.dataset.key)];
    const finding = isFinding(m, scoreCut);
    figure.classList.toggle("below", !finding);
    figure.classList.toggle("selected", m.key === state.selected);
    figure.querySelector("button").setAttribute("aria-pressed", String(m.key === state.selected));
    figure.dataset.regions = JSON.stringify(m.regions.map((r) => r.box));
    paintMap(figure.querySelector("canvas"), m, opacity, finding, false);
    const [text, list] = figure.querySelector("figcaption").children;
    text.replaceChildren(captionText(m, scoreCut), ...(finding ? [] : [belowMark(m, scoreCut)]),
                         ` · ${m.regions.length} region${m.regions.length === 1 ? "" : "s"}`);
    list.replaceChildren(...m.regions.map((r) => {
      const li = document.createElement("li");
      const [x0, y0, x1, y1] = r.box;
      li.textContent = `x ${x0}–${x1}, y ${y0}–${y1} · peak ${r.score.toFixed(2)}`;
      return li;
    }));
  }
  const selected = result.maps[state.selected];
  const overlay = $("view-overlay");
  if (selected) {
    paintMap(overlay, selected, opacity, isFinding(selected, scoreCut), true);
    overlay.dataset.regions = JSON.stringify(selected.regions.map((r) => r.box));
    const finding = isFinding(selected, scoreCut);
    $("overlay-caption").replaceChildren(captionText(selected, scoreCut),
                                         ...(finding ? [] : [belowMark(selected, scoreCut)]));
    overlay.setAttribute("aria-label", `${captionText(selected, scoreCut)} over the image`);
  } else {
    draw.drawImage(overlay, state.original);
    $("overlay-caption").textContent = "No map";
  }
  paintSummary(scoreCut);
  draw.drawColourBar($("bar"), regionCut);
  showSliderValues();
  // The slider values the canvases now show: whoever waits for a redraw can tell.
  $("results").dataset.drawn = JSON.stringify([scoreCut, regionCut, opacity]);
  const missing = result.body.predictions.filter((p) => p.score >= scoreCut &&
    !result.maps.some((m) => m.index === p.index));
  $("unexplained").hidden = !missing.length;
  $("unexplained").textContent = missing.length
    ? `${missing.map((p) => p.label).join(", ")} ${missing.length === 1 ? "is" : "are"} at or above the score threshold but not explained: tick ${missing.length === 1 ? "it" : "them"} under Classes and press Explain.`
    : "";
}

function belowMark(m, threshold) {
  const mark = document.createElement("strong");
  mark.className = "mark-below";
  mark.textContent = ` below score threshold (${formatScore(m.score)} < ${threshold.toFixed(2)})`;
  return mark;
}

function paintMap(canvas, m, opacity, finding, labelled) {
  draw.drawImage(canvas, state.original);
  draw.drawMap(canvas, m.layer, opacity);
  const { width, height } = state.result.image;
  const colour = draw.classColour(m.index);
  const text = m.label ? `${m.label} ${formatScore(m.score)}` : "all classes";
  draw.drawBoxes(canvas, m.regions.map((r, i) => ({ box: r.box, text: labelled && i === 0 ? text : "" })),
                 width, height, colour, { dashed: !finding });
  if (m.points) draw.drawPoints(canvas, m.points, width, height, colour);
  if (!finding) draw.drawNotice(canvas, "below score threshold");
}

function paintSummary(scoreCut) {
  const canvas = $("view-summary");
  const method = $("summary-method").value;
  const { width, height } = state.result.image;
  draw.drawImage(canvas, state.original);
  const findings = state.result.maps.filter((m) => m.method === method && m.index != null && m.score >= scoreCut);
  const placed = [];
  for (const m of findings) {
    const colour = draw.classColour(m.index);
    draw.drawBoxes(canvas, m.regions.map((r, i) => ({ box: r.box, text: i === 0 ? `${m.label} ${formatScore(m.score)}` : "" })),
                   width, height, colour, { placed });
    if (m.points) draw.drawPoints(canvas, m.points, width, height, colour);
  }
  if (!findings.length) draw.drawNotice(canvas, `No finding at score ≥ ${scoreCut.toFixed(2)}`);
  canvas.dataset.regions = JSON.stringify(Object.fromEntries(findings.map((m) => [m.label, m.regions.map((r) => r.box)])));
  $("legend").replaceChildren(...findings.map((m) => {
    const li = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.setProperty("--c", draw.classColour(m.index));
    li.append(swatch, `${m.label} ${formatScore(m.score)} (${m.regions.length} region${m.regions.length === 1 ? "" : "s"})`);
    return li;
  }));
  canvas.setAttribute("aria-label", findings.length
    ? `Summary: ${findings.map((m) => m.label).join(", ")} from ${methodName(method)}`
    : "Summary: no finding at this score threshold");
}

// ---------------------------------------------------------------- downloads

function save(blob, name) {
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

const stem = () => (state.file ? state.file.name.replace(/\.[^.]*$/, "") : "image");

async function downloadDicom(kind) {
  const result = state.result;
  if (!result || !state.file) return;
  const button = $(`dl-${kind}`);
  button.disabled = true;
  hideError();
  try {
    const { model, target, window: voi, frame } = result.params;
    const base = { model, target, window: voi, frame, region_threshold: sliderValue("region-threshold") };
    let params, name;
    if (kind !== "sc") {  // one object of every map
      const methods = [...new Set(result.maps.map((m) => m.method))];
      const classes = [...new Set(result.maps.filter((m) => m.index != null).map((m) => m.index))];
      params = { ...base, methods: methods.join(","), classes: classes.join(","), dicom: kind };
      name = `${stem()}.${kind}.dcm`;
    } else {
      const m = result.maps[state.selected];
      params = { ...base, methods: m.method, classes: m.index ?? "", dicom: "sc" };
      name = `${stem()}.${m.method}${m.label ? `-${m.label.replace(/\W+/g, "_")}` : ""}.sc.dcm`;
    }
    save(await api.explainDicom(state.file, params), name);
  } catch (err) {
    showError(err);
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------- wiring

let pending = 0;
function redrawSoon() {
  showSliderValues();
  cancelAnimationFrame(pending);
  pending = requestAnimationFrame(redraw);
}

function chooseFile(file) {
  if (!file) return;
  state.file = file;
  // Ticks the service chose for the last image are not a choice for this one; ticks the
  // reader made are.
  if (!state.classesTouched) {
    for (const box of document.querySelectorAll("input[name=class]")) box.checked = false;
  }
  run();
}

$("controls").addEventListener("submit", (e) => { e.preventDefault(); run(); });
$("cancel").addEventListener("click", () => state.controller?.abort());
$("model").addEventListener("change", chooseModel);
$("file").addEventListener("change", () => chooseFile($("file").files[0]));
$("method-list").addEventListener("change", () => { checkMethods(); markStale(); });
$("class-list").addEventListener("change", () => { state.classesTouched = true; markStale(); });
for (const id of ["target", "window", "frame"]) $(id).addEventListener("change", markStale);
const useKey = () => { api.setApiKey($("key").value); loadModels(); };
$("key").addEventListener("change", useKey);
$("key").addEventListener("keydown", (e) => {
  if (e.key === "Enter") { e.preventDefault(); useKey(); }  // a key, not an upload
});
for (const id of ["score-threshold", "region-threshold", "opacity"]) $(id).addEventListener("input", redrawSoon);
$("summary-method").addEventListener("change", redraw);
$("dl-json").addEventListener("click", () => state.blob && save(state.blob, `${stem()}.explain.json`));
$("dl-sc").addEventListener("click", () => downloadDicom("sc"));
$("dl-sr").addEventListener("click", () => downloadDicom("sr"));
$("dl-gsps").addEventListener("click", () => downloadDicom("gsps"));
$("dl-seg").addEventListener("click", () => downloadDicom("seg"));
let resizing = 0, laidOut = 0;
new ResizeObserver(([entry]) => {  // a new width only: heights follow from it
  if (Math.round(entry.contentRect.width) === laidOut) return;
  laidOut = Math.round(entry.contentRect.width);
  cancelAnimationFrame(resizing);
  resizing = requestAnimationFrame(layout);
}).observe($("views"));
document.addEventListener("dragover", (e) => e.preventDefault());
document.addEventListener("drop", (e) => { e.preventDefault(); chooseFile(e.dataTransfer.files[0]); });

showSliderValues();
loadModels();
