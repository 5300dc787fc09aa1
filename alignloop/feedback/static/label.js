// Ranking by drag and by keys (no library; served by the app itself, no inline script under the CSP).
// The list's order is the ranking, best first; hidden inputs `order` (display positions) and `ties`
// (groups of positions, "p,p;p,p") are what the form submits.
"use strict";
(function () {
  const list = document.getElementById("ranking");
  if (!list) return;
  const form = document.getElementById("rank-form");
  const cards = () => Array.from(list.querySelectorAll("li.answer"));

  function sync() {
    const all = cards();
    document.getElementById("order").value = all.map(c => c.dataset.pos).join(",");
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
    });
    document.getElementById("ties").value = groups.map(g => g.join(",")).join(";");
  }

  function move(card, delta) {
    const all = cards(), i = all.indexOf(card), j = i + delta;
    if (j < 0 || j >= all.length) return;
    if (delta < 0) list.insertBefore(card, all[j]);
    else list.insertBefore(card, all[j].nextSibling);
    sync();
    card.focus();
  }

  // Drag: moving down drops below the target, moving up drops above it.
  let dragged = null;
  list.addEventListener("dragstart", e => {
    dragged = e.target.closest("li.answer");
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
    if (!card.matches || !card.matches("li.answer")) return;
    const all = cards(), i = all.indexOf(card);
    if ((e.key === "ArrowUp" || e.key === "ArrowDown") && e.shiftKey) {
      move(card, e.key === "ArrowUp" ? -1 : 1);
    } else if (e.key === "ArrowUp" && i > 0) {
      all[i - 1].focus();
    } else if (e.key === "ArrowDown" && i < all.length - 1) {
      all[i + 1].focus();
    } else if ((e.key === "t" || e.key === "T") && i > 0) {
      const box = card.querySelector(".tie-box");
      box.checked = !box.checked;
      sync();
    } else {
      return;
    }
    e.preventDefault();
  });
  // Number keys pick the answer at that place, anywhere on the page except in a text field.
  document.addEventListener("keydown", e => {
    if (e.altKey || e.ctrlKey || e.metaKey || /^(INPUT|TEXTAREA|SELECT)$/.test(e.target.tagName)) return;
    const n = parseInt(e.key, 10), all = cards();
    if (n >= 1 && n <= all.length) {
      all[n - 1].focus();
      e.preventDefault();
    }
  });
  list.addEventListener("change", e => {
    if (e.target.classList.contains("tie-box")) sync();
  });

  // "Correct this answer": copy its text into the correction box.
  list.addEventListener("click", e => {
    const btn = e.target.closest(".correct-btn");
    if (!btn) return;
    const card = btn.closest("li.answer");
    document.getElementById("correct_p").value = btn.dataset.pos;
    const box = document.getElementById("correction");
    box.value = card.querySelector(".answer-text").textContent;
    box.focus();
  });

  form.addEventListener("submit", e => {
    const rated = Array.from(form.querySelectorAll("select.rating")).filter(s => s.value !== "").length;
    const total = form.querySelectorAll("select.rating").length;
    const cp = document.getElementById("correct_p").value, ct = document.getElementById("correction").value.trim();
    let problem = "";
    if (rated !== 0 && rated !== total) problem = "Rate every answer on helpful, truthful and harmless, or none.";
    else if (cp !== "" && !ct) problem = "Write the corrected answer, or choose no answer to correct.";
    else if (cp === "" && ct) problem = "Choose which answer your correction replaces.";
    const box = document.getElementById("client-error");
    if (problem) {
      e.preventDefault();
      box.textContent = problem;
      box.hidden = false;
    }
    sync();
  });
  sync();
})();
