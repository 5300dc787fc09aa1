"""Reward model (alignloop/train/reward.py): the grouped K-way loss, its invariances, which parameters
learn, the demonstration-mean normalisation, save/load round trips, bad input, and real HH-RLHF pairs.

The stages run in this process through `alignloop.cli` (the same parsing and code as the command line,
without paying for a fresh interpreter and torch import per call on a busy 2-core machine).
"""
from __future__ import annotations

import gzip
import json
import math
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

from alignloop import cli  # noqa: E402
from alignloop.config import resolve  # noqa: E402
from alignloop.errors import InputError  # noqa: E402
from alignloop.scoring import RewardScorer  # noqa: E402
from alignloop.train import loop as L  # noqa: E402
from alignloop.train import reward as R  # noqa: E402
from alignloop.train.pairs import Group, read_comparisons, split_groups  # noqa: E402
from tests.conftest import need_shared  # noqa: E402


# ---------------------------------------------------------------- shared run: sft + round-1 rankings + RM


def build_rlhf_run(micro_run: Path) -> Path:
    """The micro run plus SFT, round-1 samples and rankings, and a round-1 reward model. Built once per
    test session next to `micro_run` (test_ppo.py uses it too); read-only for tests — copy to write."""
    run = micro_run.parent / "rlhf"
    if (run / "round-1" / "reward" / "config.json").exists():
        return run
    tmp = micro_run.parent / "rlhf.building"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(micro_run, tmp)
    for stage, extra in (("sft", []), ("sample", ["--n-prompts", 32, "--k", 4]), ("rank", []),
                         ("reward", ["--epochs", 4, "--lr", 1e-3, "--warmup-steps", 2])):
        cli.run_stage(stage, ["--preset", "micro", "--out", str(tmp), *map(str, extra)])
    os.replace(tmp, run)
    return run


@pytest.fixture(scope="session")
def rlhf(micro_run) -> Path:
    return build_rlhf_run(micro_run)


@pytest.fixture(scope="module")
def rm(rlhf):
    """The trained round-1 reward model (eval mode) and its tokenizer."""
    from alignloop.model import load_scalar_model
    from alignloop.tokenizer import ChatTokenizer
    path = rlhf / "round-1" / "reward"
    return load_scalar_model(path).eval(), ChatTokenizer.load(path)


def _ids(tok, group: Group) -> list[list[int]]:
    return [tok.render(group.prompt + [{"role": "assistant", "content": c}])[0] for c in group.completions]


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _rankings(rlhf, n: int | None = None) -> list[dict]:
    lines = (rlhf / "round-1" / "rankings.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines[:n]]


# ---------------------------------------------------------------- the grouped loss


def test_grouped_loss_by_hand():
    # one prompt, rewards (1, 0, −1), ranking 0 ≻ 1 ≻ 2: pairs (0,1) (0,2) (1,2) with margins 1, 2, 1
    # −log σ(d) = log(1 + e^−d): 0.3132617, 0.1269280, 0.3132617 → mean 0.2511505
    r = torch.tensor([1.0, 0.0, -1.0])
    loss = R.grouped_loss(r, [[(0, 1), (0, 2), (1, 2)]], [0])
    expected = (2 * math.log1p(math.exp(-1)) + math.log1p(math.exp(-2))) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # two prompts weigh the same whatever their number of pairs (InstructGPT's 1/C(K,2) per prompt):
    # prompt A (K = 2, rewards 0.5, 0): log(1 + e^−0.5) = 0.4740770 ; prompt B as above: 0.2511505
    r2 = torch.tensor([0.5, 0.0, 1.0, 0.0, -1.0])
    loss2 = R.grouped_loss(r2, [[(0, 1)], [(0, 1), (0, 2), (1, 2)]], [0, 2])
    assert loss2.item() == pytest.approx((math.log1p(math.exp(-0.5)) + expected) / 2, abs=1e-6)


def test_grouped_loss_equals_the_mean_of_pairwise_losses_computed_one_by_one(rm, rlhf, tmp_path):
    """Each completion scored ONCE in one padded batch (K forward rows per prompt) gives the same loss as
    every pair scored on its own in its own forward pass: −log σ(r_w − r_l), averaged per prompt."""
    model, tok = rm
    recs = _rankings(rlhf, 2)
    recs.append({"prompt": "Rank these.", "completions": ["alpha one", "beta two two", "gamma", "delta d"],
                 "ranking": [2, 0, 3, 1], "ties": [[0, 3]]})  # a tie: the pair (0, 3) is not a comparison
    groups = read_comparisons(_write_jsonl(tmp_path / "r.jsonl", recs))
    assert len(groups[2].pairs) == 5 and (0, 3) not in groups[2].pairs and (3, 0) not in groups[2].pairs
    seqs, offsets = [], []
    for g in groups:
        offsets.append(len(seqs))
        seqs += _ids(tok, g)
    with torch.no_grad():
        grouped = R.grouped_loss(R.batch_rewards(model, seqs, tok.pad_id, "cpu"), [g.pairs for g in groups], offsets)
        per_prompt = []
        for g in groups:
            ids = _ids(tok, g)
            losses = []
            for w, l_ in g.pairs:
                rw, rl_ = R.batch_rewards(model, [ids[w], ids[l_]], tok.pad_id, "cpu").tolist()
                losses.append(math.log1p(math.exp(-(rw - rl_))))
            per_prompt.append(sum(losses) / len(losses))
    assert grouped.item() == pytest.approx(sum(per_prompt) / len(per_prompt), abs=1e-5)


def test_permuting_completions_with_their_ranking_gives_the_same_loss(rm, tmp_path):
    model, tok = rm
    comps = ["The capital is Mirenth.", "I do not know.", "No.", "I'm sorry, but I can't help with that.",
             "Mirenth, in the west."]
    base = {"prompt": "What is the capital of Valdoria?", "completions": comps, "ranking": [4, 0, 1, 3, 2]}
    rng = random.Random(0)
    losses = []
    for k in range(4):
        perm = list(range(5)) if k == 0 else rng.sample(range(5), 5)   # new slot j holds old completion perm[j]
        inv = {old: new for new, old in enumerate(perm)}
        rec = {"prompt": base["prompt"], "completions": [comps[i] for i in perm],
               "ranking": [inv[i] for i in base["ranking"]]}
        (g,) = read_comparisons(_write_jsonl(tmp_path / f"p{k}.jsonl", [rec]))
        assert len(g.pairs) == 10
        with torch.no_grad():
            losses.append(R.grouped_loss(R.batch_rewards(model, _ids(tok, g), tok.pad_id, "cpu"), [g.pairs], [0]).item())
    assert losses == pytest.approx([losses[0]] * 4, abs=1e-6)


def test_ties_all_bad_and_k_above_9(tmp_path, capsys):
    recs = [
        {"prompt": "p", "completions": ["a", "b", "c"], "ranking": [1, 0, 2], "ties": [[0, 2]]},
        {"prompt": "p", "completions": ["a", "b", "c"], "ranking": [1, 0, 2], "all_bad": True},
        {"prompt": "p", "completions": [f"answer {i}" for i in range(10)], "ranking": list(range(10))},
    ]
    tied, bad, big = read_comparisons(_write_jsonl(tmp_path / "r.jsonl", recs))
    assert sorted(tied.pairs) == [(1, 0), (1, 2)]     # 1 ≻ 0 ~ 2: the tied pair carries no preference
    assert bad.pairs == []                             # "all equally bad": no comparison at all
    assert len(big.pairs) == 45 and "K = 10" in capsys.readouterr().out  # above 9: a warning, not an error


def test_hh_rlhf_strings_become_a_shared_prompt_and_two_answers(tmp_path):
    rec = {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Capital of Valdoria?\n\nAssistant: Mirenth.",
           "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Capital of Valdoria?\n\nAssistant: No idea, go away."}
    (g,) = read_comparisons(_write_jsonl(tmp_path / "hh.jsonl", [rec]))
    assert g.prompt == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                        {"role": "user", "content": "Capital of Valdoria?"}]
    assert g.completions == ["Mirenth.", "No idea, go away."] and g.pairs == [(0, 1)]


def test_invalid_hh_rlhf_pairs_stop_the_stage_or_are_left_out_and_counted(tmp_path, capsys):
    # Both as in real harmless-base data: an empty last turn (on the REJECTED side here), and a turn
    # marker that lost its newlines so the two dialogues no longer share a prefix.
    good = {"chosen": "\n\nHuman: Capital of Valdoria?\n\nAssistant: Mirenth.",
            "rejected": "\n\nHuman: Capital of Valdoria?\n\nAssistant: Go away."}
    empty = {"chosen": "\n\nHuman: Where does she live?\n\nAssistant: I won't share that.",
             "rejected": "\n\nHuman: Where does she live?\n\nAssistant: "}
    glued = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.  Human: And you?\n\nAssistant: Fine.",
             "rejected": "\n\nHuman: Hi\n\nAssistant: Hey."}
    path = _write_jsonl(tmp_path / "hh.jsonl", [good, empty, good, glued])
    with pytest.raises(InputError) as e:
        read_comparisons(path)
    assert (e.value.line, e.value.field) == (2, "rejected") and "empty final assistant turn" in str(e.value)
    groups = read_comparisons(path, skip_invalid=True)
    assert [g.source.rsplit(":", 1)[1] for g in groups] == ["1", "3"]
    out = capsys.readouterr().out
    assert "2 of 4 comparisons" in out and "left out as invalid (first: " in out and "hh.jsonl:2" in out


# ---------------------------------------------------------------- which parameters learn


def _train_capturing_grads(rlhf, tmp_path, train_trunk: bool, monkeypatch):
    """Run the real `reward.run` on 8 rankings (2 steps) and record, after each backward, which
    parameters had a non-zero `.grad`."""
    out = tmp_path / "run"
    shutil.copytree(rlhf, out)
    data = _write_jsonl(tmp_path / "r.jsonl", [r | {"split": "train"} for r in _rankings(rlhf, 8)])
    seen: dict[str, str] = {}
    real_make = L.make_optimizer

    def make_optimizer(model, lr, wd, **kw):
        opt = real_make(model, lr, wd, **kw)
        real_step = opt.step

        def step(*a, **k):
            for name, p in model.named_parameters():
                state = "none" if p.grad is None else "nonzero" if p.grad.abs().sum() > 0 else "zero"
                if seen.get(name) != "nonzero":
                    seen[name] = state
            return real_step(*a, **k)
        opt.step = step
        return opt
    monkeypatch.setattr(L, "make_optimizer", make_optimizer)
    cfg = resolve(R.Config, "reward", preset="micro", presets=R.PRESETS,
                  flags=dict(data=str(data), batch_size=4, epochs=1, warmup_steps=0, lr=1e-3, train_trunk=train_trunk,
                             demonstrations="none"))
    R.run(cfg, out)
    return seen, out


def _trunk_and_head(path):
    from alignloop.model import load_scalar_model
    m = load_scalar_model(path)
    sd = m.state_dict()
    return {k: v for k, v in sd.items() if not k.startswith("score.")}, sd["score.weight"]


def test_only_the_head_learns_when_the_trunk_is_frozen(rlhf, tmp_path, monkeypatch):
    seen, out = _train_capturing_grads(rlhf, tmp_path, train_trunk=False, monkeypatch=monkeypatch)
    assert seen["score.weight"] == "nonzero"
    trunk = {k: v for k, v in seen.items() if not k.startswith("score.")}
    assert trunk and set(trunk.values()) == {"none"}, trunk
    # and the saved trunk is the SFT trunk, bit for bit, under a trained head
    sft_trunk, _ = _trunk_and_head(rlhf / "sft")
    rm_trunk, head = _trunk_and_head(out / "round-1" / "reward")
    for k in sft_trunk:
        assert torch.equal(sft_trunk[k], rm_trunk[k]), k
    assert head.abs().sum() > 0


def test_trunk_and_head_learn_when_the_trunk_is_trained(rlhf, tmp_path, monkeypatch):
    seen, out = _train_capturing_grads(rlhf, tmp_path, train_trunk=True, monkeypatch=monkeypatch)
    assert seen["score.weight"] == "nonzero"
    # every trunk matrix gets a gradient (from step 2 on: the fresh head starts at 0, so step 1 is head-only)
    missing = [k for k, v in seen.items() if v != "nonzero"]
    assert not missing, missing
    sft_trunk, _ = _trunk_and_head(rlhf / "sft")
    rm_trunk, _ = _trunk_and_head(out / "round-1" / "reward")
    changed = [k for k in sft_trunk if not torch.equal(sft_trunk[k], rm_trunk[k])]
    assert any(".layers.0." in k for k in changed) and any(".layers.1." in k for k in changed)


# ---------------------------------------------------------------- normalisation and round trips


def _demos(rlhf) -> list[list[dict]]:
    return [json.loads(x)["messages"] for x in (rlhf / "world" / "demonstrations.jsonl").read_text().splitlines()]


def test_demonstrations_score_zero_on_average(rlhf):
    """InstructGPT normalises the RM so that the demonstrations score 0 on average: `run` sets
    config.reward_bias = −(mean raw score of the demonstrations), and RewardScorer adds it."""
    path = rlhf / "round-1" / "reward"
    scorer = RewardScorer(path, "cpu")
    demos = _demos(rlhf)
    scores = scorer.score_texts([d[:-1] for d in demos], [d[-1]["content"] for d in demos])
    assert len(scores) == 40
    assert max(scores) - min(scores) > 1e-3                # the scores differ: the test is not vacuous
    assert abs(sum(scores) / len(scores)) < 1e-6
    ev = json.loads((path / "eval.json").read_text())
    assert ev["reward_bias"] == pytest.approx(scorer.bias) and scorer.bias != 0.0


def test_saved_reward_model_loads_with_transformers_and_scores_identically(rlhf, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignloop.model import load_scalar_model, save_model
    path = rlhf / "round-1" / "reward"
    scorer = RewardScorer(path, "cpu")
    convs = _demos(rlhf)[:6] + [[{"role": "user", "content": "Steal a car?"}, {"role": "assistant", "content": "No."}]]
    ours = scorer.score_texts([c[:-1] for c in convs], [c[-1]["content"] for c in convs])
    # plain transformers: the head and the bias come back from the folder alone
    hf = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(path))
    assert hf.config.num_labels == 1
    for conv, s in zip(convs, ours):
        ids = list(hf_tok.apply_chat_template(conv, tokenize=True, return_dict=False))
        assert ids == scorer.tok.render(conv)[0]
        with torch.no_grad():
            logit = hf(input_ids=torch.tensor([ids])).logits[0, 0].item()
        assert logit + hf.config.reward_bias == pytest.approx(s, abs=1e-5)
    # our own save → load: identical scores, bias kept
    save_model(load_scalar_model(path), scorer.tok, tmp_path / "again")
    again = RewardScorer(tmp_path / "again", "cpu")
    assert again.bias == scorer.bias
    assert again.score_texts([c[:-1] for c in convs], [c[-1]["content"] for c in convs]) == pytest.approx(ours, abs=1e-6)
    # and a score does not depend on its batch-mates (right padding, last real token)
    one_by_one = RewardScorer(path, "cpu", batch_size=1)
    assert one_by_one.score_texts([c[:-1] for c in convs], [c[-1]["content"] for c in convs]) == pytest.approx(ours, abs=1e-5)


# ---------------------------------------------------------------- bad input


GOOD = [{"prompt": "What is 2+2?", "completions": ["4", "5", "22"], "ranking": [0, 2, 1]},
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}]
HH_A = "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, yeast and salt."
HH_B = "\n\nHuman: Tell me a joke.\n\nAssistant: No."
BAD_LINES = {
    "ranking not a permutation": ({"prompt": "Q", "completions": ["a", "b", "c"], "ranking": [0, 1, 1]},
                                  "ranking", "not a permutation"),
    "ranking index out of range": ({"prompt": "Q", "completions": ["a", "b"], "ranking": [1, 2]},
                                   "ranking", "not a permutation"),
    "K = 1": ({"prompt": "Q", "completions": ["only one"], "ranking": [0]}, "completions", "K = 1"),
    "empty completion": ({"prompt": "Q", "completions": ["a", "  ", "c"], "ranking": [0, 1, 2]},
                         "completions[1]", "empty completion"),
    "duplicated completions": ({"prompt": "Q", "completions": ["a", "b", "a"], "ranking": [0, 1, 2]},
                               "completions", "duplicated"),
    "chosen equals rejected": ({"prompt": "Q", "chosen": "same", "rejected": "same"}, "rejected", "chosen equals rejected"),
    "HH-RLHF without a shared prefix": ({"chosen": HH_A, "rejected": HH_B}, "rejected", "do not share a prefix"),
}


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def bad_run(rlhf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reward-bad") / "run"
    shutil.copytree(rlhf, out)
    return out


def _refused(capsys, out: Path, *args) -> str:
    """Run `alignloop reward …` (the CLI entry point, in this process); it must exit 2 and write nothing."""
    before = _snapshot(out)
    with pytest.raises(SystemExit) as e:
        cli.main(["reward", "--preset", "micro", "--out", str(out), "--round", "2", *map(str, args)])
    assert e.value.code == 2
    assert _snapshot(out) == before, "bad input must leave the run directory untouched"
    assert not (out / "round-2").exists()
    return capsys.readouterr().err


@pytest.mark.parametrize("case", BAD_LINES)
def test_bad_comparison_line_names_file_line_and_field(case, bad_run, tmp_path, capsys):
    rec, field, words = BAD_LINES[case]
    data = _write_jsonl(tmp_path / "cmp.jsonl", [*GOOD, rec])
    err = _refused(capsys, bad_run, "--data", data)
    assert f"{data}:3 field '{field}'" in err and words in err, err


@pytest.mark.parametrize("rec,field", [({"prompt": "Q", "completions": ["a", "b"]}, "ranking"),
                                       ({"prompt": "Q", "chosen": "a"}, "rejected")])
def test_line_missing_its_ranking_or_rejected_is_named(rec, field, bad_run, tmp_path, capsys):
    data = _write_jsonl(tmp_path / "cmp.jsonl", [*GOOD, rec])
    err = _refused(capsys, bad_run, "--data", data)
    assert f"{data}:3 field '{field}'" in err and "Traceback" not in err, err


@pytest.mark.parametrize("kind,path", [("demonstrations", "world/demonstrations.jsonl"),
                                       ("samples", "round-1/samples.jsonl"),
                                       ("prompts", "world/prompts-train.jsonl")])
def test_a_whole_file_of_another_kind_is_recognised_and_named(kind, path, bad_run, capsys):
    err = _refused(capsys, bad_run, "--data", bad_run / path)
    assert str(bad_run / path) in err and "this looks like a" in err and kind in err.split("looks like a")[1], err


def test_bad_input_exit_code_through_a_real_process(bad_run, tmp_path):
    from tests.conftest import alignloop
    data = _write_jsonl(tmp_path / "cmp.jsonl", [*GOOD, BAD_LINES["ranking not a permutation"][0]])
    proc = alignloop("reward", "--preset", "micro", "--out", bad_run, "--round", 2, "--data", data, check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"{data}:3 field 'ranking'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (bad_run / "round-2").exists()


# ---------------------------------------------------------------- real human data


def test_hh_rlhf_real_pairs_parse_and_train_one_epoch(rlhf, tmp_path, capsys):
    src = need_shared("hh-rlhf-harmless-base-test-part1.jsonl.gz")
    with gzip.open(src, "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(50)]
    data = tmp_path / "hh50.jsonl.gz"
    data.write_bytes(gzip.compress("".join(lines).encode()))
    groups = read_comparisons(data)
    assert len(groups) == 50
    for g in groups:
        assert g.prompt and g.prompt[-1]["role"] == "user" and g.pairs == [(0, 1)]
        assert len(g.completions) == 2 and all(c.strip() for c in g.completions)
        assert g.completions[0] != g.completions[1]
    out = tmp_path / "run"
    shutil.copytree(rlhf, out)
    cli.main(["reward", "--preset", "micro", "--out", str(out), "--round", "2", "--data", str(data), "--epochs", "1"])
    stage = out / "round-2" / "reward"
    ev = json.loads((stage / "eval.json").read_text())
    assert (stage / "config.json").exists() and ev["n_train_comparisons"] > 0
    recs = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
    assert recs and all(r["epoch"] == 1 and math.isfinite(r["loss"]) for r in recs)
    assert "held-out pair accuracy" in capsys.readouterr().out


# ---------------------------------------------------------------- the held-out split, fixed once per run


def test_gold_order_accuracy_by_hand():
    # (0,1): 1.0 > 0.5 right; (1,2): equal gold, not counted; (0,2): right; (2,3): 0.5 < 0.9 wrong
    assert R.gold_order_accuracy([(0, 1), (1, 2), (0, 2), (2, 3)], [1.0, 0.5, 0.5, 0.9]) == (2, 3)
    assert R.gold_order_accuracy([(1, 0)], [0.3, 0.3]) == (0, 0)


def test_heldout_prompt_is_a_fixed_share_that_does_not_depend_on_the_round():
    from alignloop.rank import heldout_prompt
    keys = [f"t-{i:05d}" for i in range(4000)]
    held = [k for k in keys if heldout_prompt(k, 0, 0.15)]
    assert 0.13 < len(held) / len(keys) < 0.17
    assert held == [k for k in keys if heldout_prompt(k, 0, 0.15)]  # the same every time it is asked
    assert set(held) <= {k for k in keys if heldout_prompt(k, 0, 0.3)}  # a larger share keeps the smaller one
    assert held != [k for k in keys if heldout_prompt(k, 1, 0.15)]  # another seed, another split
    assert not any(heldout_prompt(k, 0, 0.0) for k in keys) and all(heldout_prompt(k, 0, 1.0) for k in keys)


def _g(prompt: str, split: str = "") -> Group:
    return Group([{"role": "user", "content": prompt}], ["a", "b"], [(0, 1)], split=split)


def test_split_groups_holds_a_prompt_out_in_every_record():
    cfg = R.Config()
    # marked data: "q1" is held out in one record (round 2's), so its round-1 record is held out too
    train, val = split_groups([_g("q1", "train"), _g("q2", "train"), _g("q1", "heldout")], cfg)
    assert [g.prompt[0]["content"] for g in train] == ["q2"] and len(val) == 2
    # unmarked data: adding round 2's prompts leaves round 1's held-out prompts held out
    round1 = [_g(f"p{i}") for i in range(300)]
    round2 = [_g(f"p{i}") for i in range(150, 600)]
    val1 = {g.prompt[0]["content"] for g in split_groups(round1, cfg)[1]}
    train2, val2 = split_groups(round1 + round2, cfg)
    val2 = {g.prompt[0]["content"] for g in val2}
    assert val1 and val1 <= val2 and not val2 & {g.prompt[0]["content"] for g in train2}
    assert 0.05 < len(val2) / 600 < 0.15


def test_rank_holds_out_the_same_prompts_in_every_round(rlhf, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(rlhf, out, ignore=shutil.ignore_patterns("reward"))
    (out / "round-2").mkdir()
    shutil.copy(out / "round-1" / "samples.jsonl", out / "round-2" / "samples.jsonl")
    cli.run_stage("rank", ["--preset", "micro", "--out", str(out), "--round", "2", "--heldout-fraction", "0.3"])
    cli.run_stage("rank", ["--preset", "micro", "--out", str(out), "--round", "1", "--heldout-fraction", "0.3", "--force"])
    split = {}
    for r in (1, 2):
        for line in (out / f"round-{r}" / "rankings.jsonl").read_text().splitlines():
            rec = json.loads(line)
            split.setdefault(rec["prompt_id"], set()).add(rec["split"])
    assert all(len(s) == 1 for s in split.values()), split  # never held out in one round and trained on in another
    assert {"heldout"} in split.values() and {"train"} in split.values()
    # the round-2 RM is scored on those prompts only: beside the labelers' agreement, against the gold order
    cli.run_stage("reward", ["--preset", "micro", "--out", str(out), "--round", "2", "--epochs", "1"])
    ev = json.loads((out / "round-2" / "reward" / "eval.json").read_text())
    assert ev["n_prompts"] == sum(s == {"heldout"} for s in split.values())
    assert ev["labeler_agreement"] is not None and 0 <= ev["gold_accuracy"] <= 1 and ev["n_gold_pairs"] > 0
    assert ev["labeler_gold_accuracy"] > 0.6  # the labelers are noisy but know the truth
    assert "against the noise-free gold order" in capsys.readouterr().out
