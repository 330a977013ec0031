// Small DOM helpers: everything from the API is set as text, never parsed as HTML.

export function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    e.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
  }
  return e;
}

export function fmt(v, digits) {
  if (v === undefined || v === null || Number.isNaN(v)) return "no data";
  return v.toLocaleString("en", { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

export function age(iso) {
  const s = Math.max(0, (Date.now() - new Date(iso).getTime()) / 1000);
  if (s < 60) return Math.round(s) + " s";
  if (s < 3600) return Math.round(s / 60) + " min";
  if (s < 86400) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " d";
}

export function table(caption, head, rows, empty) {
  const t = el("table", {}, el("caption", { text: caption }),
    el("thead", {}, el("tr", {}, head.map(h => el("th", { scope: "col", text: h })))));
  const body = el("tbody");
  if (rows.length === 0) body.appendChild(el("tr", {}, el("td", { class: "empty", colspan: head.length, text: empty })));
  for (const r of rows) body.appendChild(r);
  t.appendChild(body);
  return t;
}
