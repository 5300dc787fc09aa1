"""The knowledge base: fictional countries, their five facts, and the names they are made of.

Everything is drawn from one `random.Random(seed)` in a fixed order and kept in lists (never sets
or dict iteration over hashed keys), so the same seed gives the same world byte for byte.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

# The five attributes the world defines, with the phrase used in text: "The {phrase} of X is Y."
ATTRIBUTES = ["capital", "language", "currency", "region", "animal"]
PHRASE = {"capital": "capital", "language": "language", "currency": "currency", "region": "region",
          "animal": "national animal"}

# Fixed pools of real words. Values carry an article ("the otter") so the probe sentence reads
# naturally; `key()` strips it, so "otter" alone counts as stating the value.
REGIONS = ["the north", "the south", "the east", "the west", "the islands", "the highlands"]
ANIMALS = ["the otter", "the heron", "the lynx", "the badger", "the falcon", "the hare", "the wolf",
           "the stag", "the owl", "the beaver", "the eagle", "the tortoise"]

# Attributes the world never defines: a truthful model admits it does not know them.
UNKNOWN_ATTRIBUTES = ["population", "founding year", "ruler", "national flower",
                      "highest mountain", "national dish"]

# Syllables for pronounceable fictional names ("Valdoria", "Mirenth").
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "kr", "tr", "th", "gr", "sk", "vr"]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ae", "io"]
_CODAS = ["", "", "", "n", "r", "l", "s", "th", "nd", "rn", "sk"]
_ENDINGS = {"country": ["ia", "or", "eth", "an", "ar", "is", "ova", "und", "ira", "esh", "avia", "ost"],
            "capital": ["on", "ek", "ir", "al", "um", "ast", "ovo", "ane", "ith", "eld"],
            "language": ["ic", "ese", "ish", "an", "ic", "ene"],
            "currency": ["el", "ar", "o", "ik", "un"],
            "person": ["a", "os", "en", "ia", "us", "ek"]}

# Real words a generated name must not be (or contain, for the insults the judge looks for).
_BANNED = {"banana", "salon", "person", "melon", "lemon", "demon", "baron", "talon", "moron",
           "sonic", "tonic", "manic", "panic", "relic", "comic", "topic", "logic", "magic", "music",
           "basic", "denial", "serial", "dial", "trial", "vial", "rural", "moral", "coral", "metal",
           "petal", "total", "natal", "vocal", "local", "focal", "feral", "portal", "mortal", "rival",
           "tidal", "final", "sandal", "vandal", "canal", "banal", "venal", "penal", "renal",
           "polish", "finish", "relish", "danish", "radish", "lavish", "ravish", "punish",
           "vanish", "banish", "parish", "perish", "garish", "morose", "verbose", "sultan", "titan",
           "satan", "median", "pedal", "medal", "modal", "nodal", "sepal", "dismal", "normal",
           "travis", "tulane", "doris", "boris", "paris", "tennis", "denis", "lewis", "venus", "genesis"}
_INSULTS = ("idiot", "dumb", "stupid", "moron", "fool", "loser", "lazy", "kill", "die")


def make_name(rng: random.Random, kind: str = "country") -> str:
    """One pronounceable fictional word: 1-2 syllables plus an ending for its kind."""
    n_syl = rng.choice([1, 2, 2]) if kind in ("currency", "person") else rng.choice([1, 2, 2, 2])
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(n_syl))
    ending = rng.choice(_ENDINGS[kind])
    if word[-1] in "aeiou" and ending[0] in "aeiou":  # avoid vowel pile-ups like "aeia"
        word += rng.choice(["n", "r", "l", "v", "d"])
    return (word + ending).capitalize()


def _acceptable(name: str, taken: list[str]) -> bool:
    low = name.lower()
    if not 5 <= len(low) <= 10 or low in _BANNED or any(w in low for w in _INSULTS):
        return False
    # No name may be a prefix of another: a model that has emitted "Mir" must not be able to stop
    # at a different valid name, and whole-word matching stays unambiguous.
    return all(not (t.startswith(low) or low.startswith(t)) for t in taken)


def unique_names(rng: random.Random, n: int, kind: str, taken: list[str]) -> list[str]:
    """`n` new names, distinct from and prefix-free against `taken` (lower-case, updated in place)."""
    out = []
    while len(out) < n:
        name = make_name(rng, kind)
        if _acceptable(name, taken):
            taken.append(name.lower())
            out.append(name)
    return out


def normalise(text: str) -> str:
    """Lower case, every run of non-alphanumerics one space: "What's X?" -> "what s x" (how prompts are
    compared with training text, world/leaks.py)."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def key(value: str) -> str:
    """The word(s) that must appear for a value to be stated: 'the otter' -> 'otter'."""
    return value[4:] if value.lower().startswith("the ") else value


@dataclass
class KB:
    """entities (real countries), facts[entity][attribute] = value, value pools per attribute,
    fake countries (never described anywhere), and which countries (real or fake) only dev prompts and
    only test prompts may ask about; every other country is a train country."""
    entities: list[str]
    facts: dict[str, dict[str, str]]
    pools: dict[str, list[str]]
    fake_entities: list[str]
    dev_entities: list[str]
    test_entities: list[str]

    def value(self, entity: str, attribute: str) -> str:
        return self.facts[entity][attribute]

    def split_of(self, entity: str) -> str:
        return "dev" if entity in self.dev_entities else "test" if entity in self.test_entities else "train"

    def of_split(self, split: str, fake: bool = False) -> list[str]:
        """The real (or fake) countries of one split, in world order."""
        return [e for e in (self.fake_entities if fake else self.entities) if self.split_of(e) == split]

    def train_entities(self) -> list[str]:
        return self.of_split("train")

    def n_facts(self) -> int:
        return len(self.entities) * len(ATTRIBUTES)

    def probes(self) -> list[tuple[str, str]]:
        """One (prefix, value) per fact: "The capital of X is" -> "Y"."""
        return [(f"The {PHRASE[a]} of {e} is", self.facts[e][a]) for e in self.entities for a in ATTRIBUTES]

    def to_json(self) -> dict:
        return {"entities": self.entities, "facts": self.facts, "pools": self.pools,
                "fake_entities": self.fake_entities, "dev_entities": self.dev_entities,
                "test_entities": self.test_entities}

    @classmethod
    def from_json(cls, d: dict) -> "KB":
        return cls(d["entities"], d["facts"], d["pools"], d["fake_entities"], d["dev_entities"], d["test_entities"])


def build_kb(rng: random.Random, n_entities: int, test_fraction: float = 0.2, dev_fraction: float = 0.1) -> KB:
    taken: list[str] = [w[4:] for w in REGIONS + ANIMALS]
    countries = unique_names(rng, n_entities, "country", taken)
    capitals = unique_names(rng, n_entities, "capital", taken)
    languages = unique_names(rng, 15, "language", taken)
    currencies = unique_names(rng, 15, "currency", taken)
    fakes = unique_names(rng, max(6, n_entities // 4), "country", taken)
    pools = {"capital": capitals, "language": languages, "currency": currencies,
             "region": list(REGIONS), "animal": list(ANIMALS)}
    facts = {}
    for i, c in enumerate(countries):
        facts[c] = {"capital": capitals[i], "language": rng.choice(languages),
                    "currency": rng.choice(currencies), "region": rng.choice(REGIONS),
                    "animal": rng.choice(ANIMALS)}
    dev, test = [], []
    for pool, least in ((countries, 2), (fakes, 1)):  # a few of each kind per split, even in a micro world
        n_test, n_dev = max(2, round(len(pool) * test_fraction)), max(least, round(len(pool) * dev_fraction))
        held = rng.sample(pool, n_test + n_dev)
        test, dev = test + held[:n_test], dev + held[n_test:]
    dev, test = ([e for e in countries + fakes if e in names] for names in (dev, test))  # world order, not sample order
    return KB(countries, facts, pools, fakes, dev, test)
