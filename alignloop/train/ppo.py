"""Step 3 — PPO against the reward model with a per-token KL penalty to SFT (`alignloop ppo`).

The InstructGPT design: policy initialised from the newest policy (SFT in round 1); frozen reference =
SFT; frozen reward model; a separate value model initialised from the reward model. Each iteration:

  rollout (the engine samples answers)  →  score (RM, + a penalty for answers that never end)
  → per-token reward −β·KL_t, the score added at the last token → GAE (γ = 1) → whiten advantages
  → several epochs of minibatches: clipped policy loss, clipped value loss (+ PPO-ptx LM loss)
  → adaptive β (Ziegler et al.) → log, probe gold score, checkpoint.

`--algo rloo` (Ahmadian et al. 2024) keeps the rollout, the scoring, the KL penalty, β's control, the
clipped policy loss, the logging, probes and checkpoints, and drops the value model: each rollout draws
batch_size / rloo_k prompts and samples each rloo_k times; an episode's return is its sequence reward
R = score − β·Σ_t KL_t (the per-token rewards summed), its advantage R minus the mean R of the other
answers to its prompt (`rl.rloo_advantages`; `--group-norm`: GRPO's (R − mean) / std), the same at every
token of the answer. With ppo_epochs 1 and one minibatch this is REINFORCE with the leave-one-out
baseline; more epochs reuse the batch through PPO's clipped ratio (as TRL's RLOO does). Written to
RUN/round-<i>/rloo/, its settings under [rloo] in config.toml.
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from alignloop import dist as D
from alignloop import forward as F_

from alignloop.config import LowRank, Resumable, option
from alignloop.errors import InputError
from alignloop.rundir import resolve_path, save_stage_config
from alignloop.train import loop as L
from alignloop.train import rl

SECTION = "ppo"


@dataclass
class Config(LowRank, Resumable):
    round: int = option(1, "round number: output goes to RUN/round-<round>/ppo/ (rloo: …/rloo/)", min=1)
    init: str = option("", "policy to start from (default: the previous round's policy of this --algo, else sft/)")
    reference: str = option("", "the KL anchor (default: the run's sft/)")
    reward_model: str = option("", "reward model (default: RUN/round-<round>/reward/)")
    value_init: str = option("", "value model start (default: the reward model, as InstructGPT)")
    prompts: str = option("", "prompts file (default: the run's world/prompts-train.jsonl)")
    iterations: int = option(30, "PPO iterations (rollout + update)", min=1)
    batch_size: int = option(64, "episodes per rollout", min=1)
    minibatch_size: int = option(16, "episodes per gradient step", min=1)
    ppo_epochs: int = option(2, "passes over each rollout batch", min=1)
    lr: float = option(3e-5, "policy learning rate (5e-5 over-optimised the tiny run: docs/LOG.md)", min=0.0, max=1.0)
    value_lr: float = option(1e-4, "value model learning rate", min=0.0, max=1.0)
    kl_coef: float = option(0.3, "β, the per-token KL penalty to the reference (InstructGPT: 0.02; β = 0 lets the policy exploit the reward model: docs/beta.md)", min=0.0)
    kl_target: float = option(0.0, "adaptive β toward this episode KL in nats (0: fixed β)", min=0.0)
    kl_horizon: int = option(10000, "adaptive-β horizon in episodes (Ziegler et al.)", min=1)
    gamma: float = option(1.0, "discount (1: the episode is one answer)", min=0.0, max=1.0)
    lam: float = option(0.95, "GAE λ", min=0.0, max=1.0)
    clip: float = option(0.2, "policy ratio clip ε", min=0.0)
    value_clip: float = option(0.2, "value clip ε", min=0.0)
    whiten_rewards: bool = option(False, "whiten per-token rewards in each batch")
    whiten_advantages: bool = option(True, "whiten advantages in each batch")
    reward_norm: bool = option(False, "scale the RM score to mean 0, std 1 over the first rollout batch, the start "
                               "policy's own answers (Ziegler et al. 2019); fixed after, so β means the same in any "
                               "RM's units: for a reward model whose scores barely vary (docs/LOG.md, SmolLM2)")
    missing_end_penalty: float = option(-1.0, "added to the score of an answer that never emits end-of-turn", max=0.0)
    ptx_coef: float = option(0.0, "γ_ptx: weight of the pretraining LM loss mixed in (PPO-ptx; InstructGPT: 27.8)", min=0.0)
    ptx_data: str = option("", "pretraining text for PPO-ptx (default: the run's world/corpus.jsonl)")
    temperature: float = option(1.0, "rollout sampling temperature; log-probs use the same logits / τ", min=0.01, max=5.0)
    lora_rank: int = option(0, "LoRA adapters of this rank for the policy and value models (0: full weights); "
                            "the reference is then the policy with its adapters off, the reward model the value "
                            "model with its adapters off (one copy of each base); saved merged", min=0)
    max_new_tokens: int = option(48, "answer length limit in tokens", min=1)
    probe_prompts: int = option(100, "dev prompts whose gold score is logged (0: none)", min=0)
    probe_every: int = option(5, "log the probe's gold score every N iterations", min=1)
    checkpoint_every: int = option(10, "write a checkpoint every N iterations", min=1)
    algo: str = option("ppo", "ppo (value model + GAE; RUN/round-<round>/ppo/) or rloo (rloo_k answers per prompt, "
                       "leave-one-out baseline, no value model; RUN/round-<round>/rloo/)", choices=("ppo", "rloo"))
    rloo_k: int = option(4, "rloo: answers sampled per prompt (batch_size must be a multiple of it)", min=2)
    group_norm: bool = option(False, "rloo: GRPO's advantage (R − group mean) / group std instead of R − the mean of "
                              "the others (PPO's whiten_* options do not apply to rloo)")


PRESETS = {
    "micro": dict(iterations=4, batch_size=16, minibatch_size=8, max_new_tokens=24, probe_prompts=16,
                  probe_every=2, checkpoint_every=2),
    # β 0.2 × 60 iterations, chosen on dev (docs/LOG.md): β 0.1 let round 2 drift to 4.6 nats and lose
    # known-fact helpfulness (dev gain +0.003); β 0.2 gained +0.025 / +0.026 in rounds 1 / 2 at 0.5 / 0.9 nats
    "tiny": dict(iterations=60, kl_coef=0.2),
    "small": dict(iterations=200, batch_size=256, minibatch_size=64, lr=1e-5, value_lr=2e-5, kl_coef=0.02,
                  max_new_tokens=128, probe_prompts=500),
}


def section(cfg: Config) -> str:
    """The run-directory stage this call writes: round-<i>/ppo/ or round-<i>/rloo/ (cli's stage guard)."""
    return cfg.algo


def check(cfg: Config) -> None:
    if cfg.algo == "rloo" and cfg.batch_size % cfg.rloo_k:
        raise InputError(f"--algo rloo samples rloo_k = {cfg.rloo_k} answers per prompt: batch_size {cfg.batch_size} "
                         f"is not a multiple of it", field="batch_size")


# ---------------------------------------------------------------- batching (alignloop/forward.py)

layout, state_values = F_.layout, F_.state_values


def action_logprobs(model, ids, attn, pos, P: int, with_entropy: bool = False, allowed=None, temperature: float = 1.0):
    """log π(response token t | state t) for t = 0..R−1 from one forward pass: (B, R). Over the engine's
    vocabulary (`allowed`) and from logits / τ: the distribution the rollout was sampled from."""
    return F_.action_logprobs(model, ids, attn, pos, P, allowed, temperature, with_entropy)


# ---------------------------------------------------------------- consistency checks


def _vocab_of(path: Path) -> dict:
    from alignloop.tokenizer import ChatTokenizer
    return ChatTokenizer.load(path).hf.get_vocab()


def check_stages(policy: Path, reference: Path, reward: Path, value: Path | None) -> None:
    """Stages built on different tokenizers or sizes cannot be combined; say which, before any work.
    `value` None: no value model (RLOO)."""
    import json
    vocab = _vocab_of(policy)
    for name, path in (("reference", reference), ("reward model", reward), ("value model", value)):
        if path is None:
            continue
        if not (path / "config.json").exists():
            raise InputError(f"the {name} folder has no model", file=path)
        if _vocab_of(path) != vocab:
            raise InputError(f"the {name}'s tokenizer differs from the policy's ({policy})", file=path, field="tokenizer")
    if value is None:
        return
    pc = json.loads((policy / "config.json").read_text())
    vc = json.loads((value / "config.json").read_text())
    for k in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if pc.get(k) != vc.get(k):
            raise InputError(f"the value model's {k} is {vc.get(k)}, the policy's {pc.get(k)}: a value model of "
                             f"another size", file=value, field=k)


# ---------------------------------------------------------------- the stage


def run(cfg: Config, out: Path) -> Path:
    import contextlib
    from alignloop.engine import Engine
    from alignloop.model import load_causal_lm, load_scalar_model, save_model
    from alignloop.sample import read_prompts
    from alignloop.tokenizer import ChatTokenizer
    from alignloop.train.reward import RewardScorer

    check(cfg)
    rloo = cfg.algo == "rloo"  # no value model; the leave-one-out baseline instead of GAE
    stage = out / f"round-{cfg.round}" / cfg.algo
    prev = out / f"round-{cfg.round - 1}" / cfg.algo
    from alignloop.sources import resolve_model
    init = resolve_model(cfg.init, out, "init") if cfg.init else (prev if (prev / "config.json").exists() else out / "sft")
    reference = resolve_model(cfg.reference, out, "reference") if cfg.reference else out / "sft"
    rm_path = resolve_path(cfg.reward_model, out, f"round-{cfg.round}/reward")
    value_path = Path(cfg.value_init) if cfg.value_init else rm_path
    check_stages(init, reference, rm_path, None if rloo else value_path)
    tok = ChatTokenizer.load(init)
    prompts_path = resolve_path(cfg.prompts, out, "world/prompts-train.jsonl")
    prompts = read_prompts(prompts_path)
    fsdp = cfg.fsdp and D.launched()
    if fsdp:
        check_fsdp(init)
    device = D.setup(cfg)
    D.check_rows(min(cfg.batch_size, len(prompts)), "a rollout batch (--batch-size, or the prompts)", "batch_size")
    policy = load_causal_lm(init).to(device)
    ctx = policy.config.max_position_embeddings
    prompt_ids = [tok.render_prompt(p["messages"]) for p in prompts]
    if any(len(x) + 8 > ctx for x in prompt_ids):
        p = next(p for p, x in zip(prompts, prompt_ids) if len(x) + 8 > ctx)
        raise InputError(f"a prompt leaves no room to answer in the {ctx}-token context (id {p['id']})",
                         file=prompts_path, line=p["_line"], field="prompt")
    # Frozen models: bf16 on a GPU, fp32 on the CPU. With LoRA the reference is the policy with its
    # adapters off when both start from the same folder, and the reward model is the value model with its
    # adapters off when the value starts from it: one copy of each base model's weights.
    frozen = torch.bfloat16 if device.type == "cuda" else torch.float32
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    value = None if rloo else load_scalar_model(value_path).to(device)
    if cfg.gradient_checkpointing and value is not None:
        value.gradient_checkpointing_enable()
    if cfg.lora_rank:
        policy = L.apply_lora(policy, cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed)
        if value is not None:
            value = L.apply_lora(value, cfg.lora_rank, cfg.lora_alpha, scalar_head=True, seed=cfg.seed + 1)
    # Under torchrun each rank samples and scores its share of each rollout; the per-token tensors of the
    # whole batch are then put together on every rank (so advantages are whitened, and β adapted, over the
    # global batch) and each minibatch is split over the ranks. `pnet`/`vnet` train the policy and value
    # through DDP, or FSDP2 with --fsdp (built before the optimizers, which hold the sharded parameters).
    # The frozen reference and reward models stay whole on every rank (replicated): they hold no gradients
    # or optimizer state, the bulk of what sharding saves, and whole they run no collective, so each rank
    # scores its own share (and rank 0 the probe) alone.
    pnet = D.wrap(F_.Through(policy), cfg.fsdp, device, cfg.dtype) if D.world() > 1 else policy
    vnet = D.wrap(F_.Through(value), cfg.fsdp, device, cfg.dtype) if D.world() > 1 and value is not None else value
    if cfg.lora_rank and reference.resolve() == init.resolve():
        ref, ref_ctx = pnet, policy.disable_adapter  # through `pnet`: under FSDP only it sees whole weights
    else:
        ref, ref_ctx = load_causal_lm(reference, dtype=frozen).to(device).eval().requires_grad_(False), contextlib.nullcontext
    if cfg.lora_rank and value is not None and value_path.resolve() == rm_path.resolve() and not fsdp:
        scorer = RewardScorer(rm_path, device, model=value, context=value.disable_adapter)
    else:  # (under FSDP the value model's base is sharded: the scorer keeps a whole copy, as said above)
        scorer = RewardScorer(rm_path, device, dtype=frozen)
    allowed = F_.allowed_tokens(tok, policy.config.vocab_size, device)
    opt_p = L.make_optimizer(policy, cfg.lr, 0.0)
    opt_v = L.make_optimizer(value, cfg.value_lr, 0.0) if value is not None else None
    kl_ctl = rl.AdaptiveKL(cfg.kl_coef, cfg.kl_target or None, cfg.kl_horizon)
    ptx_rows = _ptx_rows(cfg, out, tok) if cfg.ptx_coef > 0 else None
    world, probe = _probe(out, cfg)
    ckpts = L.Checkpoints(stage)
    start, norm = 0, None  # norm: (mean, std) of the RM score on the first rollout, with --reward-norm
    state = ckpts.load() if cfg.resume else None
    if state is not None:  # (the number of processes and how they talk may change: see dist.py)
        per_call = ("resume", "fsdp", "dist_backend")
        # a field added since the checkpoint was written (algo, rloo_k, …) had its default's behaviour then
        saved = {k: v for k, v in {**asdict(Config()), **state["config"]}.items() if k not in per_call}
        now = {k: v for k, v in asdict(cfg).items() if k not in per_call}
        if saved != now:
            diff = next(k for k in now if saved.get(k) != now[k])
            raise InputError(f"--resume on a PPO folder of another configuration ({diff}: {saved.get(diff)!r} there, "
                             f"{now[diff]!r} now)", file=stage, field=diff)
        D.restore(state, pnet, opt_p, policy)
        if value is not None:
            D.restore({"model": state["value"], "optim": state["optim_value"]}, vnet, opt_v, value)
        kl_ctl.beta, start = state["beta"], state["step"]
        norm = state.get("reward_norm")
    metrics = L.Metrics(stage, resume_step=start if state is not None else None) if D.is_main() else None
    if D.is_main():  # only rank 0 writes
        save_stage_config(out, section(cfg), cfg)
    # the engine reads the policy's weights directly: under FSDP2 each sampling runs inside `D.whole(pnet)`
    engine = Engine(F_.unwrap(policy), tok, device, max_batch=cfg.batch_size)

    @contextlib.contextmanager
    def sampling():
        """The policy whole while the engine samples (FSDP2: gathered on every rank, a collective), and
        under FSDP2 nothing of it kept afterwards: the engine's fused copy goes with the gathered weights."""
        with D.whole(pnet):
            yield
        if fsdp:
            engine.release()
    print(f"{cfg.algo}: round {cfg.round}, policy {init}, reward model {rm_path}, {len(prompts)} prompts, "
          f"{cfg.iterations} iterations × {cfg.batch_size} episodes, β {kl_ctl.beta}"
          + (f", LoRA rank {cfg.lora_rank}" if cfg.lora_rank else "")
          + (f", {cfg.rloo_k} answers per prompt" + (", group-normalised" if cfg.group_norm else "") if rloo else ""))
    if probe and start == 0:
        with sampling():  # every rank gathers the weights (FSDP); rank 0 alone samples the probe
            if metrics:
                metrics.log(step=0, kl_sampled=0.0, beta=kl_ctl.beta, **_probe_scores(engine, tok, world, probe, scorer, cfg))
    bar = L.Progress(cfg.iterations, f"{cfg.algo} round {cfg.round}", start)
    streak = 0  # iterations in a row whose every optimizer step was skipped
    amp = lambda: L.autocast(device, cfg.dtype)  # noqa: E731 — old, reference and new log-probs alike

    def logprobs(model, mb, with_entropy=False):
        return action_logprobs(model, ids[mb], attn[mb], pos[mb], P, with_entropy, allowed, cfg.temperature)

    for it in range(start, cfg.iterations):
        t0 = time.perf_counter()
        rng = random.Random(cfg.seed * 1_000_003 + it)
        if rloo:  # rloo_k episodes per prompt, side by side (each row still samples from its own generator)
            batch = [i for i in rng.sample(range(len(prompts)), min(cfg.batch_size // cfg.rloo_k, len(prompts)))
                     for _ in range(cfg.rloo_k)]
        else:
            batch = rng.sample(range(len(prompts)), min(cfg.batch_size, len(prompts)))
        # ---- rollout (LoRA: the engine runs the merged-on-the-fly policy, adapters active); under torchrun
        # each rank samples its share, episode p with the generator it has in one process, (seed, p)
        mine = D.part(list(range(len(batch))))
        seed = cfg.seed * 7_919 + it
        with sampling(), amp():
            outs = engine.generate([prompt_ids[batch[p]] for p in mine], max_new_tokens=cfg.max_new_tokens,
                                   temperature=cfg.temperature,
                                   seed=seed if D.world() == 1 else [(seed * 1_000_003 + p) % 2**63 for p in mine])
        t_gen = time.perf_counter() - t0
        responses, texts, sampled_lp = D.gather_rows(mine, [o.ids for o in outs], [o.text.strip() for o in outs],
                                                     [o.logprobs for o in outs])
        ended = torch.tensor([bool(r) and r[-1] in tok.stop_ids for r in responses], dtype=torch.float32)
        # Minibatches of every epoch, drawn now: the first epoch's minibatches are also how the old
        # log-probs, reference log-probs and values are computed, so the first update sees exactly the
        # inputs (same rows, same shapes, same autocast) that produced the old log-probs: ratio 1.
        epochs = []
        for _ in range(cfg.ppo_epochs):
            order = list(range(len(batch)))
            rng.shuffle(order)
            epochs.append([torch.tensor(order[s:s + cfg.minibatch_size], device=device)
                           for s in range(0, len(order), cfg.minibatch_size)])
        # ---- score and assemble rewards (no gradients)
        with torch.no_grad():
            # the reward model reads its score where it was trained to: see ChatTokenizer.scored_ids
            score = torch.zeros(len(batch), device=device)
            score[mine] = torch.tensor(scorer.score_ids([tok.scored_ids(prompt_ids[batch[p]], responses[p]) for p in mine]),
                                       device=device)
            score = D.all_sum(score)  # every rank: the scores of the whole batch
            score_raw = score.clone()
            if cfg.reward_norm:
                if norm is None:
                    norm = (score.mean().item(), max(score.std().item(), 1e-6) if len(score) > 1 else 1.0)
                score = (score - norm[0]) / norm[1]
            score = score + cfg.missing_end_penalty * (1 - ended.to(device))
            ids, attn, pos, mask, P = layout([prompt_ids[i] for i in batch], responses, tok.pad_id, device)
            old_logp, ref_logp, old_values = (torch.zeros(mask.shape, device=device) for _ in range(3))
            policy.eval()
            if value is not None:
                value.eval()
            with amp():
                for mb_all in epochs[0]:
                    mb = D.part(mb_all)  # this rank's rows: the ones it will take of the same minibatch in epoch 1
                    # a rank left without a row runs one all the same and keeps nothing: every rank runs
                    # the same passes (under FSDP each gathers the weights with the others)
                    run_mb, keep = (mb, slice(None)) if len(mb) else (mb_all[:1], slice(0, 0))
                    old_logp[mb] = logprobs(pnet, run_mb)[keep]
                    with ref_ctx():
                        ref_logp[mb] = logprobs(ref, run_mb)[keep]
                    if value is not None:
                        old_values[mb] = state_values(vnet, ids[run_mb], attn[run_mb], pos[run_mb], P)[keep]
            old_logp, ref_logp, old_values = (D.all_sum(t) for t in (old_logp, ref_logp, old_values))
            policy.train()
            if value is not None:
                value.train()
            # the sampler's log-probs against the trainer's, on the same tokens: equal up to rounding in fp32;
            # a gap means the rollout came from another distribution than the one PPO's ratio assumes
            engine_lp = torch.zeros_like(old_logp)
            for b, lps in enumerate(sampled_lp):
                engine_lp[b, :len(lps)] = torch.tensor(lps[:engine_lp.shape[1]], dtype=engine_lp.dtype)
            bad, what = rl.nonfinite_rows(mask, **{"old log-probs": old_logp, "reference log-probs": ref_logp,
                                                   "values": old_values, "scores": score[:, None].expand_as(mask)})
            if bad.any():  # left out of this update, said aloud (the same on every rank: the tensors are global)
                mask = mask * ~bad[:, None]
                old_logp, ref_logp, old_values, score = (torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)
                                                         for t in (old_logp, ref_logp, old_values, score))
                bar.write(f"{cfg.algo}: iteration {it + 1}: {', '.join(what)} not finite in {int(bad.sum())} of "
                          f"{len(batch)} episodes, left out of this update" + (
                              " (bf16 rounding: --dtype float32 avoids it)" if L.amp_dtype(device, cfg.dtype) else ""))
            sampler_gap = rl.masked_mean((engine_lp - old_logp).abs(), mask).item()
            kl = rl.kl_per_token(old_logp, ref_logp) * mask
            rewards = rl.token_rewards(score, kl, mask, kl_ctl.beta)
            if rloo:  # the sequence reward score − β·Σ KL_t, its leave-one-out advantage at every token
                seq_reward = rewards.sum(1)
                adv, returns = rl.rloo_advantages(seq_reward, cfg.rloo_k, cfg.group_norm)[:, None] * mask, None
            else:
                if cfg.whiten_rewards:
                    rewards = rl.whiten(rewards, mask, shift_mean=False)
                adv, returns = rl.gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
                if cfg.whiten_advantages:
                    adv = rl.whiten(adv, mask)
        # ---- PPO epochs over minibatches
        stats = {"pg_loss": [], "vf_loss": [], "clip_frac": [], "approx_kl": [], "entropy": [], "ptx_loss": []}
        first_ratio_error, skipped = None, 0
        for e, minibatches in enumerate(epochs):
            for s, mb_all in enumerate(minibatches):
                # this rank's rows of the minibatch; each loss below is a token mean over its rows, weighted
                # by their share of the minibatch's tokens (×world: DDP averages the ranks' gradients). A
                # rank left without a row runs one with weight 0: every rank runs the same passes.
                mb = D.part(mb_all)
                share = float(mask[mb].sum() / mask[mb_all].sum()) if len(mb) else 0.0
                mb = mb if len(mb) else mb_all[:1]
                m = mask[mb]
                with amp():
                    logp, ent = logprobs(pnet, mb, with_entropy=True)
                    if first_ratio_error is None:  # the precision/temperature contract, checked every iteration
                        first_ratio_error = D.all_max(((logp.detach() - old_logp[mb]).exp() - 1).abs().mul(m).max())
                    pg, st = rl.policy_loss(logp, old_logp[mb], adv[mb], m, cfg.clip)
                    loss = pg * share
                    if ptx_rows is not None:
                        rows = ptx_rows[torch.randint(len(ptx_rows), (cfg.minibatch_size,),
                                                      generator=torch.Generator().manual_seed(it * 997 + e * 101 + s))]
                        part = D.part(rows)
                        ptx_share = len(part) / len(rows)
                        part = (part if len(part) else rows[:1]).to(device)
                        hidden, head = F_.causal_hidden(pnet, part[:, :-1], torch.ones_like(part[:, :-1]))
                        ptx = -F_.token_logprobs(hidden, head, part[:, 1:])[0].mean()
                        loss = loss + cfg.ptx_coef * ptx * ptx_share
                opt_p.zero_grad(set_to_none=True)
                (loss * D.world()).backward()
                skipped += _step_if_finite(opt_p)
                if value is not None:
                    with amp():
                        v = state_values(vnet, ids[mb], attn[mb], pos[mb], P)
                        vf = rl.value_loss(v, old_values[mb], returns[mb], m, cfg.value_clip)
                    opt_v.zero_grad(set_to_none=True)
                    (vf * share * D.world()).backward()
                    skipped += _step_if_finite(opt_v)
                # the minibatch's statistics: the ranks' shares added up (one all-reduce)
                got = D.all_sum(torch.tensor([pg.item(), vf.item() if value is not None else 0.0, st["clip_frac"],
                                              st["approx_kl"], rl.masked_mean(ent.detach(), m).item()],
                                             dtype=torch.float64) * share)
                for k, x in zip(("pg_loss", "vf_loss", "clip_frac", "approx_kl", "entropy"), got.tolist()):
                    if k != "vf_loss" or value is not None:  # RLOO has no value model
                        stats[k].append(x)
                if ptx_rows is not None:
                    stats["ptx_loss"].append(D.all_sum(torch.tensor(ptx.item() * ptx_share, dtype=torch.float64)).item())
        # ---- bookkeeping
        seq_kl = kl.sum(1).mean().item()
        beta_used = kl_ctl.beta
        kl_ctl.update(seq_kl, len(batch))
        dt = time.perf_counter() - t0
        rec = {"step": it + 1, "rm_score": score_raw.mean().item(), "reward": score.mean().item(),
               "kl_sampled": seq_kl, "beta": beta_used, "ended_share": ended.mean().item(),
               "gold_rollout": sum(world.gold_score(prompts[i], t) for i, t in zip(batch, texts)) / len(texts)
               if world and all("gold" in prompts[i] for i in batch) else None,
               "response_length": mask.sum(1).float().mean().item(),
               "explained_variance": rl.explained_variance(old_values, returns, mask) if value is not None else None,
               "first_ratio_error": first_ratio_error,
               "episodes_per_s": len(batch) / dt, "tokens_per_s": float(mask.sum()) / dt,
               "generation_share": t_gen / dt, "peak_memory_gb": L.peak_memory_gb(device)}
        rec |= {k: sum(v) / len(v) for k, v in stats.items() if v}
        rec |= {"nonfinite_episodes": int(bad.sum()), "skipped_steps": skipped, "sampler_gap": sampler_gap}
        if skipped:
            bar.write(f"{cfg.algo}: iteration {it + 1}: {skipped} optimizer steps skipped, their gradients not finite")
        streak = streak + 1 if skipped and skipped >= len(stats["pg_loss"]) * (2 if value is not None else 1) else 0
        if streak == 3:
            half = L.amp_dtype(device, cfg.dtype) is not None
            raise InputError(f"every optimizer step of iterations {it - 1}-{it + 1} had gradients that were not finite; "
                             f"stopped (the last checkpoint is in {ckpts.dir})"
                             + ("; --dtype float32 avoids bf16 rounding" if half else "; try a lower --lr"),
                             file=stage, field="dtype" if half else "lr")
        if probe and ((it + 1) % cfg.probe_every == 0 or it + 1 == cfg.iterations):
            with sampling():  # every rank gathers the weights (FSDP); rank 0 alone samples (the others wait)
                if D.is_main():
                    rec |= _probe_scores(engine, tok, world, probe, scorer, cfg)
        if metrics:
            metrics.log(**rec)
        bar.update(1, rm=rec["rm_score"], kl=seq_kl, **({"gold": rec["gold_probe"]} if "gold_probe" in rec else {}))
        L.release_memory()
        if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations:
            # full state dicts in the one-process layout, gathered to rank 0 (a collective under FSDP)
            pstate = D.capture(pnet, opt_p, policy)
            vstate = D.capture(vnet, opt_v, value) if value is not None else {}
            if D.is_main():
                ckpts.save(it + 1, config=asdict(cfg), beta=kl_ctl.beta, reward_norm=norm,
                           **({"value": vstate["model"], "optim_value": vstate["optim"]} if vstate else {}),
                           **pstate)
    bar.close()
    final = D.gathered(pnet, policy)  # rank 0: the whole policy (a fresh copy under FSDP); None elsewhere
    if not D.is_main():
        return stage
    save_model(L.merged(final), tok, stage)
    rows = L.read_jsonl_tolerant(metrics.path)
    last = rows[-1]
    print(f"{cfg.algo}: round {cfg.round} done: RM score {last['rm_score']:+.3f}, sampled KL to SFT {last['kl_sampled']:.2f} nats"
          + (f", probe gold {last['gold_probe']:.3f}" if "gold_probe" in last else "")
          + f", peak memory {L.peak_memory_gb(device):.2f} GB → {stage}")
    from alignloop.alarm import PREFIX, hacking_alarm
    alarm = hacking_alarm(rows)  # the whole round's probe curve, resumed parts included
    if alarm:
        print(f"{PREFIX}{cfg.algo} round {cfg.round}: {alarm}")
    return stage


def _step_if_finite(opt) -> int:
    """Clip the gradients to norm 1 and step, unless their norm is NaN or inf (then drop them): 1 if skipped.
    The norm is of the synchronised gradients, so every rank decides alike."""
    norm = torch.nn.utils.clip_grad_norm_(_learning(opt), 1.0)
    if not torch.isfinite(norm):
        opt.zero_grad(set_to_none=True)
        return 1
    opt.step()
    return 0


def _learning(opt) -> list:
    """The parameters an optimizer updates (under FSDP the sharded ones, whatever the modules hold now)."""
    return [q for g in opt.param_groups for q in g["params"]]


def check_fsdp(init: Path) -> None:
    """Under FSDP2 the engine samples inside `D.whole`, reading the gathered weights directly; its generic path
    (architectures other than its fast ones) runs the model's own forward, whose sharded blocks would
    gather and free their weights at every token, a collective that ranks sampling different numbers of
    tokens cannot share."""
    import json
    from alignloop.engine import FAST_TYPES
    kind = json.loads((init / "config.json").read_text()).get("model_type")
    if kind not in FAST_TYPES:
        raise InputError(f"PPO under --fsdp samples from {', '.join(sorted(FAST_TYPES))} models; this policy is "
                         f"{kind!r}: leave out --fsdp (DDP)", file=init, field="fsdp")


def _ptx_rows(cfg: Config, out: Path, tok) -> torch.Tensor:
    from alignloop.train.pretrain import load_corpus, rows_of
    ids, _, _, _ = load_corpus(resolve_path(cfg.ptx_data, out, "world/corpus.jsonl"), tok, 0.0)
    return rows_of(ids, 128)


def _probe(out: Path, cfg: Config):
    """A fixed set of dev prompts for the gold-vs-proxy picture (none without a world); never test ones."""
    if not cfg.probe_prompts or not (out / "world" / "world.json").exists():
        return None, None
    from alignloop.world import load_world
    world = load_world(out)
    return world, world.prompts("dev")[: cfg.probe_prompts]


@torch.no_grad()
def _probe_scores(engine, tok, world, probe, scorer, cfg) -> dict:
    outs = engine.generate([tok.render_prompt(p["messages"]) for p in probe], max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature, seed=12345)
    texts = [o.text.strip() for o in outs]
    rm = scorer.score_texts([p["messages"] for p in probe], texts)
    from alignloop.evaluate import distinct_n
    return {"gold_probe": sum(world.gold_score(p, t) for p, t in zip(probe, texts)) / len(probe),
            "rm_probe": sum(rm) / len(rm), "distinct_2_probe": distinct_n(texts, 2)}
