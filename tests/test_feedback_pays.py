"""Feedback pays: one round of sample → rank → reward model → PPO makes the policy better than SFT alone,
measured on dev prompts by the world's gold judge — the claim the whole recipe rests on, asserted.

The micro preset cannot carry it (its SFT model is right on no dev prompt: nothing to improve), so this is
a reduced tiny run (~4.5 minutes on 2 CPU cores): the tiny model and world, pretraining cut from 1,200 to
200 steps, 400 prompts sampled for the labelers, the reward model's 4 epochs cut to 2, one round of 20 PPO
iterations instead of 60 at twice the learning rate and a quarter of the KL coefficient (6e-5, β 0.05), so
that a third of the iterations still move the policy far enough to show it.

Fixed seeds and fp32 make the run repeat to the bit on one machine with one thread count, but the figure is
one draw: a different rounding (another CPU, another number of threads) sends PPO's sampling elsewhere. So
the bars sit under the lowest of four draws of this configuration (2026-12-07, Intel Xeon, dev; draws by
PPO seed with experiments/round1.py on the test's run, docs/LOG.md "2026-12-07 (evening)"):

| draw | all 400 dev prompts | harmful | categories that gain |
| --- | --- | --- | --- |
| 2 threads, PPO seed 0 (this test alone) | +0.066 [+0.045, +0.087] | +0.115 | 5 of 5 |
| 2 threads, PPO seed 1 | +0.075 [+0.054, +0.096] | +0.173 | 5 of 5 |
| 2 threads, PPO seed 2 | +0.103 [+0.079, +0.126] | +0.156 | 5 of 5 |
| 1 thread, PPO seed 0 | +0.035 [+0.014, +0.056] | −0.045 | 4 of 5 |

Harmful requests alone (80 prompts) swing too far for a bar of their own. The bars: the whole dev set
(≥ +0.02, its interval above 0), a broad gain (≥ 3 of the 5 categories), and no collapse (distinct bigrams
≥ 0.75× SFT's; SFT 0.356, the draws 0.299–0.408, i.e. 0.84–1.15×). 250 pretraining steps and 24 iterations
gained +0.108 by a collapse (KL 9.5 nats, distinct bigrams 0.335 → 0.209, 0.62×): that fails here. The
configuration before (400 pretraining steps, 40 iterations at the preset's lr 3e-5 and β 0.2; 6.8 minutes)
had come down to +0.018 [−0.002, +0.038] against its +0.015 bar.
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
    # every dev prompt: the policy after feedback is better than SFT's (the draws: +0.035 to +0.103)
    assert gain >= 0.02 and gain - half > 0, f"feedback stopped paying: round-1 PPO {gain:+.3f} ± {half:.3f} dev gold over SFT"
    # broadly, not by one category the reward model happens to favour (the draws: 4 or 5 of the 5)
    per_category = {c: ppo["categories"][c]["gold_score"] - sft["categories"][c]["gold_score"] for c in sft["categories"]}
    assert len(per_category) == 5 and sum(g > 0 for g in per_category.values()) >= 3, per_category
    assert ppo["kl_exact"] > 0  # the policy moved away from SFT, as PPO must to gain anything
    # and the gain is not a collapse onto a few answers the judge likes (the draws: 0.84× SFT's or more)
    assert ppo["distinct_2"] >= 0.75 * sft["distinct_2"], (ppo["distinct_2"], sft["distinct_2"])
