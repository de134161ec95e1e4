// batchsight page: plain JS over the JSON API (/api/...). No external code.
"use strict";

const $ = (sel) => document.querySelector(sel);

function status(text) { $("#status").textContent = text; }

async function api(path, options = {}) {
  const response = await fetch(path, Object.assign({ credentials: "same-origin" }, options));
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail || body);
    throw new Error(`${response.status}: ${detail}`);
  }
  if (body.version !== undefined) $("#version").textContent = body.version;
  return body;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== undefined && value !== null) node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function card(item, onPick) {
  const img = el("img", { src: `/api/images/${item.image_id}/thumbnail`, alt: item.key, loading: "lazy",
                          "data-key": item.key, "data-image-id": item.image_id });
  if (onPick) img.addEventListener("click", () => onPick(item));
  const lines = [];
  if (item.score !== undefined) lines.push(el("div", { class: "score" }, `score ${item.score.toFixed(4)}`));
  lines.push(el("div", { class: "key" }, item.page > 1 ? `${item.key} · page ${item.page}` : item.key));
  lines.push(el("div", { class: "muted" }, `${item.top_class || ""}${item.category ? " · " + item.category : ""}`));
  return el("div", { class: "card", "data-image-id": item.image_id }, img, ...lines);
}

// ---- Search

function searchFilters() {
  const params = new URLSearchParams({ k: $("#k").value || "12" });
  if ($("#prefix").value) params.set("prefix", $("#prefix").value);
  if ($("#category").value) params.set("category", $("#category").value);
  return params;
}

function showResults(title, items) {
  $("#results-title").textContent = title;
  const grid = $("#grid");
  grid.replaceChildren(...items.map((item) => card(item, (picked) => searchKey(picked.key))));
}

async function searchKey(key) {
  $("#key").value = key;
  const params = searchFilters();
  params.set("key", key);
  status(`searching for ${key}...`);
  try {
    const body = await api(`/api/search?${params}`);
    showResults(`Similar to ${key}`, body.results);
    status(`${body.results.length} results from version ${body.version}`);
  } catch (e) { status(e.message); }
}

async function searchFile(file) {
  status(`searching with ${file.name}...`);
  try {
    const body = await api(`/api/search/image?${searchFilters()}`, {
      method: "POST", body: file, headers: { "content-type": "application/octet-stream" } });
    showResults(`Similar to ${file.name}`, body.results);
    status(`${body.results.length} results from version ${body.version}`);
  } catch (e) { status(e.message); }
}

async function initSearch() {
  const cats = await api("/api/categories");
  for (const name of Object.keys(cats.counts)) $("#category").append(el("option", { value: name }, name));
  $("#search-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    if ($("#key").value.trim()) searchKey($("#key").value.trim());
  });
  $("#file").addEventListener("change", () => { if ($("#file").files[0]) searchFile($("#file").files[0]); });
  const drop = $("#drop");
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    if (ev.dataTransfer.files[0]) searchFile(ev.dataTransfer.files[0]);
  });
  const body = await api("/api/images?limit=60");
  showResults(`Catalogue (${body.total} images; first ${body.images.length})`, body.images);
  status("click a picture to find look-alikes");
}

// ---- Duplicates

// what a card shows already; every other column of the duplicates table is listed under it
const CARD_FIELDS = new Set(["image_id", "group_id", "key", "page", "top_class", "category", "score",
                             "representative_id", "representative_key", "representative_page"]);

function shownValue(value) {
  return typeof value === "number" && !Number.isInteger(value) ? value.toFixed(4) : String(value);
}

function memberCard(member, columns) {
  // a group is its representative and the images above the threshold to it (never a chain):
  // the representative is marked; every other member shows its cosine to it
  const representative = member.representative_id === undefined || member.image_id === member.representative_id;
  const { score, ...rest } = member;
  const node = card(representative ? rest : member, null);
  if (representative) {
    node.classList.add("representative");
    node.prepend(el("div", { class: "badge" }, "representative"));
  } else if (score !== undefined) {
    node.querySelector(".score").textContent = `cosine to representative ${score.toFixed(4)}`;
  }
  for (const column of columns) {
    if (CARD_FIELDS.has(column) || member[column] === null || member[column] === undefined) continue;
    node.append(el("div", { class: "muted field", "data-column": column }, `${column} ${shownValue(member[column])}`));
  }
  return node;
}

async function loadDuplicates() {
  const threshold = $("#threshold").value || "0.95";
  $("#csv").setAttribute("href", `/api/duplicates.csv?threshold=${encodeURIComponent(threshold)}`);
  status("grouping...");
  try {
    const body = await api(`/api/duplicates?threshold=${encodeURIComponent(threshold)}`);
    const groups = new Map();
    for (const m of body.members) {
      if (!groups.has(m.group_id)) groups.set(m.group_id, []);
      groups.get(m.group_id).push(m);
    }
    $("#dup-title").textContent = `${body.groups} groups above cosine ${body.threshold} (version ${body.version})`;
    $("#groups").replaceChildren(...[...groups.values()].map((members) =>
      el("div", { class: "row group" }, ...members.map((m) => memberCard(m, body.columns)))));
    status("");
  } catch (e) { status(e.message); }
}

async function initDuplicates() {
  $("#dup-form").addEventListener("submit", (ev) => { ev.preventDefault(); loadDuplicates(); });
  await loadDuplicates();
}

// ---- Review

let reviewChoices = [];
let selected = 0;

function selectCard(index) {
  const cards = [...document.querySelectorAll("#review .card")];
  if (!cards.length) return;
  selected = Math.max(0, Math.min(index, cards.length - 1));
  cards.forEach((c, i) => c.classList.toggle("selected", i === selected));
}

async function saveLabel(cardNode, label) {
  const imageId = cardNode.getAttribute("data-image-id");
  try {
    await api("/api/labels", { method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify({ labeller: $("#labeller").value || "reviewer", labels: [{ image_id: imageId, label }] }) });
    cardNode.classList.add("labelled");
    cardNode.querySelector(".label").textContent = `labelled ${label}`;
    status(`saved: ${cardNode.querySelector("img").alt} is ${label}`);
  } catch (e) { status(e.message); }
}

function reviewCard(item) {
  const node = card(item, null);
  node.append(el("div", { class: "muted" }, `confidence ${Number(item.category_confidence).toFixed(2)}`));
  node.append(el("div", { class: "label" }, ""));
  const buttons = el("div", { class: "bar" });
  reviewChoices.forEach((name, i) => {
    const b = el("button", { type: "button", class: "choice", "data-label": name }, `${i + 1} ${name}`);
    b.addEventListener("click", () => saveLabel(node, name));
    buttons.append(b);
  });
  node.append(buttons);
  node.addEventListener("click", () => selectCard([...node.parentNode.children].indexOf(node)));
  return node;
}

async function initReview() {
  const body = await api("/api/review?limit=200");
  reviewChoices = body.choices;
  $("#choices").replaceChildren(...reviewChoices.map((n, i) => el("span", { class: "muted" }, `${i + 1}: ${n}`)));
  $("#review-title").textContent = `${body.total} images to review (version ${body.version})`;
  $("#review").replaceChildren(...body.images.map(reviewCard));
  selectCard(0);
  document.addEventListener("keydown", (ev) => {
    if (ev.target.tagName === "INPUT") return;
    const cards = [...document.querySelectorAll("#review .card")];
    if (ev.key === "ArrowRight" || ev.key === "ArrowDown") { selectCard(selected + 1); ev.preventDefault(); }
    else if (ev.key === "ArrowLeft" || ev.key === "ArrowUp") { selectCard(selected - 1); ev.preventDefault(); }
    else if (/^[1-9]$/.test(ev.key) && cards[selected] && reviewChoices[Number(ev.key) - 1]) {
      const node = cards[selected];
      saveLabel(node, reviewChoices[Number(ev.key) - 1]).then(() => selectCard(selected + 1));
    }
  });
  status(body.total ? "click a label, or press its number" : "nothing to review");
}

// ---- Runs

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function drawChart(runs) {
  const chart = $("#chart");
  const width = 760, height = 220, top = 10, bottom = 30, left = 40;
  const shown = runs.slice(-30);
  const maxSpeed = Math.max(1, ...shown.map((r) => r.images_per_s || 0));
  const maxFail = Math.max(1, ...shown.map((r) => r.failed || 0));
  const slot = Math.min(60, (width - left) / Math.max(1, shown.length));
  const plot = height - top - bottom;
  const nodes = [svg("text", { x: 0, y: top + 8 }, `${maxSpeed.toFixed(0)}/s`),
                 svg("text", { x: 0, y: top + 22 }, `${maxFail} failed`),
                 svg("line", { x1: left, y1: height - bottom, x2: width, y2: height - bottom, stroke: "#999" })];
  shown.forEach((r, i) => {
    const x = left + i * slot;
    const hs = plot * (r.images_per_s || 0) / maxSpeed;
    const hf = plot * (r.failed || 0) / maxFail;
    nodes.push(svg("rect", { class: "speed", x: x + 2, y: height - bottom - hs, width: Math.max(2, slot / 2 - 3), height: hs },));
    nodes.push(svg("rect", { class: "fail", x: x + slot / 2, y: height - bottom - hf, width: Math.max(2, slot / 2 - 3), height: hf }));
    nodes.push(svg("text", { x: x + 2, y: height - bottom + 12 }, (r.started_at || "").slice(5, 16).replace("T", " ")));
  });
  chart.replaceChildren(...nodes);
}

function showServed(state) {
  const line = $("#served");
  line.textContent = `Serving version ${state.version}; CURRENT last read ${state.checked_at || "never"}`;
  const failed = $("#load-failure");
  failed.hidden = !state.failed;
  if (state.failed) {
    failed.textContent = `Version ${state.failed.version} could not be loaded (${state.failed.reason}), since ` +
      `${state.failed.since}, ${state.failed.attempts} tries; still serving version ${state.version}.`;
  }
}

async function initRuns() {
  const body = await api("/api/runs");
  showServed(body.status);
  drawChart(body.runs);
  $("#runs tbody").replaceChildren(...body.runs.slice().reverse().map((r) => el("tr", {},
    el("td", {}, (r.started_at || "").replace("T", " ").slice(0, 19)), el("td", {}, r.status), el("td", {}, r.version ?? ""),
    el("td", {}, r.processed ?? ""), el("td", {}, r.failed ?? ""), el("td", {}, (r.images_per_s || 0).toFixed(1)),
    el("td", {}, (r.elapsed_s || 0).toFixed(1)), el("td", {}, r.run_id))));
  const reasons = Object.entries(body.failures_by_reason).map(([k, v]) => `${k} ${v}`).join(", ");
  $("#failures-title").textContent = `Failures of the live version: ${body.failures_total}${reasons ? " (" + reasons + ")" : ""}`;
  $("#failures tbody").replaceChildren(...body.failures.map((f) => el("tr", {},
    el("td", {}, f.key), el("td", {}, f.stage), el("td", {}, f.error_type), el("td", {}, f.message), el("td", {}, f.attempts))));
  status(`${body.runs.length} runs`);
}

const PAGES = { search: initSearch, duplicates: initDuplicates, review: initReview, runs: initRuns };

document.addEventListener("DOMContentLoaded", () => {
  const init = PAGES[document.body.dataset.page];
  if (init) init().catch((e) => status(e.message)).finally(() => document.body.setAttribute("data-ready", "1"));
  else document.body.setAttribute("data-ready", "1");
});
