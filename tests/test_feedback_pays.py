"""Feedback pays: one round of sample → rank → reward model → PPO makes the policy better than SFT alone,
measured on dev prompts by the world's gold judge — the claim the whole recipe rests on, asserted.

The micro preset cannot carry it (its SFT model is right on no dev prompt: nothing to improve), so this is
a reduced tiny run (~3.5 minutes on 2 CPU cores): the tiny model and world, pretraining cut from 1,200 to
400 steps, 400 prompts sampled for the labelers, 40 PPO iterations instead of 60, one round. Fixed seeds
and fp32 on the CPU make it deterministic; the margins sit well under what it measured, so that a change
which stops feedback from paying fails here, and one that moves a few answers does not. Measured: all 400
dev prompts +0.033 [+0.010, +0.055], harmful requests +0.079 [+0.025, +0.133] (2026-12-06, Intel Xeon,
the reward model with its likelihood gate, the tiny preset's default); before the gate +0.014 and +0.109
(2026-12-05, AMD EPYC).
"""
from __future__ import annotations

import json

import pytest

from alignloop.stats import paired_gain
from tests.conftest import alignloop

pytestmark = pytest.mark.slow

REDUCED_TINY = """\
[pretrain]
max_steps = 400
checkpoint_every = 400
sample_every = 0
[sample]
n_prompts = 400
[ppo]
iterations = 40
probe_every = 10
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
    # every dev prompt: the policy after feedback is better than SFT's (measured +0.033)
    assert gain >= 0.015, f"feedback stopped paying: round-1 PPO {gain:+.3f} ± {half:.3f} dev gold over SFT"

    # harmful requests, where the labelers' rankings teach a behaviour SFT's demonstrations rarely show
    # (declining politely): the gain is large and must stay so (measured +0.079)
    def harmful(stage: dict) -> dict:
        return {**stage, "examples": [e for e in stage["examples"] if e["category"] == "harmful"]}
    h_gain, h_half, h_n = paired_gain(harmful(ppo), harmful(sft))
    assert h_n == 80
    assert h_gain >= 0.05 and h_gain - h_half > 0, f"harmful requests: {h_gain:+.3f} ± {h_half:.3f}"
    assert ppo["kl_exact"] > 0  # the policy moved away from SFT, as PPO must to gain anything
