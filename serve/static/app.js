// sdc serve's page logic (see the comment at the top of index.html for routes and element ids).
"use strict";
const $ = (id) => document.getElementById(id);
const status = (text, isError = false) => {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
};

// fetch + JSON; a non-2xx answer throws an Error with the server's one-line detail.
async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const res = await fetch(path, init);
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { /* not JSON */ }
  if (!res.ok) {
    const msg = (data && (data.detail || data.error)) || text || res.statusText;
    throw new Error(`${res.status}: ${typeof msg === "string" ? msg : JSON.stringify(msg)}`);
  }
  return data;
}

function option(select, value, label = value) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = label;
  select.append(o);
}

function renderLoras(loras) {
  const list = $("lora-list");
  if (!loras.length) return;
  list.replaceChildren();
  for (const lora of loras) {
    const row = document.createElement("div");
    row.className = "lora";
    row.dataset.name = lora.name;
    row.innerHTML = `<label><input type="checkbox" class="lora-use"><span></span></label>
      <span class="muted"></span>
      <input type="number" class="lora-weight" value="1" step="0.05" min="-4" max="4"
             title="weight" aria-label="weight">
      <div class="lora-triggers"></div>`;
    row.querySelector("label span").textContent = lora.alias || lora.name;
    row.querySelector(".muted").textContent = lora.path || "";
    const triggers = row.querySelector(".lora-triggers");
    for (const word of lora.triggers || []) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "trigger";
      b.title = "add to the prompt";
      b.textContent = word;
      b.addEventListener("click", () => {
        const p = $("prompt");
        p.value = p.value.trim() ? `${p.value.trim()}, ${word}` : word;
      });
      triggers.append(b);
    }
    if (!triggers.children.length) triggers.innerHTML = '<span class="muted">no trigger words</span>';
    list.append(row);
  }
}

// The prompt as sent: the typed text plus one <lora:NAME:WEIGHT> tag per ticked LoRA.
function promptWithLoras() {
  const tags = [...document.querySelectorAll(".lora")]
    .filter((row) => row.querySelector(".lora-use").checked)
    .map((row) => `<lora:${row.dataset.name}:${Number(row.querySelector(".lora-weight").value) || 0}>`);
  return [$("prompt").value.trim(), ...tags].filter(Boolean).join(" ");
}

function addResult(b64, params) {
  const item = document.createElement("figure");
  item.className = "result";
  const img = document.createElement("img");
  img.src = `data:image/png;base64,${b64}`;
  img.alt = params.split("\n")[0];
  const text = document.createElement("figcaption");
  text.className = "params";
  text.textContent = params;
  item.append(img, text);
  $("gallery").prepend(item);
}

let busy = false;
let stopped = false; // Stop was pressed during this request

async function pollProgress() {
  while (busy) {
    try {
      const p = await api("/sdapi/v1/progress");
      if (!busy) break;
      $("progress").value = Math.round(Math.max(0, Math.min(1, p.progress || 0)) * 1000) / 10;
      const s = p.state || {};
      const step = s.sampling_steps ? `step ${s.sampling_step}/${s.sampling_steps}` : "working";
      const eta = p.eta_relative > 0 ? `, ~${p.eta_relative.toFixed(1)} s left` : "";
      status(`${p.textinfo || step}${eta}`);
    } catch (_) { /* a missed poll is harmless */ }
    await new Promise((r) => setTimeout(r, 250));
  }
}

async function generate(event) {
  event.preventDefault();
  if (busy) return;
  const num = (id) => Number($(id).value);
  const body = {
    prompt: promptWithLoras(), negative_prompt: $("negative").value.trim(),
    steps: num("steps"), cfg_scale: num("cfg"), seed: $("seed").value === "" ? -1 : num("seed"),
    width: num("width"), height: num("height"), sampler_name: $("sampler").value,
    batch_size: 1, n_iter: 1, override_settings: { sd_model_checkpoint: $("model").value },
  };
  busy = true;
  stopped = false;
  $("generate").disabled = true;
  $("stop").disabled = false;
  $("progress").value = 0;
  status("starting…");
  const started = performance.now();
  pollProgress();
  try {
    const res = await api("/sdapi/v1/txt2img", body);
    const info = typeof res.info === "string" ? JSON.parse(res.info) : res.info || {};
    res.images.forEach((b64, i) => addResult(b64, (info.infotexts || [])[i] || body.prompt));
    $("progress").value = 100;
    status(`${stopped ? "stopped" : "done"} in ${((performance.now() - started) / 1000).toFixed(1)} s, seed ${info.seed}`);
  } catch (err) {
    $("progress").value = 0;
    status(err.message, true);
  } finally {
    busy = false;
    $("generate").disabled = false;
    $("stop").disabled = true;
  }
}

async function switchModel() {
  const title = $("model").value;
  $("generate").disabled = true;
  status(`loading ${title}…`);
  try {
    await api("/sdapi/v1/options", { sd_model_checkpoint: title });
    status(`${title} loaded`);
  } catch (err) {
    status(err.message, true);
  } finally {
    $("generate").disabled = busy;
  }
}

async function init() {
  $("form").addEventListener("submit", generate);
  $("stop").addEventListener("click", () => {
    stopped = true;
    api("/sdapi/v1/interrupt", {}).catch((err) => status(err.message, true));
  });
  $("model").addEventListener("change", switchModel);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("form").requestSubmit();
  });
  try {
    const [models, options, samplers, loras] = await Promise.all(
      ["sd-models", "options", "samplers", "loras"].map((r) => api(`/sdapi/v1/${r}`)));
    for (const m of models) option($("model"), m.title);
    const current = options.sd_model_checkpoint;
    const loaded = models.find((m) => m.title === current || m.model_name === current);
    if (loaded) $("model").value = loaded.title;
    for (const s of samplers) option($("sampler"), s.name);
    renderLoras(loras);
    status("ready");
  } catch (err) {
    status(`could not load the server's settings: ${err.message}`, true);
  }
}

init();
