// CityPulse operations screen: the city at a glance, drill-down views, and
// acting on alerts. Data comes from the token-guarded API; the live stream
// (/api/v1/events) pushes changes, and the page polls as a fallback.
import { takeTokenFromFragment, token, setToken, api, query, APIError } from "./api.js";
import { connect } from "./live.js";
import { renderCity, renderSinks, renderDistrict, renderDevice, renderAlert, renderCorridors } from "./views.js";
import { renderDR } from "./dr.js";

const VITALS = 'city_(pipe_pressure_min|pipe_leaks|power_load_kw|traffic_light_dark|traffic_light_faults|parking_occupancy_ratio|fleet_.+_silent|fleet_.+_reporting)';
const POLL_LIVE_MS = 15000, POLL_MS = 5000, STALE_MS = 20000;

// state is what the views render; refresh fills it.
export const state = { alerts: [], vitals: [], sinks: [], devices: [], silences: [], error: null, updated: 0, rulesOff: false };

let lastBeat = 0, liveState = "connecting", stopLive = null, refreshTimer = null;

async function optional(p, fallback) {
  try { return await p; } catch (e) { if (e.status === 404) return fallback; throw e; }
}

async function refresh() {
  try {
    const [alerts, vitals, sinks, devices, silences] = await Promise.all([
      optional(api("/api/v1/alerts").then(d => d.alerts), null),
      query('{__name__=~"' + VITALS + '"}'),
      api("/api/v1/sinks"),
      api("/api/v1/devices"),
      optional(api("/api/v1/silences"), []),
    ]);
    Object.assign(state, { alerts: alerts || [], rulesOff: alerts === null, vitals, sinks, devices, silences: silences || [], error: null, updated: Date.now() });
    if (liveState !== "open") lastBeat = Date.now();
  } catch (e) {
    Object.assign(state, { alerts: [], vitals: [], sinks: [], devices: [], silences: [], error: e });
  }
  render();
}

function scheduleRefresh(ms) {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => { refresh().finally(() => scheduleRefresh(liveState === "open" ? POLL_LIVE_MS : POLL_MS)); }, ms);
}

// setText changes an element's text only when it differs, so a live region
// announces a change once, not every refresh.
function setText(id, text) {
  const e = document.getElementById(id);
  if (e.textContent !== text) e.textContent = text;
}

// The status says when the data was fetched, or why there is none. Only the
// words are a live region (announced when they change); the time is not.
function setStatus() {
  const e = state.error;
  document.getElementById("status").className = e ? "error" : "";
  if (!e) {
    setText("status-msg", "updated");
    const at = new Date(state.updated);
    document.getElementById("status-at").dateTime = at.toISOString();
    setText("status-at", at.toLocaleTimeString("en-GB"));
    return;
  }
  setText("status-at", "");
  if (e.status === 401) setText("status-msg", token() ? "token refused: enter a valid read token" : "this dashboard needs a read token");
  else if (e.status === 403) setText("status-msg", "token refused for this data");
  else setText("status-msg", "cannot reach the API: " + e.message);
}

// The live indicator turns red when nothing has arrived for STALE_MS. Its
// mode is a live region; the seconds counting up beside it are not (a screen
// reader would otherwise read them out every second).
function paintLive() {
  const quiet = Date.now() - lastBeat;
  const mode = liveState === "open" ? "live" : liveState === "unavailable" ? "polling" : "reconnecting";
  const fresh = lastBeat && quiet <= STALE_MS;
  document.getElementById("live").className = fresh ? "live ok" : "live stale";
  if (fresh) {
    setText("live-mode", mode);
    setText("live-age", "· last update " + Math.round(quiet / 1000) + " s ago");
  } else {
    setText("live-mode", lastBeat ? "stale (" + mode + ")" : mode + "…");
    setText("live-age", lastBeat ? "· no update for " + Math.round(quiet / 1000) + " s" : "");
  }
}

function startLive() {
  if (stopLive) stopLive();
  stopLive = connect("/api/v1/events", {
    onBeat: () => {
      const was = lastBeat;
      lastBeat = Date.now();
      if (!was || lastBeat - was > STALE_MS) paintLive(); // turn green at the first sign of life, not at the next repaint
    },
    onState: s => { liveState = s; paintLive(); if (s === "open") scheduleRefresh(0); },
    onEvent: (name, data) => {
      try {
        if (name === "vitals") { mergeVitals(JSON.parse(data)); render(); }
        else if (name === "health") { state.sinks = JSON.parse(data).sinks || state.sinks; render(); }
        else scheduleRefresh(200); // an alert transition: fetch the new picture
      } catch { /* a malformed event changes nothing */ }
    },
  });
}

// mergeVitals takes a vitals event ({samples: [{name, district, value, at}]}) into state.
function mergeVitals(ev) {
  const by = new Map(state.vitals.map(s => [s.metric.__name__ + "|" + s.metric.district, s]));
  for (const s of ev.samples || []) {
    by.set(s.name + "|" + s.district, { metric: { __name__: s.name, district: s.district }, value: [s.at, String(s.value)] });
  }
  state.vitals = [...by.values()];
  state.updated = Date.now();
}

function route() {
  const h = location.hash.replace(/^#\/?/, "");
  const [view, ...rest] = h.split("/");
  return { view: view || "city", arg: decodeURIComponent(rest.join("/")) };
}

function render() {
  setStatus();
  paintLive(); // at once, not up to a second after the data arrived
  const main = document.getElementById("view");
  const r = route();
  const views = { city: renderCity, sinks: renderSinks, district: renderDistrict, device: renderDevice, alert: renderAlert, corridors: renderCorridors, dr: renderDR };
  const focus = focusKey(main);
  (views[r.view] || renderCity)(main, state, r.arg, { refresh, render });
  restoreFocus(main, focus);
}

// A re-render replaces the view's nodes: keep the keyboard focus on the
// control that had it (same element, link target and text), so live updates
// never throw a keyboard user back to the top.
function focusKey(main) {
  const f = document.activeElement;
  if (!f || f === main || !main.contains(f)) return null;
  return { tag: f.tagName, href: f.getAttribute("href"), text: f.textContent };
}

function restoreFocus(main, key) {
  if (!key) return;
  for (const n of main.querySelectorAll(key.tag)) {
    if (n.getAttribute("href") === key.href && n.textContent === key.text) { n.focus(); return; }
  }
}

document.getElementById("token-form").addEventListener("submit", ev => {
  ev.preventDefault();
  const input = document.getElementById("token");
  setToken(input.value.trim());
  input.value = "";
  refresh();
  startLive();
});
document.getElementById("forget").addEventListener("click", () => { setToken(""); refresh(); startLive(); });
window.addEventListener("hashchange", () => { render(); document.getElementById("view").focus(); });

takeTokenFromFragment();
refresh().finally(() => scheduleRefresh(POLL_MS));
startLive();
setInterval(paintLive, 1000);
export { APIError };
