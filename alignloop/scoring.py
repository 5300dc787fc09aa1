"""A trained reward model as a function: (prompts, answers) → scores. PPO scores its rollouts with it,
evaluation its answers (rm_score, best-of-n), the main job every stage's test answers, headroom its picks."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from alignloop.forward import sequence_scores, unwrap


class RewardScorer:
    """A trained reward model as a function: (prompts, answers) → normalised scores. Frozen, so it is
    kept in bf16 on a GPU (fp32 on the CPU, where bf16 matmuls are slow) unless `dtype` says otherwise.
    `model` + `context`: score with a model already in memory (PPO's value model with its LoRA adapters
    disabled IS the reward model: one copy of the weights)."""

    def __init__(self, path: Path, device, batch_size: int = 64, dtype=None, model=None, context=None):
        from alignloop.model import load_scalar_model
        from alignloop.tokenizer import ChatTokenizer
        device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if model is None:
            model = load_scalar_model(path, dtype=dtype, trained=True).to(device).eval().requires_grad_(False)
        self.model = model
        self.context = context or contextlib.nullcontext
        self.tok = ChatTokenizer.load(path)
        self.bias = float(getattr(unwrap(self.model).config, "reward_bias", 0.0))
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def score_texts(self, prompts: list[list[dict]], answers: list[str]) -> list[float]:
        seqs = [self.tok.render(p + [{"role": "assistant", "content": a or " "}])[0] for p, a in zip(prompts, answers)]
        return self.score_ids(seqs, [len(self.tok.render_prompt(p)) for p in prompts])

    @torch.no_grad()
    def score_ids(self, seqs: list[list[int]], starts: list[int] | None = None) -> list[float]:
        """Scores of whole sequences, each from `render` or `ChatTokenizer.scored_ids` (same ids); `starts`:
        where each answer begins (the prompt's length), which a likelihood-gated reward model needs."""
        out = []
        was_training = self.model.training
        self.model.eval()
        with self.context():
            for s in range(0, len(seqs), self.batch_size):
                part = None if starts is None else starts[s:s + self.batch_size]
                out += (sequence_scores(self.model, seqs[s:s + self.batch_size], self.tok.pad_id, self.device,
                                        starts=part) + self.bias).tolist()
        self.model.train(was_training)
        return out
