"""Pretraining: loss falls, resume equals uninterrupted, accumulation invariance, HF loading."""
from __future__ import annotations

import json

import pytest
import torch

from alignloop.config import resolve
from alignloop.train import pretrain as P
from tests.conftest import alignloop, run_interrupted


def _losses(stage_dir):
    return [json.loads(line)["loss"] for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def _cfg(**kw):
    return resolve(P.Config, "pretrain", preset="micro", presets=P.PRESETS, flags=kw)


def test_loss_falls_on_micro(micro_run):
    losses = _losses(micro_run / "pretrain")
    assert len(losses) == P.PRESETS["micro"]["max_steps"]
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5


def test_output_loads_with_transformers(micro_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(str(micro_run / "pretrain"))
    tok = AutoTokenizer.from_pretrained(str(micro_run / "pretrain"))
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    assert model(input_ids=ids).logits.shape[-1] >= len(tok)


def test_resume_matches_uninterrupted_step_for_step(micro_copy, tmp_path):
    full = tmp_path / "full"
    import shutil
    shutil.copytree(micro_copy, full)
    shutil.rmtree(full / "pretrain")
    shutil.rmtree(micro_copy / "pretrain")
    P.run(_cfg(max_steps=12, checkpoint_every=4, eval_every=100), full)
    # "interrupted" run: stop at step 8 (a checkpoint), then resume to 12 with the same schedule
    part = _cfg(max_steps=12, checkpoint_every=4, eval_every=100)
    _run_until(part, micro_copy, stop_after=8)
    P.run(_cfg(max_steps=12, checkpoint_every=4, eval_every=100, resume=True), micro_copy)
    a, b = _losses(full / "pretrain"), _losses(micro_copy / "pretrain")
    assert len(a) == len(b) == 12
    assert a == pytest.approx(b, abs=1e-6)
    wa = torch.load(full / "pretrain" / "checkpoints" / "step-000012.pt", weights_only=False)["model"]
    wb = torch.load(micro_copy / "pretrain" / "checkpoints" / "step-000012.pt", weights_only=False)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0)


def _run_until(cfg, out, stop_after):
    run_interrupted(P.run, cfg, out, stop_after, out / "pretrain" / "config.json")


def test_accumulation_1x8_equals_8x1(micro_copy, tmp_path):
    import shutil
    other = tmp_path / "other"
    shutil.copytree(micro_copy, other)
    P.run(_cfg(max_steps=3, batch_size=8, grad_accum=1, eval_every=100, grad_clip=0.0), micro_copy)
    P.run(_cfg(max_steps=3, batch_size=1, grad_accum=8, eval_every=100, grad_clip=0.0), other)
    assert _losses(micro_copy / "pretrain") == pytest.approx(_losses(other / "pretrain"), rel=1e-4)


def test_real_text_reports_bits_per_character(micro_run, tmp_path):
    from tests.conftest import need_shared
    text = need_shared("tinyshakespeare.txt")
    small = tmp_path / "shakespeare.txt"
    small.write_text(text.read_text()[:60_000])
    run = tmp_path / "run"
    alignloop("tokenizer", "--preset", "micro", "--out", run, "--data", small, "--vocab-size", 512)
    proc = alignloop("pretrain", "--preset", "micro", "--out", run, "--data", small, "--val-fraction", 0.1)
    assert "bits/char" in proc.stdout
    last = json.loads((run / "pretrain" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 < last["val_bpc"] < 8
