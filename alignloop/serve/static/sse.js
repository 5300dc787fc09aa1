// POST JSON and read the answer's server-sent events (EventSource cannot POST).
// Every POST carries the session's CSRF token (from the page's <meta name="csrf-token">).
"use strict";

function jsonHeaders() {
  const meta = document.querySelector('meta[name="csrf-token"]');
  return {"Content-Type": "application/json", "X-CSRF-Token": meta ? meta.content : ""};
}

async function postJSON(url, body) {
  const r = await fetch(url, {method: "POST", headers: jsonHeaders(),
                              body: JSON.stringify(body), credentials: "same-origin"});
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((data.error && data.error.message) || ("HTTP " + r.status));
  return data;
}

async function postStream(url, body, onEvent) {
  const r = await fetch(url, {method: "POST", headers: jsonHeaders(),
                              body: JSON.stringify(body), credentials: "same-origin"});
  if (!r.ok) {
    const data = await r.json().catch(() => ({}));
    throw new Error((data.error && data.error.message) || ("HTTP " + r.status));
  }
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buf += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const frame = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      let event = "message", data = "";
      for (const line of frame.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      const payload = JSON.parse(data);
      if (event === "error") throw new Error(payload.message);
      onEvent(event, payload);
    }
  }
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
