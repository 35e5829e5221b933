// An open job's timeline: every image's wait, cpu and write spans, one lane per thread
// grouped by process, drawn on a canvas from GET /api/v1/jobs/{id}/timeline, polled while
// the job runs (only the spans not yet seen). The same spans and the same picture as
// `download --timeline`: a lane with many rows is one thread overlapping many waits.
// app.js calls window.jobTimeline.open(id) and .close(); this file builds its own box.
"use strict";

(() => {
  const COLOURS = { wait: "#4c72b0", cpu: "#dd8452", write: "#55a868" };
  const FINAL = new Set(["done", "failed", "cancelled"]);
  const POLL_MS = 1000;
  const current = { id: null, spans: [], next: 0, timer: null };

  function box() {
    let section = document.getElementById("timeline-box");
    if (section) return section;
    section = document.createElement("div");
    section.id = "timeline-box";
    const head = document.createElement("h3");
    head.className = "sub";
    head.textContent = "Timeline";
    const title = document.createElement("p");
    title.className = "meta";
    title.id = "timeline-title";
    const canvas = document.createElement("canvas");
    canvas.id = "timeline-canvas";
    canvas.setAttribute("role", "img");
    canvas.style.width = "100%";
    const legend = document.createElement("p");
    legend.className = "meta";
    for (const [phase, colour] of Object.entries(COLOURS)) {
      const key = document.createElement("span");
      key.style.color = colour;
      key.textContent = `■ ${phase}  `;
      legend.append(key);
    }
    section.append(head, title, canvas, legend);
    const anchor = document.getElementById("detail-error");
    anchor.after(section);
    return section;
  }

  function mostAtOnce(spans, phase) {
    const edges = [];
    for (const s of spans) {
      if (s.phase === phase) edges.push([s.start, 1], [s.end, -1]);
    }
    edges.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
    let now = 0;
    let most = 0;
    for (const [, step] of edges) {
      now += step;
      most = Math.max(most, now);
    }
    return most;
  }

  // Each span's row: processes in order of their first span, their threads likewise, and a
  // thread with overlapping spans (an event loop's tasks) gets as many rows as it needs.
  function layout(spans) {
    const sorted = [...spans].sort((a, b) => a.start - b.start);
    const processes = new Map(); // pid -> Map(thread -> [span])
    for (const s of sorted) {
      if (!processes.has(s.process)) processes.set(s.process, new Map());
      const threads = processes.get(s.process);
      if (!threads.has(s.thread)) threads.set(s.thread, []);
      threads.get(s.thread).push(s);
    }
    const rows = new Map();
    const groups = [];
    let next = 0;
    for (const [pid, threads] of processes) {
      const first = next;
      for (const mine of threads.values()) {
        const ends = [];
        for (const s of mine) {
          let row = ends.findIndex((end) => end <= s.start);
          if (row < 0) row = ends.push(s.end) - 1;
          ends[row] = s.end;
          rows.set(s, next + row);
        }
        next += ends.length;
      }
      groups.push({ pid, first, threads: threads.size });
    }
    return { rows, groups, total: next };
  }

  function draw() {
    const section = box();
    const canvas = section.querySelector("canvas");
    const spans = current.spans;
    const { rows, groups, total } = layout(spans);
    const threads = groups.reduce((n, g) => n + g.threads, 0);
    section.querySelector("#timeline-title").textContent = spans.length
      ? `at once: up to ${mostAtOnce(spans, "wait")} waits, ${mostAtOnce(spans, "cpu")} CPU ` +
        `spans · ${groups.length} process${groups.length === 1 ? "" : "es"}, ` +
        `${threads} thread${threads === 1 ? "" : "s"}`
      : "No spans yet.";
    canvas.setAttribute("aria-label", section.querySelector("#timeline-title").textContent);
    const width = canvas.clientWidth || 600;
    const rowHeight = Math.max(2, Math.min(10, Math.floor(240 / Math.max(total, 1))));
    const axis = 18;
    const height = Math.max(total, 1) * rowHeight + axis;
    const scale = window.devicePixelRatio || 1;
    canvas.width = Math.round(width * scale);
    canvas.height = Math.round(height * scale);
    canvas.style.height = `${height}px`;
    const ctx = canvas.getContext("2d");
    ctx.setTransform(scale, 0, 0, scale, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const end = Math.max(0.001, ...spans.map((s) => s.end));
    const x = (t) => (t / end) * (width - 2);
    for (const s of spans) {
      ctx.fillStyle = COLOURS[s.phase] || "#999";
      const w = Math.max(1, x(s.end) - x(s.start));
      ctx.fillRect(x(s.start), rows.get(s) * rowHeight, w, Math.max(1, rowHeight - 1));
    }
    ctx.fillStyle = "#999";
    for (const g of groups.slice(1)) ctx.fillRect(0, g.first * rowHeight - 0.5, width, 1);
    ctx.font = "11px sans-serif";
    for (let i = 0; i <= 4; i += 1) {
      const t = (end * i) / 4;
      ctx.fillText(`${t.toFixed(2)} s`, Math.min(x(t), width - 40), height - 4);
    }
  }

  async function poll(id) {
    current.timer = null;
    let state = "running";
    try {
      const path = `/api/v1/jobs/${encodeURIComponent(id)}/timeline?after=${current.next}`;
      const res = await fetch(path, { credentials: "same-origin" });
      if (res.ok && current.id === id) {
        const body = await res.json();
        current.spans.push(...body.spans);
        current.next = body.next;
        state = body.state;
        draw();
      }
    } catch (_) {
      // the service is away for a moment: the next poll tries again
    }
    if (current.id === id && !FINAL.has(state)) {
      current.timer = setTimeout(() => poll(id), POLL_MS);
    }
  }

  function close() {
    if (current.timer) clearTimeout(current.timer);
    Object.assign(current, { id: null, spans: [], next: 0, timer: null });
  }

  function open(id) {
    close();
    current.id = id;
    box();
    draw();
    poll(id);
  }

  window.jobTimeline = { open, close };
})();
