// tabserve status page: reads the server's own API (same origin) every few seconds.
// No framework and no build step; nothing is fetched from anywhere but this server.
"use strict";

const REFRESH_MS = (() => {
  // ?refresh=SECONDS lets a test (or an impatient operator) refresh faster.
  const asked = Number(new URLSearchParams(location.search).get("refresh"));
  return asked >= 0.2 ? asked * 1000 : 3000;
})();
const CHART_POINTS = 60;
const CREDENTIALS_KEY = "tabserve-credentials";

const state = {
  authorization: sessionStorage.getItem(CREDENTIALS_KEY),
  previous: null, // the last metrics sample, to turn counters into per-interval latency
  latency: [], // mean latency (ms) of each refresh interval
  timer: null,
  // Optional routes that answered 404 once are not asked again (an older server, or TabPy).
  missing: new Set(),
};

const $ = (id) => document.getElementById(id);

function element(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

class Unauthorized extends Error {}

async function api(path, { optional = false } = {}) {
  if (optional && state.missing.has(path)) return null;
  const headers = { Accept: "application/json" };
  if (state.authorization) headers.Authorization = state.authorization;
  // credentials: "omit" keeps the browser's own Basic prompt away on a 401 (it would block
  // the page, and a headless test); the page sends the Authorization header itself.
  const response = await fetch(path, { headers, cache: "no-store", credentials: "omit" });
  if (response.status === 401) throw new Unauthorized(path);
  if (optional && !response.ok) {
    if (response.status === 404) state.missing.add(path);
    return null;
  }
  if (!response.ok) throw new Error(`${path} answered ${response.status}`);
  const type = response.headers.get("Content-Type") || "";
  return type.includes("json") ? response.json() : response.text();
}

// ---- Prometheus text format -------------------------------------------------------------

function parsePrometheus(text) {
  const samples = [];
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    const match = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)/);
    if (!match) continue;
    const labels = {};
    if (match[3]) {
      for (const pair of match[3].matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
        labels[pair[1]] = pair[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
      }
    }
    samples.push({ name: match[1], labels, value: Number(match[4]) });
  }
  return samples;
}

function total(samples, name, keep = () => true) {
  return samples
    .filter((s) => s.name === name && keep(s.labels))
    .reduce((sum, s) => sum + s.value, 0);
}

function has(samples, name) {
  return samples.some((s) => s.name === name);
}

// ---- rendering --------------------------------------------------------------------------

function formatDuration(seconds) {
  seconds = Math.floor(seconds);
  const d = Math.floor(seconds / 86400);
  const h = Math.floor((seconds % 86400) / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  const s = seconds % 60;
  if (d) return `${d}d ${h}h ${m}m`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${s}s`;
  return `${s}s`;
}

function renderInfo(info, readiness) {
  const name = info.name || "tabserve";
  $("server-name").textContent = name;
  document.title = `${name} status`;
  $("server-version").textContent = info.server_version || "unknown";
  const features = (info.versions && info.versions.v1 && info.versions.v1.features) || {};
  const flags = [
    ["auth", "authentication" in features],
    ["TLS", location.protocol === "https:"],
    ["evaluate", features.evaluate_enabled === true],
    ["gzip", features.gzip_enabled === true],
  ];
  const list = $("features");
  list.replaceChildren();
  for (const [label, on] of flags) {
    list.append(element("li", { className: on ? "on" : "off", textContent: `${label}: ${on ? "on" : "off"}` }));
  }
  // The sandbox verdict is the readiness check of that name ("<mode>: self-check ...");
  // a server without one (another Analytics Extensions server) leaves it unknown.
  const check = readiness && Array.isArray(readiness.checks)
    ? readiness.checks.find((c) => c.name === "sandbox")
    : undefined;
  const sandboxText = check ? String(check.detail) : "unknown";
  list.append(element("li", { className: check && check.ok ? "on" : "off", textContent: `sandbox: ${sandboxText}` }));
  for (const li of list.children) li.dataset.feature = li.textContent.split(":")[0];
}

// /health/ready is public and answers 503 with the same body when not ready.
async function readinessReport() {
  try {
    const response = await fetch("/health/ready", { cache: "no-store", credentials: "omit" });
    return (response.headers.get("Content-Type") || "").includes("json") ? response.json() : null;
  } catch {
    return null;
  }
}

function renderUptime(health, metrics) {
  let seconds = health && typeof health === "object" ? health.uptime_seconds : undefined;
  if (typeof seconds !== "number" && typeof metrics === "string") {
    // Fall back on the standard process collector's start time (server clock).
    const start = parsePrometheus(metrics).find((s) => s.name === "process_start_time_seconds");
    if (start) seconds = Math.max(0, Date.now() / 1000 - start.value);
  }
  $("uptime").textContent = typeof seconds === "number" ? formatDuration(seconds) : "unknown";
}

// TabPy's client sends the schema as the str() of a Python dict; turn that into an object
// when it is one, so that argument names and the output type can be read from it.
function parseSchema(schema) {
  if (schema === null || schema === undefined || schema === "") return null;
  if (typeof schema === "object") return schema;
  try {
    return JSON.parse(schema);
  } catch (_) {
    /* not JSON: maybe a Python literal */
  }
  const json = pythonLiteralToJson(String(schema));
  if (json !== null) {
    try {
      return JSON.parse(json);
    } catch (_) {
      /* give up: shown as text */
    }
  }
  return null;
}

function pythonLiteralToJson(text) {
  // A small tokenizer for dict/list/str/number/True/False/None literals; null otherwise.
  let out = "";
  let i = 0;
  while (i < text.length) {
    const c = text[i];
    if (c === "'" || c === '"') {
      let j = i + 1;
      let value = "";
      while (j < text.length && text[j] !== c) {
        if (text[j] === "\\" && j + 1 < text.length) {
          value += text[j + 1] === "n" ? "\n" : text[j + 1] === "t" ? "\t" : text[j + 1];
          j += 2;
        } else {
          value += text[j];
          j += 1;
        }
      }
      if (j >= text.length) return null;
      out += JSON.stringify(value);
      i = j + 1;
    } else if (/[A-Za-z_]/.test(c)) {
      const word = text.slice(i).match(/^[A-Za-z_]+/)[0];
      const mapped = { True: "true", False: "false", None: "null" }[word];
      if (!mapped) return null;
      out += mapped;
      i += word.length;
    } else if (c === "(" || c === ")") {
      out += c === "(" ? "[" : "]";
      i += 1;
    } else {
      out += c;
      i += 1;
    }
  }
  return out;
}

function argumentNames(endpoint, schema) {
  const input = schema && schema.input;
  if (input && input.properties && typeof input.properties === "object") {
    const names = Object.keys(input.properties);
    if (names.length) return names;
  }
  if (typeof endpoint.signature === "string") {
    const inner = endpoint.signature.replace(/->.*$/, "").match(/\((.*)\)/);
    if (inner) {
      const names = inner[1]
        .split(",")
        .map((p) => p.trim().split(/[:=]/)[0].trim())
        .filter((p) => p && !p.startsWith("*") && p !== "/");
      if (names.length) return names;
    }
  }
  return ["x"];
}

function resultKind(schema) {
  const type = schema && schema.output && schema.output.type;
  const items = schema && schema.output && schema.output.items && schema.output.items.type;
  const kind = type === "array" ? items : type;
  return { integer: "INT", string: "STR", boolean: "BOOL" }[kind] || "REAL";
}

function fieldFor(name) {
  return `SUM([${name.charAt(0).toUpperCase()}${name.slice(1)}])`;
}

// Tableau string literals are double-quoted with "" for a quote.
const tableauString = (text) => `"${text.replace(/"/g, '""')}"`;

function snippets(name, endpoint, schema) {
  const args = argumentNames(endpoint, schema);
  const kind = resultKind(schema);
  const fields = args.map(fieldFor).join(", ");
  const placeholders = args.map((_, i) => `_arg${i + 1}`).join(", ");
  const pyName = `'${name.replace(/\\/g, "\\\\").replace(/'/g, "\\'")}'`;
  return {
    model: `MODEL_EXTENSION_${kind}(${tableauString(name)}, ${tableauString(args.join(","))}, ${fields})`,
    script: `SCRIPT_${kind}(${tableauString(`return tabpy.query(${pyName}, ${placeholders})['response']`)}, ${fields})`,
  };
}

function snippetRow(label, text, kind) {
  const code = element("code", { textContent: text });
  code.dataset.snippet = kind;
  const button = element("button", { type: "button", textContent: "Copy" });
  button.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(text);
      button.textContent = "Copied";
    } catch (_) {
      // No clipboard (plain http on another host): select the text for Ctrl+C instead.
      getSelection().selectAllChildren(code);
      button.textContent = "Press Ctrl+C";
    }
    setTimeout(() => (button.textContent = "Copy"), 1500);
  });
  return element("div", { className: "snippet" }, element("span", { className: "label", textContent: label }), code, button);
}

function renderEndpoints(endpoints, statuses) {
  const box = $("endpoints");
  const names = Object.keys(endpoints || {}).sort();
  $("no-endpoints").hidden = names.length > 0;
  box.replaceChildren();
  for (const name of names) {
    const ep = endpoints[name];
    const status = (statuses && statuses[name]) || {};
    const schema = parseSchema(ep.schema);
    const meta = [`v${ep.version}`, ep.type, status.status].filter(Boolean).join(" · ");
    const card = element(
      "article",
      { className: "endpoint" },
      element("h3", {}, `${name} `, element("span", { className: "meta", textContent: meta })),
    );
    card.dataset.endpoint = name;
    if (ep.description) card.append(element("p", { textContent: ep.description }));
    if (ep.type === "alias" && ep.target) card.append(element("p", { className: "muted", textContent: `alias of ${ep.target}` }));
    if (ep.docstring) card.append(element("p", { className: "docstring muted", textContent: ep.docstring }));
    if (status.last_error) card.append(element("p", { className: "error", textContent: status.last_error }));
    if (ep.schema) {
      const text = schema ? JSON.stringify(schema, null, 2) : String(ep.schema);
      card.append(element("details", {}, element("summary", { textContent: "schema" }), element("pre", { className: "schema", textContent: text })));
    }
    const snip = snippets(name, ep, schema);
    card.append(snippetRow("MODEL_EXTENSION", snip.model, "model"));
    card.append(snippetRow("SCRIPT with tabpy.query", snip.script, "script"));
    box.append(card);
  }
}

function renderMetrics(text) {
  if (typeof text !== "string") {
    $("metrics").hidden = true;
    $("metrics-unavailable").hidden = false;
    return;
  }
  const samples = parsePrometheus(text);
  $("metrics").hidden = false;
  $("metrics-unavailable").hidden = true;
  const requests = total(samples, "tabserve_requests_total");
  const errors = total(samples, "tabserve_requests_total", (l) => String(l.status || "").startsWith("5"));
  $("m-requests").textContent = requests;
  $("m-errors").textContent = errors;
  $("m-in-flight").textContent = has(samples, "tabserve_requests_in_flight") ? total(samples, "tabserve_requests_in_flight") : "–";
  $("m-queue").textContent = has(samples, "tabserve_queue_depth") ? total(samples, "tabserve_queue_depth") : "–";
  const workers = total(samples, "tabserve_workers");
  $("m-workers").textContent = has(samples, "tabserve_workers_busy") ? `${total(samples, "tabserve_workers_busy")} / ${workers}` : "–";

  // The share of calls with a max_age that the cache answered (merged calls count as misses).
  const hits = total(samples, "tabserve_cache_hits_total");
  const lookups = hits + total(samples, "tabserve_cache_misses_total");
  $("m-cache").textContent = lookups > 0 ? `${Math.round((100 * hits) / lookups)}% of ${lookups}` : "–";

  const sum = total(samples, "tabserve_request_duration_seconds_sum");
  const count = total(samples, "tabserve_request_duration_seconds_count");
  if (state.previous) {
    const dCount = count - state.previous.count;
    const mean = dCount > 0 ? ((sum - state.previous.sum) / dCount) * 1000 : 0;
    state.latency.push(mean);
    if (state.latency.length > CHART_POINTS) state.latency.shift();
    $("m-latency").textContent = dCount > 0 ? `· last: ${mean.toFixed(1)} ms over ${dCount} requests` : "· last: no requests";
  }
  state.previous = { sum, count };
  drawChart($("latency-chart"), state.latency);
  renderRoutes(samples);
}

const JOB_STATUS = { 1: "pending", 2: "started", 3: "success", 4: "failure", 5: "cancelled" };

function renderJobs(answer) {
  // An older server has no /jobs: the section stays hidden.
  $("jobs-section").hidden = !answer;
  if (!answer) return;
  const body = $("jobs").querySelector("tbody");
  body.replaceChildren();
  $("no-jobs").hidden = answer.jobs.length > 0;
  $("jobs").hidden = answer.jobs.length === 0;
  for (const job of answer.jobs) {
    const status = JOB_STATUS[job.status] || String(job.status);
    const title = job.error ? `${job.error.message}: ${JSON.stringify(job.error.info)}` : "";
    body.append(
      element(
        "tr",
        { className: `job-${status}` },
        element("td", {}, element("code", { textContent: job.id.slice(0, 12) })),
        element("td", { textContent: job.endpoint || "/evaluate" }),
        element("td", { textContent: status, title }),
        element("td", { textContent: new Date(job.created_at).toLocaleTimeString() }),
        element("td", { textContent: new Date(job.updated_at).toLocaleTimeString() }),
      ),
    );
  }
}

function renderRoutes(samples) {
  const routes = new Map();
  for (const s of samples) {
    const route = s.labels.route;
    if (route === undefined) continue;
    const row = routes.get(route) || { requests: 0, sum: 0, count: 0 };
    if (s.name === "tabserve_requests_total") row.requests += s.value;
    if (s.name === "tabserve_request_duration_seconds_sum") row.sum += s.value;
    if (s.name === "tabserve_request_duration_seconds_count") row.count += s.value;
    routes.set(route, row);
  }
  const body = $("routes").tBodies[0];
  body.replaceChildren();
  for (const [route, row] of [...routes].sort((a, b) => b[1].requests - a[1].requests)) {
    const mean = row.count ? `${((row.sum / row.count) * 1000).toFixed(1)} ms` : "–";
    body.append(
      element(
        "tr",
        {},
        element("td", {}, element("code", { textContent: route })),
        element("td", { className: "num", textContent: row.requests }),
        element("td", { className: "num", textContent: mean }),
      ),
    );
  }
}

function drawChart(canvas, values) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || canvas.width;
  const height = canvas.clientHeight || canvas.height;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  const ctx = canvas.getContext("2d");
  ctx.scale(ratio, ratio);
  ctx.clearRect(0, 0, width, height);
  const pad = 24;
  const top = Math.max(1, ...values);
  ctx.strokeStyle = "#dde1e8";
  ctx.fillStyle = "#687083";
  ctx.font = "11px system-ui, sans-serif";
  ctx.beginPath();
  ctx.moveTo(pad, 6);
  ctx.lineTo(pad, height - pad);
  ctx.lineTo(width - 6, height - pad);
  ctx.stroke();
  ctx.fillText(`${top.toFixed(top < 10 ? 1 : 0)} ms`, pad + 4, 14);
  ctx.fillText(`last ${CHART_POINTS} refreshes`, pad + 4, height - 8);
  if (values.length < 2) return;
  const step = (width - pad - 6) / (CHART_POINTS - 1);
  const x0 = width - 6 - step * (values.length - 1);
  ctx.strokeStyle = "#2d5fd3";
  ctx.lineWidth = 2;
  ctx.beginPath();
  values.forEach((v, i) => {
    const x = x0 + i * step;
    const y = height - pad - (v / top) * (height - pad - 8);
    if (i === 0) ctx.moveTo(x, y);
    else ctx.lineTo(x, y);
  });
  ctx.stroke();
}

// ---- the loop ---------------------------------------------------------------------------

function showLogin(message) {
  $("login").hidden = false;
  $("content").hidden = true;
  $("login-error").textContent = message || "";
  $("login-user").focus();
}

async function refresh() {
  try {
    const info = await api("/info");
    const [endpoints, statuses, metrics, health, readiness, jobs] = await Promise.all([
      api("/endpoints"),
      api("/status"),
      api("/metrics", { optional: true }),
      api("/health/live", { optional: true }),
      readinessReport(),
      api("/jobs?page_size=10", { optional: true }),
    ]);
    $("login").hidden = true;
    $("content").hidden = false;
    $("page-error").hidden = true;
    renderInfo(info, readiness);
    renderUptime(health, metrics);
    renderEndpoints(endpoints, statuses);
    renderMetrics(metrics);
    renderJobs(jobs);
    $("refreshed").textContent = `updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
  } catch (error) {
    if (error instanceof Unauthorized) {
      const hadCredentials = Boolean(state.authorization);
      state.authorization = null;
      sessionStorage.removeItem(CREDENTIALS_KEY);
      showLogin(hadCredentials ? "Wrong username or password." : "");
    } else {
      $("page-error").textContent = `Cannot reach the server: ${error.message}`;
      $("page-error").hidden = false;
    }
  }
}

function schedule() {
  clearTimeout(state.timer);
  state.timer = setTimeout(async () => {
    if ($("login").hidden) await refresh();
    schedule();
  }, REFRESH_MS);
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const user = $("login-user").value;
  const password = $("login-password").value;
  // btoa needs Latin-1; encode UTF-8 first so any username works.
  const bytes = new TextEncoder().encode(`${user}:${password}`);
  state.authorization = `Basic ${btoa(String.fromCharCode(...bytes))}`;
  sessionStorage.setItem(CREDENTIALS_KEY, state.authorization);
  await refresh();
});

refresh().then(schedule);
