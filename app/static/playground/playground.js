"use strict";
// The playground: one panel per task, each a form posted to this server's API with fetch. No framework and
// no build step; nothing comes from, or goes to, any other host (the page's Content-Security-Policy says so).

const KEY_STORE = "perceiver-api-key";
const TIMINGS = [
  ["x-queue-time-ms", "queue", " ms"],
  ["x-inference-time-ms", "inference", " ms"],
  ["x-batch-size", "batch", ""],
];
// Each error status in plain words; the server's own message follows (it says which field and why).
const PLAIN = {
  400: "The request was malformed",
  401: "This server needs an API key",
  404: "Not found on this server",
  408: "The upload did not arrive in time",
  413: "Too large for this server",
  415: "This file type is not supported",
  422: "The server could not use this input",
  429: "The server is busy right now",
  499: "The request was cancelled",
  500: "The server failed on this request",
  503: "The server is not ready (still loading models, or shutting down)",
  504: "The server could not finish in time",
};

const state = { key: sessionStorage.getItem(KEY_STORE) || "", demo: false, models: [] };

class ApiError extends Error {}

// ------------------------------------------------------------------------------------------ helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  node.append(...children);
  return node;
}

function percent(score) {
  return (score * 100).toFixed(1) + "%";
}

function hex(byte) {
  return "\\x" + byte.toString(16).padStart(2, "0");
}

function visible(text) {
  // Control characters as \xNN, so that a filled byte is never invisible.
  return text.replace(/[\u0000-\u001f\u007f]/g, (c) => hex(c.charCodeAt(0)));
}

function showBytes(bytes) {
  // Valid UTF-8 as text; otherwise printable ASCII as itself and every other byte as \xNN.
  try {
    return visible(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch {
    return [...bytes].map((b) => (b >= 0x20 && b < 0x7f ? String.fromCharCode(b) : hex(b))).join("");
  }
}

const objectUrls = new WeakMap();
function showBlob(media, blob) {
  const old = objectUrls.get(media);
  if (old) URL.revokeObjectURL(old);
  const url = URL.createObjectURL(blob);
  objectUrls.set(media, url);
  media.src = url;
  media.hidden = false;
}

// -------------------------------------------------------------------------------------- the API key

let keyPrompt = null;

function askForKey(why) {
  // One prompt at a time, however many panels are waiting for it.
  if (keyPrompt) return keyPrompt;
  const dialog = document.getElementById("key-dialog");
  const form = document.getElementById("key-form");
  const input = document.getElementById("key-input");
  document.getElementById("key-why").textContent = why;
  keyPrompt = new Promise((resolve) => {
    const finish = (value) => {
      form.removeEventListener("submit", onSubmit);
      dialog.removeEventListener("close", onClose);
      if (dialog.open) dialog.close();
      keyPrompt = null;
      resolve(value);
    };
    const onSubmit = (event) => {
      event.preventDefault();
      finish(input.value.trim() || null);
    };
    const onClose = () => finish(null);  // Cancel, or Escape
    form.addEventListener("submit", onSubmit);
    dialog.addEventListener("close", onClose);
    input.value = "";
    dialog.showModal();
    input.focus();
  });
  return keyPrompt;
}

function setKey(key) {
  state.key = key;
  sessionStorage.setItem(KEY_STORE, key);
  document.getElementById("key-button").hidden = false;
}

// ------------------------------------------------------------------------------------------ calling

async function call(path, init = {}) {
  // fetch with the key, asking for one on 401 and retrying; resolves to {response, ms} for a 2xx.
  let why = "This server needs an API key. It is sent only to this server, as Authorization: Bearer <key>.";
  for (;;) {
    const headers = new Headers(init.headers);
    if (state.key) headers.set("Authorization", "Bearer " + state.key);
    const started = performance.now();
    let response;
    try {
      response = await fetch(path, { ...init, headers });
    } catch {
      throw new ApiError("The server could not be reached. Is it still running?");
    }
    const ms = performance.now() - started;
    if (response.status === 401) {
      document.getElementById("key-button").hidden = false;
      if (state.key) why = "That API key was not accepted. Check it and try again.";
      const key = await askForKey(why);
      if (key === null) throw new ApiError("This server needs an API key, and none was given.");
      setKey(key);
      continue;
    }
    if (!response.ok) throw await describeError(response);
    return { response, ms };
  }
}

function postJson(path, payload) {
  return call(path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(payload) });
}

async function describeError(response) {
  let message = "";
  try {
    const body = await response.json();
    message = body.error.message;
  } catch {
    message = response.statusText;
  }
  let plain = PLAIN[response.status] || `The server answered ${response.status}`;
  const retry = response.headers.get("retry-after");
  if (retry) plain += `; try again in ${retry} s`;
  return new ApiError(message ? `${plain}: ${message}.` : `${plain}.`);
}

// ---------------------------------------------------------------------------------- what each shows

function weightsNote(name) {
  // Where a model's weights come from, with a badge when they are random.
  const model = state.models.find((m) => m.name === name);
  const note = el("span", { class: "weights" });
  if (!model) return note;
  note.append(`${model.name}: weights from ${model.source}`);
  if (model.weights === "random-init") {
    note.append(" ", el("span", { class: "badge", title: "Untrained: predictions are meaningless" }, "random weights"));
  } else if (model.weights && model.weights !== model.source) {
    note.append(` (${model.weights})`);
  }
  return note;
}

function timings(answer, model) {
  // Who answered, and how long it took: the round trip measured here, the rest from the server's headers.
  const parts = [];
  for (const [header, name, unit] of TIMINGS) {
    const value = answer.response.headers.get(header);
    if (value !== null) parts.push(`${name} ${value}${unit}`);
  }
  const detail = parts.length ? ` (${parts.join(" · ")})` : "";
  return el("p", { class: "latency" }, `${model} answered in ${Math.round(answer.ms)} ms${detail}`);
}

function bars(predictions) {
  const list = el("ol", { class: "bars" });
  for (const p of predictions) {
    const fill = el("span", { class: "fill" });
    fill.style.width = percent(p.score);
    list.append(
      el(
        "li",
        {},
        el("span", { class: "label" }, p.label),
        el("span", { class: "bar", "aria-hidden": "true" }, fill),
        el("span", { class: "score" }, percent(p.score)),
      ),
    );
  }
  return list;
}

function filledText(input, masks) {
  // The input with each run of [MASK]s replaced by its best bytes, highlighted; the server's byte offsets
  // count bytes of the filled text, so the runs are rebuilt here from the input's own pieces.
  const pieces = input.split("[MASK]");
  const out = el("p", { class: "filled" });
  if (pieces.length - 1 !== masks.length) return null;
  let run = [];
  const flush = () => {
    if (!run.length) return;
    const bytes = new Uint8Array(run.map((m) => m.candidates[0].byte));
    const why = run.map((m) => `byte ${m.byte_offset}: ${hex(m.candidates[0].byte)}`);
    out.append(el("mark", { title: why.join(", ") }, showBytes(bytes)));
    run = [];
  };
  pieces.forEach((piece, i) => {
    if (piece) {
      flush();
      out.append(piece);
    }
    if (i < masks.length) run.push(masks[i]);
  });
  flush();
  return out;
}

function candidates(masks) {
  const list = el("ol", { class: "candidates" });
  for (const mask of masks.slice(0, 8)) {
    const options = mask.candidates.map((c) => {
      const shown = c.byte >= 0x20 && c.byte < 0x7f ? JSON.stringify(String.fromCharCode(c.byte)) : hex(c.byte);
      return `${shown} ${percent(c.score)}`;
    });
    list.append(el("li", {}, `byte ${mask.byte_offset}: ${options.join(", ")}`));
  }
  if (masks.length > 8) list.append(el("li", {}, `… and ${masks.length - 8} more`));
  return list;
}

function video(label) {
  const node = el("video", { controls: "", loop: "", playsinline: "", "aria-label": label });
  node.muted = true;
  return node;
}

function figure(media, caption) {
  return el("figure", {}, media, el("figcaption", {}, caption));
}

// --------------------------------------------------------------------------------------- the panels

const PANELS = {
  classify: {
    async run(form) {
      const data = new FormData(form);
      const answer = await call("/v1/classify", { method: "POST", body: data });
      const body = await answer.response.json();
      return [bars(body.predictions), timings(answer, body.model)];
    },
    model: (form) => `classify/${form.elements.model.value}`,
  },
  "fill-mask": {
    async run(form) {
      const text = form.elements.text.value;
      const answer = await postJson("/v1/fill-mask", { text, top_k: 3 });
      const body = await answer.response.json();
      const filled = filledText(text, body.masks) || el("p", { class: "filled" }, visible(body.text));
      return [filled, candidates(body.masks), timings(answer, body.model)];
    },
  },
  "classify-text": {
    async run(form) {
      const answer = await postJson("/v1/classify-text", { text: form.elements.text.value, top_k: 2 });
      const body = await answer.response.json();
      return [bars(body.predictions), timings(answer, body.model)];
    },
  },
  "optical-flow": {
    async run(form) {
      const data = new FormData(form);
      data.set("format", "png");
      const answer = await call("/v1/optical-flow", { method: "POST", body: data });
      const alt = "Optical flow as a colour wheel: hue is the direction, saturation the speed";
      const flow = el("img", { class: "flow", alt });
      showBlob(flow, await answer.response.blob());
      const frames = [...form.querySelectorAll("img.preview")].map((img, i) => {
        const copy = el("img", { alt: `Frame ${i + 1}` });
        copy.src = img.src;
        return figure(copy, `Frame ${i + 1}`);
      });
      const shape = JSON.parse(answer.response.headers.get("x-flow-shape") || "[]");
      const size = shape.length ? `flow ${shape[1]}×${shape[0]}` : "flow";
      const row = el("div", { class: "frames" }, ...frames, figure(flow, size));
      return [row, timings(answer, answer.response.headers.get("x-model"))];
    },
  },
  autoencode: {
    async run(form) {
      const data = new FormData(form);
      data.set("reconstruction", "mp4");  // the labels come along in x-predictions
      const answer = await call("/v1/autoencode", { method: "POST", body: data });
      const predictions = JSON.parse(answer.response.headers.get("x-predictions") || "[]");
      const original = video("Your video");
      showBlob(original, form.elements.video.files[0]);
      const rebuilt = video("Reconstructed frames");
      rebuilt.autoplay = true;
      showBlob(rebuilt, await answer.response.blob());
      const row = el("div", { class: "frames" }, figure(original, "Your video"), figure(rebuilt, "Reconstructed"));
      return [bars(predictions), row, timings(answer, answer.response.headers.get("x-model"))];
    },
  },
};

async function submit(panel, spec, form) {
  const result = panel.querySelector(".result");
  const button = form.querySelector("button[type=submit]");
  button.disabled = true;
  result.setAttribute("aria-busy", "true");
  result.replaceChildren(el("p", { class: "working" }, "Working…"));
  try {
    result.replaceChildren(...(await spec.run(form)));
  } catch (error) {
    const text = error instanceof ApiError ? error.message : `Something went wrong in this page: ${error.message}`;
    result.replaceChildren(el("p", { class: "error", role: "alert" }, text));
  } finally {
    button.disabled = false;
    result.removeAttribute("aria-busy");
  }
}

function wireDrops(panel) {
  for (const zone of panel.querySelectorAll(".drop")) {
    const input = zone.querySelector("input[type=file]");
    const preview = zone.querySelector("img.preview");
    zone.addEventListener("dragover", (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      if (event.dataTransfer.files.length) {
        input.files = event.dataTransfer.files;
        input.dispatchEvent(new Event("change"));
      }
    });
    const chosen = el("span", { class: "chosen" });
    zone.append(chosen);
    input.addEventListener("change", () => {
      const file = input.files[0];
      chosen.textContent = file ? `Chosen: ${file.name}` : "";
      if (preview && file) showBlob(preview, file);
    });
    if (preview) preview.addEventListener("error", () => (preview.hidden = true));  // not an image after all
  }
}

function showSources(panel) {
  // Which model answers this panel, and where its weights come from, before anything is sent.
  const task = panel.dataset.task;
  const served = state.models.filter((m) => m.task === task);
  let line = panel.querySelector(".source");
  if (!line) {
    line = el("p", { class: "source" });
    panel.querySelector("h2").after(line);
  }
  if (!served.length) {
    line.replaceChildren("This server does not serve this task.");
    for (const control of panel.querySelectorAll("input, select, textarea, button")) control.disabled = true;
    return;
  }
  const spec = PANELS[task];
  line.replaceChildren(weightsNote(spec.model ? spec.model(panel.querySelector("form")) : served[0].name));
}

async function loadModels() {
  const status = document.getElementById("server");
  try {
    const { response } = await call("/v1/models");
    const body = await response.json();
    state.demo = body.demo;
    state.models = body.models;
  } catch (error) {
    status.replaceChildren(el("span", { class: "error", role: "alert" }, error.message));
    return;
  }
  if (!state.models.length) {
    status.textContent = "The server is still loading its models…";
    setTimeout(loadModels, 2000);
    return;
  }
  status.replaceChildren(`${state.models.length} models served.`);
  if (state.demo) {
    status.append(
      " ",
      el("span", { class: "badge" }, "random weights"),
      " Demo profile: small untrained models, so predictions are meaningless.",
    );
  }
  const select = document.querySelector("#classify select[name=model]");
  select.replaceChildren(
    ...state.models.filter((m) => m.task === "classify").map((m) => el("option", { value: m.variant }, m.variant)),
  );
  for (const panel of document.querySelectorAll(".panel")) showSources(panel);
}

function start() {
  for (const panel of document.querySelectorAll(".panel")) {
    const spec = PANELS[panel.dataset.task];
    const form = panel.querySelector("form");
    wireDrops(panel);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      submit(panel, spec, form);
    });
    form.addEventListener("change", () => state.models.length && showSources(panel));
  }
  const keyButton = document.getElementById("key-button");
  keyButton.hidden = !state.key;
  keyButton.addEventListener("click", async () => {
    const key = await askForKey("Enter the API key to send with every request.");
    if (key !== null) {
      setKey(key);
      loadModels();
    }
  });
  document.getElementById("key-cancel").addEventListener("click", () => document.getElementById("key-dialog").close());
  loadModels();
}

start();
