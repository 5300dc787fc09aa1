// The chat page: a conversation is a tree (regenerate and edit make siblings); the page shows one path.
"use strict";

const state = {id: null, msgs: {}, kids: {}, pick: {}, busy: false};
const $ = (id) => document.getElementById(id);

function setStatus(text) { $("status").textContent = text; }

function addMessage(m) {
  state.msgs[m.id] = m;
  const key = m.parent_id || "";
  (state.kids[key] = state.kids[key] || []).includes(m.id) || state.kids[key].push(m.id);
  state.pick[key] = state.kids[key].indexOf(m.id);  // a new message is the one shown
}

function path() {
  const out = [];
  let key = "";
  while (state.kids[key] && state.kids[key].length) {
    const kids = state.kids[key];
    const i = Math.min(state.pick[key] ?? kids.length - 1, kids.length - 1);
    out.push(state.msgs[kids[i]]);
    key = kids[i];
  }
  return out;
}

function render() {
  const box = $("messages");
  box.replaceChildren();
  for (const m of path()) box.appendChild(bubble(m));
  box.scrollTop = box.scrollHeight;
}

function bubble(m) {
  const div = el("div", "msg " + m.role);
  div.dataset.id = m.id;
  const head = el("div", "who", m.role === "user" ? "You" : (m.model || "assistant"));
  div.appendChild(head);
  div.appendChild(el("div", "text", m.content));
  const tools = el("div", "tools");
  const key = m.parent_id || "";
  const kids = state.kids[key] || [];
  if (kids.length > 1) {
    const i = kids.indexOf(m.id);
    const nav = el("span", "sibling-nav");
    const prev = el("button", "prev", "‹"); prev.type = "button"; prev.disabled = i === 0;
    const next = el("button", "next", "›"); next.type = "button"; next.disabled = i === kids.length - 1;
    prev.onclick = () => { state.pick[key] = i - 1; render(); };
    next.onclick = () => { state.pick[key] = i + 1; render(); };
    nav.append(prev, el("span", "pos", (i + 1) + "/" + kids.length), next);
    tools.appendChild(nav);
  }
  if (m.role === "user") {
    const edit = el("button", "edit", "Edit"); edit.type = "button";
    edit.onclick = () => startEdit(div, m);
    tools.appendChild(edit);
    if (!state.busy && !(state.kids[m.id] || []).length) {  // an answer failed or was cut off: ask again
      const retry = el("button", "regen", "Answer"); retry.type = "button";
      retry.onclick = () => regenerate(m);
      tools.appendChild(retry);
    }
  } else {
    const regen = el("button", "regen", "Regenerate"); regen.type = "button";
    regen.onclick = () => regenerate(m);
    const up = el("button", "thumb thumb-up", "▲ Good"); up.type = "button"; up.title = "Good answer";
    const down = el("button", "thumb thumb-down", "▼ Bad"); down.type = "button"; down.title = "Bad answer";
    const fb = m.feedback;
    if (fb) (fb.rating === "up" ? up : down).classList.add("on");
    up.onclick = () => askReason(div, m, "up");
    down.onclick = () => askReason(div, m, "down");
    tools.append(regen, up, down);
    if (fb) tools.appendChild(el("span", "rated", fb.reason ? "Reason: " + fb.reason : "Thanks!"));
  }
  div.appendChild(tools);
  return div;
}

function askReason(div, m, rating) {
  div.querySelector(".feedback-form")?.remove();
  const form = el("form", "feedback-form");
  const input = el("input", "reason");
  input.placeholder = rating === "down" ? "What was wrong? (optional)" : "What was good? (optional)";
  input.maxLength = 2000;
  const ok = el("button", "submit-reason", "Submit"); ok.type = "submit";
  form.append(input, ok);
  form.onsubmit = async (ev) => {
    ev.preventDefault();
    try {
      const r = await postJSON("/api/messages/" + encodeURIComponent(m.id) + "/feedback",
                               {rating, reason: input.value});
      m.feedback = {rating: r.rating, reason: r.reason};
      render();
      setStatus("Feedback saved");
    } catch (e) { setStatus(e.message); }
  };
  div.appendChild(form);
  input.focus();
}

function startEdit(div, m) {
  if (state.busy) return;
  const form = el("form", "edit-form");
  const area = el("textarea", "edit-text"); area.value = m.content; area.rows = 3;
  const ok = el("button", "resend", "Send"); ok.type = "submit";
  const cancel = el("button", "cancel", "Cancel"); cancel.type = "button";
  cancel.onclick = render;
  form.append(area, ok, cancel);
  form.onsubmit = (ev) => { ev.preventDefault(); if (area.value.trim()) send(area.value, m.parent_id); };
  div.querySelector(".text").replaceWith(form);
  area.focus();
}

function streamingBubble(model) {
  const div = el("div", "msg assistant streaming");
  div.appendChild(el("div", "who", model));
  const text = el("div", "text", "");
  div.appendChild(text);
  $("messages").appendChild(div);
  return text;
}

async function run(url, body, model) {
  state.busy = true; $("send").disabled = true; setStatus("Generating…");
  let text = null, failed = null;
  try {
    await postStream(url, body, (event, data) => {
      if (event === "meta") {
        if (data.conversation_id !== state.id) { state.id = data.conversation_id; loadList(); }
        if (data.user_message) { addMessage(data.user_message); render(); }
        text = streamingBubble(model);
      } else if (event === "delta") {
        text.textContent += data.text;
        $("messages").scrollTop = $("messages").scrollHeight;
      } else if (event === "done") {
        addMessage(data.message);
        render();
      }
    });
    setStatus("");
  } catch (e) {
    failed = e;
  } finally {
    state.busy = false; $("send").disabled = false;
  }
  if (failed) { render(); setStatus("Error: " + failed.message); }
}

function send(content, parentId) {
  const model = $("model").value;
  return run("/api/chat/send", {model, content, conversation_id: state.id, parent_id: parentId}, model);
}

function regenerate(m) {
  if (state.busy) return;
  const model = $("model").value;
  return run("/api/chat/regenerate", {message_id: m.id, model}, model);
}

async function loadList() {
  const r = await fetch("/api/conversations", {credentials: "same-origin"});
  const list = $("conversations");
  list.replaceChildren();
  for (const c of await r.json()) {
    const li = el("li");
    const a = el("a", c.id === state.id ? "here" : "", c.title || "(untitled)");
    a.href = "#" + c.id;
    a.onclick = (ev) => { ev.preventDefault(); openConversation(c.id); };
    li.appendChild(a);
    list.appendChild(li);
  }
}

async function openConversation(id) {
  const r = await fetch("/api/conversations/" + encodeURIComponent(id), {credentials: "same-origin"});
  if (!r.ok) return;
  const conv = await r.json();
  Object.assign(state, {id: conv.id, msgs: {}, kids: {}, pick: {}});
  for (const m of conv.messages) addMessage(m);
  if ([...$("model").options].some((o) => o.value === conv.model)) $("model").value = conv.model;
  render(); loadList();
}

$("composer").onsubmit = (ev) => {
  ev.preventDefault();
  const content = $("prompt").value;
  if (!content.trim() || state.busy) return;
  $("prompt").value = "";
  const p = path();
  send(content, p.length ? p[p.length - 1].id : null);
};
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
});
$("new-chat").onclick = () => { Object.assign(state, {id: null, msgs: {}, kids: {}, pick: {}}); render(); loadList(); sidebar(false); };
// On a narrow screen the conversation list is a panel over the thread, opened by "Chats" and closed
// once a conversation is picked (on a wide screen it is always there and the button is hidden).
function sidebar(open) {
  document.querySelector("main.chat").classList.toggle("sidebar-open", open);
  $("toggle-sidebar").setAttribute("aria-expanded", String(open));
}
$("toggle-sidebar").onclick = () => sidebar(!document.querySelector("main.chat").classList.contains("sidebar-open"));
$("conversations").addEventListener("click", (ev) => { if (ev.target.closest("a")) sidebar(false); });
loadList();
