// The steering page: plain JS, no build step, nothing fetched from outside this server.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { include: [], exclude: [], pickerOffset: 0, last: null, selected: null,
                inFlight: false, again: false, timer: null, streams: {}, logs: {} };

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok) throw new Error((body && body.detail) || `${response.status} ${response.statusText}`);
  return body;
}

function requestBody() {
  const hooks = [];
  const label = $("class-label").value;
  const style = $("hook-style").value;
  const picksLayer = $("picks-layer").value;
  if (label !== "") hooks.push({ type: "class", label: Number(label), strength: Number($("class-strength").value),
                                 style, layer: $("class-layer").value });
  if (state.include.length) hooks.push({ type: "include", indices: state.include,
                                         strength: Number($("include-strength").value), style, layer: picksLayer });
  if (state.exclude.length) hooks.push({ type: "exclude", indices: state.exclude,
                                         strength: Number($("exclude-strength").value), style, layer: picksLayer });
  return { n: Number($("n").value), seed: Number($("seed").value), hooks, top_k: 5 };
}

// Live re-generation: debounced, one request in flight; controls moved meanwhile trigger one more request.
function schedule() {
  clearTimeout(state.timer);
  state.timer = setTimeout(regenerate, 60);
}

async function regenerate() {
  if (state.inFlight) { state.again = true; return; }
  state.inFlight = true;
  const started = performance.now();
  try {
    const answer = await api("/v1/generate", { method: "POST", headers: { "Content-Type": "application/json" },
                                               body: JSON.stringify(requestBody()) });
    state.last = answer;
    renderGrid(answer);
    $("status").textContent = `${answer.n} images in ${Math.round(performance.now() - started)} ms ` +
                              `(server ${Math.round(answer.elapsed_s * 1000)} ms)`;
    $("status").className = "muted";
  } catch (err) {
    $("status").textContent = err.message;
    $("status").className = "error";
  } finally {
    state.inFlight = false;
    if (state.again) { state.again = false; regenerate(); }
  }
}

function renderGrid(answer) {
  const grid = $("grid");
  grid.replaceChildren(...answer.images.map((item) => {
    const img = document.createElement("img");
    img.src = "data:image/png;base64," + item.png;
    img.alt = `generation ${item.index}`;
    img.dataset.index = item.index;
    img.addEventListener("click", () => { state.selected = item.index; renderAttribution(); });
    return img;
  }));
  if (state.selected !== null && state.selected < answer.n) renderAttribution();
}

function renderAttribution() {
  const item = state.last.images[state.selected];
  document.querySelectorAll("#grid img").forEach((img) =>
    img.classList.toggle("selected", Number(img.dataset.index) === state.selected));
  const panel = $("attribution");
  const title = document.createElement("p");
  const rule = state.last.attribute_by === "shape" ? "by digit shape" : `by ${state.last.attribute_by}`;
  title.textContent = `generation ${item.index}: nearest training images ${rule} (similarity, and its percentile ` +
    "among training images' similarity to their own nearest neighbour: near 100 is a near-copy)";
  const row = document.createElement("div");
  row.className = "attr";
  row.append(...item.top_k.map((t) => {
    const figure = document.createElement("figure");
    figure.className = "attribution-item";
    const img = document.createElement("img");
    img.src = `/v1/train_images/${t.index}`;
    img.alt = `training image ${t.index}`;
    const caption = document.createElement("figcaption");
    caption.textContent = `#${t.index} y=${t.label} ${t.score.toFixed(3)} p${Math.round(t.percentile)}`;
    figure.append(img, caption);
    return figure;
  }));
  panel.replaceChildren(title, row);
}

async function loadPicker() {
  const label = $("picker-label").value;
  const query = new URLSearchParams({ offset: state.pickerOffset, limit: 48 });
  if (label !== "") query.set("label", label);
  const page = await api(`/v1/train_images?${query}`);
  $("picker").replaceChildren(...page.items.map((t) => {
    const img = document.createElement("img");
    img.src = `/v1/train_images/${t.index}`;
    img.title = `#${t.index} y=${t.label}`;
    img.dataset.index = t.index;
    markPick(img);
    img.addEventListener("click", (event) => togglePick(t.index, event.shiftKey ? "exclude" : "include"));
    return img;
  }));
}

function markPick(img) {
  const index = Number(img.dataset.index);
  img.classList.toggle("include", state.include.includes(index));
  img.classList.toggle("exclude", state.exclude.includes(index));
}

function togglePick(index, kind) {
  const other = kind === "include" ? "exclude" : "include";
  state[other] = state[other].filter((i) => i !== index);
  state[kind] = state[kind].includes(index) ? state[kind].filter((i) => i !== index) : [...state[kind], index];
  showPicks();
  schedule();
}

function showPicks() {
  $("include-list").textContent = state.include.length ? state.include.join(", ") : "none";
  $("exclude-list").textContent = state.exclude.length ? state.exclude.join(", ") : "none";
  document.querySelectorAll("#picker img").forEach(markPick);
}

// Jobs panel: the list, and a live progress bar per running job from its server-sent events.
async function refreshJobs() {
  const { jobs } = await api("/v1/jobs");
  const list = $("jobs");
  list.replaceChildren(...jobs.map(renderJob));
  jobs.filter((j) => j.status === "running").forEach(follow);
}

function renderJob(job) {
  const li = document.createElement("li");
  li.id = `job-${job.id}`;
  li.dataset.status = job.status;
  const head = document.createElement("div");
  head.textContent = `${job.stage} ${job.id} `;
  const status = document.createElement("b");
  status.className = "job-status";
  status.textContent = job.status;
  head.append(status);
  if (job.status === "running") head.append(button("cancel", () => api(`/v1/jobs/${job.id}`, { method: "DELETE" })));
  if (["interrupted", "failed", "cancelled"].includes(job.status))
    head.append(button("resume", () => api(`/v1/jobs/${job.id}/resume`, { method: "POST" })));
  const bar = document.createElement("progress");
  bar.max = 1;
  bar.value = job.status === "succeeded" ? 1 : 0;
  const detail = document.createElement("div");
  detail.className = "job-detail muted";
  detail.textContent = job.error || job.summary || "";
  const log = document.createElement("div");
  log.className = "log";
  log.textContent = (state.logs[job.id] || []).join("\n");
  li.append(head, bar, detail, log);
  if (job.progress) showProgress(li, job.progress);
  return li;
}

function button(text, action) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.addEventListener("click", async () => { try { await action(); } catch (e) { alert(e.message); } refreshJobs(); });
  return b;
}

function showProgress(li, p) {
  const bar = li.querySelector("progress");
  if (p.total) { bar.max = p.total; bar.value = p.step; }
  const parts = [`${p.desc} ${p.step}/${p.total ?? "?"}`];
  if (p.rate) parts.push(`${p.rate.toFixed(2)}/s`);
  if (p.eta_s !== null && p.eta_s !== undefined) parts.push(`ETA ${Math.round(p.eta_s)} s`);
  if (p.loss !== null && p.loss !== undefined) parts.push(`loss ${p.loss}`);
  li.querySelector(".job-detail").textContent = parts.join(", ");
}

function follow(job) {
  if (state.streams[job.id]) return;
  const source = new EventSource(job.events_url);
  state.streams[job.id] = source;
  const li = () => document.getElementById(`job-${job.id}`);
  source.addEventListener("progress", (e) => { if (li()) showProgress(li(), JSON.parse(e.data)); });
  state.logs[job.id] = [];
  source.addEventListener("log", (e) => {
    const lines = state.logs[job.id];
    lines.push(JSON.parse(e.data).line);
    if (lines.length > 50) lines.shift();
    if (!li()) return;
    const log = li().querySelector(".log");
    log.textContent = lines.join("\n");
    log.scrollTop = log.scrollHeight;
  });
  const finish = () => { source.close(); delete state.streams[job.id]; refreshJobs(); };
  source.addEventListener("result", finish);
  source.addEventListener("error", (e) => { if (e.data) finish(); });
}

async function startJob(event) {
  event.preventDefault();
  $("job-error").textContent = "";
  try {
    const options = JSON.parse($("job-options").value || "{}");
    await api("/v1/jobs", { method: "POST", headers: { "Content-Type": "application/json" },
                            body: JSON.stringify({ stage: $("job-stage").value, options }) });
  } catch (err) {
    $("job-error").textContent = err.message;
  }
  refreshJobs();
}

function bindSlider(id) {
  const show = () => { $(`${id}-value`).textContent = Number($(id).value).toFixed(2); };
  $(id).addEventListener("input", () => { show(); schedule(); });
  show();
}

async function init() {
  const info = await api("/v1/info");
  $("pair").textContent = `teacher ${info.teacher_sha256.slice(0, 12)}, student ${info.student_sha256.slice(0, 12)}, ` +
                          `${info.n_reference} training images (${info.dataset})`;
  for (const select of [$("class-label"), $("picker-label")])
    for (const c of info.classes) select.append(new Option(String(c), String(c)));
  for (const style of info.hook_styles) $("hook-style").append(new Option(style, style));
  $("hook-style").value = info.default_hook_style;
  for (const select of [$("class-layer"), $("picks-layer")]) {
    for (const layer of info.hook_layers)
      select.append(new Option(`${layer.name} (${layer.shape[1]}x${layer.shape[2]})`, layer.name));
    select.value = info.default_hook_layer;
  }
  for (const stage of info.stages) $("job-stage").append(new Option(stage, stage));
  $("job-stage").value = "generate";
  $("n").max = info.limits.n;
  ["class-strength", "include-strength", "exclude-strength"].forEach(bindSlider);
  ["seed", "n", "class-label", "hook-style", "class-layer", "picks-layer"].forEach((id) =>
    $(id).addEventListener("input", schedule));
  $("picker-label").addEventListener("change", () => { state.pickerOffset = 0; loadPicker(); });
  $("picker-prev").addEventListener("click", () => { state.pickerOffset = Math.max(0, state.pickerOffset - 48); loadPicker(); });
  $("picker-next").addEventListener("click", () => { state.pickerOffset += 48; loadPicker(); });
  $("clear-picks").addEventListener("click", () => { state.include = []; state.exclude = []; showPicks(); schedule(); });
  $("job-form").addEventListener("submit", startJob);
  await Promise.all([regenerate(), loadPicker(), refreshJobs()]);
  setInterval(refreshJobs, 5000);
}

init().catch((err) => { $("status").textContent = err.message; $("status").className = "error"; });
