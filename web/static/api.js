// The HTTP API as the page uses it: the token the user gave travels in the
// Authorization header only (never in a URL the server could log).

const KEY = "citypulse-token";

// A token passed as #token=… moves to sessionStorage and leaves the address bar.
export function takeTokenFromFragment() {
  const m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  if (m) {
    sessionStorage.setItem(KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
}

export function token() { return sessionStorage.getItem(KEY) || ""; }
export function setToken(t) { if (t) sessionStorage.setItem(KEY, t); else sessionStorage.removeItem(KEY); }

export class APIError extends Error {
  constructor(status, text) { super(text); this.status = status; }
}

export function headers(extra) {
  const h = Object.assign({}, extra);
  if (token()) h["Authorization"] = "Bearer " + token();
  return h;
}

// api fetches a JSON envelope ({status, data}) and returns data.
export async function api(path, opts = {}) {
  const init = { cache: "no-store", method: opts.method || "GET", headers: headers(opts.body ? { "Content-Type": "application/json" } : {}) };
  if (opts.body) init.body = JSON.stringify(opts.body);
  const resp = await fetch(path, init);
  const text = await resp.text();
  let body;
  try { body = JSON.parse(text); } catch { body = null; }
  if (!resp.ok || !body || body.status !== "success") {
    throw new APIError(resp.status, (body && body.error) || text.trim() || resp.statusText);
  }
  return body.data;
}

export function query(promql) {
  return api("/api/v1/query?query=" + encodeURIComponent(promql)).then(d => d.result);
}

export function queryRange(promql, start, end, step) {
  const q = new URLSearchParams({ query: promql, start: String(start), end: String(end), step: String(step) });
  return api("/api/v1/query_range?" + q).then(d => d.result);
}
