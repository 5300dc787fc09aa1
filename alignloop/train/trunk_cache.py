"""The frozen part of a reward model's trunk, run once.

With `--train-layers N` only the top N decoder blocks, the final norm and the head learn; the blocks
below never change, so their output for a given sequence is the same in every step of every epoch.
On a CPU the forward pass through them is most of a step (SmolLM2-135M, top 4 of 30 blocks trained:
26 blocks forward against 4 blocks forward and backward), so the reward stage computes it once per
sequence, keeps it in memory (tokens × hidden size × 4 bytes), and each step then runs only the top
blocks on it — the same rewards and gradients as the whole forward pass (tests/test_trunk_cache.py),
several times fewer FLOPs an epoch.

How the top blocks run alone: the `transformers` decoder (Llama, Qwen2, Mistral…) takes
`inputs_embeds` in place of its embedding lookup and loops over `self.layers`; giving it the cached
features as `inputs_embeds` and, for the call, only the top blocks as `layers` runs exactly those
blocks, with the same rotary positions and causal mask. The bottom part likewise runs with only the
bottom blocks and no final norm.

`cache_dir`: the features are also written to disk, named by a hash of the bottom blocks' weights and
the sequences, so the next run on the same model and data (another learning rate, seed or number of
epochs) reads them back instead of paying the pass again; a different model or data gives another name.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from alignloop.forward import blocks, gated_likelihood, right_padded, unwrap


def _trunk(model):
    m = unwrap(model)
    return m, getattr(m, m.base_model_prefix)


def _chunks(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices in length order, grouped so that a group padded to its longest holds ≤ max_tokens tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out, i = [], 0
    while i < len(order):
        j = i + 1
        while j < len(order) and (j + 1 - i) * lengths[order[j]] <= max_tokens:
            j += 1
        out.append(order[i:j])
        i = j
    return out


def bytes_needed(model, seqs: list[list[int]]) -> int:
    """Memory the cache of these sequences takes (fp32)."""
    return sum(map(len, seqs)) * unwrap(model).config.hidden_size * 4


@torch.no_grad()
def frozen_features(model, seqs: list[list[int]], n_top: int, pad_id: int, device,
                    max_tokens: int = 4096, progress=None) -> list[torch.Tensor]:
    """Each sequence's hidden states (len, hidden) after the bottom blocks (all but the top `n_top`), kept
    on the CPU. `progress(n)`: called with the number of sequences done after each chunk."""
    _, trunk = _trunk(model)
    feats: list[torch.Tensor | None] = [None] * len(seqs)
    with blocks(model, slice(0, len(trunk.layers) - n_top), norm=False):
        for idx in _chunks([len(s) for s in seqs], max_tokens):
            ids, attn = right_padded([seqs[k] for k in idx], pad_id, device)
            hidden = trunk(input_ids=ids, attention_mask=attn).last_hidden_state.float().cpu()
            for row, k in enumerate(idx):
                feats[k] = hidden[row, :len(seqs[k])].clone()
            if progress:
                progress(len(idx))
    return feats


def cached_scores(model, feats: list[torch.Tensor], n_top: int, device, max_tokens: int = 4096,
                  seqs: list[list[int]] | None = None, starts: list[int] | None = None) -> torch.Tensor:
    """The reward of each sequence from its cached features (B,): the top `n_top` blocks, the final norm
    and the scalar head at the last token — `forward.sequence_scores` with the bottom blocks skipped. A
    likelihood-gated model also needs the token ids (`seqs`) and where each answer starts (`starts`): its
    LM head is the tied input embedding, frozen below the top blocks, so the cache stays valid for it."""
    m, trunk = _trunk(model)
    gated = m.score.out_features > 1
    if gated and (seqs is None or starts is None):
        raise ValueError("a likelihood-gated reward model's cached scores need the token ids and answer starts")
    parts, order = [], []
    with blocks(model, slice(len(trunk.layers) - n_top, None), norm=True):
        for idx in _chunks([len(f) for f in feats], max_tokens):
            T = max(len(feats[k]) for k in idx)
            x = torch.zeros(len(idx), T, feats[idx[0]].shape[1])
            attn = torch.zeros(len(idx), T, dtype=torch.long)
            for row, k in enumerate(idx):
                x[row, :len(feats[k])], attn[row, :len(feats[k])] = feats[k], 1
            x, attn = x.to(device), attn.to(device)
            hidden = trunk(inputs_embeds=x.to(m.score.weight.dtype), attention_mask=attn).last_hidden_state
            out = m.score(hidden).float()
            last = attn.sum(1) - 1
            score = out[..., 0].gather(1, last[:, None]).squeeze(1)
            if gated:
                ids = torch.zeros(len(idx), T, dtype=torch.long, device=device)
                for row, k in enumerate(idx):
                    ids[row, :len(seqs[k])] = torch.tensor(seqs[k], device=device)
                score = score + gated_likelihood(trunk, hidden, out[..., 1], ids, last, [starts[k] for k in idx])
            parts.append(score)
            order += idx
    scores = torch.cat(parts)
    return scores[torch.argsort(torch.tensor(order, device=scores.device))]


def cache_key(model, seqs: list[list[int]], n_top: int, amp: torch.dtype | None = None) -> str:
    """SHA-256 of what the features depend on: the embedding and bottom blocks' weights, the token ids and
    the autocast precision they were computed in (`precision.amp_dtype`; None: fp32) — features from a bf16
    pass are not an fp32 run's."""
    m, trunk = _trunk(model)
    # (fp32 keeps the key it had before the precision was part of it: caches already on disk stay valid)
    h = hashlib.sha256(f"{type(m).__name__}/{len(trunk.layers) - n_top}{'' if amp is None else '/' + str(amp)}".encode())
    frozen = [trunk.embed_tokens] + list(trunk.layers)[:len(trunk.layers) - n_top]
    for module in frozen:
        for name, t in module.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    for s in seqs:
        h.update(len(s).to_bytes(4, "little"))
        h.update(torch.tensor(s, dtype=torch.int32).numpy().tobytes())
    return h.hexdigest()[:32]


def load_features(cache_dir: Path, key: str) -> list[torch.Tensor] | None:
    path = Path(cache_dir) / f"{key}.pt"
    if not path.exists():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return list(torch.split(saved["features"], saved["lengths"].tolist()))


def save_features(cache_dir: Path, key: str, feats: list[torch.Tensor]) -> Path:
    """One file (all tokens' features concatenated, and each sequence's length), written whole or not at all."""
    path = Path(cache_dir) / f"{key}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    torch.save({"features": torch.cat(feats), "lengths": torch.tensor([len(f) for f in feats])}, tmp)
    os.replace(tmp, path)
    return path
