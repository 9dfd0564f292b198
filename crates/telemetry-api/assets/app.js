// Telemetry dashboard: plain ES2020, no framework, no build step. Needs uPlot (loaded before this
// file as the global `uPlot`). Every string that comes from the API or the WebSocket reaches the
// DOM through textContent, attributes or `title`, never through innerHTML.
"use strict";

(() => {
  const POLL_DEVICES_MS = 3000;
  const POLL_DLQ_MS = 3000;
  const POLL_ALERTS_MS = 3000;
  const POLL_HISTORY_MS = 10000;
  const DEVICES_PAGE = 100; // devices per request (the API's default page)
  const DEVICES_MAX_PAGES = 50; // most pages loaded at once: 5,000 devices
  const LIVE_MAX_POINTS = 600;
  const LIVE_MAX_DEVICES = 200; // live buffers kept at once (least recently active dropped)
  const HISTORY_MAX_POINTS = 500;
  const DLQ_LIMIT = 50;
  const ALERTS_LIMIT = 50;
  const PAYLOAD_PREVIEW_CHARS = 120;
  const BACKOFF_START_MS = 500;
  const BACKOFF_MAX_MS = 10000;
  const CHART_HEIGHT = 190;

  const $ = (id) => document.getElementById(id);

  const state = {
    devices: [],
    devicesById: new Map(),
    deviceRows: new Map(), // device_id -> <tr>
    devicesLoaded: false,
    devicePages: 1, // pages of devices the user asked for ("More devices")
    devicePagesLoaded: 0,
    devicesMore: false, // the API has devices after the pages loaded
    clockOffsetMs: 0, // server clock minus browser clock, from /api/devices generated_at
    selected: null,
    metric: null,
    metricExplicit: false, // the user picked the metric (else the default follows the device)
    wantedMetric: null, // metric asked for by the URL, taken once the device has it
    metricOptionsKey: "",
    rangeMs: 3600000,
    live: new Map(), // device_id -> { series: Map(metric -> {xs, ys}), accepted, rejected, lastAt, lastRejected }
    liveRenderPending: false,
    liveChart: null,
    historyChart: null,
    historyWindow: null, // { from, to } in seconds, the x range of the history chart
    dlqRows: new Map(), // entry key -> <tr>
    alertRows: new Map(), // alert id + status -> <tr>
    errors: new Map(), // source -> message
  };

  // ---------------------------------------------------------------------------------------------
  // small helpers

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [k, v] of Object.entries(props)) {
        if (v === undefined || v === null) continue;
        if (k === "text") node.textContent = String(v);
        else if (k === "className") node.className = v;
        else if (k === "dataset") Object.assign(node.dataset, v);
        else node.setAttribute(k, String(v));
      }
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  function clamp(v, lo, hi) {
    return Math.min(hi, Math.max(lo, v));
  }

  function serverNow() {
    return Date.now() + state.clockOffsetMs;
  }

  function parseTime(s) {
    if (typeof s !== "string") return NaN;
    return Date.parse(s);
  }

  function fmtAge(ms) {
    if (!Number.isFinite(ms)) return "never";
    const s = Math.max(0, Math.round(ms / 1000));
    if (s < 60) return `${s} s ago`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} min ago`;
    const h = Math.floor(m / 60);
    if (h < 48) return `${h} h ago`;
    return `${Math.floor(h / 24)} d ago`;
  }

  function fmtDuration(ms) {
    if (!Number.isFinite(ms) || ms <= 0) return "?";
    if (ms < 1000) return `${Math.round(ms)} ms`;
    const s = ms / 1000;
    if (s < 60) return `${+s.toFixed(1)} s`;
    if (s < 3600) return `${+(s / 60).toFixed(1)} min`;
    if (s < 86400) return `${+(s / 3600).toFixed(1)} h`;
    return `${+(s / 86400).toFixed(1)} d`;
  }

  function fmtInt(n) {
    return Number.isFinite(n) ? Math.round(n).toLocaleString("en-US") : "–";
  }

  function fmtValue(v) {
    if (v === null || v === undefined || !Number.isFinite(v)) return "–";
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e6 || a < 1e-3)) return v.toExponential(3);
    return String(+v.toFixed(a >= 100 ? 1 : 3));
  }

  function fmtClock(ms) {
    if (!Number.isFinite(ms)) return "–";
    const d = new Date(ms);
    const now = new Date();
    const time = d.toLocaleTimeString("en-GB", { hour12: false });
    if (d.toDateString() === now.toDateString()) return time;
    return `${d.toLocaleDateString("en-GB", { day: "2-digit", month: "short" })} ${time}`;
  }

  // Truncates by code points (never splits a surrogate pair).
  function truncate(s, n) {
    const cps = Array.from(s);
    return cps.length > n ? `${cps.slice(0, n).join("")}…` : s;
  }

  // Makes control characters visible in a one-line preview.
  function visibleControls(s) {
    return s.replace(/[\u0000-\u001f\u007f]/g, (c) => {
      if (c === "\n") return "\\n";
      if (c === "\r") return "\\r";
      if (c === "\t") return "\\t";
      return `\\x${c.charCodeAt(0).toString(16).padStart(2, "0")}`;
    });
  }

  function base64Bytes(s) {
    const clean = String(s).replace(/[^A-Za-z0-9+/_-]/g, "");
    return Math.floor((clean.length * 3) / 4);
  }

  // Inserts a null point (a break in the line) wherever consecutive x values are much further
  // apart than usual: more than 4 times the median spacing and more than `minGap`.
  function withGaps(xs, columns, minGap) {
    const deltas = [];
    for (let i = 1; i < xs.length; i++) deltas.push(xs[i] - xs[i - 1]);
    deltas.sort((a, b) => a - b);
    const median = deltas.length ? deltas[deltas.length >> 1] : 0;
    const gap = Math.max(4 * median, minGap);
    const outX = [];
    const outCols = columns.map(() => []);
    for (let i = 0; i < xs.length; i++) {
      if (i > 0 && gap > 0 && xs[i] - xs[i - 1] > gap) {
        outX.push((xs[i] + xs[i - 1]) / 2);
        for (const col of outCols) col.push(null);
      }
      outX.push(xs[i]);
      columns.forEach((col, c) => outCols[c].push(col[i]));
    }
    return [outX, ...outCols];
  }

  // Reorders `parent`'s children to `rows` with as few DOM moves as possible (rows that stay in
  // place are not touched, so hover and focus survive a refresh), removing the rest.
  function reconcileChildren(parent, rows) {
    rows.forEach((row, i) => {
      const at = parent.children[i];
      if (at !== row) parent.insertBefore(row, at || null);
    });
    while (parent.children.length > rows.length) parent.lastElementChild.remove();
  }

  // ---------------------------------------------------------------------------------------------
  // errors: a banner with one line per failing source, cleared when that source recovers

  function setError(source, message) {
    if (state.errors.get(source) === message) return;
    state.errors.set(source, message);
    renderErrors();
  }

  function clearError(source) {
    if (state.errors.delete(source)) renderErrors();
  }

  function renderErrors() {
    const items = [...state.errors].map(([source, message]) =>
      el("li", null, el("strong", { text: `${source}: ` }), message),
    );
    $("error-list").replaceChildren(...items);
    $("error-banner").hidden = items.length === 0;
  }

  window.addEventListener("error", (ev) => {
    setError("dashboard", `script error: ${ev.message || "unknown"}`);
  });
  window.addEventListener("unhandledrejection", (ev) => {
    const r = ev.reason;
    setError("dashboard", `unexpected error: ${(r && r.message) || String(r)}`);
  });

  // ---------------------------------------------------------------------------------------------
  // API access

  // Access token, when the API asks for one (TELEMETRY_AUTH_TOKENS). Kept for this tab only
  // (sessionStorage), sent as `Authorization: Bearer` to the API and as `access_token` to the
  // live stream, whose WebSocket cannot carry headers.
  const TOKEN_KEY = "telemetry.access_token";
  const auth = { required: false, token: null };
  try {
    auth.token = sessionStorage.getItem(TOKEN_KEY) || null;
  } catch (_) {
    auth.token = null;
  }

  function showTokenForm(message) {
    $("token-form").hidden = false;
    $("token-message").textContent = message;
  }

  function signIn(token) {
    auth.token = token;
    try {
      sessionStorage.setItem(TOKEN_KEY, token);
    } catch (_) {
      // private mode: kept in memory only
    }
    $("token-form").hidden = true;
    $("token-input").value = "";
    clearError("sign-in");
    devicesPoller.now();
    dlqPoller.now();
    alertsPoller.now();
    historyPoller.now();
    reconnectLive();
  }

  function onUnauthorized() {
    const had = auth.token !== null;
    auth.token = null;
    try {
      sessionStorage.removeItem(TOKEN_KEY);
    } catch (_) {
      // nothing stored
    }
    showTokenForm(had ? "That token was not accepted." : "This dashboard needs an access token.");
  }

  async function fetchJson(url) {
    let res;
    let text;
    const headers = { Accept: "application/json" };
    if (auth.token) headers.Authorization = `Bearer ${auth.token}`;
    try {
      res = await fetch(url, { headers, cache: "no-store" });
      text = await res.text();
    } catch (e) {
      throw new Error(`API unreachable (${(e && e.message) || e})`);
    }
    if (res.status === 401) {
      onUnauthorized();
      throw new Error("sign in with an access token (top right)");
    }
    let body = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch (_) {
      body = null;
    }
    if (!res.ok) {
      const err = body && typeof body === "object" ? body.error : null;
      let msg = `HTTP ${res.status}`;
      if (err && typeof err.message === "string") {
        msg += typeof err.parameter === "string" ? `: ${err.parameter} ${err.message}` : `: ${err.message}`;
      }
      throw new Error(msg);
    }
    if (!body || typeof body !== "object") throw new Error(`${url}: response is not a JSON object`);
    return body;
  }

  // A polling loop that never overlaps itself; `now()` refreshes at once (after the request in
  // flight, if any). Errors go to the banner under `name` and clear on the next success.
  function poller(name, fn, intervalMs) {
    let timer = null;
    let running = false;
    let again = false;
    async function run() {
      clearTimeout(timer);
      timer = null;
      if (running) {
        again = true;
        return;
      }
      running = true;
      try {
        await fn();
        clearError(name);
      } catch (e) {
        setError(name, (e && e.message) || String(e));
      } finally {
        running = false;
      }
      if (again) {
        again = false;
        run();
        return;
      }
      timer = setTimeout(run, intervalMs);
    }
    return { now: run };
  }

  // ---------------------------------------------------------------------------------------------
  // devices

  // The API lists devices a page at a time in id order; each page names the next one's cursor.
  // Loaded: the pages the user asked for, and further ones while the selected device (from the
  // URL, say) is not listed yet and would come later.
  async function loadDevices() {
    const byId = new Map();
    let generatedAt = null;
    let cursor = null;
    let pages = 0;
    while (pages < DEVICES_MAX_PAGES) {
      const params = new URLSearchParams({ limit: String(DEVICES_PAGE) });
      if (cursor) params.set("cursor", cursor);
      const body = await fetchJson(`/api/devices?${params}`);
      pages++;
      if (generatedAt === null) generatedAt = body.generated_at;
      let last = null;
      for (const d of Array.isArray(body.devices) ? body.devices : []) {
        if (!d || typeof d !== "object" || typeof d.device_id !== "string") continue;
        byId.set(d.device_id, d);
        last = d.device_id;
      }
      cursor = typeof body.next_cursor === "string" && body.next_cursor ? body.next_cursor : null;
      if (!cursor) break;
      const selectedLater = state.selected && !byId.has(state.selected) && last !== null && state.selected > last;
      if (pages >= state.devicePages && !selectedLater) break;
    }
    const generated = parseTime(generatedAt);
    if (Number.isFinite(generated)) state.clockOffsetMs = generated - Date.now();
    const wasListed = state.devicesById.has(state.selected);
    state.devices = [...byId.values()];
    state.devicesById = byId;
    state.devicePagesLoaded = pages;
    state.devicesMore = cursor !== null;
    state.devicesLoaded = true;
    renderDevices();
    updateMetricOptions();
    renderDetailMeta();
    if (state.selected && !wasListed && state.devicesById.has(state.selected)) historyPoller.now();
  }

  function deviceRow(id) {
    let tr = state.deviceRows.get(id);
    if (!tr) {
      tr = el("tr", { tabindex: 0, dataset: { testid: "device-row", deviceId: id } });
      tr.append(
        el("td", { className: "mono device-id", text: id }),
        el("td", null, el("span", { className: "badge" })),
        el("td", { className: "age" }),
        el("td", { className: "num" }),
        el("td", { className: "num" }),
      );
      state.deviceRows.set(id, tr);
    }
    return tr;
  }

  function renderDevices() {
    const rows = state.devices.map((d) => {
      const tr = deviceRow(d.device_id);
      const [, healthTd, ageTd, eventsTd, dlqTd] = tr.children;

      const health = typeof d.health === "string" ? d.health : "unknown";
      const badge = healthTd.firstElementChild;
      badge.textContent = health;
      badge.className = `badge health-${["ok", "stale", "failing"].includes(health) ? health : "unknown"}`;
      const rate = Number(d.dlq_rate_last_hour);
      badge.title = Number.isFinite(rate) ? `DLQ rate last hour: ${(rate * 100).toFixed(1)} %` : "";

      const lastSeen = parseTime(d.last_seen);
      ageTd.dataset.ts = Number.isFinite(lastSeen) ? String(lastSeen) : "";
      ageTd.title = Number.isFinite(lastSeen) ? new Date(lastSeen).toLocaleString() : "";
      ageTd.textContent = fmtAge(serverNow() - lastSeen);

      eventsTd.textContent = fmtInt(Number(d.events_last_hour));
      eventsTd.title = `last day: ${fmtInt(Number(d.events_last_day))}`;
      const dlq = Number(d.dlq_last_hour);
      dlqTd.textContent = fmtInt(dlq);
      dlqTd.title = `last day: ${fmtInt(Number(d.dlq_last_day))}`;
      dlqTd.classList.toggle("warn", dlq > 0);

      const selected = d.device_id === state.selected;
      tr.classList.toggle("selected", selected);
      tr.setAttribute("aria-selected", selected ? "true" : "false");
      return tr;
    });
    for (const [id, tr] of state.deviceRows) {
      if (!state.devicesById.has(id)) {
        state.deviceRows.delete(id);
        tr.remove();
      }
    }
    reconcileChildren($("device-rows"), rows);

    const empty = $("devices-empty");
    empty.hidden = rows.length > 0;
    empty.textContent = "No devices have sent anything yet.";
    const more = $("devices-more");
    more.hidden = !state.devicesMore;

    const counts = { ok: 0, stale: 0, failing: 0 };
    for (const d of state.devices) if (d.health in counts) counts[d.health]++;
    const shown = state.devicesMore ? `first ${rows.length}` : `${rows.length}`;
    $("devices-summary").textContent = rows.length
      ? `${shown} · ${counts.ok} ok · ${counts.stale} stale · ${counts.failing} failing`
      : "";
  }

  function tickDeviceAges() {
    for (const tr of state.deviceRows.values()) {
      const td = tr.children[2];
      const ts = td.dataset.ts ? Number(td.dataset.ts) : NaN;
      td.textContent = fmtAge(serverNow() - ts);
    }
  }

  function selectDevice(id, wantedMetric) {
    if (typeof id !== "string" || id === state.selected) return;
    state.selected = id;
    state.metric = null;
    state.metricExplicit = false;
    state.wantedMetric = wantedMetric || null;
    state.metricOptionsKey = "";
    for (const [rid, tr] of state.deviceRows) {
      tr.classList.toggle("selected", rid === id);
      tr.setAttribute("aria-selected", rid === id ? "true" : "false");
    }
    $("detail-title").textContent = id;
    $("detail-empty").hidden = true;
    $("detail-body").hidden = false;
    $("dlq-only-device").disabled = false;
    updateMetricOptions(true);
    renderDetailMeta();
    writeHash();
    if ($("dlq-only-device").checked) dlqPoller.now();
  }

  function renderDetailMeta() {
    const d = state.selected ? state.devicesById.get(state.selected) : null;
    const meta = $("detail-meta");
    if (!state.selected) {
      meta.textContent = "";
      return;
    }
    if (!d) {
      meta.textContent = state.devicesLoaded ? "not in the device list" : "";
      return;
    }
    const parts = [];
    const first = parseTime(d.first_seen);
    if (Number.isFinite(first)) parts.push(`first seen ${fmtAge(serverNow() - first)}`);
    parts.push(`${fmtInt(Number(d.events_last_day))} events / 24 h`);
    const rate = Number(d.dlq_rate_last_hour);
    if (Number.isFinite(rate)) parts.push(`DLQ rate ${(rate * 100).toFixed(1)} % / 1 h`);
    meta.textContent = parts.join(" · ");
  }

  // ---------------------------------------------------------------------------------------------
  // metric selection

  function metricsFor(id) {
    const set = new Set();
    const d = state.devicesById.get(id);
    if (d && Array.isArray(d.metrics)) for (const m of d.metrics) if (typeof m === "string") set.add(m);
    const live = state.live.get(id);
    if (live) for (const m of live.series.keys()) set.add(m);
    return [...set].sort();
  }

  function updateMetricOptions(force) {
    const select = $("metric-select");
    const metrics = state.selected ? metricsFor(state.selected) : [];
    let metric = state.metric;
    if (!state.metricExplicit || !metrics.includes(metric)) {
      state.metricExplicit = false;
      if (state.wantedMetric && metrics.includes(state.wantedMetric)) {
        metric = state.wantedMetric;
        state.metricExplicit = true;
        state.wantedMetric = null;
      } else {
        metric = metrics.includes("temperature_c") ? "temperature_c" : metrics.length ? metrics[0] : null;
      }
    }
    const key = metrics.join("\n");
    if (key !== state.metricOptionsKey || force) {
      state.metricOptionsKey = key;
      select.replaceChildren(...metrics.map((m) => el("option", { value: m, text: m })));
      if (!metrics.length) select.append(el("option", { value: "", text: "no metrics yet" }));
    }
    select.disabled = metrics.length === 0;
    select.value = metric || "";
    if (metric !== state.metric || force) {
      state.metric = metric;
      onSeriesChanged();
    }
  }

  // device or metric changed: new charts, fresh history
  function onSeriesChanged() {
    writeHash();
    rebuildCharts();
    renderLive();
    $("history-points").textContent = "0";
    $("history-meta").textContent = "";
    historyPoller.now();
  }

  // ---------------------------------------------------------------------------------------------
  // charts

  function chartsAvailable() {
    if (typeof window.uPlot === "function") return true;
    setError("charts", "uPlot did not load (/assets/vendor/uPlot.iife.min.js); charts are off");
    return false;
  }

  function chartWidth(container) {
    return Math.max(240, Math.floor(container.clientWidth || container.getBoundingClientRect().width));
  }

  // 24-hour time axis labels (uPlot's format table: tick increment in seconds, label, then the
  // sub-label shown where the year, month, day, hour, minute or second changes).
  const timeAxisValues = [
    [86400 * 365, "{YYYY}", null, null, null, null, null, null, 1],
    [86400 * 28, "{MMM}", "\n{YYYY}", null, null, null, null, null, 1],
    [86400, "{D} {MMM}", "\n{YYYY}", null, null, null, null, null, 1],
    [3600, "{HH}:{mm}", "\n{D} {MMM} {YYYY}", null, "\n{D} {MMM}", null, null, null, 1],
    [60, "{HH}:{mm}", "\n{D} {MMM} {YYYY}", null, "\n{D} {MMM}", null, null, null, 1],
    [1, "{HH}:{mm}:{ss}", "\n{D} {MMM} {YYYY}", null, "\n{D} {MMM}", null, null, null, 1],
    [0.001, ":{ss}.{fff}", "\n{D} {MMM} {YYYY} {HH}:{mm}", null, "\n{D} {MMM} {HH}:{mm}", null, "\n{HH}:{mm}", null, 1],
  ];
  const timeSeries = {
    value: (u, v) => (v == null ? "–" : new Date(v * 1000).toLocaleString("en-GB", { hour12: false })),
  };

  function liveRange(min, max) {
    if (min == null || max == null || !Number.isFinite(min) || !Number.isFinite(max)) {
      const now = Date.now() / 1000;
      return [now - 30, now];
    }
    return [Math.min(min, max - 5), max];
  }

  // y-axis width from its longest label (uPlot's auto-size recipe), so no label is clipped
  function axisSize(u, values, axisIdx, cycleNum) {
    const axis = u.axes[axisIdx];
    if (cycleNum > 1) return axis._size;
    let size = axis.ticks.size + axis.gap;
    const longest = (values || []).reduce((acc, v) => (String(v).length > acc.length ? String(v) : acc), "");
    if (longest) {
      u.ctx.font = axis.font[0];
      size += u.ctx.measureText(longest).width / (window.devicePixelRatio || 1);
    }
    return Math.ceil(size) + 4;
  }

  const axisStyle = {
    stroke: "#4b5563",
    grid: { stroke: "rgba(0,0,0,0.07)", width: 1 },
    ticks: { stroke: "rgba(0,0,0,0.15)", width: 1 },
  };

  function rebuildCharts() {
    for (const key of ["liveChart", "historyChart"]) {
      if (state[key]) {
        state[key].destroy();
        state[key] = null;
      }
    }
    if (!state.selected || !chartsAvailable()) return;
    const metric = state.metric || "value";
    const liveEl = $("live-chart");
    const histEl = $("history-chart");

    state.liveChart = new uPlot(
      {
        width: chartWidth(liveEl),
        height: CHART_HEIGHT,
        cursor: { drag: { x: false, y: false } },
        scales: {
          // at least 5 s wide, so the first few points are not spread over years
          x: { time: true, range: (u, min, max) => liveRange(min, max) },
        },
        axes: [
          { ...axisStyle, values: timeAxisValues, space: 70 },
          { ...axisStyle, size: axisSize },
        ],
        series: [
          timeSeries,
          {
            label: metric,
            stroke: "#2563eb",
            fill: "rgba(37,99,235,0.08)",
            width: 2,
            value: (u, v) => fmtValue(v),
          },
        ],
      },
      [[], []],
      liveEl,
    );

    state.historyChart = new uPlot(
      {
        width: chartWidth(histEl),
        height: CHART_HEIGHT,
        cursor: { drag: { x: false, y: false } },
        scales: {
          x: {
            time: true,
            range: (u, min, max) =>
              state.historyWindow ? [state.historyWindow.from, state.historyWindow.to] : [min, max],
          },
        },
        axes: [
          { ...axisStyle, values: timeAxisValues, space: 70 },
          { ...axisStyle, size: axisSize },
        ],
        series: [
          timeSeries,
          { label: `${metric} min`, stroke: "#93c5fd", width: 1, value: (u, v) => fmtValue(v) },
          { label: `${metric} avg`, stroke: "#1d4ed8", width: 2, value: (u, v) => fmtValue(v) },
          { label: `${metric} max`, stroke: "#f59e0b", width: 1, value: (u, v) => fmtValue(v) },
        ],
        bands: [{ series: [3, 1], fill: "rgba(59,130,246,0.12)" }],
      },
      [[], [], [], []],
      histEl,
    );
  }

  const resizeObserver =
    typeof ResizeObserver === "function"
      ? new ResizeObserver(() => {
          for (const [key, id] of [
            ["liveChart", "live-chart"],
            ["historyChart", "history-chart"],
          ]) {
            const chart = state[key];
            if (!chart) continue;
            const width = chartWidth($(id));
            if (Math.abs(chart.width - width) > 1) chart.setSize({ width, height: CHART_HEIGHT });
          }
        })
      : null;

  // ---------------------------------------------------------------------------------------------
  // live stream (WebSocket)

  // `failures`: connections in a row that closed before opening. A refused token looks like that
  // too (browsers hide the handshake's 401), so after a few the banner says so.
  const live = { url: null, ws: null, backoffMs: BACKOFF_START_MS, retryAt: 0, timer: null, failures: 0 };
  const LIVE_FAILURES_REPORTED = 3;

  function defaultLiveUrl() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    return `${scheme}://${location.hostname}:8080/ws`;
  }

  function liveUrlWithToken() {
    if (!auth.token) return live.url;
    const separator = live.url.includes("?") ? "&" : "?";
    return `${live.url}${separator}access_token=${encodeURIComponent(auth.token)}`;
  }

  // Drops the current connection (if any) and connects again now, e.g. with a new token.
  function reconnectLive() {
    clearTimeout(live.timer);
    live.timer = null;
    const old = live.ws;
    live.ws = null;
    if (old) old.close();
    live.backoffMs = BACKOFF_START_MS;
    live.failures = 0;
    if (live.url) connectLive();
  }

  function connectLive() {
    live.timer = null;
    live.retryAt = 0;
    if (auth.required && !auth.token) {
      renderLiveStatus();
      return; // signIn connects
    }
    let ws;
    try {
      ws = new WebSocket(liveUrlWithToken());
    } catch (e) {
      setError("live", `cannot open ${live.url}: ${(e && e.message) || e}`);
      scheduleReconnect();
      return;
    }
    live.ws = ws;
    renderLiveStatus();
    let opened = false;
    ws.onopen = () => {
      if (live.ws !== ws) return;
      opened = true;
      live.failures = 0;
      live.backoffMs = BACKOFF_START_MS;
      clearError("live");
      renderLiveStatus();
    };
    ws.onmessage = (ev) => {
      if (typeof ev.data === "string") onFrame(ev.data);
    };
    ws.onerror = () => {}; // a close event always follows
    ws.onclose = () => {
      if (live.ws !== ws) return;
      live.ws = null;
      if (!opened && ++live.failures >= LIVE_FAILURES_REPORTED) {
        const refused = auth.token ? ", or it does not accept this token" : "";
        setError("live", `cannot connect to the live stream at ${live.url}: the bridge is not reachable${refused}`);
      }
      scheduleReconnect();
    };
  }

  // Exponential backoff from 0.5 s, doubling up to 10 s, each wait jittered by ±20 % (never
  // above 10 s); a successful open resets it.
  function scheduleReconnect() {
    const base = Math.min(live.backoffMs, BACKOFF_MAX_MS);
    const delay = Math.min(BACKOFF_MAX_MS, base * (0.8 + 0.4 * Math.random()));
    live.backoffMs = Math.min(live.backoffMs * 2, BACKOFF_MAX_MS);
    live.retryAt = Date.now() + delay;
    live.timer = setTimeout(connectLive, delay);
    renderLiveStatus();
  }

  function renderLiveStatus() {
    const node = $("live-status");
    const open = live.ws && live.ws.readyState === WebSocket.OPEN;
    let text;
    if (open) text = "live";
    else if (auth.required && !auth.token) text = "signed out";
    else if (live.ws) text = "disconnected, connecting…";
    else if (live.retryAt) {
      text = `disconnected, reconnecting in ${Math.max(1, Math.ceil((live.retryAt - Date.now()) / 1000))} s`;
    } else text = "disconnected";
    if (node.textContent !== text) node.textContent = text;
    node.classList.toggle("ok", !!open);
    node.classList.toggle("down", !open);
    node.title = live.url ? `live stream: ${live.url}` : "";
  }

  function liveEntry(id) {
    let entry = state.live.get(id);
    if (!entry) {
      if (state.live.size >= LIVE_MAX_DEVICES) {
        let oldest = null;
        for (const [k, v] of state.live) if (k !== state.selected && (!oldest || v.lastAt < oldest[1].lastAt)) oldest = [k, v];
        if (oldest) state.live.delete(oldest[0]);
      }
      entry = { series: new Map(), accepted: 0, rejected: 0, lastAt: 0, lastRejected: null };
      state.live.set(id, entry);
    }
    return entry;
  }

  function pushPoint(s, x, y) {
    const n = s.xs.length;
    if (n === 0 || x >= s.xs[n - 1]) {
      s.xs.push(x);
      s.ys.push(y);
    } else {
      // out of order: insert in place (uPlot needs ascending x)
      let lo = 0;
      let hi = n;
      while (lo < hi) {
        const mid = (lo + hi) >> 1;
        if (s.xs[mid] <= x) lo = mid + 1;
        else hi = mid;
      }
      s.xs.splice(lo, 0, x);
      s.ys.splice(lo, 0, y);
    }
    if (s.xs.length > LIVE_MAX_POINTS) {
      const extra = s.xs.length - LIVE_MAX_POINTS;
      s.xs.splice(0, extra);
      s.ys.splice(0, extra);
    }
  }

  function onFrame(text) {
    let f;
    try {
      f = JSON.parse(text);
    } catch (_) {
      return;
    }
    if (!f || typeof f !== "object" || typeof f.device_id !== "string") return;
    const t = Number(f.received_at);
    if (!Number.isFinite(t)) return;
    const entry = liveEntry(f.device_id);
    entry.lastAt = Math.max(entry.lastAt, t);
    let newMetric = false;
    if (typeof f.rejected === "string") {
      entry.rejected++;
      entry.lastRejected = f.rejected;
    } else if (f.metrics && typeof f.metrics === "object") {
      entry.accepted++;
      for (const [name, v] of Object.entries(f.metrics)) {
        if (typeof v !== "number" || !Number.isFinite(v)) continue;
        let s = entry.series.get(name);
        if (!s) {
          s = { xs: [], ys: [] };
          entry.series.set(name, s);
          newMetric = true;
        }
        pushPoint(s, t / 1000, v);
      }
    }
    if (f.device_id === state.selected) {
      if (newMetric) updateMetricOptions();
      scheduleLiveRender();
    }
  }

  function scheduleLiveRender() {
    if (state.liveRenderPending) return;
    state.liveRenderPending = true;
    requestAnimationFrame(() => {
      state.liveRenderPending = false;
      renderLive();
    });
  }

  function currentLiveSeries() {
    const entry = state.selected ? state.live.get(state.selected) : null;
    return (entry && state.metric && entry.series.get(state.metric)) || null;
  }

  function renderLive() {
    const s = currentLiveSeries();
    const n = s ? s.xs.length : 0;
    $("live-points").textContent = String(n);
    if (state.liveChart) state.liveChart.setData(s ? withGaps(s.xs, [s.ys], 2) : [[], []]);
    renderLiveMeta();
  }

  function renderLiveMeta() {
    const entry = state.selected ? state.live.get(state.selected) : null;
    const node = $("live-last");
    if (!entry) {
      node.textContent = state.selected ? "waiting for frames" : "";
      return;
    }
    const s = currentLiveSeries();
    const parts = [];
    if (s && s.ys.length) parts.push(`now ${fmtValue(s.ys[s.ys.length - 1])}`);
    parts.push(`${entry.accepted} accepted, ${entry.rejected} rejected since page load`);
    parts.push(`last frame ${fmtAge(Date.now() - entry.lastAt)}`);
    node.textContent = parts.join(" · ");
    node.title = entry.lastRejected ? `last rejection: ${entry.lastRejected}` : "";
  }

  // ---------------------------------------------------------------------------------------------
  // history

  function historyKey() {
    return `${state.selected}\n${state.metric}\n${state.rangeMs}`;
  }

  async function loadHistory() {
    // Only devices the API lists have a history to ask for (a device seen only live so far
    // would be a 404).
    if (!state.selected || !state.metric || !state.devicesById.has(state.selected)) return;
    const key = historyKey();
    const to = Math.round(serverNow());
    const from = to - state.rangeMs;
    const params = new URLSearchParams({
      metric: state.metric,
      from: String(from),
      to: String(to),
      max_points: String(HISTORY_MAX_POINTS),
    });
    const body = await fetchJson(`/api/devices/${encodeURIComponent(state.selected)}/telemetry?${params}`);
    if (key !== historyKey()) return; // selection changed meanwhile; a fresh load is queued
    const points = (Array.isArray(body.points) ? body.points : []).filter(
      (p) => p && typeof p === "object" && Number.isFinite(Number(p.t)),
    );
    const bucketMs = Number(body.bucket_ms);
    const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);
    // Lines break where the device sent nothing for much longer than usual.
    const data = withGaps(
      points.map((p) => Number(p.t) / 1000),
      [points.map((p) => num(p.min)), points.map((p) => num(p.avg)), points.map((p) => num(p.max))],
      Number.isFinite(bucketMs) ? (4 * bucketMs) / 1000 : 0,
    );
    state.historyWindow = { from: from / 1000, to: to / 1000 };
    if (state.historyChart) state.historyChart.setData(data);
    $("history-points").textContent = String(points.length);
    const samples = points.reduce((a, p) => a + (Number(p.count) || 0), 0);
    const parts = [`${fmtInt(samples)} events`];
    if (Number.isFinite(bucketMs)) parts.push(`bucket ${fmtDuration(bucketMs)}`);
    const sources = { rollup_1m: "from minute rollups", rollup_1h: "from hour rollups" };
    if (Object.hasOwn(sources, body.source)) parts.push(sources[body.source]);
    parts.push("min / avg / max");
    $("history-meta").textContent = parts.join(" · ");
  }

  // ---------------------------------------------------------------------------------------------
  // dead-letter queue

  function dlqQuery() {
    const params = new URLSearchParams({ limit: String(DLQ_LIMIT) });
    if ($("dlq-only-device").checked && state.selected) params.set("device", state.selected);
    return params.toString();
  }

  async function loadDlq() {
    const query = dlqQuery();
    const body = await fetchJson(`/api/dlq?${query}`);
    if (query !== dlqQuery()) return; // filter changed meanwhile; a fresh load is queued
    const entries = (Array.isArray(body.entries) ? body.entries : []).filter((e) => e && typeof e === "object");
    renderDlq(entries);
  }

  // The API sends the first bytes of long payloads (`payload_truncated`; `payload_bytes` is the
  // whole length): the preview says so.
  function payloadPreview(e) {
    const total = Number(e.payload_bytes);
    const cut = e.payload_truncated === true && Number.isFinite(total);
    if (e.payload_encoding === "base64") {
      const n = cut ? total : base64Bytes(e.payload || "");
      const shown = cut ? ` (the first ${fmtInt(base64Bytes(e.payload || ""))} bytes)` : "";
      return { text: `(binary, ${fmtInt(n)} bytes)`, title: `base64${shown}: ${truncate(String(e.payload || ""), 4000)}`, binary: true };
    }
    const s = typeof e.payload === "string" ? e.payload : e.payload == null ? "" : JSON.stringify(e.payload);
    if (s === "") return { text: "(empty)", title: "", binary: true };
    const title = cut ? `${s}…\n(cut: ${fmtInt(total)} bytes in all)` : s;
    return { text: truncate(visibleControls(s), PAYLOAD_PREVIEW_CHARS), title, binary: false };
  }

  function dlqKey(e) {
    if (typeof e.id === "number" || typeof e.id === "string") return `id:${e.id}`;
    return JSON.stringify([e.received_at, e.device_id, e.code, e.source, e.payload]);
  }

  function dlqRow(e) {
    const received = parseTime(e.received_at);
    const device = typeof e.device_id === "string" ? e.device_id : null;
    const code = typeof e.code === "string" ? e.code : "unknown";
    const message = typeof e.message === "string" ? e.message : "";
    const src = e.source && typeof e.source === "object" ? e.source : null;
    const details = [];
    if (typeof e.rule === "string") details.push(`rule: ${e.rule}`);
    if (typeof e.field === "string") details.push(`field: ${e.field}`);
    if (e.contract_version != null) details.push(`contract v${e.contract_version}`);
    if (src) details.push(`source: ${src.topic}[${src.partition}] @ ${src.offset}`);
    if (e.id != null) details.push(`DLQ id ${e.id}`);
    const preview = payloadPreview(e);

    const deviceCell = device
      ? el("td", { className: "mono device-link", title: `show ${device}`, text: device, dataset: { deviceId: device } })
      : el("td", { className: "muted", text: "–", title: "no device id in the payload" });
    return el(
      "tr",
      { dataset: { testid: "dlq-row", code } },
      el("td", {
        className: "time",
        text: fmtClock(received),
        title: Number.isFinite(received) ? new Date(received).toISOString() : String(e.received_at),
      }),
      deviceCell,
      el("td", null, el("span", { className: "badge code", text: code })),
      el("td", { className: "message", text: message, title: details.join("\n") }),
      el(
        "td",
        { className: "payload" },
        el("code", { className: preview.binary ? "muted" : null, text: preview.text, title: preview.title || null }),
      ),
    );
  }

  function renderDlq(entries) {
    const seen = new Set();
    const rows = [];
    for (const e of entries) {
      const key = dlqKey(e);
      if (seen.has(key)) continue;
      seen.add(key);
      let tr = state.dlqRows.get(key);
      if (!tr) {
        tr = dlqRow(e);
        state.dlqRows.set(key, tr);
      }
      rows.push(tr);
    }
    for (const key of [...state.dlqRows.keys()]) if (!seen.has(key)) state.dlqRows.delete(key);
    reconcileChildren($("dlq-rows"), rows);
    const empty = $("dlq-empty");
    empty.hidden = rows.length > 0;
    empty.textContent = "No rejected records.";
  }

  // ---------------------------------------------------------------------------------------------
  // alerts

  async function loadAlerts() {
    const body = await fetchJson(`/api/alerts?limit=${ALERTS_LIMIT}`);
    const alerts = (Array.isArray(body.alerts) ? body.alerts : []).filter((a) => a && typeof a === "object");
    renderAlerts(alerts);
  }

  function alertRow(a) {
    const text = (v) => (typeof v === "string" ? v : "");
    const fired = parseTime(a.fired_at);
    const status = a.status === "resolved" ? "resolved" : "firing";
    const severity = ["info", "warning", "critical"].includes(a.severity) ? a.severity : "warning";
    const device = text(a.device_id);
    const value = typeof a.value === "number" && Number.isFinite(a.value) ? String(a.value) : "–";
    const resolved = parseTime(a.resolved_at);
    const statusTitle =
      status === "resolved" && Number.isFinite(resolved)
        ? `resolved ${new Date(resolved).toISOString()}`
        : `since ${text(a.started_at)}`;
    return el(
      "tr",
      { dataset: { testid: "alert-row", rule: text(a.rule), status, deviceId: device } },
      el("td", {
        className: "time",
        text: fmtClock(fired),
        title: Number.isFinite(fired) ? new Date(fired).toISOString() : text(a.fired_at),
      }),
      el("td", null, el("span", { className: `badge alert-${status}`, text: status, title: statusTitle })),
      el("td", null, el("span", { className: `badge severity-${severity}`, text: severity })),
      el("td", { className: "mono device-link", title: `show ${device}`, text: device, dataset: { deviceId: device } }),
      el("td", { className: "mono", text: text(a.rule), title: text(a.alert_id) }),
      el("td", { text: text(a.condition) }),
      el("td", { className: "num", text: value }),
    );
  }

  function renderAlerts(alerts) {
    const seen = new Set();
    const rows = [];
    for (const a of alerts) {
      const key = JSON.stringify([a.alert_id, a.status]);
      if (seen.has(key)) continue;
      seen.add(key);
      let tr = state.alertRows.get(key);
      if (!tr) {
        tr = alertRow(a);
        state.alertRows.set(key, tr);
      }
      rows.push(tr);
    }
    for (const key of [...state.alertRows.keys()]) if (!seen.has(key)) state.alertRows.delete(key);
    reconcileChildren($("alert-rows"), rows);
    const empty = $("alerts-empty");
    empty.hidden = rows.length > 0;
    empty.textContent = "No alerts in the last week.";
  }

  // ---------------------------------------------------------------------------------------------
  // URL hash (#device=…&metric=…&range=…) so a reload keeps the view

  function writeHash() {
    const params = new URLSearchParams();
    if (state.selected) params.set("device", state.selected);
    const metric = state.metricExplicit ? state.metric : state.wantedMetric;
    if (state.selected && metric) params.set("metric", metric);
    if (state.rangeMs !== 3600000) params.set("range", String(state.rangeMs));
    const hash = params.toString();
    const url = `${location.pathname}${location.search}${hash ? `#${hash}` : ""}`;
    if (url !== `${location.pathname}${location.search}${location.hash}`) history.replaceState(null, "", url);
  }

  function readHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    const range = Number(params.get("range"));
    const select = $("range-select");
    if ([...select.options].some((o) => Number(o.value) === range)) {
      state.rangeMs = range;
      select.value = String(range);
    }
    const device = params.get("device");
    if (device) selectDevice(device, params.get("metric"));
  }

  // ---------------------------------------------------------------------------------------------
  // start

  const devicesPoller = poller("devices", loadDevices, POLL_DEVICES_MS);
  const dlqPoller = poller("dead-letter queue", loadDlq, POLL_DLQ_MS);
  const alertsPoller = poller("alerts", loadAlerts, POLL_ALERTS_MS);
  const historyPoller = poller("history", loadHistory, POLL_HISTORY_MS);

  async function loadConfig() {
    live.url = defaultLiveUrl();
    try {
      const cfg = await fetchJson("/api/config");
      auth.required = cfg.auth_required === true;
      if (auth.required && !auth.token) showTokenForm("This dashboard needs an access token.");
      if (typeof cfg.live_url === "string" && /^wss?:\/\//i.test(cfg.live_url)) live.url = cfg.live_url;
      else if (cfg.live_url != null) setError("config", `ignoring live_url ${JSON.stringify(cfg.live_url)}`);
    } catch (e) {
      setError("config", `${(e && e.message) || e}; live stream at ${live.url}`);
    }
  }

  function start() {
    const rowsBody = $("device-rows");
    rowsBody.addEventListener("click", (ev) => {
      const tr = ev.target.closest("tr[data-device-id]");
      if (tr) selectDevice(tr.dataset.deviceId);
    });
    rowsBody.addEventListener("keydown", (ev) => {
      if (ev.key !== "Enter" && ev.key !== " ") return;
      const tr = ev.target.closest("tr[data-device-id]");
      if (tr) {
        ev.preventDefault();
        selectDevice(tr.dataset.deviceId);
      }
    });
    for (const id of ["dlq-rows", "alert-rows"]) {
      $(id).addEventListener("click", (ev) => {
        const td = ev.target.closest("td.device-link");
        if (td && td.dataset.deviceId) selectDevice(td.dataset.deviceId);
      });
    }
    $("metric-select").addEventListener("change", (ev) => {
      const metric = ev.target.value;
      if (!metric || metric === state.metric) return;
      state.metric = metric;
      state.metricExplicit = true;
      state.wantedMetric = null;
      onSeriesChanged();
    });
    $("range-select").addEventListener("change", (ev) => {
      const range = Number(ev.target.value);
      if (!Number.isFinite(range) || range <= 0) return;
      state.rangeMs = range;
      writeHash();
      $("history-points").textContent = "0";
      historyPoller.now();
    });
    $("dlq-only-device").addEventListener("change", () => dlqPoller.now());
    $("devices-more").addEventListener("click", () => {
      state.devicePages = Math.min(DEVICES_MAX_PAGES, state.devicePagesLoaded + 1);
      devicesPoller.now();
    });
    $("token-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const token = $("token-input").value.trim();
      if (token) signIn(token);
    });
    if (resizeObserver) {
      resizeObserver.observe($("live-chart"));
      resizeObserver.observe($("history-chart"));
    }

    readHash();
    // The configuration first: it says whether the API needs a token, so a signed-out page asks
    // for one instead of polling into refusals.
    loadConfig().then(() => {
      if (!auth.required || auth.token) {
        devicesPoller.now();
        dlqPoller.now();
        alertsPoller.now();
      }
      connectLive();
    });
    renderLiveStatus();

    setInterval(() => {
      tickDeviceAges();
      renderLiveStatus();
      renderLiveMeta();
    }, 1000);
  }

  start();
})();
