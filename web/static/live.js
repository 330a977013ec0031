// A server-sent-events stream read with fetch, so the token travels in the
// Authorization header (EventSource cannot send one). It reconnects by itself
// with a growing pause, and reports every sign of life to onBeat.

import { headers } from "./api.js";

const sleep = ms => new Promise(r => setTimeout(r, ms));

// connect reads path until stop() is called. onEvent(name, data) gets each
// event; onState(state) gets "open", "closed", "refused" or "unavailable" (the
// server has no stream: the page polls instead); onBeat() any sign of life.
export function connect(path, { onEvent, onState, onBeat }) {
  let stopped = false, backoff = 1000, abort = null;
  async function once() {
    abort = new AbortController();
    const resp = await fetch(path, { headers: headers({ Accept: "text/event-stream" }), cache: "no-store", signal: abort.signal });
    if (resp.status === 404) return "unavailable";
    if (resp.status === 401 || resp.status === 403) return "refused";
    if (!resp.ok) return "closed";
    onState("open");
    backoff = 1000;
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "", name = "", data = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return "closed";
      buf += value;
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, i).replace(/\r$/, "");
        buf = buf.slice(i + 1);
        onBeat();
        if (line === "") {
          if (data.length) onEvent(name || "message", data.join("\n"));
          name = ""; data = [];
        } else if (!line.startsWith(":")) {
          const c = line.indexOf(":");
          const field = c < 0 ? line : line.slice(0, c);
          const v = c < 0 ? "" : line.slice(c + 1).replace(/^ /, "");
          if (field === "event") name = v;
          else if (field === "data") data.push(v);
        }
      }
    }
  }
  (async () => {
    while (!stopped) {
      let state = "closed";
      try { state = await once(); } catch { state = "closed"; }
      if (stopped) return;
      onState(state);
      if (state === "unavailable") return;
      await sleep(backoff);
      backoff = Math.min(backoff * 2, 15000);
    }
  })();
  return () => { stopped = true; if (abort) abort.abort(); };
}
