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

import contextlib
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from alignloop import dist
from alignloop import forward
from alignloop import precision

from alignloop.config import LowRank, Resumable, option
from alignloop.errors import InputError
from alignloop.rundir import resolve_path, save_stage_config
from alignloop.stats import distinct_n
from alignloop.train import loop
from alignloop.train import rl
from alignloop.train.data import load_corpus, rows_of

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
    lr: float = option(3e-5, "policy learning rate (5e-5 over-optimised the tiny preset: the policy learnt blanket refusals)",
                       min=0.0, max=1.0)
    value_lr: float = option(1e-4, "value model learning rate", min=0.0, max=1.0)
    kl_coef: float = option(0.3, "β, the per-token KL penalty to the reference (InstructGPT: 0.02); β = 0 lets the policy "
                            "exploit the reward model (tiny: its score rose while the gold score fell below SFT's)", min=0.0)
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
                               "RM's units: for a reward model whose scores barely vary (SmolLM2 on HH-RLHF: by ~0.03 a batch, "
                               "less than β·KL, so the policy did not move)")
    missing_end_penalty: float = option(-1.0, "added to the score of an answer that never emits end-of-turn", max=0.0)
    length_control: bool = option(False, "take the reward model's length preference out of its score: the score "
                                  "minus its least-squares slope on answer length (over every episode so far) times "
                                  "the length's distance from their mean, before --reward-norm. A reward model "
                                  "that prefers short answers (SmolLM2 on HH-RLHF: PPO cut answers to 36-40% of "
                                  "their length) then pays for what it prefers at a given length")
    ptx_coef: float = option(0.0, "γ_ptx: weight of the pretraining LM loss mixed in (PPO-ptx; InstructGPT: 27.8)", min=0.0)
    ptx_data: str = option("", "pretraining text for PPO-ptx (default: the run's world/corpus.jsonl)")
    temperature: float = option(1.0, "rollout sampling temperature; log-probs use the same logits / τ", min=0.01, max=5.0)
    group_by_length: bool = option(False, "minibatches of rows with prompts of similar length (each epoch: the rows "
                                   "sorted by prompt length, cut into minibatches, those shuffled), so that each "
                                   "minibatch pads less (SmolLM2 on HH prompts, 2 of 8 rows: ~15% fewer positions "
                                   "than random minibatches); off: every epoch a fresh random partition")
    old_logprobs: str = option("recompute", "π_old of PPO's ratio: recompute (a forward pass of the policy over the "
                               "batch after sampling, as TRL and OpenRLHF do: the first ratio is 1 exactly) or "
                               "sampler (the engine's log-probs of the tokens it sampled: the same distribution over "
                               "the same vocabulary at the same τ, one forward pass fewer an iteration; the first ratio "
                               "is then 1 within the sampler's rounding, ~1e-6 in fp32 — more under bf16)",
                               choices=("recompute", "sampler"))
    lora_rank: int = option(0, "LoRA adapters of this rank for the policy and value models (0: full weights); "
                            "the reference is then the policy with its adapters off, the reward model the value "
                            "model with its adapters off (one copy of each base); saved merged", min=0)
    value_lora_layers: int = option(0, "with lora_rank: the value model's adapters on its last N decoder blocks "
                                    "only (0: every block). Its backward then stops at the lowest of them, and its "
                                    "frozen blocks below run once per episode, not in every update (not under "
                                    "--fsdp), as the reward model trains its top blocks (reward --train-layers)",
                                    min=0)
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
    if cfg.value_lora_layers and not cfg.lora_rank:
        raise InputError("--value-lora-layers places the value model's LoRA adapters: it needs --lora-rank > 0",
                         field="value_lora_layers")


# ---------------------------------------------------------------- batching (alignloop/forward.py)

layout, state_values = forward.layout, forward.state_values
bottom_features, top_values = forward.bottom_features, forward.top_values


def action_logprobs(model, ids, attn, pos, P: int, with_entropy: bool = False, allowed=None, temperature: float = 1.0):
    """log π(response token t | state t) for t = 0..R−1 from one forward pass: (B, R). Over the engine's
    vocabulary (`allowed`) and from logits / τ: the distribution the rollout was sampled from."""
    return forward.action_logprobs(model, ids, attn, pos, P, allowed, temperature, with_entropy)


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
            flag = {"reference": "reference", "reward model": "reward-model", "value model": "value-init"}[name]
            raise InputError(f"the {name} folder has no model (give --{flag})", file=path,
                             field=flag.replace("-", "_"))
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


@dataclass
class Session:
    """Everything one PPO call sets up once and every iteration reads: the paths, the models (and their
    DDP/FSDP2 wrappers `pnet`/`vnet`), the optimizers, β's controller, the probe and the output."""
    cfg: Config
    stage: Path
    init: Path
    tok: object
    prompts: list
    prompt_ids: list
    device: torch.device
    fsdp: bool
    policy: object
    value: object            # None for rloo
    pnet: object
    vnet: object
    ref: object
    ref_ctx: object          # a context manager: the reference's adapters off (LoRA), or nothing
    scorer: object
    allowed: torch.Tensor
    engine: object
    opt_p: object
    opt_v: object
    kl_ctl: rl.AdaptiveKL
    ptx_rows: torch.Tensor | None
    world: object
    probe: list | None
    ckpts: loop.Checkpoints
    metrics: loop.Metrics | None
    start: int = 0
    norm: tuple | None = None  # (mean, std) of the RM score on the first rollout, with --reward-norm
    seen: list = field(default_factory=list)  # [(answer tokens, RM score)] of every episode, with --length-control

    @property
    def rloo(self) -> bool:
        return self.cfg.algo == "rloo"

    def amp(self):
        """One autocast for the old, reference and new log-probs alike (their ratio is 1 at the first step)."""
        return precision.autocast(self.device, self.cfg.dtype)

    @contextlib.contextmanager
    def sampling(self):
        """The policy whole while the engine samples (FSDP2: gathered on every rank, a collective), and
        under FSDP2 nothing of it kept afterwards: the engine's fused copy goes with the gathered weights."""
        with dist.whole(self.pnet):
            yield
        if self.fsdp:
            self.engine.release()


@dataclass
class Rollout:
    """One iteration's batch, filled in by the phases in turn: `rollout` (what was sampled), `score` (the
    per-token tensors, (B, R) over the response positions), and read by `update` and `record`."""
    batch: list[int]                 # prompt indices
    responses: list[list[int]]
    texts: list[str]
    sampled_lp: list[list[float]]    # the engine's log-prob of each sampled token
    ended: torch.Tensor              # (B,) 1 where the answer emitted end-of-turn
    epochs: list[list[torch.Tensor]]  # every PPO epoch's minibatches (row indices), drawn at rollout time
    t_gen: float
    ids: torch.Tensor = None         # layout(): prompt left-padded to P, response from column P
    attn: torch.Tensor = None
    pos: torch.Tensor = None
    mask: torch.Tensor = None        # (B, R) 1 on response tokens
    P: int = 0
    score_raw: torch.Tensor = None   # (B,) the reward model's score
    score: torch.Tensor = None       # normalised (--reward-norm) and with the missing-end penalty
    old_logp: torch.Tensor = None
    ref_logp: torch.Tensor = None
    old_values: torch.Tensor = None
    vfeat: torch.Tensor = None       # (B, T, hidden) the value model's frozen bottom blocks' output (`_value_top`)
    kl: torch.Tensor = None
    adv: torch.Tensor = None
    returns: torch.Tensor = None
    sampler_gap: float = 0.0
    length_slope: float | None = None  # the RM score's slope on answer length (--length-control)
    nonfinite: int = 0
    seconds: dict = field(default_factory=dict)  # where the iteration's time went, by phase (metrics: seconds_*)


# the phases `timed` clocks (seconds_* in metrics.jsonl; 0 for one an iteration skips: the policy's
# log-probs with --old-logprobs sampler, the value model's under rloo)
SCORED_PHASES = ("reward_model", "policy_logprobs", "reference_logprobs", "values", "policy_update", "value_update")


@contextlib.contextmanager
def timed(ro: Rollout, phase: str, device):
    """Add the time of the block to ro.seconds[phase] (on a GPU after its queued work is done)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    yield
    sync()
    ro.seconds[phase] = ro.seconds.get(phase, 0.0) + time.perf_counter() - t0


def run(cfg: Config, out: Path) -> Path:
    check(cfg)
    s = _setup(cfg, out)
    if s.probe and s.start == 0:
        with s.sampling():  # every rank gathers the weights (FSDP); rank 0 alone samples the probe
            if s.metrics:
                s.metrics.log(step=0, kl_sampled=0.0, beta=s.kl_ctl.beta, **_probe_scores(s))
    bar = loop.Progress(cfg.iterations, f"{cfg.algo} round {cfg.round}", s.start)
    streak = 0  # iterations in a row whose every optimizer step was skipped
    for it in range(s.start, cfg.iterations):
        t0 = time.perf_counter()
        ro = rollout(s, it)
        score(s, ro, it, bar)
        stats, skipped = update(s, ro, it)
        rec = record(s, ro, stats, skipped, it, time.perf_counter() - t0)
        bar.update(1, rm=rec["rm_score"], kl=rec["kl_sampled"], **({"gold": rec["gold_probe"]} if "gold_probe" in rec else {}))
        if skipped:
            bar.write(f"{cfg.algo}: iteration {it + 1}: {skipped} optimizer steps skipped, their gradients not finite")
        steps = len(stats["pg_loss"]) * (1 if s.rloo else 2)
        streak = streak + 1 if skipped and skipped >= steps else 0
        if streak == 3:
            half = precision.amp_dtype(s.device, cfg.dtype) is not None
            raise InputError(f"every optimizer step of iterations {it - 1}-{it + 1} had gradients that were not finite; "
                             f"stopped (the last checkpoint is in {s.ckpts.dir})"
                             + ("; --dtype float32 avoids bf16 rounding" if half else "; try a lower --lr"),
                             file=s.stage, field="dtype" if half else "lr")
        loop.release_memory()
        if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations:
            checkpoint(s, it + 1)
    bar.close()
    return finish(s)


def _setup(cfg: Config, out: Path) -> Session:
    """Resolve the stages, load the models (LoRA, DDP/FSDP2), optimizers and β; resume from a checkpoint."""
    from alignloop.engine import Engine
    from alignloop.model import load_causal_lm, load_scalar_model
    from alignloop.sample import read_prompts
    from alignloop.sources import resolve_model
    from alignloop.tokenizer import ChatTokenizer
    from alignloop.scoring import RewardScorer

    rloo = cfg.algo == "rloo"  # no value model; the leave-one-out baseline instead of GAE
    stage = out / f"round-{cfg.round}" / cfg.algo
    prev = out / f"round-{cfg.round - 1}" / cfg.algo
    init = resolve_model(cfg.init, out, "init") if cfg.init else (prev if (prev / "config.json").exists() else out / "sft")
    reference = resolve_model(cfg.reference, out, "reference") if cfg.reference else out / "sft"
    rm_path = resolve_path(cfg.reward_model, out, f"round-{cfg.round}/reward")
    value_path = Path(cfg.value_init) if cfg.value_init else rm_path
    check_stages(init, reference, rm_path, None if rloo else value_path)
    tok = ChatTokenizer.load(init)
    prompts_path = resolve_path(cfg.prompts, out, "world/prompts-train.jsonl")
    prompts = read_prompts(prompts_path)
    fsdp = cfg.fsdp and dist.launched()
    if fsdp:
        check_fsdp(init)
    device = dist.setup(cfg)
    dist.check_rows(min(cfg.batch_size, len(prompts)), "a rollout batch (--batch-size, or the prompts)", "batch_size")
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
        policy = loop.apply_lora(policy, cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed)
        if value is not None:
            value = loop.apply_lora(value, cfg.lora_rank, cfg.lora_alpha, scalar_head=True, seed=cfg.seed + 1,
                                    top_layers=cfg.value_lora_layers)
    # Under torchrun each rank samples and scores its share of each rollout; the per-token tensors of the
    # whole batch are then put together on every rank (so advantages are whitened, and β adapted, over the
    # global batch) and each minibatch is split over the ranks. `pnet`/`vnet` train the policy and value
    # through DDP, or FSDP2 with --fsdp (built before the optimizers, which hold the sharded parameters).
    # The frozen reference and reward models stay whole on every rank (replicated): they hold no gradients
    # or optimizer state, the bulk of what sharding saves, and whole they run no collective, so each rank
    # scores its own share (and rank 0 the probe) alone.
    pnet = dist.wrap(forward.Through(policy), cfg.fsdp, device, cfg.dtype) if dist.world() > 1 else policy
    vnet = dist.wrap(forward.Through(value), cfg.fsdp, device, cfg.dtype) if dist.world() > 1 and value is not None else value
    if cfg.lora_rank and reference.resolve() == init.resolve():
        ref, ref_ctx = pnet, policy.disable_adapter  # through `pnet`: under FSDP only it sees whole weights
    else:
        ref = load_causal_lm(reference, dtype=frozen).to(device).eval().requires_grad_(False)
        ref_ctx = contextlib.nullcontext
    if cfg.lora_rank and value is not None and value_path.resolve() == rm_path.resolve() and not fsdp:
        scorer = RewardScorer(rm_path, device, model=value, context=value.disable_adapter)
    else:  # (under FSDP the value model's base is sharded: the scorer keeps a whole copy, as said above)
        scorer = RewardScorer(rm_path, device, dtype=frozen)
    world, probe = _probe(out, cfg)
    s = Session(cfg=cfg, stage=stage, init=init, tok=tok, prompts=prompts, prompt_ids=prompt_ids, device=device,
                fsdp=fsdp, policy=policy, value=value, pnet=pnet, vnet=vnet, ref=ref, ref_ctx=ref_ctx, scorer=scorer,
                allowed=forward.allowed_tokens(tok, policy.config.vocab_size, device),
                # the engine reads the policy's weights directly: under FSDP2 each sampling runs in `sampling()`
                engine=Engine(forward.unwrap(policy), tok, device, max_batch=cfg.batch_size),
                opt_p=loop.make_optimizer(policy, cfg.lr, 0.0),
                opt_v=loop.make_optimizer(value, cfg.value_lr, 0.0) if value is not None else None,
                kl_ctl=rl.AdaptiveKL(cfg.kl_coef, cfg.kl_target or None, cfg.kl_horizon),
                ptx_rows=_ptx_rows(cfg, out, tok) if cfg.ptx_coef > 0 else None,
                world=world, probe=probe, ckpts=loop.Checkpoints(stage), metrics=None)
    resumed = _resume(s) if cfg.resume else False
    s.metrics = loop.Metrics(stage, resume_step=s.start if resumed else None) if dist.is_main() else None
    if dist.is_main():  # only rank 0 writes
        save_stage_config(out, section(cfg), cfg)
    print(f"{cfg.algo}: round {cfg.round}, policy {init}, reward model {rm_path}, {len(prompts)} prompts, "
          f"{cfg.iterations} iterations × {cfg.batch_size} episodes, β {s.kl_ctl.beta}"
          + (f", LoRA rank {cfg.lora_rank}" if cfg.lora_rank else "")
          + (f", {cfg.rloo_k} answers per prompt" + (", group-normalised" if cfg.group_norm else "") if rloo else ""))
    return s


def _resume(s: Session) -> bool:
    """Continue from the stage's last checkpoint, if any, of the same configuration (the number of processes
    and how they talk may change: see dist.py)."""
    state = s.ckpts.load()
    if state is None:
        return False
    per_call = ("resume", "fsdp", "dist_backend")
    # a field added since the checkpoint was written (algo, rloo_k, …) had its default's behaviour then
    saved = {k: v for k, v in {**asdict(Config()), **state["config"]}.items() if k not in per_call}
    now = {k: v for k, v in asdict(s.cfg).items() if k not in per_call}
    if saved != now:
        diff = next(k for k in now if saved.get(k) != now[k])
        raise InputError(f"--resume on a PPO folder of another configuration ({diff}: {saved.get(diff)!r} there, "
                         f"{now[diff]!r} now)", file=s.stage, field=diff)
    dist.restore(state, s.pnet, s.opt_p, s.policy)
    if s.value is not None:
        dist.restore({"model": state["value"], "optim": state["optim_value"]}, s.vnet, s.opt_v, s.value)
    s.kl_ctl.beta, s.start = state["beta"], state["step"]
    s.norm = state.get("reward_norm")
    s.seen = [tuple(x) for x in state.get("length_seen") or []]
    return True


def rollout(s: Session, it: int) -> Rollout:
    """Draw the iteration's prompts and every epoch's minibatches, and sample one answer to each prompt.
    Under torchrun each rank samples its share, episode p with the generator it has in one process, (seed, p);
    with LoRA the engine runs the merged-on-the-fly policy, adapters active."""
    cfg = s.cfg
    t0 = time.perf_counter()
    rng = random.Random(cfg.seed * 1_000_003 + it)
    if s.rloo:  # rloo_k episodes per prompt, side by side (each row still samples from its own generator)
        batch = [i for i in rng.sample(range(len(s.prompts)), min(cfg.batch_size // cfg.rloo_k, len(s.prompts)))
                 for _ in range(cfg.rloo_k)]
    else:
        batch = rng.sample(range(len(s.prompts)), min(cfg.batch_size, len(s.prompts)))
    mine = dist.part(list(range(len(batch))))
    seed = cfg.seed * 7_919 + it
    with s.sampling(), s.amp():
        outs = s.engine.generate([s.prompt_ids[batch[p]] for p in mine], max_new_tokens=cfg.max_new_tokens,
                                 temperature=cfg.temperature,
                                 seed=seed if dist.world() == 1 else [(seed * 1_000_003 + p) % 2**63 for p in mine])
    t_gen = time.perf_counter() - t0
    responses, texts, sampled_lp = dist.gather_rows(mine, [o.ids for o in outs], [o.text.strip() for o in outs],
                                                 [o.logprobs for o in outs])
    ended = torch.tensor([bool(r) and r[-1] in s.tok.stop_ids for r in responses], dtype=torch.float32)
    # Minibatches of every epoch, drawn now: the first epoch's minibatches are also how the old
    # log-probs, reference log-probs and values are computed, so the first update sees exactly the
    # inputs (same rows, same shapes, same autocast) that produced the old log-probs: ratio 1.
    epochs = []
    for _ in range(cfg.ppo_epochs):
        order = list(range(len(batch)))
        rng.shuffle(order)
        if cfg.group_by_length:  # a stable sort: rows of equal length stay in the shuffled order
            order.sort(key=lambda p: len(s.prompt_ids[batch[p]]))
        minibatches = [torch.tensor(order[i:i + cfg.minibatch_size], device=s.device)
                       for i in range(0, len(order), cfg.minibatch_size)]
        if cfg.group_by_length:
            rng.shuffle(minibatches)
        epochs.append(minibatches)
    return Rollout(batch=batch, responses=responses, texts=texts, sampled_lp=sampled_lp, ended=ended,
                   epochs=epochs, t_gen=t_gen)


def _columns(ro: Rollout, mb, whole=None):
    """The rows `mb` of the batch's layout without the columns that are padding in every one of them:
    (ids, attention, positions, P) of the trimmed layout. The batch is padded to its longest prompt and
    answer, a minibatch's rows often to less (SmolLM2 on HH prompts: ~8% fewer positions); positions come
    from the attention's running count, so the rest is unchanged, and the same rows give the same trim
    in the scoring pass and in the first update (ratio 1). The trim is that of the `whole` minibatch (all
    ranks' rows; `mb` by default): every rank runs the same shapes, so 1 process and 2 give the same sums."""
    c0, c1 = _span(ro, mb, whole)
    return ro.ids[mb][:, c0:c1], ro.attn[mb][:, c0:c1], ro.pos[mb][:, c0:c1], ro.P - c0


def _span(ro: Rollout, mb, whole=None) -> tuple[int, int]:
    """The columns `_columns` keeps: from the first used by any row of `whole` (`mb`) to the last."""
    used = ro.attn[mb if whole is None else whole].any(0).nonzero().flatten()
    return min(int(used[0]), ro.P - 1), max(int(used[-1]) + 1, ro.P + 1)


def _full_width(x: torch.Tensor, R: int) -> torch.Tensor:
    """(rows, r) → (rows, R): the response columns trimmed by `_columns` put back as zeros (masked)."""
    return torch.nn.functional.pad(x, (0, R - x.shape[1]))


def _logprobs(s: Session, model, ro: Rollout, mb, with_entropy=False, whole=None):
    """log π(response tokens) of the minibatch rows `mb`, over the engine's vocabulary and at the rollout's τ
    (with their entropies: `with_entropy`)."""
    ids, attn, pos, P = _columns(ro, mb, whole)
    out = action_logprobs(model, ids, attn, pos, P, with_entropy, s.allowed, s.cfg.temperature)
    R = ro.ids.shape[1] - ro.P
    return tuple(_full_width(x, R) for x in out) if with_entropy else _full_width(out, R)


def _value_top(s: Session) -> int:
    """With --value-lora-layers N the value model's bottom blocks never change, so their output for an
    episode is the same in the scoring pass and in every update: `score` runs them once per episode
    (`ro.vfeat`) and `_values` only the top N blocks on it — the same values and gradients as the whole
    pass (tests/test_ppo.py), about (L − N)/L of the value update's forward saved (SmolLM2: 26 of 30
    blocks). Not under FSDP (the blocks are sharded, and run through its wrapper only whole): 0 there."""
    return 0 if s.fsdp or s.value is None else s.cfg.value_lora_layers


def _values(s: Session, ro: Rollout, mb, whole=None) -> torch.Tensor:
    """V(state t) of the minibatch rows `mb`, on the same trimmed layout as their log-probs (from the
    cached bottom features where there are some: `_value_top`)."""
    ids, attn, pos, P = _columns(ro, mb, whole)
    k = _value_top(s)
    if k and ro.vfeat is not None:
        c0, c1 = _span(ro, mb, whole)
        v = top_values(s.vnet, ro.vfeat[mb][:, c0:c1], attn, pos, k)[:, P - 1:-1]
    else:
        v = state_values(s.vnet, ids, attn, pos, P)
    return _full_width(v, ro.ids.shape[1] - ro.P)


@torch.no_grad()
def score(s: Session, ro: Rollout, it: int, bar) -> None:
    """The reward model's score, the old and reference log-probs and values, then the per-token rewards
    (−β·KL_t, the score at the last token) and the advantages: PPO's GAE, or RLOO's leave-one-out."""
    cfg, device = s.cfg, s.device
    mine = dist.part(list(range(len(ro.batch))))
    # the reward model reads its score where it was trained to: see ChatTokenizer.scored_ids
    sc = torch.zeros(len(ro.batch), device=device)
    with timed(ro, "reward_model", device):
        sc[mine] = torch.tensor(s.scorer.score_ids([s.tok.scored_ids(s.prompt_ids[ro.batch[p]], ro.responses[p])
                                                    for p in mine], [len(s.prompt_ids[ro.batch[p]]) for p in mine]),
                                device=device)
    sc = dist.all_sum(sc)  # every rank: the scores of the whole batch
    ro.score_raw = sc.clone()
    if cfg.length_control:
        lengths = torch.tensor([float(len(r)) for r in ro.responses], device=device)
        s.seen += list(zip(lengths.tolist(), sc.tolist()))
        seen = torch.tensor(s.seen, device=device)
        sc, ro.length_slope = rl.length_controlled(sc, lengths, seen[:, 1], seen[:, 0])
    if cfg.reward_norm:
        if s.norm is None:
            s.norm = (sc.mean().item(), max(sc.std().item(), 1e-6) if len(sc) > 1 else 1.0)
        sc = (sc - s.norm[0]) / s.norm[1]
    sc = sc + cfg.missing_end_penalty * (1 - ro.ended.to(device))
    ro.ids, ro.attn, ro.pos, mask, ro.P = layout([s.prompt_ids[i] for i in ro.batch], ro.responses, s.tok.pad_id, device)
    old_logp, ref_logp, old_values = (torch.zeros(mask.shape, device=device) for _ in range(3))
    s.policy.eval()
    if s.value is not None:
        s.value.eval()
    with s.amp():
        for mb_all in ro.epochs[0]:
            mb = dist.part(mb_all)  # this rank's rows: the ones it will take of the same minibatch in epoch 1
            # a rank left without a row runs one all the same and keeps nothing: every rank runs
            # the same passes (under FSDP each gathers the weights with the others)
            run_mb, keep = (mb, slice(None)) if len(mb) else (mb_all[:1], slice(0, 0))
            if cfg.old_logprobs == "recompute":
                with timed(ro, "policy_logprobs", device):
                    old_logp[mb] = _logprobs(s, s.pnet, ro, run_mb, whole=mb_all)[keep]
            with s.ref_ctx(), timed(ro, "reference_logprobs", device):
                ref_logp[mb] = _logprobs(s, s.ref, ro, run_mb, whole=mb_all)[keep]
            if s.value is not None:
                with timed(ro, "values", device):
                    if _value_top(s):  # the bottom blocks once per episode, then the top ones
                        ids, attn, pos, _ = _columns(ro, run_mb, mb_all)
                        c0, c1 = _span(ro, run_mb, mb_all)
                        feats = bottom_features(s.vnet, ids, attn, pos, _value_top(s))
                        if ro.vfeat is None:
                            ro.vfeat = torch.zeros(*mask.shape[:1], ro.ids.shape[1], feats.shape[-1], dtype=feats.dtype,
                                                   device=device)
                        ro.vfeat[mb, c0:c1] = feats[keep]
                    old_values[mb] = _values(s, ro, run_mb, whole=mb_all)[keep]
    old_logp, ref_logp, old_values = (dist.all_sum(t) for t in (old_logp, ref_logp, old_values))
    if ro.vfeat is not None:
        ro.vfeat = dist.all_sum(ro.vfeat)  # every rank: every episode's (a later epoch's rows are other ranks')
    s.policy.train()
    if s.value is not None:
        s.value.train()
    # the sampler's log-probs against the trainer's, on the same tokens: equal up to rounding in fp32;
    # a gap means the rollout came from another distribution than the one PPO's ratio assumes
    engine_lp = torch.zeros_like(old_logp)
    for b, lps in enumerate(ro.sampled_lp):
        engine_lp[b, :len(lps)] = torch.tensor(lps[:engine_lp.shape[1]], dtype=engine_lp.dtype)
    if cfg.old_logprobs == "sampler":  # a rank's rows only where it sampled them: the engine's, for every row
        old_logp = engine_lp * mask
    bad, what = rl.nonfinite_rows(mask, **{"old log-probs": old_logp, "reference log-probs": ref_logp,
                                           "values": old_values, "scores": sc[:, None].expand_as(mask)})
    if bad.any():  # left out of this update, said aloud (the same on every rank: the tensors are global)
        mask = mask * ~bad[:, None]
        old_logp, ref_logp, old_values, sc = (torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)
                                              for t in (old_logp, ref_logp, old_values, sc))
        bar.write(f"{cfg.algo}: iteration {it + 1}: {', '.join(what)} not finite in {int(bad.sum())} of "
                  f"{len(ro.batch)} episodes, left out of this update" + (
                      " (bf16 rounding: --dtype float32 avoids it)" if precision.amp_dtype(device, cfg.dtype) else ""))
    ro.sampler_gap = rl.masked_mean((engine_lp - old_logp).abs(), mask).item()
    ro.nonfinite = int(bad.sum())
    ro.kl = rl.kl_per_token(old_logp, ref_logp) * mask
    rewards = rl.token_rewards(sc, ro.kl, mask, s.kl_ctl.beta)
    if s.rloo:  # the sequence reward score − β·Σ KL_t, its leave-one-out advantage at every token
        ro.adv, ro.returns = rl.rloo_advantages(rewards.sum(1), cfg.rloo_k, cfg.group_norm)[:, None] * mask, None
    else:
        if cfg.whiten_rewards:
            rewards = rl.whiten(rewards, mask, shift_mean=False)
        ro.adv, ro.returns = rl.gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            ro.adv = rl.whiten(ro.adv, mask)
    ro.score, ro.mask, ro.old_logp, ro.ref_logp, ro.old_values = sc, mask, old_logp, ref_logp, old_values


def update(s: Session, ro: Rollout, it: int) -> tuple[dict, int]:
    """PPO epochs over the rollout's minibatches: the clipped policy loss (+ PPO-ptx's LM loss), then the
    clipped value loss. Returns the minibatch statistics and how many optimizer steps were skipped."""
    cfg = s.cfg
    stats = {"pg_loss": [], "vf_loss": [], "clip_frac": [], "approx_kl": [], "entropy": [], "ptx_loss": [],
             "first_ratio_error": []}
    skipped = 0
    for e, minibatches in enumerate(ro.epochs):
        for k, mb_all in enumerate(minibatches):
            # this rank's rows of the minibatch; each loss below is a token mean over its rows, weighted
            # by their share of the minibatch's tokens (×world: DDP averages the ranks' gradients). A
            # rank left without a row runs one with weight 0: every rank runs the same passes.
            mb = dist.part(mb_all)
            share = float(ro.mask[mb].sum() / ro.mask[mb_all].sum()) if len(mb) else 0.0
            mb = mb if len(mb) else mb_all[:1]
            m = ro.mask[mb]
            with timed(ro, "policy_update", s.device):
                with s.amp():
                    logp, ent = _logprobs(s, s.pnet, ro, mb, with_entropy=True, whole=mb_all)
                    if not stats["first_ratio_error"]:  # the precision/temperature contract, checked every iteration
                        stats["first_ratio_error"].append(
                            dist.all_max(((logp.detach() - ro.old_logp[mb]).exp() - 1).abs().mul(m).max()))
                    pg, st = rl.policy_loss(logp, ro.old_logp[mb], ro.adv[mb], m, cfg.clip)
                    loss = pg * share
                    if s.ptx_rows is not None:
                        ptx, ptx_share = _ptx_loss(s, it * 997 + e * 101 + k)
                        loss = loss + cfg.ptx_coef * ptx * ptx_share
                        stats["ptx_loss"].append(dist.all_sum(torch.tensor(ptx.item() * ptx_share, dtype=torch.float64)).item())
                s.opt_p.zero_grad(set_to_none=True)
                (loss * dist.world()).backward()
                skipped += _step_if_finite(s.opt_p)
            if s.value is not None:
                with timed(ro, "value_update", s.device):
                    with s.amp():
                        v = _values(s, ro, mb, whole=mb_all)
                        vf = rl.value_loss(v, ro.old_values[mb], ro.returns[mb], m, cfg.value_clip)
                    s.opt_v.zero_grad(set_to_none=True)
                    (vf * share * dist.world()).backward()
                    skipped += _step_if_finite(s.opt_v)
            # the minibatch's statistics: the ranks' shares added up (one all-reduce)
            got = dist.all_sum(torch.tensor([pg.item(), vf.item() if s.value is not None else 0.0, st["clip_frac"],
                                          st["approx_kl"], rl.masked_mean(ent.detach(), m).item()],
                                         dtype=torch.float64) * share)
            for name, x in zip(("pg_loss", "vf_loss", "clip_frac", "approx_kl", "entropy"), got.tolist()):
                if name != "vf_loss" or s.value is not None:  # RLOO has no value model
                    stats[name].append(x)
    return stats, skipped


def _ptx_loss(s: Session, seed: int) -> tuple[torch.Tensor, float]:
    """PPO-ptx: the LM loss on a minibatch of pretraining rows (this rank's share of them, and that share)."""
    rows = s.ptx_rows[torch.randint(len(s.ptx_rows), (s.cfg.minibatch_size,),
                                    generator=torch.Generator().manual_seed(seed))]
    part = dist.part(rows)
    share = len(part) / len(rows)
    part = (part if len(part) else rows[:1]).to(s.device)
    hidden, head = forward.causal_hidden(s.pnet, part[:, :-1], torch.ones_like(part[:, :-1]))
    return -forward.token_logprobs(hidden, head, part[:, 1:])[0].mean(), share


def record(s: Session, ro: Rollout, stats: dict, skipped: int, it: int, dt: float) -> dict:
    """Adapt β to the batch's KL, and log the iteration (with the probe's gold score every probe_every)."""
    cfg = s.cfg
    seq_kl = ro.kl.sum(1).mean().item()
    beta_used = s.kl_ctl.beta
    s.kl_ctl.update(seq_kl, len(ro.batch))
    world = s.world
    rec = {"step": it + 1, "rm_score": ro.score_raw.mean().item(), "reward": ro.score.mean().item(),
           "kl_sampled": seq_kl, "beta": beta_used, "ended_share": ro.ended.mean().item(),
           "gold_rollout": sum(world.gold_score(s.prompts[i], t) for i, t in zip(ro.batch, ro.texts)) / len(ro.texts)
           if world and all("gold" in s.prompts[i] for i in ro.batch) else None,
           "response_length": ro.mask.sum(1).float().mean().item(),
           "prompt_length": sum(len(s.prompt_ids[i]) for i in ro.batch) / len(ro.batch),
           "padded_tokens": ro.ids.numel(),  # what each scoring pass runs: prompts left-padded, answers right-padded
           "explained_variance": rl.explained_variance(ro.old_values, ro.returns, ro.mask) if s.value is not None else None,
           "first_ratio_error": stats.pop("first_ratio_error")[0],
           "episodes_per_s": len(ro.batch) / dt, "tokens_per_s": float(ro.mask.sum()) / dt,
           "generation_share": ro.t_gen / dt, "peak_memory_gb": loop.peak_memory_gb(s.device)}
    rec |= {k: sum(v) / len(v) for k, v in stats.items() if v}
    rec |= {"nonfinite_episodes": ro.nonfinite, "skipped_steps": skipped, "sampler_gap": ro.sampler_gap}
    if ro.length_slope is not None:
        rec["length_slope"] = ro.length_slope
    # where the time went: sampling, the scoring passes, the updates, and the rest (layout, advantages, β)
    phases = {"generate": ro.t_gen, **{k: ro.seconds.get(k, 0.0) for k in SCORED_PHASES}}
    rec |= {f"seconds_{k}": v for k, v in phases.items()} | {"seconds_other": dt - sum(phases.values())}
    if s.probe and ((it + 1) % cfg.probe_every == 0 or it + 1 == cfg.iterations):
        with s.sampling():  # every rank gathers the weights (FSDP); rank 0 alone samples (the others wait)
            if dist.is_main():
                rec |= _probe_scores(s)
    if s.metrics:
        s.metrics.log(**rec)
    return rec


def checkpoint(s: Session, step: int) -> None:
    """Full state dicts in the one-process layout, gathered to rank 0 (a collective under FSDP)."""
    pstate = dist.capture(s.pnet, s.opt_p, s.policy)
    vstate = dist.capture(s.vnet, s.opt_v, s.value) if s.value is not None else {}
    if dist.is_main():
        s.ckpts.save(step, config=asdict(s.cfg), beta=s.kl_ctl.beta, reward_norm=s.norm, length_seen=s.seen,
                     **({"value": vstate["model"], "optim_value": vstate["optim"]} if vstate else {}), **pstate)


def finish(s: Session) -> Path:
    """Save the (merged) policy, say how the round ended, and raise the reward-hacking alarm if it fired."""
    from alignloop.model import save_model
    cfg = s.cfg
    final = dist.gathered(s.pnet, s.policy)  # rank 0: the whole policy (a fresh copy under FSDP); None elsewhere
    if not dist.is_main():
        return s.stage
    save_model(loop.merged(final), s.tok, s.stage)
    rows = loop.read_jsonl_tolerant(s.metrics.path)
    last = rows[-1]
    print(f"{cfg.algo}: round {cfg.round} done: RM score {last['rm_score']:+.3f}, sampled KL to SFT {last['kl_sampled']:.2f} nats"
          + (f", probe gold {last['gold_probe']:.3f}" if "gold_probe" in last else "")
          + f", peak memory {loop.peak_memory_gb(s.device):.2f} GB → {s.stage}")
    from alignloop.alarm import PREFIX, hacking_alarm
    alarm = hacking_alarm(rows)  # the whole round's probe curve, resumed parts included
    if alarm:
        print(f"{PREFIX}{cfg.algo} round {cfg.round}: {alarm}")
    return s.stage


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
    """Under FSDP2 the engine samples inside `dist.whole`, reading the gathered weights directly; its generic path
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
def _probe_scores(s: Session) -> dict:
    probe, cfg = s.probe, s.cfg
    outs = s.engine.generate([s.tok.render_prompt(p["messages"]) for p in probe], max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, seed=12345)
    texts = [o.text.strip() for o in outs]
    rm = s.scorer.score_texts([p["messages"] for p in probe], texts)
    return {"gold_probe": sum(s.world.gold_score(p, t) for p, t in zip(probe, texts)) / len(probe),
            "rm_probe": sum(rm) / len(rm), "distinct_2_probe": distinct_n(texts, 2)}
