"""Comparisons: the rankings and pairs that the reward model and DPO learn from, read and checked.

A ranking {prompt, completions, ranking} of K completions gives the C(K,2) (better, worse) pairs of one
prompt (tied completions none between them, an "all bad" ranking none at all); a pair {chosen, rejected}
is a group of K = 2, and Anthropic HH-RLHF's strings ("\\n\\nHuman: … \\n\\nAssistant: …", no prompt field)
are split into the shared conversation and the two last assistant turns. Also here: which files of a run a
round learns from (`default_data`, by source), the labelers' agreement and the filter on it, and the
held-out split by prompt. Torch-free.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from alignloop.errors import InputError
from alignloop.io import read_records
from alignloop.rundir import by_version
from alignloop.tokenizer import validate_messages


@dataclass
class Group:
    """One prompt, its K completions, and the comparisons among them as (better, worse) index pairs."""
    prompt: list[dict]
    completions: list[str]
    pairs: list[tuple[int, int]]
    labeler: str = ""
    split: str = ""
    source: str = ""
    ids: list[list[int]] = field(default_factory=list)
    origin: str = ""  # the record's own `source` (simulated, label, chat, arena), "" when it names none
    prompt_id: str = ""
    feats: list = field(default_factory=list)  # the frozen blocks' output per completion (train/trunk_cache.py)
    start: int = 0  # index of the completions' first token in `ids` (where a likelihood-gated reward reads from)


_HH = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh(text: str) -> list[dict]:
    """Anthropic HH-RLHF's "\\n\\nHuman: … \\n\\nAssistant: …" → messages."""
    parts = _HH.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError("not an HH-RLHF dialogue")
    return [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
            for who, body in zip(parts[1::2], parts[2::2])]


def _kind_of(rec: dict) -> str:
    if "ranking" in rec and "completions" in rec:
        return "rankings"
    if "chosen" in rec and "rejected" in rec:
        return "pairs"
    if "completions" in rec:
        return "samples (completions without a ranking: rank them first)"
    if "messages" in rec:
        return "demonstrations or prompts (messages)"
    if "prompt" in rec and "completion" in rec:
        return "demonstrations (prompt/completion)"
    if "prompt" in rec:
        return "prompts"
    if "text" in rec:
        return "plain text"
    return "unknown"


def read_comparisons(path: Path, skip_invalid: bool = False) -> list[Group]:
    """Every ranking or pair of a file. A malformed one stops with file, line and field, unless
    `skip_invalid`: then it is left out and counted (real HH-RLHF files hold a few: 6 of the first 1,800
    of harmless-base have an empty last assistant turn or a turn marker without its newlines)."""
    records = read_records(path)
    kinds = {_kind_of(r) for _, r in records[:50]}
    if not kinds & {"rankings", "pairs"}:
        raise InputError(f"this looks like a {sorted(kinds)[0]} file; the reward model needs rankings "
                         f"({{prompt, completions, ranking}}) or pairs ({{chosen, rejected}})", file=path)
    groups, bad = [], []
    for line, rec in records:
        try:
            groups.append(_group(rec, path, line))
        except InputError as e:
            if not skip_invalid:
                raise
            bad.append(e)
    if bad:
        print(f"reward: {len(bad)} of {len(records)} comparisons in {path} left out as invalid (first: {bad[0]})")
    return groups


def _prompt(rec, path, line) -> list[dict]:
    p = rec.get("prompt")
    if p is None:
        return []
    msgs = p if isinstance(p, list) else [{"role": "user", "content": p}]
    return validate_messages(msgs, path, line)


def _group(rec: dict, path: Path, line: int) -> Group:
    kind = _kind_of(rec)
    if kind == "rankings":
        comps, ranking = rec["completions"], rec["ranking"]
        if not isinstance(comps, list) or not all(isinstance(c, str) for c in comps):
            raise InputError("expected a list of strings", file=path, line=line, field="completions")
        K = len(comps)
        if K < 2:
            raise InputError(f"K = {K}: a ranking needs 2 to 9 completions", file=path, line=line, field="completions")
        if K > 9:
            print(f"reward: warning: {path}:{line}: K = {K} is above the 4–9 of InstructGPT")
        for i, c in enumerate(comps):
            if not c.strip():
                raise InputError("empty completion", file=path, line=line, field=f"completions[{i}]")
        if len(set(comps)) < K:
            raise InputError("duplicated completions", file=path, line=line, field="completions")
        if not isinstance(ranking, list) or sorted(ranking) != list(range(K)):
            raise InputError(f"not a permutation of the completions' indices 0..{K - 1}", file=path, line=line,
                             field="ranking")
        tied = _ties(rec.get("ties"), K, path, line)
        pairs = [] if rec.get("all_bad") else [
            (ranking[a], ranking[b]) for a in range(K) for b in range(a + 1, K)
            if not (ranking[a] in tied and tied.get(ranking[b]) == tied[ranking[a]])]
        return Group(_prompt(rec, path, line), comps, pairs, str(rec.get("labeler", "")), str(rec.get("split", "")),
                     f"{path}:{line}", origin=str(rec.get("source") or ""), prompt_id=str(rec.get("prompt_id", "")))
    if kind != "pairs":
        missing = "ranking" if "completions" in rec else "rejected" if "chosen" in rec else "chosen"
        raise InputError(f"neither a ranking {{prompt, completions, ranking}} nor a pair {{chosen, rejected}} "
                         f"(this line looks like {kind})", file=path, line=line, field=missing)
    chosen, rejected = rec["chosen"], rec["rejected"]
    for name, v in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(v, str) or not v.strip():
            raise InputError("expected a non-empty string", file=path, line=line, field=name)
    if chosen == rejected:
        raise InputError("chosen equals rejected", file=path, line=line, field="rejected")
    prompt = _prompt(rec, path, line)
    if not prompt and chosen.startswith("\n\nHuman:"):
        try:
            a, b = parse_hh(chosen), parse_hh(rejected)
        except ValueError:
            raise InputError("not an HH-RLHF dialogue", file=path, line=line, field="rejected") from None
        if a[:-1] != b[:-1] or a[-1]["role"] != "assistant" or b[-1]["role"] != "assistant":
            raise InputError("the two HH-RLHF dialogues do not share a prefix ending before the last assistant turn",
                             file=path, line=line, field="rejected")
        prompt, chosen, rejected = validate_messages(a[:-1], path, line), a[-1]["content"], b[-1]["content"]
        for name, v in (("chosen", chosen), ("rejected", rejected)):
            if not v:
                raise InputError("empty final assistant turn", file=path, line=line, field=name)
        if chosen == rejected:
            raise InputError("chosen equals rejected", file=path, line=line, field="rejected")
    return Group(prompt, [chosen, rejected], [(0, 1)], str(rec.get("labeler", "")), str(rec.get("split", "")),
                 f"{path}:{line}", origin=str(rec.get("source") or ""))


def _ties(ties, K: int, path, line) -> dict[int, int]:
    """`ties`: groups of completion indices ranked equal → {index: group number}."""
    if ties is None:
        return {}
    if not isinstance(ties, list) or not all(isinstance(g, list) for g in ties):
        raise InputError("expected a list of lists of completion indices", file=path, line=line, field="ties")
    tied: dict[int, int] = {}
    for g, group in enumerate(ties):
        for i in group:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < K or i in tied:
                raise InputError(f"{i!r} is not a completion index 0..{K - 1} (or appears twice)", file=path,
                                 line=line, field="ties")
            tied[i] = g
    return tied


SOURCES = ("simulated", "label", "chat", "arena")
# Files of each source in a round folder. People's exports are versioned (name-<time>.jsonl) and each
# holds everything collected so far, so only the newest of each kind is read.
SOURCE_FILES = {"simulated": ("rankings.jsonl", "pairs.jsonl"), "label": ("human-rankings-*", "human-pairs-*"),
                "chat": ("chat-pairs*", "chat-rankings*"), "arena": ("chat-pairs*", "chat-rankings*")}
# (`rundir.by_version` finds the newest; an unversioned chat-pairs.jsonl of an older run is the oldest)


def parse_sources(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    for n in names:
        if n not in SOURCES:
            raise InputError(f"unknown source {n!r} (expected some of {', '.join(SOURCES)})", field="sources")
    return names


def default_data(out: Path, round_: int, sources: list[str] | tuple = ("simulated", "label")) -> list[Path]:
    """The rankings and pairs of `sources` in rounds 1..round: the RM of round i learns from all of them.
    Chat thumbs and arena votes are read only when `sources` names them."""
    paths: list[Path] = []
    for i in range(1, round_ + 1):
        folder = out / f"round-{i}"
        for pattern in dict.fromkeys(p for s in sources for p in SOURCE_FILES[s]):
            found = by_version(f for f in folder.glob(pattern) if f.suffix == ".jsonl" and ".old-" not in f.name)
            for p in found[-1:] if "*" in pattern else found:
                if p.stat().st_size > 0 and p not in paths:
                    paths.append(p)
    if not paths:
        raise InputError(f"no rankings of sources {', '.join(sources)} found in rounds 1..{round_}: run "
                         f"`alignloop rank`, export from the labeling app, or give --data / --sources", file=out)
    return paths


def by_agreement(groups: list[Group], min_agreement: float) -> list[Group]:
    """Leave out items (same prompt and answers) whose labelers agree on less than `min_agreement` of the
    pairs they both ordered; an item with one labeler has no disagreement to measure and is kept."""
    if min_agreement <= 0:
        return groups
    by_item: dict[tuple, list[Group]] = {}
    for g in groups:
        by_item.setdefault((json.dumps(g.prompt), tuple(g.completions)), []).append(g)
    kept = []
    for gs in by_item.values():
        share = labeler_agreement(gs) if len({g.labeler for g in gs}) > 1 else None
        if share is None or share >= min_agreement:
            kept += gs
    return kept


def labeler_agreement(groups: list[Group]) -> float | None:
    """Share of pairs on which two labelers who ranked the same completions agree (the RM's ceiling)."""
    by_item: dict[tuple, list[Group]] = {}
    for g in groups:
        if g.labeler:
            by_item.setdefault((json.dumps(g.prompt), tuple(g.completions)), []).append(g)
    agree = total = 0
    for gs in by_item.values():
        for i in range(len(gs)):
            for j in range(i + 1, len(gs)):
                pref_j = {frozenset(p): p for p in gs[j].pairs}
                for p in gs[i].pairs:
                    q = pref_j.get(frozenset(p))
                    if q is not None:
                        total += 1
                        agree += q == p
    return agree / total if total else None


def usable(groups: list[Group], length, max_len: int, stage: str, file) -> list[Group]:
    """The groups left with a pair to learn from and no completion over `max_len` tokens (`length(g)`: the
    group's longest), saying how many were left out; none left is bad input (`file`: the first read)."""
    kept = [g for g in groups if g.pairs and length(g) <= max_len]
    if len(kept) < len(groups):
        print(f"{stage}: {len(groups) - len(kept)} of {len(groups)} comparisons left out "
              f"(longer than {max_len} tokens, or all answers tied / all bad)")
    if not kept:
        raise InputError("no usable comparisons", file=file)
    return kept


def split_groups(groups: list[Group], cfg) -> tuple[list[Group], list[Group]]:
    """Held out by prompt, the same prompts in every round: a prompt that any record marks held out (rank.py
    decides once per run) is held out in all its records, from every round; data without marks hold out
    the prompts a hash of (seed, prompt) picks, about `val_fraction`, which new rounds' data do not move.
    `cfg`: a stage's config (its `seed` and `val_fraction`)."""
    from alignloop.rank import heldout_prompt
    held = {json.dumps(g.prompt) for g in groups if g.split == "heldout"}
    if not held:
        held = {k for k in {json.dumps(g.prompt) for g in groups} if heldout_prompt(k, cfg.seed, cfg.val_fraction)}
    return [g for g in groups if json.dumps(g.prompt) not in held], [g for g in groups if json.dumps(g.prompt) in held]
