"""PPO (alignloop/train/ppo.py) on `micro`: the batch layout and log-probs, one iteration improves the
reward-model score of its own rollout batch, resume equals an uninterrupted run, and bad input.

The maths (GAE, clipping, KL, whitening, β control) is tested by hand in test_rl_math.py; here the stage
runs for real, in this process (monkeypatching the checkpoint writer to interrupt it, as Ctrl-C would).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_interrupted
import torch

from alignloop import cli  # noqa: E402
from alignloop.config import resolve  # noqa: E402
from alignloop.forward import scalar_values  # noqa: E402
from alignloop.scoring import RewardScorer  # noqa: E402
from alignloop.train import ppo as P  # noqa: E402
from alignloop.train import rl  # noqa: E402
from tests.test_reward import build_rlhf_run  # noqa: E402  (one shared sft + rankings + RM run per session)


@pytest.fixture(scope="session")
def rlhf(micro_run) -> Path:
    return build_rlhf_run(micro_run)


def _cfg(**flags):
    return resolve(P.Config, "ppo", preset="micro", presets=P.PRESETS, flags=flags)


def _argv(flags: dict) -> list[str]:
    out = []
    for k, v in flags.items():
        name = "--" + k.replace("_", "-")
        out += [name if v else "--no-" + name[2:]] if isinstance(v, bool) else [name, str(v)]
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


# ---------------------------------------------------------------- layout and per-token log-probs / values


def test_layout_logprobs_and_values_match_each_sequence_alone(rlhf):
    """Prompts left-padded and responses right-padded into one batch give every response token the
    log-prob (policy) and the state value (value model) it has when its sequence is run alone."""
    from alignloop.model import load_causal_lm, load_scalar_model
    from alignloop.tokenizer import ChatTokenizer
    tok = ChatTokenizer.load(rlhf / "sft")
    policy = load_causal_lm(rlhf / "sft").eval()
    value = load_scalar_model(rlhf / "round-1" / "reward").eval()
    prompts = [tok.render_prompt([{"role": "user", "content": c}])
               for c in ("Hi", "What is the capital of Valdoria, please?", "Sort 3 1 2.")]
    responses = [tok.encode("Hello there, friend.") + [tok.end_id], tok.encode("Mirenth"), tok.encode("1 2 3.") + [tok.end_id]]
    ids, attn, pos, mask, p_len = P.layout(prompts, responses, tok.pad_id, "cpu")
    assert p_len == max(map(len, prompts))
    assert mask.tolist() == [[1] * len(r) + [0] * (ids.shape[1] - p_len - len(r)) for r in responses]
    for b, (p, r) in enumerate(zip(prompts, responses)):
        assert ids[b, p_len - len(p):p_len + len(r)].tolist() == p + r          # prompt ends at P, answer starts there
        assert pos[b, p_len - len(p)].item() == 0                               # positions start at the first real token
    with torch.no_grad():
        logp = P.action_logprobs(policy, ids, attn, pos, p_len)
        values = P.state_values(value, ids, attn, pos, p_len)
        for b, (p, r) in enumerate(zip(prompts, responses)):
            x = torch.tensor([p + r])
            alone = torch.log_softmax(policy(input_ids=x).logits[0].float(), -1)   # position i predicts token i+1
            expected = alone[len(p) - 1:len(p) + len(r) - 1].gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
            torch.testing.assert_close(logp[b, :len(r)], expected, atol=2e-5, rtol=0)
            v_alone = scalar_values(value, x, torch.ones_like(x))[0]             # V(state t) = head at the token before t
            torch.testing.assert_close(values[b, :len(r)], v_alone[len(p) - 1:len(p) + len(r) - 1], atol=2e-5, rtol=0)
        # a minibatch of rows 0 and 2 runs without the columns that are padding in both (row 1 holds the
        # longest prompt and row 0 the longest answer): the same log-probs and values, zeros past the answers
        ro = P.Rollout(batch=[0, 1, 2], responses=responses, texts=[], sampled_lp=[], ended=None, epochs=[], t_gen=0.0,
                       ids=ids, attn=attn, pos=pos, mask=mask, P=p_len)
        mb = torch.tensor([0, 2])
        trimmed_ids = P._columns(ro, mb)[0]
        assert trimmed_ids.shape[1] < ids.shape[1]
        s = P.Session.__new__(P.Session)
        s.allowed, s.vnet, s.value, s.fsdp, s.cfg = None, value, value, False, _cfg()
        torch.testing.assert_close(P._logprobs(s, policy, ro, mb) * mask[mb], logp[mb] * mask[mb], atol=2e-5, rtol=0)
        torch.testing.assert_close(P._values(s, ro, mb) * mask[mb], values[mb] * mask[mb], atol=2e-5, rtol=0)


# ---------------------------------------------------------------- one iteration


ONE_ITERATION = dict(iterations=1, batch_size=16, minibatch_size=8, ppo_epochs=4, lr=3e-4, kl_coef=0.0,
                     missing_end_penalty=0.0, probe_prompts=0, checkpoint_every=1, max_new_tokens=24)


def _one_iteration(rlhf, out: Path, **flags):
    """One PPO iteration on micro, run for real, with its rollout batch, RM scores and advantages captured
    on the way (by wrapping `layout`, `RewardScorer.score_ids` and `rl.gae`, each called once here)."""
    _copy(rlhf, out)
    seen: dict = {}
    mp = pytest.MonkeyPatch()
    real_layout, real_score, real_gae = P.layout, RewardScorer.score_ids, rl.gae
    mp.setattr(P, "layout", lambda *a, **k: seen.setdefault("layout", real_layout(*a, **k)))
    mp.setattr(RewardScorer, "score_ids", lambda self, seqs, starts=None: seen.setdefault("score", real_score(self, seqs, starts)))
    mp.setattr(rl, "gae", lambda *a, **k: seen.setdefault("gae", real_gae(*a, **k)))
    try:
        P.run(_cfg(**flags), out)
    finally:
        mp.undo()
    from alignloop.model import load_causal_lm
    ids, attn, pos, mask, p_len = seen["layout"]
    with torch.no_grad():
        old = P.action_logprobs(load_causal_lm(out / "sft"), ids, attn, pos, p_len)
        new = P.action_logprobs(load_causal_lm(out / "round-1" / "ppo"), ids, attn, pos, p_len)
    return {"out": out, "mask": mask, "score": torch.tensor(seen["score"]), "d": (new - old) * mask,
            "adv": rl.whiten(seen["gae"][0], mask)}            # advantages as the stage whitens them


@pytest.fixture(scope="module")
def neutral_critic(rlhf, tmp_path_factory):
    """β = 0 and no end penalty: the objective is the RM score alone. The value model starts from the SFT
    folder, i.e. with a fresh zero head: V ≡ 0 on the rollout, so every token's advantage has the sign of
    its episode's score relative to the batch (after whitening)."""
    out = tmp_path_factory.mktemp("ppo-neutral") / "run"
    return _one_iteration(rlhf, out, **ONE_ITERATION, value_init=str(out / "sft"))


@pytest.fixture(scope="module")
def rm_critic(rlhf, tmp_path_factory):
    """The same iteration with the default critic: the value model initialised from the reward model."""
    return _one_iteration(rlhf, tmp_path_factory.mktemp("ppo-rm-critic") / "run", **ONE_ITERATION)


def test_one_iteration_raises_the_rm_score_of_its_rollout_batch(neutral_critic):
    """The check, on the SAME rollout sequences y_i ~ π_old (the SFT policy) that the iteration trained on.
    The RM score the new policy expects on those prompts is, by importance sampling,
    Σ w_i s_i / Σ w_i with w_i = π_new(y_i|x_i) / π_old(y_i|x_i) = exp(Δ_i), Δ_i the change of the answer's
    log-prob; to first order its gain over the batch mean is Cov_i(s_i, Δ_i). Both must be positive: the
    iteration made the better-scored answers of its batch more likely relative to the worse ones.

    Why the neutral critic: with the value model initialised from the RM, V_t is the RM's score of a prefix,
    not yet a value, and after ONE iteration the answer-level score gain is at the mercy of that critic's
    errors (over 8 seeds the correlation of Δ_i with s_i ranged from −0.6 to 0.9), while with V ≡ 0 it is
    0.70–0.94 (a robust margin for the bound below). What PPO guarantees per iteration whatever the critic —
    tokens move along their advantages — is tested with the default critic in the next test."""
    r = neutral_critic
    score, d, adv, mask = r["score"], r["d"], r["adv"], r["mask"]
    seq = d.sum(1)                                             # Δ_i = log π_new(y_i|x_i) − log π_old(y_i|x_i)
    assert score.std() > 0
    cov = ((score - score.mean()) * (seq - seq.mean())).mean()
    corr = torch.corrcoef(torch.stack([score, seq]))[0, 1]
    is_estimate = (torch.softmax(seq, 0) * score).sum()      # self-normalised importance weights exp(Δ_i)
    assert cov > 0 and corr > 0.4, (cov, corr)
    assert is_estimate > score.mean(), (is_estimate, score.mean())
    assert d[adv > 0].mean() > 0 > d[(adv < 0) & (mask > 0)].mean()


def test_one_iteration_moves_tokens_along_their_advantages(rm_critic):
    """With the default critic (value model from the RM): the log-prob of rollout tokens with a positive
    advantage rose on average, of those with a negative one fell, and the surrogate Σ A·Δlog π rose.
    The logged line describes that batch."""
    r = rm_critic
    d, adv, mask, score = r["d"], r["adv"], r["mask"], r["score"]
    assert d[adv > 0].mean() > 0 > d[(adv < 0) & (mask > 0)].mean()
    assert (adv * d).sum() > 0
    (rec,) = [json.loads(x) for x in (r["out"] / "round-1" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert rec["step"] == 1 and rec["beta"] == 0.0
    assert rec["rm_score"] == pytest.approx(score.mean().item(), abs=1e-6)
    assert rec["response_length"] == pytest.approx(mask.sum(1).float().mean().item())
    for key in ("kl_sampled", "entropy", "clip_frac", "approx_kl", "vf_loss", "explained_variance", "tokens_per_s"):
        assert key in rec
    # where the iteration's time went: every phase timed, none negative, together the whole iteration
    phases = ("generate", "reward_model", "policy_logprobs", "reference_logprobs", "values", "policy_update",
              "value_update", "other")
    assert {k for k in rec if k.startswith("seconds_")} == {f"seconds_{p}" for p in phases}
    assert all(rec[f"seconds_{p}"] > 0 for p in phases[:-1]) and rec["seconds_other"] > -1e-3
    total = sum(rec[f"seconds_{p}"] for p in phases)
    assert total == pytest.approx(mask.shape[0] / rec["episodes_per_s"], rel=1e-6)  # the iteration's own clock
    assert rec["seconds_generate"] / total == pytest.approx(rec["generation_share"], abs=1e-6)


def test_speed_options_sampler_logprobs_and_length_grouped_minibatches(rlhf, tmp_path, monkeypatch):
    """--old-logprobs sampler: π_old is the engine's log-prob of each token it sampled, no separate forward
    pass; the first ratio of every iteration is still 1 within fp32 rounding, and the policy trains.
    --group-by-length: every epoch's minibatches partition the batch, each a run of the rows sorted by
    prompt length."""
    out = _copy(rlhf, tmp_path / "run")
    seen = []
    real_rollout = P.rollout
    monkeypatch.setattr(P, "rollout", lambda s, it: seen.append((s, real_rollout(s, it))) or seen[-1][1])
    P.run(_cfg(iterations=2, batch_size=8, minibatch_size=4, max_new_tokens=12, probe_prompts=0, checkpoint_every=2,
               lr=3e-4, old_logprobs="sampler", group_by_length=True), out)
    recs = [r for r in _metrics(out) if r["step"] > 0]
    assert len(recs) == 2
    for r in recs:
        assert r["first_ratio_error"] < 1e-4, r
        assert r["approx_kl"] > 0                             # the update moved the policy
    assert all(json.loads(x)["seconds_policy_logprobs"] == 0.0
               for x in (out / "round-1" / "ppo" / "metrics.jsonl").read_text().splitlines())
    for s, ro in seen:
        length = [len(s.prompt_ids[i]) for i in ro.batch]
        for minibatches in ro.epochs:
            assert sorted(torch.cat(minibatches).tolist()) == list(range(8))
            spans = sorted((min(length[i] for i in mb.tolist()), max(length[i] for i in mb.tolist())) for mb in minibatches)
            assert spans[0][1] <= spans[1][0], spans                # short prompts together, long ones together


def test_value_lora_on_top_blocks_only(rlhf, tmp_path, monkeypatch):
    """--value-lora-layers 1: the value model's adapters sit in its last decoder block only (with its scalar
    head), the lower blocks take no gradient, and the value update still learns; the policy is untouched
    by the option (adapters in every block) and its first ratio is 1. Its frozen bottom blocks run once per
    episode and each update only its top block: the same run, number for number, as the whole forward pass
    every time (`_value_top` forced to 0)."""
    cfg = dict(iterations=2, batch_size=8, minibatch_size=4, max_new_tokens=12, probe_prompts=0, checkpoint_every=2,
               lr=3e-3, value_lr=3e-3, lora_rank=4, value_lora_layers=1, ppo_epochs=2)

    def blocks(model):  # the decoder blocks that hold a trainable parameter
        return {int(name.split(".layers.")[1].split(".")[0]) for name, p in model.named_parameters()
                if p.requires_grad and ".layers." in name}
    seen, kept = [], []
    real_rollout, real_update = P.rollout, P.update
    monkeypatch.setattr(P, "rollout", lambda s, it: seen.append((s, blocks(s.value), blocks(s.policy)))
                        or real_rollout(s, it))
    monkeypatch.setattr(P, "update", lambda s, ro, it: kept.append(ro.vfeat is not None) or real_update(s, ro, it))
    P.run(_cfg(**cfg), _copy(rlhf, tmp_path / "cached"))
    s, value_blocks, policy_blocks = seen[0]
    n = len(s.value.get_base_model().model.layers)
    assert n > 1, "the micro model needs 2+ blocks for this test to mean anything"
    assert value_blocks == {n - 1}, value_blocks
    assert policy_blocks == set(range(n))       # (the policy is merged when saved: looked at before)
    lora_b = [p for name, p in s.value.named_parameters() if "lora_B" in name]
    assert lora_b and all(p.grad is None or p.grad.abs().sum() > 0 for p in lora_b)
    assert any(p.abs().sum() > 0 for p in lora_b)                # B starts at 0: the value update moved it
    recs = [r for r in _metrics(tmp_path / "cached") if r["step"] > 0]
    assert len(recs) == 2 and all(r["first_ratio_error"] < 1e-6 and r["vf_loss"] > 0 for r in recs), recs
    assert kept == [True, True]                  # the scoring pass kept the bottom blocks' output
    monkeypatch.setattr(P, "_value_top", lambda s: 0)
    P.run(_cfg(**cfg), _copy(rlhf, tmp_path / "whole"))
    assert kept[2:] == [False, False]
    cached, whole = ([r for r in _metrics(tmp_path / run) if r["step"] > 0] for run in ("cached", "whole"))
    for a, b in zip(cached, whole, strict=True):
        for key in ("vf_loss", "explained_variance", "pg_loss", "rm_score", "kl_sampled"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a[key], b[key])


def test_value_lora_layers_needs_lora(rlhf, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["ppo", "--preset", "micro", "--out", str(_copy(rlhf, tmp_path / "run")), "--value-lora-layers", "1"])
    assert e.value.code == 2
    assert "--lora-rank" in capsys.readouterr().err


def test_resume_with_another_configuration_is_refused(rm_critic, tmp_path, capsys):
    out = _copy(rm_critic["out"], tmp_path / "run")
    before = _snapshot(out)
    with pytest.raises(SystemExit) as e:
        cli.main(["ppo", "--preset", "micro", "--out", str(out), *_argv(ONE_ITERATION | {"lr": 1e-3}), "--resume"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "field 'lr'" in err and str(out / "round-1" / "ppo") in err, err
    assert _snapshot(out) == before, "a refused --resume must not touch the run (checkpoints, metrics, model)"
    # the same configuration resumes (here: a finished run, so nothing more to do): the refusal is specific
    metrics = (out / "round-1" / "ppo" / "metrics.jsonl").read_text()
    cli.main(["ppo", "--preset", "micro", "--out", str(out), *_argv(ONE_ITERATION), "--resume"])
    assert (out / "round-1" / "ppo" / "metrics.jsonl").read_text() == metrics


# ---------------------------------------------------------------- resume


RESUME = dict(iterations=4, checkpoint_every=2, batch_size=8, minibatch_size=4, max_new_tokens=12, probe_prompts=4,
              probe_every=2, kl_target=1.0, kl_horizon=100, ptx_coef=0.5, lr=3e-4, reward_norm=True,
              length_control=True)
TIMING = {"episodes_per_s", "tokens_per_s", "generation_share", "peak_memory_gb"}


def _run_until(cfg, out, stop_after):
    run_interrupted(P.run, cfg, out, stop_after, out / "round-1" / "ppo" / "config.json")


def _metrics(out):
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING and not k.startswith("seconds_")}
            for x in (out / "round-1" / "ppo" / "metrics.jsonl").read_text().splitlines()]


def test_resume_in_the_middle_equals_an_uninterrupted_run(rlhf, tmp_path):
    """Adaptive β, PPO-ptx, the probe and the length control's episodes on, so that every piece of state a
    resume must restore matters."""
    full, part = _copy(rlhf, tmp_path / "full"), _copy(rlhf, tmp_path / "part")
    torch.manual_seed(0)
    P.run(_cfg(**RESUME), full)
    torch.manual_seed(1)                                      # a resume must not rely on the process's RNG
    _run_until(_cfg(**RESUME), part, stop_after=2)
    assert [r["step"] for r in _metrics(part) if r["step"] > 0] == [1, 2]
    P.run(_cfg(**RESUME, resume=True), part)
    a, b = _metrics(full), _metrics(part)
    assert [r["step"] for r in a] == [r["step"] for r in b]    # (a step-0 probe line may come first)
    assert [r["step"] for r in a if r["step"] > 0] == [1, 2, 3, 4]
    assert len({r["beta"] for r in a}) > 1                    # β really adapted
    # --length-control's episodes (length, RM score) are in the checkpoint, batch by batch, and give the slope
    # logged last (its arithmetic: tests/test_rl_math.py; the micro policy never ends an answer within 12
    # tokens, so every length is 12 and the slope 0 here: the score passes unchanged)
    seen = torch.load(full / "round-1" / "ppo" / "checkpoints" / "step-000004.pt", weights_only=True)["length_seen"]
    steps = [r for r in a if r["step"] > 0]
    assert len(seen) == 32 and all(1 <= n <= 12 for n, _ in seen)
    for it, r in enumerate(steps):
        assert sum(v for _, v in seen[8 * it:8 * it + 8]) / 8 == pytest.approx(r["rm_score"], abs=1e-5)
    x, y = (torch.tensor(c, dtype=torch.float64) for c in zip(*seen))
    var = x.var(unbiased=False)
    assert steps[-1]["length_slope"] == pytest.approx(float(((x - x.mean()) * (y - y.mean())).mean() / var) if var else 0.0)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], abs=1e-5, nan_ok=True), (ra["step"], k)
    ca = torch.load(full / "round-1" / "ppo" / "checkpoints" / "step-000004.pt", weights_only=False)
    cb = torch.load(part / "round-1" / "ppo" / "checkpoints" / "step-000004.pt", weights_only=False)
    assert ca["beta"] == pytest.approx(cb["beta"], abs=1e-9)
    for part_name in ("model", "value"):
        for k in ca[part_name]:
            torch.testing.assert_close(ca[part_name][k], cb[part_name][k], atol=1e-5, rtol=0, msg=f"{part_name} {k}")
    from safetensors.torch import load_file
    wa, wb = (load_file(str(x / "round-1" / "ppo" / "model.safetensors")) for x in (full, part))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0)


def test_reward_norm_is_fixed_on_the_first_rollout(rlhf, tmp_path):
    """--reward-norm: the first batch's RM scores set the mean and std once (Ziegler et al. 2019); every
    later score is scaled by the same two numbers, which the checkpoint keeps for a resume."""
    out = _copy(rlhf, tmp_path / "run")
    P.run(_cfg(iterations=3, batch_size=8, minibatch_size=4, max_new_tokens=12, probe_prompts=0, checkpoint_every=3,
               reward_norm=True, missing_end_penalty=0.0), out)
    m = [r for r in _metrics(out) if r["step"] > 0]
    mean, std = torch.load(out / "round-1" / "ppo" / "checkpoints" / "step-000003.pt", weights_only=True)["reward_norm"]
    assert std > 0 and mean == pytest.approx(m[0]["rm_score"], abs=1e-6)
    assert m[0]["reward"] == pytest.approx(0.0, abs=1e-6)
    for r in m[1:]:
        assert r["reward"] == pytest.approx((r["rm_score"] - mean) / std, abs=1e-5)
    assert any(abs(r["reward"]) > 1e-3 for r in m[1:])        # later batches really differ from the first


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_run(rlhf, tmp_path_factory) -> Path:
    return _copy(rlhf, tmp_path_factory.mktemp("ppo-bad") / "run")


def _refused(capsys, out: Path, *args) -> str:
    before = _snapshot(out)
    with pytest.raises(SystemExit) as e:
        cli.main(["ppo", "--preset", "micro", "--out", str(out), *map(str, args)])
    assert e.value.code == 2
    assert _snapshot(out) == before, "bad input must leave the run directory untouched"
    return capsys.readouterr().err


def test_reward_model_with_another_tokenizer_is_refused(bad_run, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(bad_run / "world", other / "world")
    cli.run_stage("tokenizer", ["--preset", "micro", "--out", str(other), "--vocab-size", "512"])
    rm = _copy(bad_run / "round-1" / "reward", tmp_path / "rm-other-tokenizer")
    for f in (other / "tokenizer").iterdir():
        shutil.copy(f, rm / f.name)
    err = _refused(capsys, bad_run, "--reward-model", rm)
    assert "reward model's tokenizer differs from the policy's" in err and str(rm) in err, err


def test_value_model_of_another_size_is_refused(bad_run, tmp_path, capsys):
    from alignloop.model import create_causal_lm, save_model
    from alignloop.tokenizer import ChatTokenizer
    tok = ChatTokenizer.load(bad_run / "sft")
    save_model(create_causal_lm("tiny", tok), tok, tmp_path / "tiny-value")
    err = _refused(capsys, bad_run, "--value-init", tmp_path / "tiny-value")
    assert "value model" in err and "field 'hidden_size'" in err and "another size" in err, err


def test_empty_prompt_set_is_refused(bad_run, tmp_path, capsys):
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("\n")
    err = _refused(capsys, bad_run, "--prompts", empty)
    assert f"{empty}: file is empty" in err, err


def test_prompt_that_leaves_no_room_to_answer_names_file_and_line(bad_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "ok", "prompt": "Hi"}) + "\n"
                       + json.dumps({"id": "long-one", "prompt": "word " * 400}) + "\n")
    err = _refused(capsys, bad_run, "--prompts", prompts)
    assert f"{prompts}:2" in err and "no room to answer" in err, err
