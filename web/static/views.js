// The views: the city at a glance, a district, a device, an alert, the sinks.
import { el, fmt, age, table } from "./dom.js";
import { api, query, queryRange } from "./api.js";

const SEVERITIES = ["critical", "warning", "info"];

// vitalsByDistrict folds the city_* samples into {district: {name: value}}.
function vitalsByDistrict(samples) {
  const by = new Map();
  for (const s of samples) {
    const d = s.metric.district || "?";
    if (!by.has(d)) by.set(d, { silent: undefined, reporting: undefined });
    const row = by.get(d), v = parseFloat(s.value[1]), name = s.metric.__name__;
    if (/^city_fleet_.+_silent$/.test(name)) row.silent = (row.silent || 0) + v;
    else if (/^city_fleet_.+_reporting$/.test(name)) row.reporting = (row.reporting || 0) + v;
    else row[name] = v;
  }
  return by;
}

function districtOrder(names) {
  return [...names].sort((a, b) => a === "city" ? -1 : b === "city" ? 1 : a.localeCompare(b));
}

function firing(alerts) { return alerts.filter(a => a.state === "firing"); }

function worstSeverity(alerts) {
  for (const s of SEVERITIES) if (alerts.some(a => a.labels.severity === s)) return s;
  return alerts.length ? "info" : "ok";
}

// A vital sign: value, unit and whether it is bad (or absent: no data).
function vital(label, v, digits, unit, bad) {
  const cls = v === undefined ? "nodata" : bad ? "bad" : "ok";
  return el("div", { class: "vital " + cls },
    el("dt", { text: label }),
    el("dd", { text: v === undefined ? "no data" : fmt(v, digits) + (unit ? " " + unit : "") }));
}

function districtCard(d, r, alerts) {
  const sev = worstSeverity(alerts);
  const occ = r.city_parking_occupancy_ratio;
  return el("article", { class: "district " + sev, "aria-label": "district " + d },
    el("h3", {}, el("a", { href: "#/district/" + encodeURIComponent(d), text: d }),
      alerts.length ? el("span", { class: "badge " + sev, text: alerts.length + " firing" }) : null),
    el("dl", {},
      vital("mains pressure min", r.city_pipe_pressure_min, 0, "kPa", false),
      vital("leaks", r.city_pipe_leaks, 0, "", r.city_pipe_leaks > 0),
      vital("power load", r.city_power_load_kw, 0, "kW", false),
      vital("dark junctions", r.city_traffic_light_dark, 0, "", r.city_traffic_light_dark > 0),
      vital("faulted junctions", r.city_traffic_light_faults, 0, "", r.city_traffic_light_faults > 0),
      vital("parking occupancy", occ === undefined ? undefined : 100 * occ, 1, "%", occ >= 0.95),
      vital("silent devices", r.silent, 0, "", r.silent > 0)));
}

function alertActions(a, ctx) {
  if (!a.fingerprint) return null;
  const ack = async () => {
    const by = prompt("Acknowledge as (your name):", sessionStorage.getItem("citypulse-operator") || "");
    if (!by) return;
    sessionStorage.setItem("citypulse-operator", by);
    await act(() => api("/api/v1/acks", { method: "POST", body: { fingerprint: a.fingerprint, startsAt: a.activeAt, by, comment: prompt("Comment:", "") || "" } }), ctx);
  };
  const silence = async () => {
    const by = prompt("Silence for 1 hour, as (your name):", sessionStorage.getItem("citypulse-operator") || "");
    if (!by) return;
    const comment = prompt("Why?", "");
    if (!comment) return;
    sessionStorage.setItem("citypulse-operator", by);
    const matchers = Object.entries(a.labels).filter(([k]) => ["alertname", "device", "district"].includes(k))
      .map(([name, value]) => ({ name, value, isRegex: false, isEqual: true }));
    await act(() => api("/api/v1/silences", { method: "POST", body: { matchers, endsAt: new Date(Date.now() + 3600e3).toISOString(), createdBy: by, comment } }), ctx);
  };
  return el("span", { class: "actions" },
    a.ack ? null : el("button", { type: "button", class: "ack", onclick: ack, text: "Acknowledge" }),
    a.silencedBy ? null : el("button", { type: "button", class: "silence", onclick: silence, text: "Silence 1 h" }));
}

async function act(f, ctx) {
  try { await f(); } catch (e) {
    alert(e.status === 401 || e.status === 403 ? "This needs the operator token." : "Refused: " + e.message);
  }
  ctx.refresh();
}

function alertItem(a, ctx) {
  const l = a.labels;
  return el("li", { class: "alert " + (l.severity || "") },
    a.fingerprint ? el("a", { href: "#/alert/" + encodeURIComponent(a.fingerprint), class: "name", text: l.alertname || "alert" }) :
      el("span", { class: "name", text: l.alertname || "alert" }), // no fingerprint from the server: no view to link to
    " ", el("span", { class: "badge " + (l.severity || ""), text: l.severity || "" }),
    l.district ? el("a", { href: "#/district/" + encodeURIComponent(l.district), text: l.district }) : null,
    l.device ? el("a", { href: "#/device/" + encodeURIComponent(l.device), text: l.device }) : null,
    el("span", { class: "summary", text: (a.annotations && a.annotations.summary) || "" }),
    el("span", { class: "age", text: "for " + age(a.activeAt) }),
    a.ack ? el("span", { class: "badge acked", text: "acknowledged by " + a.ack.by }) : null,
    a.silencedBy ? el("span", { class: "badge silenced", text: "silenced" }) : null,
    alertActions(a, ctx));
}

// alertList shows critical and warning alerts, oldest first within a severity;
// the rest (info) folded away so they cannot push the urgent ones off screen.
function alertList(alerts, ctx, empty) {
  const rank = a => { const i = SEVERITIES.indexOf(a.labels.severity); return i < 0 ? SEVERITIES.length : i; };
  const sorted = [...alerts].sort((a, b) => rank(a) - rank(b) || a.activeAt.localeCompare(b.activeAt));
  if (!sorted.length) return el("p", { class: "empty", text: empty });
  const urgent = sorted.filter(a => rank(a) < 2), other = sorted.filter(a => rank(a) >= 2);
  return el("div", {},
    urgent.length ? el("ul", { class: "alerts" }, urgent.map(a => alertItem(a, ctx))) : el("p", { class: "empty", text: "no critical or warning alert" }),
    other.length ? el("details", { class: "more" }, el("summary", { text: other.length + " other alert" + (other.length > 1 ? "s" : "") + " (info)" }),
      el("ul", { class: "alerts" }, other.map(a => alertItem(a, ctx)))) : null);
}

export function renderCity(main, s, _, ctx) {
  const by = vitalsByDistrict(s.vitals);
  const fire = firing(s.alerts);
  const names = new Set([...by.keys(), ...s.devices.map(d => d.district)]);
  const open = main.querySelector("details.more")?.open; // keep the fold as the operator left it
  main.replaceChildren(el("div", { class: "city" },
    el("section", { "aria-labelledby": "h-districts" }, el("h2", { id: "h-districts", text: "Districts" }),
      s.error ? el("p", { class: "empty", text: "–" }) :
        el("div", { class: "grid" }, districtOrder(names).map(d => districtCard(d, by.get(d) || {}, fire.filter(a => a.labels.district === d))))),
    el("section", { "aria-labelledby": "h-alerts" }, el("h2", { id: "h-alerts", text: "Firing alerts" }),
      s.rulesOff ? el("p", { class: "empty", text: "rules are off" }) : alertList(fire, ctx, s.error ? "–" : "no alert is firing"))));
  if (open) main.querySelector("details.more")?.setAttribute("open", "");
}

export function renderSinks(main, s) {
  main.replaceChildren(el("section", {}, el("h2", { text: "Sinks" }), table("Where readings are stored",
    ["sink", "readings written", "readings/s", "lag (bytes)", "duplicates", "errors", "last error"],
    s.sinks.map(k => el("tr", {},
      el("td", { text: k.name }), el("td", { class: "num", text: fmt(k.readings_written, 0) }),
      el("td", { class: "num", text: fmt(k.readings_per_second, 0) }), el("td", { class: "num", text: fmt(k.lag_bytes, 0) }),
      el("td", { class: "num", text: fmt(k.duplicates ?? 0, 0) }),
      el("td", { class: "num" + (k.errors > 0 ? " bad" : ""), text: fmt(k.errors, 0) }), el("td", { text: k.last_error || "" }))),
    s.error ? "–" : "no sinks")));
}

const RANGES = { "1h": 3600, "6h": 6 * 3600, "24h": 86400, "7d": 7 * 86400 };
const CHARTS = [
  ["city_pipe_pressure_min", "Mains pressure, lowest (kPa)"],
  ["city_power_load_kw", "Power load (kW)"],
  ["city_traffic_light_dark", "Dark junctions"],
  ["city_parking_occupancy_ratio", "Parking occupancy (share)"],
];
let chartKey = "";

export function renderDistrict(main, s, district, ctx) {
  const range = sessionStorage.getItem("citypulse-range") || "6h";
  const key = district + "|" + range;
  let charts = main.querySelector("#charts");
  const fresh = key !== chartKey || !charts;
  const by = vitalsByDistrict(s.vitals);
  const alerts = firing(s.alerts).filter(a => a.labels.district === district);
  const devs = s.devices.filter(d => d.district === district);
  if (fresh) {
    charts = el("div", { id: "charts", class: "charts" });
    chartKey = key;
    drawCharts(charts, district, RANGES[range]);
  }
  main.replaceChildren(
    el("h2", {}, el("a", { href: "#/", text: "City" }), " › ", district),
    districtCard(district, by.get(district) || {}, alerts),
    el("section", {}, el("h3", { text: "Alerts" }), alertList(alerts, ctx, "no alert is firing here")),
    el("section", {}, el("h3", { text: "Trends" }),
      el("div", { class: "ranges", role: "group", "aria-label": "range" }, Object.keys(RANGES).map(r =>
        el("button", { type: "button", "aria-pressed": r === range ? "true" : "false", text: r,
          onclick: () => { sessionStorage.setItem("citypulse-range", r); chartKey = ""; renderDistrict(main, s, district, ctx); } }))),
      charts),
    el("section", {}, el("h3", { text: "Devices" }), table("Devices in " + district, ["device", "kind", "interval"],
      devs.map(d => el("tr", {}, el("td", {}, el("a", { href: "#/device/" + encodeURIComponent(d.id), text: d.id })),
        el("td", { text: d.kind }), el("td", { text: d.interval }))), "no devices")));
}

async function drawCharts(box, district, seconds) {
  const end = Math.floor(Date.now() / 1000), start = end - seconds;
  for (const [name, title] of CHARTS) {
    const fig = el("figure", { class: "chart" }, el("figcaption", { text: title }));
    box.appendChild(fig);
    await drawChart(fig, name + '{district="' + district.replace(/["\\]/g, "") + '"}', start, end);
  }
}

// drawChart draws promql's first series from start to end into fig, with a
// text summary beside the canvas (what a screen reader, or a glance, gets).
async function drawChart(fig, promql, start, end) {
  const step = Math.max(10, Math.round((end - start) / 300));
  try {
    const res = await queryRange(promql, start, end, step);
    const pts = res.length ? res[0].values : [];
    fig.dataset.points = String(pts.length);
    if (!pts.length) { fig.appendChild(el("p", { class: "empty", text: "no data in this range" })); return; }
    const xs = pts.map(p => p[0]), ys = pts.map(p => parseFloat(p[1]));
    const num = v => fmt(v, Number.isInteger(v) ? 0 : 2);
    fig.appendChild(el("p", { class: "summary", text: "latest " + num(ys[ys.length - 1]) + " · lowest " + num(Math.min(...ys)) +
      " · highest " + num(Math.max(...ys)) + " (" + pts.length + (pts.length === 1 ? " point)" : " points)") }));
    const width = Math.min(560, (fig.parentElement && fig.parentElement.clientWidth) || 560);
    // eslint-disable-next-line no-undef
    new uPlot({ width, height: 180, series: [{}, { label: promql, stroke: "#1565c0", width: 2 }],
      scales: { x: { time: true, range: () => [start, end] } }, // the chosen range, however few points it holds
      axes: [{}, { size: 60 }], legend: { show: false } }, [xs, ys], fig);
  } catch (e) {
    fig.appendChild(el("p", { class: "empty", text: "cannot load: " + e.message }));
  }
}

// The green-wave view: each corridor's junctions in driving order with their
// cycle, green share and the offset after the previous junction against the
// travel time at the design speed (GET /api/v1/corridors), and the trend of
// the corridor's worst offset error (city_corridor_offset_error_seconds).
let corridors = null, corridorsErr = null, corridorChartKey = "", corridorsAt = 0;
const CORRIDORS_EVERY_MS = 5000; // the analysis computes every signals.interval (30 s)

export function renderCorridors(main, s, _, ctx) {
  const range = sessionStorage.getItem("citypulse-range") || "6h";
  const prev = main.querySelector("#corridor-charts");
  // drawn again when a corridor's error becomes known (or unknown)
  const key = range + "|" + (corridors || []).map(c => c.name + (c.offset_error_seconds === null ? "?" : "")).join(",");
  const charts = prev && key === corridorChartKey ? prev : null;
  const body = corridorsErr ? el("p", { class: "empty", text: corridorsErr }) :
    corridors === null ? el("p", { class: "empty", text: "loading…" }) :
    corridors.length === 0 ? el("p", { class: "empty", text: "no corridor is configured (signals.file, e.g. configs/corridors.yaml)" }) :
    el("div", {}, corridors.map(c => corridorSection(c, firing(s.alerts).filter(a => a.labels.device === c.name), ctx)));
  const chartBox = charts || el("div", { id: "corridor-charts", class: "charts" });
  main.replaceChildren(
    el("h2", {}, el("a", { href: "#/", text: "City" }), " › green waves"),
    el("p", { class: "note", text: "Offset: the time from the previous junction's green to this one's. " +
      "Error: how far that is from the travel time at the design speed, modulo the cycle (0 is a perfect wave; late is +, early is −)." }),
    body,
    el("section", {}, el("h3", { text: "Worst offset error, trend" }),
      el("div", { class: "ranges", role: "group", "aria-label": "range" }, Object.keys(RANGES).map(r =>
        el("button", { type: "button", "aria-pressed": r === range ? "true" : "false", text: r,
          onclick: () => { sessionStorage.setItem("citypulse-range", r); corridorChartKey = ""; renderCorridors(main, s, _, ctx); } }))),
      chartBox));
  if (!charts && corridors && corridors.length) {
    corridorChartKey = key;
    const end = Math.floor(Date.now() / 1000), start = end - RANGES[range];
    (async () => {
      for (const c of corridors) {
        const fig = el("figure", { class: "chart" }, el("figcaption", { text: c.name + ": worst offset error (s)" }));
        chartBox.appendChild(fig);
        await drawChart(fig, 'city_corridor_offset_error_seconds{corridor="' + c.name.replace(/["\\]/g, "") + '"}', start, end);
      }
    })();
  }
  if (Date.now() - corridorsAt < CORRIDORS_EVERY_MS) return;
  corridorsAt = Date.now();
  api("/api/v1/corridors").then(d => {
    const changed = JSON.stringify(d.corridors) !== JSON.stringify(corridors) || corridorsErr;
    corridors = d.corridors; corridorsErr = null;
    if (changed && main.isConnected && location.hash.startsWith("#/corridors")) ctx.render();
  }).catch(e => {
    const msg = e.status === 404 ? "the green-wave analysis is off (signals.enabled)" : "cannot load: " + e.message;
    if (msg !== corridorsErr) { corridorsErr = msg; if (location.hash.startsWith("#/corridors")) ctx.render(); }
  });
}

const secs = v => v === null || v === undefined ? "no timing" : fmt(v, 0) + " s";
const signed = v => {
  if (v === null || v === undefined) return "–";
  const r = Math.round(v);
  return (r > 0 ? "+" : r < 0 ? "−" : "") + fmt(Math.abs(r), 0) + " s";
};

function corridorSection(c, alerts, ctx) {
  const sev = worstSeverity(alerts);
  const worst = c.offset_error_seconds;
  return el("section", { class: "corridor district " + sev, "aria-labelledby": "corridor-" + c.name },
    el("h3", { id: "corridor-" + c.name }, c.name,
      el("span", { class: "worst" }, "worst error " + (worst === null ? "unknown (a junction has no timing)" : fmt(worst, 0) + " s")),
      alerts.length ? el("span", { class: "badge " + sev, text: alerts.length + " firing" }) : null),
    table(c.name + ": junctions in driving order, design speed " + fmt(c.speed_kmh, 0) + " km/h",
      ["#", "junction", "distance", "travel time", "cycle", "green share", "offset", "error"],
      c.junctions.map((j, i) => el("tr", {},
        el("td", { class: "num", text: String(i + 1) }),
        el("td", {}, el("a", { href: "#/device/" + encodeURIComponent(j.device), text: j.device })),
        el("td", { class: "num", text: i ? fmt(j.distance_m, 0) + " m" : "–" }),
        el("td", { class: "num", text: i ? fmt(j.travel_seconds, 0) + " s" : "–" }),
        el("td", { class: "num" + (j.cycle_seconds === null ? " nodata" : ""), text: secs(j.cycle_seconds) }),
        el("td", { class: "num" + (j.green_ratio === null ? " nodata" : ""), text: j.green_ratio === null ? "no timing" : fmt(100 * j.green_ratio, 0) + " %" }),
        el("td", { class: "num", text: i ? (j.offset_seconds === undefined ? "–" : fmt(j.offset_seconds, 0) + " s") : "–" }),
        el("td", { class: "num", text: i ? signed(j.offset_error_seconds) : "–" }))),
      "no junctions"),
    alerts.length ? alertList(alerts, ctx, "") : null);
}

export function renderDevice(main, s, id, ctx) {
  const d = s.devices.find(x => x.id === id);
  // A refresh keeps what the box shows until the new answer is in (no flicker).
  const prev = main.querySelector("section.readings");
  const box = prev && prev.dataset.device === id ? prev :
    el("section", { class: "readings", "data-device": id }, el("h3", { text: "Last readings" }), el("p", { class: "empty", text: "loading…" }));
  main.replaceChildren(
    el("h2", {}, el("a", { href: "#/", text: "City" }), " › ",
      d ? el("a", { href: "#/district/" + encodeURIComponent(d.district), text: d.district }) : "?", " › ", id),
    d ? el("dl", { class: "facts" }, el("dt", { text: "kind" }), el("dd", { text: d.kind }), el("dt", { text: "interval" }), el("dd", { text: d.interval }),
      d.group ? [el("dt", { text: "group" }), el("dd", { text: d.group })] : null) : el("p", { class: "empty", text: "unknown device" }),
    box,
    el("section", {}, el("h3", { text: "Alerts" }), alertList(firing(s.alerts).filter(a => a.labels.device === id), ctx, "no alert is firing for this device")));
  if (!d) return;
  query('{device="' + id.replace(/["\\]/g, "") + '"}').then(res => {
    const newest = Math.max(0, ...res.map(r => r.value[0]));
    const silentFor = newest ? Date.now() / 1000 - newest : Infinity;
    const interval = parseFloat(d.interval) || 10;
    box.replaceChildren(el("h3", { text: "Last readings" }),
      el("p", { class: silentFor > 3 * interval ? "bad" : "ok", text: newest ? "last reading " + Math.round(silentFor) + " s ago" : "no reading yet" }),
      table("Latest value of each metric", ["metric", "value", "at"], res.map(r => el("tr", {},
        el("td", { text: r.metric.__name__ }), el("td", { class: "num", text: r.value[1] }),
        el("td", { text: new Date(r.value[0] * 1000).toLocaleTimeString("en-GB") }))), "no readings in the last 5 minutes"));
  }).catch(e => box.replaceChildren(el("h3", { text: "Last readings" }), el("p", { class: "empty", text: "cannot load: " + e.message })));
}

// What one history entry says: a transition, or a notification and its result.
function historyWhat(h) {
  if (h.kind === "notification") {
    const res = h.result + (h.attempts > 1 ? " after " + h.attempts + " attempts" : "");
    return "notification of “" + h.event + "” to " + h.receiver + ": " + res + (h.error ? " (" + h.error + ")" : "");
  }
  const words = { pending: "pending: the condition began to hold", firing: "firing", resolved: "resolved",
    repeat: "still firing: notified again", flapping: "flapping: one notice instead of a storm" };
  return (words[h.kind] || h.kind) + (h.summary ? " — " + h.summary : "") +
    (h.silencedBy ? " (silenced: no notification sent; silence " + h.silencedBy + ")" : "");
}

function historyClass(h) {
  if (h.kind === "notification") return { delivered: "ok", retrying: "warn", refused: "bad", dead: "bad" }[h.result] || "";
  return { firing: "bad", flapping: "warn", resolved: "ok" }[h.kind] || "";
}

function historyTable(h) {
  return table("Transitions and notifications, oldest first", ["at", "what"],
    h.entries.map(e => el("tr", { class: "hist " + historyClass(e) },
      el("td", {}, el("time", { datetime: e.at, text: new Date(e.at).toLocaleString("en-GB") })),
      el("td", { text: historyWhat(e) }))), "no history");
}

// silenceNote says who silenced an alert, until when and why.
function silenceNote(s, a) {
  const sl = a && a.silencedBy && s.silences.find(x => x.id === a.silencedBy);
  if (!sl) return null;
  return el("p", { class: "note" }, "Silenced by " + sl.createdBy + " until " + new Date(sl.endsAt).toLocaleString("en-GB") + ": " + sl.comment);
}

function ackNote(a) {
  if (!a || !a.ack) return null;
  return el("p", { class: "note" }, "Acknowledged by " + a.ack.by + (a.ack.at ? " at " + new Date(a.ack.at).toLocaleString("en-GB") : "") +
    (a.ack.comment ? ": " + a.ack.comment : ""));
}

const histories = new Map(); // fingerprint → the last history fetched (no flicker on refresh)
const historyAt = new Map(); // fingerprint → when it was last asked for
const HISTORY_EVERY_MS = 2000;

export function renderAlert(main, s, fp, ctx) {
  const a = s.alerts.find(x => x.fingerprint === fp);
  const known = histories.get(fp);
  const labels = a ? a.labels : known && known.labels;
  const hist = el("section", { class: "history", "data-fingerprint": fp }, el("h3", { text: "History" }),
    known ? historyTable(known) : el("p", { class: "empty", text: "loading…" }));
  main.replaceChildren(el("h2", {}, el("a", { href: "#/", text: "City" }), " › alert"),
    a ? el("ul", { class: "alerts" }, alertItem(a, ctx)) :
      el("p", { class: "empty", text: "this alert is not pending or firing now" + (known ? "; its history is below" : "") }),
    a ? el("p", { class: "state" }, a.state + " since " + new Date(a.activeAt).toLocaleString("en-GB")) : null,
    ackNote(a), silenceNote(s, a),
    labels ? el("dl", { class: "facts" }, Object.entries(labels).map(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })])) : null,
    hist);
  if (Date.now() - (historyAt.get(fp) || 0) < HISTORY_EVERY_MS) return;
  historyAt.set(fp, Date.now());
  if (historyAt.size > 50) historyAt.delete(historyAt.keys().next().value);
  api("/api/v1/alerts/" + encodeURIComponent(fp) + "/history").then(h => {
    const before = histories.get(fp);
    histories.set(fp, h);
    if (histories.size > 50) histories.delete(histories.keys().next().value);
    if ((!before || JSON.stringify(before) !== JSON.stringify(h)) && hist.isConnected) ctx.render();
  }).catch(e => {
    if (!hist.isConnected) return;
    hist.replaceChildren(el("h3", { text: "History" }), el("p", { class: "empty",
      text: e.status === 404 ? "no history kept for this alert: " + e.message : "cannot load: " + e.message }));
  });
}
