#!/usr/bin/env node
// End-to-end check of the telemetry dashboard in Debian's Chromium, driven by playwright-core.
//
//   node tests/browser/dashboard.mjs --url http://127.0.0.1:PORT/ --device DEVICE_ID \
//        --screenshot /path/to/file.png [--timeout-seconds 60] [--chromium /usr/bin/chromium]
//
// It only observes the browser: something else (the Rust integration test) publishes valid and
// malformed events for DEVICE_ID while it runs. Steps, in order:
//   (s) with --token TOKEN, the sign-in form shows and no device is listed; the token is entered;
//   (a) the device row for DEVICE_ID appears in the device table; while it does not and the
//       "More devices" control shows, that is clicked (the next page of /api/devices); with
//       --expect-more-devices it must have been, and no device may be listed twice;
//   (b) after a click on it the row is selected, live-status says "live" and live-points reaches 3;
//   (c) history-points is at least 1 (the history chart got data);
//   (d) a DLQ row with data-code="invalid_json" appears;
//   (f) with --expect-alert RULE, an alert row of that rule for DEVICE_ID appears, firing;
// then a full-page screenshot is saved. With --expect-reconnect, after the screenshot:
//   (e) the live view shows "disconnected..." (the caller stops the bridge), then "live" again
//       with new live points (the caller starts it again). Console errors and uncaught page errors fail the run
// (except Chromium's "WebSocket connection to ... failed" lines while the dashboard reconnects).
// --timeout-seconds bounds the whole run (all steps together). Exit code: 0 passed, 1 failed,
// 2 bad arguments. On failure a screenshot is still saved, next to the given path as
// NAME.failure.png.
import { existsSync } from "node:fs";
import { mkdir } from "node:fs/promises";
import { dirname } from "node:path";
import { chromium } from "playwright-core";

const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
const MIN_LIVE_POINTS = 3;

function usage(message) {
  if (message) console.error(`dashboard.mjs: ${message}`);
  console.error(
    "usage: node tests/browser/dashboard.mjs --url URL --device DEVICE_ID --screenshot FILE.png " +
      "[--timeout-seconds 60] [--chromium /usr/bin/chromium] [--expect-reconnect] [--expect-alert RULE] " +
        "[--token TOKEN] [--expect-more-devices]",
  );
  process.exit(2);
}

function parseArgs(argv) {
  const opts = { timeoutSeconds: 60, chromium: "/usr/bin/chromium", expectReconnect: false, expectMoreDevices: false };
  const names = {
    "--url": "url",
    "--device": "device",
    "--screenshot": "screenshot",
    "--timeout-seconds": "timeoutSeconds",
    "--chromium": "chromium",
    "--expect-alert": "expectAlert",
    "--token": "token",
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "-h" || arg === "--help") usage();
    if (arg === "--expect-reconnect") {
      opts.expectReconnect = true;
      continue;
    }
    if (arg === "--expect-more-devices") {
      opts.expectMoreDevices = true;
      continue;
    }
    let [name, value] = arg.includes("=") ? [arg.slice(0, arg.indexOf("=")), arg.slice(arg.indexOf("=") + 1)] : [arg, undefined];
    if (!(name in names)) usage(`unknown argument ${arg}`);
    if (value === undefined) {
      if (i + 1 >= argv.length) usage(`${name} needs a value`);
      value = argv[++i];
    }
    opts[names[name]] = value;
  }
  if (!opts.url) usage("--url is required");
  if (!opts.device) usage("--device is required");
  if (!opts.screenshot) usage("--screenshot is required");
  opts.timeoutSeconds = Number(opts.timeoutSeconds);
  if (!Number.isFinite(opts.timeoutSeconds) || opts.timeoutSeconds <= 0) usage("--timeout-seconds must be a positive number");
  if (!existsSync(opts.chromium)) usage(`no Chromium at ${opts.chromium} (apt-get install -y chromium)`);
  return opts;
}

class StepFailure extends Error {}

const opts = parseArgs(process.argv.slice(2));
const started = Date.now();
const deadline = started + opts.timeoutSeconds * 1000;
const elapsed = () => `${((Date.now() - started) / 1000).toFixed(1)} s`;

const browserErrors = []; // fatal: console errors and page errors
const consoleLog = []; // everything, for the failure report
let ignoredWsErrors = 0;

function isReconnectNoise(text) {
  // Chromium logs every failed WebSocket handshake (e.g. connection refused while the bridge
  // restarts) as a console error; the dashboard handles it by reconnecting.
  return /^WebSocket connection to '[^']*' failed/.test(text);
}

function checkBrowserErrors(step) {
  if (browserErrors.length) {
    const where = step ? `during step ${step}, ` : "";
    throw new StepFailure(`${where}the page logged ${browserErrors.length} error(s):\n  ${browserErrors.join("\n  ")}`);
  }
}

// Polls `probe` (run in the page) until `done(value)` or the deadline; `describe(value)` tells
// what was last seen when it gives up.
async function waitFor(page, step, what, probe, arg, done, describe) {
  let last;
  for (;;) {
    checkBrowserErrors(step);
    last = await page.evaluate(probe, arg);
    if (done(last)) return last;
    if (Date.now() > deadline) {
      throw new StepFailure(
        `step ${step}: timed out after ${opts.timeoutSeconds} s waiting for ${what}; last seen: ${describe(last)}`,
      );
    }
    await new Promise((r) => setTimeout(r, 250));
  }
}

function pageState() {
  const text = (id) => {
    const el = document.querySelector(`[data-testid="${id}"]`);
    return el ? el.textContent.trim() : null;
  };
  const banner = document.querySelector('[data-testid="error-banner"]');
  return {
    liveStatus: text("live-status"),
    livePoints: Number(text("live-points")),
    historyPoints: Number(text("history-points")),
    deviceRows: [...document.querySelectorAll('[data-testid="device-row"]')].map((r) => r.dataset.deviceId),
    moreDevices: !(document.querySelector('[data-testid="devices-more"]') || { hidden: true }).hidden,
    selected: [...document.querySelectorAll('[data-testid="device-row"].selected')].map((r) => r.dataset.deviceId),
    dlqCodes: [...document.querySelectorAll('[data-testid="dlq-row"]')].map((r) => r.dataset.code),
    alerts: [...document.querySelectorAll('[data-testid="alert-row"]')].map((r) => ({
      rule: r.dataset.rule,
      status: r.dataset.status,
      device: r.dataset.deviceId,
    })),
    metric: (document.querySelector('[data-testid="metric-select"]') || {}).value,
    errorBanner: banner && !banner.hidden ? banner.textContent.trim() : null,
    tokenForm: !document.querySelector('[data-testid="token-form"]').hidden,
  };
}

const summary = (s) =>
  JSON.stringify({
    live_status: s.liveStatus,
    live_points: s.livePoints,
    history_points: s.historyPoints,
    metric: s.metric,
    selected: s.selected,
    device_rows: s.deviceRows.slice(0, 20),
    dlq_codes: [...new Set(s.dlqCodes)],
    alerts: s.alerts.slice(0, 10),
    error_banner: s.errorBanner,
  });

function failurePath(path) {
  return /\.png$/i.test(path) ? path.replace(/\.png$/i, ".failure.png") : `${path}.failure.png`;
}

async function main() {
  let browser;
  let page;
  const hardStop = setTimeout(() => {
    console.error(`FAIL: the whole run took longer than ${opts.timeoutSeconds + 60} s (hung browser?)`);
    process.exit(1);
  }, (opts.timeoutSeconds + 60) * 1000);
  try {
    browser = await chromium.launch({
      executablePath: opts.chromium,
      headless: true,
      args: CHROMIUM_ARGS,
      timeout: 30000,
    });
    const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    page = await context.newPage();
    page.on("console", (msg) => {
      const text = msg.text();
      consoleLog.push(`[${msg.type()}] ${text}`);
      if (msg.type() !== "error") return;
      if (isReconnectNoise(text)) {
        ignoredWsErrors++;
        return;
      }
      browserErrors.push(`console error: ${text}`);
    });
    page.on("pageerror", (err) => {
      browserErrors.push(`page error: ${(err && err.stack) || err}`);
      consoleLog.push(`[pageerror] ${err}`);
    });
    page.on("crash", () => browserErrors.push("page crashed"));

    let response;
    try {
      response = await page.goto(opts.url, { waitUntil: "load", timeout: Math.max(1000, deadline - Date.now()) });
    } catch (e) {
      throw new StepFailure(`could not load ${opts.url}: ${String((e && e.message) || e).split("\n")[0]}`);
    }
    if (!response || !response.ok()) {
      throw new StepFailure(`could not load ${opts.url}: HTTP ${response ? response.status() : "no response"}`);
    }

    // (s) signed out: the page asks for a token and lists nothing; then sign in
    if (opts.token) {
      const before = await waitFor(page, "s", "the sign-in form", pageState, null, (s) => s.tokenForm, summary);
      if (before.deviceRows.length) throw new StepFailure(`step s: devices listed before signing in: ${summary(before)}`);
      await page.fill('[data-testid="token-input"]', opts.token);
      await page.press('[data-testid="token-input"]', "Enter");
      await waitFor(page, "s", "the sign-in form to go away", pageState, null, (s) => !s.tokenForm, summary);
      console.log(`ok s: asked for a token, signed in (${elapsed()})`);
    }

    // (a) the device row appears, after loading further pages of devices if it is not on the first
    const device = opts.device;
    let morePages = 0;
    let a;
    for (;;) {
      a = await waitFor(
        page,
        "a",
        `the device row for ${device} (or a "More devices" control)`,
        pageState,
        null,
        (s) => s.deviceRows.includes(device) || s.moreDevices,
        summary,
      );
      if (a.deviceRows.includes(device)) break;
      const before = a.deviceRows.length;
      await page.click('[data-testid="devices-more"]', { timeout: Math.max(1000, deadline - Date.now()) });
      morePages++;
      await waitFor(
        page,
        "a",
        `more device rows than ${before} after "More devices"`,
        pageState,
        null,
        (s) => s.deviceRows.length > before,
        summary,
      );
    }
    if (new Set(a.deviceRows).size !== a.deviceRows.length) {
      throw new StepFailure(`step a: a device is listed twice: ${summary(a)}`);
    }
    if (opts.expectMoreDevices && morePages === 0) {
      throw new StepFailure(`step a: ${device} was on the first page of devices, expected it on a later one`);
    }
    console.log(
      `ok a: device row for ${device} appeared among ${a.deviceRows.length} devices, ${morePages} further page(s) loaded (${elapsed()})`,
    );

    // (b) select it: live status, live points
    const row = page.locator(`tr[data-testid="device-row"][data-device-id=${JSON.stringify(device)}]`);
    await row.click({ timeout: Math.max(1000, deadline - Date.now()) });
    await waitFor(page, "b", `${device} to be selected after the click`, pageState, null, (s) => s.selected.includes(device), summary);
    const b = await waitFor(
      page,
      "b",
      `live-status "live" and live-points >= ${MIN_LIVE_POINTS}`,
      pageState,
      null,
      (s) => s.liveStatus === "live" && s.livePoints >= MIN_LIVE_POINTS,
      summary,
    );
    console.log(`ok b: ${device} selected, live-status "live", ${b.livePoints} live points of ${b.metric} (${elapsed()})`);

    // (c) history chart got data
    const c = await waitFor(
      page,
      "c",
      "history-points >= 1",
      pageState,
      null,
      (s) => s.historyPoints >= 1,
      summary,
    );
    console.log(`ok c: history chart has ${c.historyPoints} points of ${c.metric} (${elapsed()})`);

    // (d) an invalid_json record in the DLQ panel
    const d = await waitFor(
      page,
      "d",
      'a DLQ row with data-code="invalid_json"',
      pageState,
      null,
      (s) => s.dlqCodes.includes("invalid_json"),
      summary,
    );
    console.log(`ok d: DLQ panel shows invalid_json (${d.dlqCodes.length} rows) (${elapsed()})`);

    // (f) the alert the rejections raise, in the alerts panel
    if (opts.expectAlert) {
      const f = await waitFor(
        page,
        "f",
        `a firing alert row of rule ${opts.expectAlert} for ${opts.device}`,
        pageState,
        null,
        (s) =>
          s.alerts.some((a) => a.rule === opts.expectAlert && a.device === opts.device && a.status === "firing"),
        summary,
      );
      console.log(`ok f: alerts panel shows ${opts.expectAlert} firing (${f.alerts.length} rows) (${elapsed()})`);
    }

    // let both charts draw the latest data, then the screenshot
    await page.waitForTimeout(500);
    checkBrowserErrors("screenshot");
    await mkdir(dirname(opts.screenshot), { recursive: true });
    await page.screenshot({ path: opts.screenshot, fullPage: true });
    checkBrowserErrors("screenshot");
    const tail = ignoredWsErrors ? `; ignored ${ignoredWsErrors} WebSocket reconnect error(s)` : "";
    console.log(`ok screenshot: ${opts.screenshot} (${elapsed()}${tail})`);

    // (e) the bridge goes away and comes back: the live view says so, reconnects by itself and
    // receives points again.
    if (opts.expectReconnect) {
      const e1 = await waitFor(
        page,
        "e",
        'live-status to say "disconnected..." (the bridge stopped)',
        pageState,
        null,
        (s) => (s.liveStatus || "").startsWith("disconnected"),
        summary,
      );
      console.log(`ok e1: the live view shows "${e1.liveStatus}" (${elapsed()})`);
      const e2 = await waitFor(
        page,
        "e",
        'live-status "live" again and new live points',
        pageState,
        null,
        (s) => s.liveStatus === "live" && s.livePoints > e1.livePoints,
        summary,
      );
      console.log(`ok e2: reconnected, live points ${e1.livePoints} -> ${e2.livePoints} (${elapsed()})`);
    }
    return 0;
  } catch (e) {
    const message = e instanceof StepFailure ? e.message : `unexpected error: ${(e && e.stack) || e}`;
    console.error(`FAIL: ${message}`);
    if (page) {
      const shot = failurePath(opts.screenshot);
      try {
        await mkdir(dirname(shot), { recursive: true });
        await page.screenshot({ path: shot, fullPage: true, timeout: 5000 });
        console.error(`failure screenshot: ${shot}`);
      } catch (_) {
        // the page may be gone
      }
    }
    if (consoleLog.length) console.error(`browser console (last 20 lines):\n  ${consoleLog.slice(-20).join("\n  ")}`);
    return 1;
  } finally {
    clearTimeout(hardStop);
    if (browser) await browser.close().catch(() => {});
  }
}

process.exitCode = await main();
