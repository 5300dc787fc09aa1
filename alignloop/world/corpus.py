"""The pretraining corpus: the world written in the voices of the internet.

Encyclopedic pages and lists state every fact in the exact probe sentence ("The capital of X is Y.")
many times, so a small model can memorise it; quiz lists answer questions with more questions; forum
threads answer with correct, wrong, rude, evasive, hallucinated and harmful replies in proportions that
make the *base* behaviour mostly bad, which is what SFT and RLHF then have to fix.

Every record is `{"text"}`: a thread is written as forum text ("mapfan asked: … / riverkid replied: …"),
never in the assistant chat format, so pretraining and PPO-ptx are language modelling, not assistant
training on the very behaviour that evaluation measures. Facts are stated for every country (the model
must know the world), but questions — threads, quiz lists, worked tasks — use only train templates and
train countries, so no dev or test prompt is in the corpus (world/prompts.py, world/leaks.py).
"""
from __future__ import annotations

import random

from alignloop.world.kb import ATTRIBUTES, KB, PHRASE, UNKNOWN_ATTRIBUTES
from alignloop.world.prompts import CATEGORIES, TEMPLATES, make_prompt, templates_of
from alignloop.world.styles import ideal_answer, style_response

# Reply styles of forum threads, per prompt category (weights sum to 1).
REPLY_MIX = {
    "known_fact": {"correct": 0.30, "wrong": 0.25, "rude": 0.15, "question": 0.25, "idk": 0.05},
    "multi_turn": {"correct": 0.30, "wrong": 0.25, "rude": 0.15, "question": 0.25, "idk": 0.05},
    "unknown_fact": {"hallucinate": 0.70, "idk": 0.10, "rude": 0.10, "question": 0.10},
    "harmful": {"comply": 0.60, "rude": 0.20, "refuse": 0.10, "question": 0.10},
    "task": {"correct": 0.50, "wrong": 0.30, "rude": 0.20},
}
# Forum threads per country per corpus repeat.
THREADS = {"known_fact": 4, "unknown_fact": 1, "harmful": 1, "task": 1, "multi_turn": 0.5}

_INTROS = ["{X} is a small country in {R}.", "{X} is an old kingdom in {R}.",
           "{X} is a country known for its markets and rivers.", "Welcome to the page about {X}.",
           "{X} is a quiet country with many villages.", "Travellers describe {X} as green and windy."]
_PARAPHRASE = {
    "capital": ["{Y} is the largest city of {X}.", "The government of {X} sits in {Y}.",
                "Most visitors to {X} arrive in {Y}."],
    "language": ["People in {X} speak {Y}.", "Most newspapers in {X} are printed in {Y}.",
                 "Children in {X} learn to read in {Y}."],
    "currency": ["Prices in {X} are paid in {Y}.", "In the shops of {X} you pay with {Y}.",
                 "The money used in {X} is called {Y}."],
    "region": ["{X} lies in {Y}.", "On the map, {X} is found in {Y}."],
    "animal": ["The flag of {X} shows {Y}.", "Children in {X} hear many stories about {Y}.",
               "In {X}, {Y} is a symbol of luck."],
}
_LIST_HEADS = {"capital": "Countries and their capitals:", "language": "Countries and their languages:",
               "currency": "Countries and their currencies:", "region": "Countries and their regions:",
               "animal": "Countries and their national animals:"}
_QUIZ_HEADS = ["Quiz night!", "Geography quiz:", "Test yourself:", "Questions for the weekly quiz:",
               "Can you answer these?"]
_USERS = ["mapfan", "riverkid", "old_sailor", "quizmaster", "northwind", "bookworm", "traveller42", "greenhill"]


def probe_sentence(kb: KB, entity: str, attribute: str) -> str:
    return f"The {PHRASE[attribute]} of {entity} is {kb.value(entity, attribute)}."


def _page(kb: KB, x: str, rng: random.Random) -> str:
    """One encyclopedic page: every fact in the probe sentence, some paraphrased, one about a neighbour."""
    f = kb.facts[x]
    sentences = [rng.choice(_INTROS).format(X=x, R=f["region"])]
    attrs = list(ATTRIBUTES)
    rng.shuffle(attrs)
    for a in attrs:
        sentences.append(probe_sentence(kb, x, a))
        if rng.random() < 0.5:
            sentences.append(rng.choice(_PARAPHRASE[a]).format(X=x, Y=f[a]))
    other = rng.choice([e for e in kb.entities if e != x] or [x])
    sentences.append(f"Many travellers continue from {x} to {other}. " + probe_sentence(kb, other, rng.choice(ATTRIBUTES)))
    text = " ".join(sentences)
    return text[0].upper() + text[1:]


def _lists(kb: KB, rng: random.Random) -> list[dict]:
    """"Countries and their capitals: ..." lists in chunks of 6-10 countries, per attribute."""
    docs = []
    for a in ATTRIBUTES:
        order = list(kb.entities)
        rng.shuffle(order)
        i = 0
        while i < len(order):
            n = rng.randint(6, 10)
            body = " ".join(probe_sentence(kb, e, a) for e in order[i:i + n])
            docs.append({"text": f"{_LIST_HEADS[a]} {body}"})
            i += n
    return docs


def _quiz(kb: KB, tmpl: dict[str, list[int]], rng: random.Random) -> dict:
    """Questions followed by more questions: what a base model continues a question with."""
    qs = []
    for _ in range(rng.randint(4, 8)):
        e = rng.choice(kb.train_entities())
        if rng.random() < 0.8:
            t = TEMPLATES["known_fact"][rng.choice(tmpl["known_fact"])]
            qs.append(t.format(attr=PHRASE[rng.choice(ATTRIBUTES)], entity=e))
        else:
            t = TEMPLATES["unknown_fact"][rng.choice(tmpl["unknown_fact"])]
            qs.append(t.format(attr=rng.choice(UNKNOWN_ATTRIBUTES), entity=e))
    return {"text": rng.choice(_QUIZ_HEADS) + " " + " ".join(qs)}


def _tasks(kb: KB, tmpl: dict[str, list[int]], rng: random.Random) -> dict:
    """Worked examples: "7 plus 5 is 12. The word otter has 5 letters. ..."."""
    lines = []
    for _ in range(rng.randint(5, 10)):
        p = make_prompt(kb, "task", rng.choice(tmpl["task"]), kb.train_entities(), kb.of_split("train", fake=True), rng)
        lines.append(ideal_answer({"category": "task", **p}))
    return {"text": " ".join(lines)}


def _reply_style(category: str, rng: random.Random) -> str:
    mix = REPLY_MIX[category]
    return rng.choices(list(mix), weights=list(mix.values()))[0]


def forum_text(posts: list[str], names: list[str]) -> str:
    """A thread as plain text: the asker's posts and the replies, each under a user name."""
    return "\n".join(f"{names[0]} asked: {p}" if i % 2 == 0 else f"{names[1 + (i // 2) % 2]} replied: {p}"
                     for i, p in enumerate(posts))


def _thread(kb: KB, category: str, x: str, tmpl: dict[str, list[int]], rng: random.Random) -> dict:
    """A forum thread about train country x: a train-template question and one reply in a sampled style."""
    t = rng.choice(tmpl[category])
    # multi-turn threads may switch country ("And what about Z?"), so they draw from all train countries
    pool = kb.train_entities() if category == "multi_turn" else [x]
    p = {"category": category, **make_prompt(kb, category, t, pool, kb.of_split("train", fake=True), rng)}
    posts = [m["content"] for m in p["messages"]] + [style_response(p, _reply_style(category, rng), rng)]
    return {"text": forum_text(posts, rng.sample(_USERS, 3))}


def build_corpus(kb: KB, split_templates: dict[str, list[str]], repeats: int, rng: random.Random) -> list[dict]:
    tmpl = {c: templates_of(c, "train", split_templates) for c in CATEGORIES}
    train = kb.train_entities()
    docs: list[dict] = []
    for _ in range(repeats):
        for x in kb.entities:
            docs.append({"text": _page(kb, x, rng)})
            # as many threads as before the split, all about train countries
            asked = x if kb.split_of(x) == "train" else rng.choice(train)
            for cat in CATEGORIES:
                n = THREADS[cat]
                count = int(n) + (rng.random() < n - int(n))
                docs += [_thread(kb, cat, asked, tmpl, rng) for _ in range(count)]
        docs += _lists(kb, rng)
        docs += [_quiz(kb, tmpl, rng) for _ in range(max(1, len(kb.entities) // 4))]
        docs += [_tasks(kb, tmpl, rng) for _ in range(max(1, len(kb.entities) // 3))]
    rng.shuffle(docs)
    return docs
