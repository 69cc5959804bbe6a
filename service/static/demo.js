// dinoserve demo page: one image → POST /v1/segment, collection search and POST /v1/classify, in parallel.
// Plain browser JavaScript, no dependencies; every request goes to this gateway.
"use strict";

const MAX_UPLOAD_SIDE = 1024; // the model sees 480 px (masks) and 224 px (embeddings) anyway
const NEIGHBOURS = 8;
const SEGMENT_OUTPUTS = "overlay,heads,mask_png";
const KEY_STORAGE = "dinoserve-api-key"; // sessionStorage: forgotten when the tab closes

const state = { collection: null, run: 0, photoUrl: null };
const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(message, code, status) {
    super(message);
    this.code = code;
    this.status = status;
  }
}

/** fetch() with the API key the user gave (if any) that returns the JSON body, or throws ApiError with the
 * API's {"error": {code, message}}; a 401 shows the key form. */
async function api(path, options = {}) {
  const key = sessionStorage.getItem(KEY_STORAGE);
  let response;
  try {
    response = await fetch(path, { ...options, headers: key ? { Authorization: `Bearer ${key}` } : {} });
  } catch (err) {
    throw new ApiError(`the gateway did not answer (${err.message})`, "network_error", 0);
  }
  const text = await response.text();
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    body = null;
  }
  if (!response.ok) {
    if (response.status === 401) $("key-form").hidden = false;
    if (body && body.error) throw new ApiError(body.error.message, body.error.code, response.status);
    throw new ApiError(text || response.statusText, "http_error", response.status);
  }
  return body;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// ------------------------------------------------------------------------------------------ card states

function loading(card) {
  card.classList.remove("failed", "off");
  card.classList.add("loading");
  const status = card.querySelector(".status");
  status.replaceChildren(element("span", "spinner"), document.createTextNode("computing…"));
}

function done(card) {
  card.classList.remove("loading", "failed", "off");
  card.querySelector(".status").replaceChildren();
}

function failed(card, err, hint) {
  card.classList.remove("loading", "off");
  card.classList.add("failed");
  const box = element("div", "error");
  box.append(element("p", "message", err.message));
  const where = err.status ? `HTTP ${err.status} · ${err.code}` : err.code || "error";
  if (err.status === 401) hint = "enter an API key at the top of the page, then choose the image again";
  box.append(element("small", "", hint ? `${where} · ${hint}` : where));
  card.querySelector(".status").replaceChildren(box);
}

function off(card, text) {
  card.classList.remove("loading", "failed");
  card.classList.add("off");
  card.querySelector(".status").replaceChildren(element("span", "note", text));
}

// ------------------------------------------------------------------------------------------ requests

function imageForm(field, blob, fields) {
  const form = new FormData();
  form.append(field, blob, blob.name || "image.jpg");
  for (const [key, value] of Object.entries(fields)) form.append(key, String(value));
  return form;
}

function pngData(base64) {
  return `data:image/png;base64,${base64}`;
}

/** A thumbnail URL from an item's metadata, used only when it points at this gateway. */
function thumbnailOf(metadata) {
  const url = metadata && metadata.thumbnail;
  return typeof url === "string" && url.startsWith("/") && !url.startsWith("//") ? url : null;
}

function collectionHint(err) {
  return err.code === "collection_not_found"
    ? "the gateway fills the demo collection in the background after it starts: try again in a few seconds"
    : "";
}

async function showSegmentation(blob, current) {
  const cards = [$("segment-card"), $("heads-card")];
  try {
    const form = imageForm("image", blob, { outputs: SEGMENT_OUTPUTS });
    const body = await api("/v1/segment", { method: "POST", body: form });
    if (!current()) return;
    $("overlay").src = pngData(body.overlay_png);
    $("mask").src = pngData(body.mask_png);
    $("heads").replaceChildren(...body.heads_png.map((png, i) => {
      const figure = element("figure", "head");
      const img = element("img", "picture");
      img.src = pngData(png);
      img.alt = `attention of head ${i}`;
      figure.append(img, element("figcaption", "", `head ${i}`));
      return figure;
    }));
    cards.forEach(done);
  } catch (err) {
    if (current()) cards.forEach((card) => failed(card, err));
  }
}

async function showNeighbours(blob, current) {
  const card = $("neighbours-card");
  if (!state.collection) {
    off(card, "No demo collection: this gateway runs with DINOSERVE_DEMO_COLLECTION empty.");
    return;
  }
  try {
    const path = `/v1/collections/${encodeURIComponent(state.collection)}/search`;
    const body = await api(path, { method: "POST", body: imageForm("image", blob, { k: NEIGHBOURS }) });
    if (!current()) return;
    $("neighbours").replaceChildren(...body.results.map((hit) => {
      const figure = element("figure", "neighbour");
      const url = thumbnailOf(hit.metadata);
      if (url) {
        const img = element("img");
        img.src = url;
        img.alt = hit.id;
        figure.append(img);
      } else {
        figure.append(element("div", "no-thumbnail", "no thumbnail"));
      }
      const caption = element("figcaption");
      caption.append(element("strong", "", hit.label ?? "—"), element("span", "score", hit.score.toFixed(3)));
      figure.append(caption, element("span", "id", hit.id));
      return figure;
    }));
    done(card);
  } catch (err) {
    if (current()) failed(card, err, collectionHint(err));
  }
}

async function showLabel(blob, current) {
  const card = $("classify-card");
  if (!state.collection) {
    off(card, "No demo collection: this gateway runs with DINOSERVE_DEMO_COLLECTION empty.");
    return;
  }
  try {
    const form = imageForm("images", blob, { collection: state.collection });
    const body = await api("/v1/classify", { method: "POST", body: form });
    if (!current()) return;
    const result = body.data[0];
    $("label").textContent = result.label;
    const share = element("span");
    share.append(element("strong", "", `${Math.round(result.scores[0].score * 100)}%`),
      document.createTextNode(" of the vote"));
    $("share").replaceChildren(share);
    $("scores").replaceChildren(...result.scores.map((entry) => {
      const row = element("li");
      const bar = element("div", "bar");
      const fill = element("span");
      const percent = `${(entry.score * 100).toFixed(1)}%`;
      fill.style.width = percent;
      bar.append(fill);
      row.append(element("span", "name", entry.label), bar, element("span", "value", percent));
      return row;
    }));
    $("classify-caption").textContent =
      `weighted vote of the ${result.neighbors.length} nearest labelled items (k=${body.k}, T=${body.temperature})`;
    done(card);
  } catch (err) {
    if (current()) failed(card, err, collectionHint(err));
  }
}

// ------------------------------------------------------------------------------------------ choosing an image

/** The file as is, or scaled down to MAX_UPLOAD_SIDE as JPEG when larger; files the browser cannot
 * decode go up unchanged, for the API to judge. */
async function fitForUpload(file) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch {
    return file;
  }
  const scale = MAX_UPLOAD_SIDE / Math.max(bitmap.width, bitmap.height);
  if (scale >= 1) {
    bitmap.close();
    return file;
  }
  const canvas = document.createElement("canvas");
  canvas.width = Math.round(bitmap.width * scale);
  canvas.height = Math.round(bitmap.height * scale);
  canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  bitmap.close();
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.92));
  return blob ? new File([blob], "scaled.jpg", { type: "image/jpeg" }) : file;
}

async function analyse(file, caption) {
  const run = ++state.run;
  const current = () => run === state.run; // a newer choice makes older answers stale
  $("results").hidden = false;
  if (state.photoUrl) URL.revokeObjectURL(state.photoUrl);
  state.photoUrl = URL.createObjectURL(file);
  $("photo").src = state.photoUrl;
  $("photo-caption").textContent = caption;
  document.querySelectorAll("#results .card:has(.status)").forEach(loading);
  const upload = await fitForUpload(file);
  if (!current()) return;
  await Promise.all([showSegmentation(upload, current), showLabel(upload, current), showNeighbours(upload, current)]);
}

function choose(button) {
  document.querySelectorAll(".sample.chosen").forEach((b) => b.classList.remove("chosen"));
  if (button) button.classList.add("chosen");
}

async function pickSample(sample, button) {
  choose(button);
  const response = await fetch(sample.url);
  const blob = await response.blob();
  await analyse(new File([blob], `sample-${sample.index}.jpg`, { type: blob.type }),
    `sample ${sample.index}: a synthetic ${sample.label}, not in the collection`);
}

async function loadSamples() {
  const row = $("samples");
  try {
    const body = await api("/demo/samples");
    state.collection = body.collection;
    $("neighbours-source").textContent = state.collection ? `in collection “${state.collection}”` : "";
    row.replaceChildren(...body.data.map((sample) => {
      const button = element("button", "sample");
      button.type = "button";
      button.dataset.index = sample.index;
      const img = element("img");
      img.src = sample.url;
      img.alt = `sample ${sample.index}: ${sample.label}`;
      button.append(img, element("span", "", sample.label));
      button.addEventListener("click", () => pickSample(sample, button));
      return button;
    }));
  } catch (err) {
    row.replaceChildren(element("p", "error", err.message));
  }
}

async function loadModel() {
  try {
    const body = await api("/v1/models");
    const card = body.data[0];
    $("model").textContent = `model: ${card.name} · ${card.method.toUpperCase()} ${card.arch}/${card.patch_size}` +
      ` · ${card.embed_dim}-d · ${card.num_heads} heads`;
  } catch (err) {
    $("model").textContent = `model: unavailable (${err.message})`;
  }
}

function wireKeyForm() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    $("api-key").value = "";
    $("key-form").hidden = true;
    loadModel();
  });
}

function wireUploads() {
  const zone = $("dropzone");
  $("file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) {
      choose(null);
      analyse(file, file.name);
    }
    event.target.value = ""; // choosing the same file again still triggers "change"
  });
  // Drops land anywhere on the page; the browser must not navigate to the dropped file.
  let depth = 0;
  document.addEventListener("dragenter", (event) => {
    event.preventDefault();
    depth += 1;
    zone.classList.add("dragging");
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) zone.classList.remove("dragging");
  });
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    depth = 0;
    zone.classList.remove("dragging");
    const file = event.dataTransfer && event.dataTransfer.files[0];
    if (file) {
      choose(null);
      analyse(file, file.name);
    }
  });
}

wireKeyForm();
wireUploads();
loadModel();
loadSamples();
