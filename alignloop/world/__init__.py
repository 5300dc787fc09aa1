"""The embedded world: a seeded fictional world with gold truth, so every run can measure what RLHF did.

`alignloop world --preset tiny --out runs/x` writes runs/x/world/:
  kb.json                 countries and their facts, value pools, fake countries, the dev and test countries
  corpus.jsonl            pretraining documents, {"text"} (forum threads as plain text, not the chat format)
  prompts-train.jsonl     {"id", "category", "messages", "gold"}; prompts-dev.jsonl (tuning, early
                          stopping, PPO's probe) and prompts-test.jsonl (what eval reports) likewise
  demonstrations.jsonl    {"id", "category", "messages"} ending with the ideal assistant answer
  facts.jsonl             {"prefix", "value"}: one probe per fact ("The capital of X is" -> "Y")
  labelers.json           the simulated labelers: weights and noise
  world.json              manifest: seed, counts, config, dev and test templates and countries, labeler agreement
Same seed, same config -> byte-identical files: one `random.Random` stream per part, seeded by name.
"""
from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path

from alignloop.config import option
from alignloop.errors import InputError
from alignloop.io import atomic_dir, read_records, write_json, write_jsonl
from alignloop.rundir import save_stage_config
from alignloop.world.corpus import build_corpus
from alignloop.world.kb import KB, build_kb
from alignloop.world.labelers import (NOISE, Judgement, Labeler, gold_score, ideal_answer, judge, labeler_agreement,
                                      make_labelers, style_response)
from alignloop.world.prompts import CATEGORIES, SPLITS, build_demonstrations, build_prompts, choose_split_templates

__all__ = ["SECTION", "Config", "PRESETS", "World", "run", "build_world", "load_world", "KB", "Labeler",
           "Judgement", "judge", "gold_score", "ideal_answer", "style_response", "CATEGORIES", "SPLITS"]

SECTION = "world"


@dataclass
class Config:
    seed: int = option(0, "seed of the world generator (same seed, byte-identical files)", min=0)
    n_entities: int = option(60, "number of fictional countries (5 facts each)", min=6, max=400)
    n_train_prompts: int = option(2000, "prompts for training (RLHF rounds, demonstrations)", min=10)
    n_dev_prompts: int = option(400, "dev prompts: for tuning, early stopping and PPO's probe (unseen templates)", min=10)
    n_test_prompts: int = option(1200, "test prompts that eval reports (unseen templates, half of them unseen countries "
                                       "too; 1200 keeps a policy's gold interval near ±0.017)", min=10)
    n_demonstrations: int = option(150, "demonstrations for SFT (few, skewed to easy categories)", min=1)
    corpus_repeats: int = option(7, "passes over the world when writing the corpus (its size and fact repetitions)",
                                 min=1, max=200)
    n_labelers: int = option(8, "simulated labelers", min=2, max=100)
    labeler_noise: float = option(NOISE, "std of each labeler's score noise (sets inter-labeler agreement)",
                                  min=0.0, max=2.0)


PRESETS = {
    "micro": {"n_entities": 12, "n_train_prompts": 200, "n_dev_prompts": 40, "n_test_prompts": 60,
              "n_demonstrations": 40, "corpus_repeats": 3},
    "tiny": {},
    "small": {"n_entities": 100, "n_train_prompts": 4000, "n_dev_prompts": 500, "n_test_prompts": 1000,
              "n_demonstrations": 300, "corpus_repeats": 16},
}


class World:
    """The generated (or loaded) world; `judge` and `gold_score` know its gold truth."""

    def __init__(self, kb: KB, prompts: dict[str, list[dict]], demonstrations: list[dict],
                 labelers: list[Labeler], manifest: dict, corpus: list[dict] | None = None,
                 corpus_path: Path | None = None):
        self.kb, self._prompts, self._demos = kb, prompts, demonstrations
        self.labelers, self.manifest = labelers, manifest
        self._corpus, self.corpus_path = corpus, corpus_path

    def prompts(self, split: str = "train") -> list[dict]:
        if split not in self._prompts:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        return self._prompts[split]

    def demonstrations(self) -> list[dict]:
        return self._demos

    def fact_probes(self) -> list[tuple[str, str]]:
        return self.kb.probes()

    def corpus(self) -> list[dict]:
        """The corpus records (read from corpus.jsonl when the world was loaded from disk)."""
        if self._corpus is None:
            self._corpus = [r for _, r in read_records(self.corpus_path)]
        return self._corpus

    def judge(self, prompt: dict, response: str) -> Judgement:
        return judge(prompt, response)

    def gold_score(self, prompt: dict, response: str) -> float:
        return gold_score(prompt, response)

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        write_json(folder / "kb.json", self.kb.to_json())
        write_jsonl(folder / "corpus.jsonl", self.corpus())
        for split in SPLITS:
            write_jsonl(folder / f"prompts-{split}.jsonl", self.prompts(split))
        write_jsonl(folder / "demonstrations.jsonl", self.demonstrations())
        write_jsonl(folder / "facts.jsonl", [{"prefix": p, "value": v} for p, v in self.fact_probes()])
        write_json(folder / "labelers.json", [lab.to_json() for lab in self.labelers])
        write_json(folder / "world.json", self.manifest)


def build_world(cfg: Config) -> World:
    """Generate the whole world in memory. Each part has its own named random stream, so a corpus-size
    change leaves the knowledge base, the prompts and the labelers as they were."""
    def stream(part: str) -> random.Random:
        return random.Random(f"alignloop-world/{cfg.seed}/{part}")  # str seeds hash with SHA-512: stable

    kb = build_kb(stream("kb"), cfg.n_entities)
    split_templates = choose_split_templates(stream("templates"))
    sizes = {"train": cfg.n_train_prompts, "dev": cfg.n_dev_prompts, "test": cfg.n_test_prompts}
    prompts = {s: build_prompts(kb, split_templates, sizes[s], s, stream(s)) for s in SPLITS}
    demos = build_demonstrations(prompts["train"], cfg.n_demonstrations, stream("demonstrations"))
    labelers = make_labelers(stream("labelers"), cfg.n_labelers, noise=cfg.labeler_noise)
    corpus = build_corpus(kb, split_templates, cfg.corpus_repeats, stream("corpus"))
    agreement = labeler_agreement(prompts["dev"][:200], labelers, stream("agreement"))
    corpus_bytes = sum(len(json.dumps(r, ensure_ascii=False).encode()) + 1 for r in corpus)
    manifest = {
        "seed": cfg.seed,
        "counts": {"entities": len(kb.entities), "facts": kb.n_facts(), "corpus_documents": len(corpus),
                   "corpus_bytes": corpus_bytes, **{f"{s}_prompts": len(prompts[s]) for s in SPLITS},
                   "demonstrations": len(demos), "labelers": len(labelers)},
        "dev_templates": split_templates["dev"], "test_templates": split_templates["test"],
        "dev_entities": kb.dev_entities, "test_entities": kb.test_entities,
        "labeler_agreement": round(agreement, 4),
        "config": dataclasses.asdict(cfg),
    }
    return World(kb, prompts, demos, labelers, manifest, corpus=corpus)


def load_world(path: str | Path) -> World:
    """Load a world written by `run`: `path` is a run directory or its world/ folder."""
    path = Path(path)
    folder = path / "world" if (path / "world" / "world.json").exists() else path
    if not (folder / "world.json").exists():
        raise InputError("no embedded world here (run `alignloop world` first)", file=path)
    def load_json(name: str):
        try:
            return json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"cannot read: {e}", file=folder / name) from None
    if not (folder / "prompts-dev.jsonl").exists():
        raise InputError("this world has no dev/test split (an older alignloop made it, with train/held-out "
                         "prompts that leak into the corpus): make a new one with `alignloop world`", file=folder)
    kb = KB.from_json(load_json("kb.json"))
    prompts = {s: [r for _, r in read_records(folder / f"prompts-{s}.jsonl")] for s in SPLITS}
    demos = [r for _, r in read_records(folder / "demonstrations.jsonl")]
    labelers = [Labeler(d["name"], d["weights"], d["noise"]) for d in load_json("labelers.json")]
    return World(kb, prompts, demos, labelers, load_json("world.json"), corpus_path=folder / "corpus.jsonl")


def run(cfg: Config, out: Path) -> None:
    out = Path(out)
    world = build_world(cfg)
    with atomic_dir(out / "world") as tmp:
        world.save(tmp)
    world.corpus_path = out / "world" / "corpus.jsonl"
    save_stage_config(out, SECTION, cfg)
    c = world.manifest["counts"]
    print(f"world: {c['entities']} entities, {c['facts']} facts, corpus {c['corpus_bytes'] / 1000:.0f} KB "
          f"({c['corpus_documents']} documents), prompts {c['train_prompts']} train / {c['dev_prompts']} dev / "
          f"{c['test_prompts']} test, {c['demonstrations']} demonstrations, {c['labelers']} labelers "
          f"(agreement {world.manifest['labeler_agreement']:.0%}) -> {out / 'world'}")
