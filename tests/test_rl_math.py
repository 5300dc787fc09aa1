"""PPO maths (alignloop/train/rl.py) against values computed by hand: the arithmetic is in the comments.

Shapes follow rl.py: (B episodes, R response positions), `mask` 1 on real tokens and 0 on (right) padding.
Padding positions are filled with absurd values (99, 123, …) so that any leak shows up in the result.
"""
from __future__ import annotations

import math

import pytest
import torch

from alignloop.train import rl

T = torch.tensor


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), atol=tol, rtol=0)


# ---------------------------------------------------------------- masked statistics and whitening


def test_masked_mean_and_var_ignore_padding():
    x = T([[1.0, 2.0, 3.0, 100.0], [4.0, -50.0, 7.0, 9.0]])
    mask = T([[1, 1, 1, 0], [1, 0, 0, 0]])
    # real values 1, 2, 3, 4: mean 2.5; unbiased variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    close(rl.masked_mean(x, mask), 2.5)
    close(rl.masked_var(x, mask), 5 / 3)
    # per row: (1+2+3)/3 = 2, 4/1 = 4
    close(rl.masked_mean(x, mask, dim=1), [2.0, 4.0])


def test_whiten_uses_only_real_tokens_and_leaves_padding_at_zero():
    x = T([[1.0, 2.0, 3.0, 100.0], [4.0, -50.0, 7.0, 9.0]])
    mask = T([[1, 1, 1, 0], [1, 0, 0, 0]])
    # mean 2.5, std sqrt(5/3) = 1.2909944: (x − 2.5) / 1.2909944 → −1.161895, −0.387298, 0.387298, 1.161895
    s = math.sqrt(5 / 3)
    w = rl.whiten(x, mask)
    close(w, [[-1.5 / s, -0.5 / s, 0.5 / s, 0.0], [1.5 / s, 0.0, 0.0, 0.0]], 1e-5)
    close(rl.masked_mean(w, mask), 0.0, 1e-6)
    close(rl.masked_var(w, mask), 1.0, 1e-5)
    # shift_mean=False keeps the mean (reward whitening must not move the reward's level): + 2.5
    w2 = rl.whiten(x, mask, shift_mean=False)
    close(w2, [[2.5 - 1.5 / s, 2.5 - 0.5 / s, 2.5 + 0.5 / s, 0.0], [2.5 + 1.5 / s, 0.0, 0.0, 0.0]], 1e-5)


def test_whiten_is_unchanged_by_what_padding_holds():
    mask = T([[1, 1, 0], [1, 1, 1]])
    a = T([[0.3, -1.0, 0.0], [2.0, 0.5, 1.5]])
    b = a.clone()
    b[0, 2] = 1e6
    close(rl.whiten(a, mask), rl.whiten(b, mask))


# ---------------------------------------------------------------- KL estimator and per-token rewards


def test_length_controlled_score_by_hand():
    """Episodes seen (length, score): (10, 1.0), (20, 0.0), (30, 0.5): mean length 20, mean score 0.5,
    cov = (−10·0.5 + 0·(−0.5) + 10·0)/3 = −5/3, var = 200/3, slope b = −0.025 (shorter is preferred).
    Scores of this batch, lengths 20 and 30: 0.0 − b·0 = 0.0 and 0.5 − b·10 = 0.75."""
    got, b = rl.length_controlled(torch.tensor([0.0, 0.5]), torch.tensor([20.0, 30.0]),
                                  torch.tensor([1.0, 0.0, 0.5]), torch.tensor([10.0, 20.0, 30.0]))
    assert b == pytest.approx(-0.025)
    assert got.tolist() == pytest.approx([0.0, 0.75])
    # a score exactly linear in length is all length: nothing is left but its mean
    got, b = rl.length_controlled(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0]),
                                  torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0]))
    assert b == pytest.approx(1.0) and got.tolist() == pytest.approx([2.0, 2.0, 2.0])
    # one length seen: no slope, the score unchanged
    got, b = rl.length_controlled(torch.tensor([0.3]), torch.tensor([5.0]), torch.tensor([0.3, 0.9]),
                                  torch.tensor([5.0, 5.0]))
    assert b == 0.0 and got.tolist() == pytest.approx([0.3])


def test_kl_estimator_is_log_ratio_and_unbiased_for_the_sequence_kl():
    logp, ref = T([[-0.1, -2.0]]), T([[-0.5, -1.0]])
    close(rl.kl_per_token(logp, ref), [[0.4, -1.0]])  # log π − log π_ref, per token (may be negative)
    # p = (½, ¼, ¼), q = (¼, ½, ¼): KL(p‖q) = ½·ln2 + ¼·ln½ + ¼·ln1 = ¼·ln 2 = 0.1732868
    p, q = T([0.5, 0.25, 0.25]), T([0.25, 0.5, 0.25])
    exact = (p * rl.kl_per_token(p.log(), q.log())).sum()
    close(exact, 0.25 * math.log(2))
    # and a sample average under p converges to it (k1 is unbiased)
    g = torch.Generator().manual_seed(0)
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    close(rl.kl_per_token(p.log()[x], q.log()[x]).mean(), 0.25 * math.log(2), 0.01)


def test_token_rewards_put_the_score_on_the_last_real_token_and_ignore_padding():
    beta = 0.1
    kl = T([[0.5, -0.2, 1.0, 7.0], [0.3, 0.1, 9.0, 9.0], [0.2, 0.2, 0.2, 0.2]])
    mask = T([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    score = T([2.0, -1.0, 0.5])
    r = rl.token_rewards(score, kl, mask, beta)
    # row 0: −β·KL = −0.05, +0.02, −0.1 ; last real token is t=2: −0.1 + 2 = 1.9 ; padding (KL 7) → 0
    # row 1: −0.03, −0.01 ; last real token t=1: −0.01 − 1 = −1.01 ; padding (KL 9, 9) → 0
    # row 2: no padding: −0.02 ×4, the score on t=3: −0.02 + 0.5 = 0.48
    close(r, [[-0.05, 0.02, 1.9, 0.0], [-0.03, -1.01, 0.0, 0.0], [-0.02, -0.02, -0.02, 0.48]], 1e-6)
    # the episode's total reward is score − β·Σ KL over real tokens: 2 − 0.1·1.3 = 1.87
    close(r.sum(1), [1.87, -1.04, 0.42], 1e-6)


def test_token_rewards_with_beta_zero_are_the_score_alone():
    mask = T([[1, 1, 0]])
    r = rl.token_rewards(T([3.0]), T([[5.0, 5.0, 5.0]]), mask, 0.0)
    close(r, [[0.0, 3.0, 0.0]])


# ---------------------------------------------------------------- GAE


def test_gae_gamma_1_lambda_095_by_hand():
    rewards = T([[0.0, 0.0, 1.0], [0.5, -1.0, 99.0]])
    values = T([[0.5, 0.6, 0.7], [0.2, 0.4, 123.0]])
    mask = T([[1, 1, 1], [1, 1, 0]])
    adv, ret = rl.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0 (V after the last token is 0):
    #   δ2 = 1 + 0 − 0.7 = 0.3                      A2 = 0.3
    #   δ1 = 0 + 0.7 − 0.6 = 0.1                    A1 = 0.1 + 0.95·0.3   = 0.385
    #   δ0 = 0 + 0.6 − 0.5 = 0.1                    A0 = 0.1 + 0.95·0.385 = 0.46575
    # row 1 (t=2 is padding: its reward 99 and value 123 must not reach t=1):
    #   δ1 = −1 + 0 − 0.4 = −1.4                    A1 = −1.4
    #   δ0 = 0.5 + 0.4 − 0.2 = 0.7                  A0 = 0.7 + 0.95·(−1.4) = −0.63
    close(adv, [[0.46575, 0.385, 0.3], [-0.63, -1.4, 0.0]], 1e-6)
    # returns = A + V on real tokens, 0 on padding
    close(ret, [[0.96575, 0.985, 1.0], [-0.43, -1.0, 0.0]], 1e-6)


def test_gae_other_gamma_and_lambda_by_hand():
    rewards, values, mask = T([[1.0, 0.0, 2.0]]), T([[1.0, 2.0, 0.5]]), T([[1, 1, 1]])
    adv, ret = rl.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # γλ = 0.45
    #   δ2 = 2 + 0 − 0.5 = 1.5                      A2 = 1.5
    #   δ1 = 0 + 0.9·0.5 − 2 = −1.55                A1 = −1.55 + 0.45·1.5     = −0.875
    #   δ0 = 1 + 0.9·2 − 1 = 1.8                    A0 = 1.8 + 0.45·(−0.875) = 1.40625
    close(adv, [[1.40625, -0.875, 1.5]], 1e-6)
    close(ret, [[2.40625, 1.125, 2.0]], 1e-6)


def test_gae_limits_lambda_1_is_monte_carlo_lambda_0_is_td():
    rewards, values, mask = T([[1.0, -2.0, 3.0, 7.0]]), T([[0.5, 1.5, -1.0, 4.0]]), T([[1, 1, 1, 0]])
    adv, ret = rl.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # λ = γ = 1: A_t = (sum of rewards from t) − V_t: 2 − 0.5, 1 − 1.5, 3 + 1 ; returns are the reward-to-go
    close(adv, [[1.5, -0.5, 4.0, 0.0]])
    close(ret, [[2.0, 1.0, 3.0, 0.0]])
    adv0, _ = rl.gae(rewards, values, mask, gamma=1.0, lam=0.0)
    # λ = 0: A_t = δ_t = r_t + V_{t+1} − V_t: 1 + 1.5 − 0.5, −2 − 1 − 1.5, 3 + 0 + 1
    close(adv0, [[2.0, -4.5, 4.0, 0.0]])


# ---------------------------------------------------------------- clipped policy loss


def test_policy_loss_clipping_by_hand():
    eps = 0.2
    ratio = T([[1.5, 0.5, 1.5, 0.5, 1.1, math.exp(5.0)]])
    adv = T([[1.0, 1.0, -1.0, -1.0, 2.0, 100.0]])
    mask = T([[1, 1, 1, 1, 1, 0]])
    old = T([[-1.0, -2.0, -0.5, -3.0, -1.5, -2.0]])
    logp = (old + ratio.log()).requires_grad_(True)
    loss, stats = rl.policy_loss(logp, old, adv, mask, eps)
    # per token max(−A·ρ, −A·clip(ρ, 0.8, 1.2)):
    #   A=+1, ρ=1.5: max(−1.5, −1.2) = −1.2   clip binds (no gain from pushing ρ beyond 1+ε)
    #   A=+1, ρ=0.5: max(−0.5, −0.8) = −0.5   unclipped (pessimistic bound)
    #   A=−1, ρ=1.5: max( 1.5,  1.2) =  1.5   unclipped
    #   A=−1, ρ=0.5: max( 0.5,  0.8) =  0.8   clip binds
    #   A=+2, ρ=1.1: max(−2.2, −2.2) = −2.2   inside the clip range
    #   padding (A=100, ρ=e⁵): ignored
    # mean over the 5 real tokens: (−1.2 − 0.5 + 1.5 + 0.8 − 2.2) / 5 = −0.32
    close(loss, -0.32, 1e-6)
    loss.backward()
    # d/dlogp of −A·ρ is −A·ρ (ρ = exp(logp − old)), /5 for the mean; 0 where the clip binds and on padding:
    #   t1: −1·0.5/5 = −0.1 ; t2: +1·1.5/5 = 0.3 ; t4: −2·1.1/5 = −0.44
    close(logp.grad, [[0.0, -0.1, 0.3, 0.0, -0.44, 0.0]], 1e-6)
    # |ρ − 1| > 0.2 on 4 of the 5 real tokens
    close(stats["clip_frac"], 0.8)
    # approx KL (k3) = mean of (ρ − 1) − ln ρ: 2·(0.5 − ln 1.5) + 2·(−0.5 + ln 2) + (0.1 − ln 1.1), / 5
    k3 = (2 * (0.5 - math.log(1.5)) + 2 * (-0.5 + math.log(2)) + (0.1 - math.log(1.1))) / 5
    close(stats["approx_kl"], k3, 1e-6)


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    adv, mask = T([[0.5, -1.5, 4.0]]), T([[1, 1, 0]])
    logp = torch.zeros(1, 3, requires_grad=True)
    loss, stats = rl.policy_loss(logp, torch.zeros(1, 3), adv, mask, 0.2)
    close(loss, -(0.5 - 1.5) / 2)  # = 0.5
    loss.backward()
    close(logp.grad, [[-0.25, 0.75, 0.0]])  # −A/2: the first PPO step is the plain policy gradient
    assert stats["clip_frac"] == 0 and abs(stats["approx_kl"]) < 1e-9


# ---------------------------------------------------------------- clipped value loss


def test_value_loss_clipping_by_hand():
    eps = 0.2
    old = T([[1.0, 1.0, 1.0, 1.0, 1.0]])
    returns = T([[2.0, 1.0, 0.0, 0.0, -10.0]])
    values = T([[1.5, 1.5, 0.9, 0.5, 10.0]], requires_grad=True)
    mask = T([[1, 1, 1, 1, 0]])
    loss = rl.value_loss(values, old, returns, mask, eps)
    # clipped V = V_old + clip(V − V_old, ±0.2); per token max((V − R)², (V_clip − R)²):
    #   V=1.5, R=2: max(0.25, (1.2 − 2)² = 0.64) = 0.64   clip binds (the clipped V is farther)
    #   V=1.5, R=1: max(0.25, (1.2 − 1)² = 0.04) = 0.25   unclipped
    #   V=0.9, R=0: max(0.81, (0.9 − 0)² = 0.81) = 0.81   inside the clip range
    #   V=0.5, R=0: max(0.25, (0.8 − 0)² = 0.64) = 0.64   clip binds
    #   padding (V=10, R=−10): ignored
    # ½ · mean = ½ · (0.64 + 0.25 + 0.81 + 0.64) / 4 = 0.2925
    close(loss, 0.2925, 1e-6)
    loss.backward()
    # d/dV = ½·2·(V − R)/4 where unclipped: t1: 0.5/4 = 0.125 ; t2: 0.9/4 = 0.225 ; 0 where the clip binds
    close(values.grad, [[0.0, 0.125, 0.225, 0.0, 0.0]], 1e-6)


def test_explained_variance_by_hand():
    returns, mask = T([[1.0, 2.0, 3.0, 4.0, 0.0]]), T([[1, 1, 1, 1, 0]])
    assert rl.explained_variance(T([[1.0, 2.0, 3.0, 4.0, 50.0]]), returns, mask) == pytest.approx(1.0)
    assert rl.explained_variance(torch.full((1, 5), 2.5), returns, mask) == pytest.approx(0.0)
    # R − V = 0, 0, 0, −1: unbiased var 0.25 ; Var R = 5/3 → 1 − 0.25 / (5/3) = 0.85
    assert rl.explained_variance(T([[1.0, 2.0, 3.0, 5.0, 0.0]]), returns, mask) == pytest.approx(0.85, abs=1e-6)


def test_entropy_from_logits_by_hand():
    # uniform over 4: ln 4 ; (½, ¼, ¼): ½ln2 + 2·¼ln4 = 1.5·ln 2
    logits = T([[0.0, 0.0, 0.0, 0.0], [math.log(0.5), math.log(0.25), math.log(0.25), -1e9]])
    close(rl.entropy_from_logits(logits), [math.log(4), 1.5 * math.log(2)], 1e-6)


# ---------------------------------------------------------------- adaptive KL controller


def test_adaptive_kl_rises_above_target_and_falls_below():
    # e = clip(KL/target − 1, ±0.2) ; β ← β·(1 + e·n_steps/horizon)
    c = rl.AdaptiveKL(0.1, target=6.0, horizon=10_000)
    assert c.update(12.0, 10_000) == pytest.approx(0.1 * 1.2)          # e = 1 → clipped to 0.2
    c = rl.AdaptiveKL(0.1, target=6.0, horizon=10_000)
    assert c.update(0.0, 10_000) == pytest.approx(0.1 * 0.8)           # e = −1 → −0.2
    c = rl.AdaptiveKL(0.1, target=6.0, horizon=10_000)
    assert c.update(6.6, 5_000) == pytest.approx(0.1 * (1 + 0.1 * 0.5))  # e = 0.1, half a horizon: 0.105
    c = rl.AdaptiveKL(0.1, target=6.0, horizon=10_000)
    assert c.update(3.0, 64) == pytest.approx(0.1 * (1 - 0.2 * 64 / 10_000))  # 0.099872
    c = rl.AdaptiveKL(0.1, target=6.0, horizon=10_000)
    assert c.update(6.0, 64) == pytest.approx(0.1)                      # on target: unchanged
    assert c.beta == pytest.approx(0.1)


def test_adaptive_kl_moves_at_most_20_percent_per_horizon():
    for kl in (0.0, 0.5, 5.9, 6.1, 30.0, 1e6):
        for n in (1, 64, 2_500, 10_000):
            c = rl.AdaptiveKL(0.1, target=6.0, horizon=10_000)
            factor = c.update(kl, n) / 0.1
            assert 1 - 0.2 * n / 10_000 - 1e-12 <= factor <= 1 + 0.2 * n / 10_000 + 1e-12
            assert (factor > 1) == (kl > 6.0) and (factor < 1) == (kl < 6.0)


def test_adaptive_kl_with_no_target_is_fixed():
    c = rl.AdaptiveKL(0.05, target=None, horizon=10_000)
    for kl in (0.0, 100.0, 3.0):
        assert c.update(kl, 10_000) == 0.05


def test_nonfinite_rows_names_the_tensors_and_ignores_padding():
    mask = T([[1., 1., 0.], [1., 0., 0.], [1., 1., 1.]])
    logp = T([[-1., -2., float("nan")],        # NaN on padding: not a problem
              [float("-inf"), -1., -1.],        # −inf on a response token: episode 1
              [-1., -1., -1.]])
    values = T([[0., 0., 0.], [0., 0., 0.], [0., float("inf"), 0.]])  # episode 2
    rows, names = rl.nonfinite_rows(mask, logp=logp, values=values, fine=torch.zeros(3, 3))
    assert rows.tolist() == [False, True, True]
    assert names == ["logp", "values"]
    rows, names = rl.nonfinite_rows(mask, fine=torch.zeros(3, 3))
    assert not rows.any() and names == []


def test_a_step_with_nan_gradients_is_skipped_and_the_weights_kept():
    from alignloop.train.ppo import _step_if_finite
    w = torch.nn.Parameter(T([1.0, 2.0]))
    opt = torch.optim.SGD([w], lr=0.5)
    (w * T([float("nan"), 1.0])).sum().backward()
    assert _step_if_finite(opt) == 1
    close(w.detach(), [1.0, 2.0])
    assert w.grad is None
    (w * T([0.3, 0.4])).sum().backward()  # norm 0.5 < 1: not clipped; w − 0.5·g
    assert _step_if_finite(opt) == 0
    close(w.detach(), [0.85, 1.8])
