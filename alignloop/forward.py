"""Padded batches and the forward passes that PPO, the reward model and evaluation share, written once.

- `right_padded` / `layout`: the two batch shapes (whole sequences; prompt LEFT-padded + response
  RIGHT-padded so that every response starts at one column).
- `allowed_tokens`: the one vocabulary mask. The engine samples only from it (padded embedding rows
  beyond the tokenizer and <|pad|> are never sampled), so every log-prob and KL is taken over it too.
- `token_logprobs`: log π(token) through the LM head in chunks of positions, each under activation
  checkpointing, so the full (B, T, V) fp32 log-softmax never exists with its graph (at a 49k–151k
  vocabulary it is the largest tensor of a PPO step).
- `scalar_values` / `sequence_scores`: a scalar-head model (reward or value) at every position / at the
  last token of each sequence. Where a reward is read is decided by `ChatTokenizer.scored_ids`. A reward
  model with a likelihood gate (`reward --likelihood-gate`) adds, over its answer's tokens, a learned
  gate times the log-probability its own LM head gives each token (`last_scores`).
- `blocks` / `bottom_features` / `top_values`: the decoder's frozen bottom blocks and trained top ones
  run apart, so the bottom's output is computed once and reused.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def unwrap(model):
    """The `transformers` model under a `peft` wrapper (its LoRA layers stay in place and active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class Through(torch.nn.Module):
    """Runs `fn(model, …)` as its own forward pass. DDP and FSDP2 act when the forward of the module they
    wrap runs, and the functions below reach into the trunk and the head directly, which would go around
    them; so under torchrun a training stage wraps `Through(model)` (alignloop/dist.py) and each function
    given such a wrapper calls itself through it (`_wrapped`)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def _wrapped(model) -> bool:
    """DDP or FSDP2 around `Through`: not a `transformers` model (those have a base_model_prefix)."""
    return not hasattr(unwrap(model), "base_model_prefix")


def right_padded(seqs: list[list[int]], pad_id: int, device):
    """(ids, attention) of whole sequences, right-padded: (B, T) each."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], attn[i, :len(s)] = torch.tensor(s, dtype=torch.long), 1
    return ids.to(device), attn.to(device)


def layout(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device):
    """Prompts LEFT-padded to P, responses RIGHT-padded to R: every response starts at column P, so the
    action slice is the same for the whole batch. Returns ids, attention, positions (B, P+R), the
    response mask (B, R) and P."""
    B, P, R = len(prompts), max(map(len, prompts)), max(1, max(map(len, responses)))
    ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + R), dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        ids[b, P - len(p):P], attn[b, P - len(p):P] = torch.tensor(p), 1
        if r:
            ids[b, P:P + len(r)], attn[b, P:P + len(r)] = torch.tensor(r), 1
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    return ids.to(device), attn.to(device), pos.to(device), attn[:, P:].to(device), P


def allowed_tokens(tok, n_rows: int, device=None) -> torch.Tensor:
    """(V,) bool: the ids the engine may sample — the tokenizer's, less <|pad|> unless it also stops,
    and, in alignloop's own format, less <|bos|> and the role tokens: an answer's content is encoded
    with special-token strings as text, so no trained answer holds them, and a base model that emits
    one would write a turn header into its answer."""
    ok = torch.zeros(n_rows, dtype=torch.bool, device=device)
    ok[: min(n_rows, tok.vocab_size)] = True
    banned = [tok.pad_id] + ([tok.bos_id, *tok.role_ids.values()] if tok.native else [])
    for i in banned:
        if i is not None and i not in tok.stop_ids and i < n_rows:
            ok[i] = False
    return ok


def _head_logprobs(h, weight, bias, targets, allowed, temperature: float, entropy: bool):
    z = F.linear(h, weight, bias).float() / temperature
    if allowed is not None:
        z = z.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(z, -1)
    lp = z.gather(-1, targets[:, None]).squeeze(-1) - lse
    if allowed is not None:  # padding positions hold <|pad|>: 0 there (masked out later), not −inf
        lp = torch.where(allowed[targets], lp, torch.zeros_like(lp))
    if not entropy:  # a softmax over the whole vocabulary saved (the reference and old log-probs need none)
        return lp, torch.zeros_like(lp)
    with torch.no_grad():  # entropy is logged, never trained on
        p = torch.softmax(z, -1)
        ent = lse - (p * z.nan_to_num(0.0, 0.0, 0.0)).sum(-1)
    return lp, ent


def token_logprobs(hidden, head, targets, allowed=None, temperature: float = 1.0, chunk: int = 256,
                   entropy: bool = False):
    """log softmax(head(hidden) / τ)[targets] over the allowed vocabulary: hidden (..., d), targets (...)
    → (log-probs, entropies — zeros unless `entropy`), each shaped like targets. Chunks of positions go through the head one at a
    time; with gradients each chunk is checkpointed (its logits are recomputed in backward)."""
    shape = targets.shape
    h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    lps, ents = [], []
    for s in range(0, len(t), chunk):
        args = (h[s:s + chunk], head.weight, head.bias, t[s:s + chunk], allowed, temperature, entropy)
        if torch.is_grad_enabled() and h.requires_grad:
            lp, ent = checkpoint(_head_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = _head_logprobs(*args)
        lps.append(lp)
        ents.append(ent)
    return torch.cat(lps).view(shape), torch.cat(ents).view(shape)


def causal_hidden(model, ids, attn, pos=None):
    """The decoder's last hidden states (before the LM head) and the head itself."""
    if _wrapped(model):
        return model(causal_hidden, ids, attn, pos)
    m = unwrap(model)
    trunk = getattr(m, m.base_model_prefix)
    out = trunk(input_ids=ids, attention_mask=attn, position_ids=pos)
    return out.last_hidden_state, m.get_output_embeddings()


def action_logprobs(model, ids, attn, pos, P: int, allowed=None, temperature: float = 1.0, with_entropy=False):
    """log π(response token t | state t) for t = 0..R−1 of a `layout` batch: (B, R) [, entropy (B, R)]."""
    if _wrapped(model):
        return model(action_logprobs, ids, attn, pos, P, allowed, temperature, with_entropy)
    hidden, head = causal_hidden(model, ids, attn, pos)
    lp, ent = token_logprobs(hidden[:, P - 1:-1], head, ids[:, P:], allowed, temperature, entropy=with_entropy)
    return (lp, ent) if with_entropy else lp


def scalar_values(model, ids, attn, pos=None) -> torch.Tensor:
    """(B, T) per-token outputs of a scalar-head (sequence-classification) model."""
    if _wrapped(model):
        return model(scalar_values, ids, attn, pos)
    m = unwrap(model)
    trunk = getattr(m, m.base_model_prefix)
    hidden = trunk(input_ids=ids, attention_mask=attn, position_ids=pos).last_hidden_state
    return m.score(hidden)[..., 0].float()  # (a gated reward model's second output is its gate: not a value)


def is_gated(model) -> bool:
    """A reward model whose head has a second output, the likelihood gate (`reward --likelihood-gate`)."""
    return bool(getattr(getattr(unwrap(model), "config", None), "likelihood_gate", False))


def tied_lm_head(trunk):
    """The LM head of a model with tied embeddings, as `token_logprobs` takes it: the input embeddings."""
    class Head:
        weight, bias = trunk.get_input_embeddings().weight, None
    return Head


def last_scores(model, ids, attn, starts=None) -> torch.Tensor:
    """(B,) a right-padded batch's score: the scalar head at each row's last token. A likelihood-gated reward
    model adds Σ_t g_t · log p(x_t | x_<t) over the answer's tokens (from `starts[b]`, the first answer token,
    to the last): log p from the model's own LM head (the tied embeddings; it starts as the SFT model's) and
    g_t the head's second output at the position that predicts x_t. A scalar read at one token cannot
    check a fact named mid-answer, but the trunk knows which value it expected there (on the tiny world,
    the SFT model's likelihood orders answers to known facts as gold does 0.84 of the time, the scalar
    head 0.47: docs/LOG.md); the gate learns from the rankings where that likelihood counts (facts) and where
    it does not (arithmetic the model gets wrong)."""
    if _wrapped(model):
        return model(last_scores, ids, attn, starts)
    m = unwrap(model)
    trunk = getattr(m, m.base_model_prefix)
    hidden = trunk(input_ids=ids, attention_mask=attn).last_hidden_state
    out = m.score(hidden).float()
    last = attn.sum(1) - 1
    score = out[..., 0].gather(1, last[:, None]).squeeze(1)
    if out.shape[-1] == 1:
        return score
    return score + gated_likelihood(trunk, hidden, out[..., 1], ids, last, starts)


def gated_likelihood(trunk, hidden, gate, ids, last, starts) -> torch.Tensor:
    """(B,) Σ_t g_t · log p(x_t | x_<t) over each row's answer tokens (from `starts[b]` to `last[b]`): the
    likelihood-gated part of `last_scores`, from the trunk's last hidden states (B, T, d) and the head's gate
    output (B, T). Shared by the whole forward pass and the frozen-trunk cache (`trunk_cache.cached_scores`)."""
    if starts is None:
        raise ValueError("a likelihood-gated reward model needs where each answer starts (starts=)")
    t = torch.arange(1, ids.shape[1], device=ids.device)[None]
    first = torch.as_tensor(starts, device=ids.device)[:, None]
    answer = (t >= first) & (t <= last[:, None])  # (B, T − 1): token t, predicted at position t − 1
    lp, _ = token_logprobs(hidden[:, :-1][answer], tied_lm_head(trunk), ids[:, 1:][answer])
    gated = torch.zeros(answer.shape, dtype=lp.dtype, device=ids.device)
    gated[answer] = gate[:, :-1][answer].to(lp.dtype) * lp
    return gated.sum(1)


@contextmanager
def blocks(model, part: slice, norm: bool):
    """For the duration: the model's decoder has only `part` of its blocks, and its final norm only if
    `norm`. The `transformers` decoders (Llama, Qwen2, Mistral…) loop over `self.layers` and take
    `inputs_embeds` in place of their embedding lookup, so the bottom blocks run alone on token ids and
    the top blocks alone on the bottom's output, with the same rotary positions and causal mask: the
    frozen bottom of a model that trains only its top (reward --train-layers, ppo --value-lora-layers)
    runs once per sequence instead of once per step."""
    m = unwrap(model)
    trunk = getattr(m, m.base_model_prefix)
    layers, final = trunk.layers, trunk.norm
    trunk.layers = torch.nn.ModuleList(list(layers)[part])
    if not norm:
        trunk.norm = torch.nn.Identity()
    try:
        yield trunk
    finally:
        trunk.layers, trunk.norm = layers, final


def n_blocks(model) -> int:
    m = unwrap(model)
    return len(getattr(m, m.base_model_prefix).layers)


def bottom_features(model, ids, attn, pos, n_top: int) -> torch.Tensor:
    """(B, T, hidden) after all but the top `n_top` blocks (no final norm): what the top blocks read."""
    if _wrapped(model):
        return model(bottom_features, ids, attn, pos, n_top)
    with blocks(model, slice(0, n_blocks(model) - n_top), norm=False) as trunk:
        return trunk(input_ids=ids, attention_mask=attn, position_ids=pos).last_hidden_state


def top_values(model, feats, attn, pos, n_top: int) -> torch.Tensor:
    """`scalar_values` from `bottom_features`: the top `n_top` blocks, the final norm and the head (B, T)."""
    if _wrapped(model):
        return model(top_values, feats, attn, pos, n_top)
    m = unwrap(model)
    with blocks(model, slice(n_blocks(model) - n_top, None), norm=True) as trunk:
        hidden = trunk(inputs_embeds=feats, attention_mask=attn, position_ids=pos).last_hidden_state
    return m.score(hidden)[..., 0].float()


def state_values(value_model, ids, attn, pos, P: int) -> torch.Tensor:
    """V(state t) for t = 0..R−1 of a `layout` batch: the head at the position that predicts token t."""
    return scalar_values(value_model, ids, attn, pos)[:, P - 1:-1]


def sequence_scores(model, seqs: list[list[int]], pad_id: int, device, max_tokens: int = 4096,
                    starts: list[int] | None = None) -> torch.Tensor:
    """Each sequence's score (B,): the scalar head at its last token (`last_scores`; a likelihood-gated
    reward model also reads the answer from `starts[i]`, its first token). The sequences come from `render`
    (training) or `ChatTokenizer.scored_ids` (PPO), which agree, so the score is read at the same place.
    Sequences go through in length order, in chunks of at most `max_tokens` padded tokens: real
    conversations differ in length by 10×, and padding all of them to the longest is mostly waste."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    parts, i = [], 0
    while i < len(order):
        j = i + 1
        while j < len(order) and (j + 1 - i) * len(seqs[order[j]]) <= max_tokens:
            j += 1
        ids, attn = right_padded([seqs[k] for k in order[i:j]], pad_id, device)
        parts.append(last_scores(model, ids, attn, None if starts is None else [starts[k] for k in order[i:j]]))
        i = j
    scores = torch.cat(parts)
    return scores[torch.argsort(torch.tensor(order, device=scores.device))]
