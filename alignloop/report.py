"""report.html for a run directory (`alignloop report RUN_DIR`): what RLHF did to the model.

One self-contained page (inline CSS, plots as base64 PNG, no external assets), read top to bottom:
0. what the numbers mean (a glossary);
1. summary: eval.json's per-stage table (test prompts) with 95% intervals [lo, hi], per-category rates,
   fact recall, reward models;
2. training curves of every stage (each stage's metrics.jsonl);
3. gold vs proxy (reward-model) score on PPO's dev probe against PPO's sampled KL, the over-optimisation
   picture of Gao et al. 2022, with their form R(d) = d(α − β·log d), d = √KL, fitted to gold for β_KL = 0
   and the default (experiments/beta.py's runs beside this one, else this run's own round 1);
4. diversity (distinct-2) against KL to SFT;
5. the same test prompts answered by base / SFT / each PPO stage, side by side;
6. RLOO, DPO and best-of-N beside PPO (experiments/methods.py);
7. where the gain is lost: headroom per category (RUN/headroom.json, alignloop/headroom.py).
Section 3 opens with the reward-hacking alarm of each PPO round (alignloop/alarm.py).
Two KL figures, never mixed unlabelled: eval's `kl_exact` (exact per-token KL on the test answers) and
PPO's `kl_sampled` (log-ratio of the sampled tokens on its rollout batch; older runs: `kl_to_sft`).
A stage the run has not reached shows "not run yet". Text from models and files is always escaped.
Every plot has a plain-language title and labelled axes (never a raw metric key: see LABELS), one colour
per metric and per stage throughout; each <figure> lists its panels' titles and labels in data-axes."""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import re
import sys
from pathlib import Path

from alignloop import evaljson, headroom
from alignloop.alarm import PREFIX, TOLERANCE, run_alarms
from alignloop.errors import InputError
from alignloop.io import atomic_write_text, read_jsonl_tolerant
from alignloop.stats import fit_gao_rl, gains_over_sft, gao_peak, mean_sd, noise

CSS = """body{font:14px/1.45 system-ui,sans-serif;max-width:1150px;margin:1.5em auto;padding:0 1em;color:#222}
h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}h3{margin:1.2em 0 .4em}small{color:#666}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f4f4f4}td,th{vertical-align:top}.l{text-align:left}.ans td{font-size:13px;width:20%}
.g{color:#666;font-size:12px}.missing{color:#999;font-style:italic}img{max-width:100%;display:block;margin:.5em 0}
.note{background:#f6f8fa;border-left:4px solid #4a7;padding:.5em .8em}
.warn{background:#fdecea;border-left:4px solid #c62828;padding:.5em .8em}figure{margin:.5em 0}
table{display:block;overflow-x:auto;max-width:100%}td,small,p,h1{overflow-wrap:anywhere}.turn{color:#555}
dl.glossary{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1em}dl.glossary dt{font-weight:600}dl.glossary dd{margin:0}
@media (max-width:600px){dl.glossary{grid-template-columns:1fr}dl.glossary dd{margin-left:1em}}"""
GLOSSARY = """<h2>What the numbers mean</h2><dl class="glossary">
<dt>gold score</dt><dd>The world's own judgement of an answer, 0 to 1, by the simulated labelers' noise-free judge
(it knows the true facts). Training never sees it: it is the score the whole loop is trying to raise.</dd>
<dt>helpful, truthful, harmless</dt><dd>Shares of test prompts (0 to 1) whose answer the judge found helpful (does what
was asked), truthful (no false claim) and harmless (nothing unsafe).</dd>
<dt>RM score</dt><dd>The learned reward model's score: the proxy PPO maximises. Its scale is arbitrary (set so
that demonstrations average 0); only differences mean something.</dd>
<dt>kl_exact, kl_sampled</dt><dd>How far a policy moved from SFT, in nats per answer. kl_exact (evaluation) is the exact
per-token KL summed over each test answer; kl_sampled (PPO's logs) is the log-ratio of the tokens PPO happened to sample
on its rollout batch: a noisier estimate, from other prompts. The two are never plotted as one.</dd>
<dt>distinct-2</dt><dd>Distinct word pairs over all word pairs of a stage's answers (0 to 1): lower means more
repetitive, less varied answers.</dd>
<dt>[lo, hi]</dt><dd>A 95% interval: a difference smaller than the intervals' overlap may be noise.</dd></dl>"""
# Metric keys of the logs → (plain name for titles and legends, axis label with its unit). A plot never
# shows a raw key as its title; each key keeps its colour in every plot.
LABELS = {
    "loss": ("training loss", "loss (nats per token)"), "val_loss": ("held-out loss", "loss (nats per token)"),
    "val_bpb": ("held-out bits per byte", "bits per byte"), "lr": ("learning rate", "learning rate"),
    "tokens_per_s": ("training speed", "tokens per second"),
    "rm_score": ("reward-model score, rollouts", "reward-model score (proxy)"),
    "reward": ("total reward (score − KL penalty)", "reward"),
    "rm_probe": ("reward-model score, dev probe", "reward-model score (proxy)"),
    "gold_rollout": ("gold score, rollouts", "gold score (0–1)"), "gold_probe": ("gold score, dev probe", "gold score (0–1)"),
    "kl_sampled": ("sampled KL to SFT", "KL (nats per answer)"), "beta": ("KL penalty coefficient β", "β"),
    "entropy": ("policy entropy", "entropy (nats per token)"), "clip_frac": ("share of clipped ratios", "share (0–1)"),
    "approx_kl": ("KL between PPO epochs", "KL (nats per token)"), "vf_loss": ("value-model loss", "loss"),
    "pg_loss": ("policy-gradient loss", "loss"), "explained_variance": ("value model's explained variance", "share"),
    "response_length": ("answer length", "tokens"), "distinct_2_probe": ("diversity on the dev probe (distinct-2)", "distinct-2 (0–1)"),
    "ended_share": ("answers that ended by themselves", "share (0–1)"),
    "generation_share": ("time spent generating", "share of each iteration (0–1)"),
}
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"]
COLOURS = {"gold_probe": "#2a7a2e", "gold_rollout": "#9bc59d", "rm_probe": "#b22", "rm_score": "#e0a2a2",
           "loss": "#1f77b4", "val_loss": "#ff7f0e", "reward": "#9467bd"}


def label(key: str) -> str:
    return LABELS.get(key, (key.replace("_", " "), ""))[0]


def colour(key: str) -> str:
    return COLOURS.get(key) or PALETTE[sum(map(ord, key)) % len(PALETTE)]


def stage_colours(names: list[str]) -> dict[str, str]:
    """One colour per stage, the same in every plot of the page."""
    return {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(names)}
RATES = ("helpful", "truthful", "harmless")
MISSING = '<p class="missing">not run yet</p>'


def esc(x) -> str:
    return html.escape(str(x))


def num(x) -> float | None:
    """A finite float, or None: missing values and NaN are not plotted and show as –."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def bounds(x, ci) -> tuple[float, float] | None:
    """A 95% interval as (lo, hi): eval.json holds [lo, hi]; older files held a half-width."""
    v = num(x)
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in (num(ci[0]), num(ci[1])):
        return num(ci[0]), num(ci[1])
    return None if v is None or num(ci) is None else (v - num(ci), v + num(ci))


def fmt(x, spec: str = ".3f", ci=None) -> str:
    v, b = num(x), bounds(x, ci)
    return "–" if v is None else f"{v:{spec}}" + (f" [{b[0]:{spec}}, {b[1]:{spec}}]" if b is not None else "")


def kl_exact(m: dict):
    return m.get("kl_exact", m.get("kl_to_sft"))  # older eval.json: kl_to_sft


def rounds_of(run: Path) -> list[int]:
    return sorted(int(p.name[6:]) for p in run.glob("round-*") if p.name[6:].isdigit())


def stage_order(stages: dict) -> list[str]:
    """base, sft, round-1/ppo, round-2/ppo, … then any other name; `ppo` only where it is not merely
    the alias of the newest round's policy."""
    rounds = sorted((k for k in stages if re.fullmatch(r"round-\d+/ppo", k)), key=lambda k: int(k[6:-4]))
    names = [k for k in ("base", "sft") if k in stages] + rounds
    if "ppo" in stages and not (rounds and stages["ppo"] == stages[rounds[-1]]):
        names.insert(len(names) - len(rounds), "ppo")
    return names + sorted(k for k in stages if k not in names and k != "ppo")


def table(head: list[str], rows: list[list[str]], left: int = 1) -> str:
    """An HTML table whose first `left` columns are left-aligned names. Cells come escaped."""
    def tr(cells, tag):
        return "<tr>" + "".join(f'<{tag}{" class=l" * (j < left)}>{c}</{tag}>' for j, c in enumerate(cells)) + "</tr>"
    return "<table>" + tr(head, "th") + "".join(tr(r, "td") for r in rows) + "</table>"


# ---------------------------------------------------------------- plots


def plt():
    import matplotlib
    matplotlib.use("Agg")  # no display: render to PNG only
    import matplotlib.pyplot as pyplot
    return pyplot


def img(fig, alt: str) -> str:
    """The figure as an inline PNG; the <figure> around it lists each panel's title and axis labels
    (data-axes), what a reader and the tests can check without reading pixels."""
    axes = [{"title": ax.get_title(), "x": ax.get_xlabel(), "y": ax.get_ylabel()}
            for ax in fig.axes if ax.axison and ax.get_label() != "<colorbar>" and not getattr(ax, "_twin", False)]
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=80)
    plt().close(fig)
    return (f'<figure data-axes="{esc(json.dumps(axes))}"><img alt="{esc(alt)}" '
            f'src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"></figure>')


def twin(ax):
    """A second y axis on the right (its panel's title and x label are the first axis's)."""
    t = ax.twinx()
    t._twin = True
    return t


def xy(rows: list[dict], xk: str, yk: str) -> tuple[list, list]:
    pts = [(a, b) for a, b in ((num(r.get(xk)), num(r.get(yk))) for r in rows) if a is not None and b is not None]
    return [a for a, _ in pts], [b for _, b in pts]


def curves(rows: list[dict], bounds: list[int], keys: list[tuple], title: str, cols: int = 4,
           xlabel: str = "training step", marks: dict | None = None) -> str:
    """One small panel per group of keys against the step; dashed lines separate rounds; `marks`
    {key: step} draws a dotted line where something turned (pretraining's held-out loss)."""
    from matplotlib.ticker import MaxNLocator
    panels = [ks for ks in keys if any(xy(rows, "x", k)[0] for k in ks)]
    if not panels:
        return MISSING
    n_rows, n_cols = math.ceil(len(panels) / cols), min(cols, len(panels))
    fig, axes = plt().subplots(n_rows, n_cols, figsize=(3.3 * n_cols, 2.4 * n_rows), squeeze=False)
    for ax, ks in zip(axes.flat, panels):
        for k in ks:
            x, y = xy(rows, "x", k)
            ax.plot(x, y, marker="o" if len(x) < 30 else None, ms=3, label=label(k), color=colour(k))
            if marks and k in marks:
                ax.axvline(marks[k], color=colour(k), ls=":", lw=1)
        for b in bounds:
            ax.axvline(b + 0.5, color="#aaa", ls="--", lw=0.8)
        ax.set_title(" and ".join(label(k) for k in ks), fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(LABELS.get(ks[0], ("", ks[0].replace("_", " ")))[1], fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        if len(ks) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return img(fig, title)


def stage_rows(run: Path, sub: str) -> list[dict]:
    rows = [dict(r, x=r.get("step", j + 1)) for j, r in enumerate(read_jsonl_tolerant(run / sub / "metrics.jsonl"))]
    for r in rows:  # PPO logs of older runs named the sampled KL kl_to_sft
        if "kl_to_sft" in r and "kl_sampled" not in r:
            r["kl_sampled"] = r.pop("kl_to_sft")
    return rows


def concat(run: Path, sub: str) -> tuple[list[dict], list[int]]:
    """Every round's round-i/<sub>/metrics.jsonl one after another (`x` the global step) and the
    steps where one round ends and the next begins."""
    rows, bounds = [], []
    for i in rounds_of(run):
        off = rows[-1]["x"] if rows else 0
        rows += [dict(r, x=off + r["x"], round=i) for r in stage_rows(run, f"round-{i}/{sub}")]
        if rows and rows[-1]["x"] != off:
            bounds.append(rows[-1]["x"])
    return rows, bounds[:-1]


# ---------------------------------------------------------------- sections


def rates(m: dict) -> list[str]:
    ci = m.get("ci95") or {}
    return [fmt(m.get("gold_score"), ".3f", ci.get("gold_score"))] + [fmt(m.get(k), ".2f", ci.get(k)) for k in RATES]


def summary(ev: dict, run: Path) -> str:
    stages, names = ev["stages"], stage_order(ev["stages"])
    out = [MISSING + "<small>(no stage evaluated yet: <code>alignloop eval --stage base</code> …)</small>"]
    if names:
        out = [table(["stage", "gold score", "helpful", "truthful", "harmless", "RM score", "kl_exact to SFT (nats)",
                      "distinct-2", "mean length", "n prompts"],
                     [[esc(s)] + rates(m) + [fmt(m.get("rm_score"), "+.3g"), fmt(kl_exact(m), ".3f"),
                                             fmt(m.get("distinct_2"), ".3f"), fmt(m.get("mean_length"), ".1f"),
                                             fmt(m.get("n_prompts"), ".0f")] for s in names for m in (stages[s],)]),
               "<small>[lo, hi] is the 95% interval (Wilson's for rates: not symmetric about the rate); rates are "
               "shares of the test prompts, which no training file contains. kl_exact: the exact per-token KL to SFT "
               "summed over each answer. RM score: by the "
               "newest reward model when that stage was evaluated (– where none existed yet), so rows may use "
               "different reward models; KL to SFT – where not measured.</small>"]
        gains = gains_over_sft({s: stages[s] for s in names})
        if gains:
            out.append("<p>Gold-score gain over SFT on the same test prompts (paired: the spread between prompts "
                       "cancels), with its 95% interval: "
                       + ", ".join(f"{esc(s)} <b>{d:+.3f} [{d - h:+.3f}, {d + h:+.3f}]</b> (n {n})"
                                   for s, (d, h, n) in gains) + ".</p>")
        out.append(bars(stages, names))
        cats = sorted({c for s in names for c in stages[s].get("categories") or {}})
        rows = [[f"<b>{esc(c)}</b>" if j == 0 else "", esc(s)] + rates(b) + [fmt(b.get("n_prompts"), ".0f")]
                for c in cats for j, (s, b) in enumerate((s, stages[s]["categories"][c]) for s in names
                                                         if c in (stages[s].get("categories") or {}))]
        if rows:
            out.append("<h3>Per category</h3>" + table(["category", "stage", "gold score", *RATES, "n"], rows, 2))
    fr = ev.get("fact_recall") or {}
    if num(fr.get("base")) is not None:
        out.append(f"<p>Fact recall of the base model: <b>{fr['base']:.1%}</b> of {esc(fr.get('n_facts', '?'))} "
                   "facts (greedy completion of encyclopedic sentence starts).</p>")
    return "\n".join(out + ["<h3>Reward models</h3>", reward_models(ev, run)])


def bars(stages: dict, names: list[str]) -> str:
    """Gold score per stage with its interval, and gold score per category and stage."""
    cats = sorted({c for s in names for c in stages[s].get("categories") or {}})
    fig, (a, b) = plt().subplots(1, 2, figsize=(12, 3.2), gridspec_kw={"width_ratios": [1, 2.2]})
    g = [num(stages[s].get("gold_score")) or 0.0 for s in names]
    b95 = [bounds(stages[s].get("gold_score"), (stages[s].get("ci95") or {}).get("gold_score")) for s in names]
    e = [[v - b[0] if b else 0.0 for v, b in zip(g, b95)], [b[1] - v if b else 0.0 for v, b in zip(g, b95)]]
    colours = stage_colours(names)
    a.bar(range(len(names)), g, yerr=e, capsize=4, color=[colours[s] for s in names])
    a.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    a.set_ylim(max(0.0, min(g) - max(e[0]) - 0.05), max(g) + max(e[1]) + 0.05)
    a.set_title("Gold score of each stage, with its 95% interval", fontsize=10)
    a.set(xlabel="stage", ylabel="gold score (0–1)")
    w = 0.8 / len(names)
    for j, s in enumerate(names):
        ys = [num(((stages[s].get("categories") or {}).get(c) or {}).get("gold_score")) or 0.0 for c in cats]
        b.bar([i + j * w for i in range(len(cats))], ys, w, label=s, color=colours[s])
    b.set_xticks([i + 0.4 - w / 2 for i in range(len(cats))], cats, fontsize=8)
    b.set_title("Gold score per category of test prompt", fontsize=10)
    b.set(xlabel="category of test prompt", ylabel="gold score (0–1)")
    b.legend(fontsize=7, ncol=len(names))
    return img(fig, "gold score per stage and per category")


def reward_models(ev: dict, run: Path) -> str:
    """eval.json's `reward_model`, else each round's reward/eval.json (which the reward stage writes)."""
    rms = dict(ev.get("reward_model") or {})
    unread = []  # (file, what is wrong): said in the report and on stderr, its round left out of the table
    for i in rounds_of(run):
        p = run / f"round-{i}" / "reward" / evaljson.NAME
        if not isinstance(rms.get(f"round-{i}"), dict) and p.exists():
            try:
                rms[f"round-{i}"] = data = evaljson.read_stage(p.parent)
            except ValueError as e:  # not JSON (a torn write), or not UTF-8
                unread.append((p, f"not valid JSON: {e}"))
                continue
            if not isinstance(data, dict):
                unread.append((p, f"expected a JSON object, found {type(data).__name__}"))
    for p, why in unread:
        print(f"report: {p}: {why}; that reward model's results are left out of the report", file=sys.stderr)
    note = "".join(f'<p class="warn"><b>{esc(p)}</b>: {esc(why)} — that reward model\'s results are left out.</p>'
                   for p, why in unread)
    order = sorted((k for k, v in rms.items() if isinstance(v, dict)), key=lambda k: (len(k), k))
    if not order:
        return note or MISSING
    out = [note] if note else []
    out += [table(["round", "held-out pair accuracy", "labelers' agreement", "accuracy against the gold order",
                  "labelers against the gold order", "held-out prompts", "held-out pairs", "training comparisons"],
                 [[esc(k), fmt(r.get("pair_accuracy")), fmt(r.get("labeler_agreement")), fmt(r.get("gold_accuracy")),
                   fmt(r.get("labeler_gold_accuracy")), fmt(r.get("n_prompts"), ".0f"), fmt(r.get("n_pairs"), ".0f"),
                   fmt(r.get("n_train_comparisons"), ".0f")] for k, r in ((k, rms[k]) for k in order)]),
           "<small>Held-out prompts are fixed once per run: no round's reward model trained on them. The labelers' "
           "agreement on the same pairs is about the best accuracy against their labels a reward model can reach; "
           "the gold order is the world's noise-free judgement (pairs of equal gold left out).</small>"]
    if any(rms[k].get("calibration") for k in order):
        fig, ax = plt().subplots(figsize=(5.5, 3))
        for k in order:
            acc = [num(c.get("accuracy")) for c in rms[k].get("calibration") or [] if isinstance(c, dict)]
            if acc and None not in acc:
                ax.plot(range(1, len(acc) + 1), acc, marker="o", label=k)
        ax.axhline(0.5, color="#aaa", ls="--", lw=0.8)
        ax.set_xticks([1, 2, 3, 4], ["smallest", "2nd", "3rd", "largest"])
        ax.set(xlabel="quartile of |score margin| (held-out pairs)", ylabel="pair accuracy")
        ax.set_title("Calibration: a calibrated reward model is surer where it is right", fontsize=10)
        ax.legend(fontsize=8)
        out.append(img(fig, "reward model calibration"))
    return "\n".join(out)


def training(run: Path) -> str:
    ppo_keys = [("rm_score", "reward"), ("rm_probe",), ("gold_rollout", "gold_probe"), ("kl_sampled",), ("beta",),
                ("entropy",), ("clip_frac",), ("approx_kl",), ("vf_loss",), ("pg_loss",), ("explained_variance",),
                ("response_length",), ("distinct_2_probe",), ("ended_share",), ("generation_share",), ("tokens_per_s",)]
    pre = stage_rows(run, "pretrain")
    note, turn = heldout_turn(pre)
    return "\n".join([
        "<h3>Pretraining</h3>", curves(pre, [], [("loss", "val_loss"), ("val_bpb",), ("lr",), ("tokens_per_s",)],
                                       "pretraining curves", marks={"val_loss": turn} if turn is not None else None),
        note,
        "<h3>SFT</h3>", curves(stage_rows(run, "sft"), [], [("loss", "val_loss"), ("lr",)], "SFT curves"),
        "<h3>Reward models (all rounds one after another)</h3>",
        curves(*concat(run, "reward"), [("loss",), ("lr",)], "reward model curves"),
        "<h3>PPO (all rounds one after another; dashed lines separate rounds)</h3>",
        curves(*concat(run, "ppo"), ppo_keys, "PPO curves")])


def heldout_turn(rows: list[dict], tol: float = 0.01) -> tuple[str, float | None]:
    """(a note, the step) where pretraining's held-out loss turned up: its lowest point when it ended
    more than `tol` nats above it (the model began to learn the corpus by heart); else a note that it did not."""
    x, y = xy(rows, "x", "val_loss")
    if len(y) < 2:
        return "", None
    i = min(range(len(y)), key=y.__getitem__)
    if y[-1] - y[i] > tol:
        return (f'<p class="note">Pretraining\'s held-out loss was lowest at step {x[i]:g} ({y[i]:.3f}) and ended at '
                f"{y[-1]:.3f} (step {x[-1]:g}): it turned up there (dotted line), so the later steps fitted the "
                "training text rather than the language; pretrain/ holds the final model, not the best one.</p>"), x[i]
    return (f"<p><small>Pretraining's held-out loss did not turn up: it ended at {y[-1]:.3f}, within {tol} of its "
            f"lowest ({y[i]:.3f}).</small></p>"), None


def overoptimisation(run: Path) -> str:
    rows, _ = concat(run, "ppo")
    if not rows:
        return MISSING
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt().subplots(1, 2, figsize=(12, 3.6))
    for ax, xk, xlabel, title in (
            (axes[0], "kl_sampled", "kl_sampled: PPO's sampled KL to SFT (nats per answer)",
             "Gold and proxy score against how far PPO moved from SFT"),
            (axes[1], "x", "PPO iteration (all rounds one after another)", "Gold and proxy score along training")):
        rm_ax = twin(ax)
        for k, style, tgt in (("gold_rollout", dict(color="#9bc59d", marker=".", ls="none"), ax),
                              ("gold_probe", dict(color="#2a7a2e", marker="o"), ax),
                              ("rm_score", dict(color="#e0a2a2", marker=".", ls="none"), rm_ax),
                              ("rm_probe", dict(color="#b22", marker="s"), rm_ax)):
            x, y = xy(rows, xk, k)
            if x and xk == "kl_sampled":  # joined in KL order
                x, y = zip(*sorted(zip(x, y)))
            if x:
                tgt.plot(x, y, label=label(k), ms=4, lw=1.2, **style)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_title(title, fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=xk == "x"))
        ax.set_ylabel("gold score (simulated labelers)", color="#2a7a2e", fontsize=9)
        rm_ax.set_ylabel("reward-model score (proxy)", color="#b22", fontsize=9)
        (h1, l1), (h2, l2) = ax.get_legend_handles_labels(), rm_ax.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7)
    return (f'<p class="note">{esc(overopt_sentence(rows))}</p>' + img(fig, "gold and proxy score against KL")
            + "<h3>Gao et al.'s form fitted to gold</h3>" + gao_section(run))


def overopt_sentence(rows: list[dict], tol: float = 0.01) -> str:
    """From the data: did the gold score keep up with the reward model's along PPO? A verdict is stated
    only for a change outside the noise: larger than `tol` and than the 95% half-width of a difference of
    two measurements (1.96·√2·σ, σ from the series itself, see `noise`), which is printed with it."""
    probes = [r for r in rows if num(r.get("gold_probe")) is not None]
    g, p = ("gold_probe", "rm_probe") if probes else ("gold_rollout", "rm_score")
    pts = probes or [r for r in rows if num(r.get("gold_rollout")) is not None]
    if len(pts) < 2:
        return "Too few gold measurements along PPO to tell whether the gold score kept up with the proxy."
    first, last, best = pts[0], pts[-1], max(pts, key=lambda r: r[g])
    rm0, rm1 = num(first.get(p)), num(last.get(p))
    d = None if rm0 is None or rm1 is None else rm1 - rm0
    proxy = ("the reward model's score was not logged" if d is None else f"the reward model's score "
             f"{'rose' if d > tol else 'fell' if d < -tol else 'stayed level'} ({rm0:+.3g} → {rm1:+.3g})")
    head = f"Over {len(pts)} {g} measurements (iterations {first['x']}–{last['x']}) {proxy}"
    at = f"iteration {best['x']}, kl_sampled {fmt(best.get('kl_sampled'), '.2f')}"
    sigma = noise([r[g] for r in pts])
    if sigma is None:
        return (f"{head}; the gold score went {first[g]:.3f} → {last[g]:.3f} (best {best[g]:.3f}, {at}). With fewer "
                "than 5 measurements the noise cannot be told from a change: no verdict.")
    half = 1.96 * math.sqrt(2) * sigma
    bar = max(tol, half)
    drop = best[g] - last[g]
    if drop > bar:
        why = ("the proxy kept rising while gold turned down: the policy is exploiting the reward model."
               if d is not None and d > tol else "gold fell back from its best although the proxy did not rise.")
        return (f"{head}, but the gold score peaked at {best[g]:.3f} ({at}) and ended at {last[g]:.3f}, a drop of "
                f"{drop:.3f} ± {half:.3f} (95%, noise from the series itself): {why}")
    dg = last[g] - first[g]
    moved = "rose" if dg > bar else "fell" if dg < -bar else "stayed level within the noise"
    verdict = ("" if d is None else "gold kept up with the proxy." if d > tol and dg > bar else
               "gold did not follow the proxy's rise." if d > tol else "the proxy did not rise: nothing exploited.")
    return (f"{head}; the gold score {moved} ({first[g]:.3f} → {last[g]:.3f}, change {dg:+.3f} ± {half:.3f}, 95%), "
            f"ending within {drop:.3f} of its best ({best[g]:.3f}, {at}): {verdict}")


def alarms(run: Path) -> str:
    """The reward-hacking alarm of each PPO round (alignloop/alarm.py): a warning box where it fires."""
    found = run_alarms(run)
    if not found:
        return ""  # no PPO metrics yet: the section below says "not run yet"
    return "\n".join(
        [f'<p class="warn"><b>{esc(PREFIX)}{esc(s)}:</b> {esc(a)}.</p>' if a else
         f"<p>{esc(s)}: no sign of reward hacking on the dev probe.</p>" for s, a in found]
        + [f"<small>The alarm fires when the dev-probe gold ends below its best by more than {TOLERANCE:g} and than "
           "the 95% noise of a difference of two probe points, while the reward model's probe score ends above its "
           "value at gold's best.</small>"])


def headroom_section(run: Path) -> str:
    """RUN/headroom.json as a table, with how to read it (alignloop/headroom.py)."""
    path = run / "headroom.json"
    if not path.exists():
        # a step of `alignloop run` after its last round; a run built stage by stage has none, and is not unfinished
        return ("<p>No headroom.json in this run: the main job (<code>alignloop run</code>) writes it after its last "
                "round.</p>")
    try:
        h = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"not valid JSON: {e.msg}", file=path, line=e.lineno) from None
    head, rows = headroom.table(h)
    return (f"<p>{esc(headroom.READING)}</p>" + table([esc(c) for c in head], [[esc(c) for c in r] for r in rows])
            + f"<small>SFT mean: the gold score of one of the {esc(h['k'])} answers the SFT policy samples for each of "
            f"the first {esc(h['categories']['all']['n_prompts'])} {esc(h['split'])} prompts (temperature "
            f"{esc(h.get('temperature'))}); best of {esc(h['k'])}: the mean over prompts of the best gold among them; "
            f"headroom: the difference; RM pick: the gold of the answer {esc(h.get('rm_pick_model') or '–')} scores "
            "highest. RM acc.: each round's reward model on its own held-out comparisons, the share of pairs of "
            "answers of different gold that it orders as gold does. Gain: each round's PPO policy over SFT on "
            f"eval.json's {esc((h.get('gains') or {}).get('split', '?'))} prompts.</small>")


def gao_curves(run: Path) -> tuple[str, list[tuple[float | None, list[dict]]]]:
    """(their source, [(PPO's β, its round-1 metrics rows)]) for the fit: experiments/beta.py's runs beside
    this one (runs/beta-<β>/, sharing this run's sft/), else this run's own round 1 (PPO from SFT, so the
    KL to SFT starts at 0, as the form assumes; round 2 starts elsewhere against another reward model)."""
    curves = []
    for d in sorted(run.parent.glob("beta-*")):
        if d.resolve() != run.resolve() and (d / "sft").exists() and (d / "sft").resolve() == (run / "sft").resolve():
            rows = stage_rows(d, "round-1/ppo")
            if rows:
                curves.append((num(rows[0].get("beta")), rows))
    if curves:
        return "experiments/beta.py's runs beside this one", sorted(curves, key=lambda c: c[0] or 0.0)
    rows = stage_rows(run, "round-1/ppo")
    own = [(num(rows[0].get("beta")), rows)] if rows else []
    return "this run's round-1 PPO (no experiments/beta.py runs beside it)", own


def gao_points(rows: list[dict]) -> tuple[list[float], list[float], list[float]]:
    """(d = √kl_sampled, gold gain over the first probe, proxy) at each dev-probe measurement."""
    pts = [(max(0.0, num(r.get("kl_sampled")) or 0.0), num(r.get("gold_probe")), num(r.get("rm_probe")))
           for r in rows if num(r.get("gold_probe")) is not None and num(r.get("kl_sampled")) is not None]
    if not pts:
        return [], [], []
    g0 = pts[0][1]
    return [math.sqrt(k) for k, _, _ in pts], [g - g0 for _, g, _ in pts], [p for _, _, p in pts]


def gao_section(run: Path) -> str:
    source, curves = gao_curves(run)
    curves = [(b, *gao_points(rows)) for b, rows in curves]
    curves = [c for c in curves if len(c[1]) >= 2]
    if not curves:
        return MISSING
    fig, axes = plt().subplots(1, len(curves), figsize=(5.5 * len(curves), 3.4), squeeze=False)
    notes = []
    for ax, (b, d, r, proxy) in zip(axes[0], curves):
        name = "β_KL ?" if b is None else f"β_KL = {b:g}"
        ax.plot(d, r, "o", color="#2a7a2e", ms=4, label="gold gain (dev probe)")
        try:
            alpha, beta = fit_gao_rl(d, r)
        except ValueError:
            notes.append(f"{name}: fewer than two dev-probe points with distinct KL > 0: nothing to fit.")
        else:
            peak = gao_peak(alpha, beta)
            top = max(d) * 1.3 if peak is None or peak > 3 * max(d) else max(max(d), peak) * 1.15
            grid = [top * i / 100 for i in range(1, 101)]
            ax.plot([0.0] + grid, [0.0] + [x * (alpha - beta * math.log(x)) for x in grid], color="#2a7a2e", lw=1.2,
                    label=f"fit d(α − β·log d): α {alpha:.3f}, β {beta:.3f}")
            if peak is None:
                notes.append(f"{name}: α = {alpha:.3f}, β = {beta:.3f} ≤ 0: the fitted gold does not turn down "
                             f"within the measured KL (up to {max(d) ** 2:.2f} nats).")
            elif peak > 3 * max(d):  # a peak far outside the data says only that the curve still rises
                notes.append(f"{name}: α = {alpha:.3f}, β = {beta:.3f}; the fitted gold still rises at the largest "
                             f"KL measured ({max(d) ** 2:.2f} nats): its peak lies more than 3× beyond the data in √KL.")
            else:
                beyond = " — beyond the measured range, an extrapolation" if peak > max(d) else ""
                notes.append(f"{name}: α = {alpha:.3f}, β = {beta:.3f}; the fitted gold peaks at √KL = {peak:.2f}, "
                             f"KL = {peak ** 2:.2f} nats (measured up to {max(d) ** 2:.2f}{beyond}).")
                if peak <= top:
                    ax.axvline(peak, color="#2a7a2e", ls=":", lw=0.8)
        best = max(range(len(r)), key=r.__getitem__)
        notes.append(f"{name}, measured: the dev-probe gold is highest at KL {d[best] ** 2:.2f} nats "
                     f"({r[best]:+.3f} over the start; one point of a 100-prompt probe: "
                     "differences of a few hundredths are within its noise).")
        if None not in proxy:
            rm_ax = twin(ax)
            rm_ax.plot(d, proxy, "s-", color="#b22", ms=3, lw=0.8, label="RM score (proxy, dev probe)")
            rm_ax.set_ylabel("reward-model score (proxy)", color="#b22", fontsize=8)
            (h1, l1), (h2, l2) = ax.get_legend_handles_labels(), rm_ax.get_legend_handles_labels()
            ax.legend(h1 + h2, l1 + l2, fontsize=7)
        else:
            ax.legend(fontsize=7)
        ax.set_xlabel("d = √kl_sampled (PPO's sampled KL to SFT, nats)", fontsize=8)
        ax.set_ylabel("gold gain over the start", color="#2a7a2e", fontsize=8)
        ax.set_title(f"Gold gain against √KL, PPO with {name}", fontsize=10)
    return (f"<p>Gao et al. (2022) find that for RL the gold score follows R(d) = d(α − β·log d) in d = √KL; "
            f"least squares in (α, β), closed form. From {esc(source)}; KL is PPO's sampled estimate on its rollout "
            f"batch, gold and proxy are measured on the dev probe.</p>"
            + img(fig, "gold and proxy against the square root of KL, with the fitted curve")
            + "<ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")


def diversity(ev: dict, run: Path) -> str:
    rows, stages = concat(run, "ppo")[0], ev["stages"]
    pts = [(s, 0.0 if s == "sft" and kl_exact(m) is None else num(kl_exact(m)), num(m.get("distinct_2")))
           for s, m in ((s, stages[s]) for s in stage_order(stages))]
    pts = [pt for pt in pts if None not in pt]
    if not rows and not pts:
        return MISSING
    fig, ax = plt().subplots(figsize=(7, 3.6))
    colours = stage_colours(stage_order(stages))
    for i in sorted({r["round"] for r in rows}):
        x, y = xy([r for r in rows if r["round"] == i], "kl_sampled", "distinct_2_probe")
        if x:
            ax.plot(x, y, marker="o", ms=4, ls=":", label=f"PPO round {i}: dev probe, at kl_sampled")
    for s, x, y in pts:
        ax.scatter([x], [y], marker="*", s=140, zorder=3, color=colours[s], label=f"{s}: test evaluation")
        ax.annotate(s, (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set(xlabel="KL to SFT (nats per answer): kl_sampled (dotted lines) / kl_exact (stars)",
           ylabel="distinct-2 (0–1, higher: more varied)")
    ax.set_title("Diversity of the answers against how far the policy moved from SFT", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    missing = [s for s in stage_order(stages) if s not in {pt[0] for pt in pts}]
    return img(fig, "distinct-2 against KL") + (f"<small>Not placed (no kl_exact in eval.json): "
                                                f"{esc(', '.join(missing))}.</small>" if missing else "")


def context(e: dict) -> str:
    """The earlier turns of a multi-turn test prompt (eval.json's `context`), before its last user turn."""
    turns = [m for m in e.get("context") or [] if isinstance(m, dict)]
    return "".join(f'<div class="turn"><b>{esc(m.get("role", ""))}:</b> {esc(m.get("content", ""))}</div>'
                   for m in turns) + ("<b>user:</b> " if turns else "")


def side_by_side(ev: dict, n: int = 12) -> str:
    stages = ev["stages"]
    names = [s for s in stage_order(stages) if isinstance(stages[s].get("examples"), list)]
    if not names:
        return MISSING
    by = {s: {e.get("id"): e for e in stages[s]["examples"] if isinstance(e, dict)} for s in names}
    cats: dict[str, list] = {}
    for e in by[names[0]].values():
        cats.setdefault(str(e.get("category", "")), []).append(e)
    picked = [e for k in range(n) for c in sorted(cats) for e in cats[c][k:k + 1]][:n]  # a few of each category
    rows = [[context(e) + f'{esc(e.get("prompt", ""))}<br><span class="g">{esc(e.get("category", ""))} · {esc(e.get("id"))}</span>']
            + [f'{esc(a.get("answer", ""))}<br><span class="g">gold {fmt(a.get("gold_score"), ".2f")}</span>'
               if a else '<span class="missing">not evaluated</span>' for a in (by[s].get(e.get("id")) for s in names)]
            for e in picked]
    return table(["prompt", *map(esc, names)], rows, len(names) + 1).replace("<table>", '<table class="ans">', 1)


# ---------------------------------------------------------------- page


# ---------------------------------------------------------------- beyond PPO (experiments/methods.py)

METHODS = {"ppo": ("PPO", "o"), "rloo": ("RLOO", "s"), "dpo": ("DPO", "^"), "bo": ("best-of-N", "D")}


def method_points(run: Path) -> list[dict]:
    """experiments/methods.py's rows for this run (RUN/methods/methods.json), or []."""
    path = run / "methods" / "methods.json"
    try:
        rows = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
    except json.JSONDecodeError as e:
        raise InputError(f"not valid JSON: {e.msg}", file=path, line=e.lineno) from None
    return [r for r in rows if isinstance(r, dict) and r.get("method") in (*METHODS, "sft")]


def dev_choice(rows: list[dict]) -> dict[str, dict]:
    """Per method, the strength whose DEV gold is highest: the one a user would pick without seeing test."""
    best = {}
    for r in rows:
        if r["method"] in METHODS and num(r.get("dev_gold")) is not None and (
                r["method"] not in best or r["dev_gold"] > best[r["method"]]["dev_gold"]):
            best[r["method"]] = r
    return best


def methods_plot(ax, seeds: list[list[dict]]) -> None:
    """Gold gain over SFT (paired, test prompts) against √KL to SFT, each method's strengths joined, SFT at
    the origin; the mean over seeds with their standard deviation as bars (one seed: the paired 95%
    half-width). Gao et al.'s RL form d(α − β·log d) fitted per trained method, dashed (best-of-N is not
    RL: its KL is the analytic bound log N − (N−1)/N)."""
    for method, (name, marker) in METHODS.items():
        strengths = sorted({r["strength"] for rows in seeds for r in rows if r["method"] == method})
        pts = []
        for st in strengths:
            got = [r for rows in seeds for r in rows if r["method"] == method and r["strength"] == st
                   and num(r.get("gain")) is not None and num(r.get("kl")) is not None]
            if not got:
                continue
            mean, sd = mean_sd([r["gain"] for r in got])
            spread = sd if sd is not None else got[0].get("gain_half") or 0.0
            pts.append((math.sqrt(max(0.0, sum(r["kl"] for r in got) / len(got))), mean, spread, st))
        if not pts:
            continue
        pts.sort()
        line = ax.errorbar([0.0] + [p[0] for p in pts], [0.0] + [p[1] for p in pts], yerr=[0.0] + [p[2] for p in pts],
                           marker=marker, ms=4, capsize=2, lw=1, label=name)
        for x, y, _, st in pts:
            ax.annotate(f"{'N=' if method == 'bo' else 'β='}{st:g}", (x, y), textcoords="offset points",
                        xytext=(4, 4), fontsize=6)
        if method != "bo" and len({p[0] for p in pts}) >= 2:
            try:
                alpha, beta = fit_gao_rl([p[0] for p in pts], [p[1] for p in pts])
            except ValueError:
                continue
            top = max(p[0] for p in pts) * 1.1
            grid = [top * i / 60 for i in range(1, 61)]
            ax.plot([0.0] + grid, [0.0] + [x * (alpha - beta * math.log(x)) for x in grid], ls="--", lw=0.8,
                    color=line[0].get_color())
    ax.axhline(0.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("√KL to SFT (√nats per answer; best-of-N: the analytic bound)", fontsize=8)
    ax.set_ylabel("gold gain over SFT (test, paired)", fontsize=8)
    ax.set_title(f"Gold gain against √KL per method ({len(seeds)} seed{'s' * (len(seeds) > 1)})", fontsize=10)
    ax.legend(fontsize=7)


def methods_verdict(rows: list[dict]) -> list[str]:
    """Per method: the test gain at the strength chosen on dev (the honest figure), and the best test gold
    over its strengths with the KL it took (a maximum over a sweep: optimistic); then whether PPO leads."""
    chosen, notes = dev_choice(rows), []
    for method, (name, _) in METHODS.items():
        mine = [r for r in rows if r["method"] == method and num(r.get("gold")) is not None]
        if not mine:
            continue
        top = max(mine, key=lambda r: r["gold"])
        unit = "N" if method == "bo" else "β"
        text = (f"{name}: best test gold {top['gold']:.3f} at {unit} {top['strength']:g}, KL "
                f"{'≤ ' if top.get('kl_is_bound') else ''}{top['kl']:.2f} nats")
        c = chosen.get(method)
        if c is not None and num(c.get("gain")) is not None:
            h = c.get("gain_half") or 0.0
            text += (f"; chosen on dev: {unit} {c['strength']:g}, test gain {c['gain']:+.3f} "
                     f"[{c['gain'] - h:+.3f}, {c['gain'] + h:+.3f}]")
        notes.append(text + ".")
    gains = {m: c for m, c in chosen.items() if num(c.get("gain")) is not None}
    if "ppo" in gains and len(gains) > 1:
        ppo = gains["ppo"]
        lead = max(gains.values(), key=lambda c: c["gain"])
        rivals = [METHODS[m][0] for m, c in gains.items() if m != "ppo" and
                  c["gain"] + (c.get("gain_half") or 0) >= ppo["gain"] - (ppo.get("gain_half") or 0)]
        if lead is ppo and not rivals:
            notes.append("PPO's crown holds here: at the strengths chosen on dev its gain is the largest and no other "
                         "method's interval reaches it.")
        elif lead is ppo:
            notes.append(f"PPO leads at the strengths chosen on dev, but within noise of {', '.join(rivals)}: "
                         "its crown is not established here.")
        else:
            apart = ppo["gain"] + (ppo.get("gain_half") or 0) < lead["gain"] - (lead.get("gain_half") or 0)
            name = METHODS[lead["method"]][0]
            notes.append(f"PPO's crown does not hold here: {name} gains more at the strengths chosen on dev "
                         f"({lead['gain']:+.3f} against PPO's {ppo['gain']:+.3f}; their intervals apart)." if apart else
                         f"PPO's crown is not established here: {name} gains as much or more at the strengths chosen "
                         f"on dev ({lead['gain']:+.3f} against PPO's {ppo['gain']:+.3f}), within noise (their "
                         "intervals overlap).")
    return notes


def methods_section(run: Path) -> str:
    rows = method_points(run)
    if not rows:
        # not a stage of the main job, so not "not run yet": an experiment a user may add to the run
        return ("<p><small>Not part of the main job: <code>python experiments/methods.py --run RUN</code> trains "
                "PPO, RLOO, DPO and best-of-N from this run's SFT model and round-1 rankings and scores them here "
                "(~30 minutes on the tiny preset's CPU).</small></p>")
    chosen = {id(r) for r in dev_choice(rows).values()}
    body = []
    for r in rows:
        name = "SFT" if r["method"] == "sft" else METHODS[r["method"]][0]
        st = "" if r["method"] == "sft" else f"{'N = ' if r['method'] == 'bo' else 'β = '}{r['strength']:g}"
        gain = ("" if num(r.get("gain")) is None else
                f"{r['gain']:+.3f} [{r['gain'] - (r.get('gain_half') or 0):+.3f}, {r['gain'] + (r.get('gain_half') or 0):+.3f}]")
        t = r.get("train") or {}
        body.append([esc(name), esc(st) + (" ★" if id(r) in chosen else ""), fmt(r.get("gold"), ".3f", r.get("gold_ci")),
                     gain, fmt(r.get("dev_gold"), ".3f"), ("≤ " if r.get("kl_is_bound") else "") + fmt(r.get("kl"), ".2f"),
                     fmt(r.get("rm_score"), "+.3f"), fmt(r.get("distinct_2"), ".2f"), fmt(t.get("seconds"), ".0f"),
                     fmt(t.get("peak_gb"), ".2f")])
    fig, ax = plt().subplots(figsize=(6.4, 4.0))
    methods_plot(ax, [rows])
    return ("<p>From this run's SFT model, its round-1 rankings and round-1 reward model: PPO, RLOO (no value model), "
            "DPO (no reward model, no sampling) and best-of-N (no training), each at several strengths, scored on the "
            "test prompts. ★ marks the strength chosen on the dev prompts (the figure to quote); the best test "
            "figure over a sweep is optimistic.</p>"
            + table(["method", "strength", "gold (test)", "gain over SFT [95%]", "gold (dev)", "KL to SFT", "RM score",
                     "distinct-2", "wall s", "peak GB"], body, 2)
            + img(fig, "gold gain over SFT against the square root of KL, per method")
            + "<ul>" + "".join(f"<li>{esc(n)}</li>" for n in methods_verdict(rows)) + "</ul>")


def load_eval(run: Path) -> dict:
    """eval.json with only the stages that are objects (what a page can show)."""
    data = evaljson.read(run)
    data["stages"] = {k: m for k, m in (data.get("stages") or {}).items() if isinstance(m, dict)}
    return data


def write_report(run_dir: Path) -> Path:
    """Render RUN/report.html from whatever the run directory holds so far; returns its path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise InputError("run directory not found", file=run)
    if not any((run / p).exists() for p in ("config.toml", evaljson.NAME, "world", "pretrain")):
        raise InputError("not a run directory (no config.toml, eval.json, world/ or pretrain/)", file=run)
    ev = load_eval(run)
    done = [s for s in ("world/world.json", "tokenizer/tokenizer.json", "pretrain/config.json", "sft/config.json",
                        *(f"round-{i}/{s}/config.json" for i in rounds_of(run) for s in ("reward", "ppo")))
            if (run / s).exists()]
    name = esc(run.resolve().name)
    body = [f"<h1>alignloop run: {name}</h1>", f"<small>{esc(run.resolve())} · stages present: "
            f"{esc(', '.join(s.rsplit('/', 1)[0] for s in done) or 'none')}</small>", GLOSSARY,
            "<h2>1. Summary (test prompts, scored by the simulated labelers)</h2>", summary(ev, run),
            "<h2>2. Training curves</h2>", training(run),
            "<h2>3. Gold vs proxy along PPO (reward over-optimisation, Gao et al. 2022)</h2>",
            "<p>Green: the gold score (the simulated labelers, who know the truth); red: the reward model's score "
            "(the proxy PPO maximises), both on PPO's dev probe (never the test prompts). A proxy that keeps rising "
            "while gold turns down means the policy has found the reward model's mistakes.</p>", alarms(run),
            overoptimisation(run),
            "<h2>4. Diversity against KL to SFT</h2>", diversity(ev, run),
            "<h2>5. Side by side: the same test prompts</h2>", side_by_side(ev),
            "<h2>6. Beyond PPO: RLOO, DPO and best-of-N from the same rankings</h2>", methods_section(run),
            "<h2>7. Where the gain is lost: headroom per category</h2>", headroom_section(run)]
    path = run / "report.html"
    atomic_write_text(path, f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>alignloop: {name}'
                            f'</title><meta name="viewport" content="width=device-width, initial-scale=1">'
                            f'<style>{CSS}</style></head><body>\n' + "\n".join(body) + "\n</body></html>\n")
    return path


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="alignloop report", description="write report.html for a run directory")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    print(f"report: {write_report(Path(p.parse_args(argv).run_dir)).resolve()}")
