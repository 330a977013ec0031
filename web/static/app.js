// CityPulse dashboard: reads the HTTP API with the token the user gives and
// renders with textContent only (nothing from the API is parsed as HTML).
"use strict";

const REFRESH_MS = 5000;
const VITALS = 'city_pipe_pressure_min|city_pipe_leaks|city_power_load_kw|city_traffic_light_dark|city_parking_occupancy_ratio|city_fleet_.+_silent';

// A token passed as #token=… (kept out of server logs: fragments are never
// sent) moves to sessionStorage and leaves the address bar.
(function takeTokenFromFragment() {
  const m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  if (m) {
    sessionStorage.setItem("citypulse-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
})();

function token() { return sessionStorage.getItem("citypulse-token") || ""; }

class APIError extends Error {
  constructor(status, text) { super(text); this.status = status; }
}

async function api(path) {
  const headers = {};
  if (token()) headers["Authorization"] = "Bearer " + token();
  const resp = await fetch(path, { headers, cache: "no-store" });
  if (!resp.ok) throw new APIError(resp.status, (await resp.text()).trim());
  const body = await resp.json();
  if (body.status !== "success") throw new APIError(resp.status, body.error || "API error");
  return body.data;
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function fill(id, rows, empty, cols) {
  const tbody = document.querySelector("#" + id + " tbody");
  tbody.replaceChildren(...rows);
  if (rows.length === 0) {
    const tr = document.createElement("tr");
    const td = cell(tr, empty, "empty");
    td.colSpan = cols;
    tbody.appendChild(tr);
  }
}

function fmt(v, digits) {
  if (v === undefined || Number.isNaN(v)) return "–";
  return v.toLocaleString("en", { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

function renderVitals(samples, firingDistricts) {
  const by = new Map();
  for (const s of samples) {
    const d = s.metric.district || "?";
    if (!by.has(d)) by.set(d, { silent: 0 });
    const row = by.get(d), v = parseFloat(s.value[1]), name = s.metric.__name__;
    if (/^city_fleet_.+_silent$/.test(name)) row.silent += v; else row[name] = v;
  }
  const names = [...by.keys()].sort((a, b) => a === "city" ? -1 : b === "city" ? 1 : a.localeCompare(b));
  const rows = names.map(d => {
    const r = by.get(d), tr = document.createElement("tr");
    if (d === "city") tr.className = "city";
    cell(tr, d, firingDistricts.has(d) ? "bad" : "");
    cell(tr, fmt(r.city_pipe_pressure_min, 0), "num");
    cell(tr, fmt(r.city_pipe_leaks, 0), "num" + (r.city_pipe_leaks > 0 ? " bad" : ""));
    cell(tr, fmt(r.city_power_load_kw, 0), "num");
    cell(tr, fmt(r.city_traffic_light_dark, 0), "num" + (r.city_traffic_light_dark > 0 ? " bad" : ""));
    cell(tr, r.city_parking_occupancy_ratio === undefined ? "–" : fmt(100 * r.city_parking_occupancy_ratio, 1) + " %", "num");
    cell(tr, fmt(r.silent, 0), "num" + (r.silent > 0 ? " bad" : ""));
    return tr;
  });
  fill("vitals", rows, "no vital signs yet (they are computed every vitals.interval)", 7);
}

function renderAlerts(alerts) {
  const firing = alerts.filter(a => a.state === "firing").sort((a, b) => b.activeAt.localeCompare(a.activeAt));
  const rows = firing.map(a => {
    const tr = document.createElement("tr");
    tr.className = a.labels.severity || "";
    cell(tr, a.labels.alertname || "");
    cell(tr, a.labels.severity || "");
    cell(tr, a.labels.district || "");
    cell(tr, a.labels.device || "");
    cell(tr, (a.annotations && a.annotations.summary) || "");
    cell(tr, new Date(a.activeAt).toLocaleTimeString("en-GB"));
    return tr;
  });
  fill("alerts", rows, "no alert is firing", 6);
  return new Set(firing.map(a => a.labels.district).filter(Boolean));
}

function renderSinks(sinks) {
  const rows = sinks.map(s => {
    const tr = document.createElement("tr");
    cell(tr, s.name);
    cell(tr, fmt(s.readings_written, 0), "num");
    cell(tr, fmt(s.readings_per_second, 0), "num");
    cell(tr, fmt(s.lag_bytes, 0), "num");
    cell(tr, fmt(s.errors, 0), "num" + (s.errors > 0 ? " bad" : ""));
    cell(tr, s.last_error || "");
    return tr;
  });
  fill("sinks", rows, "no sinks", 6);
}

function setStatus(text, error) {
  const st = document.getElementById("status");
  st.textContent = text;
  st.className = error ? "error" : "";
}

function clearAll() {
  fill("alerts", [], "–", 6);
  fill("vitals", [], "–", 7);
  fill("sinks", [], "–", 6);
}

async function refresh() {
  try {
    const [alerts, vitals, sinks] = await Promise.all([
      api("/api/v1/alerts").then(d => d.alerts).catch(e => {
        if (e.status === 404) return []; // rules are off
        throw e;
      }),
      api("/api/v1/query?query=" + encodeURIComponent('{__name__=~"' + VITALS + '"}')).then(d => d.result),
      api("/api/v1/sinks"),
    ]);
    const firingDistricts = renderAlerts(alerts);
    renderVitals(vitals, firingDistricts);
    renderSinks(sinks);
    setStatus("updated " + new Date().toLocaleTimeString("en-GB"), false);
  } catch (e) {
    clearAll();
    if (e.status === 401) setStatus(token() ? "token refused: enter a valid read token" : "this dashboard needs a read token", true);
    else if (e.status === 403) setStatus("token refused for this data", true);
    else setStatus("cannot reach the API: " + e.message, true);
  }
}

document.getElementById("token-form").addEventListener("submit", ev => {
  ev.preventDefault();
  const input = document.getElementById("token");
  sessionStorage.setItem("citypulse-token", input.value.trim());
  input.value = "";
  refresh();
});
document.getElementById("forget").addEventListener("click", () => {
  sessionStorage.removeItem("citypulse-token");
  refresh();
});

refresh();
setInterval(refresh, REFRESH_MS);
