"""The main job (`alignloop run`): the whole recipe into one run directory, resumable.

world → tokenizer → pretrain → (eval base) → SFT → (eval sft) → rounds of
sample → rank → reward model → PPO → (eval) → report.

Each step is skipped when its output is complete, and a training stage interrupted half-way resumes
from its last checkpoint, so running the same command again continues where it stopped. Every stage's
config comes from the same preset and the same TOML file (one `[section]` per stage). `--seed N` adds N
to every stage's seed (world, pretraining, SFT, sampling, ranking, reward model, PPO, evaluation), so
seed 0 is the stages' own defaults and each N is one independent draw of the whole recipe
(experiments/seeds.py runs several).

Under torchrun every rank walks the same steps. The training stages, evaluation and sampling split their
work over the ranks (alignloop/dist.py); the steps that are cheap or write one file from everything
(world, tokenizer, fact recall, ranking, the reward model's eval.json entry, rescoring, the report) run on
rank 0 alone while the others wait (`dist.on_main`, which also gives every rank rank 0's InputError). After
every step all ranks meet (`dist.barrier`), so each decides on the next from the same files.
"""
from __future__ import annotations

import argparse
import time
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from alignloop import config
from alignloop import dist
from alignloop import evaljson
from alignloop import report
from alignloop.config import option
from alignloop.errors import InputError

SECTION = "run"


@dataclass
class Config:
    rounds: int = option(2, "rounds of sample → rank → reward → PPO after SFT", min=0, max=100)
    labelers: str = option("simulated", "who ranks: the world's simulated labelers, or people through `alignloop label`",
                           choices=("simulated", "human"))
    until: str = option("", "stop after this step (world, tokenizer, pretrain, sft, reward, ppo); empty: the whole recipe",
                        choices=("", "world", "tokenizer", "pretrain", "sft", "reward", "ppo"))
    device: str = option("auto", "auto, cpu, cuda or cuda:N (passed to every stage)")
    seed: int = option(0, "added to every stage's seed: the world, initialisation, data order, sampling, labelers", min=0)


PRESETS = {"micro": {}, "tiny": {}, "small": {}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--loop-only", action="store_true", help=argparse.SUPPRESS)


# Fields that differ between calls of one run (round 1 vs 2, eval of base vs sft): not compared on resume.
PER_CALL = {"resume", "round", "stage", "model", "init"}


class Runner:
    """Resolves stage configs from the run's preset and TOML, and runs each step once."""

    def __init__(self, out: Path, preset: str, toml: str | None, device: str, seed: int = 0):
        self.out, self.preset, self.toml, self.device, self.seed = out, preset, toml, device, seed
        self.t0 = time.perf_counter()

    def cfg(self, module, **overrides):
        cfg = config.resolve(module.Config, module.SECTION, preset=self.preset, presets=module.PRESETS, toml=self.toml)
        names = {f.name for f in fields(cfg)}
        if "device" in names:
            cfg.device = self.device
        if "seed" in names:  # one run seed feeds every stage's own
            cfg.seed += self.seed
        for k, v in overrides.items():
            setattr(cfg, k, v)
        self._check_same(module.SECTION, cfg)
        return cfg

    def _check_same(self, section: str, cfg) -> None:
        """Resuming a run with another configuration would mix two experiments in one folder."""
        path = self.out / "config.toml"
        if not path.exists():
            return
        saved = tomllib.loads(path.read_text(encoding="utf-8")).get(section)
        if not saved:
            return
        for f in fields(cfg):
            if f.name in PER_CALL or f.name not in saved:
                continue
            now = getattr(cfg, f.name)
            if now is not None and saved[f.name] != now and not (isinstance(now, float) and abs(saved[f.name] - now) < 1e-12):
                raise InputError(f"the run directory was made with another configuration: [{section}] {f.name} = "
                                 f"{saved[f.name]!r} there, {now!r} now; use a new --out or the same settings",
                                 file=path, field=f"{section}.{f.name}")

    def step(self, name: str, done: bool, fn, main_only: bool = False) -> None:
        """Run `fn` unless `done`; `main_only`: on rank 0 alone under torchrun (its files are then everyone's)."""
        if done:
            print(f"[{self.clock()}] {name}: already done, skipped")
            return
        print(f"[{self.clock()}] {name} …", flush=True)
        dist.on_main(fn) if main_only else fn()
        dist.barrier()  # rank 0 has written the step's files before any rank checks whether the next is done

    def clock(self) -> str:
        s = int(time.perf_counter() - self.t0)
        return f"{s // 60:02d}:{s % 60:02d}"


def run(cfg: Config, out: Path, args) -> None:
    from alignloop import evaluate
    from alignloop import tokenizer
    from alignloop import world
    from alignloop.rundir import save_stage_config
    from alignloop.train import pretrain
    from alignloop.train import sft

    loop_only = getattr(args, "loop_only", False)
    if loop_only:  # `alignloop loop`: rounds only, never a stage before them
        _check_loop(out, cfg)
    preset = args.preset or "tiny"
    # The [run] section itself may change between calls (more rounds, people instead of simulated
    # labelers); the stages' own settings may not (Runner.cfg checks each).
    r = Runner(out, preset, args.config, cfg.device, cfg.seed)
    from alignloop import rank
    from alignloop import sample
    from alignloop.train import ppo
    from alignloop.train import reward
    for module in (world, tokenizer, pretrain, sft, evaluate, sample, rank, reward, ppo):  # every stage's settings checked before any work
        r.cfg(module)
    if r.cfg(ppo).algo != "ppo" or r.cfg(evaluate).best_of != 1:  # the recipe's rounds are PPO's, its evaluations plain
        raise InputError("`alignloop run` trains PPO in its rounds and evaluates each policy once: run "
                         "`alignloop ppo --algo rloo` or `alignloop eval --best-of N` as commands of their own",
                         field="algo" if r.cfg(ppo).algo != "ppo" else "best_of")
    out.mkdir(parents=True, exist_ok=True)
    dist.on_main(lambda: save_stage_config(out, SECTION, cfg))
    stop = cfg.until
    if not loop_only and not _before_rounds(r, out, cfg, stop):
        return
    for i in range(1, cfg.rounds + 1):
        if not _round(r, out, i, cfg, stop):
            return
    if cfg.rounds:
        from alignloop import headroom
        r.step("headroom per category (SFT's best of K on dev, each reward model, each round's gain)",
               headroom.covers(out, cfg.rounds),
               lambda: headroom.run(out, r.cfg(evaluate), [r.cfg(reward, round=i) for i in range(1, cfg.rounds + 1)]),
               main_only=True)
        r.step("reward-model scores of every stage", False, lambda: _rescore(out, cfg.device), main_only=True)
    r.step("report", False, lambda: report.write_report(out), main_only=True)
    _finish(r, out)


def _check_loop(out: Path, cfg: Config) -> None:
    """What rounds need, named before any work: a policy to start from, and the world's prompts and
    labelers (a run built with `sft --init` has none; `alignloop loop` does not make one)."""
    if not (out / "sft" / "config.json").exists():
        raise InputError("no SFT model in this run: `alignloop loop` runs rounds only; build the run first "
                         "(`alignloop run --until sft`, or `alignloop sft`)", file=out / "sft")
    if not (out / "world" / "world.json").exists():
        raise InputError("this run has no world (prompts, simulated labelers and gold scores for the rounds); "
                         "`alignloop loop` makes none: run `alignloop world --out RUN` first, or the stages "
                         "one by one with --prompts / --data", file=out / "world")


def _before_rounds(r: Runner, out: Path, cfg: Config, stop: str) -> bool:
    """world → tokenizer → pretrain → eval base → SFT → eval sft; False when `stop` says to end there."""
    from alignloop import evaluate
    from alignloop import tokenizer
    from alignloop import world
    from alignloop.train import pretrain
    from alignloop.train import sft
    r.step("world", (out / "world" / "world.json").exists(), lambda: world.run(r.cfg(world), out), main_only=True)
    if stop == "world":
        return False
    r.step("tokenizer", (out / "tokenizer" / "tokenizer.json").exists(), lambda: tokenizer.run(r.cfg(tokenizer), out),
           main_only=True)
    if stop == "tokenizer":
        return False
    r.step("pretrain", (out / "pretrain" / "config.json").exists(), lambda: pretrain.run(r.cfg(pretrain, resume=True), out))
    evals = evaljson.read(out)
    key = evaljson.key_of(r.cfg(evaluate).split)  # eval.json's "stages" (test), or "stages_dev" for a run tuned on dev
    r.step("fact recall", "fact_recall" in evals, lambda: _fact_recall(out, cfg.device), main_only=True)
    r.step("eval base", "base" in evals.get(key, {}), lambda: evaluate.run(r.cfg(evaluate, stage="base"), out))
    if stop == "pretrain":
        _finish(r, out)
        return False
    r.step("sft", (out / "sft" / "config.json").exists(), lambda: sft.run(r.cfg(sft, resume=True), out))
    r.step("eval sft", "sft" in evaljson.read(out).get(key, {}), lambda: evaluate.run(r.cfg(evaluate, stage="sft"), out))
    if stop == "sft":
        _finish(r, out)
        return False
    return True


def _round(r: Runner, out: Path, i: int, cfg: Config, stop: str) -> bool:
    """Round i: sample from the newest policy → rank → reward model on all rankings so far → PPO."""
    from alignloop import evaluate
    from alignloop import rank
    from alignloop import sample
    from alignloop.train import ppo
    from alignloop.train import reward
    folder = out / f"round-{i}"
    r.step(f"round {i}: sample", (folder / "samples.jsonl").exists(), lambda: sample.run(r.cfg(sample, round=i), out))
    if cfg.labelers == "human":
        if not (folder / "rankings.jsonl").exists() and not any(folder.glob("human-rankings-*.jsonl")):
            print(f"round {i} waits for rankings from people:\n"
                  f"  alignloop label {out}            # serve the labeling app; import {folder / 'samples.jsonl'}\n"
                  f"  alignloop label export {out} --round {i}\n"
                  f"then run this command again to continue.")
            return False
    else:
        r.step(f"round {i}: rank", (folder / "rankings.jsonl").exists(), lambda: rank.run(r.cfg(rank, round=i), out),
               main_only=True)
    r.step(f"round {i}: reward model", (folder / "reward" / "config.json").exists(),
           lambda: _reward(r, out, i, reward))
    if stop == "reward":
        return False
    r.step(f"round {i}: ppo", (folder / "ppo" / "config.json").exists(),
           lambda: ppo.run(r.cfg(ppo, round=i, resume=True), out))
    name = f"round-{i}/ppo"
    r.step(f"eval {name}", name in evaljson.read(out).get(evaljson.key_of(r.cfg(evaluate).split), {}),
           lambda: evaluate.run(r.cfg(evaluate, stage=name, model=str(folder / "ppo"), reward_model=str(folder / "reward")), out))
    return stop != "ppo"


def _reward(r: Runner, out: Path, i: int, reward) -> None:
    stage = reward.run(r.cfg(reward, round=i), out)
    # rank 0 wrote the stage's eval.json (the other ranks may return before it has)
    dist.on_main(lambda: evaljson.update(out, f"round-{i}", evaljson.read_stage(stage), key="reward_model"))


def _rescore(out: Path, device: str) -> None:
    """Score every stage's test answers with the final reward model, so rm_score compares stages."""
    from alignloop.evaluate import newest_reward_model
    from alignloop.model import pick_device
    from alignloop.scoring import RewardScorer
    from alignloop.world import load_world
    data = evaljson.read(out)
    rm = newest_reward_model(out)
    scorer = RewardScorer(rm, pick_device(device))
    world = load_world(out)
    by_id = {p["id"]: p for split in ("test", "dev") for p in world.prompts(split)}
    for stage, m in data.get("stages", {}).items():
        ex = [e for e in m.get("examples", []) if e["id"] in by_id]
        if ex:
            scores = scorer.score_texts([by_id[e["id"]]["messages"] for e in ex], [e["answer"] for e in ex])
            m["rm_score"] = sum(scores) / len(scores)
            m["rm_model"] = str(rm)
            evaljson.update(out, stage, m)


def _finish(r, out: Path) -> None:
    print(f"[{r.clock()}] done: {out}")
    _print_table(out)


def _fact_recall(out: Path, device: str) -> None:
    from alignloop.evaluate import fact_recall
    from alignloop.model import load_causal_lm, pick_device
    from alignloop.tokenizer import ChatTokenizer
    from alignloop.world import load_world
    dev = pick_device(device)
    model = load_causal_lm(out / "pretrain").to(dev)
    tok = ChatTokenizer.load(out / "pretrain")
    probes = load_world(out).fact_probes()
    recall = fact_recall(model, tok, probes, dev)
    evaljson.put(out, "fact_recall", {"base": recall, "n_facts": len(probes)})
    print(f"fact recall of the base model: {recall:.1%} of {len(probes)} facts "
          f"(greedy completion of \"The capital of X is\" …)")


def _print_table(out: Path) -> None:
    from alignloop.evaluate import format_categories, format_row
    from alignloop.stats import gains_over_sft
    data = evaljson.read(out)
    if "fact_recall" in data:
        print(f"fact recall (base): {data['fact_recall']['base']:.1%}")
    for key, split in (("stages", "test"), ("stages_dev", "dev")):
        stages = data.get(key, {})
        if stages and key != "stages":
            print(f"{split} prompts (tuning; not what is reported):")
        for stage, m in stages.items():
            print(format_row(stage, m))
            print(format_categories(m))
        for stage, (gain, half, n) in gains_over_sft(stages):
            print(f"gold gain of {stage} over sft on the same {n} {split} prompts (paired): {gain:+.3f} "
                  f"95% [{gain - half:+.3f}, {gain + half:+.3f}]")
    for rnd, rm in data.get("reward_model", {}).items():
        def f(k):
            return "-" if rm.get(k) is None else f"{rm[k]:.3f}"
        print(f"reward model {rnd}: pair accuracy {f('pair_accuracy')} on {rm.get('n_prompts', '?')} held-out prompts, "
              f"labeler agreement {f('labeler_agreement')}, accuracy against the gold order {f('gold_accuracy')} "
              f"(labelers {f('labeler_gold_accuracy')})")
    _print_headroom(out)
    _print_alarms(out)
    if (out / "report.html").exists():
        print(f"report: {(out / 'report.html').resolve()}")


def _print_headroom(out: Path) -> None:
    """headroom.json as a compact table (alignloop/headroom.py says how to read it)."""
    import json
    from alignloop import headroom
    path = out / "headroom.json"
    if path.exists():
        h = json.loads(path.read_text(encoding="utf-8"))
        print(f"where the gain is lost, per category ({headroom.splits(h)}):")
        print("\n".join("  " + line for line in headroom.format_lines(h)))


def _print_alarms(out: Path) -> None:
    """The reward-hacking alarm of every PPO round that fired, repeated where the run's reader looks last."""
    from alignloop.alarm import PREFIX, run_alarms
    for stage, alarm in run_alarms(out):
        if alarm:
            print(f"{PREFIX}{stage}: {alarm}")
