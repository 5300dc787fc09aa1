"""A trained reward model as a function: (prompts, answers) → scores. PPO scores its rollouts with it,
evaluation its answers (rm_score, best-of-n), the main job every stage's test answers, headroom its picks.

A reward model may read one more input than its trunk: the log-likelihood of the answer under the model
it started from (`answer_logprob`), weighted by `likelihood_weight` in its config.json, that model kept in
its folder's `reference/`. Why: a small trunk generates the right capital of a country but its scalar head
cannot tell a right capital from a wrong one; the likelihood carries what it knows (docs/LOG.md,
2026-12-05: on held-out answers it orders known facts as gold does 0.84 of the time, the trained head 0.47)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from alignloop.forward import right_padded, sequence_scores, unwrap

REFERENCE = "reference"  # the folder, inside a reward model's, of the model whose likelihood it reads


@torch.no_grad()
def answer_logprob(lm, seqs: list[list[int]], starts: list[int], pad_id: int, device,
                   max_tokens: int = 4096) -> torch.Tensor:
    """Σ log p_lm(token) over each sequence's answer, the tokens from `starts[i]` to its end (the end-of-turn
    token included: an answer that stops well is likelier). Sequences go in length order, in chunks of at
    most `max_tokens` padded tokens, as `sequence_scores` takes them."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.zeros(len(seqs))
    i = 0
    while i < len(order):
        j = i + 1
        while j < len(order) and (j + 1 - i) * len(seqs[order[j]]) <= max_tokens:
            j += 1
        rows = order[i:j]
        ids, attn = right_padded([seqs[k] for k in rows], pad_id, device)
        logits = lm(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        lp = (logits.gather(-1, ids[:, 1:, None])[..., 0] - logits.logsumexp(-1)).cpu()
        for r, k in enumerate(rows):
            out[k] = lp[r, starts[k] - 1:len(seqs[k]) - 1].sum()
        i = j
    # −log(1 + nats): the labelers' preference saturates with the likelihood gap (a 100-nat gap says no more
    # than a 10-nat one), and a weight fitted on the raw sum is pulled to ~0 by the long answers' gaps
    return -torch.log1p(-out)


def answer_starts(tok, prompts: list[list[dict]]) -> list[int]:
    """Where each answer begins in `render(prompt + [answer])`: after the rendered prompt."""
    return [len(tok.render_prompt(p)) for p in prompts]


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
        self.likelihood_weight = float(getattr(unwrap(self.model).config, "likelihood_weight", 0.0) or 0.0)
        self.reference = None
        if self.likelihood_weight:
            from alignloop.model import load_causal_lm
            self.reference = load_causal_lm(Path(path) / REFERENCE, dtype).to(device).eval().requires_grad_(False)
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def score_texts(self, prompts: list[list[dict]], answers: list[str]) -> list[float]:
        seqs = [self.tok.render(p + [{"role": "assistant", "content": a or " "}])[0] for p, a in zip(prompts, answers)]
        return self.score_ids(seqs, answer_starts(self.tok, prompts) if self.reference is not None else None)

    @torch.no_grad()
    def score_ids(self, seqs: list[list[int]], starts: list[int] | None = None) -> list[float]:
        """Scores of whole sequences, each from `render` or `ChatTokenizer.scored_ids` (same ids); `starts`:
        where each answer begins, needed by a reward model that reads the answer's likelihood."""
        out = []
        was_training = self.model.training
        self.model.eval()
        with self.context():
            for s in range(0, len(seqs), self.batch_size):
                out += (sequence_scores(self.model, seqs[s:s + self.batch_size], self.tok.pad_id, self.device)
                        + self.bias).tolist()
        self.model.train(was_training)
        if self.reference is not None:
            if starts is None:
                raise ValueError("this reward model reads the answer's likelihood: score_ids needs `starts`")
            lp = answer_logprob(self.reference, seqs, starts, self.tok.pad_id, self.device)
            out = [o + self.likelihood_weight * v for o, v in zip(out, lp.tolist())]
        return out
