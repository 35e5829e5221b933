// The service's page: start jobs, watch them live, see their images.
// Plain JavaScript, no build step. The job list follows one event stream for the whole page
// (/api/v1/events); an open job follows its own (/api/v1/jobs/{id}/events), which replays
// every result first. With a token, the page trades it once for an HttpOnly cookie
// (POST /api/v1/login), so no token is ever kept by the page or put in a URL.
"use strict";

const API = "/api/v1";
const FINAL = new Set(["done", "failed", "cancelled"]);
const $ = (id) => document.getElementById(id);

const state = {
  jobs: new Map(), // id -> job object
  rows: new Map(), // id -> <li>
  listStream: null,
  retryDelay: 1000,
  open: null, // the job whose detail is shown: {id, stream, records: Map(index -> record)}
  loginWaiters: [],
};

// ------------------------------------------------------------------ HTTP and the token

class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function errorText(res) {
  try {
    const body = await res.json();
    if (body && typeof body.error === "string") return body.error;
  } catch (_) {
    // not JSON: fall through to the status line
  }
  return `${res.status} ${res.statusText || "error"}`;
}

// fetch() for the API: JSON in and out; a 401 asks for the token once, then tries again.
async function api(method, path, body, retried = false) {
  const init = { method, headers: { Accept: "application/json" }, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  if (res.status === 401 && !retried) {
    await signedIn();
    return api(method, path, body, true);
  }
  if (!res.ok) throw new HttpError(res.status, await errorText(res));
  if (res.status === 204) return null;
  const type = res.headers.get("Content-Type") || "";
  return type.includes("json") ? res.json() : null;
}

// Resolves once the login form has traded a good token for the cookie.
function signedIn() {
  $("login").hidden = false;
  $("app").setAttribute("aria-hidden", "true");
  $("app").inert = true;
  $("token").focus();
  return new Promise((resolve) => state.loginWaiters.push(resolve));
}

async function submitLogin(event) {
  event.preventDefault();
  const input = $("token");
  const res = await fetch(`${API}/login`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    credentials: "same-origin",
    body: JSON.stringify({ token: input.value }),
  }).catch((err) => ({ ok: false, status: 0, statusText: String(err), json: async () => null }));
  if (!res.ok) {
    $("login-error").textContent = await errorText(res);
    input.select();
    return;
  }
  input.value = "";
  $("login-error").textContent = "";
  $("login").hidden = true;
  $("app").removeAttribute("aria-hidden");
  $("app").inert = false;
  state.loginWaiters.splice(0).forEach((resolve) => resolve());
}

// ------------------------------------------------------------------ formatting

function shortId(id) {
  return id.slice(0, 8);
}

function seconds(job) {
  const start = Date.parse(job.started_at || "");
  if (Number.isNaN(start)) return null;
  const end = job.finished_at ? Date.parse(job.finished_at) : Date.now();
  return Math.max(0, (end - start) / 1000);
}

function duration(s) {
  if (s === null) return "";
  if (s < 10) return `${s.toFixed(1)} s`;
  const whole = Math.round(s);
  if (whole < 60) return `${whole} s`;
  const h = Math.floor(whole / 3600);
  const m = Math.floor((whole % 3600) / 60);
  const sec = String(whole % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${sec}` : `${m}:${sec}`;
}

function kilobytes(n) {
  return n >= 1048576 ? `${(n / 1048576).toFixed(1)} MB` : `${Math.round(n / 1024)} KB`;
}

// One line saying what a job fetches, from its spec (the body as it was sent).
function describe(job) {
  const s = job.spec || {};
  const parts = [s.backend || "default backend"];
  if (Array.isArray(s.urls)) {
    parts.push(`${s.urls.length} URL${s.urls.length === 1 ? "" : "s"}`);
  } else {
    parts.push(`${s.count ?? job.total ?? "?"} × ${s.width ?? 320}×${s.height ?? 240}`);
    if (s.keywords) parts.push(s.keywords);
    if (s.unique) parts.push("unique");
    if (s.local) {
      const ms = s.server && s.server.latency_ms;
      parts.push(ms ? `built-in server, ${ms} ms` : "built-in server");
    }
  }
  return parts.join(" · ");
}

function filesUrl(id, path) {
  return `/files/${encodeURIComponent(id)}/${path.split("/").map(encodeURIComponent).join("/")}`;
}

// ------------------------------------------------------------------ the job list

function jobRow(id) {
  let row = state.rows.get(id);
  if (row) return row;
  row = $("job-row").content.firstElementChild.cloneNode(true);
  row.dataset.id = id;
  const link = row.querySelector(".job-id");
  link.href = `#job=${encodeURIComponent(id)}`;
  link.textContent = shortId(id);
  link.title = id;
  row.querySelector(".cancel").addEventListener("click", () => act(id, "DELETE", ""));
  for (const action of ["pause", "resume", "retry"]) {
    row.querySelector(`.${action}`).addEventListener("click", () => act(id, "POST", `/${action}`));
  }
  for (const action of ["pause", "resume", "cancel", "retry"]) {
    const name = action[0].toUpperCase() + action.slice(1);
    row.querySelector(`.${action}`).setAttribute("aria-label", `${name} job ${shortId(id)}`);
  }
  row.querySelector(".bar").setAttribute("aria-label", `Progress of job ${shortId(id)}`);
  state.rows.set(id, row);
  return row;
}

function fillProgress(bar, text, job) {
  const total = job.total || 0;
  const ok = job.ok || 0;
  const failed = job.failed || 0;
  const scale = Math.max(total, ok + failed, 1);
  bar.querySelector(".bar-ok").style.width = `${(100 * ok) / scale}%`;
  bar.querySelector(".bar-failed").style.width = `${(100 * failed) / scale}%`;
  bar.setAttribute("aria-valuemax", String(total || scale));
  bar.setAttribute("aria-valuenow", String(ok + failed));
  const of = job.total === null || job.total === undefined ? "?" : job.total;
  const label = `${ok}/${of}` + (failed ? ` · ${failed} failed` : "");
  bar.setAttribute("aria-valuetext", label);
  text.textContent = label;
}

// The run's own figure once it is known; while it runs, images so far over time so far.
function rateText(job) {
  if (typeof job.images_per_s === "number") return `${job.images_per_s.toFixed(1)} images/s`;
  const s = seconds(job);
  if (job.state !== "running" || !s) return "";
  return `≈ ${(((job.ok || 0) + (job.failed || 0)) / s).toFixed(1)} images/s`;
}

function renderRow(job) {
  const row = jobRow(job.id);
  row.dataset.state = job.state;
  const badge = row.querySelector(".state");
  badge.textContent = job.state;
  badge.dataset.state = job.state;
  row.querySelector(".job-what").textContent = describe(job);
  fillProgress(row.querySelector(".bar"), row.querySelector(".progress-text"), job);
  row.querySelector(".rate").textContent = rateText(job);
  row.querySelector(".elapsed").textContent = duration(seconds(job));
  const priority = row.querySelector(".priority");
  priority.textContent = job.priority ? `priority ${job.priority}` : "";
  priority.hidden = !job.priority;
  row.querySelector(".pause").hidden = job.state !== "queued" && job.state !== "running";
  row.querySelector(".resume").hidden = job.state !== "paused";
  row.querySelector(".cancel").hidden = FINAL.has(job.state);
  row.querySelector(".retry").hidden = !FINAL.has(job.state);
  row.classList.toggle("selected", state.open !== null && state.open.id === job.id);
  return row;
}

function placeRows() {
  const list = $("jobs");
  const ids = [...state.jobs.values()]
    .sort((a, b) => (b.created_at || "").localeCompare(a.created_at || "") || b.id.localeCompare(a.id))
    .map((job) => job.id);
  ids.forEach((id, i) => {
    const row = state.rows.get(id);
    if (list.children[i] !== row) list.insertBefore(row, list.children[i] || null);
  });
  $("jobs-empty").hidden = ids.length > 0;
}

function upsert(job) {
  const known = state.jobs.has(job.id);
  state.jobs.set(job.id, job);
  renderRow(job);
  if (!known) placeRows();
  if (state.open && state.open.id === job.id) showJobHead(job);
}

async function act(id, method, suffix) {
  $("list-error").textContent = "";
  try {
    const job = await api(method, `${API}/jobs/${encodeURIComponent(id)}${suffix}`);
    if (job) upsert(job);
  } catch (err) {
    $("list-error").textContent = `${shortId(id)}: ${err.message}`;
  }
}

// The list stream opens first and the list is read once it is open; events that came in
// meanwhile are applied again after the snapshot, so the latest word on each job wins.
function connectList() {
  const live = $("live");
  const stream = new EventSource(`${API}/events`);
  state.listStream = stream;
  let buffer = [];
  stream.addEventListener("job", (event) => {
    const job = JSON.parse(event.data);
    if (buffer) buffer.push(job);
    upsert(job);
  });
  stream.addEventListener("open", async () => {
    live.textContent = "live";
    live.dataset.state = "live";
    state.retryDelay = 1000;
    buffer = [];
    try {
      const { jobs } = await api("GET", `${API}/jobs`);
      jobs.forEach(upsert);
      buffer.forEach(upsert);
    } catch (err) {
      $("list-error").textContent = err.message;
    }
    buffer = null;
  });
  stream.addEventListener("error", () => {
    if (stream.readyState !== EventSource.CLOSED) {
      live.textContent = "reconnecting…";
      live.dataset.state = "connecting";
      return;
    }
    live.textContent = "offline: retrying";
    live.dataset.state = "offline";
    setTimeout(start, state.retryDelay);
    state.retryDelay = Math.min(state.retryDelay * 2, 15000);
  });
}

// Checks access first (EventSource cannot see a 401), then follows the list.
async function start() {
  try {
    await api("GET", `${API}/jobs?limit=1`);
  } catch (err) {
    $("live").textContent = `offline: ${err.message}`;
    $("live").dataset.state = "offline";
    setTimeout(start, state.retryDelay);
    state.retryDelay = Math.min(state.retryDelay * 2, 15000);
    return;
  }
  connectList();
  openFromHash();
}

// ------------------------------------------------------------------ the form

const FIELDS = {
  count: "count",
  backend: "backend",
  keywords: "keywords",
  width: "size",
  height: "size",
  size: "size",
  unique: "unique",
  local: "local",
  latency_ms: "latency",
  urls: "urls",
  priority: "priority",
};

function integer(text) {
  const trimmed = text.trim();
  return /^[+-]?\d+$/.test(trimmed) ? Number(trimmed) : trimmed;
}

// The body of POST /api/v1/jobs; only the size's shape is checked here, the service
// checks the rest with the CLI's own rules.
function jobBody() {
  const body = { backend: $("backend").value, count: integer($("count").value) };
  const priority = $("priority").value.trim();
  if (priority && priority !== "0") body.priority = integer(priority);
  const urls = $("urls").value.split("\n").map((u) => u.trim()).filter(Boolean);
  if (urls.length) {
    body.urls = urls;
    return body;
  }
  const size = $("size").value.trim().match(/^(\d+)\s*[x×X*]\s*(\d+)$/);
  if (!size) throw new HttpError(0, "size must be WIDTHxHEIGHT, for example 320x240");
  body.width = Number(size[1]);
  body.height = Number(size[2]);
  const keywords = $("keywords").value.split(",").map((k) => k.trim()).filter(Boolean);
  if (keywords.length) body.keywords = keywords.join(",");
  if ($("unique").checked) body.unique = true;
  if ($("local").checked) {
    body.local = true;
    body.server = { latency_ms: integer($("latency").value || "0") };
  }
  return body;
}

function markInvalid(message) {
  const words = message.toLowerCase();
  const bad = new Set();
  for (const [key, field] of Object.entries(FIELDS)) {
    if (new RegExp(`\\b${key}\\b`).test(words)) bad.add(field);
  }
  for (const field of new Set(Object.values(FIELDS))) {
    const input = $(field);
    if (bad.has(field)) input.setAttribute("aria-invalid", "true");
    else input.removeAttribute("aria-invalid");
  }
}

function showFormError(message) {
  $("form-error").textContent = message;
  markInvalid(message);
}

async function submitJob(event) {
  event.preventDefault();
  const button = $("start");
  showFormError("");
  let body;
  try {
    body = jobBody();
  } catch (err) {
    showFormError(err.message);
    return;
  }
  button.disabled = true;
  try {
    const job = await api("POST", `${API}/jobs`, body);
    upsert(job);
    openJob(job.id, false);
  } catch (err) {
    showFormError(err instanceof HttpError ? err.message : `could not reach the service: ${err.message}`);
  } finally {
    button.disabled = false;
  }
}

function syncLocal() {
  const local = $("local").checked;
  $("latency").disabled = !local;
  $("latency-field").classList.toggle("off", !local);
}

// ------------------------------------------------------------------ one job's detail

function showJobHead(job) {
  $("detail-title").textContent = `Job ${shortId(job.id)}`;
  const meta = $("detail-meta");
  meta.replaceChildren();
  const badge = document.createElement("span");
  badge.className = "state";
  badge.dataset.state = job.state;
  badge.textContent = job.state;
  meta.append(badge, ` ${describe(job)} · created ${new Date(job.created_at).toLocaleString()}`);
  $("detail-summary").textContent = job.summary || "";
  $("detail-error").textContent = job.error || "";
  countRecords();
  const open = state.open;
  if (open && open.id === job.id && !open.stream && !FINAL.has(job.state)) followJob(open);
}

function thumbnail(id, record) {
  const item = document.createElement("li");
  item.dataset.index = String(record.index);
  const link = document.createElement("a");
  link.href = filesUrl(id, record.path);
  link.target = "_blank";
  link.rel = "noopener";
  const img = document.createElement("img");
  img.src = filesUrl(id, record.thumbnail || record.path);
  img.alt = `image ${record.index}`;
  img.loading = "lazy";
  img.decoding = "async";
  link.append(img);
  const caption = document.createElement("span");
  caption.className = "caption";
  caption.textContent = `#${record.index} · ${kilobytes(record.bytes || 0)}`;
  link.append(caption);
  const size = record.width && record.height ? `, ${record.width}×${record.height}` : "";
  link.title = `image ${record.index}${size}: open the full image`;
  link.setAttribute("aria-label", `image ${record.index}${size}, full size`);
  item.append(link);
  return item;
}

function failure(record) {
  const item = document.createElement("li");
  item.dataset.index = String(record.index);
  const index = document.createElement("span");
  index.className = "index";
  index.textContent = `#${record.index}`;
  const url = document.createElement("code");
  url.textContent = record.url;
  const reason = document.createElement("span");
  reason.className = "reason";
  reason.textContent = record.error || "failed";
  item.append(index, url, reason);
  return item;
}

// Keeps a list ordered by image index: a record replaces the one with its index.
function place(list, item) {
  const index = Number(item.dataset.index);
  const old = list.querySelector(`:scope > li[data-index="${index}"]`);
  if (old) old.remove();
  const after = [...list.children].find((li) => Number(li.dataset.index) > index);
  list.insertBefore(item, after || null);
}

function addRecord(open, record) {
  const previous = open.records.get(record.index);
  if (previous && previous.status === record.status && previous.sha256 === record.sha256) return;
  open.records.set(record.index, record);
  const gallery = $("gallery");
  const failures = $("failures");
  const stale = (record.status === "ok" ? failures : gallery)
    .querySelector(`:scope > li[data-index="${record.index}"]`);
  if (stale) stale.remove();
  if (record.status === "ok") place(gallery, thumbnail(open.id, record));
  else place(failures, failure(record));
  countRecords();
}

function countRecords() {
  const shown = $("gallery").children.length;
  const failed = $("failures").children.length;
  $("gallery-count").textContent = String(shown);
  $("failure-count").textContent = String(failed);
  $("gallery-empty").hidden = shown > 0;
  const job = state.open && state.jobs.get(state.open.id);
  $("gallery-empty").textContent = job && FINAL.has(job.state) ? "No images." : "No images yet.";
  $("failures-box").hidden = failed === 0;
}

function followJob(open) {
  const stream = new EventSource(`${API}/jobs/${encodeURIComponent(open.id)}/events`);
  open.stream = stream;
  stream.addEventListener("result", (event) => addRecord(open, JSON.parse(event.data)));
  stream.addEventListener("progress", (event) => upsert(JSON.parse(event.data)));
  stream.addEventListener("end", (event) => {
    stream.close();
    open.stream = null;
    upsert(JSON.parse(event.data));
  });
  stream.addEventListener("error", () => {
    if (stream.readyState === EventSource.CLOSED) open.stream = null;
  });
}

function closeJob() {
  if (state.open && state.open.stream) state.open.stream.close();
  if (window.jobTimeline) window.jobTimeline.close();
  state.open = null;
  $("detail").hidden = true;
  state.rows.forEach((row) => row.classList.remove("selected"));
}

function openJob(id, focus) {
  if (state.open && state.open.id === id) return;
  closeJob();
  const open = { id, stream: null, records: new Map() };
  state.open = open;
  $("gallery").replaceChildren();
  $("failures").replaceChildren();
  countRecords();
  $("manifest-link").href = `${API}/jobs/${encodeURIComponent(id)}/manifest`;
  $("detail").hidden = false;
  const known = state.jobs.get(id);
  if (known) upsert(known);
  else api("GET", `${API}/jobs/${encodeURIComponent(id)}`).then(upsert, (err) => {
    $("detail-error").textContent = err.message;
  });
  followJob(open);
  if (window.jobTimeline) window.jobTimeline.open(id);
  if (location.hash !== `#job=${encodeURIComponent(id)}`) {
    history.replaceState(null, "", `#job=${encodeURIComponent(id)}`);
  }
  if (focus) $("detail-title").focus();
}

function openFromHash() {
  const match = location.hash.match(/^#job=([A-Za-z0-9_-]{1,32})$/);
  if (match) openJob(match[1], true);
  else if (state.open) closeJob();
}

// ------------------------------------------------------------------ start

function tick() {
  for (const job of state.jobs.values()) {
    if (job.state === "running") {
      const row = state.rows.get(job.id);
      row.querySelector(".elapsed").textContent = duration(seconds(job));
      row.querySelector(".rate").textContent = rateText(job);
    }
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("job-form").addEventListener("submit", submitJob);
  $("login-form").addEventListener("submit", submitLogin);
  $("local").addEventListener("change", syncLocal);
  $("urls").addEventListener("input", () => {
    $("urls-box").open = $("urls").value.trim() !== "" || $("urls-box").open;
  });
  $("detail-close").addEventListener("click", () => {
    closeJob();
    history.replaceState(null, "", location.pathname);
    $("jobs-title").focus();
  });
  window.addEventListener("hashchange", openFromHash);
  syncLocal();
  setInterval(tick, 1000);
  start();
});
