// The arena: one prompt, two anonymous models side by side, a vote, then the names.
"use strict";

const $ = (id) => document.getElementById(id);
let battle = null;

function votes(enabled) { for (const b of document.querySelectorAll(".vote")) b.disabled = !enabled; }

$("arena-form").onsubmit = async (ev) => {
  ev.preventDefault();
  const content = $("arena-prompt").value;
  if (!content.trim()) return;
  battle = null; votes(false);
  $("answer-a").textContent = ""; $("answer-b").textContent = ""; $("reveal").textContent = "Generating…";
  $("arena-send").disabled = true;
  try {
    await postStream("/api/arena/battles", {content}, (event, data) => {
      if (event === "delta") $("answer-" + data.side).textContent += data.text;
      else if (event === "end" && data.identical) {
        $("reveal").textContent = "Both models gave the same answer: there is nothing to vote on. Try another prompt.";
      } else if (event === "end") { battle = data.battle_id; votes(true); $("reveal").textContent = "Which answer is better?"; }
    });
  } catch (e) {
    $("reveal").textContent = "Error: " + e.message;
  } finally {
    $("arena-send").disabled = false;
  }
};

for (const b of document.querySelectorAll(".vote")) {
  b.onclick = async () => {
    if (!battle) return;
    votes(false);
    try {
      const r = await postJSON("/api/arena/battles/" + encodeURIComponent(battle) + "/vote", {winner: b.dataset.winner});
      $("reveal").textContent = "Model A was " + r.model_a + ", model B was " + r.model_b + ".";
      battle = null;
      refreshBoard();
    } catch (e) { $("reveal").textContent = "Error: " + e.message; }
  };
}

async function refreshBoard() {
  const rows = await (await fetch("/api/arena/leaderboard", {credentials: "same-origin"})).json();
  const body = $("leaderboard").querySelector("tbody");
  const enough = parseInt($("leaderboard").dataset.minBattles, 10) || 0;
  body.replaceChildren();
  rows.forEach((r, i) => {
    const tr = el("tr");
    const cells = r.score === null ? ["–", r.model, "no votes yet", "", 0, 0, 0]
      : [i + 1, r.model, r.score.toFixed(0),
         r.battles >= enough ? r.lo.toFixed(0) + " – " + r.hi.toFixed(0) : "after " + enough + " battles",
         r.battles, r.wins, r.ties];
    for (const v of cells)
      tr.appendChild(el("td", "", String(v)));
    body.appendChild(tr);
  });
}
