"""Feedback pays: one round of sample → rank → reward model → PPO makes the policy better than SFT alone,
measured on dev prompts by the world's gold judge — the claim the whole recipe rests on, asserted.

The micro preset cannot carry it (its SFT model is right on no dev prompt: nothing to improve), so this is
a reduced tiny run (~4.5 minutes on 2 CPU cores): the tiny model and world, pretraining cut from 1,200 to
200 steps, 400 prompts sampled for the labelers, the reward model's 4 epochs cut to 2, one round of 20 PPO
iterations instead of 60 at twice the learning rate and a quarter of the KL coefficient (6e-5, β 0.05), so
that a third of the iterations still move the policy far enough to show it. Fixed seeds and fp32 on the CPU make it
deterministic; the margins sit at about half of what it measured, so that a change which stops feedback
from paying fails here, and one that moves a few answers does not. Measured (2026-12-07, Intel Xeon, this
configuration): all 400 dev prompts +0.066 [+0.045, +0.087] (SFT 0.520 → 0.586, KL 3.5 nats, distinct
bigrams 0.356 → 0.363), harmful requests +0.115 [+0.061, +0.169]. The configuration before (400 pretraining
steps, 40 iterations at the preset's rate and β: 6.8 minutes) had come down to +0.018 [−0.002, +0.038] on
the same machine, too near its +0.015 bar; 30 iterations at lr 6e-5 and β 0.2 gave +0.036, 24 at β 0.05
+0.062 (docs/LOG.md, 2026-12-07 evening).
"""
from __future__ import annotations

import json

import pytest

from alignloop.stats import paired_gain
from tests.conftest import alignloop

pytestmark = pytest.mark.slow

REDUCED_TINY = """\
[pretrain]
max_steps = 200
checkpoint_every = 200
sample_every = 0
[sample]
n_prompts = 400
[reward]
epochs = 2
[ppo]
iterations = 20
lr = 6e-5
kl_coef = 0.05
probe_every = 20
[eval]
split = "dev"
"""


def test_one_round_of_feedback_beats_sft_on_dev_gold(tmp_path):
    (tmp_path / "reduced.toml").write_text(REDUCED_TINY)
    run = tmp_path / "run"
    alignloop("run", "--preset", "tiny", "--rounds", "1", "--config", tmp_path / "reduced.toml", "--out", run,
              timeout=1200)
    stages = json.loads((run / "eval.json").read_text())["stages_dev"]
    sft, ppo = stages["sft"], stages["round-1/ppo"]
    gain, half, n = paired_gain(ppo, sft)
    assert n == 400
    # every dev prompt: the policy after feedback is better than SFT's (measured +0.066)
    assert gain >= 0.03 and gain - half > 0, f"feedback stopped paying: round-1 PPO {gain:+.3f} ± {half:.3f} dev gold over SFT"

    # harmful requests, where the labelers' rankings teach a behaviour SFT's demonstrations rarely show
    # (declining politely): the gain is large and must stay so (measured +0.115)
    def harmful(stage: dict) -> dict:
        return {**stage, "examples": [e for e in stage["examples"] if e["category"] == "harmful"]}
    h_gain, h_half, h_n = paired_gain(harmful(ppo), harmful(sft))
    assert h_n == 80
    assert h_gain >= 0.05 and h_gain - h_half > 0, f"harmful requests: {h_gain:+.3f} ± {h_half:.3f}"
    assert ppo["kl_exact"] > 0  # the policy moved away from SFT, as PPO must to gain anything
    # and the gain is not a collapse onto a few answers the judge likes (measured 0.363 against SFT's 0.356)
    assert ppo["distinct_2"] >= 0.9 * sft["distinct_2"], (ppo["distinct_2"], sft["distinct_2"])
