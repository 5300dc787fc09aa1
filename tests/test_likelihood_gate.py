"""The likelihood-gated reward model (`reward --likelihood-gate`, forward.last_scores): its score against
the same quantity computed another way (the causal LM's own log-probabilities), its independence from
batching, its save/load round trip, PPO against it, and the refusal of a model without tied embeddings."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from alignloop import cli  # noqa: E402
from alignloop.forward import last_scores, right_padded, sequence_scores  # noqa: E402
from alignloop.scoring import RewardScorer  # noqa: E402
from tests.test_reward import build_rlhf_run  # noqa: E402


@pytest.fixture(scope="module")
def gated_run(micro_run, tmp_path_factory) -> Path:
    """The shared micro RLHF run (SFT, round-1 rankings) with a likelihood-gated round-1 reward model."""
    run = tmp_path_factory.mktemp("gated") / "run"
    shutil.copytree(build_rlhf_run(micro_run), run)
    shutil.rmtree(run / "round-1" / "reward")
    cli.run_stage("reward", ["--preset", "micro", "--out", str(run), "--likelihood-gate", "--epochs", "4",
                             "--lr", "1e-3", "--warmup-steps", "2"])
    return run


def _conversations(run: Path, n: int = 3) -> list[tuple[list[dict], str]]:
    recs = [json.loads(x) for x in (run / "round-1" / "rankings.jsonl").read_text().splitlines()[:n]]
    return [(r["prompt"], c) for r in recs for c in r["completions"][:2]]


def test_gated_score_is_the_head_plus_gate_times_the_lm_log_likelihood_of_the_answer(gated_run):
    """Computed a second way: the reward model's weights loaded as a causal LM (its tied embeddings are the
    LM head) give log p(x_t | x_<t) through `transformers`' own forward; the gate and the head are the two
    rows of the score layer applied to the trunk's hidden states. Only the answer's tokens (from the first
    one after the assistant header, through the end-of-turn token) count."""
    from transformers import AutoModelForCausalLM
    from alignloop.model import load_scalar_model
    from alignloop.tokenizer import ChatTokenizer
    path = gated_run / "round-1" / "reward"
    rm, tok = load_scalar_model(path, trained=True).eval(), ChatTokenizer.load(path)
    assert rm.config.likelihood_gate and rm.score.weight.shape[0] == 2
    assert rm.score.weight[1].abs().sum() > 0, "the gate learnt nothing: the test would not see a wrong position"
    lm = AutoModelForCausalLM.from_pretrained(str(path), ignore_mismatched_sizes=False).eval()
    lm.lm_head.weight = rm.model.embed_tokens.weight  # tied: the LM head IS the input embeddings
    for prompt, answer in _conversations(gated_run):
        ids = tok.render(prompt + [{"role": "assistant", "content": answer}])[0]
        start = len(tok.render_prompt(prompt))
        x = torch.tensor([ids])
        with torch.no_grad():
            hidden = rm.model(input_ids=x).last_hidden_state[0]
            logp = torch.log_softmax(lm(input_ids=x).logits[0].float(), -1)
            head, gate = (hidden @ rm.score.weight.T).unbind(-1)
            want = head[-1] + sum(gate[t - 1] * logp[t - 1, ids[t]] for t in range(start, len(ids)))
            got = last_scores(rm, x, torch.ones_like(x), [start])[0]
        assert got.item() == pytest.approx(want.item(), abs=1e-4)
        # the prompt's tokens do not count: starting one token earlier changes the score
        with torch.no_grad():
            earlier = last_scores(rm, x, torch.ones_like(x), [start - 1])[0]
        assert earlier.item() != pytest.approx(got.item(), abs=1e-6)


def test_gated_scores_do_not_depend_on_the_batch(gated_run):
    """Right padding and the length-sorted chunks of `sequence_scores` change nothing: each sequence alone
    scores as it does among others of other lengths."""
    scorer = RewardScorer(gated_run / "round-1" / "reward", "cpu")
    convs = _conversations(gated_run, 4)
    seqs = [scorer.tok.render(p + [{"role": "assistant", "content": a}])[0] for p, a in convs]
    starts = [len(scorer.tok.render_prompt(p)) for p, _ in convs]
    assert len({len(s) for s in seqs}) > 1
    together = sequence_scores(scorer.model, seqs, scorer.tok.pad_id, "cpu", starts=starts)
    alone = [sequence_scores(scorer.model, [s], scorer.tok.pad_id, "cpu", starts=[b]).item() for s, b in zip(seqs, starts)]
    assert together.tolist() == pytest.approx(alone, abs=1e-5)
    # what PPO scores (prompt ids + answer ids, `scored_ids`) and what evaluation scores (text) agree
    texts = scorer.score_texts([p for p, _ in convs], [a for _, a in convs])
    assert texts == pytest.approx((together + scorer.bias).tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="starts"):
        ids, attn = right_padded(seqs[:1], scorer.tok.pad_id, "cpu")
        last_scores(scorer.model, ids, attn)


def test_ppo_against_a_gated_reward_model(gated_run, tmp_path):
    """PPO's scores come from the gated reward model (prompt lengths as the answers' starts), its value
    model starts from it (the value is the head's first output), and the run finishes."""
    run = tmp_path / "run"
    shutil.copytree(gated_run, run)
    cli.run_stage("ppo", ["--preset", "micro", "--out", str(run), "--iterations", "2", "--batch-size", "8",
                          "--minibatch-size", "4", "--probe-prompts", "0"])
    recs = [json.loads(x) for x in (run / "round-1" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    last = recs[-1]
    assert last["step"] == 2 and all(torch.isfinite(torch.tensor(last[k])) for k in ("rm_score", "vf_loss", "pg_loss"))
    assert (run / "round-1" / "ppo" / "config.json").exists()


def _refused_with_gate(gated_run: Path, tmp_path: Path, init: Path, capsys) -> str:
    """`reward --likelihood-gate --init INIT` on a copy of the run without its reward model: exit 2, nothing
    written; returns what it said."""
    run = tmp_path / "run"
    shutil.copytree(gated_run, run)
    shutil.rmtree(run / "round-1" / "reward")
    with pytest.raises(SystemExit) as e:
        cli.main(["reward", "--preset", "micro", "--out", str(run), "--likelihood-gate", "--init", str(init)])
    assert e.value.code == 2
    assert not (run / "round-1" / "reward").exists()
    return capsys.readouterr().err


def test_a_model_without_tied_embeddings_is_refused(gated_run, tmp_path, capsys):
    """The gate reads the LM head through the input embeddings: an untied model stops with exit 2, naming
    the field, before any training."""
    init = tmp_path / "untied"
    shutil.copytree(gated_run / "sft", init)
    cfg = json.loads((init / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (init / "config.json").write_text(json.dumps(cfg))
    assert "tie_word_embeddings" in _refused_with_gate(gated_run, tmp_path, init, capsys)


def test_the_gate_is_not_added_to_a_reward_model_that_has_none(gated_run, micro_run, tmp_path, capsys):
    """`--likelihood-gate --init` a reward model trained without the gate: its head has one output, and the
    flag would otherwise be dropped without a word. Exit 2, naming the field; nothing written."""
    plain = build_rlhf_run(micro_run) / "round-1" / "reward"
    assert "likelihood_gate" in _refused_with_gate(gated_run, tmp_path, plain, capsys)
