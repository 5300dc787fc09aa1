"""The one generator. Evaluation, PPO rollouts, the labeling app and the chat server all call it.

Batched sampling with a KV cache: greedy, temperature, top-k, top-p; stops on end-of-turn or on stop
strings; returns text, token ids and per-token log-probs under the sampling distribution.

Prompts of different lengths share a batch by LEFT padding: row b's tokens sit at the right end of the
prompt block, its pad slots are masked out as keys, and its rotary positions start at 0 at its first
real token — so a prompt's result does not depend on its batch-mates.

Two paths, one interface:
- fast path (Llama, Mistral, Qwen2/3 — the architectures alignloop creates and most open models):
  our own forward over the model's own modules with a preallocated static KV cache (no per-step
  concatenation, fixed shapes, one mask per step). `transformers`' `generate` re-creates masks,
  processors and cache bookkeeping every step; for small models that overhead IS the cost.
- any other causal LM: its own forward with a `DynamicCache`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

FAST_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


@dataclass
class Completion:
    text: str                      # decoded answer, stop token / stop string excluded
    ids: list[int]                 # sampled ids, the end-of-turn token included when it was sampled
    logprobs: list[float]          # log-prob of each sampled id under the sampling distribution
    finish_reason: str             # "stop" (end token or stop string) or "length"
    prompt_tokens: int = 0
    extra: dict = field(default_factory=dict)


class Engine:
    def __init__(self, model, tok, device=None, max_batch: int = 64):
        self.model, self.tok = model, tok
        self.device = device or next(model.parameters()).device
        self.max_batch = max_batch
        cfg = model.config
        self.ctx = getattr(cfg, "max_position_embeddings", 2048)
        self.fast = cfg.model_type in FAST_TYPES and hasattr(model, "model") and hasattr(model.model, "layers")
        # padded embedding rows beyond the tokenizer, and <|pad|>, are never sampled (the one vocabulary
        # mask: PPO's and evaluation's log-probs use the same)
        from alignloop.forward import allowed_tokens
        self.allowed = allowed_tokens(tok, model.get_output_embeddings().weight.shape[0])

    # ------------------------------------------------------------------ public

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens=64, temperature=1.0, top_p=1.0, top_k=0,
                 stop=None, seed=None, on_token=None) -> list[Completion]:
        """Sample one completion per prompt (pass a prompt n times for n samples).

        Every sampling parameter is either one value for all prompts or a list with one per prompt, so
        one batch can serve requests with different settings. temperature 0 is greedy. Row i samples
        from its own generator seeded by (seed, i): its tokens do not depend on its batch-mates.
        `on_token(i, new_text)` streams text as it is produced; returning False cancels row i
        (finish_reason "cancelled")."""
        if not prompts:
            return []
        n = len(prompts)

        def per(v):
            return list(v) if isinstance(v, (list, tuple)) and len(v) == n else [v] * n
        stops = stop if isinstance(stop, (list, tuple)) and len(stop) == n and all(
            s is None or isinstance(s, (list, tuple)) for s in stop) and n > 0 and any(
            isinstance(s, (list, tuple)) for s in stop) else [stop] * n
        params = [Params(*x) for x in zip(per(max_new_tokens), per(temperature), per(top_p), per(top_k),
                                          stops, per(seed))]
        for p in prompts:
            if not p:
                raise ValueError("empty prompt")
            if len(p) >= self.ctx:
                raise ValueError(f"prompt of {len(p)} tokens does not fit the context of {self.ctx}")
        # One seed for the call: row i draws from (seed, i). A list of seeds: row i draws from its own seed
        # exactly, so a request's tokens do not depend on where a server placed it in the batch.
        base_seed = int.from_bytes(os.urandom(5), "little") if any(p.seed is None for p in params) else 0
        own = isinstance(seed, (list, tuple))
        for i, p in enumerate(params):
            if own and p.seed is not None:
                s = p.seed
            else:
                s = row_seed(p.seed if p.seed is not None else base_seed, i)
            p.gen = torch.Generator().manual_seed(s)
        order = sorted(range(n), key=lambda i: len(prompts[i]))  # less padding per batch
        results: list[Completion | None] = [None] * n
        was_training = self.model.training
        self.model.eval()
        try:
            for s in range(0, n, self.max_batch):
                idx = order[s: s + self.max_batch]
                cb = on_token and (lambda r, t, idx=idx: on_token(idx[r], t))
                outs = self._generate_batch([prompts[i] for i in idx], [params[i] for i in idx], cb)
                for i, o in zip(idx, outs):
                    results[i] = o
        finally:
            self.model.train(was_training)
        return results

    def chat(self, messages: list[dict], **kw) -> Completion:
        return self.generate([self.tok.render_prompt(messages)], **kw)[0]

    # ------------------------------------------------------------------ one batch

    def _generate_batch(self, prompts, params, on_token):
        B, P = len(prompts), max(len(p) for p in prompts)
        # Each row may use the context left after ITS prompt: positions restart at 0 per row, so the cache
        # may hold more slots than the context (a short prompt beside a long one keeps its full answer).
        limits = [max(0, min(p.max_new_tokens, self.ctx - len(x))) for p, x in zip(params, prompts)]
        max_new = max(limits)
        T = P + max_new
        dev = self.device
        pad = torch.tensor([P - len(p) for p in prompts], device=dev)                      # (B,)
        ids = torch.full((B, P), self.tok.pad_id, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, P - len(p):] = torch.tensor(p)
        ids = ids.to(dev)
        slots = torch.arange(T, device=dev)
        key_ok = slots[None, :] >= pad[:, None]                                              # (B, T)
        state = self._start(B, T)
        # Prefill: causal over the prompt block, pad keys masked; a pad query sees itself (no empty row).
        causal = slots[:P, None] >= slots[None, :P]
        mask = (causal[None] & key_ok[:, None, :P]) | torch.eye(P, dtype=torch.bool, device=dev)[None]
        pos = (slots[None, :P] - pad[:, None]).clamp(min=0)
        logits = self._forward(state, ids, pos, 0, mask)                                     # (B, V)
        out_ids = [[] for _ in range(B)]
        out_lp = [[] for _ in range(B)]
        finish = ["length"] * B
        texts = [""] * B  # what was streamed so far
        stops = [_stops(p.stop) for p in params]
        reach = [max(map(len, x), default=0) for x in stops]  # a stop string completes within this of the new text
        detok = [Detokenizer(self.tok) for _ in range(B)] if any(stops) or on_token else None
        cut_text: list[str | None] = [None] * B  # the answer up to a stop string (its last token may run past it)
        alive = [limits[b] > 0 for b in range(B)]
        stop_ids = set(self.tok.stop_ids)
        sampler = _Sampler(params, self.allowed)
        for t in range(max_new):
            nxt, lp = sampler(logits)
            nxt_l, lp_l = nxt.tolist(), lp.tolist()
            for b in range(B):
                if not alive[b]:
                    continue
                out_ids[b].append(nxt_l[b])
                out_lp[b].append(lp_l[b])
                if nxt_l[b] in stop_ids:
                    alive[b], finish[b] = False, "stop"
                elif detok is not None and (piece := detok[b].push(nxt_l[b])):  # "" while a character is incomplete
                    # Decode only the new token's window (linear in the answer's length, not quadratic); a
                    # stop string can only have completed within reach of the new piece.
                    new_text = detok[b].text
                    cut = _find_stop(new_text, stops[b], start=max(0, len(new_text) - len(piece) - reach[b] + 1))
                    if cut is not None:
                        alive[b], finish[b] = False, "stop"
                        new_text = cut_text[b] = new_text[:cut]
                        out_ids[b], out_lp[b] = _trim_to_text(self.tok, out_ids[b], out_lp[b], new_text)
                    if on_token and new_text != texts[b]:
                        if on_token(b, new_text[len(texts[b]):]) is False:
                            alive[b], finish[b] = False, "cancelled"
                        texts[b] = new_text
                if alive[b] and len(out_ids[b]) >= limits[b]:
                    alive[b] = False
            if not any(alive) or t == max_new - 1:
                break
            step_ids = nxt.view(B, 1).to(dev)
            cur = P + t
            mask = (key_ok[:, None, :cur + 1] & (slots[None, None, :cur + 1] <= cur))
            pos = (cur - pad).clamp(min=0).view(B, 1)
            logits = self._forward(state, step_ids, pos, cur, mask)
        outs = []
        for b in range(B):
            text = self.tok.decode([i for i in out_ids[b] if i not in stop_ids])
            cut = _find_stop(text, stops[b])
            text = cut_text[b] if cut_text[b] is not None else text if cut is None else text[:cut]
            if on_token and finish[b] != "cancelled" and text.startswith(texts[b]) and len(text) > len(texts[b]):
                on_token(b, text[len(texts[b]):])  # flush what was held back
            outs.append(Completion(text=text, ids=out_ids[b], logprobs=out_lp[b], finish_reason=finish[b],
                                   prompt_tokens=len(prompts[b])))
        return outs

    # ------------------------------------------------------------------ model paths

    def _start(self, B, T):
        cfg = self.model.config
        if not self.fast:
            from transformers import DynamicCache
            return {"cache": DynamicCache(config=cfg)}
        n_kv = cfg.num_key_value_heads or cfg.num_attention_heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dtype = next(self.model.parameters()).dtype
        shape = (cfg.num_hidden_layers, B, n_kv, T, hd)
        m = self.model.model
        # Rotary table for every position once (the model's own rotary module: scaling types included).
        x0 = torch.zeros(1, 1, dtype=dtype, device=self.device)
        cos, sin = m.rotary_emb(x0, torch.arange(T, device=self.device)[None])
        return {"k": torch.zeros(shape, dtype=dtype, device=self.device),
                "v": torch.zeros(shape, dtype=dtype, device=self.device),
                "cos": cos[0], "sin": sin[0], "layers": self._fused_layers(), "hd": hd, "n_kv": n_kv}

    def _fused_layers(self) -> list[dict]:
        """q/k/v and gate/up weights concatenated: 2 matmuls where the model does 5. Built once per version
        of the weights: PPO's optimizer updates the policy in place between calls, which bumps every updated
        tensor's version counter (LoRA adapters included), so the key below changes exactly then; a LoRA
        layer's adapters switched off or merged (the reference policy) change it too."""
        key = (tuple((id(q), q._version) for q in self.model.parameters()),
               tuple((m.disable_adapters, m.merged, tuple(m.active_adapters)) for m in self.model.modules()
                     if hasattr(m, "base_layer") and hasattr(m, "get_delta_weight")))
        if getattr(self, "_fused_key", None) == key:
            return self._fused
        self._fused_key, self._fused = key, self._build_fused_layers()
        return self._fused

    def _build_fused_layers(self) -> list[dict]:
        out = []
        for layer in self.model.model.layers:
            a, mlp = layer.self_attn, layer.mlp
            cat = lambda mods, attr: (torch.cat([_effective(x, attr) for x in mods])
                                      if _effective(mods[0], attr) is not None else None)
            qkv, gu = (a.q_proj, a.k_proj, a.v_proj), (mlp.gate_proj, mlp.up_proj)
            out.append({"qkv_w": cat(qkv, "weight"), "qkv_b": cat(qkv, "bias"), "gu_w": cat(gu, "weight"),
                        "gu_b": cat(gu, "bias"), "n_q": a.q_proj.weight.shape[0], "n_k": a.k_proj.weight.shape[0],
                        "n_ff": mlp.gate_proj.weight.shape[0]})
        return out

    def _forward(self, state, ids, pos, start, mask):
        """Run tokens `ids` (B, t) at cache slots [start, start+t); return the last position's logits."""
        if not self.fast:
            return self._forward_hf(state, ids, pos, start, mask)
        m = self.model.model
        B, t = ids.shape
        hd, n_kv = state["hd"], state["n_kv"]
        x = m.embed_tokens(ids)
        cos, sin = state["cos"][pos], state["sin"][pos]                                   # (B, t, hd)
        n_slots = mask.shape[-1]
        for i, layer in enumerate(m.layers):
            a, w = layer.self_attn, state["layers"][i]
            h = layer.input_layernorm(x)
            qkv = F.linear(h, w["qkv_w"], w["qkv_b"])
            q, k, v = qkv.split([w["n_q"], w["n_k"], w["n_k"]], dim=-1)
            q = q.view(B, t, -1, hd).transpose(1, 2)
            k = k.view(B, t, -1, hd).transpose(1, 2)
            v = v.view(B, t, -1, hd).transpose(1, 2)
            if hasattr(a, "q_norm"):  # Qwen3 normalises q and k per head
                q, k = a.q_norm(q), a.k_norm(k)
            q, k = _rope(q, k, cos, sin)
            state["k"][i][:, :, start:start + t] = k
            state["v"][i][:, :, start:start + t] = v
            K, V = state["k"][i][:, :, :n_slots], state["v"][i][:, :, :n_slots]
            if t == 1:  # one query per row: two small matmuls beat SDPA's masked path on the CPU
                g = q.shape[1] // n_kv                                                    # GQA group size
                scores = (q.view(B, n_kv, g, hd) @ K.transpose(-1, -2)) * hd ** -0.5       # (B, n_kv, g, S)
                scores = scores.masked_fill(~mask[:, None], float("-inf"))
                o = (torch.softmax(scores.float(), -1).to(V.dtype) @ V).view(B, -1, 1, hd)
            else:
                o = F.scaled_dot_product_attention(q, K, V, attn_mask=mask[:, None], enable_gqa=K.shape[1] != q.shape[1])
            x = x + a.o_proj(o.transpose(1, 2).reshape(B, t, -1))
            gate, up = F.linear(layer.post_attention_layernorm(x), w["gu_w"], w["gu_b"]).split(w["n_ff"], dim=-1)
            x = x + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
        return self.model.lm_head(m.norm(x[:, -1]))

    def _forward_hf(self, state, ids, pos, start, mask):
        # A 2-D padding mask over every slot so far; the model builds its own causal mask from it.
        key_ok = mask[:, -1, :]                                                              # (B, slots)
        out = self.model(input_ids=ids, attention_mask=key_ok.long(), position_ids=pos,
                         past_key_values=state["cache"], use_cache=True)
        return out.logits[:, -1]


def _effective(linear, attr: str):
    """A linear layer's weight or bias as it acts now. A `peft` LoRA layer (PPO with --lora-rank) keeps
    its base weight aside: its update B·A·scale is added for each active adapter, so the engine samples
    from the policy being trained, not from its frozen base."""
    if hasattr(linear, "base_layer") and hasattr(linear, "get_delta_weight"):
        value = getattr(linear.base_layer, attr)
        if attr == "weight" and not linear.disable_adapters and not linear.merged:
            for name in linear.active_adapters:
                if name in linear.lora_A:
                    value = value + linear.get_delta_weight(name)
        return value
    return getattr(linear, attr, None)


def row_seed(seed: int, i: int) -> int:
    """The seed of row i of a call given one `seed`. A caller that splits such a call (a share of the rows
    per process under torchrun) passes each row `row_seed(seed, i)` of its place i in the whole call, as a
    list of seeds: every row then draws exactly what it draws in one process."""
    return (seed * 1_000_003 + i) % 2**63


@dataclass
class Params:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list | str | None = None
    seed: int | None = None
    gen: torch.Generator | None = None


class _Sampler:
    """Per-row temperature / top-k / top-p, vectorised; one uniform draw per row from its own generator."""

    def __init__(self, params: list[Params], allowed: torch.Tensor):
        self.temp = torch.tensor([max(float(p.temperature), 1e-6) for p in params])[:, None]
        self.greedy = torch.tensor([p.temperature <= 0 for p in params])
        self.top_p = torch.tensor([float(p.top_p) for p in params])[:, None]
        self.top_k = [int(p.top_k or 0) for p in params]
        self.gens = [p.gen for p in params]
        self.blocked = ~allowed

    def __call__(self, logits: torch.Tensor):
        # Sampled where the logits are (a GPU keeps its B×V logits; only B uniforms from the rows' own CPU
        # generators travel, and B ids come back for the stop checks).
        dev = logits.device
        if self.blocked.device != dev:
            self.blocked, self.temp, self.greedy, self.top_p = (x.to(dev) for x in (self.blocked, self.temp, self.greedy, self.top_p))
        logits = logits.float().masked_fill(self.blocked, float("-inf"))
        greedy_ids = logits.argmax(-1)
        greedy_lp = torch.log_softmax(logits, -1).gather(-1, greedy_ids[:, None]).squeeze(-1)
        if bool(self.greedy.all()):
            return greedy_ids, greedy_lp
        z = logits / self.temp
        if any(self.top_k):
            k = torch.tensor([k if 0 < k < z.shape[-1] else z.shape[-1] for k in self.top_k], device=dev)
            # the k-th largest of each row from a top-k of the largest k asked, not a sort of the vocabulary
            kth = torch.topk(z, int(k.max()), dim=-1).values.gather(-1, (k - 1)[:, None])
            z = z.masked_fill(z < kth, float("-inf"))
        if bool((self.top_p < 1).any()):
            sorted_z, sorted_i = torch.sort(z, descending=True, dim=-1)
            probs = torch.softmax(sorted_z, -1)
            # drop a token when the mass BEFORE it already reaches top_p (the top token always stays)
            drop = probs.cumsum(-1) - probs >= self.top_p
            z = torch.full_like(z, float("-inf")).scatter(-1, sorted_i, sorted_z.masked_fill(drop, float("-inf")))
        logp = torch.log_softmax(z, -1)
        u = torch.cat([torch.rand(1, generator=g) for g in self.gens]).to(dev)           # (B,)
        cdf = logp.exp().cumsum(-1)
        nxt = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(-1).clamp(max=z.shape[-1] - 1)
        lp = logp.gather(-1, nxt[:, None]).squeeze(-1)
        return torch.where(self.greedy, greedy_ids, nxt), torch.where(self.greedy, greedy_lp, lp)


def _rope(q, k, cos, sin):
    """Rotary embedding, as `transformers`' Llama applies it (rotate-half convention)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rot(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def _stops(stop) -> list[str]:
    return [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]


def _find_stop(text: str, stop, start: int = 0) -> int | None:
    """Where the first stop string begins in text[start:] (an index into text), or None."""
    hits = [i for i in (text.find(s, start) for s in _stops(stop)) if i >= 0]
    return min(hits) if hits else None


class Detokenizer:
    """Token ids → text, one token at a time, decoding only a short window: the text of the tokens since
    the last emitted piece, minus the text they had before the new one. Decoding a window from a token
    boundary keeps tokenizers that drop a word's leading space at the start of a decode (SentencePiece)
    right, since both decodes start at the same token; a window ending in a partial UTF-8 character
    decodes to U+FFFD and is held back until the character completes. `text` equals decoding all ids."""

    def __init__(self, tok):
        self.tok, self.ids, self.text = tok, [], ""
        self.prefix = self.read = 0  # ids[prefix:read] was decoded last time; ids[read:] not yet emitted

    def push(self, token: int) -> str:
        """Add a token; return the new text it completes ("" while a character is incomplete)."""
        self.ids.append(token)
        old = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        if len(now) <= len(old) or now.endswith("\ufffd"):
            return ""
        new = now[len(old):]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += new
        return new


def _trim_to_text(tok, ids, lps, text):
    """Keep the shortest prefix of ids whose decoding covers `text` (drop tokens after a stop string)."""
    for n in range(1, len(ids) + 1):
        if len(tok.decode(ids[:n])) >= len(text):
            return ids[:n], lps[:n]
    return ids, lps
