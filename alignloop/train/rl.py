"""The error-prone maths of PPO for language models, as small pure functions (each unit-tested against
hand-computed values in tests/test_rl_math.py).

Shapes: B episodes, R response positions; `mask` (B, R) is 1 on real response tokens, 0 on padding.
Position t of an episode is the action "emit response token t" taken in the state "prompt + tokens < t".
"""
from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked elements."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    return ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise to unit variance (and zero mean) over the masked elements; padding stays 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def length_controlled(score: torch.Tensor, length: torch.Tensor, seen_score: torch.Tensor,
                      seen_length: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The score with the reward model's length preference taken out: score − b·(length − mean length), b the
    least-squares slope of score on length over every episode seen so far (`seen_*`, this batch included).
    A reward model that prefers short (or long) answers then rewards neither, and what is left is what it
    prefers at a given length (the length-controlled win rate of Dubois et al. 2024, used as the reward).
    Returns (scores, b); b = 0 while every length seen is the same."""
    x, y = seen_length.double(), seen_score.double()
    var = ((x - x.mean()) ** 2).mean()
    b = float(((x - x.mean()) * (y - y.mean())).mean() / var) if var > 0 else 0.0
    return score - b * (length.to(score.dtype) - float(x.mean())), b


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """The k1 estimator log π − log π_ref on sampled tokens: unbiased for KL(π‖π_ref) once summed
    over an episode sampled from π (Schulman's "Approximating KL divergence")."""
    return logp - ref_logp


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token reward: −β·KL_t everywhere, plus the reward model's score at the LAST real token
    (InstructGPT / Ziegler et al.). Padding gets nothing."""
    rewards = -beta * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)                                       # (B,)
    return rewards.scatter_add(1, last[:, None], score[:, None].to(rewards.dtype))


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each episode's real tokens.
    δ_t = r_t + γ V_{t+1} − V_t (V after the last real token is 0); A_t = δ_t + γλ A_{t+1}.
    Returns (advantages, returns = advantages + values), both 0 on padding."""
    B, R = rewards.shape
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    m = mask.to(rewards.dtype)
    for t in reversed(range(R)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m[:, t]
        # padding positions pass the "future" through unchanged so the last real token sees V=0, A=0
        next_value = torch.where(m[:, t] > 0, values[:, t], next_value)
        next_adv = torch.where(m[:, t] > 0, a, next_adv)
    return adv, (adv + values) * m


def rloo_advantages(rewards: torch.Tensor, k: int, group_norm: bool = False) -> torch.Tensor:
    """One advantage per episode for B = n·k episodes, k consecutive ones per prompt (RLOO, Ahmadian et al.
    2024): A_i = R_i − (mean of the other k − 1 rewards of its prompt). The baseline does not depend on
    episode i, so the gradient stays unbiased, and it needs no value model. A_i = k/(k−1)·(R_i − group mean).
    `group_norm` (GRPO, Shao et al. 2024): A_i = (R_i − group mean) / (group std + 1e-8), the unbiased std."""
    R = rewards.reshape(-1, k)
    if group_norm:
        A = (R - R.mean(1, keepdim=True)) / (R.std(1, keepdim=True) + 1e-8)
    else:
        A = R - (R.sum(1, keepdim=True) - R) / (k - 1)
    return A.reshape(-1)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate: mean over tokens of max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = π/π_old."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    loss = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip, 1 + clip))
    with torch.no_grad():
        stats = {"clip_frac": masked_mean(((ratio - 1).abs() > clip).float(), mask).item(),
                 "approx_kl": masked_mean((ratio - 1) - log_ratio, mask).item()}  # k3, ≥ 0
    return masked_mean(loss, mask), stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> torch.Tensor:
    """Clipped value loss: ½·mean of max((V − R)², (V_old + clip(V − V_old, ±ε) − R)²)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var[R − V] / Var[R]: 1 is a perfect critic, 0 no better than a constant."""
    var = masked_var(returns, mask)
    return float(1 - masked_var(returns - values, mask) / var) if var > 0 else float("nan")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)


class AdaptiveKL:
    """Ziegler et al. 2019: β ← β·(1 + K_β·e), e = clip(KL/target − 1, ±0.2), K_β = n_steps / horizon.
    With target None, β stays fixed."""

    def __init__(self, beta: float, target: float | None, horizon: int):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n_steps: int) -> float:
        if self.target:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.beta *= 1 + error * n_steps / self.horizon
        return self.beta


def nonfinite_rows(mask: torch.Tensor, **per_token: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """(B,) bool: the episodes where any named (B, T) tensor is NaN or ±inf at a response token, and the
    names of the tensors that were. One such entry (a bf16 log-prob off the end of its range, say) would
    turn the whole minibatch's loss, and then every weight of the policy, into NaN."""
    rows = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
    names = []
    for name, x in per_token.items():
        bad = (~torch.isfinite(x) & mask.bool()).any(1)
        if bad.any():
            rows |= bad
            names.append(name)
    return rows, names
