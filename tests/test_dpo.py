"""DPO (alignloop/train/dpo.py): the loss against hand-computed values and the paper's pairwise form, the
gradient at policy = reference, the answers' log-probs from one padded batch, one epoch on micro lowering
the objective on its own comparisons, LoRA, HH-RLHF pairs, and bad input (exit 2, nothing written).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from alignloop import cli  # noqa: E402
from alignloop import forward as F_  # noqa: E402
from alignloop.config import resolve  # noqa: E402
from alignloop.train import dpo as D  # noqa: E402
from alignloop.train.pairs import read_comparisons, split_groups  # noqa: E402
from tests.test_reward import build_rlhf_run  # noqa: E402  (sft + round-1 rankings + RM, once per session)


@pytest.fixture(scope="session")
def rlhf(micro_run) -> Path:
    return build_rlhf_run(micro_run)


def _cfg(**flags):
    return resolve(D.Config, "dpo", preset="micro", presets=D.PRESETS, flags=flags)


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _softplus(x: float) -> float:  # −log σ(x) = log(1 + e^−x)
    return math.log1p(math.exp(-x))


# ---------------------------------------------------------------- the loss by hand


def test_dpo_loss_by_hand():
    # one prompt, K = 3, ranking 0 ≻ 1 ≻ 2, β = 0.5
    # log π = (−1, −2, −3), log π_ref = (−2, −2, −1): h = 0.5·(1, 0, −2) = (0.5, 0, −1)
    # pairs (0,1) (0,2) (1,2): margins 0.5, 1.5, 1 → log(1+e^−0.5) = 0.474077, log(1+e^−1.5) = 0.201413,
    # log(1+e^−1) = 0.313262; mean 0.329584
    logp, ref = torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-2.0, -2.0, -1.0])
    loss, h = D.dpo_loss(logp, ref, [[(0, 1), (0, 2), (1, 2)]], [0], beta=0.5)
    torch.testing.assert_close(h, torch.tensor([0.5, 0.0, -1.0]))
    assert loss.item() == pytest.approx((_softplus(0.5) + _softplus(1.5) + _softplus(1.0)) / 3, abs=1e-6)
    assert loss.item() == pytest.approx(0.329584, abs=1e-6)
    # h = (0.5, 0, −1) orders all three pairs right; of (1 ≻ 0) and (0 ≻ 2) only the second
    assert D.pair_accuracy(h, [[(0, 1), (0, 2), (1, 2)]], [0]) == (1.0, 3)
    assert D.pair_accuracy(h, [[(1, 0), (0, 2)]], [0]) == (0.5, 2)


def test_k2_is_the_papers_pairwise_loss_and_k_way_the_mean_of_its_pairs():
    """K = 2: −log σ(β·[(log π_w − log π_ref,w) − (log π_l − log π_ref,l)]), the DPO paper's loss; a K-way
    prompt weighs as much as a pair, and its loss is the mean of its pairs' pairwise losses."""
    g = torch.Generator().manual_seed(0)
    logp, ref = -5 * torch.rand(6, generator=g), -5 * torch.rand(6, generator=g)
    beta = 0.3
    for w, l_ in ((0, 1), (1, 0)):
        loss, _ = D.dpo_loss(logp[:2], ref[:2], [[(w, l_)]], [0], beta)
        paper = -torch.nn.functional.logsigmoid(beta * ((logp[w] - ref[w]) - (logp[l_] - ref[l_])))
        assert loss.item() == pytest.approx(paper.item(), abs=1e-6)
    # prompt A: completions 0, 1 of the batch, 1 ≻ 0; prompt B: completions 2..5 (K = 4), local indices
    b_pairs = [(0, 3), (0, 1), (3, 1), (0, 2), (3, 2), (1, 2)]
    loss, _ = D.dpo_loss(logp, ref, [[(1, 0)], b_pairs], [0, 2], beta)
    a = D.dpo_loss(logp, ref, [[(1, 0)]], [0], beta)[0].item()
    b = sum(D.dpo_loss(logp, ref, [[p]], [2], beta)[0].item() for p in b_pairs) / len(b_pairs)
    assert loss.item() == pytest.approx((a + b) / 2, abs=1e-6)


def test_gradient_is_zero_at_policy_equals_reference_with_symmetric_pairs():
    """At π = π_ref every h is 0 and each pair pulls its preferred answer up by β/2 and the other down by
    β/2 (d/dh of −log σ(h_w − h_l) at 0 is ∓½); with every pair present both ways these cancel exactly.
    One-sided pairs do not (the test can fail)."""
    ref = torch.tensor([-3.0, -1.5, -2.2])
    symmetric = [(0, 1), (1, 0), (1, 2), (2, 1), (0, 2), (2, 0)]
    logp = ref.clone().requires_grad_()
    loss, _ = D.dpo_loss(logp, ref, [symmetric], [0], beta=0.7)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    torch.testing.assert_close(logp.grad, torch.zeros(3), atol=1e-8, rtol=0)
    logp = ref.clone().requires_grad_()
    D.dpo_loss(logp, ref, [[(0, 1)]], [0], beta=0.7)[0].backward()
    # d/dlogπ_0 = −β·σ(0) = −0.35, d/dlogπ_1 = +0.35
    torch.testing.assert_close(logp.grad, torch.tensor([-0.35, 0.35, 0.0]), atol=1e-7, rtol=0)


def test_gradient_through_the_model_is_zero_at_the_reference_with_symmetric_pairs(rlhf):
    from alignloop.model import load_causal_lm
    from alignloop.tokenizer import ChatTokenizer
    tok = ChatTokenizer.load(rlhf / "sft")
    model = load_causal_lm(rlhf / "sft")
    allowed = F_.allowed_tokens(tok, model.config.vocab_size)
    prompt = [{"role": "user", "content": "What is the capital of Valdoria?"}]
    rows = [D.answer_ids(tok, prompt, a) for a in ("Mirenth.", "I do not know.", "No.")]
    with torch.no_grad():
        ref = D.sequence_logprobs(model, [p for p, _ in rows], [a for _, a in rows], tok.pad_id, "cpu", allowed)

    def grad_norm(pairs):
        model.zero_grad()
        logp = D.sequence_logprobs(model, [p for p, _ in rows], [a for _, a in rows], tok.pad_id, "cpu", allowed)
        D.dpo_loss(logp, ref, [pairs], [0], 0.1)[0].backward()
        return math.sqrt(sum(float(q.grad.pow(2).sum()) for q in model.parameters() if q.grad is not None))
    assert grad_norm([(0, 1), (1, 0), (0, 2), (2, 0)]) < 1e-6
    assert grad_norm([(0, 1), (0, 2)]) > 1e-3


# ---------------------------------------------------------------- log-probs of whole answers


@pytest.mark.parametrize("max_rows", [64, 2])
def test_answer_logprobs_from_one_batch_equal_each_answer_alone(rlhf, max_rows):
    """log π(y|x) = Σ of the answer tokens' log-probs (content and end-of-turn), from one padded batch of
    prompts of different lengths (or passes of 2 rows, in length order), equals the same sum from each
    conversation run alone, in the rows' own order; the ids are exactly `render`'s."""
    from alignloop.model import load_causal_lm
    from alignloop.tokenizer import ChatTokenizer
    tok = ChatTokenizer.load(rlhf / "sft")
    model = load_causal_lm(rlhf / "sft").eval()
    convs = [([{"role": "user", "content": "Sort 3 1 2."}, {"role": "assistant", "content": "1 2 3"},
               {"role": "user", "content": "Reverse it."}], "3 2 1"),          # the longest first: not length order
             ([{"role": "user", "content": "Hi"}], "Hello there."),
             ([{"role": "user", "content": "What is the capital of Valdoria, please?"}], "Mirenth")]
    rows = [D.answer_ids(tok, p, a) for p, a in convs]
    for (p, a), (prompt, answer) in zip(rows, convs):
        assert p + a == tok.render(prompt + [{"role": "assistant", "content": answer}])[0]
        assert a[-1] == tok.end_id and a[:-1] == tok.encode(answer)
    allowed = F_.allowed_tokens(tok, model.config.vocab_size)
    with torch.no_grad():
        seen = []
        got = D.sequence_logprobs(model, [p for p, _ in rows], [a for _, a in rows], tok.pad_id, "cpu", allowed,
                                  max_rows, progress=seen.append)
        assert seen == ([3] if max_rows == 64 else [2, 1])
        assert len(rows[0][0]) + len(rows[0][1]) > max(len(p) + len(a) for p, a in rows[1:])
        for i, (p, a) in enumerate(rows):
            z = model(input_ids=torch.tensor([p + a])).logits[0].float()
            z[:, ~allowed] = float("-inf")                                      # the engine's vocabulary
            lp = torch.log_softmax(z, -1)[len(p) - 1:len(p) + len(a) - 1].gather(-1, torch.tensor(a)[:, None]).sum()
            assert got[i].item() == pytest.approx(lp.item(), abs=1e-4)


# ---------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def dpo_run(rlhf, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "run"
    shutil.copytree(rlhf, out)
    cli.main(["dpo", "--preset", "micro", "--out", str(out), "--epochs", "2", "--lr", "1e-3", "--beta", "0.5"])
    return out


def _objective(out: Path, model_dir: Path, beta: float):
    """The DPO loss and implicit-reward pair accuracy of a model on the run's training comparisons."""
    from alignloop.model import load_causal_lm
    from alignloop.tokenizer import ChatTokenizer
    tok = ChatTokenizer.load(out / "sft")
    groups = [g for g in read_comparisons(out / "round-1" / "rankings.jsonl") if g.pairs]
    train, _ = split_groups(groups, _cfg())
    rows = [D.answer_ids(tok, g.prompt, c) for g in train for c in g.completions]
    offsets = D._offsets(train)
    with torch.no_grad():
        lp = {}
        for name, path in (("ref", out / "sft"), ("policy", model_dir)):
            m = load_causal_lm(path).eval()
            lp[name] = D.sequence_logprobs(m, [p for p, _ in rows], [a for _, a in rows], tok.pad_id, "cpu",
                                           F_.allowed_tokens(tok, m.config.vocab_size))
    loss, h = D.dpo_loss(lp["policy"], lp["ref"], [g.pairs for g in train], offsets, beta)
    return loss.item(), D.pair_accuracy(h, [g.pairs for g in train], offsets)[0]


def test_training_lowers_the_dpo_loss_on_its_comparisons_and_writes_a_served_stage(dpo_run):
    out = dpo_run
    stage = out / "round-1" / "dpo"
    loss, acc = _objective(out, stage, beta=0.5)
    assert loss < math.log(2) - 0.01 and acc > 0.6, (loss, acc)    # log 2: the loss at π = π_ref
    recs = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # the first step starts at the reference
    assert {"loss", "pair_accuracy", "implicit_reward", "lr"} <= recs[-1].keys()
    ev = json.loads((stage / "eval.json").read_text())
    assert ev["beta"] == 0.5 and 0 <= ev["pair_accuracy"] <= 1 and ev["n_pairs"] > 0 and ev["peak_memory_gb"] > 0
    import tomllib
    assert tomllib.loads((out / "config.toml").read_text())["dpo"]["beta"] == 0.5
    from alignloop.rundir import stage_models
    models = stage_models(out)
    assert models["round-1/dpo"] == models["dpo"] == stage
    from alignloop.model import load_causal_lm
    load_causal_lm(stage)                                           # an ordinary Hugging Face folder


def test_micro_batches_train_what_the_whole_batch_does(dpo_run, rlhf, tmp_path):
    """--micro-batch-size 3 runs each step of 8 prompts as passes of 3, 3 and 2 prompts whose gradients add
    up: the loss at every step and the saved weights are those of the whole batch at once."""
    from tests.test_distributed import assert_same_curve, assert_same_weights
    out = tmp_path / "run"
    shutil.copytree(rlhf, out)
    cli.main(["dpo", "--preset", "micro", "--out", str(out), "--epochs", "2", "--lr", "1e-3", "--beta", "0.5",
              "--micro-batch-size", "3"])
    a, b = out / "round-1" / "dpo", dpo_run / "round-1" / "dpo"
    assert_same_curve(a, b)
    assert_same_weights(a, b)


@pytest.mark.distributed
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp-micro-batches", "fsdp"])
def test_two_processes_train_what_one_does(dpo_run, rlhf, tmp_path, fsdp):
    """torchrun × 2 (gloo): each rank takes its share of every batch's prompts (under DDP in passes of
    --micro-batch-size); the loss at every step, the saved weights and the held-out accuracy equal one
    process's with the same --batch-size."""
    from tests.test_distributed import assert_same_curve, assert_same_weights, torchrun
    out = tmp_path / "run"
    shutil.copytree(rlhf, out)
    # DDP in passes of 3 of each rank's 4 prompts (3 + 1; DDP reduces at the last pass only)
    torchrun("dpo", "--preset", "micro", "--out", out, "--epochs", "2", "--lr", "1e-3", "--beta", "0.5",
             *(["--fsdp"] if fsdp else ["--micro-batch-size", "3"]))
    a, b = out / "round-1" / "dpo", dpo_run / "round-1" / "dpo"
    assert_same_curve(a, b)
    # (the logged per-step pair accuracy is not compared: at step 1 π = π_ref and every h is 0 up to the
    # rounding of a batch's padding, so its ties break by that rounding, which the batch's split changes)
    assert_same_weights(a, b)
    ea, eb = json.loads((a / "eval.json").read_text()), json.loads((b / "eval.json").read_text())
    assert ea["pair_accuracy"] == eb["pair_accuracy"] and ea["steps"] == eb["steps"]


def test_lora_dpo_learns_and_saves_merged(rlhf, tmp_path):
    """With --lora-rank the reference log-probs come from the policy with its adapters off: at the first
    step (adapters' B = 0) the loss is exactly log 2; the folder saved is the merged model."""
    out = tmp_path / "run"
    shutil.copytree(rlhf, out)
    cli.main(["dpo", "--preset", "micro", "--out", str(out), "--lora-rank", "4", "--lr", "3e-3", "--beta", "0.5",
              "--epochs", "2"])
    stage = out / "round-1" / "dpo"
    from safetensors.torch import load_file
    merged, sft = load_file(str(stage / "model.safetensors")), load_file(str(out / "sft" / "model.safetensors"))
    assert merged.keys() == sft.keys()                              # no adapter weights: merged
    assert any(not torch.equal(merged[k], sft[k]) for k in sft)
    first = json.loads((stage / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    loss, _ = _objective(out, stage, beta=0.5)
    assert loss < math.log(2), loss


def test_hh_rlhf_pairs_are_read(rlhf, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(rlhf, out)
    pairs = tmp_path / "hh.jsonl"
    rows = [{"chosen": f"\n\nHuman: What is {a} plus {b}?\n\nAssistant: {a + b}.",
             "rejected": f"\n\nHuman: What is {a} plus {b}?\n\nAssistant: {a + b + 1}."} for a in range(4) for b in range(3)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli.main(["dpo", "--preset", "micro", "--out", str(out), "--data", str(pairs), "--val-fraction", "0.25"])
    ev = json.loads((out / "round-1" / "dpo" / "eval.json").read_text())
    assert ev["n_train_comparisons"] + ev.get("n_pairs", 0) == len(rows)


# ---------------------------------------------------------------- bad input


def _refused(capsys, out: Path, *args) -> str:
    before = _snapshot(out)
    with pytest.raises(SystemExit) as e:
        cli.main(["dpo", "--preset", "micro", "--out", str(out), *map(str, args)])
    assert e.value.code == 2
    assert _snapshot(out) == before, "bad input must leave the run directory untouched"
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def bad_run(rlhf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dpo-bad") / "run"
    shutil.copytree(rlhf, out)
    return out


@pytest.mark.parametrize("beta", ["0", "-0.1"])
def test_beta_must_be_positive(bad_run, capsys, beta):
    err = _refused(capsys, bad_run, "--beta", beta)
    assert "field 'beta'" in err and "β > 0" in err, err


def test_pair_with_chosen_equal_to_rejected_names_file_and_line(bad_run, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}) + "\n"
                    + json.dumps({"prompt": "Hi", "chosen": "Hello.", "rejected": "Hello."}) + "\n")
    err = _refused(capsys, bad_run, "--data", data)
    assert f"{data}:2" in err and "field 'rejected'" in err and "chosen equals rejected" in err, err


def test_ranking_of_one_completion_names_file_and_line(bad_run, tmp_path, capsys):
    data = tmp_path / "rankings.jsonl"
    data.write_text(json.dumps({"prompt": "Hi", "completions": ["Hello.", "Hey."], "ranking": [1, 0]}) + "\n"
                    + json.dumps({"prompt": "Hi", "completions": ["Hello."], "ranking": [0]}) + "\n")
    err = _refused(capsys, bad_run, "--data", data)
    assert f"{data}:2" in err and "field 'completions'" in err and "K = 1" in err, err


def test_a_new_run_with_init_but_no_sft_names_the_reference_flag(rlhf, tmp_path, capsys):
    """--init from elsewhere into a fresh --out: the default reference (the run's sft/) is absent, and the
    message says which flag to give (the SmolLM2 benchmark once stopped here with no hint)."""
    out = tmp_path / "fresh"
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}) + "\n")
    err = _refused(capsys, out, "--init", rlhf / "sft", "--data", data)
    assert "field 'reference'" in err and "give --reference" in err and "Traceback" not in err, err
    assert not out.exists()


def test_another_beta_over_a_finished_dpo_is_refused(dpo_run, capsys):
    err = _refused(capsys, dpo_run, "--epochs", "2", "--lr", "1e-3", "--beta", "0.3")
    assert "another configuration" in err and "field 'beta'" in err, err


def test_dpo_and_rloo_are_side_stages_of_their_round(tmp_path):
    """DPO is built on the rankings and RLOO on the reward model, nothing on either: redoing rank (or the
    reward model) finds them as later stages; PPO does not, and they find nothing later of their own."""
    from alignloop.rundir import later_outputs, stage_outputs
    run = tmp_path / "run"
    for sub in ("round-1/dpo", "round-1/rloo", "round-1/reward", "round-2/dpo"):
        (run / sub).mkdir(parents=True)
        (run / sub / "config.json").write_text("{}")
    assert stage_outputs(run, "dpo", 2) == [run / "round-2" / "dpo"]
    later = lambda s, i=1: {str(p.relative_to(run)) for p in later_outputs(run, s, i)}  # noqa: E731
    assert later("rank") == {"round-1/dpo", "round-1/rloo", "round-1/reward", "round-2/dpo"}
    assert later("reward") == {"round-1/rloo", "round-2/dpo"}
    assert later("ppo") == {"round-2/dpo"}
    assert later("dpo") == later("rloo") == set()


def test_early_stopping_keeps_the_epoch_of_lowest_held_out_loss(rlhf, tmp_path):
    """--early-stop sets a share of the training prompts aside, scores the implicit reward's loss on them
    after every epoch, and saves the epoch of the lowest: the saved model's loss on those prompts is that
    epoch's, not the last's."""
    out = tmp_path / "run"
    shutil.copytree(rlhf, out)
    cli.main(["dpo", "--preset", "micro", "--out", str(out), "--epochs", "4", "--lr", "1e-2", "--beta", "0.5",
              "--early-stop", "0.3"])
    stage = out / "round-1" / "dpo"
    rec = json.loads((stage / "eval.json").read_text())["early_stop"]
    curve = rec["loss_per_epoch"]
    assert len(curve) == 4 and rec["best_epoch"] == 1 + curve.index(min(curve)) and rec["best_loss"] == min(curve)
    assert rec["best_epoch"] < 4, curve  # else this test would not tell a restored model from the last one
    cfg = _cfg(early_stop=0.3, beta=0.5)
    _, _, tok, train, _ = D._comparisons(cfg, out)
    _, stop = D.reward.early_stop_split(train, cfg, "dpo")
    assert 0 < len(stop) < len(train)
    from alignloop.model import load_causal_lm
    with torch.no_grad():
        lp = {}
        for name, path in (("ref", out / "sft"), ("policy", stage)):
            m = load_causal_lm(path).eval()
            lp[name] = D.sequence_logprobs(m, *D._flat(stop), tok.pad_id, "cpu", F_.allowed_tokens(tok, m.config.vocab_size))
    loss, _ = D.dpo_loss(lp["policy"], lp["ref"], [g.pairs for g in stop], D._offsets(stop), 0.5)
    assert loss.item() == pytest.approx(rec["best_loss"], abs=1e-4) and abs(loss.item() - curve[-1]) > 1e-3
