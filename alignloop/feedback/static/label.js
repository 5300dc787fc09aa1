// The ranking screen: drag, keys and up/down buttons (no library; served by the app itself, no inline
// script under the CSP). The list's order is the ranking, best first; hidden inputs `order` (display
// positions) and `ties` (groups of positions, "p,p;p,p") are what the form submits, with `elapsed_ms`
// (the time from the page's load to the submission).
"use strict";
(function () {
  const list = document.getElementById("ranking");
  if (!list) return;
  const form = document.getElementById("rank-form");
  const cards = () => Array.from(list.querySelectorAll("li.answer"));
  const $ = id => document.getElementById(id);
  const typing = el => /^(INPUT|TEXTAREA|SELECT)$/.test(el.tagName);

  // Touch screens get no keyboard hints (CSS hides them for a coarse pointer too; this also covers
  // browsers that report a touch screen but a fine pointer).
  if (window.matchMedia("(hover: none)").matches && navigator.maxTouchPoints > 0)
    document.documentElement.classList.add("touch");

  function sync() {
    const all = cards();
    $("order").value = all.map(c => c.dataset.pos).join(",");
    const groups = [];
    let rank = 0;
    all.forEach((c, i) => {
      const box = c.querySelector(".tie-box");
      box.disabled = i === 0;
      if (i === 0) box.checked = false;
      const tied = i > 0 && box.checked;
      if (tied) {
        const last = groups[groups.length - 1];
        if (last && last.includes(all[i - 1].dataset.pos)) last.push(c.dataset.pos);
        else groups.push([all[i - 1].dataset.pos, c.dataset.pos]);
      } else {
        rank = i + 1;
      }
      c.querySelector(".rank").textContent = (tied ? "= " : "") + "#" + rank;
      c.querySelector(".move.up").disabled = i === 0;
      c.querySelector(".move.down").disabled = i === all.length - 1;
    });
    $("ties").value = groups.map(g => g.join(",")).join(";");
  }

  function move(card, delta, keepFocus) {
    const all = cards(), i = all.indexOf(card), j = i + delta;
    if (j < 0 || j >= all.length) return;
    if (delta < 0) list.insertBefore(card, all[j]);
    else list.insertBefore(card, all[j].nextSibling);
    sync();
    if (!keepFocus) card.focus();
  }

  // Enter: "this is the best of the answers not yet placed": the card moves to just below the last
  // placed one and is marked placed; focus goes to the first answer not placed. K−1 presses (plus a
  // number key for each answer not already in focus) rank K answers.
  function place(card) {
    const placed = cards().filter(c => c.classList.contains("placed") && c !== card);
    const after = placed.length ? placed[placed.length - 1].nextSibling : list.firstElementChild;
    list.insertBefore(card, after);
    card.classList.add("placed");
    const rest = cards().filter(c => !c.classList.contains("placed"));
    if (rest.length === 1) rest[0].classList.add("placed");  // the last place is settled too
    sync();
    (rest.length > 1 ? rest[0] : card).focus();
  }

  // Long answers are clamped to a few lines; "Show all" (or E) opens one.
  function measure() {
    for (const c of cards()) {
      const t = c.querySelector(".answer-text");
      if (!c.classList.contains("open")) c.classList.toggle("long", t.scrollHeight > t.clientHeight + 1);
    }
  }
  function expand(card) {
    const open = card.classList.toggle("open");
    const btn = card.querySelector(".expand");
    btn.textContent = open ? "Show less" : "Show all";
    btn.setAttribute("aria-expanded", String(open));
  }

  // Drag: moving down drops below the target, moving up drops above it.
  let dragged = null;
  list.addEventListener("dragstart", e => {
    dragged = e.target.closest && e.target.closest("li.answer");
    if (!dragged) return;
    dragged.classList.add("dragging");
    e.dataTransfer.effectAllowed = "move";
    e.dataTransfer.setData("text/plain", dragged.dataset.pos);
  });
  list.addEventListener("dragover", e => {
    if (dragged && e.target.closest("li.answer")) e.preventDefault();
  });
  list.addEventListener("drop", e => {
    const target = e.target.closest("li.answer");
    if (!dragged || !target || target === dragged) return;
    e.preventDefault();
    const all = cards();
    if (all.indexOf(dragged) < all.indexOf(target)) list.insertBefore(dragged, target.nextSibling);
    else list.insertBefore(dragged, target);
    sync();
  });
  list.addEventListener("dragend", () => {
    if (dragged) dragged.classList.remove("dragging");
    dragged = null;
  });

  // Keys on a focused answer (not while typing in one of its fields).
  list.addEventListener("keydown", e => {
    const card = e.target;
    if (!card.matches || !card.matches("li.answer") || e.altKey || e.ctrlKey || e.metaKey) return;
    const all = cards(), i = all.indexOf(card), key = e.key.toLowerCase();
    if ((e.key === "ArrowUp" || e.key === "ArrowDown") && e.shiftKey) {
      move(card, e.key === "ArrowUp" ? -1 : 1);
    } else if (e.key === "ArrowUp" && i > 0) {
      all[i - 1].focus();
    } else if (e.key === "ArrowDown" && i < all.length - 1) {
      all[i + 1].focus();
    } else if (e.key === "Enter") {
      place(card);
    } else if (key === "t" && i > 0) {
      const box = card.querySelector(".tie-box");
      box.checked = !box.checked;
      sync();
    } else if (key === "e" && card.classList.contains("long")) {
      expand(card);
    } else if (key === "r") {
      card.querySelector("select.rating").focus();
    } else if (key === "f") {
      card.querySelector(".flags input").focus();
    } else {
      return;
    }
    e.preventDefault();
  });

  // Keys anywhere on the page: Ctrl+Enter submits (in text fields too); Esc leaves a field of an
  // answer for the answer; outside text fields, number keys pick the answer at that place, N the
  // next answer, S the skip reason.
  document.addEventListener("keydown", e => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      form.requestSubmit();
      return;
    }
    if (e.key === "Escape" && typing(e.target) && e.target.closest("li.answer")) {
      e.target.closest("li.answer").focus();
      return;
    }
    if (e.altKey || e.ctrlKey || e.metaKey || typing(e.target)) return;
    const n = parseInt(e.key, 10), all = cards(), key = e.key.toLowerCase();
    if (n >= 1 && n <= all.length) {
      all[n - 1].focus();
    } else if (key === "n") {
      const at = all.indexOf(document.activeElement.closest ? document.activeElement.closest("li.answer") : null);
      all[(at + 1) % all.length].focus();
    } else if (key === "s" && $("skip-reason")) {
      $("skip-reason").focus();
    } else {
      return;
    }
    e.preventDefault();
  });
  list.addEventListener("change", e => {
    if (e.target.classList.contains("tie-box")) sync();
  });

  list.addEventListener("click", e => {
    const btn = e.target.closest("button");
    if (!btn) return;
    const card = btn.closest("li.answer");
    if (btn.classList.contains("move")) {  // tap reordering: the button keeps focus for the next tap
      move(card, btn.classList.contains("up") ? -1 : 1, true);
      if (btn.disabled) card.focus();
    } else if (btn.classList.contains("expand")) {
      expand(card);
    } else if (btn.classList.contains("correct-btn")) {  // copy the answer into the correction box
      $("correct_p").value = btn.dataset.pos;
      const box = $("correction");
      box.value = card.querySelector(".answer-text").textContent;
      box.focus();
    }
  });

  // What the page can check before the server does; an error shown goes away as soon as it is fixed.
  function problem() {
    const cp = $("correct_p").value, ct = $("correction").value.trim();
    if (cp !== "" && !ct) return "Write the corrected answer, or choose no answer to correct.";
    if (cp === "" && ct) return "Choose which answer your correction replaces.";
    const original = cp === "" ? null : list.querySelector(`li.answer[data-pos="${cp}"] .answer-text`);
    if (original && original.textContent.trim() === ct) return "Edit the corrected answer, or choose no answer to correct.";
    return "";
  }
  function recheck() {
    const box = $("client-error");
    if (!box.hidden && !problem()) box.hidden = true;
    const server = $("error");  // the server's error for this form: the user is changing what it was about
    if (server && !problem()) server.hidden = true;
  }
  form.addEventListener("input", recheck);
  form.addEventListener("change", recheck);

  const before = parseInt(form.dataset.elapsedBefore || "0", 10) || 0;
  form.addEventListener("submit", e => {
    const p = problem(), box = $("client-error");
    if (p) {
      e.preventDefault();
      box.textContent = p;
      box.hidden = false;
      return;
    }
    sync();
    // ms since this page's navigation started, plus the time spent before an error sent the page back
    $("elapsed_ms").value = String(Math.round(before + performance.now()));
  });

  sync();
  measure();
  window.addEventListener("resize", measure);
  if (!$("error")) cards()[0].focus({preventScroll: true});
})();

// Settling an item (reviewers) and marking gold (admins): the same moves as the ranking screen on a
// short list; the typed ranking fields ("2 1=3 4") follow the list once it is touched, and can still
// be typed by hand.
(function () {
  const list = document.getElementById("settle-order");
  if (!list) return;
  const rows = () => Array.from(list.querySelectorAll("li.settle-answer"));

  function sync(write) {
    let text = "";
    rows().forEach((li, i) => {
      const box = li.querySelector(".tie-box");
      box.disabled = i === 0;
      if (i === 0) box.checked = false;
      text += (i === 0 ? "" : box.checked ? "=" : " ") + li.dataset.n;
      li.querySelector(".move.up").disabled = i === 0;
      li.querySelector(".move.down").disabled = i === rows().length - 1;
    });
    if (write)  // not on load: an untouched list must not settle the item in the order it came
      for (const input of document.querySelectorAll("#resolve-form input[name=ranking], #gold-form input[name=ranking]"))
        input.value = text;
  }
  function move(li, delta) {
    const all = rows(), j = all.indexOf(li) + delta;
    if (j < 0 || j >= all.length) return;
    list.insertBefore(li, delta < 0 ? all[j] : all[j].nextSibling);
    sync(true);
  }
  list.addEventListener("click", e => {
    const btn = e.target.closest("button.move");
    if (btn) move(btn.closest("li"), btn.classList.contains("up") ? -1 : 1);
  });
  list.addEventListener("keydown", e => {
    if (!e.target.matches("li.settle-answer") || !e.shiftKey || !/^Arrow(Up|Down)$/.test(e.key)) return;
    move(e.target, e.key === "ArrowUp" ? -1 : 1);
    e.target.focus();
    e.preventDefault();
  });
  list.addEventListener("change", () => sync(true));
  sync(false);
})();
