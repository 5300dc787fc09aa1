"""The frozen trunk run once (alignloop/train/trunk_cache.py) and early stopping in the reward stage.

Invariances: rewards from cached features equal the whole forward pass's, and so do their gradients;
the reward stage trains alike with and without the cache (same losses step by step, same weights);
with --early-stop the saved model is the best epoch's, not the last's.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from alignloop.config import resolve  # noqa: E402
from alignloop.forward import sequence_scores  # noqa: E402
from alignloop.train import loop as L  # noqa: E402
from alignloop.train import reward as R  # noqa: E402
from alignloop.train.trunk_cache import bytes_needed, cached_scores, frozen_features  # noqa: E402
from tests.test_reward import build_rlhf_run  # noqa: E402


@pytest.fixture(scope="session")
def rlhf(micro_run) -> Path:
    return build_rlhf_run(micro_run)


def _model_and_seqs(rlhf, n_top: int, gated: bool = False):
    from alignloop.model import load_scalar_model
    from alignloop.tokenizer import ChatTokenizer
    model = load_scalar_model(rlhf / "sft", likelihood_gate=gated)
    torch.manual_seed(0)
    torch.nn.init.normal_(model.score.weight, std=0.5)  # a fresh head scores 0: give it something to say
    L.train_top_layers(model, n_top)
    tok = ChatTokenizer.load(rlhf / "sft")
    rng = random.Random(0)
    vocab = tok.vocab_size
    seqs = [[rng.randrange(3, vocab) for _ in range(rng.randint(3, 40))] for _ in range(9)]
    return model, tok, seqs


@pytest.mark.parametrize("n_top,gated", [(0, False), (1, False), (1, True)])
def test_cached_rewards_and_gradients_equal_the_whole_forward_pass(rlhf, n_top, gated):
    """A likelihood-gated model too: its LM head is the tied embedding, frozen below the top blocks."""
    model, tok, seqs = _model_and_seqs(rlhf, n_top, gated)
    assert len(model.model.layers) == 2 and n_top < 2
    starts = [len(s) // 3 for s in seqs] if gated else None  # (where each "answer" begins)
    whole = sequence_scores(model, seqs, tok.pad_id, "cpu", max_tokens=120, starts=starts)
    whole.pow(2).sum().backward()
    g_whole = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    # other chunkings on both sides: padding must not leak into any sequence's score
    feats = frozen_features(model, seqs, n_top, tok.pad_id, "cpu", max_tokens=64)
    assert [f.shape for f in feats] == [(len(s), model.config.hidden_size) for s in seqs]
    assert bytes_needed(model, seqs) == sum(map(len, seqs)) * model.config.hidden_size * 4
    cached = cached_scores(model, feats, n_top, "cpu", max_tokens=200, seqs=seqs, starts=starts)
    assert torch.allclose(cached, whole, atol=1e-5), (cached, whole)
    if gated:  # the gated likelihood counts: over the last token alone the scores differ
        assert not torch.allclose(cached, cached_scores(model, feats, n_top, "cpu", seqs=seqs,
                                                        starts=[len(s) - 1 for s in seqs]), atol=1e-3)
    cached.pow(2).sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            scale = max(1.0, g_whole[n].abs().max().item())  # (a gated model's gradients run to 1e4)
            assert torch.allclose(p.grad, g_whole[n], atol=1e-5 * scale, rtol=1e-4), n
    # the trunk is whole again afterwards
    assert len(model.model.layers) == 2 and not isinstance(model.model.norm, torch.nn.Identity)
    assert torch.allclose(sequence_scores(model, seqs, tok.pad_id, "cpu", starts=starts), whole, atol=1e-6)


def _train(rlhf, tmp_path, name, **flags) -> tuple[Path, dict, list[dict]]:
    out = tmp_path / name
    shutil.copytree(rlhf, out)
    data = tmp_path / "r.jsonl"
    if not data.exists():
        lines = (rlhf / "round-1" / "rankings.jsonl").read_text().splitlines()
        data.write_text("".join(json.dumps(json.loads(x) | {"split": "train"}) + "\n" for x in lines[:40]))
    cfg = resolve(R.Config, "reward", preset="micro", presets=R.PRESETS,
                  flags=dict(dict(data=str(data), batch_size=4, warmup_steps=0, lr=1e-3, demonstrations="none"), **flags))
    stage = R.run(cfg, out)
    metrics = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
    return stage, json.loads((stage / "eval.json").read_text()), metrics


@pytest.mark.parametrize("gate", [False, True])
def test_the_reward_stage_trains_alike_with_and_without_the_cache(rlhf, tmp_path, gate):
    a, eval_a, m_a = _train(rlhf, tmp_path, "cached", train_layers=1, epochs=2, likelihood_gate=gate)
    b, eval_b, m_b = _train(rlhf, tmp_path, "whole", train_layers=1, epochs=2, cache_gb=0.0, likelihood_gate=gate)
    assert eval_a["cached_blocks_below"] == 1 and eval_b["cached_blocks_below"] is None
    assert len(m_a) == len(m_b) >= 10
    for x, y in zip(m_a, m_b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-6), (x, y)
    from alignloop.model import load_scalar_model
    wa, wb = load_scalar_model(a).state_dict(), load_scalar_model(b).state_dict()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


def test_a_second_run_reads_the_features_from_disk_and_trains_the_same(rlhf, tmp_path, capsys):
    cache = tmp_path / "cache"
    a, _, m_a = _train(rlhf, tmp_path, "first", train_layers=1, epochs=1, cache_dir=str(cache))
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"
    assert "read from" not in capsys.readouterr().out
    b, _, m_b = _train(rlhf, tmp_path, "second", train_layers=1, epochs=1, cache_dir=str(cache), early_stop=0.2)
    assert "output read from" in capsys.readouterr().out and list(cache.iterdir()) == files
    # the early-stopping share is taken after the cache: the same file serves both runs
    c, _, m_c = _train(rlhf, tmp_path, "third", train_layers=1, epochs=1, cache_dir=str(cache))
    assert [x["loss"] for x in m_c] == [x["loss"] for x in m_a]
    # another trained depth is another file
    _train(rlhf, tmp_path, "fourth", train_layers=0, epochs=1, cache_dir=str(cache))
    assert len(list(cache.iterdir())) == 2
    # and another precision another file: a bf16 pass's features are not read back by an fp32 run
    capsys.readouterr()
    _train(rlhf, tmp_path, "fifth", train_layers=1, epochs=1, cache_dir=str(cache), dtype="bfloat16")
    assert "output read from" not in capsys.readouterr().out and len(list(cache.iterdir())) == 3


def test_early_stopping_keeps_the_epoch_of_lowest_held_out_loss(rlhf, tmp_path):
    # lr 0.1 for 4 epochs on 40 rankings over-fits: the held-out loss turns up after epoch 2 (at 3e-2 it still falls)
    stage, ev, _ = _train(rlhf, tmp_path, "stop", train_layers=1, epochs=4, lr=0.1, early_stop=0.3)
    rec = ev["early_stop"]
    curve = rec["loss_per_epoch"]
    assert len(curve) == 4
    assert rec["best_epoch"] == 1 + curve.index(min(curve)) and rec["best_loss"] == min(curve)
    assert rec["best_epoch"] < 4, curve  # else this test would not tell a restored model from the last one
    # the saved model is that epoch's: its loss on the same held-out prompts is the best one, not the last
    from alignloop.model import load_scalar_model
    from alignloop.tokenizer import ChatTokenizer
    from alignloop.train.pairs import read_comparisons
    cfg = resolve(R.Config, "reward", preset="micro", presets=R.PRESETS, flags=dict(early_stop=0.3))
    groups = read_comparisons(tmp_path / "r.jsonl")
    tok = ChatTokenizer.load(stage)
    for g in groups:
        g.ids = [tok.render(g.prompt + [{"role": "assistant", "content": c}])[0] for c in g.completions]
    _, stop = R.early_stop_split(groups, cfg)
    assert 0 < len(stop) < len(groups)
    model = load_scalar_model(stage).eval()
    loss = R.held_loss(lambda seqs, fts, starts: sequence_scores(model, seqs, tok.pad_id, "cpu"), stop, None, "cpu", "float32")
    assert loss == pytest.approx(rec["best_loss"], abs=1e-4) and abs(loss - curve[-1]) > 1e-3


def test_the_cache_is_skipped_when_it_would_not_fit(rlhf, tmp_path, capsys):
    _, ev, _ = _train(rlhf, tmp_path, "small", train_layers=1, epochs=1, cache_gb=1e-9)
    assert ev["cached_blocks_below"] is None
    assert "not cached; every step runs all blocks" in capsys.readouterr().out
