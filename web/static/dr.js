// The disaster-recovery view (#/dr): this site's role and fence epoch, the
// link to the other site, and each mirror's lag in messages and seconds
// against the RPO budget, from the "dr" part of GET /api/v1/cluster. It
// polls every DR_EVERY_MS while shown, so a cut link shows within seconds.
import { api } from "./api.js";
import { el, fmt, table } from "./dom.js";

const DR_EVERY_MS = 2000;
let dr = null, drErr = null, drAt = 0, drTimer = null;

const shown = () => location.hash.startsWith("#/dr");

function poll(main, ctx) {
  drAt = Date.now();
  api("/api/v1/cluster").then(d => {
    const next = d.dr || null;
    const msg = next ? null : "this node has no standby site configured (cluster.standby.enabled)";
    const changed = JSON.stringify(next) !== JSON.stringify(dr) || msg !== drErr;
    dr = next; drErr = msg;
    if (changed && main.isConnected && shown()) ctx.render();
  }).catch(e => {
    const msg = e.status === 404 ? "cluster mode is off on this node: there is no standby site" : "cannot load: " + e.message;
    if (msg !== drErr) { drErr = msg; if (shown()) ctx.render(); }
  });
}

// schedule keeps polling while the view is shown, and stops when it is left.
function schedule(main, ctx) {
  clearTimeout(drTimer);
  drTimer = setTimeout(() => { if (shown()) { poll(main, ctx); schedule(main, ctx); } }, DR_EVERY_MS);
}

const roleText = r => r === "active" ? "active: acknowledges devices and notifies" :
  r === "standby" ? "standby: fenced, mirrors the active site" :
  r === "conflict" ? "conflict: both sites claim this epoch; neither acknowledges" : r;

export function renderDR(main, s, _, ctx) {
  if (Date.now() - drAt >= DR_EVERY_MS) poll(main, ctx);
  schedule(main, ctx);
  const head = el("h2", {}, el("a", { href: "#/", text: "City" }), " › disaster recovery");
  if (drErr || dr === null) {
    main.replaceChildren(head, el("p", { class: "empty", id: "dr-state", text: drErr || "loading…" }));
    return;
  }
  const budget = dr.rpo_budget_seconds;
  const mirrors = (dr.streams || []).filter(m => m.mirror);
  const linkUp = dr.peer_reachable && mirrors.every(m => m.link_up);
  const over = m => m.error || m.seconds_behind > budget;
  main.replaceChildren(head,
    el("dl", { class: "facts dr" },
      el("dt", { text: "site" }), el("dd", { id: "dr-site", text: dr.site }),
      el("dt", { text: "role" }), el("dd", { id: "dr-role", class: "role " + dr.role, text: roleText(dr.role) }),
      el("dt", { text: "active site" }), el("dd", { id: "dr-active", text: dr.active_site || "none yet" }),
      el("dt", { text: "fence epoch" }), el("dd", { id: "dr-epoch", text: String(dr.epoch) }),
      el("dt", { text: "link to the other site" }),
      el("dd", { id: "dr-link", class: linkUp ? "ok" : "bad", text: linkUp ? "up" : "down" }),
      el("dt", { text: "recovery point" }),
      el("dd", { id: "dr-rpo", class: dr.within_rpo ? "ok" : "bad",
        text: (dr.within_rpo ? "within" : "OVER") + " the budget of " + fmt(budget, 0) + " s" })),
    mirrors.length === 0 ? el("p", { class: "note", text: dr.role === "active" ?
      "This site is active: it mirrors nothing. The standby site shows the lag." : "No mirror yet." }) :
    table("Mirrors of the active site's streams: what this site would lack if the active site were lost now",
      ["stream", "lag (messages)", "behind (s)", "budget (s)", "last contact", "link"],
      mirrors.map(m => el("tr", { class: "mirror" + (over(m) ? " over" : ""), "data-stream": m.stream },
        el("td", {}, m.stream, m.error ? el("span", { class: "badge critical", text: "error" }) : null),
        el("td", { class: "num lag", text: fmt(m.lag_messages, 0) }),
        el("td", { class: "num behind" + (over(m) ? " bad" : ""), text: fmt(m.seconds_behind, 1) }),
        el("td", { class: "num", text: fmt(budget, 0) }),
        el("td", { class: "num", text: fmt(m.last_contact_seconds, 1) + " s ago" }),
        el("td", { class: "link " + (m.link_up ? "ok" : "bad"), text: m.link_up ? "up" : "down" }))),
      "no mirror"));
}
