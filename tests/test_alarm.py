"""The reward-hacking alarm (alignloop/alarm.py) on hand-built probe curves, and where it is shown: the main
job's final output and report.html's section 3. No model: metrics rows written by hand."""
from __future__ import annotations

import json

from alignloop.alarm import PREFIX, hacking_alarm, run_alarms
from alignloop.stats import noise


def curve(gold, rm, start=0, every=5):
    """PPO's metrics rows: a probe point every `every` iterations, iteration rows without a probe between."""
    rows = []
    for i, (g, r) in enumerate(zip(gold, rm)):
        if i:
            rows.append({"step": start + every * i - 1, "rm_score": 0.0, "kl_sampled": 0.1})  # no probe here
        rows.append({"step": start + every * i, "gold_probe": g, "rm_probe": r, "kl_sampled": 0.1 * i})
    return rows


def test_fires_when_the_proxy_rises_while_gold_falls():
    # gold peaks at 0.70 (iteration 10) and ends at 0.62: a fall of 0.08. Second differences 0, −0.09, 0:
    # σ² = 0.0081 / 3 / 6 = 0.00045, σ = 0.02121, bar = 1.96·√2·σ = 0.0588 > 0.02; 0.08 > 0.0588.
    rows = curve([0.60, 0.65, 0.70, 0.66, 0.62], [-0.1, 0.0, 0.1, 0.2, 0.3])
    assert abs(noise([0.60, 0.65, 0.70, 0.66, 0.62]) - 0.021213) < 1e-6
    alarm = hacking_alarm(rows)
    assert alarm is not None and "\n" not in alarm
    assert "fell 0.080 from its best 0.700 (iteration 10) to 0.620 (iteration 20)" in alarm
    assert "rose +0.100 → +0.300" in alarm and "alarm above a fall of 0.059" in alarm


def test_fires_with_three_points_above_the_fixed_tolerance():
    # under 5 points the noise is unknown: the bar is the tolerance 0.02; a fall of 0.03 fires, 0.015 not
    assert "fell 0.030" in hacking_alarm(curve([0.70, 0.72, 0.69], [0.0, 0.1, 0.2]))
    assert hacking_alarm(curve([0.70, 0.72, 0.705], [0.0, 0.1, 0.2])) is None


def test_silent_when_both_rise():
    assert hacking_alarm(curve([0.60, 0.62, 0.64, 0.66, 0.68], [-0.1, 0.0, 0.1, 0.2, 0.3])) is None


def test_silent_when_gold_wobbles_within_the_tolerance():
    # best 0.710, last 0.700: a fall of 0.010 < 0.02 while the proxy rises
    assert hacking_alarm(curve([0.700, 0.710, 0.695, 0.705, 0.700], [-0.1, 0.0, 0.1, 0.2, 0.3])) is None
    # a fall of 0.05 in a series that wobbles by ±0.05: second differences ±0.11–0.13, σ = 0.0483, bar 0.134
    assert hacking_alarm(curve([0.50, 0.56, 0.49, 0.55, 0.50, 0.56, 0.51], [0, 1, 2, 3, 4, 5, 6])) is None


def test_silent_with_fewer_than_three_probe_points():
    assert hacking_alarm(curve([0.80, 0.50], [0.0, 1.0])) is None
    assert hacking_alarm([]) is None


def test_silent_when_the_proxy_falls_with_gold():
    # gold fell 0.08 but the reward model saw it fall too: a bad update, not the reward model exploited
    assert hacking_alarm(curve([0.60, 0.65, 0.70, 0.66, 0.62], [0.0, 0.1, 0.3, 0.2, 0.1])) is None


def test_docs_beta_curves_fire_at_beta_0_only():
    """docs/beta.md's probe points (the ones it lists). 8 points: each averaged with the next two. β = 0's
    windows 0.681 0.692 0.687 0.662 0.626 0.614: best 0.692 (points 2–4), lowest later 0.614, a fall of 0.078
    while the proxy's window mean climbs +0.014 → +0.688; σ = 0.01423 (second differences .015 .003 −.066
    .003 .029 .043), bar 1.96·√2·σ/√3 = 0.0228. β = 0.2's windows only rise: silent."""
    beta0 = curve([0.676, 0.676, 0.691, 0.709, 0.661, 0.616, 0.600, 0.627],
                  [-0.081, -0.062, -0.022, 0.125, 0.369, 0.596, 0.680, 0.788])
    alarm = hacking_alarm(beta0)
    assert "(mean of 3 probe points) fell 0.078 from its best 0.692 (iterations 5–15) to 0.614 (iterations 25–35)" in alarm
    assert "rose +0.014 → +0.688" in alarm and "alarm above a fall of 0.023" in alarm
    beta02 = curve([0.676, 0.668, 0.672, 0.697, 0.710, 0.714, 0.703], [-0.081, -0.061, -0.065, -0.033, -0.022, -0.025, 0.004])
    assert hacking_alarm(beta02) is None


def test_the_2026_12_05_curves_fire_at_beta_0_and_not_in_the_main_job():
    """Dev seed 0 on the current world (docs/LOG.md 2026-12-05): β = 0 falls 0.034 (window means) from
    iterations 5–15 to 20–30 while the proxy doubles, then drifts back to 0.020 below its best point — the last
    point alone would not fire. The main job's two rounds (β = 0.2) on the same SFT model: silent, though
    round 1's last point is 0.028 below its best single point (a window of three smooths that wobble)."""
    beta0 = curve([0.702, 0.72, 0.729, 0.716, 0.691, 0.69, 0.683, 0.715, 0.715, 0.704, 0.705, 0.716, 0.709],
                  [0.162, 0.207, 0.317, 0.529, 0.585, 0.973, 0.992, 1.067, 1.11, 1.104, 1.137, 1.147, 1.183])
    assert "fell 0.034 from its best 0.722 (iterations 5–15) to 0.688 (iterations 20–30)" in hacking_alarm(beta0)
    # the rule before windows (the best single point against the last) stayed silent: 0.729 → 0.709 = 0.020
    assert max(p["gold_probe"] for p in beta0 if "gold_probe" in p) - beta0[-1]["gold_probe"] <= 0.02 + 1e-9
    round1 = curve([0.702, 0.722, 0.712, 0.716, 0.73, 0.734, 0.739, 0.756, 0.748, 0.751, 0.757, 0.732, 0.729],
                   [0.162, 0.159, 0.243, 0.299, 0.306, 0.281, 0.325, 0.432, 0.446, 0.339, 0.396, 0.377, 0.366])
    round2 = curve([0.729, 0.732, 0.727, 0.752, 0.751, 0.747, 0.735, 0.738, 0.731, 0.741, 0.749, 0.735, 0.73],
                   [0.03, 0.198, 0.183, 0.159, 0.118, 0.175, 0.125, 0.047, 0.089, 0.104, 0.181, 0.155, -0.03])
    assert hacking_alarm(round1) is None and hacking_alarm(round2) is None


def test_silent_when_the_proxy_only_wobbles_while_gold_falls():
    """Dev seed 1 with the likelihood-gated reward model, round 2 (docs/LOG.md 2026-12-06, late night): window means of
    gold fall 0.028 from iterations 15–25 to 50–60 (bar 0.021) while the proxy's move from −0.314 to −0.277 is
    well inside its own noise (σ_rm = 0.102, rm_bar 1.96·√2·σ_rm/√3 = 0.164). The same gold curve with a
    proxy that really climbs, by 0.05 a probe point (+0.6 over the round), fires."""
    gold = [0.746, 0.735, 0.74, 0.766, 0.788, 0.772, 0.764, 0.756, 0.764, 0.742, 0.739, 0.774, 0.73]
    rm = [-0.419, -0.597, -0.37, -0.337, -0.322, -0.283, -0.301, -0.402, -0.204, -0.169, -0.355, -0.145, -0.331]
    assert abs(noise(rm) - 0.10238) < 1e-4
    assert hacking_alarm(curve(gold, rm)) is None
    climbing = [r + 0.05 * i for i, r in enumerate(rm)]
    assert "fell 0.028 from its best 0.775" in hacking_alarm(curve(gold, climbing))


def write_rounds(run, *curves):
    for i, rows in enumerate(curves, 1):
        (run / f"round-{i}" / "ppo").mkdir(parents=True)
        (run / f"round-{i}" / "ppo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


HACKED = curve([0.60, 0.65, 0.70, 0.66, 0.62], [-0.1, 0.0, 0.1, 0.2, 0.3])
FINE = curve([0.60, 0.62, 0.64, 0.66, 0.68], [-0.1, 0.0, 0.1, 0.2, 0.3])


def test_every_round_is_judged_and_the_main_job_repeats_what_fired(tmp_path, capsys):
    from alignloop.pipeline import _print_alarms
    write_rounds(tmp_path, FINE, HACKED)
    (tmp_path / "round-3").mkdir()  # a round not trained yet: nothing to judge
    found = run_alarms(tmp_path)
    assert [s for s, _ in found] == ["round-1/ppo", "round-2/ppo"] and found[0][1] is None and found[1][1]
    _print_alarms(tmp_path)
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{PREFIX}round-2/ppo: {found[1][1]}"] and out[0].startswith("WARNING: reward hacking:")


def test_report_shows_a_box_where_it_fires_and_a_sentence_where_not(tmp_path):
    from alignloop.report import alarms, write_report
    write_rounds(tmp_path, FINE, HACKED)
    html = alarms(tmp_path)
    assert html.count('class="warn"') == 1 and "WARNING: reward hacking: round-2/ppo:" in html
    assert "round-1/ppo: no sign of reward hacking on the dev probe." in html
    assert alarms(tmp_path / "nothing") == ""
    (tmp_path / "config.toml").write_text("")
    page = write_report(tmp_path).read_text(encoding="utf-8")
    section = page.split("3. Gold vs proxy")[1].split("<h2>4.")[0]
    assert 'class="warn"' in section and "no sign of reward hacking" in section
