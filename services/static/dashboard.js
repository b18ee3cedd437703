// The kernelmesh dashboard: renders each snapshot pushed on /ui/events.
// Plain DOM, text only (never innerHTML with server data), no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const GIB = 1 << 30;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const ms = (v) => (v === null || v === undefined ? "–" : v < 10 ? v.toFixed(3) : v.toFixed(1));
const count = (v) => Number(v).toLocaleString();
const pct = (v) => `${(v * 100).toFixed(0)}%`;

function duration(seconds) {
  const s = Math.floor(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

function meter(label, value, fraction) {
  const bar = el("span");
  bar.style.width = `${Math.max(0, Math.min(1, fraction)) * 100}%`;
  return el("div", { class: "meter" },
    el("div", { class: "label" }, el("span", {}, label), el("span", {}, value)),
    el("div", { class: "bar" }, bar));
}

function deviceCard(d) {
  const used = d.memory_total_bytes - d.memory_available_bytes;
  const memory = d.memory_total_bytes
    ? meter("memory", `${(used / GIB).toFixed(1)} / ${(d.memory_total_bytes / GIB).toFixed(1)} GiB`,
        used / d.memory_total_bytes)
    : el("div", { class: "muted" }, "memory not reported");
  return el("div", { class: "card", "data-device": d.name },
    el("div", { class: "name" }, d.name),
    el("div", { class: "model", title: d.model }, `${d.kind} · ${d.model}`),
    meter("utilisation", pct(d.utilization), d.utilization),
    memory,
    el("div", { class: "counts" },
      el("span", {}, el("b", { "data-queue": d.name }, d.queue_depth), " queued"),
      el("span", {}, el("b", {}, d.running), " running")));
}

function fillTable(id, rows, cells, key) {
  const body = $(id).querySelector("tbody");
  body.replaceChildren(...rows.map((row) => {
    const tr = el("tr", { "data-key": key(row) });
    for (const [value, cls] of cells(row)) tr.append(el("td", { class: cls || "" }, value));
    return tr;
  }));
  const empty = $(`${id}-empty`);
  if (empty) empty.hidden = rows.length > 0;
}

function render(s) {
  $("node").textContent = `node ${s.node}`;
  setStatus(s.ready ? "serving" : "warming up", s.ready ? "pill-ok" : "pill-wait");
  $("queued").textContent = count(s.queued);
  $("running").textContent = count(s.running);
  $("uptime").textContent = duration(s.uptime_s);
  $("devices").replaceChildren(...s.devices.map(deviceCard));
  fillTable("ops", s.ops, (r) => [
    [r.op], [count(r.succeeded), "num"], [count(r.failed), r.failed ? "num bad" : "num"],
    [count(r.cancelled), "num"], [ms(r.recent_ms), "num"], [ms(r.mean_ms), "num"],
  ], (r) => r.op);
  fillTable("rpcs", s.rpcs, (r) => [
    [`${r.service}/${r.method}`], [count(r.calls), "num"],
    [count(r.errors), r.errors ? "num bad" : "num"], [ms(r.recent_ms), "num"], [ms(r.mean_ms), "num"],
  ], (r) => `${r.service}/${r.method}`);
  fillTable("llm-usage", s.llm.usage, (r) => [
    [r.tenant], [r.model], [r.provider], [count(r.requests), "num"],
    [count(r.prompt_tokens), "num"], [count(r.completion_tokens), "num"], [r.cost.toFixed(4), "num"],
  ], (r) => `${r.tenant}/${r.model}/${r.provider}`);
  fillTable("llm-requests", s.llm.requests, (r) => [
    [r.model], [r.outcome], [count(r.requests), "num"],
  ], (r) => `${r.model}/${r.outcome}`);
  document.body.dataset.updated = String(s.time);
}

function setStatus(text, cls) {
  const pill = $("status");
  pill.textContent = text;
  pill.className = `pill ${cls}`;
}

const events = new EventSource("/ui/events");
events.addEventListener("snapshot", (e) => render(JSON.parse(e.data)));
// EventSource reconnects by itself (the server asks for 2 s); say so meanwhile.
events.onerror = () => setStatus("disconnected, retrying", "pill-bad");
