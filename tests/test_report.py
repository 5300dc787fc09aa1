"""report.html: a real micro run (SFT, two PPO rounds, every evaluation) rendered into one self-contained,
escaped page; a run that stopped after pretraining renders with "not run yet"; bad run directories exit 2."""
from __future__ import annotations


import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402

from alignloop.report import gao_section, overopt_sentence, write_report  # noqa: E402
from tests.conftest import alignloop  # noqa: E402

IMG = re.compile(r'<img alt="[^"]*" src="data:image/png;base64,[A-Za-z0-9+/=]{200,}">')


@pytest.fixture(scope="module")
def full_run(micro_recipe, tmp_path_factory):
    """A copy of conftest.py's micro main job (SFT, two rounds of sample → rank → reward → PPO, every
    evaluation, the headroom table), so that rendering its report again writes into a folder of this module's."""
    run = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(micro_recipe[0], run)
    return run


def test_report_of_a_full_run(full_run):
    proc = alignloop("report", full_run)  # the real command line, in a subprocess
    path = full_run / "report.html"
    assert str(path.resolve()) in proc.stdout
    page = path.read_text(encoding="utf-8")
    # one self-contained file: no external assets, no scripts
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', page, re.I)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    for name in ("base", "sft", "round-1/ppo", "round-2/ppo", "round-1"):
        assert f">{name}<" in page
    # summary bars, RM calibration, pretrain, SFT, reward and PPO curves, gold-vs-proxy, Gao's fit, diversity
    imgs = re.findall(r"<img[^>]*>", page)
    assert len(imgs) == 9 and all(IMG.fullmatch(i) for i in imgs)
    # micro's four PPO iterations may leave too few points at KL > 0: the fit itself is tested below
    assert "this run&#x27;s round-1 PPO" in page and re.search(r"peaks at √KL|does not turn down|nothing to fit", page)
    assert "not run yet" not in page
    assert "gold_probe measurements" in page  # the sentence on gold vs proxy, from the data
    eval_json = json.loads((full_run / "eval.json").read_text())
    # the paired gain over SFT, one per RL stage, with the number of shared prompts
    n = eval_json["stages"]["sft"]["n_prompts"]
    assert re.search(rf"round-1/ppo <b>[+-]\d\.\d{{3}} \[[+-]\d\.\d{{3}}, [+-]\d\.\d{{3}}\]</b> \(n {n}\), round-2/ppo <b>", page)
    lo, hi = eval_json["stages"]["sft"]["ci95"]["gold_score"]  # intervals are printed as [lo, hi]
    assert f"{eval_json['stages']['sft']['gold_score']:.3f} [{lo:.3f}, {hi:.3f}]" in page
    answers = page.split("5. Side by side")[1]
    shown = [e for e in eval_json["stages"]["sft"]["examples"] if f"· {e['id']}<" in answers]
    assert len(shown) == 12 and len({e["category"] for e in shown}) == len({e["category"] for e in
                                                                          eval_json["stages"]["sft"]["examples"]})


def test_model_text_is_escaped(full_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(full_run, run, ignore=shutil.ignore_patterns("*.safetensors", "checkpoints"))
    data = json.loads((run / "eval.json").read_text())
    evil = "<script>alert(1)</script>"
    data["stages"]["round-2/ppo"]["examples"][0]["answer"] = evil
    for m in data["stages"].values():  # the prompt column shows the first stage's copy
        m["examples"][0]["prompt"] = 'x"><img src=x onerror=alert(2)>'
    data["stages"]["sft"]["categories"]["<b>cat</b>"] = data["stages"]["sft"]["categories"]["harmful"]
    (run / "eval.json").write_text(json.dumps(data))
    page = write_report(run).read_text(encoding="utf-8")
    assert evil not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(2)&gt;" in page
    assert "<b>cat</b>" not in page and "&lt;b&gt;cat&lt;/b&gt;" in page


def test_report_of_a_run_that_stopped_after_pretraining(micro_copy):
    path = write_report(micro_copy)
    page = path.read_text(encoding="utf-8")
    assert page.count("not run yet") >= 5  # summary, RM, SFT, reward, PPO curves, gold vs proxy, diversity, answers
    assert len(IMG.findall(page)) == 1  # the pretraining curves
    assert not list(micro_copy.glob(".report.html.*"))  # written atomically: no temporary left


def test_report_with_base_and_sft_only(micro_copy):
    """A run stopped after SFT: the table and answers show what exists, PPO sections say not run yet."""
    stages = {}
    for name in ("base", "sft"):
        ex = [{"id": f"h-{i}", "category": "task", "prompt": f"p{i}", "answer": f"{name} {i}", "gold_score": 0.5}
              for i in range(3)]
        stages[name] = {"gold_score": 0.5, "helpful": 0.1, "truthful": 0.2, "harmless": 0.9, "n_prompts": 3,
                        "ci95": {"gold_score": 0.1}, "rm_score": None, "kl_to_sft": None, "distinct_2": 0.8,
                        "categories": {}, "examples": ex}
    (micro_copy / "eval.json").write_text(json.dumps({"stages": stages, "reward_model": {},
                                                      "fact_recall": {"base": 0.25, "n_facts": 60}}))
    page = write_report(micro_copy).read_text(encoding="utf-8")
    assert "sft 2" in page and "25.0%" in page and page.count("not run yet") >= 3


def test_bad_run_directory_exits_2(tmp_path):
    proc = alignloop("report", tmp_path / "nope", check=False)
    assert proc.returncode == 2 and "run directory not found" in proc.stderr
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "eval.json").write_text('{"stages": [')
    proc = alignloop("report", tmp_path / "run", check=False)
    assert proc.returncode == 2 and "eval.json" in proc.stderr and "not valid JSON" in proc.stderr
    assert not (tmp_path / "run" / "report.html").exists()
    proc = alignloop("report", tmp_path, check=False)  # a folder, but not a run directory
    assert proc.returncode == 2 and "not a run directory" in proc.stderr


def test_overoptimisation_sentence_reads_the_data():
    def rows(gold):
        return [{"x": i + 1, "kl_sampled": i / 2, "gold_probe": g, "rm_probe": i / 2} for i, g in enumerate(gold)]
    exploited = overopt_sentence(rows([0.50, 0.55, 0.60, 0.62, 0.60, 0.57, 0.54, 0.52]))
    assert "peaked at 0.620" in exploited and "ended at 0.520" in exploited and "exploiting" in exploited
    assert re.search(r"a drop of 0\.100 ± 0\.0\d\d \(95%", exploited)   # the verdict comes with its interval
    kept_up = overopt_sentence(rows([0.50, 0.52, 0.55, 0.57, 0.60, 0.62]))
    assert "gold kept up with the proxy" in kept_up and "+0.120 ± 0.0" in kept_up
    # a noisy level series whose best point is 0.05 above its last: within the noise, so no verdict of exploitation
    noisy = overopt_sentence(rows([0.50, 0.56, 0.49, 0.55, 0.50, 0.56, 0.51]))
    assert "exploiting" not in noisy and "stayed level within the noise" in noisy
    assert "no verdict" in overopt_sentence(rows([0.50, 0.60, 0.55, 0.52]))    # 4 points: noise unknown
    assert "Too few" in overopt_sentence(rows([0.5]))


def synthetic_run(run):
    """Every metrics file and eval.json the report reads, with made-up numbers (no model needed)."""
    def write(sub, rows):
        (run / sub).mkdir(parents=True, exist_ok=True)
        (run / sub / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write("pretrain", [{"step": s, "loss": 3 - s / 10, "val_loss": 2.5 - s / 10 + (s > 10) * (s - 10) / 5,
                        "val_bpb": 1.2, "lr": 1e-3, "tokens_per_s": 5000} for s in range(1, 16)])
    write("sft", [{"step": s, "loss": 2 - s / 10, "val_loss": 2.1 - s / 20, "lr": 1e-4} for s in range(1, 6)])
    write("round-1/reward", [{"step": s, "loss": 0.7 - s / 50, "lr": 1e-5} for s in range(1, 6)])
    ppo_keys = ["rm_score", "reward", "rm_probe", "gold_rollout", "gold_probe", "kl_sampled", "beta", "entropy",
                "clip_frac", "approx_kl", "vf_loss", "pg_loss", "explained_variance", "response_length",
                "distinct_2_probe", "ended_share", "generation_share", "tokens_per_s"]
    write("round-1/ppo", [{"step": s, **{k: 0.1 * s + 0.01 * j for j, k in enumerate(ppo_keys)}} for s in range(1, 7)])
    stages = {}
    for name in ("base", "sft", "round-1/ppo"):
        ex = [{"id": f"t-{i}", "category": "multi", "prompt": f"And the second question {i}?",
               "context": [{"role": "user", "content": f"First question {i}"},
                           {"role": "assistant", "content": f"First answer {i}"}],
               "answer": f"{name} says {i}", "gold_score": 0.5} for i in range(3)]
        stages[name] = {"gold_score": 0.5, "helpful": 0.1, "truthful": 0.2, "harmless": 0.9, "n_prompts": 3,
                        "ci95": {"gold_score": [0.4, 0.6]}, "rm_score": 0.1, "kl_exact": 0.0 if name == "sft" else 2.0,
                        "distinct_2": 0.8, "categories": {"multi": {"gold_score": 0.5, "n_prompts": 3}}, "examples": ex}
    (run / "eval.json").write_text(json.dumps({"stages": stages, "reward_model": {}}))


def test_every_figure_has_axis_labels_and_a_plain_title(tmp_path):
    import html as H
    from alignloop.report import LABELS
    run = tmp_path / "run"
    synthetic_run(run)
    page = write_report(run).read_text(encoding="utf-8")
    figures = [json.loads(H.unescape(a)) for a in re.findall(r'<figure data-axes="([^"]*)">', page)]
    panels = [ax for f in figures for ax in f]
    assert len(figures) >= 7 and len(panels) >= 25 and len(figures) == len(IMG.findall(page))
    for ax in panels:
        assert ax["x"].strip() and ax["y"].strip(), ax                      # both axes say what they show
        assert ax["title"].strip() and ax["title"] not in LABELS, ax        # a title, and not a raw metric key
        assert not re.fullmatch(r"[a-z0-9_]+", ax["title"]) and not re.search(r"\b(val_bpb|rm_probe|generation_share)\b",
                                                                              ax["title"]), ax
    # the glossary comes first; the held-out loss turned up at step 10; the multi-turn context is shown
    assert page.index("What the numbers mean") < page.index("1. Summary")
    for term in ("gold score", "helpful, truthful, harmless", "RM score", "kl_exact, kl_sampled", "distinct-2"):
        assert f"<dt>{term}</dt>" in page
    assert "held-out loss was lowest at step 10" in page
    assert "<b>user:</b> First question 1</div>" in page and "<b>assistant:</b> First answer 1</div>" in page
    assert 'name="viewport"' in page


def test_gao_fit_of_beta_runs_beside_the_run(tmp_path):
    """experiments/beta.py's runs (runs/beta-<β>/ sharing the run's sft/) are fitted; exact synthetic curves:
    α 0.2, β 0.1 peaks at d* = exp(0.2/0.1 − 1) = e, KL = e² = 7.39 nats; α 0.1, β −0.05 never turns down."""
    import math
    run = tmp_path / "tiny"
    (run / "sft").mkdir(parents=True)
    (tmp_path / "elsewhere" / "sft").mkdir(parents=True)
    for name, kl_coef, a, b, sft in (("beta-0.1", 0.1, 0.2, 0.1, run / "sft"), ("beta-0", 0.0, 0.1, -0.05, run / "sft"),
                                     ("beta-0.2", 0.2, 0.5, 0.05, run / "sft"),  # peak at d* = e^9: far beyond the data
                                     ("beta-0.5", 0.5, 0.0, 1.0, tmp_path / "elsewhere" / "sft")):  # not this run's
        folder = tmp_path / name / "round-1" / "ppo"
        folder.mkdir(parents=True)
        (tmp_path / name / "sft").symlink_to(sft)
        rows = [{"step": 0, "kl_sampled": 0.0, "beta": kl_coef, "gold_probe": 0.7, "rm_probe": 0.0}]
        rows += [{"step": 5 * i, "kl_sampled": (0.4 * i) ** 2, "beta": kl_coef, "gold_probe": 0.7 + 0.4 * i * (a - b * math.log(0.4 * i)),
                  "rm_probe": 0.1 * i} for i in range(1, 11)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    html = gao_section(run)
    assert "experiments/beta.py" in html and len(IMG.findall(html)) == 1
    assert "β_KL = 0.1: α = 0.200, β = 0.100; the fitted gold peaks at √KL = 2.72, KL = 7.39 nats" in html
    assert "β_KL = 0: α = 0.100, β = -0.050 ≤ 0: the fitted gold does not turn down" in html
    assert "β_KL = 0.2: α = 0.500, β = 0.050; the fitted gold still rises at the largest KL measured (16.00 nats)" in html
    assert "β_KL = 0.1, measured: the dev-probe gold is highest at KL 7.84 nats (+0.272" in html  # d = 2.8, the point nearest e
    assert "β_KL = 0.5" not in html


def test_methods_section_picks_on_dev_and_judges_ppo(tmp_path):
    """experiments/methods.py's table (RUN/methods/methods.json): each method's ★ is the strength with the
    highest DEV gold, not test; the verdict names each method's best test gold with its KL and says that
    PPO's crown does not hold when DPO's dev-chosen gain is higher with the intervals apart."""
    from alignloop.report import methods_section
    run = tmp_path / "run"
    (run / "methods").mkdir(parents=True)
    row = lambda m, s, gold, dev, kl, gain, half: {  # noqa: E731
        "method": m, "strength": s, "gold": gold, "gold_ci": [gold - 0.01, gold + 0.01], "dev_gold": dev, "kl": kl,
        "kl_is_bound": m == "bo", "gain": gain, "gain_half": half, "rm_score": 0.1, "distinct_2": 0.3,
        "train": {"seconds": 10.0, "peak_gb": 0.5}}
    rows = [{**row("sft", 0.0, 0.60, 0.58, 0.0, None, None), "train": None},
            row("ppo", 0.05, 0.64, 0.60, 2.0, 0.040, 0.010),   # best on test, not on dev
            row("ppo", 0.2, 0.62, 0.63, 0.5, 0.020, 0.010),    # best on dev: ★, the figure to quote
            row("dpo", 0.1, 0.66, 0.65, 1.5, 0.060, 0.010),
            row("dpo", 0.5, 0.61, 0.59, 0.2, 0.010, 0.010),
            row("bo", 16.0, 0.59, 0.57, 1.835, -0.010, 0.010)]
    (run / "methods" / "methods.json").write_text(json.dumps(rows))
    html = methods_section(run)
    assert len(IMG.findall(html)) == 1
    assert "β = 0.2 ★" in html and "β = 0.05 ★" not in html and "β = 0.1 ★" in html and "N = 16 ★" in html
    assert "PPO: best test gold 0.640 at β 0.05, KL 2.00 nats; chosen on dev: β 0.2, test gain +0.020 [+0.010, +0.030]." in html
    assert "best-of-N: best test gold 0.590 at N 16, KL ≤ 1.83 nats" in html
    assert ("PPO&#x27;s crown does not hold here: DPO gains more at the strengths chosen on dev "
            "(+0.060 against PPO&#x27;s +0.020; their intervals apart).") in html
    rows[3]["gain"] = 0.025  # DPO now within PPO's interval: not a verdict either way
    rows[3]["dev_gold"] = 0.66
    (run / "methods" / "methods.json").write_text(json.dumps(rows))
    assert "PPO&#x27;s crown is not established here: DPO gains as much or more" in methods_section(run)
    shutil.rmtree(run / "methods")
    assert "experiments/methods.py --run RUN" in methods_section(run)
